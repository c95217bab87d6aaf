//! Decode throughput of vLLM KV-event payloads, in block events (block hashes
//! stored or removed) per second on one core, against a generic msgpack tree
//! decode (rmpv) of the same bytes measured in the same run.
//!
//! `cargo bench --bench event_decode`

#[path = "support/smoke.rs"]
mod smoke;

use std::hint::black_box;
use std::time::{Duration, Instant};

use kvgate::events::{
    decode_batch, decode_batch_into, EventBatch, EventEncoder, ExtraKeys, OutEvent, WireHash,
};
use kvgate::vllm::VllmRelease;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCKS_PER_STORE: usize = 16;
const BLOCK_SIZE: usize = 64;
const STORES_PER_BATCH: usize = 8;
const REMOVES_PER_BATCH: usize = 64;
/// Qwen3's vocabulary size: token ids spread over the 1-, 3- and 5-byte
/// msgpack int forms as real prompts do.
const VOCAB: u32 = 151_936;
/// How long each rate is measured.
fn run_for() -> Duration {
    smoke::size(Duration::from_millis(700), Duration::from_millis(20))
}

struct Case {
    name: String,
    payload: Vec<u8>,
    block_events: usize,
}

fn stored_batch(release: VllmRelease, digests: bool, rng: &mut StdRng) -> Case {
    let digest_bytes: Vec<[u8; 32]> = (0..STORES_PER_BATCH * BLOCKS_PER_STORE)
        .map(|_| rng.random())
        .collect();
    let ints: Vec<u64> = (0..STORES_PER_BATCH * BLOCKS_PER_STORE)
        .map(|_| rng.random())
        .collect();
    let hashes: Vec<WireHash<'_>> = if digests {
        digest_bytes.iter().map(|d| WireHash::Bytes(d)).collect()
    } else {
        ints.iter().map(|&h| WireHash::Int(h)).collect()
    };
    let tokens: Vec<u32> = (0..STORES_PER_BATCH * BLOCKS_PER_STORE * BLOCK_SIZE)
        .map(|_| rng.random_range(0..VOCAB))
        .collect();
    let plain = ExtraKeys::Plain;
    let events: Vec<OutEvent<'_>> = hashes
        .chunks(BLOCKS_PER_STORE)
        .zip(tokens.chunks(BLOCKS_PER_STORE * BLOCK_SIZE))
        .enumerate()
        .map(|(i, (block_hashes, token_ids))| OutEvent::Stored {
            block_hashes,
            parent: (i > 0).then(|| hashes[i * BLOCKS_PER_STORE - 1]),
            token_ids,
            block_size: BLOCK_SIZE as u32,
            lora_id: None,
            lora_name: None,
            medium: "GPU",
            extra_keys: &plain,
        })
        .collect();
    let mut payload = Vec::new();
    EventEncoder::new(release).encode_batch(1_754_006_400.5, &events, 0, &mut payload);
    Case {
        name: format!(
            "{release} BlockStored {STORES_PER_BATCH}×({BLOCKS_PER_STORE} {} hashes, {} tokens)",
            if digests { "32-byte" } else { "u64" },
            BLOCKS_PER_STORE * BLOCK_SIZE
        ),
        payload,
        block_events: STORES_PER_BATCH * BLOCKS_PER_STORE,
    }
}

fn removed_batch(release: VllmRelease, rng: &mut StdRng) -> Case {
    let hashes: Vec<WireHash<'_>> = (0..REMOVES_PER_BATCH)
        .map(|_| WireHash::Int(rng.random()))
        .collect();
    let events: Vec<OutEvent<'_>> = hashes
        .chunks(1)
        .map(|block_hashes| OutEvent::Removed {
            block_hashes,
            medium: "GPU",
        })
        .collect();
    let mut payload = Vec::new();
    EventEncoder::new(release).encode_batch(1_754_006_400.5, &events, 0, &mut payload);
    Case {
        name: format!("{release} BlockRemoved ×{REMOVES_PER_BATCH}"),
        payload,
        block_events: REMOVES_PER_BATCH,
    }
}

/// Runs `decode` over and over for `run_for()`; returns batches per second.
fn batches_per_second(mut decode: impl FnMut()) -> f64 {
    for _ in 0..100 {
        decode();
    }
    let start = Instant::now();
    let mut batches = 0u64;
    while start.elapsed() < run_for() {
        for _ in 0..64 {
            decode();
        }
        batches += 64;
    }
    batches as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mut rng = StdRng::seed_from_u64(0x6b76_6761_7465);
    let array_form = VllmRelease::new(0, 23, 0);
    let map_form = VllmRelease::new(0, 33, 0);
    let cases = [
        stored_batch(map_form, false, &mut rng),
        stored_batch(array_form, false, &mut rng),
        stored_batch(map_form, true, &mut rng),
        removed_batch(map_form, &mut rng),
        removed_batch(array_form, &mut rng),
    ];

    println!("event decode, one core, block events (hashes stored or removed) per second");
    for case in &cases {
        let reference = decode_batch(&case.payload).expect("bench payload decodes");
        assert!(reference.dropped.is_empty());

        let mut reused = EventBatch::default();
        let into = batches_per_second(|| {
            decode_batch_into(black_box(&case.payload), &mut reused).expect("decodes");
            black_box(&reused);
        });
        let fresh = batches_per_second(|| {
            black_box(decode_batch(black_box(&case.payload)).expect("decodes"));
        });
        let tree = batches_per_second(|| {
            let mut bytes = black_box(case.payload.as_slice());
            black_box(rmpv::decode::read_value(&mut bytes).expect("decodes"));
        });
        for (name, rate) in [("reused", into), ("fresh", fresh), ("rmpv", tree)] {
            smoke::figure(name, rate);
        }
        let per_s = |batches: f64| batches * case.block_events as f64 / 1e6;
        println!(
            "{} ({} bytes):\n  decode_batch_into (reused) {:7.2} M block events/s  {:8.0} batches/s  \
             {:5.2}× rmpv\n  decode_batch (fresh)       {:7.2} M block events/s  {:8.0} batches/s  \
             {:5.2}× rmpv\n  rmpv::read_value baseline  {:7.2} M block events/s  {:8.0} batches/s",
            case.name,
            case.payload.len(),
            per_s(into),
            into,
            into / tree,
            per_s(fresh),
            fresh,
            fresh / tree,
            per_s(tree),
            tree,
        );
    }
}
