//! deploy/ (README, "Operating in production"): the production routes.yaml
//! that the image, the ConfigMap and the systemd unit share runs as shipped,
//! the container health check works, and the alerts and the dashboard use
//! only metrics the relay exports. deploy/check runs the ecosystems' own tools.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use http::StatusCode;

fn deploy_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(name)
}

fn deploy_file(name: &str) -> String {
    std::fs::read_to_string(deploy_path(name)).unwrap()
}

fn hookrelay(args: &[&str], envs: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hookrelay"));
    for name in ["HOOKRELAY_ADMIN_TOKEN", "BUTTER_SECRET", "COMET_SECRET", "HOOKRELAY_HEALTHCHECK_URL", "DATABASE_URL"]
    {
        cmd.env_remove(name);
    }
    cmd.args(args).envs(envs.iter().map(|(k, v)| (k, v))).output().unwrap()
}

/// The environment the production routes.yaml reads, with a throwaway certificate.
struct Production {
    dir: tempfile::TempDir,
}

impl Production {
    fn new() -> Production {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), cert.key_pair.serialize_pem()).unwrap();
        Production { dir }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let at = |name: &str| self.dir.path().join(name).display().to_string();
        vec![
            ("HOOKRELAY_LISTEN", "127.0.0.1:0".to_string()),
            ("HOOKRELAY_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
            ("HOOKRELAY_DATA", at("data")),
            ("HOOKRELAY_TLS_CERT", at("tls.crt")),
            ("HOOKRELAY_TLS_KEY", at("tls.key")),
            ("HOOKRELAY_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("BUTTER_SECRET", BUTTER_SECRET.to_string()),
            ("COMET_SECRET", COMET_SECRET.to_string()),
            // Nothing is sent to them; still, tests stay on loopback.
            ("SEARCH_URL", "http://127.0.0.1:9/search".to_string()),
            ("CACHE_URL", "http://127.0.0.1:9/cache".to_string()),
            ("SITE_REBUILD_URL", "http://127.0.0.1:9/build".to_string()),
        ]
    }
}

#[test]
fn the_configmap_carries_the_production_routes() {
    let map: serde_yaml::Value = serde_yaml::from_str(&deploy_file("k8s/configmap.yaml")).unwrap();
    assert_eq!(map["data"]["routes.yaml"].as_str(), Some(deploy_file("routes.yaml").as_str()));
}

#[test]
fn the_postgres_configmap_carries_the_production_routes_on_postgres() {
    let map: serde_yaml::Value = serde_yaml::from_str(&deploy_file("k8s-postgres/configmap.yaml")).unwrap();
    assert_eq!(map["data"]["routes.yaml"].as_str(), Some(deploy_file("routes-postgres.yaml").as_str()));
    // Everything but the storage is deploy/routes.yaml's.
    let sled: serde_yaml::Mapping = serde_yaml::from_str(&deploy_file("routes.yaml")).unwrap();
    let pg: serde_yaml::Mapping = serde_yaml::from_str(&deploy_file("routes-postgres.yaml")).unwrap();
    let without_storage = |m: &serde_yaml::Mapping| {
        let mut m = m.clone();
        m.remove("storage");
        m
    };
    assert_eq!(without_storage(&sled), without_storage(&pg));
    assert_eq!(pg["storage"]["backend"].as_str(), Some("postgres"));
}

#[test]
fn the_postgres_routes_need_the_database_url() {
    let prod = Production::new();
    let config = deploy_path("routes-postgres.yaml").display().to_string();
    let out = hookrelay(&["check", "--config", &config], &prod.env());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DATABASE_URL"), "{err}");
    let mut env = prod.env();
    env.push(("DATABASE_URL", "postgres://relay:s3cret@db.internal:5432/relay?sslmode=verify-full".to_string()));
    let out = hookrelay(&["check", "--config", &config], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("postgres db.internal:5432 database relay"), "{said}");
    assert!(!said.contains("s3cret"), "{said}");
}

#[test]
fn the_production_routes_refuse_to_start_without_a_secret() {
    let prod = Production::new();
    let env: Vec<_> = prod.env().into_iter().filter(|(k, _)| *k != "COMET_SECRET").collect();
    let config = deploy_path("routes.yaml").display().to_string();
    let out = hookrelay(&["check", "--config", &config], &env);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("COMET_SECRET"), "{err}");

    let out = hookrelay(&["check", "--config", &config], &prod.env());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("(TLS)") && summary.contains("sources   2") && summary.contains("targets   3"),
        "{summary}"
    );
}

#[test]
fn the_production_routes_serve_and_the_healthcheck_sees_it() {
    let prod = Production::new();
    let (relay, _, _) = spawn_relay_with(&deploy_path("routes.yaml"), prod.env());
    let admin = relay.admin;
    let health = hookrelay(&["healthcheck", "--url", &format!("http://{admin}/healthz")], &[]);
    drop(relay);
    assert!(health.status.success(), "{}", String::from_utf8_lossy(&health.stderr));
    assert!(String::from_utf8_lossy(&health.stdout).starts_with("HTTP 200"));

    // Nobody listens there now: the check fails and says why.
    let down = hookrelay(&["healthcheck"], &[("HOOKRELAY_HEALTHCHECK_URL", format!("http://{admin}/healthz"))]);
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("cannot reach"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// Every `hookrelay_*` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("hookrelay_")
        .map(|(at, _)| text[at..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect())
        .collect()
}

#[tokio::test]
async fn alerts_and_dashboard_use_only_exported_metrics() {
    let mut target = FakeTarget::start().await;
    let targets = format!("  - name: search\n    url: \"{}\"\n", target.url("/"));
    let t = start_relay(&targets, "  - { source: buttercms, events: [\"*\"], targets: [search] }").await;
    for n in 0..3 {
        assert_eq!(post_butter(t.addr, butter_page(n)).await.status, StatusCode::ACCEPTED);
    }
    for _ in 0..3 {
        target.next().await;
    }
    eventually("three deliveries counted", || async {
        t.relay.metrics.render().contains("hookrelay_deliveries_total{outcome=\"delivered\",target=\"search\"} 3")
    })
    .await;
    let exported = t.relay.metrics.render();

    let alerts = metric_names(&deploy_file("prometheus/alerts.yaml"));
    let dashboard = metric_names(&deploy_file("grafana/hookrelay.json"));
    assert!(!alerts.is_empty());
    for name in alerts.iter().chain(&dashboard) {
        assert!(exported.contains(&format!("\n{name}{{")), "{name} is not exported:\n{exported}");
    }
    // And the dashboard shows every metric the relay exports.
    let families: Vec<&str> = exported.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    assert!(families.len() >= 9, "{families:?}");
    for family in families {
        assert!(dashboard.iter().any(|name| name.starts_with(family)), "the dashboard does not show {family}");
    }
}
