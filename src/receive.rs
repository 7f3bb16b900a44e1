//! `hookrelay receive`: a small receiver for trying a setup end to end. It
//! prints each request it gets (headers and body), checks its
//! `webhook-signature` when given the target's `signing_secret`, and answers
//! with a chosen status.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{standard_webhooks_secret, Auth};
use crate::ingress::auth;
use crate::listen;
use crate::respond::{self, Reply};

/// Where `receive` listens by default: the shipped `routes.yaml`'s targets.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9101";
/// Bodies larger than this are not printed whole.
const MAX_BODY: usize = 16 << 20;
/// How far `webhook-timestamp` may be from now, as Standard Webhooks advises.
const TOLERANCE: Duration = Duration::from_secs(300);
/// How long a request head may take, and a connection may stay idle.
const IDLE: Duration = Duration::from_secs(10);

/// How the receiver answers and what it checks.
pub struct Receiver {
    /// Set with `--secret`: signatures are checked against it.
    check: Option<Auth>,
    status: StatusCode,
}

impl Receiver {
    /// `secret`: a `whsec_…` Standard Webhooks secret; `status`: the answer's.
    pub fn new(secret: Option<&str>, status: u16) -> Result<Receiver, String> {
        let check = match secret {
            Some(s) => Some(Auth::StandardWebhooks {
                secrets: vec![standard_webhooks_secret(s).map_err(|e| format!("--secret: {e}"))?],
                tolerance: TOLERANCE,
            }),
            None => None,
        };
        let status = StatusCode::from_u16(status)
            .ok()
            .filter(|s| (200..600).contains(&s.as_u16()))
            .ok_or_else(|| format!("--status {status} is not an HTTP status from 200 to 599"))?;
        Ok(Receiver { check, status })
    }

    /// Prints one request and answers it.
    async fn handle(&self, peer: SocketAddr, req: Request<Incoming>) -> Reply {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                println!("--- {} {} from {peer}: cannot read the body: {e}", parts.method, parts.uri);
                return respond::error(StatusCode::BAD_REQUEST, "cannot read the body");
            }
        };
        let mut text = format!(
            "--- {} {} {:?} from {peer} at {}\n",
            parts.method,
            parts.uri,
            parts.version,
            humantime::format_rfc3339_seconds(SystemTime::now())
        );
        for (name, value) in &parts.headers {
            text.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
        }
        let signature = match &self.check {
            None => "not checked (start with --secret whsec_… to check it)".to_string(),
            Some(check) => match auth::verify(check, &parts.headers, body.clone(), SystemTime::now()) {
                Ok(_) => "verified".to_string(),
                Err(why) => format!("INVALID: {why}"),
            },
        };
        text.push_str(&format!("signature: {signature}\n\n{}\n", String::from_utf8_lossy(&body)));
        text.push_str(&format!("--> {}\n", self.status.as_u16()));
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
        respond::json(self.status, serde_json::json!({ "received": body.len() }))
    }
}

/// Listens on `listen` and prints what arrives, until `shutdown`.
pub async fn run(listen: SocketAddr, receiver: Receiver, shutdown: CancellationToken) -> Result<(), String> {
    let listener = TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on http://{addr}");
    let receiver = Arc::new(receiver);
    let builder = Arc::new(listen::http_builder(IDLE));
    listen::accept(listener, shutdown.clone(), "receive", |stream, peer| {
        let (receiver, builder, shutdown) = (receiver.clone(), builder.clone(), shutdown.clone());
        async move {
            let handle = move |req| {
                let receiver = receiver.clone();
                async move { receiver.handle(peer, req).await }
            };
            listen::serve_http(&builder, stream, handle, IDLE, shutdown, "receive", peer).await;
        }
    })
    .await;
    Ok(())
}
