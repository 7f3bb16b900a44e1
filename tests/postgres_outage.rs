//! The database goes away under load and comes back: while it is down the
//! relay answers 503 and acknowledges nothing; once it is back the same
//! relay process acks again and delivers everything it acked. Its own test
//! process, so that stopping the throwaway cluster disturbs no other test.

mod common;
#[path = "../src/store/postgres/throwaway.rs"]
mod throwaway;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_is_503s_meanwhile_and_nothing_acked_lost() {
    let Some(cluster) = throwaway::cluster("a_database_restart_under_load") else { return };
    let url = cluster.database();
    let mut target = FakeTarget::start().await;
    // Slow enough that attempts are at the target when the database goes
    // (50 webhooks take about 2 s to deliver), quick enough that they answer
    // while it is down (below): their outcomes are refused.
    target.always(Answer::status(200).delay(Duration::from_millis(300)));
    let dir = tempfile::tempdir().unwrap();
    let config = pg_search_config(dir.path(), &url, 4, &target, "");
    let (relay, addr) = spawn_relay(&config);

    let mut acked: HashSet<String> = HashSet::new();
    let mut refused = 0;
    let mut n = 0;
    // Load before, during and after the outage; each answer is 202 or 503.
    let post = |acked: &mut HashSet<String>, refused: &mut usize, reply: Reply| match reply.status.as_u16() {
        202 => {
            acked.insert(reply.json()["id"].as_str().unwrap().to_string());
        }
        503 => *refused += 1,
        other => panic!("unexpected {other}: {}", reply.body.escape_ascii()),
    };
    for _ in 0..50 {
        n += 1;
        post(&mut acked, &mut refused, post_butter(addr, butter_page(n)).await);
    }
    assert_eq!((acked.len(), refused), (50, 0));

    cluster.kill();
    let down = Instant::now();
    for _ in 0..20 {
        n += 1;
        let reply = post_butter(addr, butter_page(n)).await;
        assert_eq!(reply.status, 503, "the database is down: {}", reply.body.escape_ascii());
        post(&mut acked, &mut refused, reply);
    }
    assert!(down.elapsed() < Duration::from_secs(10), "503s come at once, not after timeouts: {:?}", down.elapsed());
    // Down longer than an answer takes.
    tokio::time::sleep(Duration::from_millis(700).saturating_sub(down.elapsed())).await;

    cluster.restart();
    // The same relay process recovers by itself.
    let back = Instant::now();
    loop {
        n += 1;
        let reply = post_butter(addr, butter_page(n)).await;
        let ok = reply.status == 202;
        post(&mut acked, &mut refused, reply);
        if ok {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(20), "acks again after the database is back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..50 {
        n += 1;
        post(&mut acked, &mut refused, post_butter(addr, butter_page(n)).await);
    }
    assert_eq!(acked.len(), 101, "every webhook after recovery acked");

    // Everything acked arrives (those acked before the outage may arrive
    // twice: an attempt whose completion the outage lost is made again).
    let mut delivered: HashSet<String> = HashSet::new();
    let mut requests = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !acked.is_subset(&delivered) && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(r)) = tokio::time::timeout(left, target.received.recv()).await {
            delivered.insert(r.headers["webhook-id"].to_str().unwrap().to_string());
            requests += 1;
        }
    }
    let lost = acked.difference(&delivered).count();
    assert_eq!(lost, 0, "acked webhooks lost across a database restart");
    assert!(requests > acked.len(), "no attempt was at the target when the database went: nothing was repeated");

    // Each delivery is counted once, when its outcome is recorded: those
    // whose outcome the outage refused were attempted again, and counted
    // then (they were counted twice). An outcome committed as the database
    // went, its answer lost, is counted by none: at most the attempts
    // unrecorded at once (twice `concurrency`, 8).
    let counted = || async {
        let metrics = admin_call(relay.admin, http::Method::GET, "/metrics", None, "").await;
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        let line = r#"hookrelay_deliveries_total{outcome="delivered",target="search"} "#;
        text.lines().find_map(|l| l.strip_prefix(line)).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0)
    };
    eventually("every delivery recorded", || async { counted().await + 16 >= acked.len() }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = counted().await;
    assert!(n <= acked.len() && n + 16 >= acked.len(), "{n} counted, {requests} requests for {} webhooks", acked.len());
}
