//! The admin listener: `/metrics`, `/healthz`, `/readyz` open; `/admin/*`
//! behind a bearer token (and absent when no token is configured).

mod api;
mod console;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Secret, Target};
use crate::dispatch::Workers;
use crate::listen;
use crate::metrics::Metrics;
use crate::respond;
use crate::store::Store;

/// What the admin listener serves from.
pub struct Admin {
    /// `None`: `/admin/*` is disabled. Replaced on reload.
    pub token: RwLock<Option<Secret>>,
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    pub workers: Arc<Workers>,
    /// The configured targets, in config order. Replaced on reload.
    pub targets: RwLock<Vec<Arc<Target>>>,
    /// True while storage is open and ingress listens; `/readyz` answers from it.
    pub ready: Arc<AtomicBool>,
}

pub(crate) use crate::respond::{error, json, Reply};

impl Admin {
    pub fn new(
        token: Option<Secret>,
        store: Arc<dyn Store>,
        metrics: Metrics,
        workers: Arc<Workers>,
        targets: Vec<Arc<Target>>,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Admin { token: RwLock::new(token), store, metrics, workers, targets: RwLock::new(targets), ready }
    }

    /// Takes a reloaded token and target list.
    pub fn update(&self, token: Option<Secret>, targets: Vec<Arc<Target>>) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = token;
        *self.targets.write().unwrap_or_else(|p| p.into_inner()) = targets;
    }

    /// The configured targets now.
    pub fn targets(&self) -> Vec<Arc<Target>> {
        self.targets.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/metrics") => {
                respond::with(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render())
            }
            (&Method::GET, "/healthz") => respond::with(StatusCode::OK, "text/plain", "ok\n"),
            (&Method::GET, "/readyz") => match self.ready.load(Ordering::SeqCst) && self.store.healthy() {
                true => respond::with(StatusCode::OK, "text/plain", "ready\n"),
                false => respond::with(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
            },
            (_, "/metrics" | "/healthz" | "/readyz") => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            // The console is there only where the API it uses is.
            (_, p) if p == "/" || p == "/console" || p.starts_with("/console/") => {
                match self.token.read().unwrap_or_else(|p| p.into_inner()).is_some() {
                    true => console::serve(req.method(), p),
                    false => error(StatusCode::NOT_FOUND, "not found (no admin.token is configured)"),
                }
            }
            (_, p) if p.starts_with("/admin/") => {
                let token = self.token.read().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(token) = token else {
                    return error(StatusCode::NOT_FOUND, "not found (no admin.token is configured)");
                };
                if !authorized(&token, req.headers()) {
                    return error(StatusCode::UNAUTHORIZED, "unauthorized");
                }
                api::route(self, req).await
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

/// `Authorization: Bearer <token>` (the scheme in any case, as HTTP has
/// it), the token compared in constant time.
fn authorized(token: &Secret, headers: &http::HeaderMap) -> bool {
    let given = headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| v.split_at_checked(7))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
        .map_or(&b""[..], |(_, token)| token);
    token.expose().ct_eq(given).into()
}

/// A request head must arrive within this on the admin listener, and a
/// connection without a request in progress is closed after as long.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin listener until `shutdown`.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let builder = Arc::new(listen::http_builder(ADMIN_HEADER_TIMEOUT));
    listen::accept(listener, shutdown.clone(), "admin", |stream, peer| {
        let (admin, builder, shutdown) = (admin.clone(), builder.clone(), shutdown.clone());
        let handle = move |req| {
            let admin = admin.clone();
            async move {
                let mut reply = admin.handle(req).await;
                console::secure(reply.headers_mut());
                reply
            }
        };
        async move { listen::serve_http(&builder, stream, handle, ADMIN_HEADER_TIMEOUT, shutdown, "admin", peer).await }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_read_in_any_case_and_the_token_exactly() {
        let token = Secret::new("test-admin-token-0123456789");
        let with = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(AUTHORIZATION, http::HeaderValue::from_str(value).unwrap());
            authorized(&token, &headers)
        };
        for scheme in ["Bearer", "bearer", "BEARER"] {
            assert!(with(&format!("{scheme} test-admin-token-0123456789")), "{scheme}");
        }
        for value in ["Bearer test-admin-token-012345678", "Basic test-admin-token-0123456789", "Bearer", ""] {
            assert!(!with(value), "{value:?}");
        }
        assert!(!authorized(&token, &http::HeaderMap::new()));
    }
}
