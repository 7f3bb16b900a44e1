//! Several `hookrelay serve` processes on one real PostgreSQL database are
//! one relay: any instance acks, every webhook is delivered, a killed
//! instance's deliveries are taken over. The database is a throwaway
//! cluster this test process starts (skipped, and said so, without
//! PostgreSQL's binaries).

mod common;
#[path = "../src/store/postgres/throwaway.rs"]
mod throwaway;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// A config for one of several instances sharing `url`.
fn instance_config(dir: &Path, url: &str, targets: &str, routes: &str) -> std::path::PathBuf {
    pg_config(dir, url, 8, targets, routes)
}

/// A config for instances with one target, `search` at `target` (with the
/// YAML lines `extra`), to which `page.*` webhooks go.
fn search_config(dir: &Path, url: &str, target: &FakeTarget, extra: &str) -> std::path::PathBuf {
    pg_search_config(dir, url, 8, target, extra)
}

/// `n` relay processes with `config`, and their ingress addresses.
fn spawn_instances(config: &Path, n: usize) -> (Vec<RelayProcess>, Vec<SocketAddr>) {
    (0..n).map(|_| spawn_relay(config)).unzip()
}

/// The database name in a throwaway cluster's URL.
fn database_of(url: &str) -> String {
    url.rsplit('/').next().and_then(|d| d.split('?').next()).unwrap().to_string()
}

/// The `webhook-id`s received, with how many times each came.
async fn collect(target: &mut FakeTarget, want: usize, limit: Duration) -> HashMap<String, usize> {
    collect_more(target, HashMap::new(), want, limit).await
}

/// [`collect`] on top of what was `seen` already.
async fn collect_more(
    target: &mut FakeTarget,
    mut seen: HashMap<String, usize>,
    want: usize,
    limit: Duration,
) -> HashMap<String, usize> {
    let deadline = Instant::now() + limit;
    while seen.len() < want && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, target.received.recv()).await {
            Ok(Some(r)) => {
                let id = r.headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                *seen.entry(id).or_default() += 1;
            }
            _ => break,
        }
    }
    seen
}

/// Posts `n` distinct webhooks round-robin to `addrs`; their event ids.
async fn post_all(addrs: &[SocketAddr], from: usize, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in from..from + n {
        let reply = post_butter(addrs[i % addrs.len()], butter_page(i)).await;
        assert_eq!(reply.status, 202, "webhook {i}: {}", reply.body.escape_ascii());
        ids.push(reply.json()["id"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_database_ack_and_deliver_every_webhook_once() {
    let Some(cluster) = throwaway::cluster("three_instances_on_one_database") else { return };
    let url = cluster.database();
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = search_config(dir.path(), &url, &target, "\n    concurrency: 4");
    // Three processes started at once on an empty database: one creates the
    // schema, the others wait for it and find it current.
    let relays: Vec<_> = std::thread::scope(|s| {
        let starting: Vec<_> = (0..3).map(|_| s.spawn(|| spawn_relay(&config))).collect();
        starting.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let addrs: Vec<SocketAddr> = relays.iter().map(|(_, a)| *a).collect();
    let migrations = hookrelay::store::SCHEMA_VERSION.to_string();
    assert_eq!(cluster.query(&database_of(&url), "select version from hr_schema"), migrations);

    let ids = post_all(&addrs, 0, 300).await;
    let seen = collect(&mut target, ids.len(), Duration::from_secs(30)).await;
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1), "{id} delivered exactly once (no instance died)");
    }
    // A copy of a webhook sent to another instance is the same event.
    let again = post_butter(addrs[1], butter_page(0)).await;
    assert_eq!(again.status, 200, "a duplicate across instances: {}", again.body.escape_ascii());
    assert_eq!(again.json()["id"].as_str(), Some(ids[0].as_str()));

    // One webhook acked by one instance is delivered within milliseconds,
    // whichever instance's worker takes it.
    for (n, addr) in addrs.iter().enumerate() {
        let sent = Instant::now();
        post_all(&[*addr], 1_000 + n, 1).await;
        let got = tokio::time::timeout(Duration::from_secs(5), target.received.recv()).await;
        assert!(got.is_ok(), "delivered");
        assert!(sent.elapsed() < Duration::from_secs(1), "delivered in {:?}", sent.elapsed());
    }
    // Every instance's admin API sees the cluster's events.
    for (process, _) in &relays {
        let events =
            admin_call(process.admin, http::Method::GET, "/admin/events?limit=500", Some(ADMIN_TOKEN), "").await;
        assert_eq!(events.json()["events"].as_array().map(Vec::len), Some(303));
    }
}

/// `kill -9` of one of two instances while both ack and deliver: every
/// webhook acked (by either) arrives; the dead one's leased deliveries are
/// attempted by the survivor once the leases expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_deliveries_are_taken_over_after_its_lease() {
    let Some(cluster) = throwaway::cluster("a_killed_instances_deliveries_are_taken_over") else { return };
    let url = cluster.database();
    let mut target = FakeTarget::start().await;
    // Slow answers, so that the killed instance has attempts in flight.
    target.always(Answer::status(200).delay(Duration::from_millis(300)));
    let dir = tempfile::tempdir().unwrap();
    let config = search_config(dir.path(), &url, &target, "\n    concurrency: 16\n    timeout: 1s");
    let (mut doomed, doomed_addr) = spawn_relay(&config);
    let (_survivor, survivor_addr) = spawn_relay(&config);

    // Load on both instances, before, during and after the kill.
    let load = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..300 {
            let addr = if i % 2 == 0 { doomed_addr } else { survivor_addr };
            // A post to the dead instance fails (its task panics): not acked.
            if let Ok(reply) = tokio::spawn(post_butter(addr, butter_page(i))).await {
                if reply.status == 202 {
                    acked.push(reply.json()["id"].as_str().unwrap().to_string());
                }
            }
        }
        acked
    });
    let started = collect(&mut target, 30, Duration::from_secs(10)).await;
    assert_eq!(started.len(), 30, "deliveries started");
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let acked = load.await.unwrap();
    assert!(acked.len() > 150, "the survivor kept acking: {}", acked.len());
    // The dead one's leases (2 × timeout + 10 s) expire and the survivor
    // takes them. (Some webhooks the dead one stored were never answered:
    // delivered, not acked.)
    let mut seen = started;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.iter().any(|id| !seen.contains_key(id)) && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(r)) = tokio::time::timeout(left, target.received.recv()).await else { break };
        *seen.entry(r.headers["webhook-id"].to_str().unwrap().to_string()).or_default() += 1;
    }
    let missing = acked.iter().filter(|id| !seen.contains_key(*id)).count();
    assert_eq!(missing, 0, "every acked webhook arrives after a kill -9");
    let repeated: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("kill -9 of one of two instances: {} acked, {repeated} deliveries repeated before the last acked one arrived (at-least-once)", acked.len());
    // On PostgreSQL a lease counts against the target's concurrency until
    // its outcome is committed, so an instance holds at most 16 unrecorded.
    assert!(repeated <= 16, "at most the attempts in flight (concurrency 16) are repeated: {repeated}");
}

/// `concurrency: 1` means one request at a time to the target, whichever
/// instance sends it; a rate limit is the cluster's, not each instance's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_and_rate_limit_hold_across_instances() {
    let Some(cluster) = throwaway::cluster("concurrency_and_rate_limit_hold_across_instances") else { return };
    let url = cluster.database();
    let mut build = FakeTarget::start().await;
    build.always(Answer::status(200).delay(Duration::from_millis(30)));
    let mut slack = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let targets = format!(
        "  - name: build\n    url: \"{}\"\n    concurrency: 1\n  - name: slack\n    url: \"{}\"\n    concurrency: 8\n    rate_limit: {{ per_second: 20, burst: 1 }}",
        build.url("/build"),
        slack.url("/slack")
    );
    let config = instance_config(
        dir.path(),
        &url,
        &targets,
        "  - { source: buttercms, events: [\"page.*\"], targets: [build, slack] }",
    );
    let (_relays, addrs) = spawn_instances(&config, 3);

    let ids = post_all(&addrs, 0, 30).await;
    let mut to_slack = HashMap::new();
    let (mut first, mut last) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while to_slack.len() < ids.len() && Instant::now() < deadline {
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(5), slack.received.recv()).await {
            first = first.or(Some(r.at));
            last = Some(r.at);
            to_slack.insert(r.headers["webhook-id"].to_str().unwrap().to_string(), ());
        }
    }
    let slack_took = last.zip(first).map(|(l, f)| l - f).unwrap_or_default();
    let to_build = collect(&mut build, ids.len(), Duration::from_secs(30)).await;
    assert_eq!((to_build.len(), to_slack.len()), (30, 30), "everything delivered to both");
    let most = build.max_in_flight.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(most, 1, "three instances, one build request at a time");
    // 30 at 20/s with a burst of 1: 1.45 s from the first to the last, not
    // a third of it (each instance at 20/s).
    assert!(slack_took >= Duration::from_millis(1_300), "the rate is the cluster's: 30 sent in {slack_took:?}");
}

/// A pause on one instance holds the target on every instance, and a
/// resume on another releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_on_one_instance_holds_the_target_on_all() {
    let Some(cluster) = throwaway::cluster("a_pause_on_one_instance_holds_the_target_on_all") else { return };
    let url = cluster.database();
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = search_config(dir.path(), &url, &target, "");
    let (a, _) = spawn_relay(&config);
    let (b, b_addr) = spawn_relay(&config);
    let paused = admin_call(a.admin, http::Method::POST, "/admin/targets/search/pause", Some(ADMIN_TOKEN), "").await;
    assert_eq!(paused.status, 200);
    let is_paused = |admin: SocketAddr| async move {
        let targets = admin_call(admin, http::Method::GET, "/admin/targets", Some(ADMIN_TOKEN), "").await.json();
        targets["targets"][0]["paused"].as_bool() == Some(true)
    };
    eventually("b hears of the pause", || is_paused(b.admin)).await;
    let ids = post_all(&[b_addr], 0, 5).await;
    target.nothing_for(Duration::from_millis(500)).await;
    let resumed = admin_call(b.admin, http::Method::POST, "/admin/targets/search/resume", Some(ADMIN_TOKEN), "").await;
    assert_eq!(resumed.status, 200);
    let seen = collect(&mut target, ids.len(), Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 5, "released by the resume on the other instance");
    eventually("a hears of the resume", || async { !is_paused(a.admin).await }).await;
    // Pauses and resumes in quick succession settle as the last one said,
    // on both, and stay so (an instance applies what it hears without
    // writing and telling it again).
    for _ in 0..3 {
        for action in ["pause", "resume"] {
            let path = format!("/admin/targets/search/{action}");
            assert_eq!(admin_call(a.admin, http::Method::POST, &path, Some(ADMIN_TOKEN), "").await.status, 200);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!is_paused(a.admin).await && !is_paused(b.admin).await, "resumed on both");
    assert_eq!(cluster.query(&database_of(&url), "select count(*) from hr_paused"), "0");
    let after = post_all(&[b_addr], 100, 3).await;
    assert_eq!(collect(&mut target, after.len(), Duration::from_secs(10)).await.len(), 3);
}

/// A 429's `Retry-After` is the target's limit on every instance: the one
/// it answered tells the others, which wait too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429s_retry_after_holds_every_instance() {
    let Some(cluster) = throwaway::cluster("a_429s_retry_after_holds_every_instance") else { return };
    let url = cluster.database();
    let mut target = FakeTarget::start().await;
    target.script([Answer::status(429).header("retry-after", "3")]);
    let dir = tempfile::tempdir().unwrap();
    let config = search_config(dir.path(), &url, &target, "");
    let (_a, a_addr) = spawn_relay(&config);
    let (_b, b_addr) = spawn_relay(&config);
    let mut ids = post_all(&[a_addr], 0, 1).await;
    target.next().await;
    // Either instance may have sent it; the other hears within milliseconds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ids.extend(post_all(&[b_addr], 1, 1).await);
    target.nothing_for(Duration::from_millis(1_200)).await;
    let seen = collect(&mut target, ids.len(), Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 2, "both delivered once the wait is over");
}

/// A pause the database refuses to save is answered 503 and not applied:
/// reported as done, it would have held this instance only, and been gone
/// after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_that_cannot_be_saved_is_refused() {
    let Some(cluster) = throwaway::cluster("a_pause_that_cannot_be_saved_is_refused") else { return };
    let url = cluster.database();
    let dir = tempfile::tempdir().unwrap();
    let targets = "  - name: search\n    url: \"http://127.0.0.1:9/\"";
    let config =
        instance_config(dir.path(), &url, targets, "  - { source: buttercms, events: [\"*\"], targets: [search] }");
    let (relay, _) = spawn_relay(&config);
    let db = database_of(&url);
    cluster.query(&db, "ALTER TABLE hr_paused ADD CONSTRAINT hr_test_refuse CHECK (target <> 'search')");
    let pause = || admin_call(relay.admin, http::Method::POST, "/admin/targets/search/pause", Some(ADMIN_TOKEN), "");
    let refused = pause().await;
    assert_eq!(refused.status, 503, "{}", refused.body.escape_ascii());
    assert!(String::from_utf8_lossy(&refused.body).contains("cannot save the pause"));
    let targets = admin_call(relay.admin, http::Method::GET, "/admin/targets", Some(ADMIN_TOKEN), "").await.json();
    assert_eq!(targets["targets"][0]["paused"], false, "not applied either");
    cluster.query(&db, "ALTER TABLE hr_paused DROP CONSTRAINT hr_test_refuse");
    assert_eq!(pause().await.status, 200);
    assert_eq!(cluster.query(&db, "select target from hr_paused"), "search");
}

/// A ButterCMS page.published body for page `key`, the `n`th sent.
fn page(key: &str, n: usize) -> Vec<u8> {
    format!(r#"{{"data":{{"id":"{key}","n":{n}}},"webhook":{{"event":"page.published","target":"x"}}}}"#).into_bytes()
}

/// `order_by` and `debounce` are the cluster's: webhooks of one page posted
/// to three instances in turn arrive in the order posted, whichever
/// instance delivers each; a burst posted to three instances is one build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_and_coalescing_hold_across_instances() {
    let Some(cluster) = throwaway::cluster("ordering_and_coalescing_hold_across_instances") else { return };
    let url = cluster.database();
    let mut search = FakeTarget::start().await;
    // Some failures, so that retries interleave with the other keys (the
    // circuit stays closed: an instance opening it would hold all three).
    search.script((0..6).map(|_| Answer::status(503)));
    search.always(Answer::status(200).delay(Duration::from_millis(5)));
    let mut site = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let targets = format!(
        "  - name: search\n    url: \"{}\"\n    order_by: '.data.id'\n    retry: {{ initial_backoff: 20ms, max_backoff: 50ms }}\n    circuit_breaker: {{ failure_threshold: 100 }}\n  - name: site\n    url: \"{}\"\n    debounce: {{ window: 1s, max_wait: 10s }}",
        search.url("/reindex"),
        site.url("/build")
    );
    let config = instance_config(
        dir.path(),
        &url,
        &targets,
        "  - { source: buttercms, events: [\"page.*\"], targets: [search, site] }",
    );
    let (_relays, addrs) = spawn_instances(&config, 3);

    let keys = ["home", "about", "pricing"];
    let mut posted: HashMap<&str, Vec<String>> = HashMap::new();
    for n in 0..30 {
        let key = keys[n % keys.len()];
        let reply =
            post(addrs[n % addrs.len()], "/hooks/buttercms", &[("x-webhook-secret", BUTTER_SECRET)], page(key, n))
                .await;
        assert_eq!(reply.status, 202, "{}", reply.body.escape_ascii());
        posted.entry(key).or_default().push(reply.json()["id"].as_str().unwrap().to_string());
    }
    // Per key: the successful deliveries in the order posted.
    let mut delivered: HashMap<String, Vec<String>> = HashMap::new();
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while done < 30 && Instant::now() < deadline {
        let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(5), search.received.recv()).await else { break };
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let key = body["data"]["id"].as_str().unwrap().to_string();
        let id = r.headers["webhook-id"].to_str().unwrap().to_string();
        let ids = delivered.entry(key).or_default();
        // A retry of the same delivery repeats it; anything else is next.
        if ids.last() != Some(&id) {
            ids.push(id);
            done += 1;
        }
    }
    for key in keys {
        assert_eq!(delivered.get(key), posted.get(key), "page {key}: in the order posted, across instances");
    }
    // The 30 webhooks were one burst for the site: one build of the newest.
    let build = tokio::time::timeout(Duration::from_secs(15), site.received.recv()).await.unwrap().unwrap();
    assert_eq!(build.headers["x-hookrelay-coalesced"], "30");
    assert_eq!(build.headers["webhook-id"], posted["pricing"].last().unwrap().as_str(), "the newest event");
    site.nothing_for(Duration::from_millis(1_500)).await;
}

/// With the database unreachable, `serve` stops at once and says which
/// database and why, without the password.
#[test]
fn serve_names_an_unreachable_database_and_exits() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://relay:hunter2@127.0.0.1:{port}/relay?sslmode=disable");
    let config = instance_config(
        dir.path(),
        &url,
        "  - name: search\n    url: \"http://127.0.0.1:9/\"",
        "  - { source: buttercms, events: [\"*\"], targets: [search] }",
    );
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("postgres 127.0.0.1:{port} database relay")), "{said}");
    assert!(said.to_lowercase().contains("connection refused"), "{said}");
    assert!(!said.contains("hunter2"), "{said}");
}

/// Bodies are never logged, even with `RUST_LOG=debug`: tokio-postgres
/// writes each statement's parameters (the webhook's body among them, as
/// its bytes) at debug level, and those lines are dropped. Its other debug
/// lines still come, so the level is in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debug_log_holds_no_webhook_body() {
    let Some(cluster) = throwaway::cluster("a_debug_log_holds_no_webhook_body") else { return };
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = search_config(dir.path(), &cluster.database(), &target, "");
    let lines = log_of_a_marked_webhook(&config, &mut target, "debug").await;
    assert!(lines.iter().any(|l| l.contains("tokio_postgres") && l.contains("DEBUG")), "debug lines are written");
}

/// An `order_by` key PostgreSQL could not store as it is (a NUL in it, or
/// longer than an index entry may be) is stored as its digest: the webhook
/// is acked, and does not fail the round of every webhook beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_postgres_cannot_index_does_not_fail_its_round() {
    let Some(cluster) = throwaway::cluster("a_key_postgres_cannot_index_does_not_fail_its_round") else { return };
    let dir = tempfile::tempdir().unwrap();
    let targets = "  - name: search\n    url: \"http://127.0.0.1:9/\"\n    order_by: '.data.id'";
    let routes = "  - { source: buttercms, events: [\"*\"], targets: [search] }";
    let config = instance_config(dir.path(), &cluster.database(), targets, routes);
    let (_relay, addr) = spawn_relay(&config);
    let long = "k".repeat(3_000);
    for id in ["a\\u0000b", long.as_str()] {
        let body = format!(r#"{{"data":{{"id":"{id}","locale":null}},"webhook":{{"event":"page.published"}}}}"#);
        let reply = post_butter(addr, body).await;
        assert_eq!(reply.status, 202, "{}", reply.body.escape_ascii());
    }
}

/// A circuit is the cluster's: an instance started while another's circuit
/// is open sends nothing to the target until `open_for` has passed; then
/// one probe goes, from one instance, and nothing else while it is out; its
/// success closes the circuit for all. (Before, the new instance sent at
/// once, and each instance probed on its own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_is_the_clusters_and_one_instance_probes() {
    let Some(cluster) = throwaway::cluster("an_open_circuit_is_the_clusters") else { return };
    let url = cluster.database();
    let mut target = FakeTarget::start().await;
    target.script([Answer::status(500), Answer::status(500), Answer::status(200).delay(Duration::from_millis(600))]);
    let dir = tempfile::tempdir().unwrap();
    let extra = "\n    retry: { initial_backoff: 10ms, max_backoff: 10ms }\n    circuit_breaker: { failure_threshold: 2, open_for: 3s }";
    let config = search_config(dir.path(), &url, &target, extra);
    let (_a, a_addr) = spawn_relay(&config);
    let mut ids = post_all(&[a_addr], 0, 1).await;
    target.next().await;
    let opened = target.next().await.at; // the second failure opens a's circuit
                                         // An instance started while it is open, and webhooks posted to it.
    let (_b, b_addr) = spawn_relay(&config);
    ids.extend(post_all(&[b_addr], 1, 3).await);
    let probe = target.next().await;
    assert!(
        probe.at >= opened + Duration::from_millis(2_900),
        "a request {:?} after the circuit opened, before open_for",
        probe.at - opened
    );
    let after = target.next().await;
    assert!(
        after.at >= probe.at + Duration::from_millis(550),
        "a second request {:?} after the probe, while it was out",
        after.at - probe.at
    );
    let seen = collect(&mut target, ids.len() - 2, Duration::from_secs(10)).await;
    let mut delivered: Vec<String> = seen.into_keys().collect();
    for r in [&probe, &after] {
        delivered.push(r.headers["webhook-id"].to_str().unwrap().to_string());
    }
    for id in &ids {
        assert!(delivered.contains(id), "{id} delivered once the probe succeeded");
    }
}
