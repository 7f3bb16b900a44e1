//! HTTP answers with a body, shared by the ingress and admin listeners.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

pub type Reply = Response<Full<Bytes>>;

/// An answer with `content_type`.
pub fn with(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A JSON answer.
pub fn json(status: StatusCode, body: serde_json::Value) -> Reply {
    with(status, "application/json", body.to_string())
}

/// `{"error": message}`.
pub fn error(status: StatusCode, message: &str) -> Reply {
    json(status, serde_json::json!({ "error": message }))
}
