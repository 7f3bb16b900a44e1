//! Shared by the benchmarks: relay configs, webhook bodies, a fast target.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    settings_with(dir, targets, None, None)
}

/// [`settings`] with a jq `filter` on the route, and `target_keys` (YAML
/// keys such as `transform: '…'` or `order_by: '…'`) on every target.
pub fn settings_with(
    dir: &Path,
    targets: &[(String, String)],
    filter: Option<&str>,
    target_keys: Option<&str>,
) -> hookrelay::config::Settings {
    let extra = target_keys.map(|k| format!(", {k}")).unwrap_or_default();
    let filter = filter.map(|f| format!(", filter: '{f}'")).unwrap_or_default();
    let storage = format!(
        "{{ path: \"{}\", cache: \"{}\" }}",
        dir.join("data").display(),
        std::env::var("BENCH_CACHE").unwrap_or_else(|_| "64MiB".into())
    );
    let text = relay_yaml(
        "127.0.0.1:0",
        "{ listen: \"127.0.0.1:0\" }",
        &storage,
        targets,
        &format!("concurrency: 32, timeout: 2s{extra}"),
        &filter,
    );
    let path = dir.join("routes.yaml");
    std::fs::write(&path, text).expect("write config");
    // jq programs run in `hookrelay jq-sandbox`, not in this benchmark's binary.
    hookrelay::jq::set_worker_exe(std::path::PathBuf::from(env!("CARGO_BIN_EXE_hookrelay")));
    hookrelay::config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// A relay config: one ButterCMS source (header-secret auth) and `targets`
/// (name, url), each with `keys` (YAML such as `concurrency: 32`), all
/// routed `page.*` with `route_keys` (such as `, filter: '…'`).
fn relay_yaml(
    listen: &str,
    admin: &str,
    storage: &str,
    targets: &[(String, String)],
    keys: &str,
    route_keys: &str,
) -> String {
    let list: String =
        targets.iter().map(|(name, url)| format!("  - {{ name: {name}, url: \"{url}\", {keys} }}\n")).collect();
    let names: Vec<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    format!(
        r#"
server: {{ listen: "{listen}" }}
admin: {admin}
storage: {storage}
sources:
  - name: buttercms
    path: /hooks/buttercms
    format: buttercms
    auth: {{ type: header, header: X-Webhook-Secret, values: ["{SECRET}"] }}
targets:
{list}
routes:
  - {{ source: buttercms, events: ["page.*"], targets: [{}]{route_keys} }}
"#,
        names.join(", ")
    )
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

/// Posts `events` distinct webhooks over 32 keep-alive connections, each
/// expecting a 202; returns when all are acknowledged.
pub async fn post_events(relay: SocketAddr, events: u64) {
    let next = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..32)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut conn = connect(relay).await;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= events {
                        break;
                    }
                    let resp = conn.send_request(request(i)).await.expect("send");
                    assert_eq!(resp.status(), http::StatusCode::ACCEPTED);
                }
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender");
    }
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
    /// What it answers: 200 unless started with [`FastTarget::answering`].
    pub status: u16,
    pub count: Arc<AtomicU64>,
    pub first_at: Arc<Mutex<Option<Instant>>>,
    pub arrivals: Arc<Mutex<Vec<(String, Instant)>>>,
    pub record_arrivals: bool,
}

impl FastTarget {
    pub async fn start(record_arrivals: bool) -> (FastTarget, SocketAddr) {
        Self::answering(200, record_arrivals).await
    }

    /// A target answering `status` (202: the bare hyper server that
    /// benchmarks measure the relay against).
    pub async fn answering(status: u16, record_arrivals: bool) -> (FastTarget, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let target = FastTarget { status, record_arrivals, ..Default::default() };
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
                            let mut resp = http::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = http::StatusCode::from_u16(t.status).unwrap_or(http::StatusCode::OK);
                            Ok::<_, std::convert::Infallible>(resp)
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

/// Webhooks acknowledged by a load run, and their latencies.
pub struct Load {
    pub acks: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Ack latencies in microseconds, sorted.
    pub latencies: Vec<u64>,
}

impl Load {
    pub fn quantile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies[i] as f64 / 1000.0
    }
}

/// Drives `conns` keep-alive connections for `secs`. With `rate`, each
/// connection sends on a fixed schedule and latency counts from the scheduled
/// time (no coordinated omission); without, each sends back to back.
pub async fn drive(addr: SocketAddr, conns: u64, secs: u64, rate: Option<u64>, counter: Arc<AtomicU64>) -> Load {
    let deadline = Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut sender = connect(addr).await;
                let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r as f64));
                let offset = interval.map(|i| i.mul_f64(c as f64 / conns as f64)).unwrap_or_default();
                let (mut acks, mut errors, mut lat) = (0u64, 0u64, Vec::new());
                let mut k = 0u32;
                loop {
                    let scheduled = match interval {
                        Some(i) => {
                            let at = started + offset + i * k;
                            tokio::time::sleep_until(at.into()).await;
                            at
                        }
                        None => Instant::now(),
                    };
                    if scheduled.duration_since(started) >= deadline {
                        break;
                    }
                    k += 1;
                    match sender.send_request(request(counter.fetch_add(1, Ordering::Relaxed))).await {
                        Ok(resp) => {
                            let ok = resp.status() == http::StatusCode::ACCEPTED;
                            let _ = resp.into_body().collect().await;
                            if ok {
                                acks += 1;
                                lat.push(scheduled.elapsed().as_micros() as u64);
                            } else {
                                errors += 1;
                            }
                        }
                        Err(_) => {
                            errors += 1;
                            break;
                        }
                    }
                }
                (acks, errors, lat)
            })
        })
        .collect();
    let mut load = Load { acks: 0, errors: 0, elapsed: Duration::ZERO, latencies: Vec::new() };
    for t in tasks {
        let (a, e, l) = t.await.expect("load task");
        load.acks += a;
        load.errors += e;
        load.latencies.extend(l);
    }
    load.elapsed = started.elapsed();
    load.latencies.sort_unstable();
    load
}

pub fn row(name: &str, l: &Load) {
    println!("{}", row_text(name, l));
}

/// One phase's figures: acks/s, latency quantiles in ms, errors.
pub fn row_text(name: &str, l: &Load) -> String {
    format!(
        "{name:<28} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
        l.acks as f64 / l.elapsed.as_secs_f64(),
        l.quantile(0.50),
        l.quantile(0.99),
        l.quantile(0.999),
        l.latencies.last().map(|&m| m as f64 / 1000.0).unwrap_or(f64::NAN),
        l.errors
    )
}

/// CPU seconds (user + system) used so far by this process and its live
/// children (the jq sandboxes), from `/proc/PID/stat`.
pub fn cpu_secs() -> f64 {
    let me = std::process::id();
    let ticks = |stat: &str| -> Option<(u32, f64)> {
        // The fields after the command name, which is in parentheses.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
        Some((ppid, (utime + stime) / 100.0))
    };
    let mut total = std::fs::read_to_string("/proc/self/stat").ok().as_deref().and_then(ticks).map_or(0.0, |t| t.1);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some((ppid, secs)) = std::fs::read_to_string(entry.path().join("stat")).ok().as_deref().and_then(ticks) {
            if ppid == me {
                total += secs;
            }
        }
    }
    total
}

/// Resident memory of this process's live children, in MiB.
pub fn children_rss_mib() -> f64 {
    let me = std::process::id().to_string();
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let field =
            |name: &str| status.lines().find(|l| l.starts_with(name)).map(|l| l[name.len()..].trim().to_string());
        if field("PPid:").as_deref() == Some(me.as_str()) {
            let kib = field("VmRSS:").and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<f64>().ok()));
            total += kib.unwrap_or(0.0) / 1024.0;
        }
    }
    total
}

/// Admin bearer token of the relays [`spawn_relay`] starts.
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

/// A `hookrelay serve` process of the release build, killed when dropped.
pub struct Instance {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Starts `hookrelay serve` (the real binary) with `storage` (a YAML
/// mapping) and `targets` (name, url), every one routed `page.*` from one
/// ButterCMS source, and waits until it answers. `n` names its config file.
pub fn spawn_relay(dir: &Path, n: usize, storage: &str, targets: &[(String, String)]) -> Instance {
    let (port, admin) = (free_port(), free_port());
    let config = dir.join(format!("routes-{n}.yaml"));
    let admin_yaml = format!("{{ listen: \"127.0.0.1:{admin}\", token: \"{ADMIN_TOKEN}\" }}");
    let text = relay_yaml(&format!("127.0.0.1:{port}"), &admin_yaml, storage, targets, "concurrency: 64", "");
    std::fs::write(&config, text).expect("config");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("hookrelay serve");
    let (addr, admin) = (SocketAddr::from(([127, 0, 0, 1], port)), SocketAddr::from(([127, 0, 0, 1], admin)));
    let started = Instant::now();
    for listener in [addr, admin] {
        while std::net::TcpStream::connect(listener).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "the relay did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Instance { child, addr, admin }
}

/// `POST /admin/targets/NAME/pause` or `…/resume`, expecting 200.
pub async fn set_paused(relay: &Instance, target: &str, paused: bool) {
    let mut conn = connect(relay.admin).await;
    let action = if paused { "pause" } else { "resume" };
    let req = http::Request::post(format!("/admin/targets/{target}/{action}"))
        .header("host", "bench")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = conn.send_request(req).await.expect("admin");
    assert_eq!(resp.status(), http::StatusCode::OK, "{action} {target}");
}

/// CPU seconds (user + system, all threads) of `pids`, from `/proc/PID/stat`.
pub fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .sum()
}
