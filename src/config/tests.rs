use std::path::Path;

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "BUTTER_SECRET" => Some("b-secret".into()),
        "SEARCH_KEY" => Some("k-123".into()),
        "CONC" => Some("4".into()),
        _ => None,
    }
}

fn load(text: &str) -> Result<Settings, ConfigError> {
    load_str(text, Path::new("/etc/hookrelay/routes.yaml"), &env)
}

/// The problems of an invalid config, as `key: message` lines.
fn problems(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => panic!("expected the config to be rejected"),
        Err(e) => e.problems().iter().map(|p| p.to_string()).collect(),
    }
}

fn assert_problem(text: &str, key: &str, words: &str) {
    let found = problems(text);
    assert!(
        found.iter().any(|p| p.starts_with(&format!("{key}: ")) && p.contains(words)),
        "expected `{key}: …{words}…` among {found:#?}"
    );
}

const MINIMAL: &str = r#"
sources:
  - name: buttercms
    path: /hooks/buttercms
    format: buttercms
    auth: { type: header, header: X-Webhook-Secret, values: ["${BUTTER_SECRET}"] }
targets:
  - name: search
    url: "http://127.0.0.1:9101/reindex"
routes:
  - source: buttercms
    events: ["page.*"]
    targets: [search]
"#;

#[test]
fn the_shipped_routes_yaml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("routes.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let s = load_str(&text, &path, &|_| None).unwrap();
    assert_eq!(s.sources.len(), 2);
    assert!(s.targets.len() >= 2);
}

#[test]
fn the_design_example_is_valid() {
    let text = r#"
server:
  listen: "0.0.0.0:8443"
  max_body: "1MiB"
  request_timeout: "10s"
admin:
  listen: "127.0.0.1:9090"
  token: "${HOOKRELAY_ADMIN_TOKEN:-0123456789abcdef}"
storage:
  path: "./data"
  cache: "64MiB"
  retention: "7d"
sources:
  - name: buttercms
    path: /hooks/buttercms
    format: buttercms
    dedup_window: "10m"
    allow_ips: ["10.0.0.0/8", "2001:db8::/32"]
    auth:
      type: header
      header: X-Webhook-Secret
      values: ["${BUTTER_SECRET}"]
  - name: cometcms
    path: /hooks/cometcms
    format: cometcms
    auth:
      type: hmac
      header: X-CometCMS-Signature
      algorithm: sha256
      encoding: hex
      prefix: "sha256="
      secrets: ["${COMET_SECRET:-x}"]
  - name: generic
    path: /hooks/generic
    format: generic
    event_pointer: "/type"
    auth:
      type: standard-webhooks
      secrets: ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
  - name: basic
    path: /hooks/basic
    format: generic
    event_header: X-Event
    auth: { type: basic, username: u, password: p, passwords: [p2] }
targets:
  - name: search
    url: "http://127.0.0.1:9101/reindex"
    timeout: "5s"
    headers: { X-Api-Key: "${SEARCH_KEY}" }
    concurrency: "${CONC}"
    rate_limit: { per_second: 20, burst: 40 }
    retry: { max_attempts: 12, initial_backoff: "1s", max_backoff: "10m", max_age: "24h" }
    circuit_breaker: { failure_threshold: 5, open_for: "30s" }
    signing_secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
  - name: cache
    url: "https://cache.internal/purge"
  - name: site-rebuild
    url: "http://127.0.0.1:9103/build"
routes:
  - source: buttercms
    events: ["page.*", "post.published", "post.delete"]
    targets: [search, cache]
  - source: cometcms
    events: ["content.published", "content.unpublished"]
    targets: [site-rebuild]
"#;
    let s = load(text).unwrap();
    let search = &s.targets[0];
    assert_eq!(search.concurrency, 4);
    assert_eq!(search.headers[0].1, "k-123");
    assert_eq!(search.rate_limit, Some(RateLimit { per_second: 20, burst: 40 }));
    assert_eq!(search.retry.max_backoff, std::time::Duration::from_secs(600));
    assert_eq!(s.targets[1].concurrency, 8, "default concurrency");
    assert_eq!(s.targets[1].retry.max_attempts, 12, "default max_attempts");
    // Relative paths are relative to the config file's folder.
    assert_eq!(s.storage.path, Path::new("/etc/hookrelay/./data"));
    let butter = &s.sources[0];
    assert_eq!(butter.targets_for("page.published", |_| true), ["search", "cache"]);
    assert!(butter.targets_for("collectionitem.published", |_| true).is_empty());
    assert!(matches!(&butter.auth, Auth::Header { values, .. } if values[0].expose() == b"b-secret"));
    assert!(matches!(&s.sources[3].auth, Auth::Basic { passwords, .. } if passwords.len() == 2));
    assert_eq!(s.admin.token.as_ref().unwrap().expose(), b"0123456789abcdef");
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let text = MINIMAL.replace(
        "    url: \"http://127.0.0.1:9101/reindex\"",
        "    url: \"http://127.0.0.1:9101/reindex\"\n    retries: 3",
    );
    assert_problem(&text, "targets[0].retries", "unknown field `retries`");
    let text = MINIMAL.replace("values: [", "value: \"x\", values: [");
    assert_problem(&text, "sources[0].auth", "unknown field `value`");
    assert_problem(&format!("{MINIMAL}\nextra: 1\n"), "extra", "unknown field `extra`");
}

#[test]
fn bad_values_name_their_key_path() {
    let t = |from: &str, to: &str| MINIMAL.replace(from, to);
    let url = "    url: \"http://127.0.0.1:9101/reindex\"";
    assert_problem(
        &t(url, &format!("{url}\n    retry: {{ max_backoff: \"soon\" }}")),
        "targets[0].retry.max_backoff",
        "invalid duration",
    );
    assert_problem(&t(url, "    url: \"ftp://x/y\""), "targets[0].url", "http://");
    assert_problem(&t(url, "    url: \"not a url\""), "targets[0].url", "not a URL");
    assert_problem(&t(url, &format!("{url}\n    concurrency: 0")), "targets[0].concurrency", "at least 1");
    assert_problem(&t(url, &format!("{url}\n    concurrency: -3")), "targets[0].concurrency", "positive whole number");
    assert_problem(
        &t(url, &format!("{url}\n    headers: {{ webhook-id: x }}")),
        "targets[0].headers.webhook-id",
        "set by hookrelay",
    );
    assert_problem(&t(url, &format!("{url}\n    signing_secret: \"whsec_!!\"")), "targets[0].signing_secret", "whsec_");
    assert_problem(
        &t(url, &format!("{url}\n    retry: {{ initial_backoff: 1m, max_backoff: 1s }}")),
        "targets[0].retry.max_backoff",
        "at most max_backoff",
    );
    assert_problem(&t(url, &format!("{url}\n    ca_file: missing.pem")), "targets[0].ca_file", "missing.pem");
    // PEM, but not a certificate: refused here, not by the first connection
    // (nor half-way through a reload).
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("ca.pem");
    std::fs::write(&bogus, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let ca_file = format!("{url}\n    ca_file: \"{}\"", bogus.display());
    assert_problem(&t(url, &ca_file), "targets[0].ca_file", "certificate 1 of");
    assert_problem(&t(url, &ca_file), "targets[0].ca_file", "is not a usable CA certificate");
    assert_problem(&t("path: /hooks/buttercms", "path: hooks"), "sources[0].path", "must start with '/'");
    assert_problem(&t("format: buttercms", "format: wordpress"), "sources[0].format", "unknown variant `wordpress`");
    assert_problem(&t("name: buttercms", "name: \"butter cms\""), "sources[0].name", "not a valid name");
    for dots in ["\".\"", "\"..\""] {
        assert_problem(&t("name: search", &format!("name: {dots}")), "targets[0].name", "not a valid name");
    }
    assert_problem(&format!("server: {{ max_body: lots }}\n{MINIMAL}"), "server.max_body", "invalid size");
    assert_problem(&format!("server: {{ listen: \"localhost\" }}\n{MINIMAL}"), "server.listen", "not an address");
    assert_problem(&format!("storage: {{ cache: 12XB }}\n{MINIMAL}"), "storage.cache", "invalid size");
    assert_problem(&format!("admin: {{ token: short }}\n{MINIMAL}"), "admin.token", "at least 16");
    assert_problem(&t("events: [\"page.*\"]", "events: [\"page*\"]"), "routes[0].events[0]", "invalid event pattern");
    assert_problem(&t("values: [\"${BUTTER_SECRET}\"]", "values: []"), "sources[0].auth.values", "at least one");
    assert_problem(&t("type: header,", "type: oauth,"), "sources[0].auth.type", "unknown variant `oauth`");
    // Time limits of nothing would refuse every request or attempt; durations
    // past a century could not be shown as dates.
    let zero = "must be longer than zero";
    assert_problem(&format!("server: {{ request_timeout: 0s }}\n{MINIMAL}"), "server.request_timeout", zero);
    assert_problem(&t(url, &format!("{url}\n    timeout: 0ms")), "targets[0].timeout", zero);
    let sw = "type: standard-webhooks, secrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"], tolerance: 0s";
    assert_problem(
        &t("type: header, header: X-Webhook-Secret, values: [\"${BUTTER_SECRET}\"]", sw),
        "sources[0].auth.tolerance",
        zero,
    );
    assert_problem(
        &t(url, &format!("{url}\n    retry: {{ max_backoff: 10000y }}")),
        "targets[0].retry.max_backoff",
        "longer than 100 years",
    );
    assert!(
        load(&t(url, &format!("{url}\n    retry: {{ max_age: 0s }}"))).is_ok(),
        "a zero max_age is not a time limit"
    );
    // An event purged within its dedup window would no longer be recognized.
    let window = |w: &str| t("format: buttercms", &format!("format: buttercms\n    dedup_window: {w}"));
    assert_problem(&window("30d"), "sources[0].dedup_window", "longer than storage.retention (7days)");
    let short = format!("storage: {{ retention: 1h }}\n{}", window("2h"));
    assert_problem(&short, "sources[0].dedup_window", "2h is longer than storage.retention (1h)");
    assert!(load(&window("7d")).is_ok(), "as long as the retention is enough");
}

#[test]
fn allow_ips_entries_are_checked() {
    let text = MINIMAL.replace(
        "    format: buttercms",
        "    format: buttercms\n    allow_ips: [\"10.0.0.0/8\", \"192.0.2.7\", \"10.0.0.0/99\"]",
    );
    assert_problem(&text, "sources[0].allow_ips[2]", "not an IP address or CIDR");
    let ok = MINIMAL.replace("    format: buttercms", "    format: buttercms\n    allow_ips: [\"192.0.2.7\", \"::1\"]");
    let s = load(&ok).unwrap();
    assert!(s.sources[0].is_ip_allowed("192.0.2.7".parse().unwrap()));
    assert!(!s.sources[0].is_ip_allowed("192.0.2.8".parse().unwrap()));
}

#[test]
fn cross_references_and_uniqueness_are_checked() {
    assert_problem(
        &MINIMAL.replace("targets: [search]", "targets: [search, nowhere]"),
        "routes[0].targets[1]",
        "no target is named \"nowhere\"",
    );
    assert_problem(
        &MINIMAL.replace("  - source: buttercms", "  - source: wordpress"),
        "routes[0].source",
        "no source is named",
    );
    let twice = MINIMAL
        .replace("targets:\n  - name: search", "targets:\n  - name: search\n    url: \"http://a/\"\n  - name: search");
    assert_problem(&twice, "targets[1].name", "used twice");
    let two_sources = MINIMAL.replace(
        "sources:\n",
        "sources:\n  - name: other\n    path: /hooks/buttercms\n    format: cometcms\n    auth: { type: none }\n",
    );
    assert_problem(&two_sources, "sources[1].path", "\"/hooks/buttercms\" is used twice");
}

#[test]
fn generic_needs_exactly_one_event_locator() {
    let generic = MINIMAL.replace("format: buttercms", "format: generic");
    assert_problem(&generic, "sources[0]", "exactly one of event_pointer or event_header");
    let both =
        generic.replace("format: generic", "format: generic\n    event_pointer: /type\n    event_header: X-Event");
    assert_problem(&both, "sources[0]", "exactly one");
    let misplaced = MINIMAL.replace("format: buttercms", "format: buttercms\n    event_pointer: /type");
    assert_problem(&misplaced, "sources[0]", "only for format generic");
    assert_problem(
        &generic.replace("format: generic", "format: generic\n    event_pointer: type"),
        "sources[0].event_pointer",
        "JSON pointer",
    );
}

#[test]
fn missing_environment_variable_is_named() {
    assert_problem(
        &MINIMAL.replace("${BUTTER_SECRET}", "${NOT_SET_ANYWHERE}"),
        "sources[0].auth.values[0]",
        "NOT_SET_ANYWHERE is not set",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = MINIMAL
        .replace("url: \"http://127.0.0.1:9101/reindex\"", "url: \"nope\"\n    timeout: forever")
        .replace("events: [\"page.*\"]", "events: []");
    let found = problems(&text);
    assert!(found.len() >= 3, "{found:#?}");
}

#[test]
fn empty_and_malformed_files_are_explained() {
    assert!(problems("")[0].contains("empty"));
    assert!(problems("sources: [")[0].contains("invalid YAML"));
    assert!(problems("server: {}\n")[0].contains("missing field `sources`"));
}

#[test]
fn programs_order_by_and_debounce_are_checked_with_their_key_paths() {
    let url = "    url: \"http://127.0.0.1:9101/reindex\"";
    let t = |extra: &str| MINIMAL.replace(url, &format!("{url}\n{extra}"));
    assert_problem(&t("    transform: '{a: '"), "targets[0].transform", "expected");
    assert_problem(&t("    order_by: '.data | nosuch'"), "targets[0].order_by", "undefined filter nosuch");
    assert_problem(&t("    debounce: { window: 30s, key: '$id' }"), "targets[0].debounce.key", "undefined variable");
    assert_problem(
        &t("    debounce: { window: 30s, max_wait: 10s }"),
        "targets[0].debounce.max_wait",
        "at least window",
    );
    assert_problem(&t("    debounce: { window: 0s }"), "targets[0].debounce.window", "more than 0");
    assert_problem(&t("    debounce: { max_wait: 10s }"), "targets[0].debounce", "window");
    assert_problem(
        &t("    order_by: '.data.id'\n    debounce: { window: 30s }"),
        "targets[0]",
        "order_by or debounce, not both",
    );
    assert_problem(
        &MINIMAL.replace("    targets: [search]", "    filter: '.data.page_type =='\n    targets: [search]"),
        "routes[0].filter",
        "expected",
    );

    let ok = load(&t("    debounce: { window: 30s, key: '.data.type' }")).unwrap();
    match &ok.targets[0].sequencing {
        Some(Sequencing::Debounced(d)) => {
            assert_eq!(
                (d.window, d.max_wait),
                (std::time::Duration::from_secs(30), std::time::Duration::from_secs(300))
            );
            assert!(d.key.is_some());
        }
        other => panic!("{other:?}"),
    }
    let ordered = load(&t("    order_by: '.data.id'")).unwrap();
    assert!(matches!(ordered.targets[0].sequencing, Some(Sequencing::Ordered(_))));
}

#[test]
fn the_postgres_backend_takes_its_keys_and_refuses_sleds() {
    let pg = |storage: &str| format!("{MINIMAL}storage:\n{storage}");
    let s =
        load(&pg("  backend: postgres\n  url: postgres://relay:hunter2@db.internal:6432/relay?sslmode=verify-full\n"))
            .unwrap();
    let p = s.storage.postgres.as_ref().unwrap();
    assert_eq!(p.pool, 16, "the default pool");
    assert_eq!(p.describe, "postgres db.internal:6432 database relay");
    assert!(!format!("{s:?}").contains("hunter2"), "the password is never printed");
    assert!(load(MINIMAL).unwrap().storage.postgres.is_none(), "sled by default");

    assert_problem(&pg("  backend: postgres\n"), "storage.url", "required");
    assert_problem(&pg("  backend: postgres\n  url: postgres://h/db\n  path: ./data\n"), "storage.path", "sled's");
    assert_problem(&pg("  backend: postgres\n  url: postgres://h/db\n  cache: 64MB\n"), "storage.cache", "sled's");
    assert_problem(&pg("  backend: postgres\n  url: postgres://h/db\n  pool: 1\n"), "storage.pool", "2 to 1000");
    assert_problem(
        &pg("  backend: postgres\n  url: postgres://h/db\n  ca_file: missing.pem\n"),
        "storage.ca_file",
        "missing.pem",
    );
    assert_problem(&pg("  url: postgres://h/db\n"), "storage.url", "postgres only");
    assert_problem(&pg("  backend: mysql\n"), "storage.backend", "sled or postgres");
    let bad = problems(&pg("  backend: postgres\n  url: postgres://relay:hunter2@h/db?sslmode=bogus\n"));
    assert!(bad.iter().any(|p| p.starts_with("storage.url: ")), "{bad:?}");
    assert!(!bad.iter().any(|p| p.contains("hunter2")), "a bad URL's password is not echoed: {bad:?}");
}
