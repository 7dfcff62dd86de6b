//! The router: one `match` over (method, path), authentication, body limits, and the
//! translation of every outcome into a response.

use super::api;
use super::error::ApiError;
use super::AppState;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A resolved path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Predict,
    Server,
    Live,
    Ready,
    Model(String),
    ModelReady(String),
    Infer(String),
    Metrics,
    OpenApi,
}

impl Route {
    /// Resolves a path, or `None` for an unknown one.
    pub fn resolve(path: &str) -> Option<Route> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        Some(match segments.as_slice() {
            ["predict"] => Route::Predict,
            ["v2"] => Route::Server,
            ["v2", "health", "live"] => Route::Live,
            ["v2", "health", "ready"] => Route::Ready,
            ["v2", "models", name] if !name.is_empty() => Route::Model(name.to_string()),
            ["v2", "models", name, "ready"] if !name.is_empty() => {
                Route::ModelReady(name.to_string())
            }
            ["v2", "models", name, "infer"] if !name.is_empty() => Route::Infer(name.to_string()),
            ["metrics"] => Route::Metrics,
            ["openapi.json"] => Route::OpenApi,
            _ => return None,
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
        match self {
            Route::Predict => "/predict",
            Route::Server => "/v2",
            Route::Live => "/v2/health/live",
            Route::Ready => "/v2/health/ready",
            Route::Model(_) => "/v2/models/{name}",
            Route::ModelReady(_) => "/v2/models/{name}/ready",
            Route::Infer(_) => "/v2/models/{name}/infer",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
        }
    }

    fn needs_auth(&self) -> bool {
        matches!(self, Route::Predict | Route::Model(_) | Route::Infer(_))
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
    let result = dispatch(&state, peer, route, req).await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    state.metrics.request(label, status, seconds);
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
        state.throttle.check(peer.ip())?;
        match state.auth.check(header).await {
            Ok(_) => state.throttle.succeeded(peer.ip()),
            // A request without credentials is the normal first step of Basic auth, not a
            // guess: only wrong credentials count towards the lockout.
            Err(e) if header.is_none() => return Err(e),
            Err(e) => {
                if state.throttle.failed(peer.ip()) {
                    tracing::warn!(%peer, "too many failed authentication attempts; address locked out");
                }
                return Err(e);
            }
        }
    }
    let model_known = |name: &str| {
        if name == state.model_name {
            Ok(())
        } else {
            Err(ApiError::UnknownModel(name.chars().take(100).collect()))
        }
    };
    match route {
        Route::Live => Ok(json_response(StatusCode::OK, &json!({ "live": true }))),
        Route::Ready => {
            let ready = state.ready.load(Ordering::SeqCst);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Ok(json_response(status, &json!({ "ready": ready })))
        }
        Route::Server => Ok(json_response(
            StatusCode::OK,
            &json!({ "name": "fmnist", "version": env!("CARGO_PKG_VERSION"), "extensions": [] }),
        )),
        Route::Model(name) => {
            model_known(&name)?;
            Ok(json_response(StatusCode::OK, &state.model_metadata))
        }
        Route::ModelReady(name) => {
            model_known(&name)?;
            let ready = state.ready.load(Ordering::SeqCst);
            Ok(json_response(
                StatusCode::OK,
                &json!({ "name": name, "ready": ready }),
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
        Route::Predict => {
            let arriving = state.batcher.arriving()?;
            let body = read_json(req, state.config.max_body_bytes).await?;
            let parsed = match api::fast_single_image(&body) {
                Some(pixels) => api::PredictRequest {
                    pixels,
                    n: 1,
                    single: true,
                },
                None => api::parse_predict(&api::parse_json(&body)?, state.config.max_images)?,
            };
            let logits = state
                .batcher
                .infer(arriving, parsed.pixels, parsed.n)
                .await?;
            let mut preds = logits.chunks_exact(crate::NUM_CLASSES).map(api::prediction);
            let body = if parsed.single {
                preds.next().unwrap_or(Value::Null)
            } else {
                json!({ "predictions": preds.collect::<Vec<_>>() })
            };
            Ok(json_response(StatusCode::OK, &body))
        }
        Route::Infer(name) => {
            model_known(&name)?;
            let arriving = state.batcher.arriving()?;
            let body = read_json(req, state.config.max_body_bytes).await?;
            let mut parsed = api::parse_infer(&api::parse_json(&body)?, state.config.max_images)?;
            // The pixels go to the batcher; the response needs only the rest.
            let pixels = std::mem::take(&mut parsed.pixels);
            let logits = state.batcher.infer(arriving, pixels, parsed.n).await?;
            Ok(json_response(
                StatusCode::OK,
                &api::infer_response(&state.model_name, &parsed, &logits),
            ))
        }
    }
}

/// Checks the content type, refuses bodies over `limit` before reading them when the size is
/// announced, and stops reading at `limit` when it is not (chunked bodies).
async fn read_json(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let ctype = req
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string());
    let is_json = ctype.as_deref().is_some_and(|c| {
        let mime = c
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType(
            ctype.unwrap_or_else(|| "no Content-Type".into()),
        ));
    }
    let body = req.into_body();
    if body.size_hint().lower() > limit as u64 {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(e) => Err(ApiError::BadRequest(format!(
            "could not read the body: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_route_resolves_with_its_method() {
        for (method, template) in super::super::openapi::ROUTES {
            let path = template.replace("{name}", "fmnist-cnn");
            let route = Route::resolve(&path).unwrap_or_else(|| panic!("{path} does not resolve"));
            assert_eq!(route.method().as_str(), *method, "{path}");
            assert_eq!(route.label(), *template);
        }
    }

    #[test]
    fn unknown_paths_do_not_resolve() {
        for p in [
            "/",
            "/predict/x",
            "/v2/models",
            "/v2/models//infer",
            "/v2/health",
            "/metricsx",
        ] {
            assert_eq!(Route::resolve(p), None, "{p}");
        }
    }
}
