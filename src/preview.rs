//! `hookrelay preview` and the sample runs of `hookrelay check`: what a
//! webhook would do, through the real filters and transforms in the sandbox,
//! without storing or sending anything.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderName;

use crate::config::{Debounce, EnvValues, EventPattern, Problem, RouteRule, Sequencing, Settings, Source, Target};
use crate::dispatch::client::{build_request, Sent};
use crate::jq::{Failure, FailureKind, Lane, Output, Program};
use crate::send::{payload, sample_events};
use crate::store::{now_ms, EventId, EventMeta, StoredEvent};

/// The event names to try a route with: the format's usual events that its
/// `events` match, else a name made from each pattern.
fn route_events(source: &Source, route: &RouteRule) -> Vec<String> {
    let usual: Vec<String> =
        sample_events(&source.format).iter().filter(|e| route.matches(e)).map(|e| e.to_string()).collect();
    if !usual.is_empty() {
        return usual;
    }
    route
        .events
        .iter()
        .map(|p| match p {
            EventPattern::Exact(e) => e.clone(),
            EventPattern::Prefix(prefix) => format!("{prefix}published"),
            EventPattern::Any => "sample.event".to_string(),
        })
        .collect()
}

/// A stored event as a target would get it, for a transform to run on.
fn event_for(source: &Source, event: &str, body: impl Into<Bytes>, target: &str) -> StoredEvent {
    StoredEvent {
        id: EventId::new(),
        meta: EventMeta {
            source: source.name.clone(),
            event: event.to_string(),
            received_ms: now_ms(),
            content_type: Some("application/json".into()),
            targets: vec![target.to_string()],
            dedup: Vec::new(),
            order: Default::default(),
            group: Default::default(),
        },
        body: body.into(),
    }
}

/// How one program did on the samples.
#[derive(Default)]
struct Tally {
    runs: usize,
    /// Per kind of result: true/false for a filter; body/skipped for a transform.
    yes: usize,
    no: usize,
    /// Each failure, with the sample it failed on.
    failures: Vec<(String, Failure)>,
}

impl Tally {
    /// One run on a sample: `Ok(true)` for a yes (a true filter, a body, a
    /// key), `Ok(false)` for a no, or its failure.
    fn note(&mut self, sample: String, result: Result<bool, Failure>) {
        self.runs += 1;
        match result {
            Ok(true) => self.yes += 1,
            Ok(false) => self.no += 1,
            Err(f) => self.failures.push((sample, f)),
        }
    }

    /// Adds the program's line (`yes` and `no` name its two results) and its problem, if any.
    /// A line for the program (`runs_in`: where ingest runs it), and its problem.
    fn report(
        self,
        key: String,
        (yes, no): (&str, &str),
        runs_in: &str,
        lines: &mut Vec<String>,
        problems: &mut Vec<Problem>,
    ) {
        let (runs, failed) = (self.runs, self.failures.len());
        lines
            .push(format!("  {key}: {runs} samples, {} {yes}, {} {no}, {failed} failed; {runs_in}", self.yes, self.no));
        problems.extend(self.problem(key));
    }

    /// The problem with this program, if any: it passed a limit, could not
    /// run, or failed on every sample.
    fn problem(&self, key: String) -> Option<Problem> {
        let limit = self
            .failures
            .iter()
            .find(|(_, f)| matches!(f.kind, FailureKind::TimeLimit | FailureKind::Crashed | FailureKind::Unavailable));
        let message = match (limit, self.failures.first()) {
            (Some((sample, f)), _) => format!("on the sample {sample}: {f}"),
            (None, Some((sample, f))) if self.failures.len() == self.runs => {
                format!("fails on every sample webhook ({}); on {sample}: {f}", self.runs)
            }
            _ => return None,
        };
        Some(Problem { key, message })
    }
}

/// Where a program runs, for `check`'s line.
fn runs_in(program: &Program) -> &'static str {
    if program.is_direct() {
        "answered by the relay"
    } else {
        "runs in the jq sandbox"
    }
}

/// Runs every filter, transform and key program on the sample webhooks of
/// its sources' formats (those `hookrelay send` posts), each where ingest
/// runs it. Returns a line per program and the problems: a program that
/// passes its time or memory limit, or fails on every sample.
pub async fn check_programs(settings: &Settings) -> (Vec<String>, Vec<Problem>) {
    let (mut lines, mut problems) = (Vec::new(), Vec::new());
    let now = SystemTime::now();
    for source in &settings.sources {
        let lane = Lane::new(format!("check {}", source.name));
        for route in &source.routes {
            let Some(filter) = &route.filter else { continue };
            let mut tally = Tally::default();
            for event in route_events(source, route) {
                let Ok((body, _)) = payload(source, &event, now) else { continue };
                let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
                let result = lane.filter(filter, &source.name, &event, &Bytes::from(body), json.as_ref()).await;
                tally.note(format!("{} {event}", source.name), result);
            }
            let key = format!("{}.filter", route.key);
            tally.report(key, ("true", "false"), runs_in(filter), &mut lines, &mut problems);
        }
    }
    for (i, target) in settings.targets.iter().enumerate() {
        let lane = Lane::new(format!("check {}", target.name));
        let key_program = match &target.sequencing {
            Some(Sequencing::Ordered(p)) => Some((p, "order_by")),
            Some(Sequencing::Debounced(Debounce { key: Some(p), .. })) => Some((p, "debounce.key")),
            _ => None,
        };
        let (mut transforms, mut keys) = (Tally::default(), Tally::default());
        for (source, event) in target_samples(settings, target) {
            let Ok((body, _)) = payload(source, &event, now) else { continue };
            let sample = format!("{} {event}", source.name);
            if let Some(transform) = &target.transform {
                let result =
                    match lane.transform(transform, &event_for(source, &event, body.clone(), &target.name)).await {
                        Ok(Output::Value(_)) => Ok(true),
                        Ok(Output::Empty) => Ok(false),
                        Ok(Output::Failed(f)) => Err(f),
                        Err(e) => Err(Failure::new(FailureKind::Unavailable, e.to_string())),
                    };
                transforms.note(sample.clone(), result);
            }
            if let Some((program, _)) = key_program {
                let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
                let result = lane.key(program, &source.name, &event, &Bytes::from(body), json.as_ref()).await;
                keys.note(sample, result.map(|k| k.is_some()));
            }
        }
        if let Some(transform) = &target.transform {
            let key = format!("targets[{i}].transform");
            transforms.report(key, ("bodies", "skipped"), runs_in(transform), &mut lines, &mut problems);
        }
        if let Some((program, name)) = key_program {
            let key = format!("targets[{i}].{name}");
            keys.report(key, ("keys", "without a key"), runs_in(program), &mut lines, &mut problems);
        }
    }
    (lines, problems)
}

/// The (source, event) samples a target's transform is tried on: those of
/// the routes that lead to it, else every source's usual events.
fn target_samples<'a>(settings: &'a Settings, target: &Target) -> Vec<(&'a Source, String)> {
    let mut out = Vec::new();
    for source in &settings.sources {
        for route in source.routes.iter().filter(|r| r.targets.contains(&target.name)) {
            out.extend(route_events(source, route).into_iter().map(|e| (source.as_ref(), e)));
        }
    }
    if out.is_empty() {
        for source in &settings.sources {
            out.extend(sample_events(&source.format).iter().map(|e| (source.as_ref(), e.to_string())));
        }
    }
    out.dedup_by(|a, b| a.0.name == b.0.name && a.1 == b.1);
    out
}

/// Header values that may be credentials, shown redacted.
fn is_secret_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    ["auth", "key", "token", "secret", "password", "cookie", "signature", "session"].iter().any(|w| n.contains(w))
}

/// `hookrelay preview`: the routes a webhook matches (each filter's verdict)
/// and, for every target, the request it would get. Returns the report and
/// whether every program ran without failing.
pub async fn preview(
    settings: &Settings,
    source: &str,
    event: &str,
    payload_file: Option<Vec<u8>>,
) -> Result<(String, bool), String> {
    let src = settings.sources.iter().find(|s| s.name == source).ok_or_else(|| {
        let names: Vec<&str> = settings.sources.iter().map(|s| s.name.as_str()).collect();
        format!("no source is named {source:?} (sources: {})", names.join(", "))
    })?;
    let (body, origin) = match payload_file {
        Some(body) => (Bytes::from(body), "from the file"),
        None => (Bytes::from(payload(src, event, SystemTime::now())?.0), "a sample"),
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(|e| format!("the payload is not JSON: {e}"))?;
    let mut out = String::new();
    let mut ok = true;
    let _ = writeln!(out, "webhook: source {source}, event {event}, {} bytes ({origin})", body.len());

    let lane = Lane::new(format!("preview {source}"));
    let mut verdicts: Vec<(&str, bool)> = Vec::new();
    for route in &src.routes {
        let events: Vec<String> = route.events.iter().map(|e| e.to_string()).collect();
        let head = format!("{} [{}] -> {}", route.key, events.join(", "), route.targets.join(", "));
        if !route.matches(event) {
            let _ = writeln!(out, "  {head}: the event does not match");
            continue;
        }
        let Some(filter) = &route.filter else {
            let _ = writeln!(out, "  {head}: matches");
            continue;
        };
        let verdict = match lane.filter(filter, source, event, &body, None).await {
            Ok(pass) => {
                verdicts.push((&route.key, pass));
                format!(
                    "filter gives {}: {}",
                    if pass { "true" } else { "false" },
                    if pass { "matches" } else { "no match" }
                )
            }
            Err(f) => {
                ok = false;
                verdicts.push((&route.key, true));
                format!("filter FAILED ({f}): matches, as a failing filter does")
            }
        };
        let _ = writeln!(out, "  {head}: {verdict}");
    }
    let targets = src.targets_for(event, |r| verdicts.iter().any(|(key, pass)| *key == r.key && *pass));
    let _ = writeln!(out, "targets: {}", targets.len());
    let mut stored = event_for(src, event, body, "");
    stored.meta.targets = targets.iter().map(|t| t.to_string()).collect();
    for name in targets {
        let Some(target) = settings.targets.iter().find(|t| t.name == name) else { continue };
        ok &= show_target(&mut out, target, &stored, &settings.from_env).await;
    }
    Ok((out, ok))
}

/// Appends the request `target` would get; false when its transform failed.
async fn show_target(out: &mut String, target: &Arc<Target>, stored: &StoredEvent, from_env: &EnvValues) -> bool {
    let _ = writeln!(out, "\ntarget {}", target.name);
    let key_program = match &target.sequencing {
        Some(Sequencing::Ordered(p)) => Some(("order_by key", p)),
        Some(Sequencing::Debounced(d)) => {
            let _ = writeln!(
                out,
                "  debounce: window {}, max_wait {}",
                humantime::format_duration(d.window),
                humantime::format_duration(d.max_wait)
            );
            d.key.as_ref().map(|p| ("debounce key", p))
        }
        None => None,
    };
    if let Some((what, program)) = key_program {
        let lane = Lane::new(format!("preview {}", target.name));
        match lane.key(program, &stored.meta.source, &stored.meta.event, &stored.body, None).await {
            Ok(Some(key)) => drop(writeln!(out, "  {what}: {key:?}")),
            Ok(None) => drop(writeln!(out, "  {what}: none (not held)")),
            Err(f) => {
                let _ = writeln!(out, "  {what} FAILED: {f} (no key: not held)");
                return false;
            }
        }
    }
    let transformed = match &target.transform {
        None => None,
        Some(program) => match transform(program, stored, &target.name).await {
            Ok(Some(json)) => Some(json),
            Ok(None) => {
                let _ = writeln!(out, "  skipped: the transform gives no output, nothing is sent");
                return true;
            }
            Err(why) => {
                let _ = writeln!(out, "  transform FAILED: {why}\n  the delivery would go to the dead letters");
                return false;
            }
        },
    };
    let sent = Sent { transformed, attempt: 1, coalesced: 0 };
    let request = match build_request(target, stored, sent, SystemTime::now()) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "  cannot build the request: {e}");
            return false;
        }
    };
    let _ = writeln!(out, "  POST {}", from_env.redact(&request.uri().to_string()));
    for (name, value) in request.headers() {
        let shown = if is_secret_header(name) && name.as_str() != "webhook-signature" {
            "<redacted>".to_string()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        let _ = writeln!(out, "  {name}: {shown}");
    }
    let sent = request.into_body();
    let bytes = http_body_util::BodyExt::collect(sent).await.map(|c| c.to_bytes()).unwrap_or_default();
    let _ = writeln!(out, "\n{}", String::from_utf8_lossy(&bytes));
    true
}

/// The transform's body, `None` for no output, or why it failed.
async fn transform(program: &Program, event: &StoredEvent, target: &str) -> Result<Option<Bytes>, String> {
    let lane = Lane::new(format!("preview {target}"));
    match lane.transform(program, event).await {
        Ok(Output::Value(json)) => Ok(Some(Bytes::from(json))),
        Ok(Output::Empty) => Ok(None),
        Ok(Output::Failed(f)) => Err(f.to_string()),
        Err(e) => Err(e.to_string()),
    }
}
