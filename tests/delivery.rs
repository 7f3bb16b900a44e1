//! Delivery (README, "What a target receives") against real HTTP fake targets on 127.0.0.1.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use hookrelay::store::{DeliveryState, EventId};
use http::StatusCode;

fn target(name: &str, url: &str, extra: &str) -> String {
    format!("  - name: {name}\n    url: \"{url}\"\n{extra}")
}

fn route(targets: &str) -> String {
    format!("  - {{ source: buttercms, events: [\"*\"], targets: [{targets}] }}")
}

async fn send(t: &TestRelay, body: Vec<u8>) -> EventId {
    let reply = post_butter(t.addr, body).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    reply.json()["id"].as_str().unwrap().parse().unwrap()
}

async fn state_of(t: &TestRelay, id: EventId, target: &str) -> DeliveryState {
    let all = t.store.deliveries(id).await.unwrap();
    all.into_iter().find(|d| d.target == target).unwrap().record.state
}

const FAST_RETRY: &str = "    retry: { initial_backoff: 20ms, max_backoff: 50ms }\n";

#[tokio::test]
async fn fans_out_byte_exact_with_the_contract_headers_and_no_upstream_credential() {
    let mut a = FakeTarget::start().await;
    let mut b = FakeTarget::start().await;
    let targets = [
        target("search", &a.url("/reindex"), "    headers: { X-Api-Key: key-123 }\n"),
        target("cache", &b.url("/purge"), ""),
    ]
    .join("");
    let t = start_relay(&targets, &route("search, cache")).await;
    let body = fixture("buttercms-page-published.json");
    let id = send(&t, body.clone()).await;

    for (got, name) in [(a.next().await, "search"), (b.next().await, "cache")] {
        assert_eq!(got.body.as_ref(), body.as_slice(), "{name}: body byte for byte");
        let h = &got.headers;
        assert_eq!(h["webhook-id"], id.to_string().as_str());
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-hookrelay-source"], "buttercms");
        assert_eq!(h["x-hookrelay-event"], "page.published");
        assert_eq!(h["x-hookrelay-attempt"], "1");
        let ts: u64 = h["webhook-timestamp"].to_str().unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(now.abs_diff(ts) < 30, "timestamp {ts} vs now {now}");
        assert!(h.get("x-webhook-secret").is_none(), "{name}: the upstream secret was forwarded");
        assert!(h.get("authorization").is_none());
        assert!(h.get("webhook-signature").is_none(), "no signing_secret, no signature");
    }
    // Only the target that configured it gets the extra header.
    eventually("both delivered", || async {
        matches!(state_of(&t, id, "search").await, DeliveryState::Delivered { .. })
            && matches!(state_of(&t, id, "cache").await, DeliveryState::Delivered { .. })
    })
    .await;
}

#[tokio::test]
async fn target_headers_are_added() {
    let mut a = FakeTarget::start().await;
    let t =
        start_relay(&target("search", &a.url("/"), "    headers: { X-Api-Key: key-123 }\n"), &route("search")).await;
    send(&t, butter_page(1)).await;
    assert_eq!(a.next().await.headers["x-api-key"], "key-123");
}

#[tokio::test]
async fn signature_verifies_with_an_independent_implementation() {
    let secret_b64 = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut a = FakeTarget::start().await;
    let extra = format!("    signing_secret: \"whsec_{secret_b64}\"\n");
    let t = start_relay(&target("search", &a.url("/"), &extra), &route("search")).await;
    send(&t, butter_page(7)).await;
    let got = a.next().await;
    assert_eq!(got.headers["webhook-signature"], expected_signature(secret_b64, &got).as_str());
}

#[tokio::test]
async fn retries_until_success_with_a_stable_id_and_rising_attempt_numbers() {
    let mut a = FakeTarget::start().await;
    a.script([Answer::status(500), Answer::status(503)]);
    let t = start_relay(&target("search", &a.url("/"), FAST_RETRY), &route("search")).await;
    let id = send(&t, butter_page(1)).await;
    for n in 1..=3 {
        let got = a.next().await;
        assert_eq!(got.headers["x-hookrelay-attempt"], n.to_string().as_str());
        assert_eq!(got.headers["webhook-id"], id.to_string().as_str());
    }
    eventually("delivered after 3 attempts", || async {
        let d = &t.store.deliveries(id).await.unwrap()[0];
        matches!(d.record.state, DeliveryState::Delivered { .. }) && d.record.attempts.len() == 3
    })
    .await;
    let attempts = &t.store.deliveries(id).await.unwrap()[0].record.attempts;
    assert_eq!(attempts.iter().map(|a| a.status).collect::<Vec<_>>(), [Some(500), Some(503), Some(200)]);
}

#[tokio::test]
async fn permanent_4xx_is_dead_at_once() {
    let mut a = FakeTarget::start().await;
    a.always(Answer::status(422));
    let t = start_relay(&target("search", &a.url("/"), FAST_RETRY), &route("search")).await;
    let id = send(&t, butter_page(1)).await;
    a.next().await;
    eventually("dead", || async { matches!(state_of(&t, id, "search").await, DeliveryState::Dead { .. }) }).await;
    a.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(t.store.deliveries(id).await.unwrap()[0].record.attempts.len(), 1);
    assert_eq!(t.store.counts("search").await.unwrap().dead, 1);
}

#[tokio::test]
async fn max_attempts_ends_in_the_dead_letters() {
    let mut a = FakeTarget::start().await;
    a.always(Answer::status(500));
    let extra = "    retry: { max_attempts: 3, initial_backoff: 10ms, max_backoff: 20ms }\n    circuit_breaker: { failure_threshold: 100 }\n";
    let t = start_relay(&target("search", &a.url("/"), extra), &route("search")).await;
    let id = send(&t, butter_page(1)).await;
    for _ in 0..3 {
        a.next().await;
    }
    eventually("dead", || async {
        matches!(state_of(&t, id, "search").await, DeliveryState::Dead { ref reason, .. } if reason.contains("max_attempts"))
    })
    .await;
    a.nothing_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn max_age_ends_in_the_dead_letters() {
    let a = FakeTarget::start().await;
    a.always(Answer::status(500));
    let extra = "    retry: { max_attempts: 1000, initial_backoff: 50ms, max_backoff: 50ms, max_age: 300ms }\n    circuit_breaker: { failure_threshold: 1000 }\n";
    let t = start_relay(&target("search", &a.url("/"), extra), &route("search")).await;
    let id = send(&t, butter_page(1)).await;
    eventually("dead by age", || async {
        matches!(state_of(&t, id, "search").await, DeliveryState::Dead { ref reason, .. } if reason.contains("max_age"))
    })
    .await;
    let attempts = t.store.deliveries(id).await.unwrap()[0].record.attempts.len();
    assert!((2..100).contains(&attempts), "{attempts} attempts");
}

/// A `Retry-After` holds the whole queue, not only the delivery that got
/// it: rate-limited APIs (Slack, Cloudflare, GitHub) ask the client to wait.
#[tokio::test]
async fn retry_after_holds_the_other_deliveries_too() {
    let mut a = FakeTarget::start().await;
    a.script([Answer::status(429).header("retry-after", "1")]);
    let extra = format!("    concurrency: 1\n{}", FAST_RETRY.replace("50ms", "5s"));
    let t = start_relay(&target("search", &a.url("/"), &extra), &route("search")).await;
    send(&t, butter_page(1)).await;
    let first = a.next().await.at;
    send(&t, butter_page(2)).await;
    let second = a.next().await.at;
    assert!(second - first >= Duration::from_millis(950), "another delivery sent {:?} after the 429", second - first);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let mut a = FakeTarget::start().await;
    a.script([Answer::status(429).header("retry-after", "1")]);
    let t =
        start_relay(&target("search", &a.url("/"), FAST_RETRY.replace("50ms", "5s").as_str()), &route("search")).await;
    send(&t, butter_page(1)).await;
    let first = a.next().await.at;
    let second = a.next().await.at;
    let gap = second - first;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}, before Retry-After");
    assert!(gap < Duration::from_secs(5), "retried only after {gap:?}");
}

#[tokio::test]
async fn circuit_opens_holds_probes_and_closes() {
    let mut a = FakeTarget::start().await;
    a.script([Answer::status(500), Answer::status(500)]);
    let extra = "    retry: { initial_backoff: 10ms, max_backoff: 10ms }\n    circuit_breaker: { failure_threshold: 2, open_for: 700ms }\n";
    let t = start_relay(&target("search", &a.url("/"), extra), &route("search")).await;
    let id = send(&t, butter_page(1)).await;
    let first = a.next().await.at;
    let second = a.next().await.at;
    assert!(second - first < Duration::from_millis(500));
    // Open: nothing is attempted, although the retry is due after 10 ms.
    let metrics = t.relay.metrics.clone();
    eventually("open", || async { metrics.render().contains("hookrelay_circuit_state{target=\"search\"} 2") }).await;
    let probe = a.next().await.at;
    assert!(probe - second >= Duration::from_millis(650), "probe after {:?}, circuit did not hold", probe - second);
    eventually("delivered by the probe", || async {
        matches!(state_of(&t, id, "search").await, DeliveryState::Delivered { .. })
    })
    .await;
    // Waiting did not spend attempts: two failures and the probe.
    assert_eq!(t.store.deliveries(id).await.unwrap()[0].record.attempts.len(), 3);
    eventually("closed", || async { metrics.render().contains("hookrelay_circuit_state{target=\"search\"} 0") }).await;
}

#[tokio::test]
async fn rate_limit_spaces_deliveries() {
    let mut a = FakeTarget::start().await;
    let t =
        start_relay(&target("search", &a.url("/"), "    rate_limit: { per_second: 10, burst: 1 }\n"), &route("search"))
            .await;
    for n in 0..5 {
        send(&t, butter_page(n)).await;
    }
    let first = a.next().await.at;
    let mut last = first;
    for _ in 0..4 {
        last = a.next().await.at;
    }
    assert!(last - first >= Duration::from_millis(350), "5 deliveries at 10/s took {:?}", last - first);
    assert!(t.relay.metrics.render().contains("hookrelay_rate_limited_total{target=\"search\"}"));
}

#[tokio::test]
async fn concurrency_is_capped() {
    let mut a = FakeTarget::start().await;
    a.always(Answer::status(200).delay(Duration::from_millis(150)));
    let t = start_relay(&target("search", &a.url("/"), "    concurrency: 2\n"), &route("search")).await;
    for n in 0..6 {
        send(&t, butter_page(n)).await;
    }
    for _ in 0..6 {
        a.next().await;
    }
    assert_eq!(a.max_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_dead_target_does_not_slow_a_healthy_one() {
    // "dead" accepts connections and never answers.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/", dead.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = dead.accept().await {
            conns.push(c);
        }
    });
    let mut healthy = FakeTarget::start().await;
    let targets =
        [target("dead", &dead_url, "    timeout: 10s\n    concurrency: 2\n"), target("healthy", &healthy.url("/"), "")]
            .join("");
    let t = start_relay(&targets, &route("dead, healthy")).await;
    let started = Instant::now();
    for n in 0..20 {
        send(&t, butter_page(n)).await;
    }
    for _ in 0..20 {
        healthy.next().await;
    }
    assert!(started.elapsed() < Duration::from_secs(5), "healthy target took {:?}", started.elapsed());
    held.abort();
}

#[tokio::test]
async fn gone_410_pauses_the_target_and_holds_its_queue() {
    let mut a = FakeTarget::start().await;
    a.script([Answer::status(410)]);
    let t = start_relay(&target("search", &a.url("/"), FAST_RETRY), &route("search")).await;
    let id = send(&t, butter_page(1)).await;
    a.next().await;
    eventually("paused", || async { t.store.paused_targets().await.unwrap().contains("search") }).await;
    send(&t, butter_page(2)).await;
    a.nothing_for(Duration::from_millis(400)).await;
    assert!(matches!(state_of(&t, id, "search").await, DeliveryState::Pending { .. }));
}

/// Nothing goes out once the target has answered 410: not the next
/// delivery the freed slot would take before the worker hears of the 410.
#[tokio::test]
async fn nothing_is_sent_after_a_410() {
    let mut a = FakeTarget::start().await;
    a.always(Answer::status(410).delay(Duration::from_millis(300)));
    let t = start_relay(&target("search", &a.url("/"), "    concurrency: 1\n"), &route("search")).await;
    for n in 0..5 {
        send(&t, butter_page(n)).await;
    }
    a.next().await;
    eventually("paused", || async { t.store.paused_targets().await.unwrap().contains("search") }).await;
    a.nothing_for(Duration::from_millis(800)).await;
    assert_eq!(t.store.counts("search").await.unwrap().queued, 5, "all five still queued");
}

#[tokio::test]
async fn queue_gauges_follow_the_store() {
    let mut a = FakeTarget::start().await;
    a.always(Answer::status(400));
    let t = start_relay(&target("search", &a.url("/"), ""), &route("search")).await;
    send(&t, butter_page(1)).await;
    a.next().await;
    eventually("dead letter counted", || async {
        t.relay.metrics.render().contains("hookrelay_dead_letters{target=\"search\"} 1")
    })
    .await;
    let text = t.relay.metrics.render();
    assert!(text.contains("hookrelay_deliveries_total{outcome=\"dead\",target=\"search\"} 1"), "{text}");
}

/// A CA, and a server certificate for 127.0.0.1 and localhost signed by it.
fn test_pki() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let der_key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(hookrelay::ingress::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der_key)
        .unwrap();
    (ca.pem(), server)
}

#[tokio::test]
async fn https_target_is_trusted_through_its_ca_file() {
    let (ca_pem, server) = test_pki();
    let mut a = FakeTarget::start_tls(server).await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("internal-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = format!("https://127.0.0.1:{}/hook", a.addr.port());
    let t =
        start_relay(&target("search", &url, &format!("    ca_file: \"{}\"\n", ca_file.display())), &route("search"))
            .await;
    let id = send(&t, butter_page(1)).await;
    assert_eq!(a.next().await.headers["webhook-id"], id.to_string().as_str());
    eventually("delivered", || async { matches!(state_of(&t, id, "search").await, DeliveryState::Delivered { .. }) })
        .await;
}

#[tokio::test]
async fn https_target_with_an_untrusted_certificate_is_not_delivered_to() {
    let (_, server) = test_pki();
    let mut a = FakeTarget::start_tls(server).await;
    let url = format!("https://127.0.0.1:{}/hook", a.addr.port());
    let t = start_relay(&target("search", &url, FAST_RETRY), &route("search")).await;
    let id = send(&t, butter_page(1)).await;
    eventually("a failed attempt", || async {
        t.store.deliveries(id).await.unwrap()[0].record.attempts.first().and_then(|a| a.error.clone()).is_some()
    })
    .await;
    let error = t.store.deliveries(id).await.unwrap()[0].record.attempts[0].error.clone().unwrap();
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    a.nothing_for(Duration::from_millis(100)).await;
}
