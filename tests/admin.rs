//! The admin listener (README, "Operating hookrelay"): health, metrics, and every `/admin/*` endpoint.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use hookrelay::store::DeliveryState;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

async fn call(t: &TestRelay, method: Method, path: &str, token: Option<&str>, body: &str) -> Reply {
    admin_call(t.relay.admin_addr, method, path, token, body).await
}

async fn get(t: &TestRelay, path: &str) -> Reply {
    call(t, Method::GET, path, Some(ADMIN_TOKEN), "").await
}

async fn post_admin(t: &TestRelay, path: &str, body: &str) -> Reply {
    call(t, Method::POST, path, Some(ADMIN_TOKEN), body).await
}

fn one_target(url: &str) -> (String, String) {
    (
        format!("  - name: search\n    url: \"{url}\"\n    retry: {{ initial_backoff: 20ms, max_backoff: 50ms }}\n"),
        "  - { source: buttercms, events: [\"*\"], targets: [search] }".to_string(),
    )
}

async fn delivered_id(t: &TestRelay, target: &mut FakeTarget, n: usize) -> String {
    let reply = post_butter(t.addr, butter_page(n)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let id = reply.json()["id"].as_str().unwrap().to_string();
    assert_eq!(target.next().await.headers["webhook-id"], id.as_str());
    id
}

#[tokio::test]
async fn health_readiness_and_metrics_are_open() {
    let t = start().await;
    let health = call(&t, Method::GET, "/healthz", None, "").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(call(&t, Method::GET, "/readyz", None, "").await.status, StatusCode::OK);
    let metrics = call(&t, Method::GET, "/metrics", None, "").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert!(String::from_utf8_lossy(&metrics.body).contains("hookrelay_circuit_state"));
    assert_eq!(call(&t, Method::GET, "/nothing", None, "").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn admin_needs_the_bearer_token() {
    let t = start().await;
    for token in [None, Some("wrong"), Some("test-admin-token-012345678")] {
        let r = call(&t, Method::GET, "/admin/targets", token, "").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(r.json(), serde_json::json!({ "error": "unauthorized" }));
    }
    assert_eq!(get(&t, "/admin/targets").await.status, StatusCode::OK);
}

#[tokio::test]
async fn admin_is_absent_without_a_token() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "", "").replace(&format!(", token: \"{ADMIN_TOKEN}\""), "");
    let settings = hookrelay::config::load(&write_config(dir.path(), &text)).unwrap();
    assert!(settings.admin.token.is_none());
    let relay = hookrelay::app::Relay::start(settings).await.unwrap();
    let t = TestRelay { addr: relay.ingress_addr, store: relay.store.clone(), relay, dir };
    assert_eq!(call(&t, Method::GET, "/admin/targets", Some(ADMIN_TOKEN), "").await.status, StatusCode::NOT_FOUND);
    assert_eq!(call(&t, Method::GET, "/metrics", None, "").await.status, StatusCode::OK);
}

#[tokio::test]
async fn targets_list_their_state() {
    let mut target = FakeTarget::start().await;
    let (targets, routes) = one_target(&target.url("/"));
    let t = start_relay(&targets, &routes).await;
    delivered_id(&t, &mut target, 1).await;
    let r = get(&t, "/admin/targets").await;
    assert_eq!(r.status, StatusCode::OK);
    let list = r.json()["targets"].clone();
    assert_eq!(list[0]["name"], "search");
    for key in ["queued", "in_flight", "dead"] {
        assert!(list[0][key].is_u64(), "{key}: {list}");
    }
    assert_eq!(list[0]["circuit"], "closed");
    assert_eq!(list[0]["paused"], false);
}

#[tokio::test]
async fn pause_holds_the_queue_and_resume_releases_it() {
    let mut target = FakeTarget::start().await;
    let (targets, routes) = one_target(&target.url("/"));
    let t = start_relay(&targets, &routes).await;
    let r = post_admin(&t, "/admin/targets/search/pause", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["paused"], true);
    eventually("paused", || async { get(&t, "/admin/targets").await.json()["targets"][0]["paused"] == true }).await;
    assert_eq!(post_butter(t.addr, butter_page(1)).await.status, StatusCode::ACCEPTED);
    target.nothing_for(Duration::from_millis(400)).await;
    assert_eq!(get(&t, "/admin/targets").await.json()["targets"][0]["queued"], 1);
    assert_eq!(post_admin(&t, "/admin/targets/search/resume", "").await.status, StatusCode::OK);
    target.next().await;
    assert_eq!(post_admin(&t, "/admin/targets/nowhere/pause", "").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn events_list_newest_first_and_show_payload_and_attempts() {
    let mut target = FakeTarget::start().await;
    let (targets, routes) = one_target(&target.url("/"));
    let t = start_relay(&targets, &routes).await;
    let first = delivered_id(&t, &mut target, 1).await;
    let second = delivered_id(&t, &mut target, 2).await;
    let list = get(&t, "/admin/events?source=buttercms&limit=10").await.json();
    assert_eq!(list["events"][0]["id"], second.as_str());
    assert_eq!(list["events"][1]["id"], first.as_str());
    assert_eq!(get(&t, "/admin/events?limit=1").await.json()["events"].as_array().unwrap().len(), 1);
    assert!(get(&t, "/admin/events?source=cometcms").await.json()["events"].as_array().unwrap().is_empty());

    eventually("delivered", || async {
        get(&t, &format!("/admin/events/{first}")).await.json()["deliveries"][0]["status"] == "delivered"
    })
    .await;
    let ev = get(&t, &format!("/admin/events/{first}")).await.json();
    assert_eq!(ev["event"], "page.published");
    assert_eq!(ev["payload"]["data"]["id"], "page-1");
    let d = &ev["deliveries"][0];
    assert_eq!(d["target"], "search");
    assert_eq!(d["attempts"][0]["status"], 200);
    assert!(d["attempts"][0]["at"].is_string() && d["attempts"][0]["duration_ms"].is_u64());

    // The payload as received, too: a key given twice and an integer past
    // what a browser's numbers hold, which the parsed form cannot show.
    let body = r#"{"data":{"id":"twice","id":"page-9","n":9007199254740993},"webhook":{"event":"page.published"}}"#;
    let id = post_butter(t.addr, body).await.json()["id"].as_str().unwrap().to_string();
    let ev = get(&t, &format!("/admin/events/{id}")).await.json();
    assert_eq!(ev["payload_text"], body);
}

#[tokio::test]
async fn redeliver_sends_the_event_again_with_the_same_id() {
    let mut target = FakeTarget::start().await;
    let (targets, routes) = one_target(&target.url("/"));
    let t = start_relay(&targets, &routes).await;
    let id = delivered_id(&t, &mut target, 1).await;
    eventually("delivered", || async {
        get(&t, &format!("/admin/events/{id}")).await.json()["deliveries"][0]["status"] == "delivered"
    })
    .await;
    let r = post_admin(&t, &format!("/admin/events/{id}/redeliver"), "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["redelivered"], serde_json::json!(["search"]));
    let again = target.next().await;
    assert_eq!(again.headers["webhook-id"], id.as_str());
    assert_eq!(again.headers["x-hookrelay-attempt"], "2");
    let r = post_admin(&t, &format!("/admin/events/{id}/redeliver?target=cache"), "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed() {
    let mut target = FakeTarget::start().await;
    target.script([Answer::status(400)]);
    let (targets, routes) = one_target(&target.url("/"));
    let t = start_relay(&targets, &routes).await;
    let id = delivered_id(&t, &mut target, 1).await;
    eventually("dead", || async {
        !get(&t, "/admin/dead-letters").await.json()["dead_letters"].as_array().unwrap().is_empty()
    })
    .await;
    let letters = get(&t, "/admin/dead-letters?target=search").await.json();
    let letter = &letters["dead_letters"][0];
    assert_eq!(letter["id"], id.as_str());
    assert_eq!(letter["target"], "search");
    assert_eq!(letter["last_attempt"]["status"], 400);
    assert!(letter["reason"].as_str().unwrap().contains("permanent"));

    let r = post_admin(&t, "/admin/dead-letters/replay", &format!(r#"{{"target":"search","ids":["{id}"]}}"#)).await;
    assert_eq!(r.json(), serde_json::json!({ "replayed": 1 }));
    assert_eq!(target.next().await.headers["webhook-id"], id.as_str());
    let id = id.parse().unwrap();
    eventually("delivered", || async {
        matches!(t.store.deliveries(id).await.unwrap()[0].record.state, DeliveryState::Delivered { .. })
    })
    .await;
    assert!(get(&t, "/admin/dead-letters").await.json()["dead_letters"].as_array().unwrap().is_empty());
    // Nothing left to replay.
    assert_eq!(post_admin(&t, "/admin/dead-letters/replay", "{}").await.json(), serde_json::json!({ "replayed": 0 }));

    // Newest first, a page at a time; a replay of all goes through every page.
    target.always(Answer::status(400));
    let mut ids = Vec::new();
    for n in 10..13 {
        ids.push(delivered_id(&t, &mut target, n).await);
    }
    let dead = |path: &'static str| {
        let t = &t;
        async move { get(t, path).await.json() }
    };
    eventually("three dead", || async {
        dead("/admin/dead-letters").await["dead_letters"].as_array().unwrap().len() == 3
    })
    .await;
    let first = dead("/admin/dead-letters?limit=2").await;
    let listed: Vec<&str> =
        first["dead_letters"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    let next = first["next_before"].as_str().unwrap();
    let rest = get(&t, &format!("/admin/dead-letters?limit=2&before={next}")).await.json();
    assert_eq!(rest["dead_letters"][0]["id"], ids[0].as_str());
    assert_eq!((rest["dead_letters"].as_array().unwrap().len(), &rest["next_before"]), (1, &serde_json::Value::Null));
    target.always(Answer::status(200));
    assert_eq!(post_admin(&t, "/admin/dead-letters/replay", "{}").await.json(), serde_json::json!({ "replayed": 3 }));
}

#[tokio::test]
async fn bad_admin_requests_are_explained() {
    let t = start().await;
    for (path, status) in [
        ("/admin/events?limit=0", StatusCode::BAD_REQUEST),
        ("/admin/events?limit=100000", StatusCode::BAD_REQUEST),
        ("/admin/events/not-an-id", StatusCode::BAD_REQUEST),
        ("/admin/events/evt_0190f5f2a0b27c3e9a1b2c3d4e5f6a7b", StatusCode::NOT_FOUND),
        ("/admin/dead-letters?target=nowhere", StatusCode::NOT_FOUND),
        ("/admin/nothing", StatusCode::NOT_FOUND),
    ] {
        let r = get(&t, path).await;
        assert_eq!(r.status, status, "{path}");
        assert!(r.json()["error"].is_string());
    }
    assert_eq!(post_admin(&t, "/admin/dead-letters/replay", "{nope").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(post_admin(&t, "/admin/dead-letters/replay", r#"{"x":1}"#).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(post_admin(&t, "/admin/targets", "").await.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn metrics_move_as_traffic_flows() {
    let mut target = FakeTarget::start().await;
    let (targets, routes) = one_target(&target.url("/"));
    let t = start_relay(&targets, &routes).await;
    let scrape =
        || async { String::from_utf8_lossy(&call(&t, Method::GET, "/metrics", None, "").await.body).into_owned() };
    let before = scrape().await;
    // Counters are exported at zero from the start.
    assert!(before.contains("hookrelay_ingress_requests_total{outcome=\"accepted\",source=\"buttercms\"} 0"));
    assert!(before.contains("hookrelay_deliveries_total{outcome=\"dead\",target=\"search\"} 0"));
    delivered_id(&t, &mut target, 1).await;
    eventually("delivered counted", || async {
        scrape().await.contains("hookrelay_deliveries_total{outcome=\"delivered\",target=\"search\"} 1")
    })
    .await;
    let after = scrape().await;
    for needle in [
        "hookrelay_ingress_requests_total{outcome=\"accepted\",source=\"buttercms\"} 1",
        "hookrelay_ingress_ack_seconds_count{source=\"buttercms\"} 1",
        "hookrelay_delivery_attempt_seconds_count{target=\"search\"} 1",
        "hookrelay_delivery_lag_seconds_count{target=\"search\"} 1",
        "hookrelay_circuit_state{target=\"search\"} 0",
    ] {
        assert!(after.contains(needle), "missing {needle} in\n{after}");
    }
}

#[tokio::test]
async fn readyz_turns_503_as_soon_as_shutdown_begins() {
    use tokio::io::AsyncWriteExt;
    // The slow request below must outlast the whole 10 s grace, so that the
    // window for seeing 503 does not depend on how busy the machine is.
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "", "").replace("request_timeout: \"2s\"", "request_timeout: \"60s\"");
    let settings = hookrelay::config::load(&write_config(dir.path(), &text)).unwrap();
    assert_eq!(settings.server.request_timeout, Duration::from_secs(60));
    let relay = hookrelay::app::Relay::start(settings).await.unwrap();
    let t = TestRelay { addr: relay.ingress_addr, store: relay.store.clone(), relay, dir };
    let admin = t.relay.admin_addr;
    // A request still in progress keeps shutdown in its grace period.
    let mut slow = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    let head = format!(
        "POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {BUTTER_SECRET}\r\ncontent-length: 100\r\nexpect: 100-continue\r\n\r\n"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    // "100 Continue" comes once the handler reads the body: the request is in progress.
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("100 Continue") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut slow, &mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before 100 Continue: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    slow.write_all(b"{").await.unwrap();
    let TestRelay { relay, dir: _dir, .. } = t;
    let stopping = tokio::spawn(relay.stop(Duration::from_secs(10)));
    let readyz = || async move {
        let req = Request::get("/readyz").header("host", "admin").body(Full::new(Bytes::new())).unwrap();
        send(admin, req).await.status
    };
    eventually("readyz 503", || async { readyz().await == StatusCode::SERVICE_UNAVAILABLE }).await;
    assert!(!stopping.is_finished(), "shutdown should still be waiting for the slow request");
    drop(slow); // the client hangs up: its request ends, and shutdown can finish
    tokio::time::timeout(WAIT, stopping).await.expect("shutdown within its bound").unwrap().unwrap();
}

/// SIGTERM while an admin request's body is still coming (a client gone
/// half-open): the relay still exits, 2 s after the store closed.
#[tokio::test]
async fn an_unfinished_admin_request_does_not_hold_the_exit() {
    use tokio::io::AsyncWriteExt;
    let target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (targets, routes) = one_target(&target.url("/"));
    let config = write_config(dir.path(), &relay_config(dir.path(), &targets, &routes));
    let (mut relay, _) = spawn_relay(&config);
    let mut stream = tokio::net::TcpStream::connect(relay.admin).await.unwrap();
    let head = format!(
        "POST /admin/dead-letters/replay HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-length: 100\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = std::time::Instant::now();
    assert!(relay.terminate().success(), "a clean exit");
    assert!(stopping.elapsed() >= Duration::from_millis(1_900), "the request had its grace");
    drop(stream);
}
