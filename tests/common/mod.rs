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
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name))
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
admin: {{ listen: "127.0.0.1:0", token: "{ADMIN_TOKEN}" }}
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

/// The relay's log, captured per test and shown when one fails.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("hookrelay=debug"))
        .with_test_writer()
        .try_init();
}

pub async fn start_with(server_extra: &str, sources_extra: &str) -> TestRelay {
    start_from(|dir| config_text(dir, server_extra, sources_extra)).await
}

/// A relay started from the config `text` makes for its temporary folder.
pub async fn start_from(text: impl FnOnce(&Path) -> String) -> TestRelay {
    init_logs();
    // jq programs run in `hookrelay jq-sandbox`, not in this test binary.
    hookrelay::jq::set_worker_exe(PathBuf::from(env!("CARGO_BIN_EXE_hookrelay")));
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &text(dir.path()));
    let settings = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let relay = Relay::start(settings).await.unwrap();
    TestRelay { addr: relay.ingress_addr, store: relay.store.clone(), relay, dir }
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
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub fn request(path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut b = Request::post(path).header("content-type", "application/json").header("host", "localhost");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

/// Sends one request over a fresh HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.unwrap().unwrap();
    send_on(TokioIo::new(tcp), req, false).await
}

/// Sends one request over an established stream, as HTTP/2 when `h2`.
pub async fn send_on<S>(io: TokioIo<S>, req: Request<Full<Bytes>>, h2: bool) -> Reply
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let fut = async move {
        let resp = if h2 {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            let (mut parts, body) = req.into_parts();
            parts.uri = format!("http://localhost{}", parts.uri).parse().unwrap();
            sender.send_request(Request::from_parts(parts, body)).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply { status: parts.status, headers: parts.headers, body, version: parts.version }
    };
    tokio::time::timeout(WAIT, fut).await.expect("request timed out")
}

/// A request to the admin listener at `addr`, with `token` as bearer token if given.
pub async fn admin_call(addr: SocketAddr, method: http::Method, path: &str, token: Option<&str>, body: &str) -> Reply {
    let mut b = Request::builder().method(method).uri(path).header("host", "admin");
    if let Some(token) = token {
        b = b.header("authorization", format!("Bearer {token}"));
    }
    send(addr, b.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await
}

pub async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    send(addr, request(path, headers, body)).await
}

/// A ButterCMS webhook with the right secret.
pub async fn post_butter(addr: SocketAddr, body: impl Into<Bytes>) -> Reply {
    post(addr, "/hooks/buttercms", &[("x-webhook-secret", BUTTER_SECRET)], body).await
}

/// CometCMS's documented signature, computed with the hmac crate directly
/// rather than through hookrelay's own code.
pub fn comet_signature(body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(COMET_SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The Standard Webhooks signature `got` should carry, computed here from the
/// spec rather than by hookrelay's code: `v1,` and the base64 HMAC-SHA256,
/// keyed by the base64-decoded secret, of "{webhook-id}.{webhook-timestamp}.{body}".
pub fn expected_signature(secret_b64: &str, got: &Received) -> String {
    use base64::Engine;
    use hmac::Mac;
    let (id, ts) = (got.headers["webhook-id"].to_str().unwrap(), got.headers["webhook-timestamp"].to_str().unwrap());
    let key = base64::engine::general_purpose::STANDARD.decode(secret_b64).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&got.body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// What a fake target received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub at: std::time::Instant,
}

/// One scripted answer of a fake target.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Self {
        Answer { status, headers: vec![], delay: Duration::ZERO }
    }
    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct Script {
    queue: std::collections::VecDeque<Answer>,
    fallback: Option<Answer>,
}

/// A real HTTP server on 127.0.0.1 standing in for an internal target. It
/// answers from a script (then 200), and reports every request on a channel.
pub struct FakeTarget {
    pub addr: SocketAddr,
    pub received: tokio::sync::mpsc::UnboundedReceiver<Received>,
    script: Arc<std::sync::Mutex<Script>>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    pub max_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeTarget {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeTarget {
    pub async fn start() -> FakeTarget {
        Self::serve(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), None).await
    }

    /// The same on a given address (a target coming back up where it was).
    pub async fn start_at(addr: SocketAddr) -> FakeTarget {
        Self::serve(tokio::net::TcpListener::bind(addr).await.unwrap(), None).await
    }

    /// The same over TLS with this server configuration.
    pub async fn start_tls(tls: rustls::ServerConfig) -> FakeTarget {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))).await
    }

    async fn serve(listener: tokio::net::TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) -> FakeTarget {
        use std::sync::atomic::Ordering;
        let addr = listener.local_addr().unwrap();
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let script = Arc::new(std::sync::Mutex::new(Script::default()));
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let max_in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, inf, max) = (script.clone(), in_flight.clone(), max_in_flight.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (tx, s, inf, max, tls) = (tx.clone(), s.clone(), inf.clone(), max.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (tx, s, inf, max) = (tx.clone(), s.clone(), inf.clone(), max.clone());
                        async move {
                            let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
                            max.fetch_max(now, Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let _ = tx.send(Received { headers: parts.headers, body, at: std::time::Instant::now() });
                            let answer = {
                                let mut s = s.lock().unwrap();
                                s.queue.pop_front().or_else(|| s.fallback.clone()).unwrap_or(Answer::status(200))
                            };
                            tokio::time::sleep(answer.delay).await;
                            inf.fetch_sub(1, Ordering::SeqCst);
                            let mut resp = http::Response::builder().status(answer.status);
                            for (k, v) in &answer.headers {
                                resp = resp.header(*k, v);
                            }
                            Ok::<_, std::convert::Infallible>(resp.body(Full::new(Bytes::new())).unwrap())
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        FakeTarget { addr, received, script, in_flight, max_in_flight, server }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers these first, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.script.lock().unwrap().queue.extend(answers);
    }

    /// Answers this once the script is used up (instead of 200).
    pub fn always(&self, answer: Answer) {
        self.script.lock().unwrap().fallback = Some(answer);
    }

    /// The next request, waiting at most `WAIT`.
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(WAIT, self.received.recv()).await.expect("no request reached the target").unwrap()
    }

    /// Asserts that nothing arrives for `quiet`.
    pub async fn nothing_for(&mut self, quiet: Duration) {
        if let Ok(Some(r)) = tokio::time::timeout(quiet, self.received.recv()).await {
            panic!("unexpected request: {:?}", r.headers);
        }
    }
}

/// A relay with one ButterCMS source (header secret) and the given targets
/// (YAML list items) and routes.
pub async fn start_relay(targets: &str, routes: &str) -> TestRelay {
    start_from(|dir| relay_config(dir, targets, routes)).await
}

/// The config of [`start_relay`].
pub fn relay_config(dir: &Path, targets: &str, routes: &str) -> String {
    let storage = format!(r#"{{ path: "{}", cache: "8MiB" }}"#, dir.join("data").display());
    relay_config_on(&storage, targets, routes)
}

/// A relay config on the PostgreSQL database at `url` (`pool` connections
/// per instance), written to a file of its own in `dir`.
pub fn pg_config(dir: &Path, url: &str, pool: usize, targets: &str, routes: &str) -> PathBuf {
    let text = relay_config_on(&format!(r#"{{ backend: postgres, url: "{url}", pool: {pool} }}"#), targets, routes);
    let path = dir.join(format!("routes-{}.yaml", fastrand::u32(..)));
    std::fs::write(&path, text).unwrap();
    path
}

/// [`pg_config`] with one target, `search` at `target` (with the YAML lines
/// `extra`), to which `page.*` webhooks go.
pub fn pg_search_config(dir: &Path, url: &str, pool: usize, target: &FakeTarget, extra: &str) -> PathBuf {
    let targets = format!("  - name: search\n    url: \"{}\"{extra}", target.url("/reindex"));
    pg_config(dir, url, pool, &targets, "  - { source: buttercms, events: [\"page.*\"], targets: [search] }")
}

/// [`relay_config`] with this `storage:` (a YAML flow mapping).
pub fn relay_config_on(storage: &str, targets: &str, routes: &str) -> String {
    format!(
        r#"
server: {{ listen: "127.0.0.1:0" }}
admin: {{ listen: "127.0.0.1:0", token: "{ADMIN_TOKEN}" }}
storage: {storage}
sources:
  - name: buttercms
    path: /hooks/buttercms
    format: buttercms
    auth: {{ type: header, header: X-Webhook-Secret, values: ["{BUTTER_SECRET}"] }}
targets:
{targets}
routes:
{routes}
"#
    )
}

/// A distinct ButterCMS page.published body.
pub fn butter_page(n: usize) -> Vec<u8> {
    format!(r#"{{"data":{{"id":"page-{n}","timestamp":"2024-01-15T14:30:00","locale":null}},"webhook":{{"event":"page.published","target":"x"}}}}"#).into_bytes()
}

/// Polls `check` every 20 ms until it holds, at most `WAIT`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + WAIT;
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `hookrelay serve` and reads its JSON log until ingress listens.
pub fn spawn_relay(config: &std::path::Path) -> (RelayProcess, SocketAddr) {
    let (child, addr, _) = spawn_relay_logged(config);
    (child, addr)
}

/// A relay process: killed and reaped when dropped, so that a failing test
/// leaves none running. Derefs to its [`std::process::Child`].
pub struct RelayProcess {
    child: std::process::Child,
    /// Where its admin listener listens.
    pub admin: SocketAddr,
}

impl RelayProcess {
    /// Sends SIGTERM and waits (at most `WAIT`) for the drain to end.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "still running {WAIT:?} after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl std::ops::Deref for RelayProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl std::ops::DerefMut for RelayProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The relay's JSON log lines, as they arrive.
pub type Logs = Arc<std::sync::Mutex<Vec<String>>>;

/// Starts `hookrelay --log-format json serve` and reads its log until both
/// listeners listen; keeps collecting the log lines.
pub fn spawn_relay_logged(config: &std::path::Path) -> (RelayProcess, SocketAddr, Logs) {
    spawn_relay_with(config, Vec::<(String, String)>::new())
}

/// [`spawn_relay_logged`], with these environment variables set.
pub fn spawn_relay_with<K, V>(
    config: &std::path::Path,
    envs: impl IntoIterator<Item = (K, V)>,
) -> (RelayProcess, SocketAddr, Logs)
where
    K: AsRef<std::ffi::OsStr>,
    V: AsRef<std::ffi::OsStr>,
{
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
        .envs(envs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Killed on drop from here on, also if it never starts listening.
    let mut process = RelayProcess { child, admin: SocketAddr::from(([0, 0, 0, 0], 0)) };
    let (tx, rx) = std::sync::mpsc::channel();
    let logs: Logs = Arc::default();
    let kept = logs.clone();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                let message = v["fields"]["message"].as_str().unwrap_or_default();
                if let Some(listener) = message.strip_prefix("hookrelay ").and_then(|m| m.strip_suffix(" listening")) {
                    if let Some(addr) = v["fields"]["listen"].as_str() {
                        let _ = tx.send((listener.to_string(), addr.parse::<SocketAddr>().unwrap()));
                    }
                }
            }
            kept.lock().unwrap().push(line);
        }
    });
    let mut ingress = None;
    while ingress.is_none() || process.admin.port() == 0 {
        let (listener, addr) = rx.recv_timeout(WAIT).expect("relay did not start listening");
        match listener.as_str() {
            "ingress" => ingress = Some(addr),
            _ => process.admin = addr,
        }
    }
    (process, ingress.unwrap(), logs)
}

/// Starts the relay of `config` with `RUST_LOG=rust_log`, posts a ButterCMS
/// webhook whose body holds a unique marker, waits for `target` to get it,
/// and checks that no log line holds the marker, as text or as the list of
/// its bytes (how `{:?}` shows a body). Returns the log's lines.
pub async fn log_of_a_marked_webhook(config: &Path, target: &mut FakeTarget, rust_log: &str) -> Vec<String> {
    let (_relay, addr, logs) = spawn_relay_with(config, [("RUST_LOG", rust_log)]);
    let marker = format!("secret-page-{}", fastrand::u64(..));
    let body = format!(r#"{{"data":{{"id":"{marker}","locale":null}},"webhook":{{"event":"page.published"}}}}"#);
    assert_eq!(post_butter(addr, body).await.status, 202);
    let got = tokio::time::timeout(WAIT, target.received.recv()).await.expect("delivered").unwrap();
    assert!(got.body.windows(marker.len()).any(|w| w == marker.as_bytes()), "the target got the body");
    // The log's thread writes a batch at most every 10 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = logs.lock().unwrap().clone();
    let as_bytes = format!("{:?}", marker.as_bytes());
    let as_bytes = as_bytes.trim_start_matches('[').trim_end_matches(']');
    for line in &lines {
        assert!(!line.contains(&marker) && !line.contains(as_bytes), "a body in the log: {line}");
    }
    lines
}
