//! The `/admin/*` endpoints (README, "Admin listener"): JSON in and out.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error, json as reply, Admin, Reply};
use crate::dispatch::Control;
use crate::store::{Attempt, DeliveryState, EventId, StoreError, StoredEvent};

/// Entries a listing returns when `limit` is not given, and at most.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;
/// Events whose dead letters a replay of them all reads at once.
const REPLAY_PAGE: usize = 1_000;
/// Largest request body accepted by the admin API.
const MAX_BODY: usize = 1 << 20;

pub async fn route(admin: &Admin, req: Request<Incoming>) -> Reply {
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
    let method = req.method().clone();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["targets"]) => targets(admin).await,
        (&Method::GET, ["stats"]) => stats(admin, &query),
        (&Method::POST, ["targets", name, action @ ("pause" | "resume")]) => pause(admin, name, action).await,
        (&Method::GET, ["events"]) => events(admin, &query).await,
        (&Method::GET, ["events", id]) => event(admin, id).await,
        (&Method::POST, ["events", id, "redeliver"]) => redeliver(admin, id, query.get("target")).await,
        (&Method::GET, ["dead-letters"]) => dead_letters(admin, &query).await,
        (&Method::POST, ["dead-letters", "replay"]) => replay(admin, req).await,
        (_, ["targets"] | ["stats"] | ["targets", _, "pause" | "resume"] | ["events"] | ["events", _])
        | (_, ["events", _, "redeliver"] | ["dead-letters"] | ["dead-letters", "replay"]) => {
            Err(ApiError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into()))
        }
        _ => Err(ApiError(StatusCode::NOT_FOUND, "not found".into())),
    };
    result.unwrap_or_else(|ApiError(status, message)| error(status, &message))
}

/// A refusal: the status and the message the caller sees.
struct ApiError(StatusCode, String);

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "admin request failed in storage");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable".into())
    }
}

type Result<T = Reply> = std::result::Result<T, ApiError>;

fn limit(query: &HashMap<String, String>) -> Result<usize> {
    match query.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError(StatusCode::BAD_REQUEST, format!("limit must be a number from 1 to {MAX_LIMIT}"))),
        },
    }
}

fn parse_id(raw: &str) -> Result<EventId> {
    raw.parse().map_err(|e: String| ApiError(StatusCode::BAD_REQUEST, e))
}

/// The event `raw_id` names, or 400 (not an id) / 404 (no such event).
async fn find_event(admin: &Admin, raw_id: &str) -> Result<StoredEvent> {
    let id = parse_id(raw_id)?;
    admin.store.event(id).await?.ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no event {raw_id}")))
}

fn known_target(admin: &Admin, name: &str) -> Result<()> {
    match admin.targets().iter().any(|t| t.name == name) {
        true => Ok(()),
        false => Err(ApiError(StatusCode::NOT_FOUND, format!("no target is named {name:?}"))),
    }
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn attempt_json(a: &Attempt) -> Value {
    json!({ "at": time(a.at_ms), "duration_ms": a.duration_ms, "status": a.status, "error": a.error })
}

async fn targets(admin: &Admin) -> Result {
    let mut out = Vec::new();
    for t in &admin.targets() {
        let counts = admin.store.counts(&t.name).await?;
        let status = admin.workers.status(&t.name);
        out.push(json!({
            "name": t.name,
            "queued": counts.queued,
            "in_flight": status.map_or(0, |s| s.in_flight),
            "dead": counts.dead,
            "held": counts.held,
            "circuit": status.map_or("closed", |s| s.circuit.as_str()),
            "paused": status.is_some_and(|s| s.paused),
        }));
    }
    Ok(reply(StatusCode::OK, json!({ "targets": out })))
}

async fn pause(admin: &Admin, name: &str, action: &str) -> Result {
    known_target(admin, name)?;
    let control = if action == "pause" { Control::Pause } else { Control::Resume };
    // Saved first (for restarts, and for the other instances of a shared
    // store), so that a pause that cannot be kept is not reported as done.
    let paused = matches!(control, Control::Pause);
    if let Err(e) = admin.store.set_paused(name, paused).await {
        tracing::error!(target = %name, error = %e, "cannot save the {action}");
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("cannot save the {action}: {e}")));
    }
    if !admin.workers.control(name, control.clone()).await {
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the target's worker is not running".into()));
    }
    // Answer once it is applied, so that what is read next shows it.
    if !admin.workers.settled(name, paused, Duration::from_secs(5)).await {
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the target's worker did not apply it in time".into()));
    }
    Ok(reply(StatusCode::OK, json!({ "target": name, "paused": paused })))
}

/// Events examined at most by one listing with filters, so that a filter
/// that matches nothing answers in bounded time (the answer's `next_before`
/// goes on from there).
const MAX_SCANNED: usize = 5_000;

/// The delivery statuses an event listing filters on.
const STATUSES: &[&str] = &["pending", "delivered", "dead", "skipped", "coalesced"];

fn status_name(state: &DeliveryState) -> &'static str {
    match state {
        DeliveryState::Pending { .. } => "pending",
        DeliveryState::Delivered { .. } => "delivered",
        DeliveryState::Dead { .. } => "dead",
        DeliveryState::Skipped { .. } => "skipped",
        DeliveryState::Coalesced { .. } => "coalesced",
    }
}

/// `*` in `pattern` stands for any run of characters; the rest is literal.
fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// `GET /admin/events?source=&event=&status=&target=&before=&limit=`:
/// newest first, filtered, a page at a time (`before`: the `next_before` of
/// the page before).
async fn events(admin: &Admin, query: &HashMap<String, String>) -> Result {
    let limit = limit(query)?;
    let source = query.get("source").map(String::as_str).filter(|s| !s.is_empty());
    let pattern = query.get("event").map(String::as_str).filter(|s| !s.is_empty());
    let target = query.get("target").map(String::as_str).filter(|s| !s.is_empty());
    let status = query.get("status").map(String::as_str).filter(|s| !s.is_empty());
    if let Some(s) = status.filter(|s| !STATUSES.contains(s)) {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("status {s:?} is not one of {}", STATUSES.join(", "))));
    }
    let mut before = query.get("before").filter(|b| !b.is_empty()).map(|b| parse_id(b)).transpose()?;
    let mut out = Vec::new();
    let mut scanned = 0;
    let mut exhausted = false;
    'pages: while out.len() < limit && scanned < MAX_SCANNED {
        let step = limit.max(100);
        let page = admin.store.events_before(before, source, step).await?;
        scanned += step;
        for (id, m) in page.events {
            before = Some(id);
            if pattern.is_some_and(|p| !glob(p, &m.event)) || target.is_some_and(|t| !m.targets.iter().any(|x| x == t))
            {
                continue;
            }
            let deliveries = admin.store.deliveries(id).await?;
            let statuses: Vec<Value> = deliveries
                .iter()
                .map(|d| json!({ "target": d.target, "status": status_name(&d.record.state) }))
                .collect();
            let wanted = status.is_none_or(|s| {
                deliveries.iter().any(|d| target.is_none_or(|t| t == d.target) && status_name(&d.record.state) == s)
            });
            if wanted {
                out.push(json!({ "id": id.to_string(), "source": m.source, "event": m.event, "received_at": time(m.received_ms), "targets": m.targets, "deliveries": statuses }));
            }
            if out.len() >= limit {
                // The next page goes on after this one.
                break 'pages;
            }
        }
        match page.next_before {
            Some(next) => before = Some(next),
            None => {
                exhausted = true;
                break;
            }
        }
    }
    let next = if exhausted { None } else { before.map(|b| b.to_string()) };
    Ok(reply(StatusCode::OK, json!({ "events": out, "next_before": next })))
}

/// `GET /admin/stats?minutes=60`: this instance's per-minute counts.
fn stats(admin: &Admin, query: &HashMap<String, String>) -> Result {
    let minutes = match query.get("minutes") {
        None => crate::metrics::STATS_MINUTES,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=crate::metrics::STATS_MINUTES).contains(&n) => n,
            _ => {
                let message = format!("minutes must be a number from 1 to {}", crate::metrics::STATS_MINUTES);
                return Err(ApiError(StatusCode::BAD_REQUEST, message));
            }
        },
    };
    let list: Vec<Value> = admin
        .metrics
        .stats
        .last(minutes, crate::store::now_ms())
        .into_iter()
        .map(|m| {
            json!({ "start": time(m.start_ms), "webhooks": m.webhooks, "deliveries": m.deliveries, "queued": m.queued })
        })
        .collect();
    Ok(reply(StatusCode::OK, json!({ "minutes": list })))
}

async fn event(admin: &Admin, raw_id: &str) -> Result {
    let ev = find_event(admin, raw_id).await?;
    let id = ev.id;
    let deliveries: Vec<Value> = admin
        .store
        .deliveries(id)
        .await?
        .into_iter()
        .map(|d| {
            let mut v = match &d.record.state {
                DeliveryState::Pending { due_ms } => json!({ "status": "pending", "due_at": time(*due_ms) }),
                DeliveryState::Delivered { at_ms } => json!({ "status": "delivered", "delivered_at": time(*at_ms) }),
                DeliveryState::Dead { at_ms, reason } => {
                    json!({ "status": "dead", "dead_at": time(*at_ms), "reason": reason })
                }
                DeliveryState::Skipped { at_ms } => json!({ "status": "skipped", "skipped_at": time(*at_ms) }),
                DeliveryState::Coalesced { at_ms, into } => {
                    json!({ "status": "coalesced", "coalesced_at": time(*at_ms), "into": into })
                }
            };
            if let Some(head) = d.waiting_for {
                v["waiting_for"] = json!(head.to_string());
            }
            if d.record.coalesced > 0 {
                v["coalesced"] = json!(d.record.coalesced);
            }
            v["target"] = json!(d.target);
            v["attempts"] = d.record.attempts.iter().map(attempt_json).collect();
            v
        })
        .collect();
    // The payload as JSON when it is (it always is for the built-in formats), else as text.
    let payload = serde_json::from_slice::<Value>(&ev.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&ev.body).into_owned()));
    Ok(reply(
        StatusCode::OK,
        json!({
            "id": id.to_string(),
            "source": ev.meta.source,
            "event": ev.meta.event,
            "received_at": time(ev.meta.received_ms),
            "content_type": ev.meta.content_type,
            "payload": payload,
            // Byte for byte (as UTF-8): what the targets are sent, where the
            // parsed form would fold a key given twice or round a number.
            "payload_text": String::from_utf8_lossy(&ev.body),
            "deliveries": deliveries,
        }),
    ))
}

async fn redeliver(admin: &Admin, raw_id: &str, target: Option<&String>) -> Result {
    let ev = find_event(admin, raw_id).await?;
    let id = ev.id;
    let chosen: Vec<String> = match target {
        Some(t) if ev.meta.targets.contains(t) => vec![t.clone()],
        Some(t) => return Err(ApiError(StatusCode::NOT_FOUND, format!("event {raw_id} was not routed to {t:?}"))),
        None => ev.meta.targets.clone(),
    };
    let chosen: Vec<(String, EventId)> = chosen.into_iter().map(|t| (t, id)).collect();
    let queued: Vec<&str> = requeue(admin, &chosen).await?.into_iter().map(|(t, _)| t.as_str()).collect();
    tracing::info!(id = %id, targets = ?queued, "redelivery requested by an operator");
    Ok(reply(StatusCode::OK, json!({ "id": id.to_string(), "redelivered": queued })))
}

/// Queues each delivery again, due now; the ones queued (an unknown one is
/// not). Their workers are woken even when a later one fails, so that what
/// was queued does not wait for the workers' next look.
async fn requeue<'a>(admin: &Admin, chosen: &'a [(String, EventId)]) -> Result<Vec<&'a (String, EventId)>> {
    let mut queued = Vec::new();
    let mut failed = None;
    for delivery in chosen {
        match admin.store.requeue(&delivery.0, delivery.1).await {
            Ok(true) => queued.push(delivery),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(queued = queued.len(), error = %e, "requeue stopped part-way; those queued go out");
                failed = Some(e);
                break;
            }
        }
    }
    admin.workers.wake(queued.iter().map(|(t, _)| t.as_str()));
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(queued),
    }
}

async fn dead_letters(admin: &Admin, query: &HashMap<String, String>) -> Result {
    let limit = limit(query)?;
    let target = query.get("target");
    if let Some(t) = target {
        known_target(admin, t)?;
    }
    let before = query.get("before").filter(|b| !b.is_empty()).map(|b| parse_id(b)).transpose()?;
    let list = admin.store.dead_letters(target.map(String::as_str), before, limit).await?;
    // A full page may have more before it.
    let mut events: Vec<EventId> = list.iter().map(|d| d.event_id).collect();
    events.dedup();
    let next = events.last().filter(|_| events.len() >= limit).map(|id| id.to_string());
    let letters: Vec<Value> = list
        .into_iter()
        .map(|d| {
            json!({
                "id": d.event_id.to_string(),
                "target": d.target,
                "reason": d.reason,
                "dead_at": time(d.at_ms),
                "last_attempt": d.last_attempt.as_ref().map(attempt_json),
            })
        })
        .collect();
    Ok(reply(StatusCode::OK, json!({ "dead_letters": letters, "next_before": next })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    target: Option<String>,
    ids: Option<Vec<String>>,
}

async fn replay(admin: &Admin, req: Request<Incoming>) -> Result {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "cannot read the body".into()))?
        .to_bytes();
    let ask: ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayRequest { target: None, ids: None }
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))?
    };
    if let Some(t) = &ask.target {
        known_target(admin, t)?;
    }
    // The listed ids (of the target, if given), or every dead letter of the
    // target (or of all), a page of events at a time.
    let replayed = match &ask.ids {
        Some(ids) => {
            let mut chosen: Vec<(String, EventId)> = Vec::new();
            for raw in ids {
                let id = parse_id(raw)?;
                for d in admin.store.deliveries(id).await? {
                    let wanted = ask.target.as_ref().is_none_or(|t| *t == d.target);
                    if wanted && matches!(d.record.state, DeliveryState::Dead { .. }) {
                        chosen.push((d.target, id));
                    }
                }
            }
            // An id listed twice is replayed once.
            chosen.sort_unstable();
            chosen.dedup();
            requeue(admin, &chosen).await?.len()
        }
        None => {
            // The store lists them newest first; they are requeued oldest
            // first, so that an `order_by` key's deliveries keep their order.
            let mut chosen: Vec<(String, EventId)> = Vec::new();
            let mut before = None;
            loop {
                let page = admin.store.dead_letters(ask.target.as_deref(), before, REPLAY_PAGE).await?;
                let Some(last) = page.last() else { break };
                before = Some(last.event_id);
                chosen.extend(page.into_iter().map(|d| (d.target, d.event_id)));
            }
            chosen.sort_unstable();
            let mut replayed = 0;
            for page in chosen.chunks(REPLAY_PAGE) {
                replayed += requeue(admin, page).await?.len();
            }
            replayed
        }
    };
    tracing::info!(replayed, target = ?ask.target, "dead letters replayed by an operator");
    Ok(reply(StatusCode::OK, json!({ "replayed": replayed })))
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn event_globs_match_like_shell_patterns() {
        assert!(glob("page.*", "page.published"));
        assert!(glob("*.published", "page.published"));
        assert!(glob("*", "anything"));
        assert!(glob("page.published", "page.published"));
        assert!(glob("p*e.*d", "page.published"));
        assert!(!glob("page.*", "post.published"));
        assert!(!glob("*.delete", "page.published"));
        assert!(!glob("page", "page.published"));
        assert!(!glob("a*b*c", "ab"));
    }
}
