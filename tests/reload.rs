//! Reload (SIGHUP): new routes and targets take effect without a restart;
//! a broken file is rejected and the running configuration stays.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

#[tokio::test]
async fn reload_adds_a_target_and_a_route_and_updates_a_target() {
    let mut search = FakeTarget::start().await;
    let mut audit = FakeTarget::start().await;
    let targets = format!("  - name: search\n    url: \"{}\"\n", search.url("/"));
    let t = start_relay(&targets, "  - { source: buttercms, events: [\"page.*\"], targets: [search] }").await;
    let post_event = br#"{"data":{"id":"p1"},"webhook":{"event":"post.published"}}"#.to_vec();
    assert_eq!(post_butter(t.addr, post_event.clone()).await.json()["targets"], 0);

    let new_targets =
        format!("{targets}    headers: {{ X-Version: \"2\" }}\n  - name: audit\n    url: \"{}\"\n", audit.url("/"));
    let new_routes = "  - { source: buttercms, events: [\"page.*\"], targets: [search] }\n  - { source: buttercms, events: [\"post.*\"], targets: [audit] }";
    let path = write_config(t.dir.path(), &relay_config(t.dir.path(), &new_targets, new_routes));
    t.relay.reload(hookrelay::config::load(&path).unwrap()).await.unwrap();

    let reply = post_butter(t.addr, br#"{"data":{"id":"p2"},"webhook":{"event":"post.published"}}"#.to_vec()).await;
    assert_eq!(reply.json()["targets"], 1);
    assert_eq!(audit.next().await.headers["webhook-id"], reply.json()["id"].as_str().unwrap());
    post_butter(t.addr, butter_page(1)).await;
    assert_eq!(search.next().await.headers["x-version"], "2", "search took its new headers");
}

#[tokio::test]
async fn sighup_reloads_and_a_broken_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "", "");
    let config = write_config(dir.path(), &text);
    let (mut child, addr) = spawn_relay(&config);
    let hup = |pid: u32| {
        let ok = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success();
        assert!(ok);
    };

    // A broken file: rejected, the relay keeps running with what it had.
    std::fs::write(&config, format!("{text}\nbogus_key: 1\n")).unwrap();
    hup(child.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "the relay died on a broken reload");
    assert_eq!(post_butter(addr, fixture("buttercms-page-published.json")).await.status, StatusCode::ACCEPTED);

    // A valid file with a new source: it takes effect.
    let extra = "  - name: open\n    path: /hooks/open\n    format: cometcms\n    auth: { type: none }";
    std::fs::write(&config, config_text(dir.path(), "", extra)).unwrap();
    hup(child.id());
    let body = fixture("cometcms-content-published.json");
    eventually("the new source answers", || {
        let body = body.clone();
        async move { post(addr, "/hooks/open", &[], body).await.status == StatusCode::ACCEPTED }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A reload leaves a target's rate limit where it was: a new limiter starts
/// with a full bucket, and every reload let another burst through before.
#[tokio::test]
async fn a_reload_does_not_refill_a_rate_limit() {
    let mut search = FakeTarget::start().await;
    let targets =
        format!("  - name: search\n    url: \"{}\"\n    rate_limit: {{ per_second: 2, burst: 1 }}\n", search.url("/"));
    let routes = "  - { source: buttercms, events: [\"page.*\"], targets: [search] }";
    let t = start_relay(&targets, routes).await;
    let path = write_config(t.dir.path(), &relay_config(t.dir.path(), &targets, routes));
    for n in 0..6 {
        assert_eq!(post_butter(t.addr, butter_page(n)).await.status, StatusCode::ACCEPTED);
    }
    let first = search.next().await.at;
    // Unchanged config, reloaded five times while the limit holds the rest.
    for _ in 0..5 {
        t.relay.reload(hookrelay::config::load(&path).unwrap()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut last = first;
    for _ in 0..5 {
        last = search.next().await.at;
    }
    assert!(last - first >= Duration::from_millis(2_200), "6 deliveries at 2/s took {:?}", last - first);
}

/// A target removed while deliveries were queued for it is named at the
/// next start, with how many wait: nothing delivers them until a config
/// lists it again.
#[tokio::test]
async fn a_start_names_a_removed_target_that_has_queued_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let search = "  - name: search\n    url: \"http://127.0.0.1:9/\"\n";
    let both = format!("{search}  - name: old\n    url: \"http://127.0.0.1:9/\"\n");
    let path = write_config(
        dir.path(),
        &relay_config(dir.path(), &both, "  - { source: buttercms, events: [\"page.*\"], targets: [search, old] }"),
    );
    let (mut relay, addr) = spawn_relay(&path);
    for n in 0..3 {
        assert_eq!(post_butter(addr, butter_page(n)).await.status, StatusCode::ACCEPTED);
    }
    assert!(relay.terminate().success());
    let path = write_config(
        dir.path(),
        &relay_config(dir.path(), search, "  - { source: buttercms, events: [\"page.*\"], targets: [search] }"),
    );
    let (_relay, _, logs) = spawn_relay_logged(&path);
    let named = |l: &String| l.contains(r#""target":"old""#) && l.contains(r#""queued":3"#);
    eventually("the removed target named", || async { logs.lock().unwrap().iter().any(named) }).await;
    assert!(!logs.lock().unwrap().iter().any(|l| l.contains("does not list") && l.contains(r#""target":"search""#)));
}

/// A dedup window is checked against the retention running, which a reload
/// does not change: a longer retention in the same file does not let a
/// longer window through, whose events the running purge would take early.
#[tokio::test]
async fn a_reload_refuses_a_dedup_window_past_the_running_retention() {
    let t = start_relay("", "").await;
    let text = relay_config(t.dir.path(), "", "")
        .replace("cache: \"8MiB\"", "cache: \"8MiB\", retention: 30d")
        .replace("format: buttercms", "format: buttercms\n    dedup_window: 10d");
    let path = write_config(t.dir.path(), &text);
    let refused = t.relay.reload(hookrelay::config::load(&path).unwrap()).await.unwrap_err();
    assert!(refused.contains("dedup_window 10days is longer than storage.retention (7days)"), "{refused}");
    assert!(refused.contains("the running one"), "{refused}");
}
