//! One webhook request: source lookup, IP check, bounded body read,
//! authentication, parsing, routing, durable store, and the contract's answer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, StatusCode, Version};
use hyper::body::{Body, Incoming};
use serde_json::Value;
use tokio::sync::watch;

use super::auth::{self, AuthFailure};
use super::budget::{BodyBudget, BodyError};
use super::formats::{self, FormatError};
use crate::config::{RouteRule, Sequencing, Settings, Source, Target};
use crate::dispatch::Workers;
use crate::jq::Lane;
use crate::listen::RequestStarted;
use crate::metrics::{IngressOutcome, Metrics};
use crate::respond::{self, Reply};
use crate::store::{Ingested, NewEvent, Sequenced, Store, StoreError};

/// What ingress reads on every request; replaced whole on reload.
#[derive(Debug)]
pub struct Routes {
    by_path: HashMap<String, Arc<Source>>,
    /// Where each source's route filters and its targets' keys run (the
    /// sandbox process starts on first use).
    lanes: HashMap<String, Lane>,
    /// The targets, for their `order_by` and `debounce`.
    targets: HashMap<String, Arc<Target>>,
    /// Each source's bytes of bodies read at once.
    budgets: HashMap<String, BodyBudget>,
    max_body: u64,
    request_timeout: Duration,
}

impl Routes {
    pub fn new(settings: &Settings) -> Self {
        Routes {
            by_path: settings.sources.iter().map(|s| (s.path.clone(), s.clone())).collect(),
            lanes: settings
                .sources
                .iter()
                .map(|s| (s.name.clone(), Lane::new(format!("source {} programs", s.name))))
                .collect(),
            targets: settings.targets.iter().map(|t| (t.name.clone(), t.clone())).collect(),
            budgets: settings
                .sources
                .iter()
                .map(|s| (s.name.clone(), BodyBudget::for_source(&s.auth, settings.server.max_body)))
                .collect(),
            max_body: settings.server.max_body,
            request_timeout: settings.server.request_timeout,
        }
    }
}

/// Shared by every connection.
pub struct Ingress {
    pub routes: watch::Receiver<Arc<Routes>>,
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    /// Rung once an event is durable, so that its targets' workers start at once.
    pub workers: Arc<Workers>,
}

/// Why a webhook was not stored. The one place that maps a failure to the
/// contract's status and short body; the detail goes to the log only.
#[derive(Debug)]
enum Reject {
    Forbidden,
    TooLarge,
    Timeout,
    BodyRead(String),
    Unauthorized(AuthFailure),
    Invalid(FormatError),
    Unavailable(StoreError),
}

impl Reject {
    fn outcome(&self) -> IngressOutcome {
        match self {
            Reject::Forbidden => IngressOutcome::Forbidden,
            Reject::TooLarge => IngressOutcome::TooLarge,
            Reject::Timeout | Reject::BodyRead(_) | Reject::Invalid(_) => IngressOutcome::Invalid,
            Reject::Unauthorized(_) => IngressOutcome::Unauthorized,
            Reject::Unavailable(_) => IngressOutcome::Unavailable,
        }
    }

    fn response(&self, version: Version) -> Reply {
        let (status, message) = match self {
            Reject::Forbidden => (StatusCode::FORBIDDEN, "forbidden".to_string()),
            Reject::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload too large".to_string()),
            Reject::Timeout => (StatusCode::REQUEST_TIMEOUT, "request timeout".to_string()),
            Reject::BodyRead(_) => (StatusCode::BAD_REQUEST, "cannot read the body".to_string()),
            Reject::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized".to_string()),
            Reject::Invalid(e) => (StatusCode::BAD_REQUEST, e.to_string()),
            Reject::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable".to_string()),
        };
        let mut r = respond::error(status, &message);
        // An unread body may still be on the wire: HTTP/1 cannot reuse the connection.
        if matches!(self, Reject::TooLarge | Reject::Timeout) && version < Version::HTTP_2 {
            r.headers_mut().insert(CONNECTION, http::HeaderValue::from_static("close"));
        }
        if matches!(self, Reject::Unavailable(_)) {
            r.headers_mut().insert(RETRY_AFTER, http::HeaderValue::from_static("5"));
        }
        r
    }

    fn log(&self, source: &str, peer: IpAddr, ms: f64) {
        let outcome = self.outcome().as_str();
        match self {
            Reject::Unauthorized(why) => {
                tracing::warn!(source, %peer, outcome, reason = %why, ms, "webhook refused")
            }
            Reject::Forbidden => {
                tracing::warn!(source, %peer, outcome, reason = "client address not in allow_ips", ms, "webhook refused")
            }
            Reject::Unavailable(e) => {
                tracing::error!(source, %peer, outcome, error = %e, ms, "webhook not stored")
            }
            Reject::Invalid(e) => {
                tracing::info!(source, %peer, outcome, reason = %e, ms, "webhook refused")
            }
            Reject::BodyRead(e) => {
                tracing::info!(source, %peer, outcome, reason = %e, ms, "webhook refused")
            }
            Reject::TooLarge | Reject::Timeout => {
                tracing::info!(source, %peer, outcome, ms, "webhook refused")
            }
        }
    }
}

impl Ingress {
    /// Answers one request. Never fails: every problem is a status code.
    pub async fn handle(&self, peer: IpAddr, req: Request<Incoming>) -> Reply {
        let started = Instant::now();
        let routes = self.routes.borrow().clone();
        let Some(source) = routes.by_path.get(req.uri().path()).cloned() else {
            return respond::error(StatusCode::NOT_FOUND, "not found");
        };
        if req.method() != Method::POST {
            let mut r = respond::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            r.headers_mut().insert(ALLOW, http::HeaderValue::from_static("POST"));
            return r;
        }
        let version = req.version();
        // A stored webhook is counted and logged where it is stored (see
        // `receive`), also when its client hung up before the answer.
        match self.receive(&routes, &source, peer, req, started).await {
            Ok(Ingested::Accepted { id, targets }) => {
                respond::json(StatusCode::ACCEPTED, serde_json::json!({ "id": id.to_string(), "targets": targets }))
            }
            Ok(Ingested::Duplicate { id }) => {
                respond::json(StatusCode::OK, serde_json::json!({ "id": id.to_string(), "duplicate": true }))
            }
            Err(reject) => {
                let elapsed = started.elapsed().as_secs_f64();
                self.metrics.ingress(&source.name, reject.outcome(), elapsed);
                reject.log(&source.name, peer, elapsed * 1000.0);
                reject.response(version)
            }
        }
    }

    async fn receive(
        &self,
        routes: &Routes,
        source: &Source,
        peer: IpAddr,
        req: Request<Incoming>,
        started: Instant,
    ) -> Result<Ingested, Reject> {
        if !source.is_ip_allowed(peer) {
            return Err(Reject::Forbidden);
        }
        // Refuse a declared oversize body before reading any of it.
        if req.body().size_hint().lower() > routes.max_body {
            return Err(Reject::TooLarge);
        }
        // A credential all in the headers is checked before the body is
        // read: no body of a client without it is held in memory.
        if !auth::signs_body(&source.auth) {
            auth::verify(&source.auth, req.headers(), Bytes::new(), SystemTime::now()).map_err(Reject::Unauthorized)?;
        }
        let (parts, body) = req.into_parts();
        let limit = usize::try_from(routes.max_body).unwrap_or(usize::MAX);
        let budget = routes.budgets.get(&source.name).ok_or_else(|| Reject::BodyRead("no body budget".into()))?;
        // The whole request within `request_timeout`: its head's time counts.
        let began = parts.extensions.get::<RequestStarted>().map_or(started.into(), |s| s.0);
        // `_held` gives the body's bytes back to the budget once stored.
        let (body, _held) = tokio::time::timeout_at(began + routes.request_timeout, budget.read(body, limit))
            .await
            .map_err(|_| Reject::Timeout)?
            .map_err(|e| match e {
                BodyError::TooLarge => Reject::TooLarge,
                BodyError::Read(e) => Reject::BodyRead(e),
            })?;
        let verified =
            auth::verify(&source.auth, &parts.headers, body, SystemTime::now()).map_err(Reject::Unauthorized)?;
        let parsed = formats::parse(&source.format, &parts.headers, verified.body()).map_err(Reject::Invalid)?;
        let event = parsed.event.clone();
        let targets = self.targets(routes, source, &event, verified.body(), &parsed.json).await;
        let content_type = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from);
        let sequenced = self.sequencing(routes, source, &event, verified.body(), &parsed.json, &targets).await;
        let new = NewEvent::new(source, verified, parsed, content_type, targets.clone()).with_sequencing(sequenced);
        // Storing, waking, counting and logging run in a task of their own:
        // if the client hangs up meanwhile, this future is dropped, but an
        // event that becomes durable must still wake its workers, and be
        // counted like any other.
        let (store, workers, metrics) = (self.store.clone(), self.workers.clone(), self.metrics.clone());
        let source_name = source.name.clone();
        let ingested = tokio::spawn(async move {
            let ingested = store.ingest(new).await?;
            let (outcome, id) = match ingested {
                Ingested::Accepted { id, .. } => {
                    workers.wake(targets.iter().map(String::as_str));
                    (IngressOutcome::Accepted, id)
                }
                Ingested::Duplicate { id } => (IngressOutcome::Duplicate, id),
            };
            let elapsed = started.elapsed().as_secs_f64();
            metrics.ingress(&source_name, outcome, elapsed);
            let ms = elapsed * 1000.0;
            tracing::info!(source = %source_name, event, %id, outcome = outcome.as_str(), ms, "webhook received");
            Ok(ingested)
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(format!("the store task failed: {e}"))))
        .map_err(Reject::Unavailable)?;
        Ok(ingested)
    }

    /// The targets of a webhook: its routes' filters run first, each in
    /// the source's sandbox lane. A filter that fails lets its route match
    /// (a broken filter never drops a webhook), counted and logged without
    /// the payload.
    async fn targets(&self, routes: &Routes, source: &Source, event: &str, body: &Bytes, json: &Value) -> Vec<String> {
        let mut verdicts: Vec<(&str, bool)> = Vec::new();
        for route in source.routes.iter().filter(|r| r.matches(event)) {
            let (Some(filter), Some(lane)) = (&route.filter, routes.lanes.get(&source.name)) else {
                continue;
            };
            let pass = lane.filter(filter, &source.name, event, body, Some(json)).await.unwrap_or_else(|failure| {
                self.metrics.filter_errors.with_label_values(&[&source.name]).inc();
                // The kind only: a runtime error's message can quote the payload.
                tracing::warn!(source = %source.name, route = %route.key, event, error = failure.kind.as_str(), "route filter failed; the route matches");
                true
            });
            verdicts.push((&route.key, pass));
        }
        let passes = |r: &RouteRule| verdicts.iter().any(|(key, pass)| *key == r.key && *pass);
        source.targets_for(event, passes).into_iter().map(String::from).collect()
    }

    /// How each target's delivery is sequenced: its `order_by` key, or its
    /// `debounce` group. A key program that fails, gives nothing or `null`
    /// gives no key: the delivery is not held (`order_by`), or joins the
    /// target's keyless group (`debounce`). Logged without the payload.
    async fn sequencing(
        &self,
        routes: &Routes,
        source: &Source,
        event: &str,
        body: &Bytes,
        json: &Value,
        targets: &[String],
    ) -> Vec<(String, Sequenced)> {
        let mut out = Vec::new();
        let Some(lane) = routes.lanes.get(&source.name) else { return out };
        for name in targets {
            let Some(sequencing) = routes.targets.get(name).and_then(|t| t.sequencing.as_ref()) else { continue };
            let program = match sequencing {
                Sequencing::Ordered(program) => Some(program),
                Sequencing::Debounced(d) => d.key.as_ref(),
            };
            let key = match program {
                None => None,
                Some(program) => lane.key(program, &source.name, event, body, Some(json)).await.unwrap_or_else(|failure| {
                    tracing::warn!(source = %source.name, target = %name, event, error = failure.kind.as_str(), "key program failed; the delivery has no key");
                    None
                }),
            };
            match (sequencing, key) {
                (Sequencing::Ordered(_), Some(key)) => out.push((name.clone(), Sequenced::Ordered { key })),
                (Sequencing::Ordered(_), None) => {}
                (Sequencing::Debounced(d), key) => out.push((
                    name.clone(),
                    Sequenced::Grouped {
                        key: key.unwrap_or_default(),
                        window_ms: d.window.as_millis() as u64,
                        max_wait_ms: d.max_wait.as_millis() as u64,
                    },
                )),
            }
        }
        out
    }
}
