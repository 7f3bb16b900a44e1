use std::time::UNIX_EPOCH;

use super::*;
use http::HeaderValue;

const BODY: &[u8] = br#"{"event":"content.published","occurred_at":"2025-05-03T12:00:00Z","data":{"type":"posts","id":"7K4p9xQ2mR","slug":"my-first-post"}}"#;

fn secrets(list: &[&str]) -> Vec<Secret> {
    list.iter().map(|s| Secret::new(s.as_bytes())).collect()
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    h
}

fn check(auth: &Auth, pairs: &[(&str, &str)]) -> Result<(), AuthFailure> {
    verify(auth, &headers(pairs), Bytes::from_static(BODY), SystemTime::now()).map(|_| ())
}

fn header_auth() -> Auth {
    Auth::Header { header: "x-webhook-secret".parse().unwrap(), values: secrets(&["old-secret", "new-secret"]) }
}

#[test]
fn header_secret_accepts_each_rotated_value() {
    assert_eq!(check(&header_auth(), &[("x-webhook-secret", "old-secret")]), Ok(()));
    assert_eq!(check(&header_auth(), &[("x-webhook-secret", "new-secret")]), Ok(()));
}

#[test]
fn header_secret_refuses_wrong_and_missing() {
    assert_eq!(
        check(&header_auth(), &[("x-webhook-secret", "new-secreT")]),
        Err(AuthFailure::Mismatch("header value"))
    );
    assert_eq!(check(&header_auth(), &[("x-webhook-secret", "")]), Err(AuthFailure::Mismatch("header value")));
    assert_eq!(check(&header_auth(), &[]), Err(AuthFailure::Missing("x-webhook-secret".into())));
}

fn comet_auth(algorithm: HmacAlgorithm, encoding: Encoding) -> Auth {
    Auth::Hmac {
        header: "x-cometcms-signature".parse().unwrap(),
        algorithm,
        encoding,
        prefix: "sha256=".into(),
        secrets: secrets(&["retired", "comet-secret"]),
    }
}

#[test]
fn hmac_hex_sha256_matches_cometcms_documentation() {
    // The value CometCMS documents: "sha256=" + hex HMAC-SHA256 of the raw body.
    let sig = format!("sha256={}", encode_hex(&hmac(HmacAlgorithm::Sha256, b"comet-secret", &[BODY])));
    assert_eq!(check(&comet_auth(HmacAlgorithm::Sha256, Encoding::Hex), &[("x-cometcms-signature", &sig)]), Ok(()));
    // Uppercase hex is the same signature.
    let upper = format!("sha256={}", encode_hex(&hmac(HmacAlgorithm::Sha256, b"comet-secret", &[BODY])).to_uppercase());
    assert_eq!(check(&comet_auth(HmacAlgorithm::Sha256, Encoding::Hex), &[("x-cometcms-signature", &upper)]), Ok(()));
    // A sign is not a hex digit: "+a" is not the byte 0x0a.
    assert_eq!(decode_hex("0a1f"), Some(vec![0x0a, 0x1f]));
    assert_eq!(decode_hex("+a1f"), None);
    assert_eq!(decode_hex("0a-1"), None);
}

#[test]
fn hmac_known_vector() {
    // RFC 4231 test case 2.
    let mac = hmac(HmacAlgorithm::Sha256, b"Jefe", &[b"what do ya want ", b"for nothing?"]);
    assert_eq!(encode_hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

#[test]
fn hmac_every_algorithm_and_encoding() {
    for alg in [HmacAlgorithm::Sha1, HmacAlgorithm::Sha256, HmacAlgorithm::Sha512] {
        let mac = hmac(alg, b"retired", &[BODY]);
        let hex = format!("sha256={}", encode_hex(&mac));
        let b64 = format!("sha256={}", B64.encode(&mac));
        assert_eq!(check(&comet_auth(alg, Encoding::Hex), &[("x-cometcms-signature", &hex)]), Ok(()), "{alg:?} hex");
        assert_eq!(check(&comet_auth(alg, Encoding::Base64), &[("x-cometcms-signature", &b64)]), Ok(()), "{alg:?} b64");
        // The same MAC under the other encoding is malformed, not accepted.
        assert!(check(&comet_auth(alg, Encoding::Hex), &[("x-cometcms-signature", &b64)]).is_err());
    }
}

#[test]
fn hmac_wrong_signature_and_malformed_headers() {
    let auth = comet_auth(HmacAlgorithm::Sha256, Encoding::Hex);
    let wrong = format!("sha256={}", encode_hex(&hmac(HmacAlgorithm::Sha256, b"guess", &[BODY])));
    assert_eq!(check(&auth, &[("x-cometcms-signature", &wrong)]), Err(AuthFailure::Mismatch("HMAC signature")));
    let no_prefix = encode_hex(&hmac(HmacAlgorithm::Sha256, b"comet-secret", &[BODY]));
    assert!(matches!(check(&auth, &[("x-cometcms-signature", &no_prefix)]), Err(AuthFailure::Malformed { .. })));
    assert!(matches!(check(&auth, &[("x-cometcms-signature", "sha256=zz")]), Err(AuthFailure::Malformed { .. })));
    assert!(matches!(check(&auth, &[("x-cometcms-signature", "sha256=abc")]), Err(AuthFailure::Malformed { .. })));
    assert_eq!(check(&auth, &[("x-cometcms-signature", "sha256=")]), Err(AuthFailure::Mismatch("HMAC signature")));
    assert_eq!(check(&auth, &[]), Err(AuthFailure::Missing("x-cometcms-signature".into())));
}

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn sw_auth(list: &[&str]) -> Auth {
    Auth::StandardWebhooks {
        secrets: list.iter().map(|s| crate::config::standard_webhooks_secret(s).unwrap()).collect(),
        tolerance: Duration::from_secs(300),
    }
}

fn sw_headers(id: &str, ts: i64, sig: &str) -> Vec<(String, String)> {
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        ("webhook-signature".into(), sig.into()),
    ]
}

fn check_owned(auth: &Auth, pairs: &[(String, String)]) -> Result<(), AuthFailure> {
    let refs: Vec<(&str, &str)> = pairs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    check(auth, &refs)
}

fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn standard_webhooks_reference_vector() {
    // The example from the Standard Webhooks specification's reference libraries.
    let key = crate::config::standard_webhooks_secret(WHSEC).unwrap();
    let body = br#"{"test": 2432232314}"#;
    assert_eq!(
        standard_webhooks_signature(key.expose(), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
}

#[test]
fn standard_webhooks_valid_rotated_and_multiple_signatures() {
    let other = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=";
    let auth = sw_auth(&[other, WHSEC]);
    let key = crate::config::standard_webhooks_secret(WHSEC).unwrap();
    let ts = now_s();
    let good = standard_webhooks_signature(key.expose(), "msg_1", ts, BODY);
    assert_eq!(check_owned(&auth, &sw_headers("msg_1", ts, &good)), Ok(()));
    // Several space-separated signatures: one good one suffices.
    let several = format!("v1,AAAA v2,zzz {good}");
    assert_eq!(check_owned(&auth, &sw_headers("msg_1", ts, &several)), Ok(()));
    // The signature covers the id: another id does not verify.
    assert_eq!(check_owned(&auth, &sw_headers("msg_2", ts, &good)), Err(AuthFailure::Mismatch("webhook-signature")));
}

#[test]
fn standard_webhooks_stale_or_future_timestamp_is_refused() {
    let auth = sw_auth(&[WHSEC]);
    let key = crate::config::standard_webhooks_secret(WHSEC).unwrap();
    for ts in [now_s() - 301, now_s() + 301] {
        let sig = standard_webhooks_signature(key.expose(), "msg_1", ts, BODY);
        assert!(matches!(check_owned(&auth, &sw_headers("msg_1", ts, &sig)), Err(AuthFailure::StaleTimestamp(_))));
    }
    let ts = now_s() - 290;
    let sig = standard_webhooks_signature(key.expose(), "msg_1", ts, BODY);
    assert_eq!(check_owned(&auth, &sw_headers("msg_1", ts, &sig)), Ok(()));
}

#[test]
fn standard_webhooks_malformed_headers() {
    let auth = sw_auth(&[WHSEC]);
    let ts = now_s();
    assert!(matches!(check_owned(&auth, &sw_headers("msg_1", ts, "v2,abc")), Err(AuthFailure::Malformed { .. })));
    assert!(matches!(check_owned(&auth, &sw_headers("msg_1", ts, "garbage")), Err(AuthFailure::Malformed { .. })));
    let mut h = sw_headers("msg_1", ts, "v1,AAAA");
    h[1].1 = "yesterday".into();
    assert!(matches!(check_owned(&auth, &h), Err(AuthFailure::Malformed { .. })));
    assert_eq!(check(&auth, &[("webhook-id", "x")]), Err(AuthFailure::Missing("webhook-timestamp".into())));
}

fn basic_auth() -> Auth {
    Auth::Basic { username: Secret::new("butter"), passwords: secrets(&["p1", "p2"]) }
}

#[test]
fn basic_accepts_rotated_passwords_and_refuses_others() {
    let hdr = |u: &str, p: &str| format!("Basic {}", B64.encode(format!("{u}:{p}")));
    assert_eq!(check(&basic_auth(), &[("authorization", &hdr("butter", "p1"))]), Ok(()));
    assert_eq!(check(&basic_auth(), &[("authorization", &hdr("butter", "p2"))]), Ok(()));
    assert!(matches!(check(&basic_auth(), &[("authorization", &hdr("butter", "p3"))]), Err(AuthFailure::Mismatch(_))));
    assert!(matches!(check(&basic_auth(), &[("authorization", &hdr("other", "p1"))]), Err(AuthFailure::Mismatch(_))));
    assert!(matches!(check(&basic_auth(), &[("authorization", "Bearer x")]), Err(AuthFailure::Malformed { .. })));
    // The scheme's name in any case.
    let lower = format!("basic {}", B64.encode("butter:p1"));
    assert_eq!(check(&basic_auth(), &[("authorization", &lower)]), Ok(()));
    let upper = format!("BASIC {}", B64.encode("butter:p2"));
    assert_eq!(check(&basic_auth(), &[("authorization", &upper)]), Ok(()));
    assert!(matches!(check(&basic_auth(), &[("authorization", "Basic !!!")]), Err(AuthFailure::Malformed { .. })));
    let no_colon = format!("Basic {}", B64.encode("butter"));
    assert!(matches!(check(&basic_auth(), &[("authorization", &no_colon)]), Err(AuthFailure::Malformed { .. })));
}

#[test]
fn none_accepts_anything_and_failures_never_show_secrets() {
    assert_eq!(check(&Auth::None, &[]), Ok(()));
    let err = check(&header_auth(), &[("x-webhook-secret", "new-secreX")]).unwrap_err();
    let text = format!("{err} {err:?} {:?}", header_auth());
    assert!(!text.contains("new-secret") && !text.contains("old-secret"), "{text}");
}
