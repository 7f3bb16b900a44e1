//! Target faults: down then back, hanging up mid-answer, slower than the
//! timeout. Each delivery ends delivered (or dead-lettered) as the contract says.

mod common;

use std::time::Duration;

use common::*;
use hookrelay::store::{DeliveryState, EventId};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config_for(url: &str, extra: &str) -> (String, String) {
    (
        format!(
            "  - name: search\n    url: \"{url}\"\n    retry: {{ initial_backoff: 50ms, max_backoff: 200ms }}\n{extra}"
        ),
        "  - { source: buttercms, events: [\"*\"], targets: [search] }".to_string(),
    )
}

async fn send_one(t: &TestRelay, n: usize) -> EventId {
    let reply = post_butter(t.addr, butter_page(n)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    reply.json()["id"].as_str().unwrap().parse().unwrap()
}

async fn delivered(t: &TestRelay, id: EventId) -> bool {
    matches!(t.store.deliveries(id).await.unwrap()[0].record.state, DeliveryState::Delivered { .. })
}

#[tokio::test]
async fn a_target_down_for_a_while_gets_everything_when_it_returns() {
    // Take a free port, and leave nothing listening on it for now.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // Refused connections open the circuit; it probes again after 200 ms.
    let (targets, routes) = config_for(&format!("http://{addr}/"), "    circuit_breaker: { open_for: 200ms }\n");
    let t = start_relay(&targets, &routes).await;
    let ids: Vec<EventId> = futures_ids(&t, 5).await;
    eventually("failed attempts recorded", || async {
        !t.store.deliveries(ids[0]).await.unwrap()[0].record.attempts.is_empty()
    })
    .await;
    let mut target = FakeTarget::start_at(addr).await;
    for _ in 0..5 {
        target.next().await;
    }
    for id in ids {
        eventually("delivered", || async { delivered(&t, id).await }).await;
    }
}

async fn futures_ids(t: &TestRelay, n: usize) -> Vec<EventId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(send_one(t, i).await);
    }
    ids
}

#[tokio::test]
async fn a_target_that_hangs_up_mid_answer_is_retried() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The first connection gets half a status line and is closed; the
    // next ones get a whole answer.
    let server = tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            let mut buf = vec![0u8; 8192];
            let _ = tcp.read(&mut buf).await;
            let answer: &[u8] = if n == 0 { b"HTTP/1.1 20" } else { b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" };
            let _ = tcp.write_all(answer).await;
        }
    });
    let (targets, routes) = config_for(&format!("http://{addr}/"), "");
    let t = start_relay(&targets, &routes).await;
    let id = send_one(&t, 1).await;
    eventually("delivered on a later attempt", || async { delivered(&t, id).await }).await;
    let attempts = t.store.deliveries(id).await.unwrap()[0].record.attempts.clone();
    assert!(attempts[0].error.is_some() && attempts[0].status.is_none(), "{attempts:?}");
    assert_eq!(attempts.last().unwrap().status, Some(200));
    server.abort();
}

#[tokio::test]
async fn a_target_slower_than_the_timeout_is_retried() {
    let mut target = FakeTarget::start().await;
    target.script([Answer::status(200).delay(Duration::from_secs(2))]);
    let (targets, routes) = config_for(&target.url("/"), "    timeout: 300ms\n");
    let t = start_relay(&targets, &routes).await;
    let id = send_one(&t, 1).await;
    let first = target.next().await;
    let second = target.next().await;
    assert_eq!(second.headers["x-hookrelay-attempt"], "2");
    assert!(second.at - first.at >= Duration::from_millis(300));
    eventually("delivered", || async { delivered(&t, id).await }).await;
    let attempts = t.store.deliveries(id).await.unwrap()[0].record.attempts.clone();
    assert!(attempts[0].error.as_deref().unwrap_or("").contains("timed out"), "{attempts:?}");
    assert_eq!(attempts[1].status, Some(200));
}
