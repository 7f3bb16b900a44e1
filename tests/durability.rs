//! An acknowledged webhook survives `kill -9`: the real binary is killed right
//! after its 202s and the store is reopened.

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
