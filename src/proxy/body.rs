//! Reads a request body whole, within a size limit, before the pod is chosen.
//!
//! Routing needs the prompt, so the body is read in `request_filter`; Pingora's own
//! retry buffer would cap a replayable body at 64 KiB, hence this reader and the
//! forwarder that sends the `Bytes` it returns.
//!
//! A client can make kvgate hold only memory it has sent: the buffer grows with the
//! bytes received (doubling, never past the declared `Content-Length`), never from the
//! declared length alone, and every buffer, across all connections, is charged to one
//! [`BodyBudget`] (`server.maxBufferedBodyBytes`) for as long as its request lives. A
//! body that would overdraw it is refused with 503 and `Retry-After`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora::proxy::Session;

/// Smallest buffer allocated once a body spans more than one read.
const MIN_CAPACITY: usize = 64 << 10;
/// Bounds on reading and dropping the rest of a refused body.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 128 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than the limit of {limit} bytes{}", declared.map(|n| format!(" (Content-Length: {n})")).unwrap_or_default())]
    TooLarge {
        limit: usize,
        declared: Option<usize>,
    },
    #[error("reading the request body failed: {0}")]
    Read(Box<pingora::Error>),
    #[error("the request body did not arrive within {} ms", timeout.as_millis())]
    TimedOut { timeout: Duration },
    #[error(
        "the gateway holds as many request bodies as it may ({limit} bytes, \
         server.maxBufferedBodyBytes); retry shortly"
    )]
    BufferFull { limit: usize },
}

/// Request-body bytes held in memory across all connections.
#[derive(Debug, Default)]
pub struct BodyBudget {
    used: AtomicUsize,
}

impl BodyBudget {
    /// Bytes held right now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A charge of nothing yet, growing with [`BodyHold::grow`], returned when dropped.
    pub fn hold(self: &Arc<Self>, limit: usize) -> BodyHold {
        BodyHold {
            budget: Arc::clone(self),
            limit,
            bytes: 0,
        }
    }
}

/// One request's share of the [`BodyBudget`]; given back when dropped, with the body.
#[derive(Debug)]
pub struct BodyHold {
    budget: Arc<BodyBudget>,
    limit: usize,
    bytes: usize,
}

impl BodyHold {
    /// Charges `more` bytes, unless the budget cannot cover them.
    pub(super) fn grow(&mut self, more: usize) -> Result<(), BodyError> {
        let limit = self.limit;
        self.budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(more).filter(|&total| total <= limit)
            })
            .map_err(|_| BodyError::BufferFull { limit })?;
        self.bytes += more;
        crate::metrics::global().body_bytes_buffered(self.budget.used());
        Ok(())
    }
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
            crate::metrics::global().body_bytes_buffered(self.budget.used());
        }
    }
}

/// Reads the whole request body, at most `limit` bytes, within `timeout` of being asked
/// for, charging what it buffers to `hold`.
///
/// A declared `Content-Length` over the limit is refused before anything is read and
/// before `100 Continue`, so an `Expect: 100-continue` client never sends the body.
/// Otherwise `100 Continue` goes out first: clients such as curl wait up to a second
/// for it before sending the body on their own.
pub async fn read_body(
    session: &mut Session,
    limit: usize,
    timeout: Duration,
    hold: &mut BodyHold,
) -> Result<Bytes, BodyError> {
    let declared = declared_length(session);
    if let Some(n) = declared.filter(|&n| n > limit) {
        return Err(BodyError::TooLarge {
            limit,
            declared: Some(n),
        });
    }
    if session.is_body_empty() {
        return Ok(Bytes::new());
    }
    if expects_continue(session) {
        session
            .write_continue_response()
            .await
            .map_err(BodyError::Read)?;
    }
    // One deadline for the whole body: Pingora's timeout is per read, which a client
    // sending a byte at a time never trips.
    tokio::time::timeout(timeout, read_all(session, limit, declared, hold))
        .await
        .unwrap_or(Err(BodyError::TimedOut { timeout }))
}

async fn read_all(
    session: &mut Session,
    limit: usize,
    declared: Option<usize>,
    hold: &mut BodyHold,
) -> Result<Bytes, BodyError> {
    let mut body: Vec<u8> = Vec::new();
    while let Some(chunk) = session.read_request_body().await.map_err(BodyError::Read)? {
        let len = body.len() + chunk.len();
        if len > limit {
            return Err(BodyError::TooLarge {
                limit,
                declared: None,
            });
        }
        // A single-chunk body is handed on without a copy.
        if body.is_empty() && session.is_body_done() {
            hold.grow(chunk.len())?;
            return Ok(chunk);
        }
        if body.capacity() < len {
            let capacity = grown_capacity(body.len(), len, declared, limit);
            hold.grow(capacity - body.capacity())?;
            body.reserve_exact(capacity - body.len());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// The buffer size for `needed` bytes when `held` are in: twice what was received (at
/// least [`MIN_CAPACITY`]), but never past the declared length or the limit, so what a
/// client makes kvgate allocate is bounded by what it sent.
fn grown_capacity(held: usize, needed: usize, declared: Option<usize>, limit: usize) -> usize {
    let ceiling = declared.unwrap_or(limit).min(limit);
    (held * 2).max(MIN_CAPACITY).min(ceiling).max(needed)
}

/// Reads and drops what is left of a body that was refused, after the error response is
/// written. Most clients send the whole request before reading: closing on them mid-upload
/// would make them see a connection reset instead of the error. Bounded in time and bytes.
pub async fn discard_rest(session: &mut Session) {
    let drain = async {
        let mut dropped = 0;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            dropped += chunk.len();
            if dropped > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

fn declared_length(session: &Session) -> Option<usize> {
    let header = session.req_header();
    if header.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    header
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn expects_continue(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_grows_with_what_arrived_not_with_what_was_declared() {
        let declared = Some(32 << 20);
        // The first bytes of a declared 32 MiB body get a small buffer...
        assert_eq!(grown_capacity(0, 16, declared, 32 << 20), MIN_CAPACITY);
        // ...which doubles as bytes come, up to the declared length at most.
        assert_eq!(
            grown_capacity(1 << 20, (1 << 20) + 1, declared, 32 << 20),
            2 << 20
        );
        assert_eq!(
            grown_capacity(20 << 20, (20 << 20) + 1, Some(21 << 20), 32 << 20),
            21 << 20
        );
        // A short declared body gets exactly its length; chunked bodies stop at the limit.
        assert_eq!(grown_capacity(0, 100, Some(300), 32 << 20), 300);
        assert_eq!(
            grown_capacity(30 << 20, (30 << 20) + 1, None, 32 << 20),
            32 << 20
        );
    }

    #[test]
    fn holds_share_one_budget_until_dropped() {
        let budget = Arc::new(BodyBudget::default());
        let mut a = budget.hold(100);
        let mut b = budget.hold(100);
        a.grow(60).expect("fits");
        assert!(matches!(
            b.grow(50),
            Err(BodyError::BufferFull { limit: 100 })
        ));
        b.grow(40).expect("fits exactly");
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        b.grow(60).expect("freed by the first request");
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
