//! The console (`/console`): a page, a script and a style sheet, compiled into
//! the binary, that sign in with the admin token and use the `/admin/` API.
//! Served with a strict Content-Security-Policy: no inline script or style,
//! nothing from another origin, never framed.

use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, LOCATION, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::{error, Reply};
use crate::respond;

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// Everything from this origin only; no inline script or style; no framing.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Answers `/`, `/console` and its assets.
pub fn serve(method: &Method, path: &str) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let (content_type, body) = match path {
        "/" => {
            let mut r = respond::with(StatusCode::FOUND, "text/plain; charset=utf-8", "see /console\n");
            r.headers_mut().insert(LOCATION, HeaderValue::from_static("/console"));
            return r;
        }
        "/console" | "/console/" => ("text/html; charset=utf-8", PAGE),
        "/console/console.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/console/console.css" => ("text/css; charset=utf-8", STYLE),
        _ => return error(StatusCode::NOT_FOUND, "not found"),
    };
    let mut r = respond::with(StatusCode::OK, content_type, body);
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The security headers every answer of the admin listener carries.
pub fn secure(headers: &mut HeaderMap) {
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}
