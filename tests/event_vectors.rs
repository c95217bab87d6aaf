//! The event codec against the frames each vLLM release's own publisher put
//! on the wire (../shared/vectors/vllm_kv_events.json), and against hostile
//! input: random bytes, truncations, bit flips and well-formed msgpack of the
//! wrong shape.

use std::sync::OnceLock;

use kvgate::events::{
    decode_batch, parse_pub_frames, parse_replay_frames, parse_topic, replay_request,
    wire_hash_key, BlockRemoved, BlockStored, DecodeError, EventBatch, EventEncoder, ExtraKey,
    ExtraKeys, KvEvent, Medium, OutEvent, ReplayFrame, WireError, WireHash,
};
use kvgate::vllm::VllmRelease;
use proptest::prelude::*;
use rmpv::Value as Msgpack;
use serde_json::{Map, Value};

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/vectors/vllm_kv_events.json"
);

fn vectors() -> &'static Value {
    static VECTORS_JSON: OnceLock<Value> = OnceLock::new();
    VECTORS_JSON.get_or_init(|| {
        let text = std::fs::read_to_string(VECTORS).expect("vectors file");
        serde_json::from_str(&text).expect("vectors JSON")
    })
}

fn formats() -> &'static [Value] {
    vectors()["formats"].as_array().expect("formats")
}

fn unhex(text: &Value) -> Vec<u8> {
    hex::decode(text.as_str().expect("hex string")).expect("hex")
}

fn releases(format: &Value) -> Vec<VllmRelease> {
    format["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v.as_str().expect("version").parse().expect("release"))
        .collect()
}

/// Every real payload in the vectors, once.
fn real_payloads() -> &'static [Vec<u8>] {
    static PAYLOADS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    PAYLOADS.get_or_init(|| {
        formats()
            .iter()
            .flat_map(|f| f["pub_frames"].as_array().expect("pub_frames"))
            .map(|frame| unhex(&frame["payload_hex"]))
            .collect()
    })
}

/// A hash as the generic decode shows it: an int or `{"bin_hex": …}`.
enum JsonHash {
    Int(u64),
    Bytes(Vec<u8>),
}

impl JsonHash {
    fn parse(v: &Value) -> Self {
        match v.as_u64() {
            Some(int) => Self::Int(int),
            None => Self::Bytes(unhex(&v["bin_hex"])),
        }
    }

    fn wire(&self) -> WireHash<'_> {
        match self {
            Self::Int(int) => WireHash::Int(*int),
            Self::Bytes(bytes) => WireHash::Bytes(bytes),
        }
    }

    fn key(&self) -> u64 {
        match self {
            Self::Int(int) => *int,
            Self::Bytes(bytes) => wire_hash_key(bytes),
        }
    }
}

fn json_extra_key(v: &Value) -> ExtraKey {
    match v {
        Value::Null => ExtraKey::Nil,
        Value::String(s) => ExtraKey::Str(s.as_str().into()),
        Value::Number(n) => match n.as_u64() {
            Some(u) => ExtraKey::UInt(u),
            None => ExtraKey::Int(n.as_i64().expect("int extra key")),
        },
        Value::Array(items) => ExtraKey::Tuple(items.iter().map(json_extra_key).collect()),
        Value::Object(obj) => ExtraKey::Bytes(unhex(&obj["bin_hex"]).into()),
        Value::Bool(_) => panic!("bool extra key in vectors"),
    }
}

fn json_extra_keys(v: Option<&Value>) -> ExtraKeys {
    let Some(Value::Array(blocks)) = v else {
        return ExtraKeys::Absent;
    };
    if blocks.iter().all(Value::is_null) {
        return ExtraKeys::Plain;
    }
    ExtraKeys::PerBlock(
        blocks
            .iter()
            .map(|block| match block {
                Value::Null => None,
                Value::Array(keys) => Some(keys.iter().map(json_extra_key).collect()),
                other => panic!("extra key entry {other}"),
            })
            .collect(),
    )
}

/// One event of the generic decode as (tag, field name → value), for both forms.
fn named_fields(event: &Value, classes: &Value) -> (String, Map<String, Value>) {
    match event {
        Value::Array(items) => {
            let tag = items[0].as_str().expect("tag").to_owned();
            let names = classes[tag.as_str()].as_array().expect("class fields");
            assert_eq!(names.len() + 1, items.len(), "array event length");
            let fields = names
                .iter()
                .zip(&items[1..])
                .map(|(name, v)| (name.as_str().expect("name").to_owned(), v.clone()))
                .collect();
            (tag, fields)
        }
        Value::Object(map) => {
            let tag = map["type"].as_str().expect("tag").to_owned();
            let mut fields = map.clone();
            fields.remove("type");
            (tag, fields)
        }
        other => panic!("event {other}"),
    }
}

fn json_medium(fields: &Map<String, Value>) -> Medium {
    match fields.get("medium").and_then(Value::as_str) {
        None | Some("GPU") => Medium::Gpu,
        Some("CPU") => Medium::Cpu,
        Some(other) => Medium::Other(other.into()),
    }
}

fn json_hashes(fields: &Map<String, Value>) -> Vec<JsonHash> {
    fields["block_hashes"]
        .as_array()
        .expect("block_hashes")
        .iter()
        .map(JsonHash::parse)
        .collect()
}

fn opt<'v, T>(
    fields: &'v Map<String, Value>,
    name: &str,
    get: impl Fn(&'v Value) -> Option<T>,
) -> Option<T> {
    fields
        .get(name)
        .filter(|v| !v.is_null())
        .map(|v| get(v).expect(name))
}

fn json_tokens(fields: &Map<String, Value>) -> Vec<u32> {
    fields["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|t| u32::try_from(t.as_u64().expect("token")).expect("u32 token"))
        .collect()
}

/// What the codec must decode the captured event to.
fn expected_event(event: &Value, classes: &Value) -> KvEvent {
    let (tag, fields) = named_fields(event, classes);
    let group_idx = opt(&fields, "group_idx", |v| v.as_u64().map(|g| g as u32));
    match tag.as_str() {
        "BlockStored" => KvEvent::Stored(BlockStored {
            block_hashes: json_hashes(&fields).iter().map(JsonHash::key).collect(),
            parent_block_hash: opt(&fields, "parent_block_hash", |v| {
                Some(JsonHash::parse(v).key())
            }),
            token_ids: json_tokens(&fields),
            block_size: fields["block_size"].as_u64().expect("block_size") as u32,
            lora_id: opt(&fields, "lora_id", Value::as_i64),
            lora_name: opt(&fields, "lora_name", |v| v.as_str().map(str::to_owned)),
            medium: json_medium(&fields),
            extra_keys: json_extra_keys(fields.get("extra_keys")),
            group_idx,
        }),
        "BlockRemoved" => KvEvent::Removed(BlockRemoved {
            block_hashes: json_hashes(&fields).iter().map(JsonHash::key).collect(),
            medium: json_medium(&fields),
            group_idx,
        }),
        "AllBlocksCleared" => KvEvent::AllCleared,
        other => panic!("tag {other}"),
    }
}

fn expected_batch(decoded: &Value, classes: &Value) -> EventBatch {
    EventBatch {
        ts: decoded[0].as_f64().expect("ts"),
        events: decoded[1]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| expected_event(e, classes))
            .collect(),
        dp_rank: Some(decoded[2].as_u64().expect("rank") as u32),
        dropped: Vec::new(),
    }
}

#[test]
fn every_pub_frame_decodes_to_the_captured_content() {
    let mut checked = 0;
    let mut block_events = 0;
    for format in formats() {
        let classes = &format["event_classes"];
        for frame in format["pub_frames"].as_array().expect("pub_frames") {
            let frames: Vec<Vec<u8>> = frame["frames_hex"]
                .as_array()
                .expect("frames")
                .iter()
                .map(unhex)
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let message = parse_pub_frames(&refs).expect("pub frames");
            let topic = frame["topic"].as_str().expect("topic");
            assert_eq!(message.topic, topic.as_bytes());
            assert_eq!(message.seq, frame["seq"].as_u64().expect("seq"));
            assert_eq!(parse_topic(topic), Some(("10.0.0.5", "Qwen3-32B")));

            let batch = decode_batch(message.payload).expect("payload decodes");
            assert_eq!(
                batch,
                expected_batch(&frame["decoded"], classes),
                "{:?} seq {}",
                format["versions"],
                message.seq
            );
            block_events += batch
                .events
                .iter()
                .map(|e| match e {
                    KvEvent::Stored(s) => s.block_hashes.len(),
                    KvEvent::Removed(r) => r.block_hashes.len(),
                    KvEvent::AllCleared => 1,
                })
                .sum::<usize>();
            checked += 1;
        }
    }
    assert_eq!(checked, 75);
    println!("decoded {checked} captured payloads ({block_events} block events) exactly");
}

#[test]
fn every_replay_exchange_parses_to_the_published_batches() {
    let mut replies = 0;
    for format in formats() {
        let replay = &format["replay"];
        let start = replay["request_start_seq"].as_u64().expect("start");
        let sent: Vec<Vec<u8>> = replay["request_frames_sent_by_DEALER_hex"]
            .as_array()
            .expect("request")
            .iter()
            .map(unhex)
            .collect();
        assert_eq!(replay_request(start).to_vec(), sent);

        let published: Vec<(u64, Vec<u8>, String)> = format["pub_frames"]
            .as_array()
            .expect("pub_frames")
            .iter()
            .map(|f| {
                (
                    f["seq"].as_u64().expect("seq"),
                    unhex(&f["payload_hex"]),
                    f["topic"].as_str().expect("topic").to_owned(),
                )
            })
            .collect();
        let messages = replay["frames_received_by_DEALER_hex"]
            .as_array()
            .expect("received");
        let newest_release = *releases(format).last().expect("release");
        let mut next = start;
        for (i, message) in messages.iter().enumerate() {
            let frames: Vec<Vec<u8>> = message
                .as_array()
                .expect("frames")
                .iter()
                .map(unhex)
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            match parse_replay_frames(&refs).expect("replay frames") {
                ReplayFrame::Batch {
                    topic,
                    seq,
                    payload,
                } => {
                    assert_eq!(seq, next, "replayed batches are contiguous");
                    let (_, bytes, pub_topic) = published
                        .iter()
                        .find(|(s, _, _)| *s == seq)
                        .expect("replayed seq was published");
                    assert_eq!(payload, bytes.as_slice());
                    let with_topic = newest_release >= VllmRelease::new(0, 26, 0);
                    assert_eq!(topic, with_topic.then_some(pub_topic.as_bytes()));
                    decode_batch(payload).expect("replayed payload decodes");
                    next += 1;
                }
                ReplayFrame::End => assert_eq!(i, messages.len() - 1, "end marker comes last"),
            }
            replies += 1;
        }
        assert_eq!(next, 3, "replay returned seq 1 and 2");
    }
    println!("parsed {replies} replay messages");
}

/// Owned inputs for an [`OutEvent`] built from the generic decode.
struct OwnedOutEvent {
    tag: String,
    fields: Map<String, Value>,
    hashes: Vec<JsonHash>,
    parent: Option<JsonHash>,
    tokens: Vec<u32>,
    extra_keys: ExtraKeys,
}

impl OwnedOutEvent {
    fn new(event: &Value, classes: &Value) -> Self {
        let (tag, fields) = named_fields(event, classes);
        let is_stored = tag == "BlockStored";
        Self {
            hashes: if tag == "AllBlocksCleared" {
                Vec::new()
            } else {
                json_hashes(&fields)
            },
            parent: is_stored
                .then(|| opt(&fields, "parent_block_hash", |v| Some(JsonHash::parse(v))))
                .flatten(),
            tokens: if is_stored {
                json_tokens(&fields)
            } else {
                Vec::new()
            },
            extra_keys: json_extra_keys(fields.get("extra_keys")),
            tag,
            fields,
        }
    }

    fn out_event<'a>(&'a self, wire: &'a [WireHash<'a>]) -> OutEvent<'a> {
        // Releases before 0.10.2 publish no medium; their pool is the GPU one.
        let medium = self
            .fields
            .get("medium")
            .and_then(Value::as_str)
            .unwrap_or("GPU");
        match self.tag.as_str() {
            "BlockStored" => OutEvent::Stored {
                block_hashes: wire,
                parent: self.parent.as_ref().map(JsonHash::wire),
                token_ids: &self.tokens,
                block_size: self.fields["block_size"].as_u64().expect("block_size") as u32,
                lora_id: opt(&self.fields, "lora_id", Value::as_i64),
                lora_name: opt(&self.fields, "lora_name", Value::as_str),
                medium,
                extra_keys: &self.extra_keys,
            },
            "BlockRemoved" => OutEvent::Removed {
                block_hashes: wire,
                medium,
            },
            _ => OutEvent::AllCleared,
        }
    }
}

fn encode_like_vllm(encoder: &EventEncoder, decoded: &Value, classes: &Value) -> Vec<u8> {
    let owned: Vec<OwnedOutEvent> = decoded[1]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| OwnedOutEvent::new(e, classes))
        .collect();
    let wire: Vec<Vec<WireHash<'_>>> = owned
        .iter()
        .map(|o| o.hashes.iter().map(JsonHash::wire).collect())
        .collect();
    let events: Vec<OutEvent<'_>> = owned
        .iter()
        .zip(&wire)
        .map(|(o, w)| o.out_event(w))
        .collect();
    let mut out = Vec::new();
    encoder.encode_batch(
        decoded[0].as_f64().expect("ts"),
        &events,
        decoded[2].as_u64().expect("rank") as u32,
        &mut out,
    );
    out
}

#[test]
fn encoder_reproduces_every_release_byte_for_byte() {
    let (mut payloads, mut identical) = (0, 0);
    let mut frames_identical = 0;
    for format in formats() {
        let classes = &format["event_classes"];
        let pub_frames = format["pub_frames"].as_array().expect("pub_frames");
        for release in releases(format) {
            let encoder = EventEncoder::new(release);
            for frame in pub_frames {
                let expected = unhex(&frame["payload_hex"]);
                let encoded = encode_like_vllm(&encoder, &frame["decoded"], classes);
                payloads += 1;
                if encoded == expected {
                    identical += 1;
                } else {
                    eprintln!(
                        "{release} seq {}:\n  vllm   {}\n  kvgate {}",
                        frame["seq"],
                        hex::encode(&expected),
                        hex::encode(&encoded)
                    );
                }
                let topic = bytes::Bytes::from(frame["topic"].as_str().expect("topic").to_owned());
                let seq = frame["seq"].as_u64().expect("seq");
                let sent = encoder.pub_frames(topic, seq, encoded.into());
                let captured: Vec<Vec<u8>> = frame["frames_hex"]
                    .as_array()
                    .expect("frames")
                    .iter()
                    .map(unhex)
                    .collect();
                assert_eq!(sent, captured, "{release} pub frames");
            }

            let received = format["replay"]["frames_received_by_DEALER_hex"]
                .as_array()
                .expect("replay");
            for (message, frame) in received.iter().zip(&pub_frames[1..]) {
                let captured: Vec<Vec<u8>> = message
                    .as_array()
                    .expect("frames")
                    .iter()
                    .map(unhex)
                    .collect();
                let topic = bytes::Bytes::from(frame["topic"].as_str().expect("topic").to_owned());
                let replayed = encoder.replay_batch_frames(
                    topic,
                    frame["seq"].as_u64().expect("seq"),
                    unhex(&frame["payload_hex"]).into(),
                );
                assert_eq!(replayed, captured, "{release} replay batch frames");
                frames_identical += 1;
            }
            let end: Vec<Vec<u8>> = received
                .last()
                .expect("end marker")
                .as_array()
                .expect("frames")
                .iter()
                .map(unhex)
                .collect();
            assert_eq!(encoder.replay_end_frames(), end, "{release} replay end");
        }
    }
    println!(
        "encoded {identical}/{payloads} payloads identical (every release, int and bytes hashes); \
         {frames_identical} replay batch messages and every end marker identical"
    );
    assert_eq!(identical, payloads);
}

#[test]
fn every_truncation_of_a_real_payload_is_an_error() {
    let mut cuts = 0;
    for payload in real_payloads() {
        for len in 0..payload.len() {
            assert!(
                decode_batch(&payload[..len]).is_err(),
                "prefix of {len} bytes"
            );
            cuts += 1;
        }
    }
    println!("{cuts} truncations rejected");
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

/// Cases per byte-level property; structured ones (random msgpack trees,
/// generated events) cost more to generate and run a quarter as many.
const BYTE_CASES: u32 = 20_000;
const STRUCTURED_CASES: u32 = BYTE_CASES / 4;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn arb_msgpack() -> impl Strategy<Value = Msgpack> {
    let leaf = prop_oneof![
        Just(Msgpack::Nil),
        any::<bool>().prop_map(Msgpack::Boolean),
        any::<u64>().prop_map(Msgpack::from),
        any::<i64>().prop_map(Msgpack::from),
        (0u64..300).prop_map(Msgpack::from),
        any::<f64>().prop_map(Msgpack::F64),
        any::<f32>().prop_map(Msgpack::F32),
        prop_oneof![
            Just("BlockStored".to_owned()),
            Just("BlockRemoved".to_owned()),
            Just("AllBlocksCleared".to_owned()),
            Just("type".to_owned()),
            Just("block_hashes".to_owned()),
            Just("token_ids".to_owned()),
            Just("GPU".to_owned()),
            ".{0,40}",
        ]
        .prop_map(Msgpack::from),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Msgpack::Binary),
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(tag, data)| Msgpack::Ext(tag, data)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Msgpack::Array),
            proptest::collection::vec((inner.clone(), inner), 0..6).prop_map(Msgpack::Map),
        ]
    })
}

fn to_msgpack(value: &Msgpack) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).expect("encode to Vec");
    out
}

/// Parses with rmpv, an independent decoder; `None` unless the whole input is
/// exactly one msgpack value.
fn rmpv_exact(bytes: &[u8]) -> Option<Msgpack> {
    let mut cursor = bytes;
    let value = rmpv::decode::read_value(&mut cursor).ok()?;
    cursor.is_empty().then_some(value)
}

/// Whether a value has the `[ts, events, data_parallel_rank]` shape that must
/// decode (events themselves may still be dropped).
fn is_batch_shaped(value: &Msgpack) -> bool {
    let Msgpack::Array(items) = value else {
        return false;
    };
    let ts_ok = matches!(
        items.first(),
        Some(Msgpack::F64(_) | Msgpack::F32(_) | Msgpack::Integer(_))
    );
    let events_ok = matches!(items.get(1), Some(Msgpack::Array(_)));
    let rank_ok = match items.get(2) {
        None | Some(Msgpack::Nil) => true,
        Some(v) => v.as_u64().is_some_and(|r| r <= u64::from(u32::MAX)),
    };
    items.len() >= 2 && ts_ok && events_ok && rank_ok
}

/// rmpv reads the never-used marker 0xc1 as nil; msgpack (and msgspec)
/// reject it, and so does kvgate.
fn rejects_reserved_marker(error: &DecodeError) -> bool {
    let (DecodeError::Batch { source, .. } | DecodeError::EventExtent { source, .. }) = error
    else {
        return false;
    };
    matches!(source, WireError::Type { found, .. } if *found == "reserved byte 0xc1")
}

/// Our decode agrees with rmpv on the payload's structure.
fn check_against_rmpv(payload: &[u8]) -> Result<(), TestCaseError> {
    let ours = decode_batch(payload);
    let theirs = rmpv_exact(payload);
    if let Ok(batch) = &ours {
        let value = theirs
            .as_ref()
            .expect("a payload we accept is valid msgpack");
        let events = value[1].as_array().expect("events array");
        prop_assert_eq!(batch.events.len() + batch.dropped.len(), events.len());
        prop_assert!(batch.dropped.iter().all(|d| d.index < events.len()));
    } else if let (Err(error), Some(value)) = (&ours, &theirs) {
        prop_assert!(
            !is_batch_shaped(value) || rejects_reserved_marker(error),
            "rejected a batch-shaped payload: {:?}",
            error
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(BYTE_CASES))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                splits in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
                                text in ".{0,60}") {
        check_against_rmpv(&bytes)?;
        let mut cuts: Vec<usize> = splits.iter().map(|i| i.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut frames = Vec::new();
        let mut from = 0;
        for cut in cuts {
            frames.push(&bytes[from..cut]);
            from = cut;
        }
        frames.push(&bytes[from..]);
        let _ = parse_pub_frames(&frames);
        let _ = parse_replay_frames(&frames);
        if let Some((pod, model)) = parse_topic(&text) {
            prop_assert!(!pod.contains('@') && !pod.is_empty() && !model.is_empty());
        }
    }

    #[test]
    fn bit_flips_of_real_payloads_never_panic(which in any::<prop::sample::Index>(),
                                              flips in proptest::collection::vec(any::<(prop::sample::Index, u8)>(), 1..5)) {
        let mut payload = which.get(real_payloads()).clone();
        for (at, bit) in flips {
            let i = at.index(payload.len());
            payload[i] ^= 1 << (bit % 8);
        }
        check_against_rmpv(&payload)?;
    }

}

proptest! {
    #![proptest_config(config(STRUCTURED_CASES))]

    #[test]
    fn well_formed_random_msgpack_never_panics(value in arb_msgpack(), ts in any::<f64>()) {
        check_against_rmpv(&to_msgpack(&value))?;
        let as_events = match value {
            Msgpack::Array(items) => items,
            other => vec![other],
        };
        let batch = Msgpack::Array(vec![Msgpack::F64(ts), Msgpack::Array(as_events), Msgpack::from(0)]);
        let payload = to_msgpack(&batch);
        check_against_rmpv(&payload)?;
        prop_assert!(decode_batch(&payload).is_ok());
    }

    #[test]
    fn one_corrupted_event_leaves_the_others_intact(which in any::<prop::sample::Index>(),
                                                    victim in any::<prop::sample::Index>(),
                                                    slot in any::<prop::sample::Index>(),
                                                    mutation in 0u8..4,
                                                    junk in arb_msgpack()) {
        let original = which.get(real_payloads());
        let clean = decode_batch(original).expect("real payload");
        let Some(Msgpack::Array(mut batch)) = rmpv_exact(original) else { panic!("real payload") };
        let Msgpack::Array(events) = &mut batch[1] else { panic!("events") };
        let victim = victim.index(events.len());
        let event = &mut events[victim];
        match (mutation, event) {
            (0, event) => *event = junk,
            (1, Msgpack::Array(fields)) => { let i = slot.index(fields.len()); fields[i] = junk; }
            (1, Msgpack::Map(entries)) => { let i = slot.index(entries.len()); entries[i].1 = junk; }
            (2, Msgpack::Array(fields)) => fields.push(junk),
            (2, Msgpack::Map(entries)) => { let i = slot.index(entries.len()); entries[i].0 = junk; }
            (_, Msgpack::Array(fields)) => { fields.pop(); }
            (_, Msgpack::Map(entries)) => { let i = slot.index(entries.len()); entries.remove(i); }
            (_, event) => *event = junk,
        }
        let corrupted = decode_batch(&to_msgpack(&Msgpack::Array(batch))).expect("structure intact");
        prop_assert_eq!(corrupted.events.len() + corrupted.dropped.len(), clean.events.len());
        let mut kept = corrupted.events.iter();
        for (i, event) in clean.events.iter().enumerate() {
            if i == victim {
                if corrupted.dropped.is_empty() {
                    kept.next();
                } else {
                    prop_assert_eq!(corrupted.dropped[0].index, victim);
                }
            } else {
                prop_assert_eq!(kept.next(), Some(event));
            }
        }
    }
}

// Round trip: whatever the encoder writes for a release decodes to the event,
// less the fields that release does not publish.

#[derive(Clone, Debug)]
enum GenEvent {
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        tokens: Vec<u32>,
        block_size: u32,
        lora_id: Option<i64>,
        lora_name: Option<String>,
        medium: String,
        extra_keys: ExtraKeys,
    },
    Removed {
        hashes: Vec<u64>,
        medium: String,
    },
    AllCleared,
}

fn arb_extra_key() -> impl Strategy<Value = ExtraKey> {
    let leaf = prop_oneof![
        Just(ExtraKey::Nil),
        (i64::MIN..0).prop_map(ExtraKey::Int),
        any::<u64>().prop_map(ExtraKey::UInt),
        ".{0,40}".prop_map(|s| ExtraKey::Str(s.into())),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| ExtraKey::Bytes(b.into())),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        proptest::collection::vec(inner, 0..4).prop_map(|t| ExtraKey::Tuple(t.into()))
    })
}

fn arb_extra_keys() -> impl Strategy<Value = ExtraKeys> {
    prop_oneof![
        Just(ExtraKeys::Absent),
        Just(ExtraKeys::Plain),
        proptest::collection::vec(
            proptest::option::of(
                proptest::collection::vec(arb_extra_key(), 0..4).prop_map(Vec::into_boxed_slice)
            ),
            0..4
        )
        .prop_map(ExtraKeys::PerBlock),
    ]
}

fn arb_medium() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GPU".to_owned()),
        Just("CPU".to_owned()),
        Just("STORAGE".to_owned()),
        ".{0,40}"
    ]
}

fn arb_event() -> impl Strategy<Value = GenEvent> {
    prop_oneof![
        (
            proptest::collection::vec(any::<u64>(), 0..20),
            proptest::option::of(any::<u64>()),
            proptest::collection::vec(any::<u32>(), 0..80),
            any::<u32>(),
            proptest::option::of(any::<i64>()),
            proptest::option::of(".{0,40}"),
            arb_medium(),
            arb_extra_keys(),
        )
            .prop_map(
                |(hashes, parent, tokens, block_size, lora_id, lora_name, medium, extra_keys)| {
                    GenEvent::Stored {
                        hashes,
                        parent,
                        tokens,
                        block_size,
                        lora_id,
                        lora_name,
                        medium,
                        extra_keys,
                    }
                }
            ),
        (proptest::collection::vec(any::<u64>(), 0..3), arb_medium())
            .prop_map(|(hashes, medium)| GenEvent::Removed { hashes, medium }),
        Just(GenEvent::AllCleared),
    ]
}

fn arb_release() -> impl Strategy<Value = VllmRelease> {
    let known: Vec<VllmRelease> = vectors()["provenance"]["versions_tested"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v.as_str().expect("version").parse().expect("release"))
        .collect();
    proptest::sample::select(known)
}

fn medium_of(name: &str) -> Medium {
    match name {
        "GPU" => Medium::Gpu,
        "CPU" => Medium::Cpu,
        other => Medium::Other(other.into()),
    }
}

fn expected_round_trip(event: &GenEvent, release: VllmRelease) -> KvEvent {
    let since = |minor| release >= VllmRelease::new(0, minor, 0);
    let medium = |name: &str| {
        if release >= VllmRelease::new(0, 10, 2) {
            medium_of(name)
        } else {
            Medium::Gpu
        }
    };
    let group_idx = since(20).then_some(0);
    match event {
        GenEvent::Stored {
            hashes,
            parent,
            tokens,
            block_size,
            lora_id,
            lora_name,
            medium: m,
            extra_keys,
        } => KvEvent::Stored(BlockStored {
            block_hashes: hashes.clone(),
            parent_block_hash: *parent,
            token_ids: tokens.clone(),
            block_size: *block_size,
            lora_id: *lora_id,
            lora_name: lora_name.clone().filter(|_| since(14)),
            medium: medium(m),
            extra_keys: match extra_keys {
                _ if !since(17) => ExtraKeys::Absent,
                ExtraKeys::PerBlock(blocks) if blocks.iter().all(Option::is_none) => {
                    ExtraKeys::Plain
                }
                other => other.clone(),
            },
            group_idx,
        }),
        GenEvent::Removed { hashes, medium: m } => KvEvent::Removed(BlockRemoved {
            block_hashes: hashes.clone(),
            medium: medium(m),
            group_idx,
        }),
        GenEvent::AllCleared => KvEvent::AllCleared,
    }
}

proptest! {
    #![proptest_config(config(STRUCTURED_CASES))]

    #[test]
    fn encoded_events_decode_back(release in arb_release(),
                                  events in proptest::collection::vec(arb_event(), 0..20),
                                  ts in any::<f64>(),
                                  rank in any::<u32>()) {
        let wire: Vec<Vec<WireHash<'_>>> = events
            .iter()
            .map(|e| match e {
                GenEvent::Stored { hashes, .. } | GenEvent::Removed { hashes, .. } => {
                    hashes.iter().map(|&h| WireHash::Int(h)).collect()
                }
                GenEvent::AllCleared => Vec::new(),
            })
            .collect();
        let out: Vec<OutEvent<'_>> = events
            .iter()
            .zip(&wire)
            .map(|(e, w)| match e {
                GenEvent::Stored { parent, tokens, block_size, lora_id, lora_name, medium, extra_keys, .. } => {
                    OutEvent::Stored {
                        block_hashes: w,
                        parent: parent.map(WireHash::Int),
                        token_ids: tokens,
                        block_size: *block_size,
                        lora_id: *lora_id,
                        lora_name: lora_name.as_deref(),
                        medium,
                        extra_keys,
                    }
                }
                GenEvent::Removed { medium, .. } => OutEvent::Removed { block_hashes: w, medium },
                GenEvent::AllCleared => OutEvent::AllCleared,
            })
            .collect();
        let mut payload = Vec::new();
        EventEncoder::new(release).encode_batch(ts, &out, rank, &mut payload);
        let batch = decode_batch(&payload).expect("own encoding decodes");
        let expected: Vec<KvEvent> = events.iter().map(|e| expected_round_trip(e, release)).collect();
        prop_assert!(batch.dropped.is_empty(), "{:?}", batch.dropped);
        prop_assert_eq!(batch.events, expected);
        prop_assert_eq!(batch.ts.to_bits(), ts.to_bits());
        prop_assert_eq!(batch.dp_rank, Some(rank));
    }
}
