//! What a stranger can send: each is answered with the right status or the
//! connection is closed, and legitimate webhooks keep flowing meanwhile.

mod common;

use std::net::SocketAddr;
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
    webhooks_flow(t.addr, 0, Duration::from_secs(5)).await;
    // The held connections are cut off by the server's head timeout (2 s here).
    for mut tcp in held {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(_)) | Ok(Err(_))), "a slow connection was never closed");
    }
}

/// An HTTP/2 connection with prior knowledge (h2c), driven in the background.
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A ButterCMS webhook's head, with its secret; the body is for the caller to send, or not.
fn h2_head(addr: SocketAddr) -> http::Request<()> {
    http::Request::post(format!("http://{addr}/hooks/buttercms"))
        .header("x-webhook-secret", BUTTER_SECRET)
        .header("content-type", "application/json")
        .body(())
        .unwrap()
}

/// CVE-2023-44487: opens up to `streams` streams on one connection and
/// cancels each at once. Returns how many it cancelled before the server
/// closed the connection (hyper's answer to a flood), or all of them.
async fn rapid_reset(addr: SocketAddr, streams: u32) -> u32 {
    let mut client = h2_client(addr).await;
    for n in 0..streams {
        client = match client.ready().await {
            Ok(c) => c,
            Err(_) => return n,
        };
        match client.send_request(h2_head(addr), false) {
            Ok((_answer, mut body)) => body.send_reset(h2::Reason::CANCEL),
            Err(_) => return n,
        }
        if n % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    streams
}

/// Opens `streams` streams on one connection, sends `partial` as the start of
/// each body and never finishes it; returns each stream's answer (or `None`
/// when none came within 20 s).
async fn hold_streams(addr: SocketAddr, streams: usize, partial: &'static [u8]) -> Vec<Option<StatusCode>> {
    hold_streams_of(h2_head(addr), streams, bytes::Bytes::from_static(partial)).await
}

/// [`hold_streams`] with requests like `head`.
async fn hold_streams_of(head: http::Request<()>, streams: usize, partial: bytes::Bytes) -> Vec<Option<StatusCode>> {
    let addr: SocketAddr = head.uri().authority().unwrap().as_str().parse().unwrap();
    let mut client = h2_client(addr).await;
    let mut held = Vec::new();
    for _ in 0..streams {
        client = client.ready().await.unwrap();
        let mut request = http::Request::new(());
        *request.method_mut() = head.method().clone();
        *request.uri_mut() = head.uri().clone();
        *request.headers_mut() = head.headers().clone();
        let (answer, mut body) = client.send_request(request, false).unwrap();
        body.send_data(partial.clone(), false).unwrap();
        held.push((answer, body));
    }
    let mut statuses = Vec::new();
    for (answer, _body) in held {
        let status = tokio::time::timeout(Duration::from_secs(20), answer).await.ok().and_then(Result::ok);
        statuses.push(status.map(|a| a.status()));
    }
    statuses
}

/// 20 webhooks, each answered 202, all within `limit`.
async fn webhooks_flow(addr: SocketAddr, first: usize, limit: Duration) {
    let started = std::time::Instant::now();
    for n in first..first + 20 {
        assert_eq!(post_butter(addr, butter_page(n)).await.status, StatusCode::ACCEPTED);
    }
    assert!(started.elapsed() < limit, "legitimate webhooks took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_does_not_stop_webhooks() {
    let t = start().await;
    // Ten flooding connections, one after another, each cut off by the
    // server or done after 2,000 cancelled streams; webhooks meanwhile.
    let flood = tokio::spawn(async move {
        let mut cancelled = Vec::new();
        for _ in 0..10 {
            cancelled.push(rapid_reset(t.addr, 2_000).await);
        }
        cancelled
    });
    webhooks_flow(t.addr, 0, Duration::from_secs(10)).await;
    let cancelled = tokio::time::timeout(Duration::from_secs(60), flood).await.expect("the flood did not end").unwrap();
    println!("rapid reset: streams cancelled per connection before it ended: {cancelled:?}");
    // After the flood the relay still answers, and no cancelled stream left an event behind.
    assert_eq!(post_butter(t.addr, butter_page(20)).await.status, StatusCode::ACCEPTED);
    assert_eq!(t.store.recent_events(None, 1000).await.unwrap().len(), 21);
}

#[tokio::test]
async fn http2_streams_held_open_are_answered_408_while_webhooks_flow() {
    let t = start().await;
    // Four connections with 128 streams each (the server's limit per
    // connection): the head sent, the body begun and never finished.
    let held: Vec<_> = (0..4).map(|_| tokio::spawn(hold_streams(t.addr, 128, b"{\"data\":"))).collect();
    webhooks_flow(t.addr, 0, Duration::from_secs(10)).await;
    // Each held stream is cut off by request_timeout (2 s here) with a 408.
    for connection in held {
        for status in connection.await.unwrap() {
            assert_eq!(status, Some(StatusCode::REQUEST_TIMEOUT));
        }
    }
    assert_eq!(t.store.recent_events(None, 1000).await.unwrap().len(), 20);
}

/// A process's resident memory, in KiB, from /proc.
fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Writes a chunked request head, then up to `body_bytes` of body in 4 KiB
/// chunks; returns the status line the server answered with, if any.
async fn endless_body(addr: SocketAddr, body_bytes: usize) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {BUTTER_SECRET}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let chunk = format!("1000\r\n{}\r\n", "a".repeat(4096));
    let _ = tcp.write_all(head.as_bytes()).await;
    for _ in 0..body_bytes / 4096 {
        if tcp.write_all(chunk.as_bytes()).await.is_err() {
            break; // the server stopped reading and closed
        }
    }
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer)).await.ok().and_then(Result::ok);
    String::from_utf8_lossy(&answer[..n.unwrap_or(0)]).lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_leave_the_relay_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_text(dir.path(), "", ""));
    let (relay, addr) = spawn_relay(&config);
    for n in 0..100 {
        assert_eq!(post_butter(addr, butter_page(n)).await.status, StatusCode::ACCEPTED);
    }
    let pid = relay.id();
    // Start the peak (VmHWM) afresh from here.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = rss_kib(pid, "VmRSS:");

    // 64 MiB of bodies offered on 64 connections (max_body is 64 KiB), 64
    // heads of 60 KiB that never end, 512 HTTP/2 streams held mid-body, and
    // a 20,000-stream rapid reset, all at once.
    let mut floods = tokio::task::JoinSet::new();
    for _ in 0..64 {
        floods.spawn(async move {
            let status = endless_body(addr, 1 << 20).await;
            // A 413, or the connection closed under the writer's feet.
            assert!(status.is_empty() || status.starts_with("HTTP/1.1 413"), "{status}");
        });
        floods.spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!("POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\nx-filler: {}", "b".repeat(60 * 1024));
            let _ = tcp.write_all(head.as_bytes()).await;
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
        });
    }
    for _ in 0..4 {
        floods.spawn(async move {
            hold_streams(addr, 128, &[b' '; 1024]).await;
        });
    }
    floods.spawn(async move {
        rapid_reset(addr, 20_000).await;
    });
    webhooks_flow(addr, 100, Duration::from_secs(10)).await;
    while let Some(done) =
        tokio::time::timeout(Duration::from_secs(60), floods.join_next()).await.expect("a flood hung")
    {
        done.unwrap();
    }
    let (after, peak) = (rss_kib(pid, "VmRSS:"), rss_kib(pid, "VmHWM:"));
    drop(relay);
    println!("relay memory: {before} KiB before the floods, peak {peak} KiB, {after} KiB after");
    // Were the offered 64 MiB of bodies or 3.75 MiB of heads buffered, or
    // the streams' state kept, the peak would show it.
    assert!(peak.saturating_sub(before) < 48 * 1024, "grew from {before} KiB to a peak of {peak} KiB");
}

/// A source that signs its bodies must read one before it knows who sent
/// it: 64 MiB offered to the CometCMS source with a wrong signature (8
/// HTTP/2 connections × 128 streams × 64 KiB − 1, max_body being 64 KiB),
/// none finished. The source reads at most 16 × max_body of them at once;
/// the rest wait unread (held back by flow control) until the request
/// timeout. Before, every stream's body was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_read_before_their_signature_is_checked_are_bounded_together() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_text(dir.path(), "", ""));
    let (relay, addr) = spawn_relay(&config);
    webhooks_flow(addr, 0, Duration::from_secs(10)).await;
    let pid = relay.id();
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = rss_kib(pid, "VmRSS:");
    let head = http::Request::post(format!("http://{addr}/hooks/cometcms"))
        .header("x-cometcms-signature", format!("sha256={}", "00".repeat(32)))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let partial = bytes::Bytes::from(vec![b' '; 64 * 1024 - 1]);
    let floods: Vec<_> = (0..8).map(|_| tokio::spawn(hold_streams_of(head.clone(), 128, partial.clone()))).collect();
    // Other sources are not held back.
    webhooks_flow(addr, 100, Duration::from_secs(10)).await;
    for flood in floods {
        for status in flood.await.unwrap() {
            // Timed out (408), or refused once read (401).
            assert!(matches!(status, Some(StatusCode::REQUEST_TIMEOUT | StatusCode::UNAUTHORIZED)), "{status:?}");
        }
    }
    let (after, peak) = (rss_kib(pid, "VmRSS:"), rss_kib(pid, "VmHWM:"));
    drop(relay);
    println!("relay memory: {before} KiB before, peak {peak} KiB, {after} KiB after");
    // 1,024 streams' own state is ~30 MiB (measured: +32 MiB with the
    // budget, +74 MiB without).
    assert!(peak.saturating_sub(before) < 48 * 1024, "grew from {before} KiB to a peak of {peak} KiB");
}

/// A connection with no request in progress is closed once `request_timeout`
/// (2 s here) has passed: one that never sends a byte, one that stops
/// inside the HTTP/2 preface (before, both stayed open for ever: hyper's
/// head timeout starts only once it knows the protocol), and a keep-alive
/// connection after its answer, which is still served while it is in use.
#[tokio::test]
async fn idle_connections_are_closed_after_the_request_timeout() {
    let t = start().await;
    let silent = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    let mut preface = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut kept = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    let request = |n: usize| {
        let body = butter_page(n);
        let mut r = format!(
            "POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {BUTTER_SECRET}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(&body);
        r
    };
    // In use every half second for 3 s: longer than the timeout, never idle that long.
    for n in 0..6 {
        kept.write_all(&request(n)).await.unwrap();
        let mut buf = [0u8; 512];
        let got = tokio::time::timeout(Duration::from_secs(5), kept.read(&mut buf)).await;
        let got = got.expect("an answer").expect("read");
        assert!(buf[..got].starts_with(b"HTTP/1.1 202"), "request {n}: {}", String::from_utf8_lossy(&buf[..got]));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (what, mut tcp) in [("silent", silent), ("preface", preface), ("keep-alive", kept)] {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(8), tcp.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{what}: not closed within 8 s of going idle: {closed:?}");
    }
}
