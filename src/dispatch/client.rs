//! One delivery attempt: the request of README's "What a target receives" (the original body byte for
//! byte, `webhook-*` and `x-hookrelay-*` headers, the target's own headers,
//! no upstream credential), sent with the target's timeout.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::retry::{classify, parse_retry_after, Verdict};
use crate::config::Target;
use crate::ingress::auth::standard_webhooks_signature;
use crate::store::StoredEvent;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Bytes of a target's answer read at most (to reuse the connection); the rest is dropped.
const MAX_ANSWER: usize = 64 * 1024;
/// Time allowed to read that part once the status is in.
const DRAIN: Duration = Duration::from_secs(1);

/// The system's trust roots, loaded once.
pub fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "cannot load some system CA certificates");
            }
            let mut roots = rustls::RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system CA certificates loaded");
            Arc::new(roots)
        })
        .clone()
}

/// A pooled client for one target: HTTP/1.1 or HTTP/2 (by ALPN) over TLS
/// checked against the target's `ca_file`, else the system roots.
pub fn client_for(target: &Target) -> Result<HttpClient, String> {
    let roots = roots(&target.ca_certs).map_err(|e| format!("target {}: {e}", target.name))?;
    http_client(roots, target.timeout)
}

/// The CAs a `ca_file` gave, else (none given) the system's.
pub fn roots(ca_certs: &[rustls_pki_types::CertificateDer<'static>]) -> Result<Arc<rustls::RootCertStore>, String> {
    if ca_certs.is_empty() {
        return Ok(system_roots());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca_certs {
        roots.add(cert.clone()).map_err(|e| format!("bad CA certificate: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// A pooled HTTP/1.1 and HTTP/2 client, over TLS checked against `roots`
/// for https:// URLs. Pass [`system_roots`] for the system's CAs.
pub fn http_client(roots: Arc<rustls::RootCertStore>, connect_timeout: Duration) -> Result<HttpClient, String> {
    let tls = rustls::ClientConfig::builder_with_provider(crate::ingress::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(https))
}

/// What one attempt sends besides the event.
#[derive(Debug, Default)]
pub struct Sent {
    /// The body the target's transform made (JSON), sent instead of the original.
    pub transformed: Option<Bytes>,
    /// The attempt's number, from 1.
    pub attempt: u32,
    /// The events a debounce group's delivery stands for (0: not a group's).
    pub coalesced: u32,
}

/// The forwarded request.
pub fn build_request(
    target: &Target,
    event: &StoredEvent,
    sent: Sent,
    now: SystemTime,
) -> Result<Request<Full<Bytes>>, String> {
    let Sent { transformed, attempt, coalesced } = sent;
    let id = event.id.to_string();
    let timestamp = crate::store::unix_secs(now);
    let (content_type, body) = match transformed {
        Some(body) => ("application/json", body),
        None => (event.meta.content_type.as_deref().unwrap_or("application/json"), event.body.clone()),
    };
    let mut req = Request::post(target.url.clone())
        .header(CONTENT_TYPE, content_type)
        .header(USER_AGENT, concat!("hookrelay/", env!("CARGO_PKG_VERSION")))
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("x-hookrelay-source", &event.meta.source)
        .header("x-hookrelay-event", &event.meta.event)
        .header("x-hookrelay-attempt", attempt.to_string())
        .body(Full::new(body.clone()))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let headers = req.headers_mut();
    if let Some(secret) = &target.signing_secret {
        let signature = standard_webhooks_signature(secret.expose(), &id, timestamp, &body);
        headers.insert("webhook-signature", HeaderValue::try_from(signature).map_err(|e| e.to_string())?);
    }
    if coalesced > 0 {
        headers.insert("x-hookrelay-coalesced", HeaderValue::from(coalesced));
    }
    for (name, value) in &target.headers {
        headers.insert(name.clone(), value.clone());
    }
    Ok(req)
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub status: Option<u16>,
    pub error: Option<String>,
    pub verdict: Verdict,
    pub duration: Duration,
}

/// Sends `req` and classifies the answer; never fails, every problem is a verdict.
pub async fn send(client: &HttpClient, timeout: Duration, req: Request<Full<Bytes>>) -> AttemptResult {
    let started = Instant::now();
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| connection_error(&e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        Ok::<_, String>((status, retry_after, resp.into_body()))
    };
    let (status, error, verdict) = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((status, retry_after, body))) => {
            // The status decides. Then read a bounded part of the answer, so the
            // connection can be reused; a slow body does not undo a 2xx.
            let _ = tokio::time::timeout(DRAIN, Limited::new(body, MAX_ANSWER).collect()).await;
            (Some(status), None, classify(status, retry_after))
        }
        Ok(Err(e)) => (None, Some(e), Verdict::Retry { after: None }),
        Err(_) => (
            None,
            Some(format!("timed out after {}", humantime::format_duration(timeout))),
            Verdict::Retry { after: None },
        ),
    };
    AttemptResult { status, error, verdict, duration: started.elapsed() }
}

/// The innermost cause names the problem ("Connection refused"); hyper's outer layers do not.
fn connection_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(source) = inner.source() {
        inner = source;
    }
    format!("{e}: {inner}")
}
