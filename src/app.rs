//! Wiring for `hookrelay serve`: opens the store, binds the listeners, runs
//! until a signal, then drains and stops within a grace period.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin};
use crate::config::{Auth, Settings};
use crate::dispatch::{DispatchError, Dispatcher};
use crate::ingress::{self, Ingress, Routes};
use crate::metrics::Metrics;
use crate::store::{PgOptions, PgStore, SledStore, Store, StoreError};

/// How long shutdown waits for requests in progress.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long admin requests in progress may go on once the store is closed.
const ADMIN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Dispatch(#[from] DispatchError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("storage failed; restart hookrelay once the disk is usable (nothing acknowledged was lost)")]
    StoreFailed,
}

/// A running relay.
pub struct Relay {
    /// Where ingress listens (the real port when configured with port 0).
    pub ingress_addr: SocketAddr,
    /// Where the admin listener listens.
    pub admin_addr: SocketAddr,
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    /// `/readyz`: true from when ingress listens until shutdown begins.
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    dispatcher: Dispatcher,
    /// Stops the admin listener, last of all.
    admin_shutdown: CancellationToken,
    /// The admin listener, stopped and awaited last.
    admin_task: tokio::task::JoinHandle<()>,
    admin: Arc<Admin>,
    /// What was started with and only a restart changes.
    fixed: Fixed,
    /// Keeps the routes channel open; reload sends new routes through it.
    routes: watch::Sender<Arc<Routes>>,
    /// Ingress's TLS certificate and key; reload sends renewed ones.
    tls: watch::Sender<Option<Arc<rustls::ServerConfig>>>,
}

impl Relay {
    /// Opens the store of `settings` (sled, or the shared PostgreSQL
    /// database) and starts serving.
    pub async fn start(settings: Settings) -> Result<Relay, StartError> {
        let storage = &settings.storage;
        let store: Arc<dyn Store> = match &storage.postgres {
            Some(pg) => {
                let options = PgOptions {
                    url: String::from_utf8_lossy(pg.url.expose()).into_owned(),
                    pool: pg.pool,
                    ca_certs: pg.ca_certs.clone(),
                    lease: lease(&settings.targets),
                };
                let store = PgStore::connect(&options).await.map_err(|e| match e {
                    StoreError::Io(m) => StoreError::Io(format!("{}: {m}", pg.describe)),
                    other => other,
                })?;
                tracing::info!(database = %pg.describe, pool = pg.pool, "PostgreSQL store open");
                Arc::new(store)
            }
            None => {
                let (path, cache) = (storage.path.clone(), storage.cache_bytes);
                let store = tokio::task::spawn_blocking(move || SledStore::open(&path, cache))
                    .await
                    .map_err(|e| StoreError::Io(e.to_string()))??;
                Arc::new(store)
            }
        };
        Self::start_with_store(settings, store).await
    }

    /// Starts serving with a store of the caller's choosing.
    pub async fn start_with_store(settings: Settings, store: Arc<dyn Store>) -> Result<Relay, StartError> {
        for s in settings.sources.iter().filter(|s| matches!(s.auth, Auth::None)) {
            tracing::warn!(source = %s.name, "source has auth type none: anyone who can reach {} can post to it", s.path);
        }
        let addr = settings.server.listen;
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
        let ingress_addr = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
        let metrics = Metrics::new()?;
        let shutdown = CancellationToken::new();
        let dispatcher =
            Dispatcher::start(&settings.targets, store.clone(), metrics.clone(), settings.storage.retention).await?;
        let (routes_tx, routes_rx) = watch::channel(routes(&settings, &metrics));
        let ingress = Arc::new(Ingress {
            routes: routes_rx,
            store: store.clone(),
            metrics: metrics.clone(),
            workers: dispatcher.workers(),
        });
        let admin_addr = settings.admin.listen;
        let admin_listener =
            TcpListener::bind(admin_addr).await.map_err(|source| StartError::Bind { addr: admin_addr, source })?;
        let admin_addr = admin_listener.local_addr().map_err(|source| StartError::Bind { addr: admin_addr, source })?;
        let ready = Arc::new(AtomicBool::new(false));
        let admin_shutdown = CancellationToken::new();
        let admin = Arc::new(Admin::new(
            settings.admin.token.clone(),
            store.clone(),
            metrics.clone(),
            dispatcher.workers(),
            settings.targets.clone(),
            ready.clone(),
        ));
        let tasks = TaskTracker::new();
        let admin_task = tokio::spawn(admin::serve(admin_listener, admin.clone(), admin_shutdown.clone()));
        let (tls_tx, tls_rx) = watch::channel(settings.server.tls.clone());
        tasks.spawn(ingress::serve(listener, tls_rx, ingress, settings.server.request_timeout, shutdown.child_token()));
        tracing::info!(
            listen = %ingress_addr,
            tls = settings.server.tls.is_some(),
            sources = settings.sources.len(),
            targets = settings.targets.len(),
            "hookrelay ingress listening"
        );
        tracing::info!(listen = %admin_addr, admin_api = settings.admin.token.is_some(), "hookrelay admin listening");
        ready.store(true, Ordering::SeqCst);
        Ok(Relay {
            ingress_addr,
            admin_addr,
            store,
            metrics,
            ready,
            shutdown,
            tasks,
            dispatcher,
            admin_shutdown,
            admin_task,
            admin,
            fixed: Fixed::of(&settings),
            routes: routes_tx,
            tls: tls_tx,
        })
    }

    /// Stops accepting, lets requests in progress finish (up to `grace`),
    /// stops delivering (attempts in flight stay pending), then flushes and
    /// closes the store.
    pub async fn stop(self, grace: Duration) -> Result<(), StoreError> {
        self.ready.store(false, Ordering::SeqCst);
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!(?grace, "requests still in progress after the grace period; stopping anyway");
        }
        self.dispatcher.stop(grace).await;
        let closed = self.store.close().await;
        self.admin_shutdown.cancel();
        // A request still being sent (a client gone half-open) must not hold
        // the exit; the ingress and the workers have had their grace already.
        let mut admin_task = self.admin_task;
        match tokio::time::timeout(ADMIN_GRACE, &mut admin_task).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("the admin listener task panicked"),
            Err(_) => {
                tracing::warn!(grace = ?ADMIN_GRACE, "admin requests still in progress; stopping anyway");
                admin_task.abort();
            }
        }
        closed
    }
}

/// The settings a reload cannot change: listeners and storage.
#[derive(Debug, Clone, PartialEq)]
struct Fixed {
    listen: SocketAddr,
    tls: bool,
    admin_listen: SocketAddr,
    storage: (std::path::PathBuf, u64, Duration, Option<String>),
}

/// The lease of a target without its own (see [`crate::store::lease_for`]):
/// that of the longest target timeout.
fn lease(targets: &[Arc<crate::config::Target>]) -> Duration {
    let longest = targets.iter().map(|t| t.timeout).max().unwrap_or(Duration::from_secs(10));
    crate::store::lease_for(longest)
}

impl Fixed {
    fn of(s: &Settings) -> Self {
        Fixed {
            listen: s.server.listen,
            tls: s.server.tls.is_some(),
            admin_listen: s.admin.listen,
            storage: (
                s.storage.path.clone(),
                s.storage.cache_bytes,
                s.storage.retention,
                s.storage.postgres.as_ref().map(|p| format!("{} pool {}", p.describe, p.pool)),
            ),
        }
    }
}

impl Relay {
    /// Applies a reloaded configuration without dropping a connection or a
    /// queued delivery: targets first (new ones get workers, changed ones
    /// their new settings), then the sources and routes, then the admin
    /// token, then ingress's TLS certificate and key (read again from their
    /// files, for new connections). Listeners, TLS on or off and storage
    /// keep their running settings until a restart (logged).
    pub async fn reload(&self, settings: Settings) -> Result<(), String> {
        // Against the retention running, which only a restart changes.
        for s in &settings.sources {
            if let Some(message) = crate::config::window_past_retention(s, self.fixed.storage.2) {
                return Err(format!(
                    "source {}: dedup_window {message} (the running one: it changes at a restart)",
                    s.name
                ));
            }
        }
        if Fixed::of(&settings) != self.fixed {
            tracing::warn!(
                "server.listen, server.tls on or off, admin.listen and storage changes take effect at the next restart"
            );
        }
        self.dispatcher.apply(&settings.targets).await.map_err(|e| e.to_string())?;
        self.routes.send_replace(routes(&settings, &self.metrics));
        self.admin.update(settings.admin.token.clone(), settings.targets.clone());
        if self.fixed.tls && settings.server.tls.is_some() {
            self.tls.send_replace(settings.server.tls.clone());
            tracing::info!("TLS certificate and key read again: new connections are served with them");
        }
        tracing::info!(sources = settings.sources.len(), targets = settings.targets.len(), "configuration reloaded");
        Ok(())
    }
}

/// The sources and routes ingress serves, each source's counters exported.
fn routes(settings: &Settings, metrics: &Metrics) -> Arc<Routes> {
    for source in &settings.sources {
        metrics.declare_source(&source.name);
    }
    Arc::new(Routes::new(settings))
}

/// Runs the relay until SIGTERM or SIGINT; SIGHUP re-reads the config file.
pub async fn serve(settings: Settings) -> Result<(), StartError> {
    let path = settings.path.clone();
    // Before starting: a SIGHUP's default action would end the process.
    let signals = Signals::install()?;
    let relay = Relay::start(settings).await?;
    let store_failed = tokio::select! {
        _ = signals.wait(&relay, &path) => false,
        _ = store_failure(&relay) => true,
    };
    tracing::info!("shutting down");
    // A failed store cannot flush: its close error is expected then.
    let stopped = relay.stop(SHUTDOWN_GRACE).await;
    if store_failed {
        tracing::error!("storage failed: stopped so that a supervisor restarts hookrelay once the disk is usable");
        return Err(StartError::StoreFailed);
    }
    stopped?;
    tracing::info!("stopped");
    Ok(())
}

/// Returns once the store has failed for good (a full disk, an fsync error):
/// only a restart reopens it, and nothing acknowledged is lost by stopping.
async fn store_failure(relay: &Relay) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while relay.store.healthy() {
        tick.tick().await;
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from before the relay starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, StartError> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind| signal(kind).map_err(StartError::Signals);
        Ok(Signals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM or SIGINT, reloading on each SIGHUP meanwhile.
    async fn wait(self, relay: &Relay, config: &std::path::Path) {
        let Signals { mut term, mut int, mut hup } = self;
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => match crate::config::load(config) {
                    Ok(settings) => {
                        if let Err(e) = relay.reload(settings).await {
                            tracing::error!(error = %e, "reload failed part way; restart to apply the whole file");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "reload rejected; the running configuration stays"),
                },
            }
        }
    }
}
