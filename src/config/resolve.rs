//! Turns the raw YAML schema into [`Settings`]: every value parsed, every
//! cross-reference checked, every problem reported with its key path.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;

use super::raw::*;
use super::settings::*;
use super::units::{parse_duration, parse_positive_duration, parse_size};
use super::Problem;
use crate::jq::{Kind, Program};

const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// Collects problems so that one run of `check` reports all of them.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem { key: key.into(), message: message.into() });
    }

    /// The value, or `None` with the error recorded under `key`.
    fn take<T>(&mut self, key: impl Into<String>, r: Result<T, String>) -> Option<T> {
        r.map_err(|m| self.push(key, m)).ok()
    }

    fn duration(&mut self, key: String, raw: Option<&str>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(s) => self.take(key, parse_duration(s)).unwrap_or(default),
        }
    }

    /// [`Problems::duration`] for a time limit, which zero would make refuse everything.
    fn time_limit(&mut self, key: String, raw: Option<&str>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(s) => self.take(key, parse_positive_duration(s)).unwrap_or(default),
        }
    }
}

pub fn resolve(raw: RawConfig, path: &Path) -> Result<Settings, Vec<Problem>> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut p = Problems::default();

    let server = server(&raw.server, &base, &mut p);
    let admin = AdminSettings {
        listen: socket_addr(&mut p, "admin.listen", raw.admin.listen.as_deref(), DEFAULT_ADMIN_LISTEN),
        token: raw.admin.token.as_deref().map(|t| {
            if t.len() < 16 {
                p.push("admin.token", "must be at least 16 characters");
            }
            Secret::new(t)
        }),
    };
    let storage = storage(&raw.storage, &base, &mut p);

    let targets: Vec<Arc<Target>> = raw
        .targets
        .iter()
        .enumerate()
        .filter_map(|(i, t)| target(t, &format!("targets[{i}]"), &base, &mut p).map(Arc::new))
        .collect();
    unique(&mut p, "targets", raw.targets.iter().map(|t| t.name.as_str()), "name");

    let mut sources: Vec<Source> =
        raw.sources.iter().enumerate().filter_map(|(i, s)| source(s, &format!("sources[{i}]"), &mut p)).collect();
    if raw.sources.is_empty() {
        p.push("sources", "at least one source is required");
    }
    unique(&mut p, "sources", raw.sources.iter().map(|s| s.name.as_str()), "name");
    unique(&mut p, "sources", raw.sources.iter().map(|s| s.path.as_str()), "path");
    for (i, s) in raw.sources.iter().enumerate() {
        let past = sources.iter().find(|r| r.name == s.name).and_then(|r| window_past_retention(r, storage.retention));
        if let Some(message) = past {
            p.push(format!("sources[{i}].dedup_window"), message);
        }
    }

    for (i, r) in raw.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        let rule = route(r, &key, &raw.targets, &mut p);
        match sources.iter_mut().find(|s| s.name == r.source) {
            Some(s) => s.routes.push(rule),
            None => p.push(format!("{key}.source"), format!("no source is named {:?}", r.source)),
        }
    }

    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Settings {
        path: path.to_path_buf(),
        server,
        admin,
        storage,
        sources: sources.into_iter().map(Arc::new).collect(),
        targets,
        from_env: Default::default(),
    })
}

/// Why `source`'s dedup window cannot run with `retention`, if it cannot:
/// an event purged within its window takes its dedup record with it.
pub fn window_past_retention(source: &Source, retention: Duration) -> Option<String> {
    (source.dedup_window > retention).then(|| {
        format!(
            "{} is longer than storage.retention ({}): a copy of a webhook purged within its window would be \
             delivered again; make storage.retention at least as long",
            humantime::format_duration(source.dedup_window),
            humantime::format_duration(retention),
        )
    })
}

fn storage(raw: &RawStorage, base: &Path, p: &mut Problems) -> StorageSettings {
    let postgres = match raw.backend.as_deref() {
        None | Some("sled") => {
            for (key, set) in
                [("url", raw.url.is_some()), ("pool", raw.pool.is_some()), ("ca_file", raw.ca_file.is_some())]
            {
                if set {
                    p.push(format!("storage.{key}"), "is for backend postgres only (the backend is sled)");
                }
            }
            None
        }
        Some("postgres") => {
            for (key, set) in [("path", raw.path.is_some()), ("cache", raw.cache.is_some())] {
                if set {
                    p.push(format!("storage.{key}"), "is sled's: remove it with backend postgres");
                }
            }
            postgres(raw, base, p)
        }
        Some(other) => {
            p.push("storage.backend", format!("{other:?} is not a backend: use sled or postgres"));
            None
        }
    };
    StorageSettings {
        path: base.join(raw.path.as_deref().unwrap_or("./data")),
        cache_bytes: match raw.cache.as_deref() {
            None => 64 << 20,
            Some(s) => p.take("storage.cache", parse_size(s)).unwrap_or(0),
        },
        postgres,
        retention: p.duration("storage.retention".into(), raw.retention.as_deref(), Duration::from_secs(7 * 86_400)),
    }
}

fn postgres(raw: &RawStorage, base: &Path, p: &mut Problems) -> Option<PostgresSettings> {
    let pool = match raw.pool {
        None => 16,
        Some(n @ 2..=1000) => n as usize,
        Some(n) => {
            p.push("storage.pool", format!("{n} connections: use 2 to 1000"));
            16
        }
    };
    let ca_certs = match &raw.ca_file {
        None => Vec::new(),
        Some(f) => p.take("storage.ca_file", crate::ingress::tls::load_ca_certs(&base.join(f))).unwrap_or_default(),
    };
    let url = match raw.url.as_deref().map(str::trim) {
        None | Some("") => {
            p.push("storage.url", "is required with backend postgres (postgres://user:password@host:5432/db)");
            return None;
        }
        Some(url) => url,
    };
    let config = p.take("storage.url", crate::store::parse_pg_url(url))?;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, port)| match h {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if hosts.is_empty() {
        p.push("storage.url", "names no host");
        return None;
    }
    let describe = format!("postgres {} database {}", hosts.join(","), config.get_dbname().unwrap_or("(the user's)"));
    Some(PostgresSettings { url: Secret::new(url), pool, ca_certs, describe })
}

fn server(raw: &RawServer, base: &Path, p: &mut Problems) -> ServerSettings {
    let tls = raw.tls.as_ref().and_then(|tls| {
        let (cert, key) = (base.join(&tls.cert), base.join(&tls.key));
        p.take("server.tls", crate::ingress::tls::server_config(&cert, &key))
    });
    let max_body = match raw.max_body.as_deref() {
        None => 1 << 20,
        Some(s) => match parse_size(s) {
            Ok(0) => {
                p.push("server.max_body", "must be more than 0");
                0
            }
            r => p.take("server.max_body", r).unwrap_or(0),
        },
    };
    ServerSettings {
        listen: socket_addr(p, "server.listen", raw.listen.as_deref(), DEFAULT_LISTEN),
        tls,
        max_body,
        request_timeout: p.time_limit(
            "server.request_timeout".into(),
            raw.request_timeout.as_deref(),
            Duration::from_secs(10),
        ),
    }
}

fn socket_addr(p: &mut Problems, key: &str, raw: Option<&str>, default: &str) -> SocketAddr {
    let s = raw.unwrap_or(default);
    p.take(key, s.parse().map_err(|_| format!("{s:?} is not an address like \"0.0.0.0:8443\" or \"[::]:8443\"")))
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Names appear in metric labels, admin URLs and store keys: keep them plain.
fn check_name(p: &mut Problems, key: String, name: &str) {
    let ok =
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        p.push(key, format!("{name:?} is not a valid name: use 1 to 64 letters, digits, '-', '_' or '.'"));
    } else if name.chars().all(|c| c == '.') {
        // `.` and `..` are path steps: /admin/targets/../pause is not the target's.
        p.push(key, format!("{name:?} is not a valid name: it needs a letter, a digit, '-' or '_'"));
    }
}

fn unique<'a>(p: &mut Problems, list: &str, items: impl Iterator<Item = &'a str>, field: &str) {
    let mut seen = HashSet::new();
    for (i, item) in items.enumerate() {
        if !seen.insert(item) {
            p.push(format!("{list}[{i}].{field}"), format!("{item:?} is used twice"));
        }
    }
}

fn header_name(p: &mut Problems, key: String, raw: &str) -> Option<HeaderName> {
    p.take(key, HeaderName::try_from(raw).map_err(|_| format!("{raw:?} is not a valid header name")))
}

fn secrets(p: &mut Problems, key: String, raw: &[String]) -> Vec<Secret> {
    if raw.is_empty() {
        p.push(key.clone(), "at least one secret is required");
    }
    for (i, s) in raw.iter().enumerate() {
        if s.is_empty() {
            p.push(format!("{key}[{i}]"), "a secret must not be empty");
        }
    }
    raw.iter().map(|s| Secret::new(s.as_bytes())).collect()
}

/// A Standard Webhooks secret: `whsec_` followed by base64 of the key bytes.
pub fn standard_webhooks_secret(raw: &str) -> Result<Secret, String> {
    let b64 = raw.strip_prefix("whsec_").unwrap_or(raw);
    match base64::engine::general_purpose::STANDARD.decode(b64) {
        Ok(bytes) if !bytes.is_empty() => Ok(Secret::new(bytes)),
        _ => Err("not a Standard Webhooks secret: expected \"whsec_\" followed by base64".into()),
    }
}

fn source(raw: &RawSource, key: &str, p: &mut Problems) -> Option<Source> {
    check_name(p, format!("{key}.name"), &raw.name);
    if !raw.path.starts_with('/') || raw.path.contains(['?', '#', ' ']) {
        p.push(format!("{key}.path"), format!("{:?} must start with '/' and hold no '?', '#' or space", raw.path));
    }
    let format = match (raw.format, &raw.event_pointer, &raw.event_header) {
        (RawFormat::Generic, Some(ptr), None) => {
            if !(ptr.is_empty() || ptr.starts_with('/')) {
                p.push(format!("{key}.event_pointer"), format!("{ptr:?} is not a JSON pointer (like \"/type\")"));
            }
            Format::Generic(EventLocator::Pointer(ptr.clone()))
        }
        (RawFormat::Generic, None, Some(h)) => {
            Format::Generic(EventLocator::Header(header_name(p, format!("{key}.event_header"), h)?))
        }
        (RawFormat::Generic, _, _) => {
            p.push(key.to_string(), "format generic needs exactly one of event_pointer or event_header");
            return None;
        }
        (other, ptr, hdr) => {
            if ptr.is_some() || hdr.is_some() {
                p.push(key.to_string(), "event_pointer and event_header are only for format generic");
            }
            if other == RawFormat::Buttercms {
                Format::ButterCms
            } else {
                Format::CometCms
            }
        }
    };
    let allow_ips = raw.allow_ips.as_ref().map(|list| {
        list.iter().enumerate().filter_map(|(i, s)| p.take(format!("{key}.allow_ips[{i}]"), parse_net(s))).collect()
    });
    Some(Source {
        name: raw.name.clone(),
        path: raw.path.clone(),
        format,
        dedup_window: p.duration(format!("{key}.dedup_window"), raw.dedup_window.as_deref(), Duration::from_secs(600)),
        allow_ips,
        auth: auth(&raw.auth, &format!("{key}.auth"), p)?,
        routes: Vec::new(),
    })
}

/// A CIDR block, or a single address meaning just that host.
fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))
}

fn auth(raw: &RawAuth, key: &str, p: &mut Problems) -> Option<Auth> {
    Some(match raw {
        RawAuth::None => Auth::None,
        RawAuth::Header { header, values } => Auth::Header {
            header: header_name(p, format!("{key}.header"), header)?,
            values: secrets(p, format!("{key}.values"), values),
        },
        RawAuth::Hmac { header, algorithm, encoding, prefix, secrets: raw_secrets } => Auth::Hmac {
            header: header_name(p, format!("{key}.header"), header)?,
            algorithm: match algorithm {
                RawHmacAlgorithm::Sha1 => HmacAlgorithm::Sha1,
                RawHmacAlgorithm::Sha256 => HmacAlgorithm::Sha256,
                RawHmacAlgorithm::Sha512 => HmacAlgorithm::Sha512,
            },
            encoding: match encoding {
                RawEncoding::Hex => Encoding::Hex,
                RawEncoding::Base64 => Encoding::Base64,
            },
            prefix: prefix.clone().unwrap_or_default(),
            secrets: secrets(p, format!("{key}.secrets"), raw_secrets),
        },
        RawAuth::StandardWebhooks { secrets: raw_secrets, tolerance } => {
            if raw_secrets.is_empty() {
                p.push(format!("{key}.secrets"), "at least one secret is required");
            }
            let secrets = raw_secrets
                .iter()
                .enumerate()
                .filter_map(|(i, s)| p.take(format!("{key}.secrets[{i}]"), standard_webhooks_secret(s)))
                .collect();
            let tolerance = p.time_limit(format!("{key}.tolerance"), tolerance.as_deref(), Duration::from_secs(300));
            Auth::StandardWebhooks { secrets, tolerance }
        }
        RawAuth::Basic { username, password, passwords } => {
            let all: Vec<String> = password.iter().chain(passwords.iter().flatten()).cloned().collect();
            if username.is_empty() || username.contains(':') {
                p.push(format!("{key}.username"), "must be non-empty and hold no ':'");
            }
            Auth::Basic {
                username: Secret::new(username.as_bytes()),
                passwords: secrets(p, format!("{key}.password"), &all),
            }
        }
    })
}

/// Headers hookrelay sets itself; a target may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

fn target(raw: &RawTarget, key: &str, base: &Path, p: &mut Problems) -> Option<Target> {
    check_name(p, format!("{key}.name"), &raw.name);
    let url: Option<Uri> = p.take(format!("{key}.url"), parse_target_url(&raw.url));
    let ca_certs = match &raw.ca_file {
        None => Vec::new(),
        Some(f) => {
            p.take(format!("{key}.ca_file"), crate::ingress::tls::load_ca_certs(&base.join(f))).unwrap_or_default()
        }
    };
    let mut headers = Vec::new();
    for (name, value) in &raw.headers {
        let hkey = format!("{key}.headers.{name}");
        let Some(hname) = header_name(p, hkey.clone(), name) else {
            continue;
        };
        if RESERVED_HEADERS.contains(&hname.as_str()) || hname.as_str().starts_with("x-hookrelay-") {
            p.push(hkey, format!("{name} is set by hookrelay and cannot be configured"));
            continue;
        }
        if let Some(v) =
            p.take(hkey, HeaderValue::try_from(value.as_str()).map_err(|_| "not a valid header value".to_string()))
        {
            headers.push((hname, v));
        }
    }
    let concurrency = raw.concurrency.unwrap_or(8);
    if concurrency == 0 {
        p.push(format!("{key}.concurrency"), "must be at least 1");
    }
    let rate_limit = raw.rate_limit.as_ref().map(|r| {
        let burst = r.burst.unwrap_or(r.per_second);
        if r.per_second == 0 || burst == 0 {
            p.push(format!("{key}.rate_limit"), "per_second and burst must be at least 1");
        }
        RateLimit { per_second: r.per_second, burst }
    });
    let rk = format!("{key}.retry");
    let retry = RetryPolicy {
        max_attempts: raw.retry.max_attempts.unwrap_or(12),
        initial_backoff: p.duration(
            format!("{rk}.initial_backoff"),
            raw.retry.initial_backoff.as_deref(),
            Duration::from_secs(1),
        ),
        max_backoff: p.duration(
            format!("{rk}.max_backoff"),
            raw.retry.max_backoff.as_deref(),
            Duration::from_secs(600),
        ),
        max_age: p.duration(format!("{rk}.max_age"), raw.retry.max_age.as_deref(), Duration::from_secs(86_400)),
    };
    if retry.max_attempts == 0 {
        p.push(format!("{rk}.max_attempts"), "must be at least 1");
    }
    if retry.initial_backoff.is_zero() || retry.initial_backoff > retry.max_backoff {
        p.push(format!("{rk}.max_backoff"), "initial_backoff must be above 0 and at most max_backoff");
    }
    let bk = format!("{key}.circuit_breaker");
    let circuit_breaker = BreakerSettings {
        failure_threshold: raw.circuit_breaker.failure_threshold.unwrap_or(5),
        open_for: p.duration(
            format!("{bk}.open_for"),
            raw.circuit_breaker.open_for.as_deref(),
            Duration::from_secs(30),
        ),
    };
    if circuit_breaker.failure_threshold == 0 {
        p.push(format!("{bk}.failure_threshold"), "must be at least 1");
    }
    let signing_secret = raw
        .signing_secret
        .as_deref()
        .and_then(|s| p.take(format!("{key}.signing_secret"), standard_webhooks_secret(s)));
    let timeout = p.time_limit(format!("{key}.timeout"), raw.timeout.as_deref(), Duration::from_secs(5));
    let transform =
        raw.transform.as_deref().and_then(|t| p.take(format!("{key}.transform"), Program::compile(Kind::Transform, t)));
    let sequencing = sequencing(raw, key, p);
    Some(Target {
        name: raw.name.clone(),
        url: url?,
        timeout,
        ca_certs,
        headers,
        concurrency,
        rate_limit,
        retry,
        circuit_breaker,
        signing_secret,
        transform,
        sequencing,
    })
}

/// `order_by` or `debounce`, checked: not both, `max_wait` at least `window`.
fn sequencing(raw: &RawTarget, key: &str, p: &mut Problems) -> Option<Sequencing> {
    let program = |p: &mut Problems, k: String, text: &str| p.take(k, Program::compile(Kind::Key, text));
    match (&raw.order_by, &raw.debounce) {
        (Some(_), Some(_)) => {
            p.push(
                key.to_string(),
                "a target has order_by or debounce, not both (debounce's key already orders its groups)",
            );
            None
        }
        (Some(text), None) => program(p, format!("{key}.order_by"), text).map(Sequencing::Ordered),
        (None, Some(d)) => {
            let dk = format!("{key}.debounce");
            let window = p.duration(format!("{dk}.window"), Some(&d.window), Duration::ZERO);
            let max_wait = p.duration(format!("{dk}.max_wait"), d.max_wait.as_deref(), Duration::from_secs(300));
            if window.is_zero() {
                p.push(format!("{dk}.window"), "must be more than 0");
            }
            if max_wait < window {
                p.push(format!("{dk}.max_wait"), "must be at least window");
            }
            let group_key = match &d.key {
                Some(text) => Some(program(p, format!("{dk}.key"), text)?),
                None => None,
            };
            Some(Sequencing::Debounced(Debounce { window, max_wait, key: group_key }))
        }
        (None, None) => None,
    }
}

fn parse_target_url(raw: &str) -> Result<Uri, String> {
    let uri: Uri = raw.parse().map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(uri),
        _ => Err(format!("{raw:?} must be an absolute http:// or https:// URL")),
    }
}

fn route(raw: &RawRoute, key: &str, targets: &[RawTarget], p: &mut Problems) -> RouteRule {
    if raw.events.is_empty() {
        p.push(format!("{key}.events"), "at least one event pattern is required");
    }
    if raw.targets.is_empty() {
        p.push(format!("{key}.targets"), "at least one target is required");
    }
    let events = raw
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| p.take(format!("{key}.events[{i}]"), EventPattern::parse(e)))
        .collect();
    for (i, t) in raw.targets.iter().enumerate() {
        if !targets.iter().any(|rt| &rt.name == t) {
            p.push(format!("{key}.targets[{i}]"), format!("no target is named {t:?}"));
        }
    }
    let filter = raw.filter.as_deref().and_then(|f| p.take(format!("{key}.filter"), Program::compile(Kind::Filter, f)));
    RouteRule { key: key.to_string(), events, filter, targets: raw.targets.clone() }
}
