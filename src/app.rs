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
use crate::store::{SledStore, Store, StoreError};

/// How long shutdown waits for requests in progress.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
    /// Keeps the routes channel open; reload sends new routes through it.
    _routes: watch::Sender<Arc<Routes>>,
}

impl Relay {
    /// Opens the sled store of `settings` and starts serving.
    pub async fn start(settings: Settings) -> Result<Relay, StartError> {
        let storage = &settings.storage;
        let (path, cache) = (storage.path.clone(), storage.cache_bytes);
        let store = tokio::task::spawn_blocking(move || SledStore::open(&path, cache))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))??;
        Self::start_with_store(settings, Arc::new(store)).await
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
        let dispatcher = Dispatcher::start(
            &settings.targets,
            store.clone(),
            metrics.clone(),
            settings.storage.retention,
            CancellationToken::new(),
        )
        .await?;
        let (routes_tx, routes_rx) = watch::channel(Arc::new(Routes::new(&settings)));
        let ingress = Arc::new(Ingress {
            routes: routes_rx,
            store: store.clone(),
            metrics: metrics.clone(),
            workers: dispatcher.workers(),
        });
        let admin_addr = settings.admin.listen;
        let admin_listener =
            admin::bind(admin_addr).await.map_err(|source| StartError::Bind { addr: admin_addr, source })?;
        let admin_addr = admin_listener.local_addr().map_err(|source| StartError::Bind { addr: admin_addr, source })?;
        let ready = Arc::new(AtomicBool::new(false));
        let admin_shutdown = CancellationToken::new();
        let admin = Arc::new(Admin {
            token: settings.admin.token.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            workers: dispatcher.workers(),
            targets: settings.targets.clone(),
            ready: ready.clone(),
        });
        let tasks = TaskTracker::new();
        tokio::spawn(admin::serve(admin_listener, admin, admin_shutdown.clone()));
        tasks.spawn(ingress::serve(
            listener,
            settings.server.tls.clone(),
            ingress,
            settings.server.request_timeout,
            shutdown.child_token(),
        ));
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
            _routes: routes_tx,
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
        closed
    }
}

/// Runs the relay until SIGTERM or SIGINT.
pub async fn serve(settings: Settings) -> Result<(), StartError> {
    let relay = Relay::start(settings).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    relay.stop(SHUTDOWN_GRACE).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
