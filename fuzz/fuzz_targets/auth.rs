//! Any headers and body against every auth kind: no panic, and no acceptance
//! without the secret (except `none`).
#![no_main]

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hookrelay::config::{Auth, Encoding, HmacAlgorithm, Secret};
use hookrelay::ingress::auth;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 6] = ["x-sig", "webhook-id", "webhook-timestamp", "webhook-signature", "authorization", "x-secret"];

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xff: six header values, then the body.
    let mut parts = data.split(|&b| b == 0xff);
    let mut headers = HeaderMap::new();
    for name in NAMES {
        if let Some(Ok(v)) = parts.next().map(HeaderValue::from_bytes) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    let body = Bytes::copy_from_slice(parts.next().unwrap_or_default());
    let secret = || vec![Secret::new("a fuzzer will not guess this secret 7d1e")];
    let kinds = [
        Auth::Header { header: HeaderName::from_static("x-secret"), values: secret() },
        Auth::Hmac {
            header: HeaderName::from_static("x-sig"),
            algorithm: HmacAlgorithm::Sha256,
            encoding: Encoding::Hex,
            prefix: "sha256=".into(),
            secrets: secret(),
        },
        Auth::Hmac {
            header: HeaderName::from_static("x-sig"),
            algorithm: HmacAlgorithm::Sha1,
            encoding: Encoding::Base64,
            prefix: String::new(),
            secrets: secret(),
        },
        Auth::StandardWebhooks { secrets: secret(), tolerance: Duration::from_secs(300) },
        Auth::Basic { username: Secret::new("user"), passwords: secret() },
    ];
    for kind in &kinds {
        assert!(auth::verify(kind, &headers, body.clone(), SystemTime::now()).is_err(), "accepted without the secret");
    }
    assert!(auth::verify(&Auth::None, &headers, body, SystemTime::now()).is_ok());
});
