//! Shared by the integration tests: a relay started on 127.0.0.1:0 from a
//! config written to a temporary folder, and a small HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use hookrelay::app::Relay;
use hookrelay::config;
use hookrelay::store::Store;

pub const BUTTER_SECRET: &str = "butter-test-secret";
pub const COMET_SECRET: &str = "comet-test-secret";
pub const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A config with buttercms (header secret), cometcms (HMAC) and generic
/// (Standard Webhooks) sources; `server_extra` lands under `server:` and
/// `sources_extra` after the sources.
pub fn config_text(dir: &Path, server_extra: &str, sources_extra: &str) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
  max_body: "64KiB"
  request_timeout: "2s"
{server_extra}
storage:
  path: "{data}"
  cache: "8MiB"
sources:
  - name: buttercms
    path: /hooks/buttercms
    format: buttercms
    auth: {{ type: header, header: X-Webhook-Secret, values: ["{BUTTER_SECRET}"] }}
  - name: cometcms
    path: /hooks/cometcms
    format: cometcms
    auth:
      type: hmac
      header: X-CometCMS-Signature
      prefix: "sha256="
      secrets: ["{COMET_SECRET}"]
  - name: generic
    path: /hooks/generic
    format: generic
    event_pointer: /type
    auth: {{ type: standard-webhooks, secrets: ["{WHSEC}"] }}
{sources_extra}
targets:
  - name: search
    url: "http://127.0.0.1:9/reindex"
  - name: cache
    url: "http://127.0.0.1:9/purge"
  - name: site-rebuild
    url: "http://127.0.0.1:9/build"
routes:
  - source: buttercms
    events: ["page.*", "post.published"]
    targets: [search, cache]
  - source: cometcms
    events: ["content.published"]
    targets: [site-rebuild]
  - source: generic
    events: ["*"]
    targets: [cache]
"#,
        data = dir.join("data").display()
    )
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("routes.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

pub struct TestRelay {
    pub relay: Relay,
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
    pub dir: tempfile::TempDir,
}

pub async fn start() -> TestRelay {
    start_with("", "").await
}

pub async fn start_with(server_extra: &str, sources_extra: &str) -> TestRelay {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &config_text(dir.path(), server_extra, sources_extra),
    );
    let settings = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let relay = Relay::start(settings).await.unwrap();
    TestRelay {
        addr: relay.ingress_addr,
        store: relay.store.clone(),
        relay,
        dir,
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: Version,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub fn request(
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::post(path)
        .header("content-type", "application/json")
        .header("host", "localhost");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

/// Sends one request over a fresh HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    send_on(TokioIo::new(tcp), req, false).await
}

/// Sends one request over an established stream, as HTTP/2 when `h2`.
pub async fn send_on<S>(io: TokioIo<S>, req: Request<Full<Bytes>>, h2: bool) -> Reply
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let fut = async move {
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let (mut parts, body) = req.into_parts();
            parts.uri = format!("http://localhost{}", parts.uri).parse().unwrap();
            sender
                .send_request(Request::from_parts(parts, body))
                .await
                .unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
            version: parts.version,
        }
    };
    tokio::time::timeout(WAIT, fut)
        .await
        .expect("request timed out")
}

pub async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    send(addr, request(path, headers, body)).await
}

/// A ButterCMS webhook with the right secret.
pub async fn post_butter(addr: SocketAddr, body: impl Into<Bytes>) -> Reply {
    post(
        addr,
        "/hooks/buttercms",
        &[("x-webhook-secret", BUTTER_SECRET)],
        body,
    )
    .await
}

/// CometCMS's documented signature, computed with the hmac crate directly
/// rather than through hookrelay's own code.
pub fn comet_signature(body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(COMET_SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}
