//! Client of vLLM's replay ROUTER (docs §4): a DEALER sends `["", start_seq]`
//! and reads one message per buffered batch from `start_seq` on, oldest first,
//! until the end marker (seq `ff`×8). Both reply forms are read: `["", seq,
//! payload]` (≤0.25) and `["", topic, seq, payload]` (0.26+).
//!
//! A REQ socket would take only the first reply, so this is a DEALER. Every
//! request uses a fresh socket: replays are rare, and a stale connection to a
//! restarted pod must not answer for the new one.
//!
//! The client only collects; whether the batches continue the sequence (before
//! 0.33 the ROUTER silently drops replies beyond its send high-water mark of
//! 1000 and still sends the end marker) is decided by the publisher's
//! [`SeqTracker`](super::tracker::SeqTracker), which asks again from the hole.
//! Replies are read as fast as they come and not processed here, so the ROUTER's
//! queue toward this reader stays short.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::{timeout_at, Instant};
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

use crate::events::codec::{parse_replay_frames, replay_request, DecodeError, ReplayFrame};
use crate::events::tracker::ReplayEnd;

/// Why a replay ended early.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replay endpoint {endpoint}: {source}")]
    Socket {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error("replay endpoint {endpoint}: no end marker within {timeout:?} ({received} batches received)")]
    Timeout {
        endpoint: String,
        timeout: Duration,
        received: usize,
    },
    #[error("replay endpoint {endpoint}: more than {limit} batches replayed")]
    TooMany { endpoint: String, limit: usize },
}

/// What one replay request returned.
#[derive(Debug)]
pub struct ReplayReply {
    /// `(seq, payload)` in the order received.
    pub batches: Vec<(u64, Bytes)>,
    pub end: ReplayEnd,
    /// Why the reply is incomplete, when `end` is `Failed`.
    pub error: Option<ReplayError>,
    /// Messages that were not replay frames (skipped).
    pub malformed: usize,
}

/// Sends replay requests with a deadline.
#[derive(Clone, Copy, Debug)]
pub struct ReplayClient {
    /// Whole-request budget: connect, send, and every reply up to the end marker.
    pub timeout: Duration,
    /// Most batches accepted from one request (vLLM buffers `buffer_steps`,
    /// 10000 by default).
    pub max_batches: usize,
}

impl ReplayClient {
    pub fn new(timeout: Duration, max_batches: usize) -> Self {
        Self {
            timeout,
            max_batches,
        }
    }

    /// Asks `endpoint` for every buffered batch from `from`.
    pub async fn fetch(&self, endpoint: &str, from: u64) -> ReplayReply {
        let deadline = Instant::now() + self.timeout;
        let mut reply = ReplayReply {
            batches: Vec::new(),
            end: ReplayEnd::Failed,
            error: None,
            malformed: 0,
        };
        let socket_error = |source| ReplayError::Socket {
            endpoint: endpoint.to_string(),
            source,
        };
        let mut options = SocketOptions::default();
        // The first connect retries internally until this runs out.
        options.connect_timeout(self.timeout);
        let mut socket = DealerSocket::with_options(options);
        let [delimiter, start_seq] = replay_request(from);
        let mut request = ZmqMessage::from(Bytes::from(delimiter));
        request.push_back(Bytes::from(start_seq));
        let connected = timeout_at(deadline, async {
            socket.connect(endpoint).await?;
            socket.send(request).await
        })
        .await;
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                reply.error = Some(socket_error(source));
                return reply;
            }
            Err(_) => {
                reply.error = Some(self.timed_out(endpoint, 0));
                return reply;
            }
        }
        loop {
            let message = match timeout_at(deadline, socket.recv()).await {
                Ok(Ok(message)) => message,
                Ok(Err(source)) => {
                    reply.error = Some(socket_error(source));
                    return reply;
                }
                Err(_) => {
                    reply.error = Some(self.timed_out(endpoint, reply.batches.len()));
                    return reply;
                }
            };
            match read_reply(&message) {
                Ok(Some((seq, payload))) => {
                    if reply.batches.len() == self.max_batches {
                        reply.error = Some(ReplayError::TooMany {
                            endpoint: endpoint.to_string(),
                            limit: self.max_batches,
                        });
                        return reply;
                    }
                    reply.batches.push((seq, payload));
                }
                Ok(None) => {
                    reply.end = ReplayEnd::Complete;
                    return reply;
                }
                Err(_) => reply.malformed += 1,
            }
        }
    }

    fn timed_out(&self, endpoint: &str, received: usize) -> ReplayError {
        ReplayError::Timeout {
            endpoint: endpoint.to_string(),
            timeout: self.timeout,
            received,
        }
    }
}

/// A replayed batch as `(seq, payload)`, or `None` for the end marker.
fn read_reply(message: &ZmqMessage) -> Result<Option<(u64, Bytes)>, DecodeError> {
    let mut frames: [&[u8]; 4] = [&[]; 4];
    if message.len() > frames.len() {
        return Err(DecodeError::FrameCount {
            socket: "replay",
            got: message.len(),
            expected: "3 or 4",
        });
    }
    for (slot, frame) in frames.iter_mut().zip(message.iter()) {
        *slot = frame;
    }
    Ok(match parse_replay_frames(&frames[..message.len()])? {
        ReplayFrame::End => None,
        ReplayFrame::Batch { seq, .. } => {
            // The payload is the last frame; keep it as shared bytes, no copy.
            let payload = message
                .get(message.len().saturating_sub(1))
                .cloned()
                .unwrap_or_default();
            Some((seq, payload))
        }
    })
}
