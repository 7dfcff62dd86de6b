//! The OpenAPI 3 document served at `/openapi.json`. Its paths are checked against the router
//! by a test, so it cannot drift from what the server does.

use serde_json::{json, Value};

/// `(method, path template)` of every route the server answers.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/predict"),
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/ready"),
    ("POST", "/v2/models/{name}/infer"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

fn error_response(description: &str) -> Value {
    json!({ "description": description,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

/// Builds the document for a server whose model is called `model_name`.
pub fn document(model_name: &str, max_images: usize) -> Value {
    let name_param = json!({
        "name": "name", "in": "path", "required": true,
        "schema": { "type": "string", "enum": [model_name] },
        "description": "Model name (the model file's stem unless --model-name says otherwise)."
    });
    let secured = json!([{ "basicAuth": [] }]);
    let image = json!({ "type": "array", "minItems": 784, "maxItems": 784,
        "items": { "type": "number", "minimum": 0, "maximum": 255 },
        "description": "28x28 gray pixels, row-major, 0 (background) to 255." });
    let common_errors = |v: &mut Value, with_body: bool| {
        let r = v["responses"].as_object_mut().expect("responses");
        r.insert(
            "401".into(),
            error_response("Missing or wrong credentials."),
        );
        if with_body {
            for (code, d) in [
                ("400", "Malformed JSON."),
                ("413", "Body over the size limit."),
                ("415", "Content-Type is not application/json."),
                (
                    "422",
                    "Well-formed JSON that is not a valid request (the message names the value).",
                ),
                (
                    "503",
                    "Inference queue full or shutting down; see Retry-After.",
                ),
            ] {
                r.insert(code.into(), error_response(d));
            }
        }
    };
    let mut predict = json!({
        "summary": "Classify one image or a batch of images.",
        "security": secured,
        "requestBody": { "required": true, "content": { "application/json": { "schema": {
            "oneOf": [
                { "type": "object", "required": ["image"], "additionalProperties": false,
                  "properties": { "image": image } },
                { "type": "object", "required": ["images"], "additionalProperties": false,
                  "properties": { "images": { "type": "array", "minItems": 1, "maxItems": max_images, "items": image } } }
            ] } } } },
        "responses": { "200": json_response("Prediction(s).", json!({ "oneOf": [
            { "$ref": "#/components/schemas/Prediction" },
            { "type": "object", "required": ["predictions"],
              "properties": { "predictions": { "type": "array", "items": { "$ref": "#/components/schemas/Prediction" } } } }
        ] })) }
    });
    common_errors(&mut predict, true);
    let mut infer = json!({
        "summary": "Open Inference Protocol (KServe v2) inference.",
        "security": secured,
        "parameters": [name_param],
        "requestBody": { "required": true, "content": { "application/json": { "schema": {
            "type": "object", "required": ["inputs"],
            "properties": {
                "id": { "type": "string" },
                "inputs": { "type": "array", "minItems": 1, "maxItems": 1, "items": {
                    "type": "object", "required": ["name", "shape", "datatype", "data"],
                    "properties": {
                        "name": { "type": "string" },
                        "shape": { "type": "array", "minItems": 2, "maxItems": 4,
                                   "items": { "type": "integer", "minimum": 1 },
                                   "description": "[N,784] or [N,1,28,28], N at most the server's --max-images" },
                        "datatype": { "type": "string", "enum": ["FP32"] },
                        "data": { "type": "array", "minItems": 1,
                                  "description": "Row-major values within 0–1, flat or nested; as many as the shape says." }
                    } } },
                "outputs": { "type": "array", "items": { "type": "object", "required": ["name"],
                    "properties": { "name": { "type": "string", "enum": ["logits", "probabilities"] } } } }
            } } } } },
        "responses": {
            "200": json_response("Output tensors.", json!({ "type": "object",
                "required": ["model_name", "outputs"],
                "properties": {
                    "model_name": { "type": "string" }, "model_version": { "type": "string" },
                    "id": { "type": "string" },
                    "outputs": { "type": "array", "items": { "type": "object",
                        "required": ["name", "datatype", "shape", "data"],
                        "properties": { "name": { "type": "string" }, "datatype": { "type": "string" },
                            "shape": { "type": "array", "items": { "type": "integer" } },
                            "data": { "type": "array", "items": { "type": "number" } } } } } } })),
            "404": error_response("Unknown model name.")
        }
    });
    common_errors(&mut infer, true);
    let mut model_meta = json!({
        "summary": "Model metadata (v2).", "security": secured, "parameters": [name_param],
        "responses": { "200": json_response("Metadata.", json!({ "type": "object",
            "required": ["name", "platform", "inputs", "outputs"] })),
            "404": error_response("Unknown model name.") }
    });
    common_errors(&mut model_meta, false);
    let open = |summary: &str, schema: Value| {
        json!({ "summary": summary,
        "responses": { "200": json_response("OK.", schema) } })
    };
    json!({
        "openapi": "3.0.3",
        "info": { "title": "fmnist prediction API", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Fashion-MNIST classification. Prediction and model-metadata routes need HTTP Basic auth." },
        "paths": {
            "/predict": { "post": predict },
            "/v2": { "get": open("Server metadata (v2).", json!({ "type": "object", "required": ["name", "version", "extensions"] })) },
            "/v2/health/live": { "get": open("Liveness (v2).", json!({ "type": "object", "required": ["live"] })) },
            "/v2/health/ready": { "get": {
                "summary": "Readiness (v2): 200 once the model is loaded, 503 while shutting down.",
                "responses": { "200": json_response("Ready.", json!({ "type": "object", "required": ["ready"] })),
                               "503": json_response("Not ready.", json!({ "type": "object", "required": ["ready"] })) } } },
            "/v2/models/{name}": { "get": model_meta },
            "/v2/models/{name}/ready": { "get": {
                "summary": "Model readiness (v2).", "parameters": [name_param],
                "responses": { "200": json_response("Ready.", json!({ "type": "object", "required": ["name", "ready"] })),
                               "404": error_response("Unknown model name.") } } },
            "/v2/models/{name}/infer": { "post": infer },
            "/metrics": { "get": { "summary": "Prometheus metrics (text format).",
                "responses": { "200": { "description": "Metrics.", "content": { "text/plain": { "schema": { "type": "string" } } } } } } },
            "/openapi.json": { "get": open("This document.", json!({ "type": "object" })) }
        },
        "components": {
            "securitySchemes": { "basicAuth": { "type": "http", "scheme": "basic" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } },
                "Prediction": { "type": "object", "required": ["label", "class", "confidence", "probabilities"],
                    "properties": {
                        "label": { "type": "integer", "minimum": 0, "maximum": 9 },
                        "class": { "type": "string" },
                        "confidence": { "type": "number" },
                        "probabilities": { "type": "object", "additionalProperties": { "type": "number" } } } }
            }
        }
    })
}
