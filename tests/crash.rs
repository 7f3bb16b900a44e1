//! Crash consistency: concurrent webhooks at the real binary, `kill -9` at
//! random moments (during group commits, deliveries and retention purges),
//! restarts; every request that got a 202 must reach every matching target.
//! Duplicates (a delivery in flight at a kill is made again) are counted and
//! reported.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// Kills per run; `HOOKRELAY_CRASH_KILLS` raises it for a long run.
fn kills() -> usize {
    std::env::var("HOOKRELAY_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

#[tokio::test]
async fn every_acked_webhook_reaches_every_target_across_kill_9() {
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let targets = format!(
        "  - {{ name: a, url: \"{url}\", headers: {{ X-Target: a }}, retry: {{ initial_backoff: 20ms, max_backoff: 200ms }}, circuit_breaker: {{ open_for: 200ms }} }}\n  - {{ name: b, url: \"{url}\", headers: {{ X-Target: b }}, retry: {{ initial_backoff: 20ms, max_backoff: 200ms }}, circuit_breaker: {{ open_for: 200ms }} }}\n",
        url = target.url("/")
    );
    let routes = "  - { source: buttercms, events: [\"*\"], targets: [a, b] }";
    let config = write_config(dir.path(), &relay_config(dir.path(), &targets, routes));

    let kills = kills();
    let (acked, sent) = kill_rounds(&config, kills, butter_page).await;

    // A last start: everything acked must arrive at both targets.
    let (mut child, _) = spawn_relay(&config);
    let mut outstanding: HashSet<(String, String)> =
        acked.iter().flat_map(|id| ["a", "b"].map(|t| (id.clone(), t.to_string()))).collect();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut note = |got: Received, outstanding: &mut HashSet<(String, String)>| {
        let key = (
            got.headers["webhook-id"].to_str().unwrap().to_string(),
            got.headers["x-target"].to_str().unwrap().to_string(),
        );
        outstanding.remove(&key);
        *seen.entry(key).or_default() += 1;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !outstanding.is_empty() {
        if Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "{} acked deliveries never arrived; {}",
                outstanding.len(),
                diagnose(dir.path(), &outstanding).await
            );
        }
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_secs(5), target.received.recv()).await {
            note(got, &mut outstanding);
        }
    }
    // Drain what else arrives, to count duplicates honestly.
    while let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(500), target.received.recv()).await {
        note(got, &mut outstanding);
    }
    // The stored counts came through every kill in step with the deliveries.
    drained(child.admin).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "crash run: {kills} kills, {sent} webhooks sent, {} acked, 0 lost, {duplicates} duplicate deliveries of {}",
        acked.len(),
        seen.len()
    );
    assert!(acked.len() > 20, "too few acked to mean anything: {}", acked.len());
    // A kill repeats at most the attempts not yet recorded at that moment:
    // those at the target (its concurrency, 8 by default) and those answered
    // and waiting for the store (as many again), for each of the 2 targets.
    let bound = kills * 2 * (2 * 8);
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates after {kills} kills: more than the {bound} attempts not yet recorded"
    );
}

/// `kills` rounds of 4 senders posting `body(n)` (a distinct `n` each) at a
/// relay started from `config`, each round ended by `kill -9` at a random
/// moment 150 to 700 ms in. Returns the ids acknowledged, and how many were sent.
async fn kill_rounds(
    config: &std::path::Path,
    kills: usize,
    body: impl Fn(usize) -> Vec<u8> + Send + Sync + Copy + 'static,
) -> (HashSet<String>, usize) {
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut sent = 0usize;
    for round in 0..kills {
        let (mut child, addr) = spawn_relay(config);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let senders: Vec<_> = (0..4)
            .map(|s| {
                let (acked, stop) = (acked.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 5_000 {
                        let reply = tokio::time::timeout(
                            Duration::from_secs(5),
                            try_post(addr, body(round * 1_000_000 + s * 100_000 + n)),
                        );
                        n += 1;
                        match reply.await {
                            Ok(Some((StatusCode::ACCEPTED, id))) => {
                                acked.lock().unwrap().insert(id);
                            }
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => break, // killed
                        }
                    }
                    n
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(150 + fastrand::u64(0..550))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in senders {
            sent += s.await.unwrap();
        }
    }
    let acked = acked.lock().unwrap().clone();
    (acked, sent)
}

/// One webhook on a fresh connection: the status and the id, or `None` when
/// the relay is gone.
async fn try_post(addr: std::net::SocketAddr, body: Vec<u8>) -> Option<(StatusCode, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.ok()?;
    tokio::spawn(conn);
    let resp = tx.send_request(request("/hooks/buttercms", &[("x-webhook-secret", BUTTER_SECRET)], body)).await.ok()?;
    let status = resp.status();
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.ok()?.to_bytes();
    let id = serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["id"].as_str().unwrap_or_default().to_string();
    Some((status, id))
}

/// What the store says about the deliveries that did not arrive.
async fn diagnose(dir: &std::path::Path, outstanding: &HashSet<(String, String)>) -> String {
    use hookrelay::store::{SledStore, Store};
    let store = SledStore::open(&dir.join("data"), 8 << 20).unwrap();
    let mut out = String::new();
    for t in ["a", "b"] {
        out += &format!("target {t}: {:?}; ", store.counts(t).await.unwrap());
    }
    for (id, target) in outstanding.iter().take(3) {
        let parsed = id.parse().unwrap();
        let stored = store.event(parsed).await.unwrap().is_some();
        let states: Vec<_> =
            store.deliveries(parsed).await.unwrap().into_iter().map(|d| (d.target, d.record.state)).collect();
        out += &format!("\n{id} to {target}: stored={stored} deliveries={states:?}");
    }
    out
}

/// A ButterCMS post.published body (routed to both targets below; pages go to `fast` only).
fn butter_post(n: usize) -> Vec<u8> {
    format!(
        r#"{{"data":{{"id":"post-{n}","status":"published"}},"webhook":{{"event":"post.published","target":"x"}}}}"#
    )
    .into_bytes()
}

/// Posts every body, `width` at a time; returns the ids, in order.
async fn post_all(addr: std::net::SocketAddr, bodies: Vec<Vec<u8>>, width: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(bodies.len());
    for wave in bodies.chunks(width) {
        let replies: Vec<_> =
            wave.iter().map(|b| tokio::spawn(tokio::time::timeout(WAIT, try_post(addr, b.clone())))).collect();
        for reply in replies {
            let (status, id) = reply.await.unwrap().expect("no answer in time").expect("relay gone");
            assert_eq!(status, StatusCode::ACCEPTED);
            ids.push(id);
        }
    }
    ids
}

/// Every event in the store is whole: its payload, and a delivery record for
/// each of its targets. Returns the ids stored.
async fn whole_events(store: &hookrelay::store::SledStore) -> HashSet<String> {
    use hookrelay::store::Store;
    let mut ids = HashSet::new();
    for (id, meta) in store.recent_events(None, 100_000).await.unwrap() {
        assert!(store.event(id).await.unwrap().is_some(), "{id} lost its payload");
        let targets: HashSet<String> = store.deliveries(id).await.unwrap().into_iter().map(|d| d.target).collect();
        assert_eq!(targets, meta.targets.iter().cloned().collect(), "{id} was purged by half");
        ids.insert(id.to_string());
    }
    ids
}

/// Waits (bounded) until both targets' queues are empty, as the admin API counts them.
async fn drained(admin: std::net::SocketAddr) {
    eventually("every queue drained", || async move {
        let targets = admin_call(admin, http::Method::GET, "/admin/targets", Some(ADMIN_TOKEN), "").await.json();
        targets["targets"].as_array().unwrap().iter().all(|t| t["queued"] == 0 && t["in_flight"] == 0)
    })
    .await;
}

#[tokio::test]
async fn kills_during_retention_purges_lose_nothing() {
    use hookrelay::store::{now_ms, SledStore, Store};
    const PAGES: usize = 3000;
    const POSTS: usize = 50;
    let mut fast = FakeTarget::start().await;
    // `held` is down until the end: its deliveries stay pending through every
    // purge. The port stays reserved (bound, not listening: connections are
    // refused) until its target starts.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let held_addr = reserved.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let targets = format!(
        "  - {{ name: fast, url: \"{}\" }}\n  - {{ name: held, url: \"http://{held_addr}/\", retry: {{ initial_backoff: 20ms, max_backoff: 200ms, max_attempts: 100, max_age: 1h }}, circuit_breaker: {{ open_for: 200ms }} }}\n",
        fast.url("/")
    );
    let routes = "  - { source: buttercms, events: [\"page.*\"], targets: [fast] }\n  - { source: buttercms, events: [\"post.*\"], targets: [fast, held] }";
    // A dedup window may not outlast the retention.
    let text = relay_config(dir.path(), &targets, routes)
        .replace("cache: \"8MiB\"", "cache: \"8MiB\", retention: 1s")
        .replace("format: buttercms", "format: buttercms\n    dedup_window: 1s");
    let config = write_config(dir.path(), &text);
    let open = || SledStore::open(&dir.path().join("data"), 8 << 20).unwrap();

    let (mut relay, addr) = spawn_relay(&config);
    let pages = post_all(addr, (0..PAGES).map(butter_page).collect(), 16).await;
    let posts = post_all(addr, (0..POSTS).map(butter_post).collect(), 16).await;
    let mut to_fast: HashSet<String> = pages.iter().chain(&posts).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !to_fast.is_empty() {
        assert!(Instant::now() < deadline, "{} deliveries to fast never arrived", to_fast.len());
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_secs(5), fast.received.recv()).await {
            to_fast.remove(got.headers["webhook-id"].to_str().unwrap());
        }
    }
    // A clean stop: every delivered state is on disk. Then retention passes.
    assert!(relay.terminate().success());
    drop(relay);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(whole_events(&{ open() }).await.len(), PAGES + POSTS);

    // Each start purges at once; kill it part-way, a little later each
    // round, until a kill has cut a purge short (and at least `kills()` times).
    let (mut rounds, mut cut_short) = (0u64, 0);
    while rounds < kills() as u64 || cut_short == 0 {
        assert!(rounds < kills() as u64 + 12, "no kill landed inside a purge in {rounds} rounds");
        let (mut relay, _) = spawn_relay(&config);
        tokio::time::sleep(Duration::from_millis(rounds * 10 + fastrand::u64(0..10))).await;
        relay.kill().unwrap();
        relay.wait().unwrap();
        drop(relay);
        let store = open();
        let left = whole_events(&store).await;
        store.close().await.unwrap();
        drop(store);
        for id in &posts {
            assert!(left.contains(id), "{id}, still pending for held, was purged");
        }
        if left.len() > POSTS && left.len() < PAGES + POSTS {
            cut_short += 1;
        }
        println!("purge kill {rounds}: {} of {PAGES} finished events purged", PAGES + POSTS - left.len());
        rounds += 1;
    }
    let left = whole_events(&{ open() }).await;

    // The held target comes up: every pending delivery arrives; a redelivery
    // to fast (its delivered state lost to a kill) is allowed, of a purged
    // event it is not.
    while fast.received.try_recv().is_ok() {}
    drop(reserved);
    let mut held = FakeTarget::start_at(held_addr).await;
    let (mut relay, _) = spawn_relay(&config);
    let mut pending: HashSet<String> = posts.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "{} held deliveries never arrived", pending.len());
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_secs(5), held.received.recv()).await {
            pending.remove(got.headers["webhook-id"].to_str().unwrap());
        }
    }
    drained(relay.admin).await;
    while let Ok(got) = fast.received.try_recv() {
        let id = got.headers["webhook-id"].to_str().unwrap();
        assert!(left.contains(id), "{id} was purged, then delivered again");
    }
    assert!(relay.terminate().success());
    drop(relay);

    // And the purge can still finish: everything is delivered, so everything goes.
    let store = open();
    let mut after = None;
    for _ in 0..100 {
        let (_, last) = store.purge(now_ms(), after, 1000).await.unwrap();
        after = last;
        if after.is_none() {
            break;
        }
    }
    assert!(after.is_none(), "the purge did not finish");
    assert!(store.recent_events(None, 10).await.unwrap().is_empty());
    for t in ["fast", "held"] {
        let c = store.counts(t).await.unwrap();
        assert_eq!((c.queued, c.dead), (0, 0), "{t}: {c:?}");
    }
    store.close().await.unwrap();
}

/// A page of one of 16 keys: `data.id` is the key, `timestamp` makes it unique.
fn keyed_page(key: usize, n: usize) -> Vec<u8> {
    format!(r#"{{"data":{{"id":"key-{key}","timestamp":"{n}","locale":null}},"webhook":{{"event":"page.published","target":"x"}}}}"#)
        .into_bytes()
}

/// `order_by` and `debounce` under the same random kills: every acked webhook
/// is delivered to the ordered target, and ends delivered or coalesced into
/// a delivered one at the debounced target; no webhook of a key first arrives
/// before an earlier one of its key did.
#[tokio::test]
async fn ordering_and_coalescing_hold_across_kill_9() {
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let common = "retry: { initial_backoff: 20ms, max_backoff: 200ms }, circuit_breaker: { open_for: 200ms }";
    let targets = format!(
        "  - {{ name: ord, url: \"{url}\", headers: {{ X-Target: ord }}, order_by: '.data.id', {common} }}\n  - {{ name: deb, url: \"{url}\", headers: {{ X-Target: deb }}, debounce: {{ window: 50ms, max_wait: 200ms, key: '.data.id' }}, {common} }}\n",
        url = target.url("/")
    );
    let routes = "  - { source: buttercms, events: [\"*\"], targets: [ord, deb] }";
    let config = write_config(dir.path(), &relay_config(dir.path(), &targets, routes));

    let kills = kills();
    let (acked, _) = kill_rounds(&config, kills, |n| keyed_page(n % 16, n)).await;

    let (mut child, _) = spawn_relay(&config);
    // First arrival of each webhook at `ord`, and the group deliveries at `deb`.
    let mut first_at: HashMap<String, Instant> = HashMap::new();
    let mut deb_delivered: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !acked.iter().all(|id| first_at.contains_key(id)) {
        assert!(Instant::now() < deadline, "acked webhooks never reached the ordered target");
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_secs(5), target.received.recv()).await {
            let id = got.headers["webhook-id"].to_str().unwrap().to_string();
            match got.headers["x-target"].to_str().unwrap() {
                "ord" => drop(first_at.entry(id).or_insert(got.at)),
                _ => drop(deb_delivered.insert(id)),
            }
        }
    }
    drained(child.admin).await;
    while let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(300), target.received.recv()).await {
        if got.headers["x-target"] == "deb" {
            deb_delivered.insert(got.headers["webhook-id"].to_str().unwrap().to_string());
        }
    }

    // Order: acked webhooks of one key first arrive in the order they were queued (their ids').
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    let mut coalesced = 0;
    for id in &acked {
        let ev = admin_call(child.admin, http::Method::GET, &format!("/admin/events/{id}"), Some(ADMIN_TOKEN), "")
            .await
            .json();
        let key = ev["payload"]["data"]["id"].as_str().unwrap().to_string();
        by_key.entry(key).or_default().push(id.clone());
        let deb = ev["deliveries"].as_array().unwrap().iter().find(|d| d["target"] == "deb").unwrap().clone();
        match deb["status"].as_str() {
            Some("delivered") => assert!(deb_delivered.contains(id), "{id} delivered to deb but never arrived"),
            Some("coalesced") => {
                let into = deb["into"].as_str().unwrap();
                assert!(deb_delivered.contains(into), "{id} coalesced into {into}, which never arrived");
                coalesced += 1;
            }
            other => panic!("{id} at deb: {other:?} {deb}"),
        }
    }
    for ids in by_key.values_mut() {
        ids.sort();
        for pair in ids.windows(2) {
            assert!(
                first_at[&pair[0]] <= first_at[&pair[1]],
                "{} arrived before the earlier {} of its key",
                pair[1],
                pair[0]
            );
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    println!(
        "ordering and coalescing crash run: {kills} kills, {} acked, 0 lost, {} debounce deliveries, {coalesced} coalesced",
        acked.len(),
        deb_delivered.len()
    );
    assert!(acked.len() > 20, "too few acked to mean anything: {}", acked.len());
}
