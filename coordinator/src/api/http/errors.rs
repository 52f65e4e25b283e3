//! OpenAI's error body and the HTTP status of each gRPC code.

use crate::request::ApiError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// An error answered with OpenAI's error body.
#[derive(Debug)]
pub struct HttpError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) param: Option<String>,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status,
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    pub(crate) fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, Some(param))
    }

    pub(crate) fn from_status(s: &tonic::Status) -> Self {
        Self::new(http_status(s.code()), s.message(), None)
    }

    /// `rename` maps build_job's field names to the ones this request used.
    pub(crate) fn from_api(e: ApiError, rename: &dyn Fn(&'static str) -> &'static str) -> Self {
        let param = e.field.map(rename);
        let message = match param {
            Some(p) => format!("{p}: {}", e.message),
            None => e.message,
        };
        Self::new(http_status(e.code), message, param)
    }

    pub(crate) fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": error_type(self.status),
            "param": self.param,
            "code": Value::Null,
        }})
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

pub(crate) fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(crate) fn error_type(s: StatusCode) -> &'static str {
    match s.as_u16() {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "service_unavailable_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}
