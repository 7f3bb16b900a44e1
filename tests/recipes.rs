//! README's recipes (the files in recipes/): each compiles, stands in README
//! word for word, and its transform turns the vendors' sample webhooks into
//! the body the receiving API documents.

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::*;
use hookrelay::config::Settings;
use hookrelay::jq::{Lane, Output};
use hookrelay::store::{EventId, EventMeta, StoredEvent};
use serde_json::Value;

const FIXTURES: &[&str] = &[
    "buttercms-page-published.json",
    "buttercms-page-published-es.json",
    "buttercms-page-delete.json",
    "buttercms-post-published.json",
    "buttercms-collectionitem-published.json",
    "cometcms-content-published.json",
    "cometcms-content-deleted.json",
];

fn recipe(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values a user would put in the environment.
fn env(name: &str) -> Option<String> {
    Some(
        match name {
            "SITE_URL" => "https://www.example.com",
            "GITHUB_REPOSITORY" => "acme/site",
            "CF_ZONE_ID" => "023e105f4ecef8ad9ca31a8372d0c353",
            "SLACK_WEBHOOK_URL" => "https://hooks.slack.com/services/T000/B000/XXXX",
            "DISCORD_WEBHOOK_URL" => "https://discord.com/api/webhooks/123/abc",
            other => return Some(format!("{}-value", other.to_lowercase())),
        }
        .to_string(),
    )
}

/// The recipe under the two CMS sources, as `routes.yaml` would hold it.
fn settings(name: &str) -> Settings {
    let text = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
sources:
  - name: buttercms
    path: /hooks/buttercms
    format: buttercms
    auth: {{ type: header, header: X-Webhook-Secret, values: ["x"] }}
  - name: cometcms
    path: /hooks/cometcms
    format: cometcms
    auth: {{ type: hmac, header: X-CometCMS-Signature, prefix: "sha256=", secrets: ["y"] }}
{}"#,
        recipe(name)
    );
    hookrelay::config::load_str(&text, Path::new("/nonexistent/routes.yaml"), &env)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every (target, body sent) that the fixtures make through the recipe's
/// routes, filters and transforms, run in the real sandbox.
async fn bodies(settings: &Settings) -> Vec<(String, String, Value)> {
    hookrelay::jq::set_worker_exe(PathBuf::from(env!("CARGO_BIN_EXE_hookrelay")));
    let lane = Lane::new("recipes");
    let mut out = Vec::new();
    for fixture_name in FIXTURES {
        let body = fixture(fixture_name);
        let source = settings.sources.iter().find(|s| fixture_name.starts_with(&s.name)).unwrap();
        let parsed = hookrelay::ingress::formats::parse(&source.format, &http::HeaderMap::new(), &body).unwrap();
        let mut verdicts = Vec::new();
        for route in source.routes.iter().filter(|r| r.matches(&parsed.event)) {
            if let Some(filter) = &route.filter {
                let pass = lane
                    .filter(filter, &source.name, &parsed.event, &Bytes::from(body.clone()), Some(&parsed.json))
                    .await;
                verdicts
                    .push((route.key.clone(), pass.unwrap_or_else(|f| panic!("{fixture_name}: filter failed: {f}"))));
            }
        }
        let targets = source.targets_for(&parsed.event, |r| verdicts.iter().any(|(k, pass)| *k == r.key && *pass));
        let event = StoredEvent {
            id: EventId::new(),
            meta: EventMeta {
                source: source.name.clone(),
                event: parsed.event.clone(),
                received_ms: 0,
                content_type: Some("application/json".into()),
                targets: targets.iter().map(|t| t.to_string()).collect(),
                dedup: vec![],
                order: Default::default(),
                group: Default::default(),
            },
            body: Bytes::from(body.clone()),
        };
        for name in targets {
            let target = settings.targets.iter().find(|t| t.name == name).unwrap();
            let program = target.transform.as_ref().expect("every recipe target has a transform");
            match lane.transform(program, &event).await.unwrap() {
                Output::Value(json) => {
                    let value: Value = serde_json::from_slice(&json).unwrap();
                    out.push((name.to_string(), fixture_name.to_string(), value));
                }
                other => panic!("{name} on {fixture_name}: {other:?}"),
            }
        }
    }
    out
}

fn recipes_in_readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The recipe stands in README as it is in its file, so that what users copy is what is tested.
fn assert_in_readme(name: &str) {
    let text = recipe(name);
    assert!(recipes_in_readme().contains(text.trim()), "README does not show recipes/{name} as it is");
}

fn header<'a>(settings: &'a Settings, target: &str, name: &str) -> &'a str {
    let t = settings.targets.iter().find(|t| t.name == target).unwrap();
    t.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.to_str().unwrap()).unwrap_or("")
}

fn fixtures_for<'a>(bodies: &'a [(String, String, Value)], target: &str) -> Vec<&'a str> {
    bodies.iter().filter(|(t, _, _)| t == target).map(|(_, f, _)| f.as_str()).collect()
}

#[tokio::test]
async fn slack_gets_a_text_line_for_every_change() {
    assert_in_readme("slack.yaml");
    let s = settings("slack.yaml");
    let bodies = bodies(&s).await;
    assert_eq!(bodies.len(), FIXTURES.len(), "every fixture reaches Slack");
    for (_, fixture, body) in &bodies {
        // Slack: an object whose `text` is the message.
        let text = body["text"].as_str().unwrap_or_else(|| panic!("{fixture}: {body}"));
        assert!(!text.is_empty() && !text.contains("null"), "{fixture}: {text}");
    }
    let texts: Vec<&str> = bodies.iter().map(|(_, _, b)| b["text"].as_str().unwrap()).collect();
    assert!(texts.contains(&"ButterCMS page.published: Product Launch Landing Page"), "{texts:?}");
    assert!(texts.contains(&"CometCMS content.deleted: pages/about-us"), "{texts:?}");
}

#[tokio::test]
async fn discord_gets_content_within_its_limit() {
    assert_in_readme("discord.yaml");
    let s = settings("discord.yaml");
    let bodies = bodies(&s).await;
    assert_eq!(fixtures_for(&bodies, "discord").len(), 4, "published pages and posts, and CometCMS content");
    for (_, fixture, body) in &bodies {
        // Discord's execute-webhook body: `content` of 1 to 2,000 characters, `username` up to 80.
        let content = body["content"].as_str().unwrap_or_else(|| panic!("{fixture}: {body}"));
        assert!((1..=2000).contains(&content.chars().count()), "{fixture}: {content}");
        assert!(body["username"].as_str().is_some_and(|u| u.chars().count() <= 80));
        assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    }
}

#[tokio::test]
async fn cloudflare_purges_the_changed_pages_url() {
    assert_in_readme("cloudflare-purge.yaml");
    let s = settings("cloudflare-purge.yaml");
    let t = s.targets.iter().find(|t| t.name == "cloudflare").unwrap();
    assert_eq!(
        t.url.to_string(),
        "https://api.cloudflare.com/client/v4/zones/023e105f4ecef8ad9ca31a8372d0c353/purge_cache"
    );
    assert_eq!(header(&s, "cloudflare", "authorization"), "Bearer cf_api_token-value");
    let bodies = bodies(&s).await;
    let urls: Vec<(&str, &str)> = bodies
        .iter()
        .map(|(_, f, b)| (f.as_str(), b["files"][0].as_str().unwrap_or_else(|| panic!("{f}: {b}"))))
        .collect();
    for (fixture, body) in bodies.iter().map(|(_, f, b)| (f, b)) {
        // Purge by URL: `files`, 1 to 30 absolute URLs, and nothing else.
        let files = body["files"].as_array().unwrap();
        assert!((1..=30).contains(&files.len()) && body.as_object().unwrap().len() == 1, "{fixture}: {body}");
    }
    assert_eq!(
        urls,
        [
            ("buttercms-page-published.json", "https://www.example.com/product-launch"),
            ("buttercms-page-published-es.json", "https://www.example.com/homepage"),
            ("buttercms-page-delete.json", "https://www.example.com/old-promotion"),
            ("buttercms-post-published.json", "https://www.example.com/blog/announcing-new-features"),
            ("cometcms-content-published.json", "https://www.example.com/blog/my-first-post"),
            ("cometcms-content-deleted.json", "https://www.example.com/about-us"),
        ]
    );
}

#[tokio::test]
async fn github_gets_a_repository_dispatch_event() {
    assert_in_readme("github-dispatch.yaml");
    let s = settings("github-dispatch.yaml");
    let t = s.targets.iter().find(|t| t.name == "github").unwrap();
    assert_eq!(t.url.to_string(), "https://api.github.com/repos/acme/site/dispatches");
    assert_eq!(header(&s, "github", "accept"), "application/vnd.github+json");
    assert_eq!(header(&s, "github", "x-github-api-version"), "2022-11-28");
    assert!(header(&s, "github", "authorization").starts_with("Bearer "));
    let bodies = bodies(&s).await;
    assert_eq!(bodies.len(), 6, "pages, posts and CometCMS content");
    for (_, fixture, body) in &bodies {
        // repository_dispatch: `event_type` of at most 100 characters, and a
        // `client_payload` object of at most 10 top-level properties.
        let event_type = body["event_type"].as_str().unwrap_or_else(|| panic!("{fixture}: {body}"));
        assert!((1..=100).contains(&event_type.len()));
        let payload = body["client_payload"].as_object().unwrap_or_else(|| panic!("{fixture}: {body}"));
        assert!(payload.len() <= 10);
        assert!(payload["id"].as_str().unwrap().starts_with("evt_"));
        assert_eq!(body.as_object().unwrap().len(), 2);
    }
}

#[tokio::test]
async fn build_hooks_fire_for_published_default_locale_content() {
    assert_in_readme("build-hooks.yaml");
    let s = settings("build-hooks.yaml");
    let bodies = bodies(&s).await;
    let expected = [
        "buttercms-page-published.json",
        "buttercms-page-delete.json",
        "buttercms-post-published.json",
        "cometcms-content-published.json",
        "cometcms-content-deleted.json",
    ];
    // The Spanish page (a locale) and the collection item start no build.
    assert_eq!(fixtures_for(&bodies, "netlify"), expected);
    assert_eq!(fixtures_for(&bodies, "vercel"), expected);
    for (target, fixture, body) in &bodies {
        // Netlify takes any JSON body (INCOMING_HOOK_BODY); Vercel's deploy hook needs none.
        match target.as_str() {
            "vercel" => assert_eq!(body, &serde_json::json!({}), "{fixture}"),
            _ => assert!(body["event"].is_string() && body["source"].is_string(), "{fixture}: {body}"),
        }
    }
    let netlify = s.targets.iter().find(|t| t.name == "netlify").unwrap();
    assert_eq!(netlify.url.host(), Some("api.netlify.com"));
    for target in &s.targets {
        let Some(hookrelay::config::Sequencing::Debounced(d)) = &target.sequencing else {
            panic!("{}: a burst of publishes must be one build", target.name)
        };
        assert_eq!((d.window.as_secs(), d.max_wait.as_secs()), (30, 300));
    }
}
