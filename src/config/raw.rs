//! The YAML schema of `routes.yaml`, exactly as written; `deny_unknown_fields` everywhere.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub storage: RawStorage,
    pub sources: Vec<RawSource>,
    #[serde(default)]
    pub targets: Vec<RawTarget>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub tls: Option<RawTls>,
    pub max_body: Option<String>,
    pub request_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub backend: Option<String>,
    pub path: Option<String>,
    pub cache: Option<String>,
    pub retention: Option<String>,
    pub url: Option<String>,
    pub pool: Option<u64>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub name: String,
    pub path: String,
    pub format: RawFormat,
    pub dedup_window: Option<String>,
    pub allow_ips: Option<Vec<String>>,
    pub event_pointer: Option<String>,
    pub event_header: Option<String>,
    pub auth: RawAuth,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawFormat {
    Buttercms,
    Cometcms,
    Generic,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RawAuth {
    None,
    Header {
        header: String,
        values: Vec<String>,
    },
    Hmac {
        header: String,
        #[serde(default)]
        algorithm: RawHmacAlgorithm,
        #[serde(default)]
        encoding: RawEncoding,
        prefix: Option<String>,
        secrets: Vec<String>,
    },
    StandardWebhooks {
        secrets: Vec<String>,
        /// How far `webhook-timestamp` may be from now; default 5m.
        tolerance: Option<String>,
    },
    Basic {
        username: String,
        password: Option<String>,
        passwords: Option<Vec<String>>,
    },
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawHmacAlgorithm {
    Sha1,
    #[default]
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawEncoding {
    #[default]
    Hex,
    Base64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub name: String,
    pub url: String,
    pub timeout: Option<String>,
    pub ca_file: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "number")]
    pub concurrency: Option<u32>,
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub circuit_breaker: RawBreaker,
    pub signing_secret: Option<String>,
    /// A jq program whose first output is the body sent.
    pub transform: Option<String>,
    /// Deliver one event per burst (per key).
    pub debounce: Option<RawDebounce>,
    /// A jq program: deliveries with the same key go one at a time, in order.
    pub order_by: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDebounce {
    pub window: String,
    pub max_wait: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    #[serde(deserialize_with = "required_number")]
    pub per_second: u32,
    #[serde(default, deserialize_with = "number")]
    pub burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    #[serde(default, deserialize_with = "number")]
    pub max_attempts: Option<u32>,
    pub initial_backoff: Option<String>,
    pub max_backoff: Option<String>,
    pub max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    #[serde(default, deserialize_with = "number")]
    pub failure_threshold: Option<u32>,
    pub open_for: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub source: String,
    pub events: Vec<String>,
    /// A jq program: the route matches only when its first output is truthy.
    pub filter: Option<String>,
    pub targets: Vec<String>,
}

/// A whole number written either as a YAML number or as a string, since `${VAR}`
/// substitution always yields a string (`concurrency: "${SEARCH_CONCURRENCY:-4}"`).
fn number<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
{
    let text = match Option::<serde_yaml::Value>::deserialize(de)? {
        None | Some(serde_yaml::Value::Null) => return Ok(None),
        Some(serde_yaml::Value::Number(n)) => n.to_string(),
        Some(serde_yaml::Value::String(s)) => s.trim().to_string(),
        Some(other) => return Err(serde::de::Error::custom(format!("expected a whole number, got {other:?}"))),
    };
    text.parse()
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("expected a positive whole number, got {text:?}")))
}

fn required_number<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
{
    number(de)?.ok_or_else(|| serde::de::Error::custom("a number is required"))
}
