//! What both listeners share: the accept loop, and serving one HTTP
//! connection until it ends or shutdown asks it to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts connections until `shutdown` fires, each served by `serve` on a
/// task of its own; then stops listening and waits for those tasks to end.
pub async fn accept<F, Fut>(listener: TcpListener, shutdown: CancellationToken, what: &'static str, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        connections.spawn(serve(stream, peer));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Why a connection ended badly (hyper's error, boxed).
pub type ConnectionError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `io` with `builder` and `handle` until the client is done; once
/// `shutdown` fires, requests in progress finish and the connection closes.
pub async fn serve_http<I, H, Fut>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    handle: H,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = crate::respond::Reply> + Send + 'static,
{
    let service = service_fn(move |req| {
        let answer = handle(req);
        async move { Ok::<_, std::convert::Infallible>(answer.await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}
