//! The HTTP front end: one `match` over (method, path), authentication, body limits, and
//! the translation of every outcome into a response. `/predict` is fmnist's own contract;
//! `/v2` is the Open Inference Protocol's REST form (JSON and binary tensors).

#[cfg(test)]
mod fuzz;
pub mod json;
pub mod openapi;
pub mod page;
pub mod predict;
pub mod v2;

use super::error::ApiError;
use super::infer;
use super::{AppState, Protocol};
use crate::classes::IMAGE_PIXELS;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A model named in a v2 path, with the version when the path is versioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPath {
    pub name: String,
    pub version: Option<String>,
}

/// A resolved path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Predict,
    Server,
    Live,
    Ready,
    Model(ModelPath),
    ModelReady(ModelPath),
    Config(ModelPath),
    Infer(ModelPath),
    Metrics,
    OpenApi,
    /// The web page and its assets.
    Page(page::Asset),
}

impl Route {
    /// Resolves a path, or `None` for an unknown one.
    pub fn resolve(path: &str) -> Option<Route> {
        // Exactly one leading slash: `//predict` or `//` is not an alias of a route.
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        Some(match segments.as_slice() {
            ["predict"] => Route::Predict,
            ["v2"] => Route::Server,
            ["v2", "health", "live"] => Route::Live,
            ["v2", "health", "ready"] => Route::Ready,
            ["v2", "models", name, rest @ ..] if !name.is_empty() => {
                let (version, tail) = match rest {
                    ["versions", v, tail @ ..] if !v.is_empty() => (Some(v.to_string()), tail),
                    _ => (None, rest),
                };
                let m = ModelPath {
                    name: name.to_string(),
                    version,
                };
                match tail {
                    [] => Route::Model(m),
                    ["ready"] => Route::ModelReady(m),
                    ["config"] => Route::Config(m),
                    ["infer"] => Route::Infer(m),
                    _ => return None,
                }
            }
            ["metrics"] => Route::Metrics,
            ["openapi.json"] => Route::OpenApi,
            other => Route::Page(page::Asset::resolve(other)?),
        })
    }

    /// The one method this route answers.
    pub fn method(&self) -> Method {
        match self {
            Route::Predict | Route::Infer(_) => Method::POST,
            _ => Method::GET,
        }
    }

    /// The route's template, used as the metrics label (bounded cardinality).
    pub fn label(&self) -> &'static str {
        let versioned = |m: &ModelPath, plain: &'static str, with: &'static str| {
            if m.version.is_some() {
                with
            } else {
                plain
            }
        };
        match self {
            Route::Predict => "/predict",
            Route::Server => "/v2",
            Route::Live => "/v2/health/live",
            Route::Ready => "/v2/health/ready",
            Route::Model(m) => versioned(
                m,
                "/v2/models/{name}",
                "/v2/models/{name}/versions/{version}",
            ),
            Route::ModelReady(m) => versioned(
                m,
                "/v2/models/{name}/ready",
                "/v2/models/{name}/versions/{version}/ready",
            ),
            Route::Config(m) => versioned(
                m,
                "/v2/models/{name}/config",
                "/v2/models/{name}/versions/{version}/config",
            ),
            Route::Infer(m) => versioned(
                m,
                "/v2/models/{name}/infer",
                "/v2/models/{name}/versions/{version}/infer",
            ),
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::Page(a) => a.path(),
        }
    }

    /// Prediction, metadata and configuration need credentials; health, readiness, metrics
    /// and the documents (the page included) do not (versioned routes like their unversioned
    /// twins).
    fn needs_auth(&self) -> bool {
        matches!(
            self,
            Route::Predict | Route::Model(_) | Route::Config(_) | Route::Infer(_)
        )
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let mut r = json_response(e.status(), &e.body());
    for (k, v) in e.headers() {
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

/// The request id: the client's `x-request-id` when it is short printable ASCII, else a new one.
fn request_id(req: &Request<Incoming>, state: &AppState) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "{}-{}",
                state.id_prefix,
                state.next_id.fetch_add(1, Ordering::Relaxed)
            )
        })
}

/// Entry point for every request.
pub async fn handle(
    state: Arc<AppState>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let id = request_id(&req, &state);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = Route::resolve(&path);
    let label = route.as_ref().map_or("other", Route::label);
    let result = state
        .unless_expired(dispatch(&state, peer, route, req))
        .await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    // Lame duck: the client learns from this response that the connection is going away,
    // never from a socket closed after it sent a request.
    if state.shutdown.phase() >= super::drain::Phase::Draining {
        resp.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    state
        .metrics
        .request(Protocol::Http, label, status, seconds);
    // The path is logged, never headers: Authorization must not reach the logs.
    tracing::info!(request_id = %id, %peer, %method, route = label, status, ms = seconds * 1e3, "request");
    Ok(resp)
}

async fn dispatch(
    state: &AppState,
    peer: SocketAddr,
    route: Option<Route>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let route = route.ok_or_else(|| ApiError::NotFound(req.uri().path().to_string()))?;
    if req.method() != route.method() {
        return Err(ApiError::MethodNotAllowed {
            method: req.method().to_string(),
            allow: if route.method() == Method::POST {
                "POST"
            } else {
                "GET"
            },
        });
    }
    if route.needs_auth() {
        let header = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        state.authenticate(peer.ip(), header).await?;
    }
    let known = |m: &ModelPath| state.model.check(&m.name, m.version.as_deref());
    match route {
        Route::Live => Ok(json_response(StatusCode::OK, &json!({ "live": true }))),
        Route::Ready => Ok(readiness(state.is_ready(), None)),
        Route::Server => Ok(json_response(StatusCode::OK, &v2::server_metadata())),
        Route::Model(m) => {
            known(&m)?;
            Ok(json_response(
                StatusCode::OK,
                &v2::model_metadata(&state.model),
            ))
        }
        Route::ModelReady(m) => {
            known(&m)?;
            Ok(readiness(state.is_ready(), Some(&m.name)))
        }
        Route::Config(m) => {
            known(&m)?;
            Ok(json_response(
                StatusCode::OK,
                &v2::model_config(&state.model),
            ))
        }
        Route::Metrics => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(r)
        }
        Route::OpenApi => Ok(json_response(StatusCode::OK, &state.openapi)),
        Route::Page(asset) => Ok(page::response(asset, &state.model.name)),
        Route::Predict => {
            let arriving = state.batcher.arriving()?;
            let preview = query_flag(&req, "preview")?;
            let mime = media_type(&req).unwrap_or_default();
            let (pixels, n, single) = if mime.starts_with("image/") {
                let body =
                    read_body(state, req, state.config.max_image_bytes, BodyKind::Image).await?;
                let seen = state.images.pixels(vec![body]).await?;
                (super::images::unit_pixels(&seen), 1, true)
            } else if mime == "multipart/form-data" {
                let boundary = super::images::boundary(&content_type(&req))?;
                let body =
                    read_body(state, req, state.config.max_image_bytes, BodyKind::Form).await?;
                let files =
                    super::images::form_files(body, &boundary, state.config.max_images).await?;
                let seen = state.images.pixels(files).await?;
                (super::images::unit_pixels(&seen), seen.len(), false)
            } else {
                let body =
                    read_body(state, req, state.config.max_body_bytes, BodyKind::Json).await?;
                let parsed = match predict::fast_single_image(&body) {
                    Some(pixels) => predict::PredictRequest {
                        pixels,
                        n: 1,
                        single: true,
                        photos: Vec::new(),
                    },
                    None => predict::parse_predict(
                        &predict::parse_json(&body)?,
                        state.config.max_images,
                    )?,
                };
                if parsed.photos.is_empty() {
                    (parsed.pixels, parsed.n, parsed.single)
                } else {
                    let files = parsed.photos.into_iter().map(Bytes::from).collect();
                    let seen = state.images.pixels(files).await?;
                    (super::images::unit_pixels(&seen), parsed.n, parsed.single)
                }
            };
            let shown = preview.then(|| pixels.clone());
            let logits = state.batcher.infer(arriving, pixels, n).await?;
            let mut preds = logits
                .chunks_exact(crate::NUM_CLASSES)
                .enumerate()
                .map(|(i, row)| {
                    let mut p = predict::prediction(row);
                    if let (Some(px), Value::Object(map)) = (&shown, &mut p) {
                        let seen = &px[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS];
                        let bytes: Vec<u8> =
                            seen.iter().map(|v| (v * 255.0).round() as u8).collect();
                        map.insert("input".into(), json!(bytes));
                    }
                    p
                });
            let body = if single {
                preds.next().unwrap_or(Value::Null)
            } else {
                json!({ "predictions": preds.collect::<Vec<_>>() })
            };
            Ok(json_response(StatusCode::OK, &body))
        }
        Route::Infer(m) => {
            known(&m)?;
            let arriving = state.batcher.arriving()?;
            let header_len = req
                .headers()
                .get(v2::HEADER_LENGTH)
                .map(|v| v2::header_length(v.as_bytes()))
                .transpose()?;
            let binary_type = is_octet_stream(&req);
            let body = read_body(state, req, state.config.max_body_bytes, BodyKind::Infer).await?;
            if binary_type && header_len.is_none() {
                return Err(ApiError::BadRequest(
                    "an application/octet-stream body needs the Inference-Header-Content-Length                      header (the binary tensor data extension)"
                        .into(),
                ));
            }
            let mut parsed = v2::decode(&body, header_len, state.config.max_images)?;
            drop(body);
            // The pixels go to the batcher; the response needs only the rest.
            let pixels = state.images.request_pixels(&mut parsed).await?;
            let logits = state.batcher.infer(arriving, pixels, parsed.n).await?;
            let tensors = infer::outputs(&parsed, &logits);
            let encoded = v2::encode(&state.model, parsed.id.as_deref(), &tensors);
            let mut r = Response::new(Full::new(Bytes::from(encoded.body)));
            let headers = r.headers_mut();
            match encoded.header_len {
                None => {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                Some(n) => {
                    headers.insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    headers.insert(v2::HEADER_LENGTH, HeaderValue::from(n));
                }
            }
            Ok(r)
        }
    }
}

/// A readiness answer (server, or the model `name`): told by the status code, 200 or 503,
/// since tritonclient's is_server_ready / is_model_ready read only that; the JSON body says
/// the same.
fn readiness(ready: bool, name: Option<&str>) -> Response<Full<Bytes>> {
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = match name {
        None => json!({ "ready": ready }),
        Some(n) => json!({ "name": n, "ready": ready }),
    };
    json_response(status, &body)
}

/// The media type of a request, lower-cased without parameters.
fn media_type(req: &Request<Incoming>) -> Option<String> {
    req.headers().get(CONTENT_TYPE).map(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    })
}

/// The Content-Type header as text ("" when absent).
fn content_type(req: &Request<Incoming>) -> String {
    req.headers()
        .get(CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

/// A boolean query parameter, the only one the route takes: absent or `false` is false,
/// `true` (or no value) is true; another value, or any other parameter, is 400 (as unknown
/// JSON fields are refused, so that a misspelt option is not silently ignored).
fn query_flag(req: &Request<Incoming>, name: &str) -> Result<bool, ApiError> {
    let Some(query) = req.uri().query() else {
        return Ok(false);
    };
    let mut on = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        if k != name {
            let shown: String = k.chars().take(40).collect();
            return Err(ApiError::BadRequest(format!(
                "unknown query parameter {shown:?}; this route takes only {name}"
            )));
        }
        on = match v {
            "true" | "1" => true,
            "false" | "0" => false,
            other => {
                let shown: String = other.chars().take(20).collect();
                return Err(ApiError::BadRequest(format!(
                    "query parameter {name} is {shown:?}; use true or false"
                )));
            }
        };
    }
    Ok(on)
}

fn is_octet_stream(req: &Request<Incoming>) -> bool {
    media_type(req).as_deref() == Some("application/octet-stream")
}

/// What a route's body may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    /// `/predict` with JSON (pixels or base64 images).
    Json,
    /// `/predict` with a raw image body (`image/*`; the content decides the format).
    Image,
    /// `/predict` with `multipart/form-data`.
    Form,
    /// v2 infer: JSON, `application/octet-stream` (the binary extension) or no
    /// Content-Type at all, as tritonclient sends.
    Infer,
}

/// Checks the content type, refuses bodies over `limit` before reading them when the size is
/// announced, and stops reading at `limit` when it is not (chunked bodies). The limit covers
/// the whole body, binary sections included.
async fn read_body(
    state: &AppState,
    req: Request<Incoming>,
    limit: usize,
    kind: BodyKind,
) -> Result<Bytes, ApiError> {
    let mime = media_type(&req);
    let ok = match mime.as_deref() {
        Some(m)
            if m == "application/json"
                || (m.starts_with("application/") && m.ends_with("+json")) =>
        {
            true
        }
        Some("application/octet-stream") => kind == BodyKind::Infer,
        None => kind == BodyKind::Infer,
        Some(m) if m.starts_with("image/") => kind == BodyKind::Image,
        Some("multipart/form-data") => kind == BodyKind::Form,
        Some(_) => false,
    };
    if !ok {
        let got = req
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .chars()
                    .take(100)
                    .collect()
            })
            .unwrap_or_else(|| "no Content-Type".into());
        return Err(ApiError::UnsupportedMediaType {
            expected: match kind {
                BodyKind::Json | BodyKind::Image | BodyKind::Form => {
                    "application/json, image/png, image/jpeg, image/webp, image/gif, image/bmp or multipart/form-data"
                }
                BodyKind::Infer => "application/json or application/octet-stream",
            },
            got,
        });
    }
    let body = req.into_body();
    if body.size_hint().lower() > limit as u64 {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match super::limits::collect(state.timed(body), limit).await {
        Ok(bytes) => Ok(bytes),
        Err(super::limits::CollectError::TooLarge) => Err(ApiError::PayloadTooLarge { limit }),
        Err(super::limits::CollectError::TimedOut(m)) => Err(ApiError::RequestTimeout(m)),
        Err(super::limits::CollectError::Other(e)) => Err(ApiError::BadRequest(format!(
            "could not read the body: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_route_resolves_with_its_method() {
        for (method, template) in openapi::ROUTES {
            let path = template
                .replace("{name}", "fmnist-cnn")
                .replace("{version}", "1");
            let route = Route::resolve(&path).unwrap_or_else(|| panic!("{path} does not resolve"));
            assert_eq!(route.method().as_str(), *method, "{path}");
            assert_eq!(route.label(), *template);
        }
    }

    #[test]
    fn not_ready_is_503_with_the_body() {
        use http_body_util::BodyExt;
        for (ready, name, status, body) in [
            (true, None, 200, r#"{"ready":true}"#),
            (false, None, 503, r#"{"ready":false}"#),
            (false, Some("m"), 503, r#"{"name":"m","ready":false}"#),
            (true, Some("m"), 200, r#"{"name":"m","ready":true}"#),
        ] {
            let r = readiness(ready, name);
            assert_eq!(r.status().as_u16(), status);
            let bytes = block_on(r.into_body().collect()).to_bytes();
            assert_eq!(std::str::from_utf8(&bytes).unwrap(), body);
        }
    }

    /// `Full` bodies are ready at once; a one-thread runtime drives the future.
    fn block_on<F: std::future::Future<Output = Result<C, Infallible>>, C>(f: F) -> C {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
            .unwrap()
    }

    #[test]
    fn unknown_paths_do_not_resolve() {
        for p in [
            "//",
            "//predict",
            "/ui",
            "/ui/app.js/x",
            "/predict/x",
            "/v2/models",
            "/v2/models//infer",
            "/v2/models/m/versions//infer",
            "/v2/models/m/versions/1/x",
            "/v2/models/m/x",
            "/v2/health",
            "/metricsx",
        ] {
            assert_eq!(Route::resolve(p), None, "{p}");
        }
    }
}
