//! The real binary: an acknowledged webhook survives `kill -9` and SIGTERM
//! under load, deliveries in flight are made after a restart, and the logs
//! are JSON lines that never hold a secret or a payload.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hookrelay::store::{EventId, SledStore, Store};
use http::StatusCode;

#[tokio::test]
async fn acked_webhooks_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_text(dir.path(), "", ""));
    let (mut child, addr) = spawn_relay(&config);

    let sends = (0..40).map(|i| {
        tokio::spawn(async move {
            let body = format!(
                r#"{{"event":"content.published","occurred_at":"2025-05-03T12:00:{i:02}Z","data":{{"type":"posts","id":"p{i}","slug":"s"}}}}"#
            );
            let reply = post(addr, "/hooks/cometcms", &[("x-cometcms-signature", &comet_signature(body.as_bytes()))], body).await;
            assert_eq!(reply.status, StatusCode::ACCEPTED);
            reply.json()["id"].as_str().unwrap().parse::<EventId>().unwrap()
        })
    });
    let mut acked = Vec::new();
    for s in sends {
        acked.push(s.await.unwrap());
    }
    child.kill().unwrap(); // SIGKILL: no shutdown code runs.
    child.wait().unwrap();

    let store = SledStore::open(&dir.path().join("data"), 8 << 20).unwrap();
    for id in &acked {
        let event = store.event(*id).await.unwrap();
        assert!(event.is_some(), "acked event {id} lost after kill -9");
        assert_eq!(store.deliveries(*id).await.unwrap().len(), 1, "delivery of {id} lost");
    }
}

#[tokio::test]
async fn sigterm_stops_the_relay_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_text(dir.path(), "", ""));
    let (mut child, addr) = spawn_relay(&config);
    assert_eq!(post_butter(addr, fixture("buttercms-page-published.json")).await.status, StatusCode::ACCEPTED);
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "exit status {code}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn deliveries_pending_or_in_flight_at_kill_9_are_delivered_after_restart() {
    let mut target = FakeTarget::start().await;
    // First the target hangs, so that attempts are in flight when the relay dies.
    target.always(Answer::status(200).delay(Duration::from_secs(60)));
    let dir = tempfile::tempdir().unwrap();
    let targets = format!("  - name: search\n    url: \"{}\"\n    concurrency: 4\n    timeout: 90s\n", target.url("/"));
    let routes = "  - { source: buttercms, events: [\"*\"], targets: [search] }";
    let config = write_config(dir.path(), &relay_config(dir.path(), &targets, routes));
    let (mut child, addr) = spawn_relay(&config);
    let mut acked = std::collections::HashSet::new();
    for n in 0..20 {
        let reply = post_butter(addr, butter_page(n)).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        acked.insert(reply.json()["id"].as_str().unwrap().to_string());
    }
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        // Four attempts hang in flight; sixteen wait.
        in_flight.push(target.next().await.headers["webhook-id"].to_str().unwrap().to_string());
    }
    child.kill().unwrap();
    child.wait().unwrap();

    target.always(Answer::status(200));
    let (mut child, _) = spawn_relay(&config);
    let mut seen = std::collections::HashMap::<String, usize>::new();
    let deadline = Instant::now() + WAIT;
    while !acked.iter().all(|id| seen.contains_key(id)) {
        assert!(Instant::now() < deadline, "not all delivered after restart: {} of 20", seen.len());
        let got = target.next().await;
        *seen.entry(got.headers["webhook-id"].to_str().unwrap().to_string()).or_default() += 1;
    }
    // The four in flight at the kill are sent again (at-least-once); after the
    // restart, each delivery is made exactly once.
    assert!(in_flight.iter().all(|id| seen.contains_key(id)));
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn sigterm_under_load_loses_nothing_acked() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_text(dir.path(), "", ""));
    let (mut child, addr) = spawn_relay(&config);
    // Eight senders post until the relay stops answering.
    let senders: Vec<_> = (0..8)
        .map(|s| {
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..10_000 {
                    let body = butter_page(s * 100_000 + n);
                    let attempt = tokio::time::timeout(Duration::from_secs(5), async {
                        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
                        let (mut tx, conn) =
                            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.ok()?;
                        tokio::spawn(conn);
                        let resp = tx
                            .send_request(request("/hooks/buttercms", &[("x-webhook-secret", BUTTER_SECRET)], body))
                            .await
                            .ok()?;
                        let status = resp.status();
                        let body = http_body_util::BodyExt::collect(resp.into_body()).await.ok()?.to_bytes();
                        Some((status, body))
                    });
                    match attempt.await {
                        Ok(Some((status, body))) if status == StatusCode::ACCEPTED => {
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            acked.push(v["id"].as_str().unwrap().parse::<EventId>().unwrap());
                        }
                        Ok(Some(_)) => {}           // refused while stopping: not acked
                        Ok(None) | Err(_) => break, // the relay is gone
                    }
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let started = Instant::now();
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(code.success(), "exit status {code}");
    let mut acked = Vec::new();
    for s in senders {
        acked.extend(s.await.unwrap());
    }
    assert!(acked.len() > 10, "only {} acked before the stop", acked.len());
    let store = SledStore::open(&dir.path().join("data"), 8 << 20).unwrap();
    for id in &acked {
        assert!(store.event(*id).await.unwrap().is_some(), "acked {id} lost in shutdown");
    }
}

#[tokio::test]
async fn logs_are_json_lines_without_secrets_or_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_text(dir.path(), "", ""));
    let (mut child, addr, logs) = spawn_relay_logged(&config);
    let marker = "PAYLOAD-MARKER-7f3a";
    let body = format!(r#"{{"data":{{"id":"{marker}","timestamp":"t"}},"webhook":{{"event":"page.published"}}}}"#);
    assert_eq!(post_butter(addr, body.clone()).await.status, StatusCode::ACCEPTED);
    let wrong = post(addr, "/hooks/buttercms", &[("x-webhook-secret", "wrong-secret-guess")], body).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    eventually("both requests logged", || async {
        logs.lock().unwrap().iter().filter(|l| l.contains("webhook re")).count() >= 2
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let logs = logs.lock().unwrap();
    for line in logs.iter() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
        for secret in [BUTTER_SECRET, COMET_SECRET, "wrong-secret-guess", marker, ADMIN_TOKEN] {
            assert!(!line.contains(secret), "log line leaks {secret:?}: {line}");
        }
    }
    let received = logs.iter().find(|l| l.contains("webhook received")).expect("a received line");
    let v: serde_json::Value = serde_json::from_str(received).unwrap();
    for field in ["source", "event", "id", "outcome", "ms"] {
        assert!(!v["fields"][field].is_null(), "{field} missing: {received}");
    }
    let refused = logs.iter().find(|l| l.contains("webhook refused")).expect("a refused line");
    assert!(
        refused.contains("x-webhook-secret") || refused.contains("header value"),
        "says which check failed: {refused}"
    );
}

/// sled writes its `conf` file when it creates a store and never syncs it
/// (a power cut simulated with LazyFS left it empty): hookrelay syncs it. The
/// real binary runs under `strace`, which must show an fsync of `conf`.
#[test]
fn the_store_s_conf_file_is_synced_when_the_store_is_created() {
    use std::os::unix::process::CommandExt;
    if Command::new("strace").arg("-V").output().is_err() {
        println!("SKIPPED: this test needs strace (Debian's strace)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_text(dir.path(), "", ""));
    let trace = dir.path().join("trace");
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=openat,fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_hookrelay"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let conf = dir.path().join("data").join("conf").display().to_string();
    // `tid openat(AT_FDCWD, "…/data/conf", O_RDONLY|O_CLOEXEC) = fd`, then `tid fsync(fd) = 0`.
    let synced = |text: &str| {
        let mut opened: Vec<(String, String)> = Vec::new();
        // An open of `conf` another thread's call interrupted: `openat(… <unfinished ...>`,
        // then `<... openat resumed>) = fd` on the same thread.
        let mut resuming: Vec<String> = Vec::new();
        for line in text.lines() {
            // strace pads the thread id to a width: `123  openat(…`.
            let (tid, call) = line.split_once(' ').unwrap_or((line, ""));
            let call = call.trim_start();
            if call.starts_with("openat(") && call.contains(&format!("\"{conf}\"")) {
                if call.ends_with("<unfinished ...>") {
                    resuming.push(tid.to_string());
                } else if let Some(fd) = call.rsplit("= ").next() {
                    opened.push((tid.to_string(), fd.trim().to_string()));
                }
            } else if call.starts_with("<... openat resumed>") && resuming.iter().any(|t| t == tid) {
                resuming.retain(|t| t != tid);
                if let Some(fd) = call.rsplit("= ").next() {
                    opened.push((tid.to_string(), fd.trim().to_string()));
                }
            } else if opened.iter().any(|(t, fd)| {
                // `fsync(12) = 0`, or `fsync(12 <unfinished ...>` when another thread's call interleaves.
                t == tid
                    && [format!("fsync({fd})"), format!("fsync({fd} <unfinished")].iter().any(|c| call.starts_with(c))
            }) {
                return true;
            }
        }
        false
    };
    let deadline = Instant::now() + WAIT;
    let mut found = false;
    while !found && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        found = synced(&std::fs::read_to_string(&trace).unwrap_or_default());
    }
    // The whole group: strace and the relay it started.
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", strace.id())]).status();
    let _ = strace.wait();
    assert!(std::path::Path::new(&conf).exists(), "sled wrote no conf file");
    assert!(found, "no fsync of {conf} in the trace:\n{}", std::fs::read_to_string(&trace).unwrap_or_default());
}
