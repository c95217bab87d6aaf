//! Reads a request body whole, within a size limit, before the pod is chosen.
//!
//! Routing needs the prompt, so the body is read in `request_filter`; Pingora's own
//! retry buffer would cap a replayable body at 64 KiB, hence this reader and the
//! forwarder that sends the `Bytes` it returns.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

/// Initial buffer for bodies without `Content-Length` (chunked uploads).
const CHUNKED_INITIAL_CAPACITY: usize = 64 << 10;
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
}

/// Reads the whole request body, at most `limit` bytes, within `timeout` of being asked for.
///
/// A declared `Content-Length` over the limit is refused before anything is read and
/// before `100 Continue`, so an `Expect: 100-continue` client never sends the body.
/// Otherwise `100 Continue` goes out first: clients such as curl wait up to a second
/// for it before sending the body on their own.
pub async fn read_body(
    session: &mut Session,
    limit: usize,
    timeout: Duration,
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
    tokio::time::timeout(timeout, read_all(session, limit, declared))
        .await
        .unwrap_or(Err(BodyError::TimedOut { timeout }))
}

async fn read_all(
    session: &mut Session,
    limit: usize,
    declared: Option<usize>,
) -> Result<Bytes, BodyError> {
    let mut body = BytesMut::with_capacity(declared.unwrap_or(CHUNKED_INITIAL_CAPACITY));
    while let Some(chunk) = session.read_request_body().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge {
                limit,
                declared: None,
            });
        }
        // A single-chunk body is handed on without a copy.
        if body.is_empty() && session.is_body_done() {
            return Ok(chunk);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
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
