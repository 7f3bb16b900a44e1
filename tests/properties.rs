//! Property tests: whatever bytes a stranger sends, and whatever a config file
//! holds, the parsers answer with a value or a clear error — never a panic.

use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hookrelay::config::{self, Auth, Encoding, EventLocator, Format, HmacAlgorithm, Secret};
use hookrelay::ingress::{auth, formats};
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

fn formats_all() -> Vec<Format> {
    vec![
        Format::ButterCms,
        Format::CometCms,
        Format::Generic(EventLocator::Pointer("/type".into())),
        Format::Generic(EventLocator::Pointer("/a/b/0".into())),
        Format::Generic(EventLocator::Header(HeaderName::from_static("x-event"))),
    ]
}

fn auths_all() -> Vec<Auth> {
    let secrets = || vec![Secret::new("s1"), Secret::new("s2")];
    vec![
        Auth::None,
        Auth::Header { header: HeaderName::from_static("x-secret"), values: secrets() },
        Auth::Hmac {
            header: HeaderName::from_static("x-sig"),
            algorithm: HmacAlgorithm::Sha256,
            encoding: Encoding::Hex,
            prefix: "sha256=".into(),
            secrets: secrets(),
        },
        Auth::Hmac {
            header: HeaderName::from_static("x-sig"),
            algorithm: HmacAlgorithm::Sha512,
            encoding: Encoding::Base64,
            prefix: String::new(),
            secrets: secrets(),
        },
        Auth::StandardWebhooks { secrets: secrets(), tolerance: Duration::from_secs(300) },
        Auth::Basic { username: Secret::new("u"), passwords: secrets() },
    ]
}

/// Header values as a sender could send them: any bytes a header value may hold.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(
            any::<u8>().prop_filter("visible", |b| *b == b'\t' || (*b >= 0x20 && *b != 0x7f)),
            0..80
        ),
        "(sha256=|v1,|Basic |Bearer )?[A-Za-z0-9+/=:. -]{0,60}".prop_map(String::into_bytes),
    ]
}

fn headers_from(pairs: &[(&'static str, Vec<u8>)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            h.append(HeaderName::from_static(name), v);
        }
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn format_parsers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..600), event in header_value()) {
        let headers = headers_from(&[("x-event", event), ("webhook-id", b"msg_1".to_vec())]);
        for f in formats_all() {
            let _ = formats::parse(&f, &headers, &body);
        }
    }

    #[test]
    fn format_parsers_never_panic_on_json_shapes(json in arbitrary_json()) {
        let body = json.to_string().into_bytes();
        for f in formats_all() {
            if let Ok(parsed) = formats::parse(&f, &HeaderMap::new(), &body) {
                // Whatever is accepted has a printable event name, as the header needs.
                prop_assert!(!parsed.event.is_empty() && parsed.event.bytes().all(|b| b.is_ascii_graphic()));
            }
        }
    }

    #[test]
    fn auth_verifiers_never_panic_and_refuse_garbage(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        a in header_value(), b in header_value(), c in header_value(), d in header_value(),
    ) {
        let headers = headers_from(&[
            ("x-secret", a.clone()), ("x-sig", b), ("webhook-id", c.clone()),
            ("webhook-timestamp", d), ("webhook-signature", a), ("authorization", c),
        ]);
        for auth_kind in auths_all() {
            let verified = auth::verify(&auth_kind, &headers, Bytes::from(body.clone()), SystemTime::now());
            // Only `none` accepts without knowing a secret (a random guess of "s1"
            // in x-secret is possible, so the header kind is left out).
            if !matches!(auth_kind, Auth::None | Auth::Header { .. }) {
                prop_assert!(verified.is_err());
            }
        }
    }

    #[test]
    fn config_loader_never_panics_on_any_text(text in "\\PC{0,400}") {
        let _ = config::load_str(&text, Path::new("/nonexistent/routes.yaml"), &|_| None);
    }

    #[test]
    fn config_loader_never_panics_on_yaml_shapes(yaml in arbitrary_yaml()) {
        let text = serde_yaml::to_string(&yaml).unwrap_or_default();
        if let Err(e) = config::load_str(&text, Path::new("/nonexistent/routes.yaml"), &|_| Some("x".into())) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn units_never_panic(s in "\\PC{0,30}") {
        let _ = config::parse_duration(&s);
        let _ = config::parse_size(&s);
    }
}

/// JSON trees that look like webhooks now and then.
fn arbitrary_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z.* ]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::hash_map(
                prop_oneof![
                    Just("data".to_string()),
                    Just("webhook".to_string()),
                    Just("event".to_string()),
                    Just("type".to_string()),
                    Just("id".to_string()),
                    Just("occurred_at".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// YAML trees using the config's own keys.
fn arbitrary_yaml() -> impl Strategy<Value = serde_yaml::Value> {
    let key = prop_oneof![
        Just("server"),
        Just("sources"),
        Just("targets"),
        Just("routes"),
        Just("name"),
        Just("path"),
        Just("format"),
        Just("auth"),
        Just("type"),
        Just("url"),
        Just("events"),
        Just("retry"),
        Just("max_backoff"),
        Just("concurrency"),
        Just("listen"),
        Just("secrets"),
        Just("header"),
    ];
    let leaf = prop_oneof![
        Just(serde_yaml::Value::Null),
        any::<i32>().prop_map(|n| serde_yaml::Value::from(n as i64)),
        "[a-z0-9/:.*${}_-]{0,16}".prop_map(serde_yaml::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_yaml::Value::Sequence),
            proptest::collection::vec((key.clone(), inner), 0..5).prop_map(|kv| {
                serde_yaml::Value::Mapping(kv.into_iter().map(|(k, v)| (serde_yaml::Value::from(k), v)).collect())
            }),
        ]
    })
}
