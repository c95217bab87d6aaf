//! The relay's wire format: length-prefixed frames over TCP, little-endian.
//!
//! `u32 length` (of what follows), `u8 type`, then the body:
//!
//! | type | body |
//! |---|---|
//! | 1 `Hello` (server → client) | version `u8`, server id `[u8; 16]`, nonce `[u8; 32]` |
//! | 2 `Auth` (client → server) | client id `[u8; 16]`, nonce `[u8; 32]`, HMAC `[u8; 32]` |
//! | 3 `Welcome` (server → client) | HMAC `[u8; 32]` |
//! | 4 `Batch` | received at (unix ns) `u64`, then topic, seq and payload frames, each `u32` length + bytes, exactly as the pod sent them |
//! | 5 `Snapshot` | topic (`u32` + bytes), publisher count `u16`, per publisher: rank `u32`, seq `u64`, ts bits `u64`, synced `u8`, entry count `u32`, per entry: scope `u32`, tier `u8` (1 GPU, 2 offload), hash `u64` |
//! | 6 `Heartbeat` | — |
//!
//! Before authentication a peer may send at most [`MAX_HANDSHAKE_FRAME`] bytes, so nobody
//! can make kvgate hold memory without the secret; afterwards frames are bounded by
//! [`MAX_FRAME`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::events::StreamMark;
use crate::index::{ScopeId, Tier};

pub const VERSION: u8 = 1;
pub const MAX_HANDSHAKE_FRAME: usize = 256;
/// A vLLM batch is kilobytes; a snapshot of one pod with 1.2M tokens of blocks 16 is ~1 MiB.
pub const MAX_FRAME: usize = 64 << 20;

pub const HELLO: u8 = 1;
pub const AUTH: u8 = 2;
pub const WELCOME: u8 = 3;
pub const BATCH: u8 = 4;
pub const SNAPSHOT: u8 = 5;
pub const HEARTBEAT: u8 = 6;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("truncated {0} frame")]
    Truncated(&'static str),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("invalid tier {0} in a snapshot")]
    Tier(u8),
}

/// One publisher (data-parallel rank) of a pod in a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct PublisherSnapshot {
    pub rank: u32,
    pub mark: StreamMark,
    /// Every block the publisher holds.
    pub entries: Vec<(ScopeId, Tier, u64)>,
}

/// One pod's state as the replica its events reach directly sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSnapshot {
    /// The pod's topic (`kv@<pod>@<model>`): it names the pod as its batches do.
    pub topic: Bytes,
    pub publishers: Vec<PublisherSnapshot>,
}

/// A frame after the handshake.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A pod's batch as received: `[topic, seq, payload]`.
    Batch {
        received_at_ns: u64,
        frames: [Bytes; 3],
    },
    Snapshot(PodSnapshot),
    Heartbeat,
}

/// Appends a frame of `kind` whose body `body` writes.
pub fn encode(out: &mut BytesMut, kind: u8, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u32_le(0);
    out.put_u8(kind);
    body(out);
    let length = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&length.to_le_bytes());
}

pub fn encode_batch(out: &mut BytesMut, received_at_ns: u64, frames: &[Bytes; 3]) {
    encode(out, BATCH, |b| {
        b.put_u64_le(received_at_ns);
        for frame in frames {
            b.put_u32_le(frame.len() as u32);
            b.put_slice(frame);
        }
    });
}

pub fn encode_snapshot(out: &mut BytesMut, snapshot: &PodSnapshot) {
    encode(out, SNAPSHOT, |b| {
        b.put_u32_le(snapshot.topic.len() as u32);
        b.put_slice(&snapshot.topic);
        b.put_u16_le(snapshot.publishers.len() as u16);
        for publisher in &snapshot.publishers {
            b.put_u32_le(publisher.rank);
            b.put_u64_le(publisher.mark.seq);
            b.put_u64_le(publisher.mark.ts.to_bits());
            b.put_u8(u8::from(publisher.mark.synced));
            b.put_u32_le(publisher.entries.len() as u32);
            for &(scope, tier, hash) in &publisher.entries {
                b.put_u32_le(scope);
                b.put_u8(match tier {
                    Tier::Gpu => 1,
                    Tier::Cpu => 2,
                });
                b.put_u64_le(hash);
            }
        }
    });
}

/// Splits one whole frame off `buf`, if it holds one: `(type, body)`.
pub fn split(buf: &mut BytesMut, limit: usize) -> Result<Option<(u8, Bytes)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let length = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if length == 0 || length > limit {
        return Err(FrameError::TooLong(length));
    }
    if buf.len() < 4 + length {
        buf.reserve(4 + length - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut body = buf.split_to(length).freeze();
    let kind = body.get_u8();
    Ok(Some((kind, body)))
}

fn take(body: &mut Bytes, n: usize, what: &'static str) -> Result<Bytes, FrameError> {
    if body.remaining() < n {
        return Err(FrameError::Truncated(what));
    }
    Ok(body.split_to(n))
}

fn need(body: &Bytes, n: usize, what: &'static str) -> Result<(), FrameError> {
    if body.remaining() < n {
        return Err(FrameError::Truncated(what));
    }
    Ok(())
}

/// Decodes a frame of the stream after the handshake.
pub fn decode(kind: u8, mut body: Bytes) -> Result<Frame, FrameError> {
    match kind {
        BATCH => {
            need(&body, 8, "batch")?;
            let received_at_ns = body.get_u64_le();
            let mut part = || {
                need(&body, 4, "batch")?;
                let n = body.get_u32_le() as usize;
                take(&mut body, n, "batch")
            };
            let frames = [part()?, part()?, part()?];
            Ok(Frame::Batch {
                received_at_ns,
                frames,
            })
        }
        SNAPSHOT => {
            need(&body, 4, "snapshot")?;
            let n = body.get_u32_le() as usize;
            let topic = take(&mut body, n, "snapshot")?;
            need(&body, 2, "snapshot")?;
            let publishers = body.get_u16_le();
            let mut out = Vec::with_capacity(usize::from(publishers));
            for _ in 0..publishers {
                need(&body, 4 + 8 + 8 + 1 + 4, "snapshot")?;
                let rank = body.get_u32_le();
                let seq = body.get_u64_le();
                let ts = f64::from_bits(body.get_u64_le());
                let synced = body.get_u8() != 0;
                let count = body.get_u32_le() as usize;
                need(&body, count.saturating_mul(13), "snapshot")?;
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let scope = body.get_u32_le();
                    let tier = match body.get_u8() {
                        1 => Tier::Gpu,
                        2 => Tier::Cpu,
                        other => return Err(FrameError::Tier(other)),
                    };
                    entries.push((scope, tier, body.get_u64_le()));
                }
                out.push(PublisherSnapshot {
                    rank,
                    mark: StreamMark { seq, ts, synced },
                    entries,
                });
            }
            Ok(Frame::Snapshot(PodSnapshot {
                topic,
                publishers: out,
            }))
        }
        HEARTBEAT => Ok(Frame::Heartbeat),
        other => Err(FrameError::UnknownType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split_at_their_boundaries() {
        let mut out = BytesMut::new();
        let batch = [
            Bytes::from_static(b"kv@10.0.0.5@Qwen3-32B"),
            Bytes::copy_from_slice(&7u64.to_be_bytes()),
            Bytes::from_static(b"\x93payload"),
        ];
        encode_batch(&mut out, 42, &batch);
        let snapshot = PodSnapshot {
            topic: Bytes::from_static(b"kv@10.0.0.5@Qwen3-32B"),
            publishers: vec![PublisherSnapshot {
                rank: 0,
                mark: StreamMark {
                    seq: 7,
                    ts: 1754006400.25,
                    synced: true,
                },
                entries: vec![(3, Tier::Gpu, u64::MAX), (3, Tier::Cpu, 9)],
            }],
        };
        encode_snapshot(&mut out, &snapshot);
        encode(&mut out, HEARTBEAT, |_| {});
        // Fed a byte at a time, each frame comes out once it is whole.
        let wire = out.freeze();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            while let Some((kind, body)) = split(&mut buf, MAX_FRAME).expect("valid") {
                frames.push(decode(kind, body).expect("decodes"));
            }
        }
        assert_eq!(
            frames,
            [
                Frame::Batch {
                    received_at_ns: 42,
                    frames: batch
                },
                Frame::Snapshot(snapshot),
                Frame::Heartbeat
            ]
        );
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0x00][..]);
        assert!(matches!(
            split(&mut buf, MAX_HANDSHAKE_FRAME),
            Err(FrameError::TooLong(_))
        ));
        let mut out = BytesMut::new();
        encode(&mut out, BATCH, |b| b.put_u64_le(1));
        let (kind, body) = split(&mut out, MAX_FRAME).unwrap().unwrap();
        assert_eq!(decode(kind, body), Err(FrameError::Truncated("batch")));
        assert_eq!(decode(99, Bytes::new()), Err(FrameError::UnknownType(99)));
    }
}
