//! Source authentication: the only way to turn a request body into a
//! [`Verified`] one. Every comparison of a secret or signature is constant-time.

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{header::AUTHORIZATION, HeaderMap};
use subtle::{Choice, ConstantTimeEq};

use crate::config::{Auth, Encoding, HmacAlgorithm, Secret};

/// A request body whose sender proved it holds the source's secret.
#[derive(Debug)]
pub struct Verified {
    body: Bytes,
}

impl Verified {
    pub fn body(&self) -> &Bytes {
        &self.body
    }
    pub fn into_body(self) -> Bytes {
        self.body
    }
}

/// Why a request was refused. Logged; the client sees only `401`.
/// Never holds a secret or a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("header {0} is missing")]
    Missing(String),
    #[error("header {header} is malformed: {why}")]
    Malformed { header: String, why: &'static str },
    #[error("no configured secret matches ({0})")]
    Mismatch(&'static str),
    #[error("webhook-timestamp is {0}s away from now, outside the tolerance")]
    StaleTimestamp(i64),
}

/// Whether the credential covers the body (a signature): otherwise it is
/// all in the headers, and checked before the body is read.
pub fn signs_body(auth: &Auth) -> bool {
    matches!(auth, Auth::Hmac { .. } | Auth::StandardWebhooks { .. })
}

/// Checks a request against its source's auth settings.
pub fn verify(auth: &Auth, headers: &HeaderMap, body: Bytes, now: SystemTime) -> Result<Verified, AuthFailure> {
    match auth {
        Auth::None => {}
        Auth::Header { header, values } => {
            let given = header_bytes(headers, header.as_str())?;
            if !any_equal(values, given) {
                return Err(AuthFailure::Mismatch("header value"));
            }
        }
        Auth::Hmac { header, algorithm, encoding, prefix, secrets } => {
            let raw = header_str(headers, header.as_str())?;
            let malformed = |why| AuthFailure::Malformed { header: header.to_string(), why };
            let encoded = raw.trim().strip_prefix(prefix.as_str()).ok_or_else(|| malformed("prefix missing"))?;
            let given = match encoding {
                Encoding::Hex => decode_hex(encoded).ok_or_else(|| malformed("not hex"))?,
                Encoding::Base64 => B64.decode(encoded).map_err(|_| malformed("not base64"))?,
            };
            let matched = secrets
                .iter()
                .fold(Choice::from(0), |acc, s| acc | hmac(*algorithm, s.expose(), &[&body]).ct_eq(&given));
            if !bool::from(matched) {
                return Err(AuthFailure::Mismatch("HMAC signature"));
            }
        }
        Auth::StandardWebhooks { secrets, tolerance } => standard_webhooks(secrets, *tolerance, headers, &body, now)?,
        Auth::Basic { username, passwords } => {
            let raw = header_str(headers, AUTHORIZATION.as_str())?;
            let malformed = |why| AuthFailure::Malformed { header: "authorization".into(), why };
            // The scheme's name is case-insensitive (RFC 9110 §11.1).
            let encoded = raw
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
                .map(|(_, rest)| rest)
                .ok_or_else(|| malformed("not Basic"))?;
            let decoded = B64.decode(encoded.trim()).map_err(|_| malformed("not base64"))?;
            let colon = decoded.iter().position(|&b| b == b':').ok_or_else(|| malformed("no ':'"))?;
            let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
            let ok = username.expose().ct_eq(user) & Choice::from(any_equal(passwords, pass) as u8);
            if !bool::from(ok) {
                return Err(AuthFailure::Mismatch("basic credentials"));
            }
        }
    }
    Ok(Verified { body })
}

/// Standard Webhooks: HMAC-SHA256 over `{id}.{timestamp}.{body}`; the header
/// holds space-separated `v1,<base64>` signatures, any of which may match.
fn standard_webhooks(
    secrets: &[Secret],
    tolerance: Duration,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<(), AuthFailure> {
    let id = header_str(headers, "webhook-id")?;
    let ts_raw = header_str(headers, "webhook-timestamp")?;
    let sigs = header_str(headers, "webhook-signature")?;
    let ts: i64 = ts_raw
        .trim()
        .parse()
        .map_err(|_| AuthFailure::Malformed { header: "webhook-timestamp".into(), why: "not unix seconds" })?;
    let now_s = crate::store::unix_secs(now);
    let skew = ts.saturating_sub(now_s);
    if skew.unsigned_abs() > tolerance.as_secs() {
        return Err(AuthFailure::StaleTimestamp(skew));
    }
    let given: Vec<Vec<u8>> =
        sigs.split(' ').filter_map(|s| s.strip_prefix("v1,")).filter_map(|b64| B64.decode(b64).ok()).collect();
    if given.is_empty() {
        return Err(AuthFailure::Malformed { header: "webhook-signature".into(), why: "no v1 signature" });
    }
    let signed_prefix = format!("{id}.{ts_raw}.");
    let mut matched = Choice::from(0);
    for secret in secrets {
        let expected = hmac(HmacAlgorithm::Sha256, secret.expose(), &[signed_prefix.as_bytes(), body]);
        for g in &given {
            matched |= expected.ct_eq(g);
        }
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(AuthFailure::Mismatch("webhook-signature"))
    }
}

/// Standard Webhooks' `webhook-signature` value for a message: `v1,<base64>`.
pub fn standard_webhooks_signature(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let prefix = format!("{id}.{timestamp}.");
    format!("v1,{}", B64.encode(hmac(HmacAlgorithm::Sha256, secret, &[prefix.as_bytes(), body])))
}

/// HMAC of the concatenated `parts`.
pub fn hmac(algorithm: HmacAlgorithm, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().to_vec()
    }
    match algorithm {
        HmacAlgorithm::Sha1 => run::<Hmac<sha1::Sha1>>(key, parts),
        HmacAlgorithm::Sha256 => run::<Hmac<sha2::Sha256>>(key, parts),
        HmacAlgorithm::Sha512 => run::<Hmac<sha2::Sha512>>(key, parts),
    }
}

/// True when `given` equals any of `secrets`; every secret is compared, in constant time.
fn any_equal(secrets: &[Secret], given: &[u8]) -> bool {
    secrets.iter().fold(Choice::from(0), |acc, s| acc | s.expose().ct_eq(given)).into()
}

fn header_bytes<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a [u8], AuthFailure> {
    headers.get(name).map(|v| v.as_bytes()).ok_or_else(|| AuthFailure::Missing(name.to_string()))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, AuthFailure> {
    std::str::from_utf8(header_bytes(headers, name)?)
        .map_err(|_| AuthFailure::Malformed { header: name.to_string(), why: "not UTF-8" })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    // Hex digits only: `from_str_radix` alone would take "+a" for 0x0a.
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok())).collect()
}

pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
