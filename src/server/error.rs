//! Every error the API can answer, mapped in one place to its HTTP status and JSON body and
//! to its gRPC status code (same message).

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
    #[error(
        "unknown version '{version}' of model '{model}'; this server serves version '{served}'"
    )]
    UnknownVersion {
        model: String,
        version: String,
        served: String,
    },
    #[error("method {method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("expected Content-Type: {expected}, got {got}")]
    UnsupportedMediaType { expected: &'static str, got: String },
    #[error("{0}")]
    Unprocessable(String),
    /// An image over the decoding bounds (dimensions or decoded size): 413.
    #[error("{0}")]
    ImageTooLarge(String),
    /// An image in a format that is not accepted: 415.
    #[error("{0}")]
    UnsupportedImage(String),
    #[error("{0}; closing the connection")]
    RequestTimeout(String),
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
            ApiError::NotFound(_) | ApiError::UnknownModel(_) | ApiError::UnknownVersion { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } | ApiError::ImageTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::UnsupportedMediaType { .. } | ApiError::UnsupportedImage(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
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
            // The rest of a stalled body may still come; the connection cannot be reused.
            ApiError::RequestTimeout(_) => vec![("connection", "close".into())],
            _ => Vec::new(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.to_string() })
    }

    /// The gRPC status code beside the HTTP status: 400/422 are INVALID_ARGUMENT, 401
    /// UNAUTHENTICATED, 404 NOT_FOUND, 413 and a full queue RESOURCE_EXHAUSTED, and the
    /// failed-auth lockout (HTTP's 429) RESOURCE_EXHAUSTED too: UNAVAILABLE would invite the
    /// automatic retries gRPC clients make on it, more guesses during the lockout. Draining
    /// is UNAVAILABLE, which clients do retry, elsewhere.
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ApiError::BadJson(_) | ApiError::BadRequest(_) | ApiError::Unprocessable(_) => {
                Code::InvalidArgument
            }
            ApiError::UnsupportedMediaType { .. } | ApiError::UnsupportedImage(_) => {
                Code::InvalidArgument
            }
            ApiError::Unauthorized => Code::Unauthenticated,
            ApiError::NotFound(_) | ApiError::UnknownModel(_) | ApiError::UnknownVersion { .. } => {
                Code::NotFound
            }
            ApiError::MethodNotAllowed { .. } => Code::Unimplemented,
            ApiError::PayloadTooLarge { .. }
            | ApiError::ImageTooLarge(_)
            | ApiError::QueueFull { .. }
            | ApiError::TooManyRequests { .. } => Code::ResourceExhausted,
            ApiError::ShuttingDown => Code::Unavailable,
            ApiError::RequestTimeout(_) => Code::DeadlineExceeded,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// The gRPC status: the code, the HTTP side's message, and `retry-after` metadata where
    /// HTTP sends a Retry-After header.
    pub fn to_grpc(&self) -> tonic::Status {
        let mut status = tonic::Status::new(self.grpc_code(), self.to_string());
        for (name, value) in self.headers() {
            if name == "retry-after" {
                if let Ok(v) = value.parse() {
                    status.metadata_mut().insert("retry-after", v);
                }
            }
        }
        status
    }
}

/// One status per image failure: 413 over the bounds, 415 not an accepted format, 422
/// corrupt or truncated.
impl From<crate::photo::PhotoError> for ApiError {
    fn from(e: crate::photo::PhotoError) -> Self {
        use crate::photo::PhotoError;
        match e {
            PhotoError::TooLarge(m) => ApiError::ImageTooLarge(m),
            PhotoError::Unsupported(m) => ApiError::UnsupportedImage(m),
            PhotoError::Corrupt(m) => ApiError::Unprocessable(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table the README states, checked for every variant.
    #[test]
    fn http_and_grpc_codes_pair_up() {
        use tonic::Code;
        let cases = [
            (ApiError::BadJson("x".into()), 400, Code::InvalidArgument),
            (ApiError::BadRequest("x".into()), 400, Code::InvalidArgument),
            (
                ApiError::Unprocessable("x".into()),
                422,
                Code::InvalidArgument,
            ),
            (ApiError::Unauthorized, 401, Code::Unauthenticated),
            (ApiError::UnknownModel("m".into()), 404, Code::NotFound),
            (
                ApiError::PayloadTooLarge { limit: 1 },
                413,
                Code::ResourceExhausted,
            ),
            (
                ApiError::ImageTooLarge("x".into()),
                413,
                Code::ResourceExhausted,
            ),
            (
                ApiError::UnsupportedImage("x".into()),
                415,
                Code::InvalidArgument,
            ),
            (
                ApiError::QueueFull {
                    retry_after_secs: 1,
                },
                503,
                Code::ResourceExhausted,
            ),
            (
                ApiError::TooManyRequests {
                    retry_after_secs: 60,
                },
                429,
                Code::ResourceExhausted,
            ),
            (ApiError::ShuttingDown, 503, Code::Unavailable),
            (
                ApiError::RequestTimeout("x".into()),
                408,
                Code::DeadlineExceeded,
            ),
            (ApiError::Internal("x".into()), 500, Code::Internal),
        ];
        for (e, http, grpc) in cases {
            assert_eq!(e.status().as_u16(), http, "{e}");
            let s = e.to_grpc();
            assert_eq!(s.code(), grpc, "{e}");
            assert_eq!(s.message(), e.to_string());
        }
        let s = ApiError::TooManyRequests {
            retry_after_secs: 60,
        }
        .to_grpc();
        assert_eq!(s.metadata().get("retry-after").unwrap(), "60");
    }
}
