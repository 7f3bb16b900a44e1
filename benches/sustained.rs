//! Deliveries at the speed of ingest, on the real binary (sled): in one run,
//! a bare hyper server answering 202 (a process of its own), then the relay
//!
//! - **ack only**: its targets paused, so webhooks are stored and queued but
//!   not sent: p99 at a fixed 2,000/s, then acks/s at max load;
//! - **drain**: the targets resumed, the backlog that max load left delivered
//!   to a fast local target: deliveries/s;
//! - **both**: targets running, p99 at a fixed 2,000/s while delivering, then
//!   max load until the last acked webhook is delivered: sustained webhooks/s;
//!
//! with one target per webhook, then ack only and drain again with four. CPU
//! (user + system, all threads, `/proc/PID/stat`) of the relay per webhook
//! acked or delivered, and of the bare server per request. BENCHMARKS.md has
//! the figures and the command; `BENCH_SECS` (default 8) per phase.

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const CONNS: u64 = 64;
/// The fixed rate of the latency phases.
const RATE: u64 = 2_000;
/// The longest a backlog may take to drain before the run is called failed.
const DRAIN_LIMIT: Duration = Duration::from_secs(900);

fn main() {
    if std::env::var("BENCH_ROLE").as_deref() == Ok("bare") {
        return bare_server();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

/// The baseline in a process of its own, so that its CPU is its own: a
/// hyper server answering 202 on 2 workers (as `serve`); prints its address
/// and serves until its stdin closes.
fn bare_server() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (_bare, addr) = rt.block_on(FastTarget::answering(202, false));
    println!("{addr}");
    let _ = std::io::stdin().lock().read_line(&mut String::new());
}

struct BareServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for BareServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_bare() -> BareServer {
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().expect("this benchmark"))
        .env("BENCH_ROLE", "bare")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("bare server");
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    std::io::BufReader::new(out).read_line(&mut line).expect("its address");
    BareServer { addr: line.trim().parse().expect("an address"), child }
}

/// Per-webhook figures of one phase.
struct Phase {
    count: u64,
    secs: f64,
    cpu_us: f64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }
}

/// Waits until `target` has received `want` requests; the time it took.
async fn delivered(target: &FastTarget, want: u64) -> Option<Duration> {
    let started = Instant::now();
    while target.count.load(Ordering::Relaxed) < want {
        if started.elapsed() > DRAIN_LIMIT {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Some(started.elapsed())
}

struct Case {
    targets: usize,
    ack_only_p99: Option<f64>,
    ack_only: Phase,
    drain: Phase,
    both_p99: Option<f64>,
    both: Option<Phase>,
}

/// One relay with `n` targets, all on `target`, through the phases.
async fn case(dir: &std::path::Path, n: usize, target: &FastTarget, target_addr: SocketAddr, secs: u64) -> Case {
    let names: Vec<(String, String)> =
        (0..n).map(|i| (format!("t{i}"), format!("http://{target_addr}/hook/{i}"))).collect();
    let storage = format!("{{ path: \"{}\", cache: \"64MiB\" }}", dir.join(format!("sled-{n}")).display());
    let relay = spawn_relay(dir, n, &storage, &names);
    let pid = [relay.child.id()];
    let counter = Arc::new(AtomicU64::new(fastrand::u64(..) >> 20));
    let lat = |l: &Load| {
        assert_eq!(l.errors, 0, "errors under load");
        l.quantile(0.99)
    };

    for (name, _) in &names {
        set_paused(&relay, name, true).await;
    }
    // The latency phase (one target only) leaves its webhooks queued too.
    let (ack_only_p99, queued_before) = if n == 1 {
        let fixed = drive(relay.addr, CONNS, secs, Some(RATE), counter.clone()).await;
        (Some(lat(&fixed)), fixed.acks)
    } else {
        (None, 0)
    };
    let base = target.count.load(Ordering::Relaxed);
    let cpu = cpu_of(&pid);
    let max = drive(relay.addr, CONNS, secs, None, counter.clone()).await;
    lat(&max);
    let ack_only = Phase {
        count: max.acks,
        secs: max.elapsed.as_secs_f64(),
        cpu_us: (cpu_of(&pid) - cpu) * 1e6 / max.acks as f64,
    };

    // Everything queued so far: the fixed phase's webhooks and max load's.
    let backlog = (queued_before + max.acks) * n as u64;
    let cpu = cpu_of(&pid);
    for (name, _) in &names {
        set_paused(&relay, name, false).await;
    }
    let took = delivered(target, base + backlog).await.expect("the backlog drained");
    let drain = Phase { count: backlog, secs: took.as_secs_f64(), cpu_us: (cpu_of(&pid) - cpu) * 1e6 / backlog as f64 };
    if n > 1 {
        return Case { targets: n, ack_only_p99, ack_only, drain, both_p99: None, both: None };
    }

    // Both at once: latency while delivering, then max load to the last delivery.
    let base = target.count.load(Ordering::Relaxed);
    let fixed = drive(relay.addr, CONNS, secs, Some(RATE), counter.clone()).await;
    let both_p99 = Some(lat(&fixed));
    delivered(target, base + fixed.acks).await.expect("the fixed phase delivered");
    let base = target.count.load(Ordering::Relaxed);
    let cpu = cpu_of(&pid);
    let started = Instant::now();
    let max = drive(relay.addr, CONNS, secs, None, counter).await;
    lat(&max);
    delivered(target, base + max.acks).await.expect("max load delivered");
    let both = Phase {
        count: max.acks,
        secs: started.elapsed().as_secs_f64(),
        cpu_us: (cpu_of(&pid) - cpu) * 1e6 / max.acks as f64,
    };
    Case { targets: n, ack_only_p99, ack_only, drain, both_p99, both: Some(both) }
}

async fn run() {
    let secs = env_or("BENCH_SECS", 8);
    let dir = tempfile::tempdir().expect("tempdir");

    let bare = spawn_bare();
    let cpu = cpu_of(&[bare.child.id()]);
    let load = drive(bare.addr, CONNS, secs, None, Arc::new(AtomicU64::new(0))).await;
    let bare_phase = Phase {
        count: load.acks,
        secs: load.elapsed.as_secs_f64(),
        cpu_us: (cpu_of(&[bare.child.id()]) - cpu) * 1e6 / load.acks as f64,
    };
    drop(bare);

    let (target, target_addr) = FastTarget::start(false).await;
    let one = case(dir.path(), 1, &target, target_addr, secs).await;
    let four = case(dir.path(), 4, &target, target_addr, secs).await;

    let b = bare_phase.rate();
    println!("\n{:<52} {:>10} {:>8} {:>12}", "phase", "per s", "× bare", "CPU µs each");
    let line = |name: &str, p: &Phase| {
        println!("{name:<52} {:>10.0} {:>8.3} {:>12.1}", p.rate(), p.rate() / b, p.cpu_us);
    };
    line("bare hyper server answering 202, requests", &bare_phase);
    for c in [&one, &four] {
        let t = c.targets;
        line(&format!("{t} target(s): ack only (targets paused), max, acks"), &c.ack_only);
        line(&format!("{t} target(s): drain the backlog, deliveries"), &c.drain);
        if let Some(both) = &c.both {
            line(&format!("{t} target(s): both, acked ÷ time to last delivery"), both);
        }
    }
    println!();
    for c in [&one, &four] {
        let drain_per_webhook = c.drain.rate() / c.targets as f64;
        println!(
            "{} target(s): delivery capacity ÷ ack-only max: {:.2} in deliveries ({:.2} in webhooks)",
            c.targets,
            c.drain.rate() / c.ack_only.rate(),
            drain_per_webhook / c.ack_only.rate()
        );
    }
    if let (Some(both), Some(a), Some(d)) = (&one.both, one.ack_only_p99, one.both_p99) {
        println!("1 target: sustained ÷ ack-only max: {:.2}", both.rate() / one.ack_only.rate());
        println!("1 target: p99 ack at {RATE}/s: ack only {a:.2} ms, while delivering {d:.2} ms ({:.2}×)", d / a);
    }
    println!(
        "\nCPU: per request for the bare server; per webhook acked (ack only, both) or delivery made (drain), \
         for the relay process. {CONNS} connections, {secs} s per phase; the target and the load run in this \
         benchmark's process."
    );
}
