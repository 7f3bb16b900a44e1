//! The relay's log: whoever reads its stderr may fall behind or stop, and
//! the relay goes on acking; the lines it had to drop meanwhile are counted
//! in a warning once it can write again.

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

/// More webhooks than the log's queue holds lines (`logging::QUEUE_LINES`),
/// so that some of their lines must be dropped while nobody reads.
const WEBHOOKS: usize = hookrelay::logging::QUEUE_LINES + 1_000;
const CONNECTIONS: usize = 16;

/// Posts `count` distinct ButterCMS webhooks from `first` on one keep-alive
/// connection; the statuses that were not 202.
async fn post_many(addr: SocketAddr, first: usize, count: usize) -> Vec<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut refused = Vec::new();
    for n in first..first + count {
        let req = request("/hooks/buttercms", &[("x-webhook-secret", BUTTER_SECRET)], Bytes::from(butter_page(n)));
        let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await.expect("an ack within 20 s").unwrap();
        let status = resp.status().as_u16();
        resp.into_body().collect().await.unwrap();
        if status != 202 {
            refused.push(status);
        }
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_log_nobody_reads_keeps_acking_and_counts_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_text(dir.path(), "", ""));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = std::io::BufReader::new(child.stderr.take().unwrap());
    // Read until ingress listens, then leave the pipe unread (it fills at 64 KiB).
    let mut line = String::new();
    let started = Instant::now();
    let addr: SocketAddr = loop {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "the relay exited before listening");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["fields"]["message"] == "hookrelay ingress listening" {
            break v["fields"]["listen"].as_str().unwrap().parse().unwrap();
        }
        assert!(started.elapsed() < WAIT, "the relay did not listen within 20 s");
    };

    // Every webhook is acked while nobody reads the log (before, the relay
    // stopped answering after a few hundred, its workers blocked writing).
    let per = WEBHOOKS / CONNECTIONS;
    let posters: Vec<_> = (0..CONNECTIONS).map(|c| tokio::spawn(post_many(addr, c * per, per))).collect();
    for p in posters {
        assert_eq!(p.await.unwrap(), Vec::<u16>::new(), "webhooks not acked 202");
    }

    // Read it again: stop the relay and take every line to the end.
    assert!(std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let lines: Vec<String> = log.lines().map_while(Result::ok).collect();
        let _ = tx.send(lines);
    });
    let lines = rx.recv_timeout(WAIT).expect("the log ends within 20 s of SIGTERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");

    let mut received = 0;
    let mut dropped = 0;
    let mut last = String::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        last = message.to_string();
        match message {
            "webhook received" => received += 1,
            "log lines dropped: stderr was not read as fast as they came" => {
                assert_eq!(v["level"], "WARN", "{l}");
                dropped += v["fields"]["dropped"].as_u64().unwrap();
            }
            _ => {}
        }
    }
    let posted = (per * CONNECTIONS) as u64;
    assert!(dropped > 0, "no drop reported, though {posted} webhooks' lines outnumber the queue");
    assert!(received + dropped >= posted, "{received} received lines and {dropped} dropped: fewer than {posted}");
    // The queue is written out at exit: the last line is the relay's own
    // last, or (if the queue was full then) the count of what was dropped.
    let report = "log lines dropped: stderr was not read as fast as they came";
    assert!(last == "stopped" || last == report, "the last line is {last:?}: the queue was not written out at exit");
}

/// Bodies are never logged, even with `RUST_LOG=trace`: sled writes its
/// batches (keys and values: the event's body among them, as its bytes) at
/// trace level, and those lines are dropped; other crates' trace lines
/// still come, so the level is in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_log_holds_no_webhook_body() {
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let targets = format!("  - name: search\n    url: \"{}\"", target.url("/reindex"));
    let routes = "  - { source: buttercms, events: [\"page.*\"], targets: [search] }";
    let config = write_config(dir.path(), &relay_config(dir.path(), &targets, routes));
    let lines = log_of_a_marked_webhook(&config, &mut target, "trace").await;
    assert!(lines.iter().any(|l| l.contains(r#""level":"TRACE""#)), "trace lines are written");
}
