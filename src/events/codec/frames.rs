//! The ZeroMQ frames around a KV-event payload: `[topic, seq, payload]` from
//! the PUB socket, the replay ROUTER's replies, and the topic naming pod and model.

use super::DecodeError;

/// Sequence number of the replay end marker (`ff` × 8).
pub const REPLAY_END_SEQ: u64 = u64::MAX;

/// Prefix of the topics kvgate configures on pods (`kv@<pod-ip>@<model>`).
pub const TOPIC_PREFIX: &str = "kv@";

/// A message from the PUB socket: `[topic, seq, payload]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventMessage<'a> {
    pub topic: &'a [u8],
    pub seq: u64,
    pub payload: &'a [u8],
}

/// A message from the replay ROUTER, as a DEALER receives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFrame<'a> {
    /// A buffered batch. `topic` is sent by 0.26+ only.
    Batch {
        topic: Option<&'a [u8]>,
        seq: u64,
        payload: &'a [u8],
    },
    /// No more buffered batches.
    End,
}

fn parse_seq(socket: &'static str, frame: &[u8]) -> Result<u64, DecodeError> {
    let bytes: [u8; 8] = frame.try_into().map_err(|_| DecodeError::SeqFrame {
        socket,
        len: frame.len(),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Splits a PUB message `[topic, seq (8 bytes, big-endian), payload]`.
pub fn parse_pub_frames<'a>(frames: &[&'a [u8]]) -> Result<EventMessage<'a>, DecodeError> {
    match *frames {
        [topic, seq, payload] => Ok(EventMessage {
            topic,
            seq: parse_seq("PUB", seq)?,
            payload,
        }),
        _ => Err(DecodeError::FrameCount {
            socket: "PUB",
            got: frames.len(),
            expected: "3 [topic, seq, payload]",
        }),
    }
}

/// Splits a replay reply as a DEALER receives it: `["", seq, payload]`
/// (≤0.25) or `["", topic, seq, payload]` (0.26+); a seq of `ff` × 8 ends the
/// replay.
pub fn parse_replay_frames<'a>(frames: &[&'a [u8]]) -> Result<ReplayFrame<'a>, DecodeError> {
    let (delimiter, topic, seq, payload) = match *frames {
        [delimiter, seq, payload] => (delimiter, None, seq, payload),
        [delimiter, topic, seq, payload] => (delimiter, Some(topic), seq, payload),
        _ => {
            return Err(DecodeError::FrameCount {
                socket: "replay",
                got: frames.len(),
                expected: "3 [\"\", seq, payload] or 4 [\"\", topic, seq, payload]",
            })
        }
    };
    if !delimiter.is_empty() {
        return Err(DecodeError::ReplayDelimiter {
            len: delimiter.len(),
        });
    }
    let seq = parse_seq("replay", seq)?;
    if seq == REPLAY_END_SEQ {
        return Ok(ReplayFrame::End);
    }
    Ok(ReplayFrame::Batch {
        topic,
        seq,
        payload,
    })
}

/// The frames a DEALER sends to ask for every buffered batch from `start_seq`.
pub fn replay_request(start_seq: u64) -> [Vec<u8>; 2] {
    [Vec::new(), start_seq.to_be_bytes().to_vec()]
}

/// Splits a topic `kv@<pod-ip>@<model>` into pod address and model. The pod
/// part ends at the first `@` (IPv6 addresses contain `:` but never `@`), so
/// the model name may contain `@`.
pub fn parse_topic(topic: &str) -> Option<(&str, &str)> {
    let (pod, model) = topic.strip_prefix(TOPIC_PREFIX)?.split_once('@')?;
    (!pod.is_empty() && !model.is_empty()).then_some((pod, model))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn topics_split_at_the_first_at_sign() {
        assert_eq!(
            parse_topic("kv@10.0.0.5@Qwen3-32B"),
            Some(("10.0.0.5", "Qwen3-32B"))
        );
        assert_eq!(
            parse_topic("kv@fd00::1:5@org/model@rev"),
            Some(("fd00::1:5", "org/model@rev"))
        );
        assert_eq!(parse_topic("kv@10.0.0.5"), None);
        assert_eq!(parse_topic("kv@@model"), None);
        assert_eq!(parse_topic("kv@10.0.0.5@"), None);
        assert_eq!(parse_topic("other@10.0.0.5@m"), None);
    }

    #[test]
    fn frames_are_checked() {
        let seq = 7u64.to_be_bytes();
        let msg = parse_pub_frames(&[b"t", &seq, b"p"]).expect("valid");
        assert_eq!((msg.topic, msg.seq, msg.payload), (&b"t"[..], 7, &b"p"[..]));
        assert!(matches!(
            parse_pub_frames(&[b"t", &seq]),
            Err(DecodeError::FrameCount { got: 2, .. })
        ));
        assert!(matches!(
            parse_pub_frames(&[b"t", b"1234", b"p"]),
            Err(DecodeError::SeqFrame { len: 4, .. })
        ));
        assert!(matches!(
            parse_replay_frames(&[b"x", &seq, b"p"]),
            Err(DecodeError::ReplayDelimiter { len: 1 })
        ));
        assert_eq!(
            parse_replay_frames(&[b"", b"topic", &seq, b"p"]).expect("valid"),
            ReplayFrame::Batch {
                topic: Some(b"topic"),
                seq: 7,
                payload: b"p"
            }
        );
        assert_eq!(
            parse_replay_frames(&[b"", &[0xff; 8], b""]).expect("valid"),
            ReplayFrame::End
        );
        assert_eq!(replay_request(1), [vec![], vec![0, 0, 0, 0, 0, 0, 0, 1]]);
    }
}
