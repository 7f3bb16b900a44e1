//! What both listeners share: the accept loop, and serving one HTTP
//! connection until it ends or shutdown asks it to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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

/// Largest request head (request line and headers) accepted over HTTP/1.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest header block accepted over HTTP/2.
const MAX_H2_HEADER_LIST: u32 = 64 * 1024;
/// HTTP/2 streams at once per connection.
const MAX_H2_STREAMS: u32 = 128;

/// HTTP/1.1 and HTTP/2 with the limits both listeners apply: a request head
/// must arrive within `header_timeout` and fit in 64 KiB; 128 streams per
/// HTTP/2 connection.
pub fn http_builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
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

/// Serves `io` with `builder` and `handle` until the client is done; once
/// `shutdown` fires, requests in progress finish and the connection closes.
/// A connection with no request in progress for `idle` (since it opened, or
/// since its last answer) is closed the same way: one that never sends a
/// byte, an HTTP/2 preface left unfinished, or an HTTP/2 connection without
/// streams would otherwise hold its socket for ever (hyper's head timeout
/// starts only once it knows the protocol, and HTTP/2 has none).
pub async fn serve_http<I, H, Fut>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    handle: H,
    idle: Duration,
    shutdown: CancellationToken,
    what: &'static str,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = crate::respond::Reply> + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let seen = activity.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        let started = seen.request_started(req.version());
        req.extensions_mut().insert(started);
        let busy = Busy::start(&seen);
        let answer = handle(req);
        async move {
            let reply = answer.await;
            drop(busy);
            Ok::<_, std::convert::Infallible>(reply)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut check_at = tokio::time::Instant::now() + idle;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            _ = tokio::time::sleep_until(check_at) => match activity.idle_until(idle) {
                Some(later) => check_at = later,
                None => {
                    tracing::debug!(listener = what, %peer, ?idle, "idle connection closed");
                    conn.as_mut().graceful_shutdown();
                    // A client that ignores the close is cut off after as long again.
                    break tokio::time::timeout(idle, conn.as_mut()).await.unwrap_or(Ok(()));
                }
            },
        }
    };
    if let Err(e) = result {
        tracing::debug!(listener = what, %peer, error = %e, "connection ended with an error");
    }
}

/// When a request began to arrive, as far as the server can tell: over
/// HTTP/1, when its connection was ready for it (opened, or the previous
/// answer given: hyper's head timeout counts from then too); over HTTP/2,
/// when its headers arrived. `request_timeout` bounds the whole request
/// from then, head and body.
#[derive(Debug, Clone, Copy)]
pub struct RequestStarted(pub tokio::time::Instant);

/// Requests in progress on one connection, and when the last one ended
/// (or the connection opened).
struct Activity(Mutex<(usize, tokio::time::Instant)>);

impl Activity {
    fn new() -> Self {
        Activity(Mutex::new((0, tokio::time::Instant::now())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, tokio::time::Instant)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When a request of `version` arriving now began (see [`RequestStarted`]).
    fn request_started(&self, version: http::Version) -> RequestStarted {
        let (busy, last) = *self.lock();
        let http1 = matches!(version, http::Version::HTTP_09 | http::Version::HTTP_10 | http::Version::HTTP_11);
        RequestStarted(if http1 && busy == 0 { last } else { tokio::time::Instant::now() })
    }

    /// When to look again if the connection is not yet `idle` that long;
    /// `None` once it is.
    fn idle_until(&self, idle: Duration) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let (busy, last) = *self.lock();
        if busy > 0 {
            return Some(now + idle);
        }
        (last + idle > now).then_some(last + idle)
    }
}

/// A request in progress; its end marks the connection busy until then.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Busy {
        activity.lock().0 += 1;
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        *state = (state.0.saturating_sub(1), tokio::time::Instant::now());
    }
}
