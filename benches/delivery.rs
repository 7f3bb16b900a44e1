//! Delivery benchmarks: a backlog against a down target (memory, disk,
//! restart to first delivery), deliveries/s to a fast local target with 1 and
//! 4 targets per event, and end-to-end lag at a steady rate.
//!
//! `cargo bench --bench delivery` (env: BENCH_BACKLOG, default 1000000;
//! BENCH_EVENTS, default 20000; BENCH_RATE, default 1000; BENCH_LAG_SECS,
//! default 10; BENCH_CACHE, sled's cache, default 64MiB). Each backlog is loaded
//! and restarted in processes of its own.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use hookrelay::app::Relay;
use hookrelay::ingress::{auth, formats};
use hookrelay::store::{Ingested, NewEvent};

fn main() {
    let server_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let client_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    // The backlogs first, each in a process of its own (this benchmark run
    // again), so that each one's memory is its own: a plain target, and one
    // with `order_by` over BENCH_KEYS (100,000) keys.
    let n = env_or("BENCH_BACKLOG", 1_000_000);
    // The restart of a backlog, in a process of its own (see `backlog`).
    if let Ok(dir) = std::env::var("BENCH_BACKLOG_RESTART") {
        let ordered = std::env::var("BENCH_BACKLOG_ONLY").as_deref() == Ok("ordered");
        return restart(
            &server_rt,
            &client_rt,
            std::path::Path::new(&dir),
            ordered.then_some(ORDER_BY),
            "a new process",
        );
    }
    match std::env::var("BENCH_BACKLOG_ONLY").as_deref() {
        Ok("plain") => return backlog(&server_rt, &client_rt, n, None),
        Ok("ordered") => return backlog(&server_rt, &client_rt, n, Some(env_or("BENCH_KEYS", 100_000))),
        _ => {}
    }
    for kind in ["plain", "ordered"] {
        let exe = std::env::current_exe().expect("this benchmark's path");
        let status = std::process::Command::new(exe).arg("--bench").env("BENCH_BACKLOG_ONLY", kind).status();
        assert!(status.is_ok_and(|s| s.success()), "the {kind} backlog failed");
    }
    for targets in [1, 4] {
        throughput(&server_rt, &client_rt, env_or("BENCH_EVENTS", 20_000), targets);
    }
    lag(&server_rt, &client_rt, env_or("BENCH_RATE", 1000), env_or("BENCH_LAG_SECS", 10));
}

/// Queues `n` deliveries for a target that is down, reports memory and disk,
/// then restarts the relay with the target up and times the first delivery.
/// With `keys`, the target has `order_by` and the deliveries that many keys
/// (event `i` has key `i % keys`): one of each key is due, the rest held.
fn backlog(server_rt: &tokio::runtime::Runtime, client_rt: &tokio::runtime::Runtime, n: u64, keys: Option<u64>) {
    use hookrelay::store::Sequenced;
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens on port 1 of loopback: connections are refused.
    let down = vec![("search".to_string(), "http://127.0.0.1:1/".to_string())];
    let order_by = keys.map(|_| ORDER_BY);
    let down_settings = settings_with(dir.path(), &down, None, order_by);
    let source = down_settings.sources[0].clone();
    let relay = server_rt.block_on(Relay::start(down_settings)).expect("relay");
    let store = relay.store.clone();
    let started = Instant::now();
    server_rt.block_on(async {
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let loaders: Vec<_> = (0..256)
            .map(|_| {
                let (store, source, next) = (store.clone(), source.clone(), next.clone());
                tokio::spawn(async move {
                    let mut headers = http::HeaderMap::new();
                    headers.insert("x-webhook-secret", http::HeaderValue::from_static(SECRET));
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let verified = auth::verify(&source.auth, &headers, body(i), SystemTime::now()).expect("auth");
                        let parsed = formats::parse(&source.format, &headers, verified.body()).expect("parse");
                        let mut ev = NewEvent::new(&source, verified, parsed, None, vec!["search".into()]);
                        if let Some(keys) = keys {
                            let key = (i % keys).to_string();
                            ev = ev.with_sequencing(vec![("search".into(), Sequenced::Ordered { key })]);
                        }
                        assert!(matches!(store.ingest(ev).await.expect("ingest"), Ingested::Accepted { .. }));
                    }
                })
            })
            .collect();
        for l in loaders {
            l.await.expect("loader");
        }
    });
    let load_secs = started.elapsed().as_secs_f64();
    // Let the worker meet the down target: retries, then an open circuit.
    std::thread::sleep(Duration::from_secs(5));
    let (rss, peak) = rss_mib();
    let queued = server_rt.block_on(store.counts("search")).expect("counts").queued;
    let disk = disk_bytes(&dir.path().join("data")) as f64 / (1 << 20) as f64;
    let kind = match keys {
        Some(k) => format!("an order_by target, {k} keys"),
        None => "a plain target".to_string(),
    };
    println!(
        "backlog: {n} deliveries queued for {kind}, down, in {load_secs:.1}s ({:.0} events/s stored)",
        n as f64 / load_secs
    );
    println!("  queue depth {queued}; RSS {rss:.1} MiB (peak {peak:.1} MiB); disk {disk:.1} MiB");
    server_rt.block_on(relay.stop(Duration::from_secs(5))).expect("stop");
    drop(store);

    // Restart with the target up: first as operators restart, in a new
    // process, whose memory is the restarted relay's own; then in this one,
    // as earlier runs measured it (its RSS also holds what the loading left).
    let exe = std::env::current_exe().expect("this benchmark's path");
    let status = std::process::Command::new(exe)
        .arg("--bench")
        .env("BENCH_BACKLOG_RESTART", dir.path())
        .env("BENCH_BACKLOG_ONLY", if keys.is_some() { "ordered" } else { "plain" })
        .status();
    assert!(status.is_ok_and(|s| s.success()), "the restart in a new process failed");
    restart(server_rt, client_rt, dir.path(), order_by, "the same process");
}

/// `order_by` of the ordered backlog: event `i`'s key is its buttercms_id.
const ORDER_BY: &str = "order_by: '.data.buttercms_id'";

/// Starts the relay on the backlog in `dir` with its target up; times the
/// first delivery, and reports the first 3 s of draining and the memory.
fn restart(
    server_rt: &tokio::runtime::Runtime,
    client_rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    order_by: Option<&str>,
    how: &str,
) {
    let (target, addr) = client_rt.block_on(FastTarget::start(false));
    let up = vec![("search".to_string(), format!("http://{addr}/"))];
    let restarted = Instant::now();
    let relay = server_rt.block_on(Relay::start(settings_with(dir, &up, None, order_by))).expect("restart");
    let started_in = restarted.elapsed();
    let (opened_rss, _) = rss_mib();
    let deadline = Instant::now() + Duration::from_secs(60);
    while target.first_at.lock().expect("lock").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let first = target.first_at.lock().expect("lock").map(|t| t - restarted);
    println!(
        "  restart in {how}: open + start {:.0} ms (RSS then {opened_rss:.1} MiB); first delivery {} after restart",
        started_in.as_secs_f64() * 1000.0,
        first.map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0)).unwrap_or_else(|| "not within 60 s".into())
    );
    std::thread::sleep(Duration::from_secs(3));
    let (rss, peak) = rss_mib();
    let drained = target.count.load(Ordering::Relaxed);
    println!(
        "  draining: {drained} delivered in the first 3 s ({:.0}/s); RSS {rss:.1} MiB (peak {peak:.1} MiB)",
        drained as f64 / 3.0
    );
    server_rt.block_on(relay.stop(Duration::from_secs(5))).expect("stop");
}

/// Posts `events` webhooks as fast as 32 connections go, each routed to
/// `targets` targets, and times until every delivery has arrived.
fn throughput(server_rt: &tokio::runtime::Runtime, client_rt: &tokio::runtime::Runtime, events: u64, targets: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (target, addr) = client_rt.block_on(FastTarget::start(false));
    let list: Vec<(String, String)> = (0..targets).map(|i| (format!("t{i}"), format!("http://{addr}/t{i}"))).collect();
    let relay = server_rt.block_on(Relay::start(settings(dir.path(), &list))).expect("relay");
    let relay_addr = relay.ingress_addr;
    let started = Instant::now();
    let acked = client_rt.block_on(async {
        post_events(relay_addr, events).await;
        started.elapsed()
    });
    let want = events * targets as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while target.count.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed();
    let got = target.count.load(Ordering::Relaxed);
    println!(
        "throughput, {targets} target(s) per event: {events} events acked in {:.2}s ({:.0}/s); {got} deliveries in {:.2}s: {:.0} deliveries/s",
        acked.as_secs_f64(),
        events as f64 / acked.as_secs_f64(),
        elapsed.as_secs_f64(),
        got as f64 / elapsed.as_secs_f64()
    );
    server_rt.block_on(relay.stop(Duration::from_secs(5))).expect("stop");
}

/// Sends `rate` events/s for `secs` and measures from each ack to the
/// target's receipt of that event.
fn lag(server_rt: &tokio::runtime::Runtime, client_rt: &tokio::runtime::Runtime, rate: u64, secs: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (target, addr) = client_rt.block_on(FastTarget::start(true));
    let relay = server_rt
        .block_on(Relay::start(settings(dir.path(), &[("search".to_string(), format!("http://{addr}/"))])))
        .expect("relay");
    let relay_addr = relay.ingress_addr;
    let conns = 16u64;
    let acks: HashMap<String, (Instant, Instant)> = client_rt.block_on(async {
        let start = Instant::now();
        let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
        let senders: Vec<_> = (0..conns)
            .map(|c| {
                tokio::spawn(async move {
                    let mut conn = connect(relay_addr).await;
                    let mut acks = Vec::new();
                    let offset = interval.mul_f64(c as f64 / conns as f64);
                    for k in 0.. {
                        let at = start + offset + interval * k;
                        if at - start >= Duration::from_secs(secs) {
                            break;
                        }
                        tokio::time::sleep_until(at.into()).await;
                        let sent = Instant::now();
                        let resp =
                            conn.send_request(request(1_000_000_000 + c * 10_000_000 + k as u64)).await.expect("send");
                        let acked = Instant::now();
                        let body = http_body_util::BodyExt::collect(resp.into_body()).await.expect("body").to_bytes();
                        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
                        acks.push((v["id"].as_str().unwrap_or_default().to_string(), (sent, acked)));
                    }
                    acks
                })
            })
            .collect();
        let mut all = HashMap::new();
        for s in senders {
            all.extend(s.await.expect("sender"));
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while (target.count.load(Ordering::Relaxed) as usize) < acks.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let arrivals = target.arrivals.lock().expect("lock").clone();
    let (mut from_ack, mut from_send, mut before_ack) = (Vec::new(), Vec::new(), 0);
    for (id, at) in arrivals {
        if let Some((sent, acked)) = acks.get(&id) {
            from_send.push((at - *sent).as_secs_f64() * 1000.0);
            match at.checked_duration_since(*acked) {
                Some(d) => from_ack.push(d.as_secs_f64() * 1000.0),
                None => {
                    before_ack += 1;
                    from_ack.push(0.0);
                }
            }
        }
    }
    from_ack.sort_by(f64::total_cmp);
    from_send.sort_by(f64::total_cmp);
    println!("lag at {rate} events/s for {secs}s: {} delivered of {} acked", from_ack.len(), acks.len());
    println!(
        "  ack -> target: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({before_ack} arrived before the client read its 202)",
        quantile(&from_ack, 0.5),
        quantile(&from_ack, 0.99),
        from_ack.last().copied().unwrap_or(f64::NAN)
    );
    println!("  send -> target: p50 {:.2} ms, p99 {:.2} ms", quantile(&from_send, 0.5), quantile(&from_send, 0.99));
    server_rt.block_on(relay.stop(Duration::from_secs(5))).expect("stop");
}
