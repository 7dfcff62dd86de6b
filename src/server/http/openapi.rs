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
    ("GET", "/v2/models/{name}/config"),
    ("POST", "/v2/models/{name}/infer"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("GET", "/v2/models/{name}/versions/{version}/config"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
    ("GET", "/ui/app.js"),
    ("GET", "/ui/app.css"),
    ("GET", "/ui/icon.svg"),
];

fn error_response(description: &str) -> Value {
    json!({ "description": description,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// A file of the web page (no credentials).
fn asset(summary: &str, mime: &str) -> Value {
    json!({ "summary": summary,
            "responses": { "200": { "description": summary,
                "content": { mime: { "schema": { "type": "string" } } } } } })
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

/// The same operation on the versioned path: the version parameter added.
fn versioned(op: &Value, version: &str) -> Value {
    let mut op = op.clone();
    let param = json!({
        "name": "version", "in": "path", "required": true,
        "schema": { "type": "string", "enum": [version] },
        "description": "Model version (--model-version); any other version is 404."
    });
    if let Some(params) = op["parameters"].as_array_mut() {
        params.push(param);
    } else {
        op["parameters"] = json!([param]);
    }
    op
}

/// Builds the document for a server whose model is called `model_name`, at `version`.
pub fn document(model_name: &str, version: &str, max_images: usize) -> Value {
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
                (
                    "415",
                    "Content-Type is not one the route takes (JSON; v2 infer also octet-stream).",
                ),
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
        "summary": "Classify one image or a batch of images: 784 pixels, or image files (PNG, JPEG, WebP, GIF, BMP) as the raw body, multipart `file` parts or base64.",
        "security": secured,
        "parameters": [{ "name": "preview", "in": "query", "required": false,
            "description": "Add `input`, the 784 pixels (0–255) the model saw, to each prediction.",
            "schema": { "type": "boolean" } }],
        "requestBody": { "required": true, "content": {
            "application/json": { "schema": {
            "oneOf": [
                { "type": "object", "required": ["image"], "additionalProperties": false,
                  "properties": { "image": image } },
                { "type": "object", "required": ["images"], "additionalProperties": false,
                  "properties": { "images": { "type": "array", "minItems": 1, "maxItems": max_images, "items": image } } },
                { "type": "object", "required": ["image_base64"], "additionalProperties": false,
                  "properties": { "image_base64": { "type": "string", "format": "byte" } } },
                { "type": "object", "required": ["images_base64"], "additionalProperties": false,
                  "properties": { "images_base64": { "type": "array", "minItems": 1, "maxItems": max_images,
                    "items": { "type": "string", "format": "byte" } } } }
            ] } },
            "image/png": { "schema": { "type": "string", "format": "binary" } },
            "image/jpeg": { "schema": { "type": "string", "format": "binary" } },
            "image/webp": { "schema": { "type": "string", "format": "binary" } },
            "image/gif": { "schema": { "type": "string", "format": "binary" } },
            "image/bmp": { "schema": { "type": "string", "format": "binary" } },
            "multipart/form-data": { "schema": { "type": "object", "required": ["file"],
                "properties": { "file": { "type": "array", "minItems": 1, "maxItems": max_images,
                    "items": { "type": "string", "format": "binary" } } } } }
        } },
        "responses": { "200": json_response("Prediction(s).", json!({ "oneOf": [
            { "$ref": "#/components/schemas/Prediction" },
            { "type": "object", "required": ["predictions"],
              "properties": { "predictions": { "type": "array", "items": { "$ref": "#/components/schemas/Prediction" } } } }
        ] })) }
    });
    common_errors(&mut predict, true);
    let infer_json_schema = json!({
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": { "type": "string" },
            "parameters": { "type": "object", "properties": {
                "binary_data_output": { "type": "boolean",
                    "description": "Binary tensor data extension: every output in the binary section unless it says otherwise." } } },
            "inputs": { "type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object", "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": { "type": "string" },
                    "shape": { "type": "array", "minItems": 2, "maxItems": 4,
                               "items": { "type": "integer", "minimum": 1 },
                               "description": "[N,784] or [N,1,28,28], N at most the server's --max-images" },
                    "datatype": { "type": "string", "enum": ["FP32"] },
                    "data": { "type": "array", "minItems": 1,
                              "description": "Row-major values within 0–1, flat or nested; as many as the shape says. Left out when parameters.binary_data_size is given." },
                    "parameters": { "type": "object", "properties": {
                        "binary_data_size": { "type": "integer", "minimum": 0,
                            "description": "Binary extension: this tensor's bytes (little-endian FP32, row-major) in the binary section after the JSON header." } } }
                } } },
            "outputs": { "type": "array", "items": { "type": "object", "required": ["name"],
                "properties": {
                    "name": { "type": "string", "enum": ["logits", "probabilities"] },
                    "parameters": { "type": "object", "properties": {
                        "binary_data": { "type": "boolean" },
                        "classification": { "type": "integer", "minimum": 1, "maximum": 10,
                            "description": "Classification extension: a BYTES tensor [N,K] of the top K \"score:index:label\" strings." } } } } },
                "description": "Outputs to return; all of them when left out." }
        } });
    let mut infer = json!({
        "summary": "Open Inference Protocol (KServe v2 / Triton) inference.",
        "description": "JSON tensors (Content-Type application/json, or none as tritonclient sends), or the binary tensor data extension: an Inference-Header-Content-Length header giving the JSON header's length, then the raw tensor bytes (application/octet-stream or no Content-Type). Inference-Header-Content-Length: 0 is the raw binary request: the body is one image of 784 little-endian FP32 values, and every output comes back binary. A binary response carries its own Inference-Header-Content-Length. Framing errors (sizes and lengths that do not match the body) are 400; invalid tensors, names and parameters are 422.",
        "security": secured,
        "parameters": [name_param, {
            "name": "Inference-Header-Content-Length", "in": "header", "required": false,
            "schema": { "type": "integer", "minimum": 0 },
            "description": "Binary tensor data extension: length of the JSON header at the start of the body." }],
        "requestBody": { "required": true, "content": {
            "application/json": { "schema": infer_json_schema },
            "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } },
        "responses": {
            "200": { "description": "Output tensors: JSON, or with Inference-Header-Content-Length, the JSON header and the binary outputs.",
                "headers": { "Inference-Header-Content-Length": { "schema": { "type": "integer" },
                    "description": "Present when outputs are in the binary section." } },
                "content": {
                    "application/json": { "schema": { "type": "object",
                        "required": ["model_name", "model_version", "outputs"],
                        "properties": {
                            "model_name": { "type": "string" }, "model_version": { "type": "string" },
                            "id": { "type": "string" },
                            "outputs": { "type": "array", "items": { "type": "object",
                                "required": ["name", "datatype", "shape"],
                                "properties": { "name": { "type": "string" },
                                    "datatype": { "type": "string", "enum": ["FP32", "BYTES"] },
                                    "shape": { "type": "array", "items": { "type": "integer" } },
                                    "parameters": { "type": "object" },
                                    "data": { "type": "array" } } } } } } },
                    "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } },
            "404": error_response("Unknown model name or version.")
        }
    });
    common_errors(&mut infer, true);
    let mut model_meta = json!({
        "summary": "Model metadata (v2).", "security": secured, "parameters": [name_param],
        "responses": { "200": json_response("Metadata.", json!({ "type": "object",
            "required": ["name", "versions", "platform", "inputs", "outputs"] })),
            "404": error_response("Unknown model name or version.") }
    });
    common_errors(&mut model_meta, false);
    let mut model_config = json!({
        "summary": "Model configuration (Triton's model configuration extension: model_config.proto as JSON).",
        "security": secured, "parameters": [name_param],
        "responses": { "200": json_response("Configuration.", json!({ "type": "object",
            "required": ["name", "platform", "max_batch_size", "input", "output", "dynamic_batching"] })),
            "404": error_response("Unknown model name or version.") }
    });
    common_errors(&mut model_config, false);
    let model_ready = json!({
        "summary": "Model readiness (v2): 200 when ready, 503 while shutting down.", "parameters": [name_param],
        "responses": { "200": json_response("Ready.", json!({ "type": "object", "required": ["name", "ready"] })),
                       "503": json_response("Not ready.", json!({ "type": "object", "required": ["name", "ready"] })),
                       "404": error_response("Unknown model name or version.") } });
    let open = |summary: &str, schema: Value| {
        json!({ "summary": summary,
        "responses": { "200": json_response("OK.", schema) } })
    };
    json!({
        "openapi": "3.0.3",
        "info": { "title": "fmnist prediction API", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Fashion-MNIST classification. Prediction, model-metadata and configuration routes need HTTP Basic auth. Errors are {\"error\": \"...\"} JSON; every invalid v2 request is 422, malformed JSON and binary framing 400. The same service is offered over gRPC (inference.GRPCInferenceService on --grpc-listen) with the credentials in the authorization metadata." },
        "paths": {
            "/predict": { "post": predict },
            "/v2": { "get": open("Server metadata (v2).", json!({ "type": "object", "required": ["name", "version", "extensions"] })) },
            "/v2/health/live": { "get": open("Liveness (v2).", json!({ "type": "object", "required": ["live"] })) },
            "/v2/health/ready": { "get": {
                "summary": "Readiness (v2): 200 once the model is loaded, 503 while shutting down.",
                "responses": { "200": json_response("Ready.", json!({ "type": "object", "required": ["ready"] })),
                               "503": json_response("Not ready.", json!({ "type": "object", "required": ["ready"] })) } } },
            "/v2/models/{name}": { "get": model_meta },
            "/v2/models/{name}/ready": { "get": model_ready },
            "/v2/models/{name}/config": { "get": model_config },
            "/v2/models/{name}/infer": { "post": infer },
            "/v2/models/{name}/versions/{version}": { "get": versioned(&model_meta, version) },
            "/v2/models/{name}/versions/{version}/ready": { "get": versioned(&model_ready, version) },
            "/v2/models/{name}/versions/{version}/config": { "get": versioned(&model_config, version) },
            "/v2/models/{name}/versions/{version}/infer": { "post": versioned(&infer, version) },
            "/metrics": { "get": { "summary": "Prometheus metrics (text format).",
                "responses": { "200": { "description": "Metrics.", "content": { "text/plain": { "schema": { "type": "string" } } } } } } },
            "/openapi.json": { "get": open("This document.", json!({ "type": "object" })) },
            "/": { "get": asset("The web page: sign in, then classify a photo or a drawing.", "text/html") },
            "/ui/app.js": { "get": asset("The page's script.", "text/javascript") },
            "/ui/app.css": { "get": asset("The page's style sheet.", "text/css") },
            "/ui/icon.svg": { "get": asset("The page's icon.", "image/svg+xml") }
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
                        "probabilities": { "type": "object", "additionalProperties": { "type": "number" } },
                        "input": { "type": "array", "minItems": 784, "maxItems": 784,
                            "items": { "type": "integer", "minimum": 0, "maximum": 255 } } } }
            }
        }
    })
}
