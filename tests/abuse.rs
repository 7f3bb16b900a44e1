//! What a stranger can send: each is answered with the right status or the
//! connection is closed, and legitimate webhooks keep flowing meanwhile.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn invalid_utf8_and_deep_nesting_are_400() {
    let t = start().await;
    let reply = post_butter(t.addr, vec![0xff, 0xfe, b'{', 0x80]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000)); // 60 KB: under max_body
    let reply = post_butter(t.addr, deep).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.json()["error"].as_str().unwrap().contains("not JSON"));
}

#[tokio::test]
async fn too_many_headers_are_refused() {
    let t = start().await;
    let mut head = String::from("POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n");
    for i in 0..200 {
        head.push_str(&format!("x-h{i}: v\r\n"));
    }
    head.push_str("\r\n{}");
    let mut tcp = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn a_replayed_standard_webhooks_message_is_refused() {
    let t = start().await;
    let body = br#"{"type":"invoice.paid"}"#.to_vec();
    let key = hookrelay::config::standard_webhooks_secret(WHSEC).unwrap();
    let old = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64 - 600;
    let sig = hookrelay::ingress::auth::standard_webhooks_signature(key.expose(), "msg_old", old, &body);
    let headers = [("webhook-id", "msg_old"), ("webhook-timestamp", &old.to_string()), ("webhook-signature", &sig)];
    let reply = post(t.addr, "/hooks/generic", &headers, body).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "a 10-minute-old signature is a replay");
}

#[tokio::test]
async fn webhooks_keep_flowing_while_slow_clients_hold_connections() {
    let t = start().await;
    // Fifty connections that never finish their request head.
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut tcp = tokio::net::TcpStream::connect(t.addr).await.unwrap();
        tcp.write_all(b"POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        held.push(tcp);
    }
    let started = std::time::Instant::now();
    for n in 0..20 {
        assert_eq!(post_butter(t.addr, butter_page(n)).await.status, StatusCode::ACCEPTED);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "legitimate webhooks took {:?}", started.elapsed());
    // The held connections are cut off by the server's head timeout (2 s here).
    for mut tcp in held {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(_)) | Ok(Err(_))), "a slow connection was never closed");
    }
}
