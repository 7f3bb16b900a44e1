//! The console (README, "The console"): served by the admin listener with
//! strict security headers, and driven in a real headless Chromium over
//! WebDriver (`chromedriver`) against the real relay and real targets. Without
//! Chromium and its driver the browser test prints that it skipped.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use http::{Method, StatusCode};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

#[tokio::test]
async fn the_console_is_served_with_strict_headers_and_only_with_a_token() {
    let t = start().await;
    let page = admin_call(t.relay.admin_addr, Method::GET, "/console", None, "").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    for part in ["default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(page.headers["x-frame-options"], "DENY");
    assert_eq!(page.headers["referrer-policy"], "no-referrer");
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(!html.contains("<script>") && !html.contains("style="), "no inline script or style");
    assert!(!html.contains("http://") && !html.contains("https://"), "nothing from elsewhere");
    for asset in ["/console/console.js", "/console/console.css"] {
        let r = admin_call(t.relay.admin_addr, Method::GET, asset, None, "").await;
        assert_eq!(r.status, StatusCode::OK, "{asset}");
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        // The only absolute URL is SVG's namespace, a name and no request.
        let urls = text.matches("http://").count() + text.matches("https://").count();
        assert_eq!(urls, text.matches("http://www.w3.org/2000/svg").count(), "{asset} names another origin");
    }
    let root = admin_call(t.relay.admin_addr, Method::GET, "/", None, "").await;
    assert_eq!((root.status, root.headers["location"].to_str().unwrap()), (StatusCode::FOUND, "/console"));
    // The API answers carry the headers too.
    let api = admin_call(t.relay.admin_addr, Method::GET, "/admin/targets", Some(ADMIN_TOKEN), "").await;
    assert_eq!(api.headers["x-frame-options"], "DENY");
    assert_eq!(api.headers["cache-control"], "no-store");

    // Without admin.token, no console.
    let t = start_from(|dir| config_text(dir, "", "").replace(&format!(", token: \"{ADMIN_TOKEN}\""), "")).await;
    for path in ["/console", "/", "/console/console.js"] {
        assert_eq!(admin_call(t.relay.admin_addr, Method::GET, path, None, "").await.status, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn stats_count_webhooks_and_deliveries_per_minute() {
    let mut target = FakeTarget::start().await;
    let t = start_relay(
        &format!("  - name: site\n    url: \"{}\"\n", target.url("/")),
        "  - { source: buttercms, events: [\"*\"], targets: [site] }",
    )
    .await;
    for n in 0..3 {
        post_butter(t.addr, butter_page(n)).await;
        target.next().await;
    }
    post(t.addr, "/hooks/buttercms", &[], butter_page(9)).await;
    eventually("three deliveries counted", || async {
        let stats =
            admin_call(t.relay.admin_addr, Method::GET, "/admin/stats?minutes=5", Some(ADMIN_TOKEN), "").await.json();
        let now = &stats["minutes"][4];
        stats["minutes"].as_array().unwrap().len() == 5
            && now["webhooks"]["buttercms"]["accepted"] == 3
            && now["webhooks"]["buttercms"]["unauthorized"] == 1
            && now["deliveries"]["site"]["delivered"] == 3
    })
    .await;
    let bad = admin_call(t.relay.admin_addr, Method::GET, "/admin/stats?minutes=0", Some(ADMIN_TOKEN), "").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

/// A throwaway chromedriver on a free loopback port; killed when dropped.
struct Driver {
    child: std::process::Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn driver() -> Option<(Driver, Client)> {
    if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
        println!("SKIPPED: the console's browser test needs {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium and chromium-driver; .ci/run installs them)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver { child, url: format!("http://127.0.0.1:{port}"), _profile: profile };
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--disable-quic", "--window-size=1280,1000",
                     format!("--user-data-dir={}", driver._profile.path().display())],
        }),
    );
    let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
    builder.capabilities(caps);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match builder.connect(&driver.url).await {
            Ok(client) => return Some((driver, client)),
            Err(e) if std::time::Instant::now() > deadline => panic!("chromedriver did not start: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Where screenshots go: `docs/` with HOOKRELAY_SCREENSHOTS=1, else a temporary folder.
fn shots() -> (PathBuf, Option<tempfile::TempDir>) {
    if std::env::var("HOOKRELAY_SCREENSHOTS").is_ok() {
        return (Path::new(env!("CARGO_MANIFEST_DIR")).join("docs"), None);
    }
    let dir = tempfile::tempdir().unwrap();
    (dir.path().to_path_buf(), Some(dir))
}

#[tokio::test]
async fn the_console_in_a_real_browser() {
    let Some((_driver, client)) = driver().await else { return };
    // The session is closed even when an assertion fails.
    let flow = tokio::spawn(browse(client.clone()));
    let outcome = flow.await;
    let _ = client.close().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn wait_text(c: &Client, css: &str, text: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if t.contains(text) {
                    return t;
                }
            }
        }
        if std::time::Instant::now() >= deadline {
            let page = c.find(Locator::Css("body")).await.unwrap().text().await.unwrap_or_default();
            panic!("{css} never showed {text:?}; the page shows:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click(c: &Client, css: &str) {
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

async fn browse(c: Client) {
    let mut working = FakeTarget::start().await;
    let mut failing = FakeTarget::start().await;
    failing.always(Answer::status(500));
    let mut failing_too = FakeTarget::start().await;
    failing_too.always(Answer::status(500));
    let dead_soon = "    retry: { max_attempts: 1 }\n    circuit_breaker: { open_for: 200ms }\n";
    let targets = format!(
        "  - name: working\n    url: \"{}\"\n  - name: failing\n    url: \"{}\"\n{dead_soon}  - name: failing-too\n    url: \"{}\"\n{dead_soon}",
        working.url("/"),
        failing.url("/"),
        failing_too.url("/"),
    );
    let routes = "  - { source: buttercms, events: [\"*\"], targets: [working, failing, failing-too] }";
    let t = start_relay(&targets, routes).await;
    let admin: SocketAddr = t.relay.admin_addr;
    let origin = format!("http://{admin}");
    let (shot_dir, _keep) = shots();

    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(post_butter(t.addr, butter_page(n)).await.json()["id"].as_str().unwrap().to_string());
        working.next().await;
        failing.next().await;
        failing_too.next().await;
    }
    // A hostile page name, as a CMS could send it.
    let hostile = r#"{"data":{"id":"evil","name":"<img src=x onerror=alert(1)></script><script>window.__pwned=1</script>","timestamp":"t"},"webhook":{"event":"page.published","target":"x"}}"#;
    let evil = post_butter(t.addr, hostile).await.json()["id"].as_str().unwrap().to_string();
    working.next().await;
    failing.next().await;
    failing_too.next().await;

    // Sign in: a wrong token is refused, the right one opens the overview.
    c.goto(&format!("{origin}/")).await.unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys("not-the-token-at-all")
        .await
        .unwrap();
    click(&c, "#sign-in").await;
    wait_text(&c, "#status", "refused").await;
    assert!(!c.current_url().await.unwrap().as_str().contains("token"), "the token never goes in a URL");
    c.wait().at_most(WAIT).for_element(Locator::Id("token")).await.unwrap().send_keys(ADMIN_TOKEN).await.unwrap();
    click(&c, "#sign-in").await;
    wait_text(&c, "#targets-table", "failing").await;
    assert!(!c.current_url().await.unwrap().as_str().contains(ADMIN_TOKEN));
    // The charts have data: bars for this minute's webhooks and deliveries.
    c.wait().at_most(WAIT).for_element(Locator::Css("#chart-webhooks > svg rect")).await.unwrap();
    c.wait().at_most(WAIT).for_element(Locator::Css("#chart-deliveries > svg rect")).await.unwrap();
    std::fs::write(shot_dir.join("console-overview.png"), c.screenshot().await.unwrap()).unwrap();

    // Events, newest first, and an event's attempts.
    c.goto(&format!("{origin}/console#/events")).await.unwrap();
    wait_text(&c, "#events-table", "page.published").await;
    std::fs::write(shot_dir.join("console-events.png"), c.screenshot().await.unwrap()).unwrap();
    c.goto(&format!("{origin}/console#/events/{}", ids[0])).await.unwrap();
    wait_text(&c, "[data-target=working] .attempts", "200").await;
    wait_text(&c, "[data-target=failing]", "dead").await;
    std::fs::write(shot_dir.join("console-event.png"), c.screenshot().await.unwrap()).unwrap();

    // The hostile payload is text: nothing in it runs, no element is made of it.
    c.execute("window.__alerts = 0; window.alert = () => { window.__alerts += 1; };", vec![]).await.unwrap();
    c.goto(&format!("{origin}/console#/events/{evil}")).await.unwrap();
    let payload = wait_text(&c, "#payload", "onerror").await;
    assert!(payload.contains("<img src=x onerror=alert(1)></script><script>window.__pwned=1</script>"), "{payload}");
    assert!(c.find_all(Locator::Css("#payload *")).await.unwrap().is_empty(), "the payload made elements");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ran = c.execute("return [window.__alerts, window.__pwned === undefined];", vec![]).await.unwrap();
    assert_eq!(ran, serde_json::json!([0, true]), "a script in the payload ran");

    // Dead letters: select one, replay it once the target is fixed, with a confirmation.
    c.goto(&format!("{origin}/console#/dead-letters?target=failing")).await.unwrap();
    wait_text(&c, "#dead-table", ids[1].as_str()).await;
    std::fs::write(shot_dir.join("console-dead-letters.png"), c.screenshot().await.unwrap()).unwrap();
    failing.always(Answer::status(200));
    click(&c, &format!("input[data-id='{}']", ids[1])).await;
    click(&c, "#replay-selected").await;
    click(&c, "#confirm-yes").await;
    wait_text(&c, "#status", "1 replayed").await;
    let replayed = failing.next().await;
    assert_eq!(replayed.headers["webhook-id"], ids[1].as_str());
    // With every target listed, a row is one target's dead letter: only
    // the row ticked is replayed, not the event's other dead letters.
    c.goto(&format!("{origin}/console#/dead-letters")).await.unwrap();
    wait_text(&c, "#dead-table", "failing-too").await;
    click(&c, &format!("input[data-id='{}'][data-target='failing']", ids[2])).await;
    click(&c, "#replay-selected").await;
    click(&c, "#confirm-yes").await;
    wait_text(&c, "#status", "1 replayed").await;
    assert_eq!(failing.next().await.headers["webhook-id"], ids[2].as_str());
    let dead = admin_call(admin, Method::GET, "/admin/dead-letters?target=failing-too", Some(ADMIN_TOKEN), "").await;
    let still = dead.json()["dead_letters"].as_array().unwrap().iter().any(|d| d["id"] == ids[2].as_str());
    assert!(still, "its dead letter to failing-too was replayed too");
    failing_too.nothing_for(Duration::from_millis(200)).await;

    // Pause and resume a target.
    c.goto(&format!("{origin}/console#/targets")).await.unwrap();
    wait_text(&c, "#toggle-working", "Pause working").await;
    click(&c, "#toggle-working").await;
    wait_text(&c, "#status", "working paused").await;
    let listed = admin_call(admin, Method::GET, "/admin/targets", Some(ADMIN_TOKEN), "").await.json();
    assert_eq!(listed["targets"][0]["paused"], true);
    // The page shows the new state before its button is used again.
    wait_text(&c, "#toggle-working", "Resume working").await;
    click(&c, "#toggle-working").await;
    wait_text(&c, "#status", "working resumed").await;
    wait_text(&c, "#toggle-working", "Pause working").await;

    // An action that fails says why: the event is gone when its redeliver is clicked.
    c.goto(&format!("{origin}/console#/events/{}", ids[3])).await.unwrap();
    wait_text(&c, "[data-target=failing]", "dead").await;
    let (purged, _) = t.store.purge(hookrelay::store::now_ms() + 60_000, None, 1_000).await.unwrap();
    assert!(purged > 0);
    click(&c, "#redeliver-all").await;
    wait_text(&c, "#status", "no event").await;

    // A page left while it loads does not replace the one shown after it:
    // the overview's statistics answer late, the dead letters are shown meanwhile.
    let slow_stats =
        "const fetchNow = window.fetch; window.fetch = (url, options) => String(url).includes('/admin/stats') \
        ? new Promise((done) => setTimeout(done, 1500)).then(() => fetchNow(url, options)) : fetchNow(url, options);";
    c.execute(slow_stats, vec![]).await.unwrap();
    c.execute("location.hash = '#/overview';", vec![]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.execute("location.hash = '#/dead-letters';", vec![]).await.unwrap();
    wait_text(&c, "h1", "Dead letters").await;
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(
        c.find(Locator::Css("h1")).await.unwrap().text().await.unwrap(),
        "Dead letters",
        "overtaken by a late render"
    );
    c.execute("location.reload();", vec![]).await.unwrap();

    // Readable on a phone: nothing wider than the screen.
    c.set_window_size(390, 844).await.unwrap();
    c.goto(&format!("{origin}/console#/overview")).await.unwrap();
    wait_text(&c, "#targets-table", "working").await;
    let fits =
        c.execute("return document.documentElement.scrollWidth <= window.innerWidth + 1;", vec![]).await.unwrap();
    assert_eq!(fits, serde_json::json!(true), "the overview is wider than a phone");
    std::fs::write(shot_dir.join("console-phone.png"), c.screenshot().await.unwrap()).unwrap();

    // Every request the console made went to the relay's admin listener.
    let requested =
        c.execute("return performance.getEntriesByType('resource').map(e => e.name);", vec![]).await.unwrap();
    for url in requested.as_array().unwrap() {
        assert!(url.as_str().unwrap().starts_with(&origin), "a request to another origin: {url}");
    }

    // Signing out forgets the token.
    click(&c, "#sign-out").await;
    c.wait().at_most(WAIT).for_element(Locator::Id("token")).await.unwrap();
    let kept = c.execute("return sessionStorage.length + document.cookie.length;", vec![]).await.unwrap();
    assert_eq!(kept, serde_json::json!(0));

    // Signed in again, the relay goes away: the overview's refresh says so plainly.
    c.find(Locator::Id("token")).await.unwrap().send_keys(ADMIN_TOKEN).await.unwrap();
    click(&c, "#sign-in").await;
    wait_text(&c, "#targets-table", "working").await;
    t.relay.stop(Duration::from_secs(5)).await.unwrap();
    wait_text(&c, "#status", "cannot be reached").await;
}
