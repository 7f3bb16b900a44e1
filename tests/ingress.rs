//! The ingress contract (README, "What the CMS sees"), row by row, against the real server on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use hookrelay::store::{DeliveryState, EventId, NullStore, StoreError};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn id_of(reply: &Reply) -> EventId {
    reply.json()["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn accepted_webhook_is_stored_with_one_pending_delivery_per_target() {
    let t = start().await;
    let body = fixture("buttercms-page-published.json");
    let reply = post_butter(t.addr, body.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.json()["targets"], 2);
    let id = id_of(&reply);

    let stored = t.store.event(id).await.unwrap().expect("event stored");
    assert_eq!(stored.body.as_ref(), body.as_slice(), "body byte for byte");
    assert_eq!(stored.meta.event, "page.published");
    assert_eq!(stored.meta.source, "buttercms");
    assert_eq!(stored.meta.content_type.as_deref(), Some("application/json"));
    let deliveries = t.store.deliveries(id).await.unwrap();
    let targets: Vec<&str> = deliveries.iter().map(|d| d.target.as_str()).collect();
    assert_eq!(targets, ["search", "cache"]);
    assert!(deliveries.iter().all(|d| matches!(d.record.state, DeliveryState::Pending { .. })));
}

#[tokio::test]
async fn unrouted_event_is_stored_with_zero_targets() {
    let t = start().await;
    let reply = post_butter(t.addr, fixture("buttercms-collectionitem-published.json")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json()["targets"], 0);
    assert!(t.store.event(id_of(&reply)).await.unwrap().is_some());
}

#[tokio::test]
async fn duplicate_within_window_is_200_with_the_first_id() {
    let t = start().await;
    let body = fixture("buttercms-page-published.json");
    let first = post_butter(t.addr, body.clone()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = post_butter(t.addr, body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(id_of(&again), id_of(&first));
    // Another locale of the same page is a different event.
    let es = post_butter(t.addr, fixture("buttercms-page-published-es.json")).await;
    assert_eq!(es.status, StatusCode::ACCEPTED);
    assert_eq!(t.store.recent_events(None, 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn concurrent_copies_of_one_webhook_store_one_event() {
    let t = start().await;
    let body = fixture("cometcms-content-published.json");
    let sig = comet_signature(&body);
    let sends = (0..8).map(|_| {
        let (body, sig) = (body.clone(), sig.clone());
        let addr = t.addr;
        tokio::spawn(async move { post(addr, "/hooks/cometcms", &[("x-cometcms-signature", &sig)], body).await })
    });
    let mut ids = Vec::new();
    let mut accepted = 0;
    for s in sends {
        let r = s.await.unwrap();
        accepted += usize::from(r.status == StatusCode::ACCEPTED);
        ids.push(id_of(&r));
    }
    assert_eq!(accepted, 1);
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "all answers name the first id: {ids:?}");
    assert_eq!(t.store.recent_events(None, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn cometcms_hmac_is_verified() {
    let t = start().await;
    let body = fixture("cometcms-content-published.json");
    let ok = post(t.addr, "/hooks/cometcms", &[("x-cometcms-signature", &comet_signature(&body))], body.clone()).await;
    assert_eq!(ok.status, StatusCode::ACCEPTED);
    assert_eq!(ok.json()["targets"], 1);
    // The signature of another body does not verify this one.
    let other = comet_signature(&fixture("cometcms-content-deleted.json"));
    let bad = post(t.addr, "/hooks/cometcms", &[("x-cometcms-signature", &other)], body).await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn standard_webhooks_source_accepts_a_signed_message() {
    let t = start().await;
    let body = br#"{"type":"invoice.paid","amount":12}"#.to_vec();
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let key = hookrelay::config::standard_webhooks_secret(WHSEC).unwrap();
    let sig = hookrelay::ingress::auth::standard_webhooks_signature(key.expose(), "msg_42", ts, &body);
    let headers = [("webhook-id", "msg_42"), ("webhook-timestamp", &ts.to_string()), ("webhook-signature", &sig)];
    let reply = post(t.addr, "/hooks/generic", &headers, body.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    let stored = t.store.event(id_of(&reply)).await.unwrap().unwrap();
    assert_eq!(stored.meta.event, "invoice.paid");
    // The sender's retry of msg_42 is a duplicate.
    let retry = post(t.addr, "/hooks/generic", &headers, body).await;
    assert_eq!(retry.status, StatusCode::OK);
}

#[tokio::test]
async fn wrong_or_missing_secret_is_401_and_nothing_is_stored() {
    let t = start().await;
    let body = fixture("buttercms-page-published.json");
    for headers in [&[("x-webhook-secret", "wrong")][..], &[][..]] {
        let reply = post(t.addr, "/hooks/buttercms", headers, body.clone()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.json(), serde_json::json!({ "error": "unauthorized" }));
    }
    // Bad credentials are refused before the body is judged.
    let reply = post(t.addr, "/hooks/buttercms", &[("x-webhook-secret", "wrong")], "not json").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(t.store.recent_events(None, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_json_and_wrong_envelope_are_400_with_a_reason() {
    let t = start().await;
    let reply = post_butter(t.addr, "{not json").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.json()["error"].as_str().unwrap().contains("not JSON"));
    let reply = post_butter(t.addr, fixture("cometcms-content-published.json")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.json()["error"].as_str().unwrap().contains("webhook"), "{:?}", reply.body);
    assert!(t.store.recent_events(None, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn client_outside_allow_ips_is_403() {
    let extra = r#"  - name: locked
    path: /hooks/locked
    format: buttercms
    allow_ips: ["10.0.0.0/8", "2001:db8::/32"]
    auth: { type: none }"#;
    let t = start_with("", extra).await;
    let reply = post(t.addr, "/hooks/locked", &[], fixture("buttercms-page-published.json")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.json(), serde_json::json!({ "error": "forbidden" }));
}

#[tokio::test]
async fn unknown_path_is_404_and_other_methods_405() {
    let t = start().await;
    assert_eq!(post_butter(t.addr, "{}").await.status, StatusCode::BAD_REQUEST);
    let reply = post(t.addr, "/hooks/nothing-here", &[], "{}").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let mut get = request("/hooks/buttercms", &[], "");
    *get.method_mut() = http::Method::GET;
    let reply = send(t.addr, get).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers["allow"], "POST");
}

/// Writes a request head by hand and returns what the server answers, read
/// until it closes the connection or the deadline.
async fn raw_exchange(addr: std::net::SocketAddr, head: &str, body_part: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body_part).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn declared_oversize_body_is_413_without_reading_it() {
    let t = start().await;
    // Claims 10 MiB, sends 10 bytes, and waits: the answer must not wait for the rest.
    let head = format!(
        "POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {BUTTER_SECRET}\r\ncontent-length: {}\r\n\r\n",
        10 << 20
    );
    let started = std::time::Instant::now();
    let answer = raw_exchange(t.addr, &head, b"{\"data\":{}").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered only after {:?}", started.elapsed());
}

#[tokio::test]
async fn streamed_oversize_body_is_413() {
    let t = start().await;
    let head = format!(
        "POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {BUTTER_SECRET}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    // 100 KiB in 1 KiB chunks, over the 64 KiB limit, without a final chunk.
    let chunk = format!("400\r\n{}\r\n", "a".repeat(1024));
    let answer = raw_exchange(t.addr, &head, chunk.repeat(100).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test]
async fn slow_body_is_cut_off_at_request_timeout() {
    let t = start().await;
    let head = format!(
        "POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {BUTTER_SECRET}\r\ncontent-length: 100\r\n\r\n"
    );
    let started = std::time::Instant::now();
    let answer = raw_exchange(t.addr, &head, b"{").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// The head of a ButterCMS webhook of `len` bytes, with its secret, as raw HTTP/1.1.
fn butter_head(len: usize) -> String {
    format!(
        "POST /hooks/buttercms HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\nx-webhook-secret: {BUTTER_SECRET}\r\ncontent-length: {len}\r\n\r\n"
    )
}

/// `request_timeout` (2 s here) bounds the whole request, head and body: a
/// head sent over 1.4 s, then a body over 1.4 s more, is answered 408 (each
/// had its own 2 s before, so it was accepted after 2.8 s).
#[tokio::test]
async fn a_request_timeout_covers_the_head_and_the_body_together() {
    let t = start().await;
    let body = butter_page(1);
    let mut tcp = TcpStream::connect(t.addr).await.unwrap();
    // Each part in 14 pieces, 100 ms apart: 1.4 s each.
    for part in [butter_head(body.len()).into_bytes(), body.to_vec()] {
        for piece in part.chunks(part.len().div_ceil(14)) {
            if tcp.write_all(piece).await.is_err() {
                break; // answered and closed
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer)).await.unwrap().unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// A source whose credential is all in the headers refuses a client
/// without it before reading its body: answered 401 at once, not 408 once
/// `request_timeout` (2 s here) has passed waiting for a body that never
/// comes, which an unauthenticated client could hold in memory meanwhile.
#[tokio::test]
async fn a_wrong_header_secret_is_refused_before_the_body_is_read() {
    let t = start().await;
    let head = "POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\nx-webhook-secret: wrong\r\ncontent-length: 60000\r\n\r\n";
    let started = std::time::Instant::now();
    let answer = raw_exchange(t.addr, head, b"{").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(1), "answered after {:?}", started.elapsed());
    assert_eq!(t.store.counts("search").await.unwrap().queued, 0);
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let t = start().await;
    let started = std::time::Instant::now();
    // Never finishes its head; the server must hang up by itself.
    let answer = raw_exchange(t.addr, "POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\n", b"").await;
    assert!(started.elapsed() < Duration::from_secs(10), "still open after {:?}: {answer}", started.elapsed());
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let t = start().await;
    let big = "a".repeat(100 * 1024);
    let head = format!("POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\ncontent-length: 2\r\n\r\n");
    let answer = raw_exchange(t.addr, &head, b"{}").await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let t = start().await;
    let tcp = TcpStream::connect(t.addr).await.unwrap();
    let reply = send_on(
        hyper_util::rt::TokioIo::new(tcp),
        request("/hooks/buttercms", &[("x-webhook-secret", BUTTER_SECRET)], fixture("buttercms-page-delete.json")),
        true,
    )
    .await;
    assert_eq!(reply.version, http::Version::HTTP_2);
    assert_eq!(reply.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn storage_failure_is_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config_text(dir.path(), "", ""));
    let settings = hookrelay::config::load(&path).unwrap();
    let relay = hookrelay::app::Relay::start_with_store(
        settings,
        std::sync::Arc::new(NullStore { refuse: Some(StoreError::Io("No space left on device".into())) }),
    )
    .await
    .unwrap();
    let reply = post_butter(relay.ingress_addr, fixture("buttercms-page-published.json")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "5");
    assert_eq!(reply.json(), serde_json::json!({ "error": "storage unavailable" }));
    relay.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn after_the_store_closes_webhooks_are_503() {
    let t = start().await;
    t.store.close().await.unwrap();
    let reply = post_butter(t.addr, fixture("buttercms-page-published.json")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn outcomes_are_counted_in_metrics() {
    let t = start().await;
    post_butter(t.addr, fixture("buttercms-page-published.json")).await;
    post_butter(t.addr, fixture("buttercms-page-published.json")).await;
    post(t.addr, "/hooks/buttercms", &[], "{}").await;
    let text = t.relay.metrics.render();
    for outcome in ["accepted", "duplicate", "unauthorized"] {
        let line = format!("hookrelay_ingress_requests_total{{outcome=\"{outcome}\",source=\"buttercms\"}} 1");
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }
}

/// A client that hangs up right after sending its webhook (as a load
/// generator's last requests do): the webhook is stored, and counted as
/// accepted like any other.
#[tokio::test]
async fn a_webhook_whose_client_hung_up_is_stored_and_counted() {
    let t = start().await;
    let body = butter_page(1);
    let mut tcp = TcpStream::connect(t.addr).await.unwrap();
    tcp.write_all(&[butter_head(body.len()).as_bytes(), &body].concat()).await.unwrap();
    tcp.shutdown().await.unwrap();
    drop(tcp);
    eventually("the webhook is stored", || async { t.store.recent_events(None, 10).await.unwrap().len() == 1 }).await;
    let accepted = r#"hookrelay_ingress_requests_total{outcome="accepted",source="buttercms"} 1"#;
    eventually("the webhook is counted", || async { t.relay.metrics.render().contains(accepted) }).await;
}
