//! `hookrelay send`: sample webhooks that the relay accepts, for every format and auth kind.

mod common;

use common::*;
use http::StatusCode;

/// Sources of every format and auth kind, beside the standard ones.
const MORE_SOURCES: &str = r#"  - name: basic
    path: /hooks/basic
    format: generic
    event_header: X-Event
    auth: { type: basic, username: cms, passwords: ["p1", "p2"] }
  - name: b64
    path: /hooks/b64
    format: generic
    event_pointer: /meta/kind
    auth: { type: hmac, header: X-Sig, algorithm: sha512, encoding: base64, secrets: ["s3cret"] }
  - name: open
    path: /hooks/open
    format: cometcms
    auth: { type: none }"#;

#[tokio::test]
async fn samples_of_every_source_are_accepted() {
    let t = start_with("", MORE_SOURCES).await;
    let settings = hookrelay::config::load(&t.dir.path().join("routes.yaml")).unwrap();
    for (source, event, routed) in [
        ("buttercms", "page.published", 2),
        ("buttercms", "post.published", 2),
        ("buttercms", "collectionitem.published", 0),
        ("cometcms", "content.published", 1),
        ("generic", "invoice.paid", 1),
        ("basic", "build.done", 0),
        ("b64", "thing.happened", 0),
        ("open", "content.deleted", 0),
    ] {
        let url = format!("http://{}{}", t.addr, settings.sources.iter().find(|s| s.name == source).unwrap().path);
        let sample = hookrelay::send::sample(&settings, source, event, Some(&url)).unwrap();
        let (status, body) = hookrelay::send::post(sample).await.unwrap();
        assert_eq!(status, 202, "{source} {event}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["targets"], routed, "{source} {event}");
        let id = answer["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(t.store.event(id).await.unwrap().unwrap().meta.event, event);
    }
}

#[tokio::test]
async fn unknown_source_and_bad_event_are_explained() {
    let t = start().await;
    let settings = hookrelay::config::load(&t.dir.path().join("routes.yaml")).unwrap();
    let err = hookrelay::send::sample(&settings, "wordpress", "x", None).unwrap_err();
    assert!(err.contains("wordpress") && err.contains("buttercms"), "{err}");
    assert!(hookrelay::send::sample(&settings, "buttercms", "has space", None).is_err());
}

#[tokio::test]
async fn the_send_command_posts_to_a_running_relay() {
    let t = start().await;
    let run = |path: &str| {
        let url = format!("http://{}{path}", t.addr);
        let config = t.dir.path().join("routes.yaml");
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
                .args(["send", "cometcms", "content.published", "--url", &url, "--config"])
                .arg(config)
                .output()
                .unwrap()
        })
    };
    let out = run("/hooks/cometcms").await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("HTTP 202"), "{stdout}");
    assert_eq!(t.store.recent_events(Some("cometcms"), 10).await.unwrap().len(), 1);
    // Signed for cometcms, posted to buttercms: refused, and send exits non-zero.
    let out = run("/hooks/buttercms").await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("HTTP {}", StatusCode::UNAUTHORIZED.as_u16())));
}
