//! Shared by the benchmarks: relay configs, webhook bodies, a fast target.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

pub const SECRET: &str = "bench-secret";

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A config with one ButterCMS source; `targets` are (name, url) pairs, all
/// routed `page.*`.
pub fn settings(dir: &Path, targets: &[(String, String)]) -> hookrelay::config::Settings {
    let list: String = targets
        .iter()
        .map(|(name, url)| format!("  - {{ name: {name}, url: \"{url}\", concurrency: 32, timeout: 2s }}\n"))
        .collect();
    let names: Vec<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    let text = format!(
        r#"
server: {{ listen: "127.0.0.1:0" }}
admin: {{ listen: "127.0.0.1:0" }}
storage: {{ path: "{}", cache: "{}" }}
sources:
  - name: buttercms
    path: /hooks/buttercms
    format: buttercms
    auth: {{ type: header, header: X-Webhook-Secret, values: ["{SECRET}"] }}
targets:
{list}
routes:
  - {{ source: buttercms, events: ["page.*"], targets: [{}] }}
"#,
        dir.join("data").display(),
        std::env::var("BENCH_CACHE").unwrap_or_else(|_| "64MiB".into()),
        names.join(", ")
    );
    let path = dir.join("routes.yaml");
    std::fs::write(&path, text).expect("write config");
    hookrelay::config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// A distinct ButterCMS page.published body (a new dedup key each time), in
/// the shape of the vendor's fixture.
pub fn body(n: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"data":{{"id":"product-launch-{n}","buttercms_id":{n},"page_type":"landing","editor":"Marketing Team","name":"Product Launch Landing Page","timestamp":"2024-01-15T14:30:00","locale":null,"status":"published","updated":"2024-01-15T14:30:00.123456Z","published":"2024-01-15T14:30:00.123456Z","scheduled":null}},"webhook":{{"event":"page.published","target":"https://yourapp.com/webhooks/buttercms"}}}}"#
    ))
}

pub fn request(n: u64) -> http::Request<Full<Bytes>> {
    http::Request::post("/hooks/buttercms")
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET)
        .body(Full::new(body(n)))
        .expect("request")
}

/// A keep-alive HTTP/1.1 connection to the relay.
pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    sender
}

/// A target that answers 200 at once, counting requests and noting when
/// each `webhook-id` first arrived.
#[derive(Clone, Default)]
pub struct FastTarget {
    pub count: Arc<AtomicU64>,
    pub first_at: Arc<Mutex<Option<Instant>>>,
    pub arrivals: Arc<Mutex<Vec<(String, Instant)>>>,
    pub record_arrivals: bool,
}

impl FastTarget {
    pub async fn start(record_arrivals: bool) -> (FastTarget, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let target = FastTarget { record_arrivals, ..Default::default() };
        let t = target.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let t = t.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let t = t.clone();
                        async move {
                            let now = Instant::now();
                            t.count.fetch_add(1, Ordering::Relaxed);
                            t.first_at.lock().expect("lock").get_or_insert(now);
                            if t.record_arrivals {
                                let id = req.headers().get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                                t.arrivals.lock().expect("lock").push((id.to_string(), now));
                            }
                            let _ = req.into_body().collect().await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        (target, addr)
    }
}

/// Sorted milliseconds → the value at quantile `q`.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// This process's resident memory now and at its peak, in MiB.
pub fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Bytes under `path`.
pub fn disk_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
