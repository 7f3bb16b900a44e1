//! `debounce` and `order_by` (README, "Coalescing and ordering") against the
//! real relay and real HTTP targets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::Value;

fn page(id: &str, kind: &str, n: usize) -> Vec<u8> {
    format!(r#"{{"data":{{"id":"{id}","page_type":"{kind}","timestamp":"t{n}","locale":null}},"webhook":{{"event":"page.published","target":"x"}}}}"#).into_bytes()
}

async fn post_id(t: &TestRelay, body: Vec<u8>) -> String {
    let reply = post_butter(t.addr, body).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    reply.json()["id"].as_str().unwrap().to_string()
}

async fn event_json(t: &TestRelay, id: &str) -> Value {
    let reply =
        admin_call(t.relay.admin_addr, Method::GET, &format!("/admin/events/{id}"), Some(ADMIN_TOKEN), "").await;
    reply.json()
}

async fn metrics(t: &TestRelay) -> String {
    String::from_utf8(admin_call(t.relay.admin_addr, Method::GET, "/metrics", None, "").await.body.to_vec()).unwrap()
}

fn debounced(url: &str, window: &str, max_wait: &str, key: Option<&str>) -> String {
    let key = key.map(|k| format!(", key: '{k}'")).unwrap_or_default();
    format!(
        "  - name: site\n    url: \"{url}\"\n    retry: {{ initial_backoff: 50ms, max_backoff: 100ms }}\n    debounce: {{ window: {window}, max_wait: {max_wait}{key} }}\n"
    )
}

const ROUTE: &str = "  - { source: buttercms, events: [\"*\"], targets: [site] }";

#[tokio::test]
async fn a_burst_becomes_one_delivery_of_the_newest_event() {
    let mut site = FakeTarget::start().await;
    let t = start_relay(&debounced(&site.url("/build"), "300ms", "5s", None), ROUTE).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(post_id(&t, page(&format!("p{n}"), "landing", n)).await);
    }
    let got = site.next().await;
    assert_eq!(got.headers["webhook-id"], ids[4].as_str(), "the newest is sent");
    assert_eq!(got.headers["x-hookrelay-coalesced"], "5");
    assert_eq!(got.body.as_ref(), page("p4", "landing", 4).as_slice());
    site.nothing_for(Duration::from_millis(600)).await;
    for id in &ids[..4] {
        let d = &event_json(&t, id).await["deliveries"][0];
        assert_eq!(d["status"], "coalesced", "{d}");
        assert_eq!(d["into"], ids[4].as_str());
    }
    let text = metrics(&t).await;
    assert!(text.contains(r#"hookrelay_deliveries_total{outcome="coalesced",target="site"} 4"#), "{text}");
}

#[tokio::test]
async fn a_steady_trickle_is_cut_by_max_wait() {
    let mut site = FakeTarget::start().await;
    let t = start_relay(&debounced(&site.url("/build"), "400ms", "1s", None), ROUTE).await;
    let started = Instant::now();
    let mut n = 0;
    // One every 100 ms for 2.5 s: never quiet for 400 ms.
    while started.elapsed() < Duration::from_millis(2_500) {
        post_id(&t, page(&format!("p{n}"), "landing", n)).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = site.next().await;
    let second = site.next().await;
    let firsts: u32 = first.headers["x-hookrelay-coalesced"].to_str().unwrap().parse().unwrap();
    assert!(first.at.duration_since(started) < Duration::from_millis(1_600), "max_wait cuts the first group");
    assert!((5..n).contains(&(firsts as usize)), "{firsts} of {n}");
    let mut total = firsts + second.headers["x-hookrelay-coalesced"].to_str().unwrap().parse::<u32>().unwrap();
    while (total as usize) < n {
        total += site.next().await.headers["x-hookrelay-coalesced"].to_str().unwrap().parse::<u32>().unwrap();
    }
    assert_eq!(total as usize, n, "every event is in exactly one group");
}

#[tokio::test]
async fn groups_are_per_key() {
    let mut site = FakeTarget::start().await;
    let t = start_relay(&debounced(&site.url("/build"), "300ms", "5s", Some(".data.page_type")), ROUTE).await;
    for n in 0..3 {
        post_id(&t, page(&format!("l{n}"), "landing", n)).await;
        post_id(&t, page(&format!("b{n}"), "blog", n)).await;
    }
    let (a, b) = (site.next().await, site.next().await);
    let mut bodies =
        [a, b].map(|r| (String::from_utf8(r.body.to_vec()).unwrap(), r.headers["x-hookrelay-coalesced"].clone()));
    bodies.sort_by(|x, y| x.0.cmp(&y.0));
    assert!(bodies[0].0.contains(r#""id":"b2""#) && bodies[1].0.contains(r#""id":"l2""#), "{bodies:?}");
    assert!(bodies.iter().all(|(_, n)| n == "3"));
    site.nothing_for(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_failed_group_attempt_is_retried_while_new_events_form_the_next_group() {
    let mut site = FakeTarget::start().await;
    site.script([Answer::status(500).delay(Duration::from_millis(400))]);
    let t = start_relay(&debounced(&site.url("/build"), "200ms", "5s", None), ROUTE).await;
    let mut first = Vec::new();
    for n in 0..3 {
        first.push(post_id(&t, page(&format!("a{n}"), "landing", n)).await);
    }
    let failed = site.next().await;
    assert_eq!(failed.headers["webhook-id"], first[2].as_str());
    // While that attempt is out and retried, two more events form the next group.
    let second = [post_id(&t, page("b0", "landing", 10)).await, post_id(&t, page("b1", "landing", 11)).await];
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = site.next().await;
        seen.push((
            r.headers["webhook-id"].to_str().unwrap().to_string(),
            r.headers["x-hookrelay-coalesced"].to_str().unwrap().to_string(),
        ));
    }
    // The groups of one key in order: the second waits for the first's retry.
    let expected = vec![(first[2].clone(), "3".to_string()), (second[1].clone(), "2".to_string())];
    assert_eq!(seen, expected, "the first group's retry, then the second group, each once");
    site.nothing_for(Duration::from_millis(500)).await;
}

/// A target ordered by page id; `retry`: its retry settings.
fn ordered(url: &str, retry: &str) -> String {
    format!("  - name: site\n    url: \"{url}\"\n    order_by: '.data.id'\n    retry: {{ {retry} }}\n")
}

const FAST: &str = "initial_backoff: 100ms, max_backoff: 200ms";

/// A fails twice; B (same key) waits for A's success; C (another key) is
/// delivered at once. A's failures ask for a retry a second later
/// (`Retry-After`), so that C's turn comes between them.
#[tokio::test]
async fn ordering_holds_under_retries() {
    let mut site = FakeTarget::start().await;
    let busy = || Answer::status(503).header("retry-after", "1");
    site.script([busy(), Answer::status(200), busy()]);
    let t = start_relay(&ordered(&site.url("/"), "initial_backoff: 100ms, max_backoff: 5s"), ROUTE).await;
    let a = post_id(&t, page("k1", "x", 1)).await;
    assert_eq!(site.next().await.headers["webhook-id"], a.as_str(), "A's first attempt fails");
    let b = post_id(&t, page("k1", "x", 2)).await;
    let c = post_id(&t, page("k2", "x", 3)).await;
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(site.next().await.headers["webhook-id"].to_str().unwrap().to_string());
    }
    assert_eq!(
        order,
        [c.clone(), a.clone(), a.clone(), b.clone()],
        "C at once; A twice more; B only after A's success"
    );
    site.nothing_for(Duration::from_millis(300)).await;
}

/// A dies (max_attempts 1): B is released. A replayed is queued behind what
/// is queued of its key at that moment.
#[tokio::test]
async fn ordering_holds_under_dead_letters_and_replay() {
    let mut site = FakeTarget::start().await;
    site.script([Answer::status(500), Answer::status(200).delay(Duration::from_millis(300))]);
    let t = start_relay(&ordered(&site.url("/"), &format!("{FAST}, max_attempts: 1")), ROUTE).await;
    let a = post_id(&t, page("k1", "x", 1)).await;
    let b = post_id(&t, page("k1", "x", 2)).await;
    assert_eq!(site.next().await.headers["webhook-id"], a.as_str());
    // B is released by A's death, and answered slowly: replay A meanwhile
    // (named twice: replayed once).
    assert_eq!(site.next().await.headers["webhook-id"], b.as_str());
    let body = format!(r#"{{"ids":["{a}","{a}"]}}"#);
    let replay =
        admin_call(t.relay.admin_addr, Method::POST, "/admin/dead-letters/replay", Some(ADMIN_TOKEN), &body).await;
    assert_eq!(replay.json()["replayed"], 1);
    let again = site.next().await;
    assert_eq!(again.headers["webhook-id"], a.as_str(), "the replayed A, once B is delivered");
    eventually("A delivered", || async { event_json(&t, &a).await["deliveries"][0]["status"] == "delivered" }).await;
}

/// "Replay all" requeues a key's dead letters oldest first, though the
/// store lists them newest first: A is sent again before B.
#[tokio::test]
async fn replaying_all_dead_letters_keeps_a_keys_order() {
    let mut site = FakeTarget::start().await;
    site.script([Answer::status(500), Answer::status(500)]);
    let t = start_relay(&ordered(&site.url("/"), &format!("{FAST}, max_attempts: 1")), ROUTE).await;
    let a = post_id(&t, page("k1", "x", 1)).await;
    let b = post_id(&t, page("k1", "x", 2)).await;
    assert_eq!(site.next().await.headers["webhook-id"], a.as_str());
    assert_eq!(site.next().await.headers["webhook-id"], b.as_str());
    eventually("both dead", || async { event_json(&t, &b).await["deliveries"][0]["status"] == "dead" }).await;
    let replay =
        admin_call(t.relay.admin_addr, Method::POST, "/admin/dead-letters/replay", Some(ADMIN_TOKEN), "{}").await;
    assert_eq!(replay.json()["replayed"], 2);
    assert_eq!(site.next().await.headers["webhook-id"], a.as_str(), "the older one first");
    assert_eq!(site.next().await.headers["webhook-id"], b.as_str());
}

#[tokio::test]
async fn held_deliveries_show_in_the_admin_api_and_metrics() {
    let mut site = FakeTarget::start().await;
    site.always(Answer::status(500));
    let t = start_relay(&ordered(&site.url("/"), "initial_backoff: 2s, max_backoff: 2s"), ROUTE).await;
    let a = post_id(&t, page("k1", "x", 1)).await;
    let b = post_id(&t, page("k1", "x", 2)).await;
    site.next().await;
    let d = &event_json(&t, &b).await["deliveries"][0];
    assert_eq!((d["status"].as_str(), d["waiting_for"].as_str()), (Some("pending"), Some(a.as_str())), "{d}");
    let targets = admin_call(t.relay.admin_addr, Method::GET, "/admin/targets", Some(ADMIN_TOKEN), "").await.json();
    assert_eq!(targets["targets"][0]["held"], 1, "{targets}");
    eventually("the held gauge", || async {
        metrics(&t).await.contains(r#"hookrelay_held_deliveries{target="site"} 1"#)
    })
    .await;
}

/// Removing `order_by` by a reload while a key's deliveries are held: the
/// held one is still released by the one before it; a new event of that key
/// is not held. Adding `debounce` then groups only events stored after it.
#[tokio::test]
async fn a_reload_applies_to_events_stored_after_it_and_leaves_none_waiting() {
    let mut site = FakeTarget::start().await;
    let busy = || Answer::status(503).header("retry-after", "1");
    site.script([busy()]);
    let t = start_relay(&ordered(&site.url("/"), "initial_backoff: 100ms, max_backoff: 5s"), ROUTE).await;
    let a = post_id(&t, page("k1", "x", 1)).await;
    assert_eq!(site.next().await.headers["webhook-id"], a.as_str(), "A fails, retried in 1 s");
    let b = post_id(&t, page("k1", "x", 2)).await;

    let plain = format!("  - name: site\n    url: \"{}\"\n", site.url("/"));
    let path = write_config(t.dir.path(), &relay_config(t.dir.path(), &plain, ROUTE));
    t.relay.reload(hookrelay::config::load(&path).unwrap()).await.unwrap();
    let c = post_id(&t, page("k1", "x", 3)).await;
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(site.next().await.headers["webhook-id"].to_str().unwrap().to_string());
    }
    assert_eq!(order, [c, a.clone(), b.clone()], "C is not held; B still waits for A");

    let grouped = debounced(&site.url("/"), "200ms", "5s", None);
    let path = write_config(t.dir.path(), &relay_config(t.dir.path(), &grouped, ROUTE));
    t.relay.reload(hookrelay::config::load(&path).unwrap()).await.unwrap();
    let ids = [post_id(&t, page("g1", "x", 4)).await, post_id(&t, page("g2", "x", 5)).await];
    let got = site.next().await;
    assert_eq!(
        (got.headers["webhook-id"].to_str().unwrap(), got.headers["x-hookrelay-coalesced"].to_str().unwrap()),
        (ids[1].as_str(), "2")
    );
    site.nothing_for(Duration::from_millis(400)).await;
}
