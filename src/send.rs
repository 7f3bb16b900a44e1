//! `hookrelay send`: a realistic sample webhook in a source's format, signed
//! as the source's auth requires, for trying a setup end to end.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};

use crate::config::{Auth, Encoding, EventLocator, Format, Settings, Source};
use crate::dispatch::client::{http_client, system_roots};
use crate::ingress::auth::{encode_hex, hmac, standard_webhooks_signature};

/// A webhook ready to post.
#[derive(Debug)]
pub struct Sample {
    pub url: Uri,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// Builds a sample `event` webhook for the source named `source`, addressed to
/// `url` or else to the relay's own listener.
pub fn sample(settings: &Settings, source: &str, event: &str, url: Option<&str>) -> Result<Sample, String> {
    let src = settings.sources.iter().find(|s| s.name == source).ok_or_else(|| {
        let names: Vec<&str> = settings.sources.iter().map(|s| s.name.as_str()).collect();
        format!("no source is named {source:?} (sources: {})", names.join(", "))
    })?;
    if event.is_empty() || !event.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{event:?} is not a valid event name"));
    }
    let url = match url {
        Some(u) => u.parse().map_err(|e| format!("{u:?} is not a URL: {e}"))?,
        None => default_url(settings, src)?,
    };
    let now = SystemTime::now();
    let (body, mut headers) = payload(src, event, now)?;
    headers.push((HeaderName::from_static("content-type"), HeaderValue::from_static("application/json")));
    headers.extend(sign(&src.auth, &body, now)?);
    Ok(Sample { url, headers, body: Bytes::from(body) })
}

/// Posts the sample; returns the status and the relay's answer.
pub async fn post(sample: Sample) -> Result<(u16, String), String> {
    let mut req = Request::post(sample.url).body(Full::new(sample.body)).map_err(|e| e.to_string())?;
    req.headers_mut().extend(sample.headers);
    exchange(req, Duration::from_secs(30)).await
}

/// Under the 5 s a container health check (`HEALTHCHECK --timeout=5s`)
/// allows, so that the reason is printed before it gives up.
const HEALTHCHECK_LIMIT: Duration = Duration::from_secs(4);

/// `hookrelay healthcheck`: GETs `url` (the admin listener's `/healthz`);
/// returns the status and the answer.
pub async fn get(url: &str) -> Result<(u16, String), String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let req = Request::get(uri).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    exchange(req, HEALTHCHECK_LIMIT).await
}

/// One request, answered within `limit`: the status and (the first 64 KiB of) the body.
async fn exchange(req: Request<Full<Bytes>>, limit: Duration) -> Result<(u16, String), String> {
    // The system's CA certificates are read only for an https:// URL.
    let roots = match req.uri().scheme_str() {
        Some("https") => system_roots(),
        _ => std::sync::Arc::new(rustls::RootCertStore::empty()),
    };
    let client = http_client(roots, limit.min(Duration::from_secs(10)))?;
    let url = req.uri().clone();
    let answer = async {
        let resp = client.request(req).await.map_err(|e| format!("cannot reach {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), 64 * 1024).collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(limit, answer)
        .await
        .map_err(|_| format!("no answer from {url} within {}", humantime::format_duration(limit)))?
}

fn default_url(settings: &Settings, src: &Source) -> Result<Uri, String> {
    let mut addr = settings.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let scheme = if settings.server.tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{addr}{}", src.path).parse().map_err(|e| format!("cannot make the relay's URL: {e}"))
}

fn iso(now: SystemTime) -> String {
    humantime::format_rfc3339_seconds(now).to_string()
}

pub type Headers = Vec<(HeaderName, HeaderValue)>;

/// Event names to make samples of for a source's format: those its vendor sends most.
pub fn sample_events(format: &Format) -> &'static [&'static str] {
    match format {
        Format::ButterCms => &["page.published", "page.delete", "post.published", "collectionitem.published"],
        Format::CometCms => &["content.published", "content.deleted"],
        Format::Generic(_) => &["sample.event"],
    }
}

/// The body in the vendor's documented shape, and any header that carries the event.
pub fn payload(src: &Source, event: &str, now: SystemTime) -> Result<(Vec<u8>, Headers), String> {
    let millis = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let stamp = iso(now);
    let ts = stamp.trim_end_matches('Z');
    let mut headers = Vec::new();
    let body = match &src.format {
        Format::ButterCms => {
            let data = match event.split('.').next() {
                Some("post") => json!({ "id": format!("sample-post-{millis}"), "_id": millis % 100_000 }),
                Some("collectionitem") => json!({
                    "id": "products",
                    "itemid": format!("/v2/content/?keys=products[_id={}]", millis % 100_000),
                    "label": "Sample Item", "editor": "hookrelay send", "timestamp": ts, "locale": null, "status": "published"
                }),
                _ => json!({
                    "id": format!("sample-page-{millis}"), "buttercms_id": millis % 100_000, "page_type": "landing",
                    "editor": "hookrelay send", "name": "Sample Page", "timestamp": ts, "locale": null,
                    "status": "published", "updated": stamp, "published": stamp, "scheduled": null
                }),
            };
            json!({ "data": data, "webhook": { "event": event, "target": src.path } })
        }
        Format::CometCms => json!({
            "event": event,
            "occurred_at": stamp,
            "data": { "type": "posts", "id": format!("sample{millis}"), "slug": "sample-post" }
        }),
        Format::Generic(EventLocator::Pointer(ptr)) => {
            let mut body = json!({ "sample": true, "sent_at": stamp });
            place(&mut body, ptr, Value::String(event.to_string()))?;
            body
        }
        Format::Generic(EventLocator::Header(name)) => {
            headers.push((name.clone(), HeaderValue::try_from(event).map_err(|e| e.to_string())?));
            json!({ "sample": true, "sent_at": stamp })
        }
    };
    Ok((body.to_string().into_bytes(), headers))
}

/// Puts `value` at a JSON pointer, making the objects on its way.
fn place(root: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    if pointer.is_empty() {
        *root = value;
        return Ok(());
    }
    let mut at = root;
    let parts: Vec<String> = pointer.split('/').skip(1).map(|p| p.replace("~1", "/").replace("~0", "~")).collect();
    for (i, part) in parts.iter().enumerate() {
        let obj = at.as_object_mut().ok_or_else(|| format!("cannot place the event at {pointer}"))?;
        if i + 1 == parts.len() {
            obj.insert(part.clone(), value);
            return Ok(());
        }
        at = obj.entry(part.clone()).or_insert_with(|| json!({}));
    }
    Ok(())
}

/// The headers that authenticate `body` to the source, using its first secret.
fn sign(auth: &Auth, body: &[u8], now: SystemTime) -> Result<Headers, String> {
    let header = |name: &str, value: String| -> Result<(HeaderName, HeaderValue), String> {
        Ok((
            HeaderName::try_from(name).map_err(|e| e.to_string())?,
            HeaderValue::try_from(value).map_err(|e| e.to_string())?,
        ))
    };
    let first =
        |list: &[crate::config::Secret]| list.first().map(|s| s.expose().to_vec()).ok_or("no secret configured");
    Ok(match auth {
        Auth::None => vec![],
        Auth::Header { header: name, values } => {
            vec![header(name.as_str(), String::from_utf8_lossy(&first(values)?).into_owned())?]
        }
        Auth::Hmac { header: name, algorithm, encoding, prefix, secrets } => {
            let mac = hmac(*algorithm, &first(secrets)?, &[body]);
            let encoded = match encoding {
                Encoding::Hex => encode_hex(&mac),
                Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(mac),
            };
            vec![header(name.as_str(), format!("{prefix}{encoded}"))?]
        }
        Auth::StandardWebhooks { secrets, .. } => {
            let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
            let ts = crate::store::unix_secs(now);
            let signature = standard_webhooks_signature(&first(secrets)?, &id, ts, body);
            vec![
                header("webhook-id", id)?,
                header("webhook-timestamp", ts.to_string())?,
                header("webhook-signature", signature)?,
            ]
        }
        Auth::Basic { username, passwords } => {
            let mut creds = username.expose().to_vec();
            creds.push(b':');
            creds.extend(first(passwords)?);
            vec![header("authorization", format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds)))?]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_builds_nested_objects() {
        let mut v = json!({ "a": 1 });
        place(&mut v, "/meta/kind", json!("x")).unwrap();
        assert_eq!(v, json!({ "a": 1, "meta": { "kind": "x" } }));
        place(&mut v, "/type", json!("y")).unwrap();
        assert_eq!(v["type"], "y");
        assert!(place(&mut v, "/a/b", json!(1)).is_err(), "cannot go inside a number");
    }
}
