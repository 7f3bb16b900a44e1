//! Filters and transforms: ingest with a jq filter on the route, and delivery
//! with a jq transform on every target, side by side with neither, in one run.
//! CPU counts this process (relay and load generator) and its jq sandboxes.
//!
//! `cargo bench --bench programs` (env: BENCH_SECS per ingest phase, default 5;
//! BENCH_ONLY=ingest or delivery;
//! BENCH_CONNS, default 64; BENCH_ROUNDS, default 3; BENCH_EVENTS per
//! delivery phase, default 20000).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hookrelay::app::Relay;
use hookrelay::store::{NullStore, SledStore, Store};

/// A filter of the kind README shows: landing pages in the default locale
/// (every benchmark body passes it, so the relays store the same). Paths and
/// comparisons: the relay answers it itself (`jq::direct`).
const FILTER: &str = r#".data.page_type == "landing" and .data.locale == null"#;
/// The same verdict through a builtin call, outside that subset: it runs in
/// the jq sandbox, as any program that loops, calls or builds.
const SANDBOXED_FILTER: &str = r#"(.data.page_type // "" | ascii_downcase) == "landing" and .data.locale == null"#;
/// A Slack-style message.
const TRANSFORM: &str = r#"{text: "\($event): \(.data.name // .data.id)", id: $id}"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Prints the medians of the rounds without a program (`[0]`) and with
/// each program (the others, named in `programs`).
fn compare(phase: &str, rate: &str, per: &str, programs: &[&str], rates: &[Vec<f64>], cpus: &[Vec<f64>]) {
    let rates: Vec<f64> = rates.iter().cloned().map(median).collect();
    let cpus: Vec<f64> = cpus.iter().cloned().map(median).collect();
    let mut line = format!("{phase}: median {rate} plain {:.0}, CPU per {per} {:.1} µs", rates[0], cpus[0]);
    for (i, program) in programs.iter().enumerate() {
        line.push_str(&format!(
            "; with {program} {:.0} (ratio {:.2}), {:.1} µs (+{:.1} µs)",
            rates[i + 1],
            rates[i + 1] / rates[0],
            cpus[i + 1],
            cpus[i + 1] - cpus[0]
        ));
    }
    println!("{line}");
}

fn memory(when: &str) {
    let (rss, peak) = rss_mib();
    println!(
        "  memory {when}: relay process {rss:.1} MiB (peak {peak:.1}), jq sandboxes {:.1} MiB",
        children_rss_mib()
    );
}

fn main() {
    let secs = env_or("BENCH_SECS", 5);
    let conns = env_or("BENCH_CONNS", 64);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let events = env_or("BENCH_EVENTS", 20_000);
    let server_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // The load generator and the fast target run on one more thread of their own.
    let client_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let counter = Arc::new(AtomicU64::new(0));
    memory("at start");

    let down = ["search", "cache"].map(|t| (t.to_string(), format!("http://127.0.0.1:9/{t}")));
    // BENCH_ONLY=ingest or delivery runs one half.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let stores: &[bool] = if only == "delivery" { &[] } else { &[false, true] };
    if !stores.is_empty() {
        println!("ingest: {conns} connections, {secs}s per phase, {rounds} rounds, buttercms page.published, 2 targets per event");
        let direct = |text| hookrelay::jq::Program::compile(hookrelay::jq::Kind::Filter, text).map(|p| p.is_direct());
        assert_eq!((direct(FILTER), direct(SANDBOXED_FILTER)), (Ok(true), Ok(false)), "where the filters run");
        println!("filter (answered by the relay): {FILTER}");
        println!("sandboxed filter (run in the jq sandbox): {SANDBOXED_FILTER}");
        println!(
            "{:<28} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>12}",
            "phase", "acks/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors", "CPU µs/ack"
        );
    }
    for &durable in stores {
        let start = |filter: Option<&str>| {
            let dir = tempfile::tempdir().expect("tempdir");
            let settings = settings_with(dir.path(), &down, filter, None);
            let store: Arc<dyn Store> = if durable {
                Arc::new(SledStore::open(&settings.storage.path, settings.storage.cache_bytes).expect("store"))
            } else {
                Arc::new(NullStore::default())
            };
            (server_rt.block_on(Relay::start_with_store(settings, store)).expect("relay"), dir)
        };
        let relays =
            [(start(None), "plain"), (start(Some(FILTER)), "filter"), (start(Some(SANDBOXED_FILTER)), "sandboxed")];
        let kind = if durable { "durable" } else { "no store" };
        for ((relay, _), _) in &relays {
            client_rt.block_on(drive(relay.ingress_addr, 8, 1, None, counter.clone()));
        }
        let (mut rates, mut cpus) = (vec![Vec::new(); relays.len()], vec![Vec::new(); relays.len()]);
        for _ in 0..rounds {
            for (i, ((relay, _), name)) in relays.iter().enumerate() {
                let cpu = cpu_secs();
                let load = client_rt.block_on(drive(relay.ingress_addr, conns, secs, None, counter.clone()));
                let per_ack = (cpu_secs() - cpu) / load.acks.max(1) as f64 * 1e6;
                rates[i].push(load.acks as f64 / load.elapsed.as_secs_f64());
                cpus[i].push(per_ack);
                println!("{} {per_ack:>12.1}", row_text(&format!("{kind}, {name}, max"), &load));
            }
        }
        compare(kind, "acks/s", "ack", &["filter", "sandboxed filter"], &rates, &cpus);
        memory(&format!("after the {kind} phases"));
        server_rt.block_on(async {
            for ((relay, _dir), _) in relays {
                let _ = relay.stop(Duration::from_secs(5)).await;
            }
        });
    }

    if only == "ingest" {
        return;
    }
    println!("delivery: {events} events per phase, one fast local target, {rounds} rounds");
    println!("transform: {TRANSFORM}");
    let (mut rates, mut cpus) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
    for _ in 0..rounds {
        for (i, transform) in [None, Some(TRANSFORM)].into_iter().enumerate() {
            let (rate, cpu) = deliver(&server_rt, &client_rt, events, transform);
            let name = if transform.is_some() { "transform" } else { "plain" };
            println!("  {name:<10} {rate:>8.0} deliveries/s, {cpu:>7.1} µs CPU per webhook (ack + delivery)");
            rates[i].push(rate);
            cpus[i].push(cpu);
        }
    }
    compare("delivery", "deliveries/s", "webhook", &["transform"], &rates, &cpus);
    memory("at the end");
}

/// Posts `events` webhooks over 32 connections to a relay whose one target
/// answers at once; returns deliveries/s from the first post to the last
/// delivery, and CPU µs per webhook over that time.
fn deliver(
    server_rt: &tokio::runtime::Runtime,
    client_rt: &tokio::runtime::Runtime,
    events: u64,
    transform: Option<&str>,
) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (target, addr) = client_rt.block_on(FastTarget::start(false));
    let list = [("t".to_string(), format!("http://{addr}/"))];
    let keys = transform.map(|t| format!("transform: '{t}'"));
    let relay =
        server_rt.block_on(Relay::start(settings_with(dir.path(), &list, None, keys.as_deref()))).expect("relay");
    let relay_addr = relay.ingress_addr;
    let (started, cpu) = (Instant::now(), cpu_secs());
    client_rt.block_on(post_events(relay_addr, events));
    let deadline = Instant::now() + Duration::from_secs(300);
    while target.count.load(Ordering::Relaxed) < events && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let (elapsed, cpu) = (started.elapsed(), cpu_secs() - cpu);
    let got = target.count.load(Ordering::Relaxed);
    server_rt.block_on(relay.stop(Duration::from_secs(5))).expect("stop");
    (got as f64 / elapsed.as_secs_f64(), cpu / events as f64 * 1e6)
}
