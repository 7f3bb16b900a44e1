//! The commands for trying programs and setups (README, "Filters and
//! transforms"): `check` runs every program on sample webhooks, `preview`
//! shows what a webhook would do, `receive` prints what arrives.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::*;

fn hookrelay(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookrelay")).args(args).arg("--config").arg(config).output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn config_with(dir: &Path, targets: &str, routes: &str) -> std::path::PathBuf {
    write_config(dir, &relay_config(dir, targets, routes))
}

const SLACK: &str = r#"  - name: slack
    url: "http://127.0.0.1:9/slack"
    headers: { X-Api-Key: "do-not-show-me", X-Team: "web" }
    transform: '{text: "\($event): \(.data.name // .data.id)"}'
  - name: build
    url: "http://127.0.0.1:9/build"
    order_by: '.data.id'
"#;

#[test]
fn check_runs_every_program_on_the_samples() {
    let dir = tempfile::tempdir().unwrap();
    let routes = "  - { source: buttercms, events: [\"page.*\"], filter: '.data.page_type == \"landing\"', targets: [build] }\n  - { source: buttercms, events: [\"*\"], targets: [slack] }";
    let out = hookrelay(&["check"], &config_with(dir.path(), SLACK, routes));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Each line says where ingest runs the program: paths and comparisons in
    // the relay itself, anything else in the jq sandbox.
    assert!(
        stdout.contains("routes[0].filter: 2 samples, 2 true, 0 false, 0 failed; answered by the relay"),
        "{stdout}"
    );
    assert!(stdout.contains("targets[0].transform: 4 samples, 4 bodies"), "{stdout}");
    assert!(stdout.contains("0 failed; runs in the jq sandbox"), "{stdout}");
    assert!(
        stdout.contains("targets[1].order_by: 2 samples, 2 keys, 0 without a key, 0 failed; answered by the relay"),
        "{stdout}"
    );
}

#[test]
fn check_refuses_programs_that_do_not_compile_fail_everywhere_or_run_away() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // A syntax error: jaq's message with its position, under the key path.
        ("  - { source: buttercms, events: [\"*\"], filter: '.data | if . then 1', targets: [build] }", "", "routes[0].filter: expected else or end at the end of the program"),
        ("  - { source: buttercms, events: [\"*\"], filter: '.a | nosuch', targets: [build] }", "", "routes[0].filter: undefined filter nosuch at line 1, column 6"),
        // Fails on every sample.
        ("  - { source: buttercms, events: [\"*\"], targets: [build] }", "    transform: '.data.nope | ascii_downcase'\n", "targets[0].transform: fails on every sample webhook (4)"),
        // Passes its time limit on one sample only: still refused.
        ("  - { source: buttercms, events: [\"*\"], filter: 'if $event == \"page.delete\" then last(range(1e15)) else true end', targets: [build] }", "", "routes[0].filter: on the sample buttercms page.delete: the program ran past its time limit of 100 ms"),
    ];
    for (routes, transform, expected) in cases {
        let targets = format!("  - name: build\n    url: \"http://127.0.0.1:9/build\"\n{transform}");
        let out = hookrelay(&["check"], &config_with(dir.path(), &targets, routes));
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{routes}: accepted\n{stdout}");
        assert!(stderr.contains(expected), "{routes}: expected {expected:?} in\n{stderr}");
    }
}

#[test]
fn preview_shows_routes_filters_and_each_request_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let routes = "  - { source: buttercms, events: [\"page.*\"], filter: '.data.page_type == \"landing\"', targets: [build] }\n  - { source: buttercms, events: [\"*\"], targets: [slack] }\n  - { source: buttercms, events: [\"post.*\"], targets: [build] }";
    let config = config_with(dir.path(), SLACK, routes);
    let payload = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/buttercms-page-published-es.json");
    let out = hookrelay(&["preview", "buttercms", "page.published", "--payload", payload.to_str().unwrap()], &config);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for expected in [
        "routes[0] [page.*] -> build: filter gives false: no match",
        "routes[1] [*] -> slack: matches",
        "routes[2] [post.*] -> build: the event does not match",
        "targets: 1",
        "target slack",
        "POST http://127.0.0.1:9/slack",
        "x-api-key: <redacted>",
        "x-team: web",
        "content-type: application/json",
        r#"{"text":"page.published: Inicio"}"#,
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from\n{stdout}");
    }
    assert!(!stdout.contains("do-not-show-me"));
    assert!(!stdout.contains("target build"), "build's filter said no:\n{stdout}");
    assert!(dir.path().join("data").read_dir().is_err(), "preview stores nothing");

    // A transform that fails: shown, and exit 1.
    let broken = SLACK.replace(r#"{text: "\($event): \(.data.name // .data.id)"}"#, ".data.nope | ascii_downcase");
    let out = hookrelay(&["preview", "buttercms", "page.published"], &config_with(dir.path(), &broken, routes));
    let (stdout, _) = text(&out);
    assert!(!out.status.success());
    assert!(stdout.contains("transform FAILED: cannot use null as string"), "{stdout}");
}

/// A `hookrelay receive` process; killed when dropped.
struct Receive {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    addr: String,
}

impl Drop for Receive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receive {
    fn start(args: &[&str]) -> Receive {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hookrelay"))
            .args(["receive", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut r = Receive { child, lines, addr: String::new() };
        let first = r.line();
        r.addr = first.strip_prefix("listening on ").unwrap_or_else(|| panic!("{first}")).to_string();
        r
    }

    fn line(&self) -> String {
        self.lines.recv_timeout(WAIT).expect("receive printed nothing")
    }

    /// The lines of the next request, up to its `-->` line.
    fn request(&self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            let line = self.line();
            let end = line.starts_with("--> ");
            out.push(line);
            if end {
                return out;
            }
        }
        panic!("no whole request within {WAIT:?}: {out:?}");
    }
}

#[tokio::test]
async fn receive_prints_each_request_and_checks_its_signature() {
    let receive = Receive::start(&["--secret", WHSEC, "--status", "202"]);
    let targets = format!(
        "  - name: slack\n    url: \"{}/slack\"\n    signing_secret: \"{WHSEC}\"\n    transform: '{{text: $event}}'\n",
        receive.addr
    );
    let t = start_relay(&targets, "  - { source: buttercms, events: [\"*\"], targets: [slack] }").await;
    let id =
        post_butter(t.addr, fixture("buttercms-page-published.json")).await.json()["id"].as_str().unwrap().to_string();
    let lines = tokio::task::spawn_blocking(move || (receive.request(), receive)).await.unwrap();
    let (request, receive) = lines;
    let all = request.join("\n");
    assert!(all.starts_with("--- POST /slack HTTP/1.1 from 127.0.0.1:"), "{all}");
    assert!(all.contains(&format!("webhook-id: {id}")), "{all}");
    assert!(all.contains("signature: verified"), "{all}");
    assert!(all.contains(r#"{"text":"page.published"}"#), "{all}");
    assert!(all.ends_with("--> 202"), "{all}");

    // A forged signature is called out.
    let forged = post(
        std::net::SocketAddr::from(([127, 0, 0, 1], receive.addr.rsplit(':').next().unwrap().parse::<u16>().unwrap())),
        "/x",
        &[("webhook-id", "msg_1"), ("webhook-timestamp", "1700000000"), ("webhook-signature", "v1,AAAA")],
        "{}",
    )
    .await;
    assert_eq!(forged.status.as_u16(), 202);
    let all = tokio::task::spawn_blocking(move || receive.request().join("\n")).await.unwrap();
    assert!(all.contains("signature: INVALID"), "{all}");
}

#[test]
fn receive_refuses_a_bad_secret_or_status() {
    for (args, expected) in [(&["--secret", "nope!"][..], "--secret"), (&["--status", "99"][..], "--status 99")] {
        let out = Command::new(env!("CARGO_BIN_EXE_hookrelay"))
            .args(["receive", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// README's first steps: the shipped routes.yaml passes `check`, and a first
/// `send` ends in deliveries that `receive` prints, signature checked.
#[tokio::test]
async fn the_shipped_config_delivers_a_first_send_to_receive() {
    let shipped_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("routes.yaml");
    let out =
        Command::new(env!("CARGO_BIN_EXE_hookrelay")).arg("check").arg("--config").arg(&shipped_path).output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));

    let receive = Receive::start(&["--secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
    let shipped = std::fs::read_to_string(&shipped_path).unwrap();
    let local = |dir: &Path| {
        let mut text = shipped.clone();
        for (from, to) in [
            ("http://127.0.0.1:9101", receive.addr.clone()),
            ("127.0.0.1:8443", "127.0.0.1:0".to_string()),
            ("127.0.0.1:9090", "127.0.0.1:0".to_string()),
            ("\"./data\"", format!("\"{}\"", dir.join("data").display())),
        ] {
            assert!(text.contains(from), "the shipped routes.yaml no longer holds {from}");
            text = text.replace(from, &to);
        }
        text
    };
    let t = common::start_from(local).await;
    let url = format!("http://{}/hooks/buttercms", t.addr);
    let config = t.dir.path().join("routes.yaml");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hookrelay"))
            .args(["send", "buttercms", "page.published", "--url", &url, "--config"])
            .arg(config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success() && stdout.contains(r#""targets":3"#), "{stdout}\n{stderr}");

    let requests =
        tokio::task::spawn_blocking(move || (0..3).map(|_| receive.request().join("\n")).collect::<Vec<_>>())
            .await
            .unwrap();
    let find = |path: &str| {
        requests
            .iter()
            .find(|r| r.starts_with(&format!("--- POST {path} ")))
            .unwrap_or_else(|| panic!("{path}: {requests:?}"))
    };
    assert!(find("/reindex").contains("signature: verified"), "{}", find("/reindex"));
    assert!(find("/slack").contains(r#"{"text":"ButterCMS page.published: Sample Page"}"#), "{}", find("/slack"));
    assert!(find("/build").contains(r#""page_type":"landing""#));
}

/// Values a config takes from the environment are often secrets (a webhook
/// URL whose path is its credential, a signing secret): `check` prints them
/// by name, in its summary and in its errors, never as they are.
#[test]
fn check_shows_values_from_the_environment_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let check = |hook: &str, secrets: &str| {
        let config = write_config(
            dir.path(),
            &format!(
                r#"
server: {{ listen: "127.0.0.1:0" }}
storage: {{ path: "{}" }}
sources:
  - name: cometcms
    path: /hooks/cometcms
    format: cometcms
    auth: {{ type: hmac, header: X-Sig, secrets: {secrets} }}
targets:
  - {{ name: slack, url: "${{SLACK_HOOK}}" }}
routes:
  - {{ source: cometcms, events: ["*"], targets: [slack] }}
"#,
                dir.path().join("data").display()
            ),
        );
        let out = Command::new(env!("CARGO_BIN_EXE_hookrelay"))
            .args(["check", "--config"])
            .arg(&config)
            .env("SLACK_HOOK", hook)
            .env("COMET_SECRET", "comet-credential")
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        let said = format!("{stdout}{stderr}");
        assert!(!said.contains("xoxb-hook-credential") && !said.contains("comet-credential"), "{said}");
        (out.status.success(), said)
    };
    let hook = "https://hooks.example.test/services/T0/B0/xoxb-hook-credential";
    let (ok, said) = check(hook, r#"["${COMET_SECRET}"]"#);
    assert!(ok, "{said}");
    assert!(said.contains("slack            ${SLACK_HOOK} (timeout"), "{said}");
    // A URL with a stray newline: refused, the value named.
    let (ok, said) = check(&format!("{hook}\n"), r#"["${COMET_SECRET}"]"#);
    assert!(!ok && said.contains(r#"targets[0].url: "${SLACK_HOOK}" is not a URL"#), "{said}");
    // A secret given as a string where a list is expected (serde's message quotes it).
    let (ok, said) = check(hook, r#""${COMET_SECRET}""#);
    assert!(!ok && said.contains(r#"invalid type: string "${COMET_SECRET}", expected a sequence"#), "{said}");
}
