//! Route filters and target transforms (README, "Filters and transforms")
//! against the real relay, real HTTP targets and the real sandbox process.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

fn target(name: &str, url: &str, extra: &str) -> String {
    format!("  - name: {name}\n    url: \"{url}\"\n{extra}")
}

async fn admin_json(t: &TestRelay, method: Method, path: &str, body: &str) -> Value {
    let reply = admin_call(t.relay.admin_addr, method, path, Some(ADMIN_TOKEN), body).await;
    assert!(reply.status.is_success(), "{path}: {} {:?}", reply.status, reply.body);
    reply.json()
}

async fn delivery_status(t: &TestRelay, id: &str, target: &str) -> Value {
    let ev = admin_json(t, Method::GET, &format!("/admin/events/{id}"), "").await;
    let found = ev["deliveries"].as_array().unwrap().iter().find(|d| d["target"] == target).cloned();
    found.unwrap_or(Value::Null)
}

async fn metrics(t: &TestRelay) -> String {
    let reply = admin_call(t.relay.admin_addr, Method::GET, "/metrics", None, "").await;
    String::from_utf8(reply.body.to_vec()).unwrap()
}

#[tokio::test]
async fn a_filtered_route_counts_and_delivers_only_matching_webhooks() {
    let mut build = FakeTarget::start().await;
    let mut all = FakeTarget::start().await;
    let targets = [target("build", &build.url("/"), ""), target("all", &all.url("/"), "")].join("");
    let routes = r#"  - source: buttercms
    events: ["page.*"]
    filter: '.data.page_type == "landing" and .data.locale == null and $source == "buttercms" and ($event | startswith("page."))'
    targets: [build]
  - { source: buttercms, events: ["*"], targets: [all] }"#;
    let t = start_relay(&targets, routes).await;

    let landing = post_butter(t.addr, fixture("buttercms-page-published.json")).await;
    assert_eq!(landing.status, StatusCode::ACCEPTED);
    assert_eq!(landing.json()["targets"], 2);
    let spanish = post_butter(t.addr, fixture("buttercms-page-published-es.json")).await;
    assert_eq!(spanish.json()["targets"], 1, "the filter refused the Spanish page");

    assert_eq!(build.next().await.headers["webhook-id"], landing.json()["id"].as_str().unwrap());
    for _ in 0..2 {
        all.next().await;
    }
    build.nothing_for(Duration::from_millis(300)).await;
    let ev =
        admin_json(&t, Method::GET, &format!("/admin/events/{}", spanish.json()["id"].as_str().unwrap()), "").await;
    assert_eq!(ev["deliveries"].as_array().unwrap().len(), 1, "only the matching target is stored: {ev}");
    assert!(metrics(&t).await.contains(r#"hookrelay_filter_errors_total{source="buttercms"} 0"#));
}

/// A filter of paths and comparisons is answered by the relay on its own
/// parse of the payload (README, "Where programs run"); the same verdict
/// through a builtin runs in the sandbox. Both route every fixture alike,
/// and one that fails in the relay's subset (indexing a string) is left to
/// jaq: it fails, matches, and is counted.
#[tokio::test]
async fn filters_answered_by_the_relay_route_as_the_sandbox_does() {
    let mut direct = FakeTarget::start().await;
    let mut sandboxed = FakeTarget::start().await;
    let mut failing = FakeTarget::start().await;
    let targets = [
        target("direct", &direct.url("/"), ""),
        target("sandboxed", &sandboxed.url("/"), ""),
        target("failing", &failing.url("/"), ""),
    ]
    .join("");
    let simple = r#".data.page_type == "landing" and .data.locale == null and $event != "page.delete""#;
    let through_a_call =
        r#"(.data.page_type // "" | ascii_downcase) == "landing" and .data.locale == null and $event != "page.delete""#;
    let routes = format!(
        "  - {{ source: buttercms, events: [\"*\"], filter: '{simple}', targets: [direct] }}\n  - {{ source: buttercms, events: [\"*\"], filter: '{through_a_call}', targets: [sandboxed] }}\n  - {{ source: buttercms, events: [\"page.delete\"], filter: '.data.id.x == 1', targets: [failing] }}"
    );
    for (text, in_relay) in [(simple, true), (through_a_call, false), (".data.id.x == 1", true)] {
        let program = hookrelay::jq::Program::compile(hookrelay::jq::Kind::Filter, text).unwrap();
        assert_eq!(program.is_direct(), in_relay, "{text}");
    }
    let t = start_relay(&targets, &routes).await;

    let fixtures = [
        ("buttercms-page-published.json", true),
        ("buttercms-page-published-es.json", false),
        ("buttercms-page-delete.json", false),
        ("buttercms-post-published.json", false),
        ("buttercms-collectionitem-published.json", false),
    ];
    let mut passed = Vec::new();
    for (name, passes) in fixtures {
        let reply = post_butter(t.addr, fixture(name)).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{name}");
        let failing_route = usize::from(name == "buttercms-page-delete.json");
        assert_eq!(reply.json()["targets"], 2 * usize::from(passes) + failing_route, "{name}");
        if passes {
            passed.push(reply.json()["id"].as_str().unwrap().to_string());
        }
    }
    for id in &passed {
        assert_eq!(direct.next().await.headers["webhook-id"], id.as_str());
        assert_eq!(sandboxed.next().await.headers["webhook-id"], id.as_str());
    }
    failing.next().await;
    direct.nothing_for(Duration::from_millis(300)).await;
    sandboxed.nothing_for(Duration::from_millis(100)).await;
    assert!(metrics(&t).await.contains(r#"hookrelay_filter_errors_total{source="buttercms"} 1"#));
}

#[tokio::test]
async fn a_transform_sends_its_output_signed_over_the_bytes_sent() {
    let secret_b64 = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut slack = FakeTarget::start().await;
    let extra = format!(
        "    signing_secret: \"whsec_{secret_b64}\"\n    transform: '{{text: \"\\($event): \\(.data.name)\", id: $id, from: $source}}'\n"
    );
    let t = start_relay(
        &target("slack", &slack.url("/"), &extra),
        "  - { source: buttercms, events: [\"*\"], targets: [slack] }",
    )
    .await;
    let reply = post_butter(t.addr, fixture("buttercms-page-published.json")).await;
    let id = reply.json()["id"].as_str().unwrap().to_string();

    let got = slack.next().await;
    let expected = json!({ "text": "page.published: Product Launch Landing Page", "id": id, "from": "buttercms" });
    assert_eq!(serde_json::from_slice::<Value>(&got.body).unwrap(), expected);
    let compact = format!(r#"{{"text":"page.published: Product Launch Landing Page","id":"{id}","from":"buttercms"}}"#);
    assert_eq!(std::str::from_utf8(&got.body).unwrap(), compact, "compact JSON, keys in the program's order");
    assert_eq!(got.headers["content-type"], "application/json");
    assert_eq!(got.headers["webhook-id"], id.as_str());
    // Standard Webhooks over the body actually sent, computed from the spec.
    assert_eq!(got.headers["webhook-signature"], expected_signature(secret_b64, &got).as_str());
}

#[tokio::test]
async fn a_transform_with_no_output_skips_the_delivery() {
    let mut site = FakeTarget::start().await;
    let extra = "    transform: 'if .data.page_type == \"landing\" then {build: .data.id} else empty end'\n";
    let t = start_relay(
        &target("site", &site.url("/"), extra),
        "  - { source: buttercms, events: [\"*\"], targets: [site] }",
    )
    .await;
    let skipped = post_butter(t.addr, fixture("buttercms-page-published-es.json")).await;
    let id = skipped.json()["id"].as_str().unwrap().to_string();
    eventually("the delivery is skipped", || async { delivery_status(&t, &id, "site").await["status"] == "skipped" })
        .await;
    site.nothing_for(Duration::from_millis(300)).await;
    post_butter(t.addr, fixture("buttercms-page-published.json")).await;
    assert_eq!(site.next().await.body.as_ref(), br#"{"build":"product-launch"}"#);
    let text = metrics(&t).await;
    assert!(text.contains(r#"hookrelay_deliveries_total{outcome="skipped",target="site"} 1"#), "{text}");
    // Neither the skipped delivery nor the sent one (once recorded) is queued.
    eventually("nothing queued", || async {
        admin_json(&t, Method::GET, "/admin/targets", "").await["targets"][0]["queued"] == 0
    })
    .await;
}

#[tokio::test]
async fn a_failing_transform_is_dead_lettered_and_replayed_after_a_reload_fixes_it() {
    let mut site = FakeTarget::start().await;
    let broken = target("site", &site.url("/"), "    transform: '{page: (.data.nope | ascii_downcase)}'\n");
    let routes = "  - { source: buttercms, events: [\"*\"], targets: [site] }";
    let t = start_relay(&broken, routes).await;
    let reply = post_butter(t.addr, fixture("buttercms-page-published.json")).await;
    let id = reply.json()["id"].as_str().unwrap().to_string();
    eventually("dead-lettered", || async { delivery_status(&t, &id, "site").await["status"] == "dead" }).await;
    let dead = admin_json(&t, Method::GET, "/admin/dead-letters?target=site", "").await;
    let reason = dead["dead_letters"][0]["reason"].as_str().unwrap().to_string();
    assert!(reason.starts_with("transform: "), "{reason}");
    assert!(metrics(&t).await.contains(r#"hookrelay_transform_errors_total{target="site"} 1"#));
    site.nothing_for(Duration::from_millis(200)).await;

    let fixed = target("site", &site.url("/"), "    transform: '{page: .data.id}'\n");
    let path = write_config(t.dir.path(), &relay_config(t.dir.path(), &fixed, routes));
    t.relay.reload(hookrelay::config::load(&path).unwrap()).await.unwrap();
    let replayed = admin_json(&t, Method::POST, "/admin/dead-letters/replay", r#"{"target":"site"}"#).await;
    assert_eq!(replayed["replayed"], 1);
    let got = site.next().await;
    assert_eq!(got.body.as_ref(), br#"{"page":"product-launch"}"#);
    assert_eq!(got.headers["webhook-id"], id.as_str());
}

/// Programs that never end, allocate without bound or recurse without end
/// are stopped; webhooks that do not run them are acknowledged in time, and
/// the sandbox serves the next ones.
#[tokio::test]
async fn runaway_programs_are_stopped_while_other_webhooks_flow() {
    let mut slow = FakeTarget::start().await;
    let mut fast = FakeTarget::start().await;
    let runaway = r#"if .data.id == "loop" then (reduce range(1e15) as $x (0; . + 1))
      elif .data.id == "alloc" then ([range(1e10)] | length)
      elif .data.id == "deep" then (def f: 1 + f; f)
      else true end"#;
    let targets = [
        target("slow", &slow.url("/"), &format!("    transform: '{}'\n", runaway.replace('\n', " "))),
        target("fast", &fast.url("/"), ""),
    ]
    .join("");
    let routes = format!(
        "  - source: buttercms\n    events: [\"page.*\"]\n    filter: '{}'\n    targets: [slow]\n  - {{ source: buttercms, events: [\"post.*\"], targets: [fast] }}",
        runaway.replace('\n', " ")
    );
    let t = start_relay(&targets, &routes).await;
    let page = |id: &str| {
        format!(r#"{{"data":{{"id":"{id}","timestamp":"t"}},"webhook":{{"event":"page.published","target":"x"}}}}"#)
    };
    let runaways = ["loop", "alloc", "deep"].map(|id| {
        let addr = t.addr;
        let body = page(id);
        tokio::spawn(async move { post_butter(addr, body).await })
    });
    // Meanwhile, webhooks that run no filter are acknowledged and delivered in time.
    for n in 0..20 {
        let started = Instant::now();
        let reply =
            post_butter(t.addr, format!(r#"{{"data":{{"id":"post-{n}"}},"webhook":{{"event":"post.published"}}}}"#))
                .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        assert!(started.elapsed() < Duration::from_millis(500), "ack took {:?}", started.elapsed());
        let delivered = Instant::now();
        fast.next().await;
        assert!(delivered.elapsed() < Duration::from_secs(1), "delivery took {:?}", delivered.elapsed());
    }
    // A failed filter matches: each runaway webhook goes to its target.
    for r in runaways {
        let reply = r.await.unwrap();
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        assert_eq!(reply.json()["targets"], 1);
    }
    assert!(metrics(&t).await.contains(r#"hookrelay_filter_errors_total{source="buttercms"} 3"#));
    // The same programs stop the transform: three dead letters, and the
    // sandbox still serves a webhook that runs them to their end.
    eventually("three transforms dead-lettered", || async {
        admin_json(&t, Method::GET, "/admin/dead-letters?target=slow", "").await["dead_letters"]
            .as_array()
            .unwrap()
            .len()
            == 3
    })
    .await;
    let dead = admin_json(&t, Method::GET, "/admin/dead-letters?target=slow", "").await;
    for d in dead["dead_letters"].as_array().unwrap() {
        let reason = d["reason"].as_str().unwrap();
        assert!(reason.contains("time limit") || reason.contains("memory"), "{reason}");
    }
    let started = Instant::now();
    let reply = post_butter(t.addr, page("fine")).await;
    assert_eq!(reply.json()["targets"], 1);
    assert_eq!(slow.next().await.body.as_ref(), b"true");
    assert!(started.elapsed() < Duration::from_secs(2), "the sandbox came back in {:?}", started.elapsed());
}

/// A lane sends the runs waiting in one write. A run that kills its
/// sandbox (stack or memory) fails alone: the runs answered before it in
/// the same write keep their answers, whatever the child had sent by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_fails_only_the_run_that_caused_it() {
    use hookrelay::jq::{set_worker_exe, FailureKind, Kind, Lane, Output, Program};
    set_worker_exe(std::path::PathBuf::from(env!("CARGO_BIN_EXE_hookrelay")));
    let lane = Lane::new("blame");
    let benign = Program::compile(Kind::Filter, ".a + 1").unwrap();
    // Past the memory limit at once (a recursion may reach the time limit first on a busy machine).
    let deep = Program::compile(Kind::Filter, r#""x" * 1000000000 | length"#).unwrap();
    let input = bytes::Bytes::from_static(br#"{"a":1}"#);
    let vars = ["s", "e"];
    let runs = (0..21).map(|n| {
        let program = if n == 10 { &deep } else { &benign };
        lane.run(program, &vars, &input)
    });
    let outputs = futures_util::future::join_all(runs).await;
    for (n, output) in outputs.into_iter().enumerate() {
        match (n, output.unwrap()) {
            (10, Output::Failed(f)) => assert_eq!(f.kind, FailureKind::Crashed, "{f:?}"),
            (10, other) => panic!("the recursion was not stopped: {other:?}"),
            (_, output) => assert_eq!(output, Output::Value(b"2".to_vec()), "run {n}"),
        }
    }
}

/// Runs of a lane each well within the time limit, sent together, all
/// answer, however long they take together: each answer goes out as soon as
/// it is made (the lane stops a sandbox that answers nothing for 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_slow_runs_sent_at_once_all_answer() {
    use hookrelay::jq::{set_worker_exe, Lane, Output};
    set_worker_exe(std::path::PathBuf::from(env!("CARGO_BIN_EXE_hookrelay")));
    let lane = Lane::new("slow runs");
    let input = bytes::Bytes::from_static(b"null");
    let vars = ["s", "e"];
    // A loop that takes about 15 ms here (well within the 100 ms limit, on
    // a busy machine too).
    let program = program_taking(&lane, 15).await;
    // 200 of them: about 3 s in all.
    let outputs = futures_util::future::join_all((0..200).map(|_| lane.run(&program, &vars, &input))).await;
    let failed: Vec<_> = outputs.into_iter().map(Result::unwrap).filter(|o| !matches!(o, Output::Value(_))).collect();
    assert!(failed.is_empty(), "{} of 200 failed: {:?}", failed.len(), failed.first());
}

/// A program that takes about `ms` (at least) in `lane`'s sandbox here, the
/// sandbox started first.
async fn program_taking(lane: &hookrelay::jq::Lane, ms: u64) -> hookrelay::jq::Program {
    use hookrelay::jq::{Kind, Output, Program};
    let (input, vars) = (bytes::Bytes::from_static(b"null"), ["s", "e"]);
    let warm = Program::compile(Kind::Filter, "[range(10)] | length").unwrap();
    assert_eq!(lane.run(&warm, &vars, &input).await.unwrap(), Output::Value(b"10".to_vec()));
    let mut n = 10_000u64;
    loop {
        let program = Program::compile(Kind::Filter, &format!("reduce range({n}) as $x (0; . + 1)")).unwrap();
        let started = Instant::now();
        let output = lane.run(&program, &vars, &input).await.unwrap();
        assert!(matches!(output, Output::Value(_)), "{output:?}");
        let took = started.elapsed();
        if took >= Duration::from_millis(ms) || n >= 100_000_000 {
            return program;
        }
        n = n * ms / (took.as_millis() as u64).clamp(1, ms - 1);
    }
}

/// A slow run holds up only its own child: a quick run sent to the same
/// lane while it runs is answered by another child, before it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_run_does_not_hold_up_the_next_one() {
    use hookrelay::jq::{set_worker_exe, Kind, Lane, Output, Program};
    set_worker_exe(std::path::PathBuf::from(env!("CARGO_BIN_EXE_hookrelay")));
    let lane = std::sync::Arc::new(Lane::new("two children"));
    let (input, vars) = (bytes::Bytes::from_static(b"null"), ["s", "e"]);
    let quick = Program::compile(Kind::Filter, "[range(10)] | length").unwrap();
    let slow = std::sync::Arc::new(program_taking(&lane, 60).await);
    // Twice: the first starts the second child, the second is timed.
    for round in 0..2 {
        let started = Instant::now();
        let slow_run = {
            let (lane, slow, input) = (lane.clone(), slow.clone(), input.clone());
            tokio::spawn(async move {
                let output = lane.run(&slow, &["s", "e"], &input).await.unwrap();
                (output, started.elapsed())
            })
        };
        // Past the 5 ms after which a child without an answer is busy.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(lane.run(&quick, &vars, &input).await.unwrap(), Output::Value(b"10".to_vec()));
        let quick_done = started.elapsed();
        let (output, slow_done) = slow_run.await.unwrap();
        assert!(matches!(output, Output::Value(_)), "{output:?}");
        if round == 1 {
            assert!(quick_done < slow_done, "the quick run waited for the slow one: {quick_done:?}, {slow_done:?}");
        }
    }
}
