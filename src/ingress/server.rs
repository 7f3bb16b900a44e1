//! The ingress listener: accepts TCP, optionally TLS, and serves HTTP/1.1 and
//! HTTP/2 on each connection until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::Ingress;
use crate::listen;

/// Serves ingress on `listener` until `shutdown` fires, then lets each
/// connection finish the requests it has begun. Returns once all have.
/// `tls`: the certificate and key new connections are served with (a
/// reload sends renewed ones); `None` for plain HTTP.
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Option<Arc<rustls::ServerConfig>>>,
    ingress: Arc<Ingress>,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(listen::http_builder(header_timeout));
    listen::accept(listener, shutdown.clone(), "ingress", |stream, peer| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let acceptor = tls.borrow().clone().map(TlsAcceptor::from);
        let (ingress, builder, shutdown) = (ingress.clone(), builder.clone(), shutdown.clone());
        async move {
            let Some(acceptor) = acceptor else {
                return serve_connection(&builder, stream, peer, ingress, header_timeout, shutdown).await;
            };
            match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_connection(&builder, tls, peer, ingress, header_timeout, shutdown).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    })
    .await;
}

async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    peer: SocketAddr,
    ingress: Arc<Ingress>,
    idle: Duration,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ip = peer.ip();
    let handle = move |req| {
        let ingress = ingress.clone();
        async move { ingress.handle(ip, req).await }
    };
    listen::serve_http(builder, io, handle, idle, shutdown, "ingress", peer).await
}
