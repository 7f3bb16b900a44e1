//! Payload formats: each checks its envelope and yields the event name and the dedup key.

use http::HeaderMap;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{EventLocator, Format};
use crate::ingress::auth::encode_hex;

/// What a format reads from a webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The event name routes match on, e.g. `page.published`.
    pub event: String,
    /// Two webhooks with the same key within the source's window are one.
    pub dedup_key: String,
    /// The body, parsed once: route filters and key programs simple enough
    /// for the relay to answer run on it (see `jq::direct`).
    pub json: Value,
}

/// Why a body was refused; the message goes back to the sender (it holds no secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("{0}")]
    Envelope(String),
}

/// Longest event name accepted; it travels in a header.
const MAX_EVENT_LEN: usize = 200;

pub fn parse(format: &Format, headers: &HeaderMap, body: &[u8]) -> Result<Parsed, FormatError> {
    let json: Value = serde_json::from_slice(body).map_err(|e| FormatError::NotJson(e.to_string()))?;
    let (event, dedup_key) = match format {
        Format::ButterCms => buttercms(&json, body),
        Format::CometCms => cometcms(&json),
        Format::Generic(locator) => generic(locator, &json, headers, body),
    }?;
    Ok(Parsed { event, dedup_key, json })
}

/// A format's event name and dedup key.
type Read = Result<(String, String), FormatError>;

/// `{"data":{...},"webhook":{"event":"page.published","target":"..."}}`.
/// Dedup key: event, `data.id`, `data.itemid` (collection items share `data.id`,
/// the collection key), `data.locale`, and `data.timestamp`, else `data.updated`,
/// else a hash of the body.
fn buttercms(json: &Value, body: &[u8]) -> Read {
    let webhook = object(json, "webhook")?;
    let event = event_name(webhook.get("event"), "webhook.event")?;
    let data = object(json, "data")?;
    let field = |k: &str| data.get(k).cloned().unwrap_or(Value::Null);
    let when = match (data.get("timestamp"), data.get("updated")) {
        (Some(t), _) if !t.is_null() => t.clone(),
        (_, Some(u)) if !u.is_null() => u.clone(),
        _ => Value::String(body_hash(body)),
    };
    let key = Value::Array(vec![event.clone().into(), field("id"), field("itemid"), field("locale"), when]);
    Ok((event, key.to_string()))
}

/// `{"event":"content.published","occurred_at":"...","data":{"type","id","slug"}}`.
/// Dedup key: event, `data.type`, `data.id`, `occurred_at`.
fn cometcms(json: &Value) -> Read {
    let event = event_name(json.get("event"), "event")?;
    let occurred_at = string(json.get("occurred_at"), "occurred_at")?;
    let data = object(json, "data")?;
    let kind = string(data.get("type"), "data.type")?;
    let id = string(data.get("id"), "data.id")?;
    let key = Value::Array(vec![event.clone().into(), kind.into(), id.into(), occurred_at.into()]);
    Ok((event, key.to_string()))
}

/// Any JSON: the event from a JSON pointer or a header; dedup on `webhook-id`
/// when present, else a hash of the body.
fn generic(locator: &EventLocator, json: &Value, headers: &HeaderMap, body: &[u8]) -> Read {
    let event = match locator {
        EventLocator::Pointer(ptr) => event_name(json.pointer(ptr), ptr)?,
        EventLocator::Header(name) => {
            let v = headers.get(name).ok_or_else(|| FormatError::Envelope(format!("header {name} is missing")))?;
            let s = v.to_str().map_err(|_| FormatError::Envelope(format!("header {name} is not text")))?;
            event_name(Some(&Value::String(s.to_string())), name.as_str())?
        }
    };
    let dedup_key = match headers.get("webhook-id") {
        Some(id) => format!("webhook-id:{}", encode_hex(id.as_bytes())),
        None => format!("body:{}", body_hash(body)),
    };
    Ok((event, dedup_key))
}

fn object<'a>(json: &'a Value, key: &str) -> Result<&'a serde_json::Map<String, Value>, FormatError> {
    match json.get(key) {
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(FormatError::Envelope(format!("`{key}` must be an object"))),
        None if json.is_object() => Err(FormatError::Envelope(format!("`{key}` is missing"))),
        None => Err(FormatError::Envelope("body must be a JSON object".into())),
    }
}

fn string(v: Option<&Value>, key: &str) -> Result<String, FormatError> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(FormatError::Envelope(format!("`{key}` is empty"))),
        Some(_) => Err(FormatError::Envelope(format!("`{key}` must be a string"))),
        None => Err(FormatError::Envelope(format!("`{key}` is missing"))),
    }
}

/// An event name travels in a header (`x-hookrelay-event`), so it must be printable ASCII.
fn event_name(v: Option<&Value>, key: &str) -> Result<String, FormatError> {
    let s = string(v, key)?;
    if s.len() > MAX_EVENT_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FormatError::Envelope(format!(
            "`{key}` must be 1 to {MAX_EVENT_LEN} printable ASCII characters without spaces"
        )));
    }
    Ok(s)
}

fn body_hash(body: &[u8]) -> String {
    encode_hex(&Sha256::digest(body))
}

#[cfg(test)]
#[path = "formats_tests.rs"]
mod tests;
