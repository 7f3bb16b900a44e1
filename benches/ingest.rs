//! Ingest benchmark: durable acks per second and ack latency of the real relay,
//! side by side with the same server answering 202 without storing.
//!
//! `cargo bench --bench ingest` (env: BENCH_SECS per phase, default 5;
//! BENCH_CONNS, default 64; BENCH_RATE for the fixed-rate phase, default 2000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{drive, env_or, row, settings, Load};
use hookrelay::app::Relay;
use hookrelay::store::{CommitStats, NullStore, SledStore};

/// One ButterCMS source routing page events to two targets nothing listens on.
fn bench_settings(dir: &std::path::Path) -> hookrelay::config::Settings {
    let targets = ["search", "cache"].map(|t| (t.to_string(), format!("http://127.0.0.1:9/{t}")));
    settings(dir, &targets)
}

/// Rounds, their total time, and the slowest since the last snapshot.
fn snapshot(s: &CommitStats) -> (u64, u64, u64) {
    (
        s.flushes.load(Ordering::Relaxed),
        s.flush_micros.load(Ordering::Relaxed),
        s.slowest_micros.swap(0, Ordering::Relaxed),
    )
}

fn flush_row(before: (u64, u64, u64), after: (u64, u64, u64), l: &Load) {
    let flushes = (after.0 - before.0).max(1);
    println!(
        "  group commit: {:.0} flushes/s, {:.2} ms per flush (slowest {:.1} ms), {:.1} acks per flush",
        flushes as f64 / l.elapsed.as_secs_f64(),
        (after.1 - before.1) as f64 / flushes as f64 / 1000.0,
        after.2 as f64 / 1000.0,
        l.acks as f64 / flushes as f64
    );
}

fn main() {
    let secs = env_or("BENCH_SECS", 5);
    let conns = env_or("BENCH_CONNS", 64);
    let rate = env_or("BENCH_RATE", 2000);
    // The relay gets its own runtime (2 workers, like `serve` on this machine);
    // the load generator runs on another, single-threaded.
    let server_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let counter = Arc::new(AtomicU64::new(0));

    let dir = tempfile::tempdir().expect("tempdir");
    let baseline = server_rt
        .block_on(Relay::start_with_store(bench_settings(dir.path()), Arc::new(NullStore::default())))
        .expect("baseline");
    let settings = bench_settings(dir.path());
    let sled = Arc::new(SledStore::open(&settings.storage.path, settings.storage.cache_bytes).expect("store"));
    let durable = server_rt.block_on(Relay::start_with_store(settings, sled.clone())).expect("relay");

    println!("ingest benchmark: {conns} connections, {secs}s per phase, buttercms page.published, 2 targets per event");
    println!(
        "{:<28} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "phase", "acks/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    // Warm up both (connections, allocator, sled's first segments).
    client_rt.block_on(drive(baseline.ingress_addr, 8, 1, None, counter.clone()));
    client_rt.block_on(drive(durable.ingress_addr, 8, 1, None, counter.clone()));
    // Fixed rate first, on a fresh store: a saturating phase before it would
    // leave sled with a write backlog that is not the steady state at this rate.
    let base_rate = client_rt.block_on(drive(baseline.ingress_addr, conns, secs, Some(rate), counter.clone()));
    row(&format!("baseline, fixed {rate}/s"), &base_rate);
    let before = snapshot(sled.commit_stats());
    let dur_rate = client_rt.block_on(drive(durable.ingress_addr, conns, secs, Some(rate), counter.clone()));
    row(&format!("durable, fixed {rate}/s"), &dur_rate);
    flush_row(before, snapshot(sled.commit_stats()), &dur_rate);
    let base_max = client_rt.block_on(drive(baseline.ingress_addr, conns, secs, None, counter.clone()));
    row("baseline (no store), max", &base_max);
    let before = snapshot(sled.commit_stats());
    let dur_max = client_rt.block_on(drive(durable.ingress_addr, conns, secs, None, counter.clone()));
    row("durable (sled+fsync), max", &dur_max);
    flush_row(before, snapshot(sled.commit_stats()), &dur_max);
    println!(
        "durable/baseline throughput: {:.2}",
        (dur_max.acks as f64 / dur_max.elapsed.as_secs_f64()) / (base_max.acks as f64 / base_max.elapsed.as_secs_f64())
    );
    let stored = server_rt.block_on(durable.store.recent_events(None, usize::MAX)).map(|v| v.len()).unwrap_or(0);
    println!("events in the durable store: {stored}");
    server_rt.block_on(async {
        let _ = baseline.stop(Duration::from_secs(5)).await;
        let _ = durable.stop(Duration::from_secs(5)).await;
    });
}
