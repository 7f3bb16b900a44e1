//! The ingress listener: accepts TCP, optionally TLS, and serves HTTP/1.1 and
//! HTTP/2 on each connection until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::Ingress;
use crate::listen;

/// Largest request head (request line and headers) accepted over HTTP/1.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest header block accepted over HTTP/2.
const MAX_H2_HEADER_LIST: u32 = 64 * 1024;
/// HTTP/2 streams at once per connection.
const MAX_H2_STREAMS: u32 = 128;

/// Serves ingress on `listener` until `shutdown` fires, then lets each
/// connection finish the requests it has begun. Returns once all have.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    ingress: Arc<Ingress>,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let builder = Arc::new(http_builder(header_timeout));
    listen::accept(listener, shutdown.clone(), "ingress", |stream, peer| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let (ingress, builder, acceptor, shutdown) =
            (ingress.clone(), builder.clone(), acceptor.clone(), shutdown.clone());
        async move {
            let result = match acceptor {
                None => serve_connection(&builder, stream, peer, ingress, shutdown).await,
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(&builder, tls, peer, ingress, shutdown).await,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                },
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
    })
    .await;
}

/// HTTP/1.1 and HTTP/2 with ingress's limits.
fn http_builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_H2_HEADER_LIST)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    peer: SocketAddr,
    ingress: Arc<Ingress>,
    shutdown: CancellationToken,
) -> Result<(), listen::ConnectionError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ip = peer.ip();
    listen::serve_http(
        builder,
        io,
        move |req| {
            let ingress = ingress.clone();
            async move { ingress.handle(ip, req).await }
        },
        shutdown,
    )
    .await
}
