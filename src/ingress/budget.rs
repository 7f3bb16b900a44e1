//! How many bytes of not yet authenticated bodies a source holds at once.
//!
//! A source whose signature covers the body (`hmac`, `standard-webhooks`)
//! must read the body before it knows who sent it. Each body is bounded by
//! `max_body`, but without a bound on all of them together, anyone could
//! open many connections (or HTTP/2 streams) and send a body of
//! `max_body` on each, never finishing, and hold gigabytes for
//! `request_timeout`. A read waits while its source's budget is spent: it
//! reads no more meanwhile, so the sender is held back by TCP and HTTP/2
//! flow control, and the wait counts toward `request_timeout`.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::sync::Semaphore;

/// Bodies being read at once by one source, in multiples of `max_body`.
pub const BODIES_AT_ONCE: u64 = 16;

/// Why a body was not read.
#[derive(Debug, PartialEq)]
pub enum BodyError {
    /// Over the limit given to [`BodyBudget::read`].
    TooLarge,
    /// The connection failed or the client broke the body off.
    Read(String),
}

/// The bytes one source's bodies may hold at once.
#[derive(Debug)]
pub struct BodyBudget {
    bytes: Semaphore,
}

/// Bytes taken from a budget, given back when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a Semaphore,
    bytes: usize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.add_permits(self.bytes);
    }
}

impl BodyBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        BodyBudget { bytes: Semaphore::new(bytes) }
    }

    /// The budget of a source's bodies of at most `max_body` each: none
    /// when its credential is checked before the body is read (whoever
    /// sends one is known).
    pub fn for_source(auth: &crate::config::Auth, max_body: u64) -> Self {
        match super::auth::signs_body(auth) {
            true => Self::new(max_body.saturating_mul(BODIES_AT_ONCE)),
            false => Self::new(u64::MAX),
        }
    }

    /// Reads `body` whole, at most `limit` bytes, each frame's bytes taken
    /// from the budget before the next frame is read (waiting while it is
    /// spent). What it took stays taken while the [`Held`] lives.
    pub async fn read<B>(&self, body: B, limit: usize) -> Result<(Bytes, Held<'_>), BodyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut held = Held { budget: &self.bytes, bytes: 0 };
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else { continue };
            if held.bytes + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            // Within `limit`, so within a budget of at least `limit` once
            // the other reads give theirs back.
            let n = u32::try_from(data.len()).map_err(|_| BodyError::TooLarge)?;
            let permits = self.bytes.acquire_many(n).await.map_err(|e| BodyError::Read(e.to_string()))?;
            permits.forget();
            held.bytes += data.len();
            chunks.push(data);
        }
        let body = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.swap_remove(0),
            _ => {
                let mut all = BytesMut::with_capacity(held.bytes);
                chunks.iter().for_each(|c| all.extend_from_slice(c));
                all.freeze()
            }
        };
        Ok((body, held))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{Full, StreamBody};
    use hyper::body::Frame;

    use super::*;

    fn chunked(
        parts: &[&'static [u8]],
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, String>> + Unpin> {
        let frames: Vec<Result<Frame<Bytes>, String>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p)))).collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn reads_a_body_in_frames_within_its_limit() {
        let budget = BodyBudget::new(100);
        let (body, held) = budget.read(chunked(&[b"abc", b"de", b"f"]), 6).await.unwrap();
        assert_eq!((&body[..], held.bytes), (&b"abcdef"[..], 6));
        let (one, _held) = budget.read(Full::new(Bytes::from_static(b"xyz")), 3).await.unwrap();
        assert_eq!(&one[..], b"xyz");
        assert_eq!(budget.read(chunked(&[b"abc", b"def"]), 5).await.unwrap_err(), BodyError::TooLarge);
    }

    #[tokio::test]
    async fn a_read_waits_while_the_budget_is_spent_and_goes_on_once_given_back() {
        let budget = BodyBudget::new(10);
        let (_, first) = budget.read(chunked(&[b"12345678"]), 10).await.unwrap();
        let second = budget.read(chunked(&[b"abcdefgh"]), 10);
        tokio::pin!(second);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut second).await.is_err(), "read past the budget");
        drop(first);
        let (body, _held) = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap();
        assert_eq!(&body[..], b"abcdefgh");
        // A failed read gives back what it took.
        assert!(budget.read(chunked(&[b"12", b"345678901"]), 10).await.is_err());
        assert_eq!(budget.bytes.available_permits(), 2);
    }
}
