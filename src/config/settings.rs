//! Resolved settings: what the rest of hookrelay reads, with `Duration`s, byte
//! counts, decoded secrets and compiled event matchers; nothing downstream parses a string.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use rustls_pki_types::CertificateDer;

use crate::jq::Program;

/// The whole configuration, validated.
#[derive(Debug)]
pub struct Settings {
    /// The file this was read from, re-read on reload.
    pub path: PathBuf,
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub storage: StorageSettings,
    pub sources: Vec<Arc<Source>>,
    pub targets: Vec<Arc<Target>>,
    /// What `${VAR}` took from the environment: printed by name only.
    pub from_env: super::EnvValues,
}

#[derive(Debug)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// `None`: plain HTTP (behind a TLS-terminating balancer, or for development).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest request body accepted, in bytes.
    pub max_body: u64,
    /// Time allowed for each of: the TLS handshake, the request head, the body.
    pub request_timeout: Duration,
}

#[derive(Debug)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Bearer token for `/admin/*`; `None` disables `/admin/*`.
    pub token: Option<Secret>,
}

#[derive(Debug)]
pub struct StorageSettings {
    /// sled's folder (`backend: sled`).
    pub path: PathBuf,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// `backend: postgres`: the database every instance shares, instead of sled.
    pub postgres: Option<PostgresSettings>,
    /// Delivered and dead events are purged after this.
    pub retention: Duration,
}

/// How to reach the shared PostgreSQL database.
#[derive(Debug)]
pub struct PostgresSettings {
    /// May hold a password: never logged or printed whole.
    pub url: Secret,
    /// Connections per instance.
    pub pool: usize,
    /// The CAs of `storage.ca_file` (none: the system's).
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Where the database is, without credentials, for logs.
    pub describe: String,
}

/// Where webhooks come in: one path, one format, one way to authenticate.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub path: String,
    pub format: Format,
    /// A second webhook with the same dedup key within this window is a duplicate.
    pub dedup_window: Duration,
    /// `None`: any client address.
    pub allow_ips: Option<Vec<IpNet>>,
    pub auth: Auth,
    /// The routes whose `source` is this one, in file order.
    pub routes: Vec<RouteRule>,
}

impl Source {
    /// The names of the targets whose routes match `event` and pass their
    /// filter (`passes`, asked only of routes with a filter whose events
    /// match), each once, in the order they first appear in the routes.
    pub fn targets_for(&self, event: &str, mut passes: impl FnMut(&RouteRule) -> bool) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let matching = self.routes.iter().filter(|r| r.matches(event) && (r.filter.is_none() || passes(r)));
        for route in matching {
            for t in &route.targets {
                if !out.contains(&t.as_str()) {
                    out.push(t);
                }
            }
        }
        out
    }

    pub fn is_ip_allowed(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow_ips.as_ref().is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    ButterCms,
    CometCms,
    Generic(EventLocator),
}

impl Format {
    pub fn name(&self) -> &'static str {
        match self {
            Format::ButterCms => "buttercms",
            Format::CometCms => "cometcms",
            Format::Generic(_) => "generic",
        }
    }
}

/// Where a generic source's event name is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventLocator {
    /// A JSON pointer into the body, e.g. `/type`.
    Pointer(String),
    Header(HeaderName),
}

/// How a source's requests are authenticated. Every kind holds several
/// secrets so that they can be rotated.
#[derive(Debug)]
pub enum Auth {
    None,
    /// A shared secret sent as the value of a header.
    Header {
        header: HeaderName,
        values: Vec<Secret>,
    },
    /// An HMAC of the raw body, in a header.
    Hmac {
        header: HeaderName,
        algorithm: HmacAlgorithm,
        encoding: Encoding,
        /// Stripped from the header value before decoding, e.g. `sha256=`.
        prefix: String,
        secrets: Vec<Secret>,
    },
    /// <https://www.standardwebhooks.com>: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    StandardWebhooks {
        secrets: Vec<Secret>,
        tolerance: Duration,
    },
    /// HTTP Basic authentication.
    Basic {
        username: Secret,
        passwords: Vec<Secret>,
    },
}

impl Auth {
    pub fn kind(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Header { .. } => "header",
            Auth::Hmac { .. } => "hmac",
            Auth::StandardWebhooks { .. } => "standard-webhooks",
            Auth::Basic { .. } => "basic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacAlgorithm {
    Sha1,
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Hex,
    Base64,
}

/// Secret bytes. `Debug` never shows them, so a logged config leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// One `routes[]` entry, compiled.
#[derive(Debug)]
pub struct RouteRule {
    /// Its key path, `routes[2]`: how logs and `preview` name it.
    pub key: String,
    pub events: Vec<EventPattern>,
    /// Run at ingest on routes whose `events` match; see [`Source::targets_for`].
    pub filter: Option<Program>,
    pub targets: Vec<String>,
}

impl RouteRule {
    pub fn matches(&self, event: &str) -> bool {
        self.events.iter().any(|p| p.matches(event))
    }
}

/// An entry of a route's `events`: `*`, `prefix.*` or an exact name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventPattern {
    Any,
    /// Holds the prefix with its dot: `page.` for `page.*`.
    Prefix(String),
    Exact(String),
}

impl fmt::Display for EventPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventPattern::Any => f.write_str("*"),
            EventPattern::Prefix(p) => write!(f, "{p}*"),
            EventPattern::Exact(e) => f.write_str(e),
        }
    }
}

impl EventPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(EventPattern::Any);
        }
        let (body, pattern) = match s.strip_suffix(".*") {
            Some(prefix) => (prefix, EventPattern::Prefix(format!("{prefix}."))),
            None => (s, EventPattern::Exact(s.to_string())),
        };
        if body.is_empty() || body.contains('*') || body.chars().any(|c| c.is_whitespace()) {
            return Err(format!("invalid event pattern {s:?}: use an exact name, `prefix.*` or `*`"));
        }
        Ok(pattern)
    }

    pub fn matches(&self, event: &str) -> bool {
        match self {
            EventPattern::Any => true,
            EventPattern::Prefix(p) => event.starts_with(p.as_str()),
            EventPattern::Exact(e) => e == event,
        }
    }
}

/// Where webhooks go, and how hard to try.
#[derive(Debug)]
pub struct Target {
    pub name: String,
    pub url: Uri,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Extra trust roots for an https:// target; empty: the system roots.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Added to every forwarded request.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Requests in flight to this target at once.
    pub concurrency: u32,
    pub rate_limit: Option<RateLimit>,
    pub retry: RetryPolicy,
    pub circuit_breaker: BreakerSettings,
    /// Signs forwarded requests per Standard Webhooks when set.
    pub signing_secret: Option<Secret>,
    /// Run at each attempt: its first output is the body sent; none: skipped.
    pub transform: Option<Program>,
    /// `order_by` or `debounce`: how its deliveries are sequenced, if at all.
    pub sequencing: Option<Sequencing>,
}

/// How a target's deliveries are sequenced (a target has one or the other).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sequencing {
    /// `order_by`: deliveries with the same key are attempted one at a
    /// time, in the order they were queued.
    Ordered(Program),
    /// `debounce`: the pending events of a key are one group, delivered once.
    Debounced(Debounce),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debounce {
    /// A group is attempted once it has been quiet this long...
    pub window: Duration,
    /// ...or once its oldest event has waited this long, whichever is first.
    pub max_wait: Duration,
    /// One group per key; `None`: one group for the target.
    pub key: Option<Program>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_age: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub open_for: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_patterns_match_as_documented() {
        let p = EventPattern::parse("page.*").unwrap();
        assert!(p.matches("page.published"));
        assert!(!p.matches("page"));
        assert!(!p.matches("pages.published"));
        assert!(EventPattern::parse("*").unwrap().matches("anything"));
        let e = EventPattern::parse("post.published").unwrap();
        assert!(e.matches("post.published"));
        assert!(!e.matches("post.published2"));
        for bad in ["", "page*", "*.published", ".*", "a b"] {
            assert!(EventPattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn targets_for_unions_passing_routes_in_order_without_repeats() {
        let rule = |events: &[&str], filter: Option<&str>, targets: &[&str]| RouteRule {
            key: "routes[0]".into(),
            events: events.iter().map(|e| EventPattern::parse(e).unwrap()).collect(),
            filter: filter.map(|f| Program::compile(crate::jq::Kind::Filter, f).unwrap()),
            targets: targets.iter().map(|t| t.to_string()).collect(),
        };
        let source = Source {
            name: "s".into(),
            path: "/s".into(),
            format: Format::ButterCms,
            dedup_window: Duration::from_secs(1),
            allow_ips: Some(vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()]),
            auth: Auth::None,
            routes: vec![
                rule(&["page.*"], None, &["search", "cache"]),
                rule(&["*"], None, &["cache", "audit"]),
                rule(&["post.*"], Some(".landing"), &["build"]),
            ],
        };
        let mut asked = 0;
        let targets = source.targets_for("page.published", |_| {
            asked += 1;
            true
        });
        assert_eq!(targets, ["search", "cache", "audit"]);
        assert_eq!(asked, 0, "a filter is run only when its route's events match");
        assert_eq!(source.targets_for("post.published", |_| false), ["cache", "audit"]);
        assert_eq!(source.targets_for("post.published", |_| true), ["cache", "audit", "build"]);
        assert!(source.is_ip_allowed("10.1.2.3".parse().unwrap()));
        assert!(source.is_ip_allowed("::ffff:10.1.2.3".parse().unwrap()));
        assert!(source.is_ip_allowed("2001:db8::1".parse().unwrap()));
        assert!(!source.is_ip_allowed("192.0.2.1".parse().unwrap()));
    }
}
