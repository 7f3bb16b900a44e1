//! sled and PostgreSQL side by side, on the real binary: durable acks at max
//! load and latency at a fixed 1,000/s, deliveries to one fast local target,
//! with one and three instances, and the CPU per webhook of the relay
//! processes and of PostgreSQL. A bare hyper server answering 202 is
//! measured in the same run. BENCHMARKS.md has the figures and the command.
//!
//! `BENCH_SECS` (default 8) per phase. Needs PostgreSQL's binaries (the
//! cases on PostgreSQL are skipped without them). `BENCH_FIXED_PAUSED=1`
//! pauses the target during the fixed-rate phase: the acks' latency with no
//! deliveries beside them. `BENCH_CASE=3` runs only the cases whose name
//! holds that text (the bare server always runs): A/B runs of one case.

#[path = "../src/store/postgres/throwaway.rs"]
mod throwaway;

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Load connections in all, split over the instances.
const CONNS: u64 = 64;
/// The fixed rate the latency is measured at.
const RATE: u64 = 1_000;

/// One relay of the release build with `storage` and one target.
fn spawn(dir: &Path, n: usize, storage: &str, target: SocketAddr) -> Instance {
    spawn_relay(dir, n, storage, &[("search".to_string(), format!("http://{target}/reindex"))])
}

/// The postmaster and its children: every PostgreSQL process.
fn postgres_pids(postmaster: u32) -> Vec<u32> {
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

/// Drives every instance at once, `CONNS` connections split among them.
async fn drive_all(addrs: &[SocketAddr], secs: u64, rate: Option<u64>, counter: &Arc<AtomicU64>) -> Load {
    let n = addrs.len() as u64;
    let runs: Vec<_> = addrs
        .iter()
        .map(|addr| tokio::spawn(drive(*addr, CONNS / n, secs, rate.map(|r| r / n), counter.clone())))
        .collect();
    let mut all = Load { acks: 0, errors: 0, elapsed: Duration::ZERO, latencies: Vec::new() };
    for run in runs {
        let l = run.await.expect("load");
        all.acks += l.acks;
        all.errors += l.errors;
        all.elapsed = all.elapsed.max(l.elapsed);
        all.latencies.extend(l.latencies);
    }
    all.latencies.sort_unstable();
    all
}

struct Figures {
    name: String,
    fixed: Load,
    max: Load,
    delivered_during: f64,
    sustained: f64,
    drained: bool,
    relay_us: f64,
    postgres_us: f64,
    /// PostgreSQL transactions per webhook at the fixed rate, its delivery included.
    postgres_tx: Option<f64>,
}

/// Transactions committed or rolled back in `database` so far.
fn transactions(cluster: &throwaway::Cluster, database: &str) -> f64 {
    let sql = format!("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{database}'");
    cluster.query(database, &sql).parse().unwrap_or(f64::NAN)
}

/// `pg`: the cluster and the database of the instances, on PostgreSQL.
async fn case(
    name: &str,
    instances: &[Instance],
    target: &FastTarget,
    pg: Option<(&throwaway::Cluster, &str)>,
    secs: u64,
) -> Figures {
    let addrs: Vec<SocketAddr> = instances.iter().map(|i| i.addr).collect();
    let relay_pids: Vec<u32> = instances.iter().map(|i| i.child.id()).collect();
    let counter = Arc::new(AtomicU64::new(fastrand::u64(..) >> 20));
    // Paused through the first instance: the pause is the store's, so on
    // PostgreSQL every instance holds it.
    let paused = std::env::var_os("BENCH_FIXED_PAUSED").is_some();
    if paused {
        set_paused(&instances[0], "search", true).await;
    }
    let tx_before = pg.map(|(cluster, db)| transactions(cluster, db));
    let start_count = target.count.load(Ordering::Relaxed);
    let fixed = drive_all(&addrs, secs, Some(RATE), &counter).await;
    if paused {
        set_paused(&instances[0], "search", false).await;
    }
    // Let the fixed phase's deliveries end before the max phase.
    let quiet = Instant::now();
    while target.count.load(Ordering::Relaxed) < start_count + fixed.acks && quiet.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = target.count.load(Ordering::Relaxed);
    // Backends report their counts within a second (PostgreSQL's statistics).
    let postgres_tx = match (pg, tx_before) {
        (Some((cluster, db)), Some(tx_before)) => {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            Some((transactions(cluster, db) - tx_before) / fixed.acks.max(1) as f64)
        }
        _ => None,
    };
    let pg = pg.map(|(cluster, _)| postgres_pids(cluster.server_pid())).unwrap_or_default();
    let (relay_cpu, pg_cpu) = (cpu_of(&relay_pids), cpu_of(&pg));
    let started = Instant::now();
    let max = drive_all(&addrs, secs, None, &counter).await;
    let delivered_during = (target.count.load(Ordering::Relaxed) - before) as f64 / max.elapsed.as_secs_f64();
    let (relay_cpu, pg_cpu) = (cpu_of(&relay_pids) - relay_cpu, cpu_of(&pg) - pg_cpu);
    // Until the last acked webhook is delivered.
    let want = before + max.acks;
    let deadline = Instant::now() + Duration::from_secs(300);
    while target.count.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = target.count.load(Ordering::Relaxed) >= want;
    let sustained = max.acks as f64 / started.elapsed().as_secs_f64();
    let acked = max.acks.max(1) as f64;
    let per = |cpu: f64| cpu * 1e6 / acked;
    Figures {
        name: name.to_string(),
        fixed,
        max,
        delivered_during,
        sustained,
        drained,
        relay_us: per(relay_cpu),
        postgres_us: per(pg_cpu),
        postgres_tx,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env_or("BENCH_SECS", 8);
    let only = std::env::var("BENCH_CASE").unwrap_or_default();
    let wanted = |name: &str| name.contains(only.as_str());
    let dir = tempfile::tempdir().expect("tempdir");
    let (target, target_addr) = FastTarget::start(false).await;
    let mut results = Vec::new();

    // The baseline: a bare hyper server answering 202, nothing else.
    let (bare, bare_addr) = FastTarget::answering(202, false).await;
    let counter = Arc::new(AtomicU64::new(0));
    let bare_max = drive(bare_addr, CONNS, secs, None, counter).await;
    drop(bare);

    if wanted("sled, 1 instance") {
        let data = dir.path().join("sled");
        let storage = format!("{{ path: \"{}\", cache: \"64MiB\" }}", data.display());
        let sled = [spawn(dir.path(), 0, &storage, target_addr)];
        results.push(case("sled, 1 instance", &sled, &target, None, secs).await);
    }
    let pg_cases: Vec<_> =
        [(1, "postgres, 1 instance"), (3, "postgres, 3 instances")].into_iter().filter(|(_, n)| wanted(n)).collect();
    let cluster = match pg_cases.is_empty() {
        true => None,
        false => throwaway::cluster("the PostgreSQL cases of the cluster benchmark"),
    };
    match cluster {
        Some(cluster) => {
            for (n, name) in pg_cases {
                let url = cluster.database();
                let db = url.rsplit('/').next().and_then(|s| s.split('?').next()).unwrap_or_default();
                let storage = format!("{{ backend: postgres, url: \"{url}\", pool: 16 }}");
                let instances: Vec<Instance> =
                    (0..n).map(|i| spawn(dir.path(), 10 * n + i, &storage, target_addr)).collect();
                results.push(case(name, &instances, &target, Some((cluster, db)), secs).await);
                // The next case starts on a quiet server: no autovacuum of
                // this case's tables, no checkpoint of its writes.
                drop(instances);
                cluster.query("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"));
                cluster.query("postgres", "CHECKPOINT");
            }
        }
        None if pg_cases.is_empty() => {}
        None => println!("(PostgreSQL not installed: its cases skipped)"),
    }

    let bare_rate = bare_max.acks as f64 / bare_max.elapsed.as_secs_f64();
    println!(
        "\nbare hyper server answering 202, max load: {bare_rate:.0} requests/s ({CONNS} connections, {secs} s)\n"
    );
    println!(
        "{:<24} {:>9} {:>8} {:>8} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "case", "acks/s", "×bare", "p50 ms", "p99 ms", "errors", "deliv/s*", "sustained", "relay µs", "pg µs", "pg tx"
    );
    for f in &results {
        let rate = f.max.acks as f64 / f.max.elapsed.as_secs_f64();
        println!(
            "{:<24} {:>9.0} {:>8.3} {:>8.2} {:>9.2} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>9}{}",
            f.name,
            rate,
            rate / bare_rate,
            f.fixed.quantile(0.50),
            f.fixed.quantile(0.99),
            f.max.errors + f.fixed.errors,
            f.delivered_during,
            f.sustained,
            f.relay_us,
            f.postgres_us,
            f.postgres_tx.map_or("-".to_string(), |t| format!("{t:.2}")),
            if f.drained { "" } else { "  (NOT all delivered within 300 s)" }
        );
    }
    if std::env::var_os("BENCH_FIXED_PAUSED").is_some() {
        println!(
            "\n(BENCH_FIXED_PAUSED: the target was paused during the fixed-rate phase: p50/p99 without deliveries)"
        );
    }
    println!(
        "\nacks/s: max load; p50/p99: at a fixed {RATE}/s (from the scheduled send time); deliv/s*: delivered while \
         acking at max; sustained: webhooks acked at max / time until the last was delivered; relay µs, pg µs: CPU \
         (user + system, all threads) per webhook acked at max, of the relay processes and of PostgreSQL; pg tx: \
         PostgreSQL transactions per webhook at {RATE}/s, its delivery included."
    );
}
