//! Every error the API can answer, mapped to its status and JSON body in one place.

use hyper::StatusCode;

/// An error answered to a client as `{"error": "..."}` with a fitting status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    BadJson(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("no route for {0}")]
    NotFound(String),
    #[error("unknown model '{0}'")]
    UnknownModel(String),
    #[error("method {method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("expected Content-Type: application/json, got {0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("too many failed authentication attempts from this address; retry later")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("server is at capacity (inference queue full); retry shortly")]
    QueueFull { retry_after_secs: u64 },
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("inference failed: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadJson(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) | ApiError::UnknownModel(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::QueueFull { .. } | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Extra headers the status calls for.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ApiError::Unauthorized => {
                vec![(
                    "www-authenticate",
                    "Basic realm=\"fmnist\", charset=\"UTF-8\"".into(),
                )]
            }
            ApiError::MethodNotAllowed { allow, .. } => vec![("allow", allow.to_string())],
            ApiError::QueueFull { retry_after_secs }
            | ApiError::TooManyRequests { retry_after_secs } => {
                vec![("retry-after", retry_after_secs.to_string())]
            }
            ApiError::ShuttingDown => vec![("retry-after", "1".into())],
            _ => Vec::new(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.to_string() })
    }
}
