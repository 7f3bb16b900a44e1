//! Signature checks cost the same wherever a forged signature differs from the
//! real one, so an attacker cannot learn it a byte at a time from response times.
//!
//! Wall-clock timings of a 32-byte comparison drown in noise; instruction
//! counts do not. The test runs itself under `valgrind --tool=callgrind` (one
//! child per case) and compares the instructions executed when the forgery is
//! wrong in its first byte with those when it is wrong in its last byte. A
//! naive early-exit comparison, measured the same way, shows that the method
//! sees a difference when there is one.

use std::process::Command;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hookrelay::config::{Auth, Encoding, HmacAlgorithm, Secret};
use hookrelay::ingress::auth::{encode_hex, hmac, standard_webhooks_signature, verify};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Verifications per child: enough to dwarf the harness's own noise.
const ROUNDS: usize = 400;
const CASE_VAR: &str = "HOOKRELAY_TIMING_CASE";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const BODY: &[u8] = br#"{"data":{"id":"page-1"},"webhook":{"event":"page.published"}}"#;

/// `bytes` with byte `at` changed (the low bit flipped, which keeps a hex digit a digit and a letter a letter).
fn forged(mut bytes: Vec<u8>, at: usize) -> Vec<u8> {
    bytes[at] ^= 1;
    bytes
}

/// One case: the auth settings and a request whose credential is wrong at byte `at`
/// (`at` counts from the start of the compared value).
fn case(kind: &str, last: bool) -> Option<(Auth, HeaderMap)> {
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: &[u8]| {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_bytes(value).unwrap());
    };
    let auth = match kind {
        "header" => {
            let at = if last { SECRET.len() - 1 } else { 0 };
            set("x-webhook-secret", &forged(SECRET.to_vec(), at));
            Auth::Header { header: HeaderName::from_static("x-webhook-secret"), values: vec![Secret::new(SECRET)] }
        }
        "hmac" => {
            let mac = hmac(HmacAlgorithm::Sha256, SECRET, &[BODY]);
            let at = if last { mac.len() - 1 } else { 0 };
            set("x-signature", format!("sha256={}", encode_hex(&forged(mac, at))).as_bytes());
            Auth::Hmac {
                header: HeaderName::from_static("x-signature"),
                algorithm: HmacAlgorithm::Sha256,
                encoding: Encoding::Hex,
                prefix: "sha256=".into(),
                secrets: vec![Secret::new(SECRET)],
            }
        }
        "basic" => {
            use base64::Engine;
            let password = b"0123456789abcdef".to_vec();
            let at = if last { password.len() - 1 } else { 0 };
            let mut credentials = b"relay:".to_vec();
            credentials.extend(forged(password.clone(), at));
            let header = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials));
            set("authorization", header.as_bytes());
            Auth::Basic { username: Secret::new("relay"), passwords: vec![Secret::new(password)] }
        }
        "standard-webhooks" => {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD;
            let now = hookrelay::store::unix_secs(SystemTime::now());
            let good = standard_webhooks_signature(SECRET, "msg_1", now, BODY);
            let mac = b64.decode(good.trim_start_matches("v1,")).unwrap();
            let at = if last { mac.len() - 1 } else { 0 };
            set("webhook-id", b"msg_1");
            set("webhook-timestamp", now.to_string().as_bytes());
            set("webhook-signature", format!("v1,{}", b64.encode(forged(mac, at))).as_bytes());
            Auth::StandardWebhooks { secrets: vec![Secret::new(SECRET)], tolerance: Duration::from_secs(300) }
        }
        _ => return None,
    };
    Some((auth, headers))
}

/// An early-exit comparison, the kind this test must catch.
fn naive_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    for i in 0..a.len() {
        if a[i] != b[i] {
            return false;
        }
    }
    true
}

/// The child's work: `ROUNDS` checks of one case, run by the parent under
/// valgrind (`--ignored`); alone it does nothing.
#[test]
#[ignore = "run by a_forged_signature_costs_the_same_wherever_it_is_wrong under valgrind"]
fn timing_child() {
    let Ok(spec) = std::env::var(CASE_VAR) else { return };
    let (kind, position) = spec.split_once(':').unwrap();
    let last = position == "last";
    if kind == "naive" {
        let wrong = forged(SECRET.to_vec(), if last { SECRET.len() - 1 } else { 0 });
        for _ in 0..ROUNDS {
            assert!(!naive_eq(std::hint::black_box(SECRET), std::hint::black_box(&wrong)));
        }
        return;
    }
    let (auth, headers) = case(kind, last).unwrap();
    let now = SystemTime::now();
    for _ in 0..ROUNDS {
        assert!(verify(&auth, &headers, Bytes::from_static(BODY), now).is_err());
    }
}

/// Instructions executed by the child running `kind` wrong at its first or last byte.
fn instructions(kind: &str, position: &str) -> u64 {
    // coreutils' timeout bounds each child (normally a few seconds).
    let out = Command::new("timeout")
        .args(["300", "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "timing_child", "--ignored", "--test-threads=1", "--quiet"])
        .env(CASE_VAR, format!("{kind}:{position}"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{kind}:{position} failed under valgrind:\n{log}");
    log.lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no instruction count from callgrind:\n{log}"))
}

#[test]
fn a_forged_signature_costs_the_same_wherever_it_is_wrong() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("SKIPPED: valgrind is not installed (.ci/run installs it)");
        return;
    }
    let spread = |kind: &str| {
        let (first, last) = (instructions(kind, "first"), instructions(kind, "last"));
        println!("{kind:>18}: wrong at the first byte {first} instructions, at the last {last}");
        first.abs_diff(last)
    };
    // The naive comparison walks 31 more bytes per check when the difference is last.
    let naive = spread("naive");
    assert!(naive >= 31 * ROUNDS as u64, "the measurement cannot see an early exit: {naive}");
    for kind in ["header", "hmac", "standard-webhooks", "basic"] {
        let diff = spread(kind);
        assert!(diff * 20 < naive, "{kind}: {diff} instructions apart, the naive comparison {naive}");
    }
}
