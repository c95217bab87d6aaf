//! End-to-end ingest path on one core: ZeroMQ message → frames → batch decode →
//! sequence tracking → block index store/remove (+ hash-parity sampling), in
//! block events (hashes stored or removed) per second; against decode alone
//! and index updates alone, measured in the same run. Then the latency of
//! index lookups while another thread ingests at full speed, against the same
//! lookups on an idle index. Last, the relay of bind mode: one replica forwards every batch
//! to a peer replica over loopback TCP at 1 M block events/s; its lag and its CPU, against
//! the same paced stream with no peer and against what ingesting those events costs.
//!
//! The stream is a pod cache at capacity, as a busy fleet produces it: every
//! batch stores 8 runs of 16 fresh blocks (64 tokens each, real sha256_cbor
//! chains) and evicts 128 blocks stored 256 batches earlier, one BlockRemoved
//! per block as vLLM sends them.
//!
//! `cargo bench --bench ingest`

#[path = "support/smoke.rs"]
mod smoke;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvgate::config::{Config, EventsConfig, EventsMode};
use kvgate::discovery::PodEndpoint;
use kvgate::events::{
    decode_batch_into, EventBatch, EventEncoder, EventStats, ExtraKeys, IngestConfig, Ingestor,
    KvEvent, ModelEvents, Origin, OutEvent, WireHash,
};
use kvgate::hash::{BlockHash, BlockHasher, ExtraKeys as HashExtraKeys};
use kvgate::index::{BlockIndex, IndexConfig, IndexTargets, PrefixMatch, Tier};
use kvgate::pods::PodRegistry;
use kvgate::relay::{self, PeersConfig, RelayConfig, RelayHub, RelaySecret, Relayed};
use kvgate::scope::scope_id;
use kvgate::vllm::VllmRelease;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zeromq::ZmqMessage;

const MODEL: &str = "Qwen3-32B";
const BLOCK_SIZE: usize = 64;
const RUNS_PER_BATCH: usize = 8;
const BLOCKS_PER_RUN: usize = 16;
const STORED_PER_BATCH: usize = RUNS_PER_BATCH * BLOCKS_PER_RUN;
const PODS: usize = 8;
const VOCAB: u32 = 151_936;

/// Batches a block stays cached: the steady state holds this × 128 blocks per pod.
fn residency() -> usize {
    smoke::size(256, 4)
}

/// Distinct batches per pod; the stream cycles through them.
fn cycle() -> usize {
    2 * residency()
}

/// How long each rate is measured.
fn run_for() -> Duration {
    smoke::size(Duration::from_millis(1_500), Duration::from_millis(20))
}
const LOOKUP_BLOCKS: usize = 32;

fn config(parity_sample: f64) -> Config {
    let yaml = format!(
        "events: {{mode: bind, replay: false, paritySample: {parity_sample}}}\nmodels:\n  - name: {MODEL}\n    \
         tokenizer: t.json\n    blockSize: {BLOCK_SIZE}\n    hashAlgo: sha256_cbor\n    hashSeed: \"42\"\n    \
         vllmRelease: \"0.26.0\"\n    discovery: {{static: {{pods: []}}}}\n"
    );
    Config::parse(&yaml).expect("bench config")
}

/// One pod's cyclic stream of payloads.
struct Stream {
    payloads: Vec<Bytes>,
}

fn stream(hasher: &BlockHasher, rng: &mut StdRng) -> Stream {
    let encoder = EventEncoder::new(VllmRelease::new(0, 26, 0));
    let plain = ExtraKeys::Plain;
    // Per batch, per run: tokens and block keys.
    let mut tokens: Vec<Vec<Vec<u32>>> = Vec::with_capacity(cycle());
    let mut keys: Vec<Vec<Vec<u64>>> = Vec::with_capacity(cycle());
    let mut chain: Vec<BlockHash> = Vec::new();
    for _ in 0..cycle() {
        let mut batch_tokens = Vec::with_capacity(RUNS_PER_BATCH);
        let mut batch_keys = Vec::with_capacity(RUNS_PER_BATCH);
        for _ in 0..RUNS_PER_BATCH {
            let run: Vec<u32> = (0..BLOCKS_PER_RUN * BLOCK_SIZE)
                .map(|_| rng.random_range(0..VOCAB))
                .collect();
            chain.clear();
            hasher.hash_prompt(&run, &HashExtraKeys::default(), &mut chain);
            batch_keys.push(chain.iter().map(|h| h.key).collect::<Vec<u64>>());
            batch_tokens.push(run);
        }
        tokens.push(batch_tokens);
        keys.push(batch_keys);
    }
    let mut payloads = Vec::with_capacity(cycle());
    let mut payload = Vec::new();
    for batch in 0..cycle() {
        let stored: Vec<Vec<WireHash<'_>>> = keys[batch]
            .iter()
            .map(|run| run.iter().map(|&k| WireHash::Int(k)).collect())
            .collect();
        // Evict what was stored residency() batches ago (in the previous lap for the first half).
        let evicted: Vec<WireHash<'_>> = keys[(batch + cycle() - residency()) % cycle()]
            .iter()
            .flatten()
            .map(|&k| WireHash::Int(k))
            .collect();
        let mut events: Vec<OutEvent<'_>> = stored
            .iter()
            .zip(&tokens[batch])
            .map(|(block_hashes, token_ids)| OutEvent::Stored {
                block_hashes,
                parent: None,
                token_ids,
                block_size: BLOCK_SIZE as u32,
                lora_id: None,
                lora_name: None,
                medium: "GPU",
                extra_keys: &plain,
            })
            .collect();
        events.extend(evicted.chunks(1).map(|block_hashes| OutEvent::Removed {
            block_hashes,
            medium: "GPU",
        }));
        encoder.encode_batch(1_754_006_400.0 + batch as f64, &events, 0, &mut payload);
        payloads.push(Bytes::copy_from_slice(&payload));
    }
    Stream { payloads }
}

struct Fleet {
    ingestor: Ingestor,
    index: Arc<BlockIndex>,
    topics: Vec<Bytes>,
    streams: Arc<Vec<Stream>>,
    seqs: Vec<u64>,
}

fn new_index() -> Arc<BlockIndex> {
    Arc::new(BlockIndex::new(IndexConfig {
        budget_bytes: 1 << 30,
        shards: 256,
    }))
}

fn fleet(parity_sample: f64, streams: Arc<Vec<Stream>>) -> Fleet {
    let cfg = config(parity_sample);
    let registry = Arc::new(PodRegistry::new([MODEL]));
    let endpoints: Vec<PodEndpoint> = (0..PODS)
        .map(|i| PodEndpoint {
            key: format!("pod-{i}"),
            name: format!("pod-{i}"),
            http: ([10, 0, 0, i as u8 + 1], 8000).into(),
            events: None,
            replay: None,
            topic_host: format!("10.0.0.{}", i + 1),
            role: Default::default(),
        })
        .collect();
    registry.apply_snapshot(MODEL, &endpoints);
    let index = new_index();
    let events = EventsConfig {
        mode: EventsMode::Bind,
        ..cfg.events.clone()
    };
    let mut ingestor = Ingestor::new(
        IngestConfig::from_events(&events),
        vec![ModelEvents::from_config(&cfg.models[0]).expect("model")],
        Arc::clone(&index),
        registry,
        Arc::new(EventStats::default()),
        Arc::new(IndexTargets::default()),
    );
    ingestor.sync_pods(Instant::now());
    Fleet {
        ingestor,
        index,
        topics: (0..PODS)
            .map(|i| Bytes::from(format!("kv@10.0.0.{}@{MODEL}", i + 1)))
            .collect(),
        streams,
        seqs: vec![0; PODS],
    }
}

impl Fleet {
    /// Feeds one batch to every pod; returns the block events fed.
    fn round(&mut self) -> usize {
        let now = Instant::now();
        for pod in 0..PODS {
            let seq = self.seqs[pod];
            self.seqs[pod] += 1;
            let payload = &self.streams[pod].payloads[seq as usize % cycle()];
            let mut message = ZmqMessage::from(self.topics[pod].clone());
            message.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
            message.push_back(payload.clone());
            self.ingestor.on_message(Origin::Bound, &message, now);
        }
        PODS * 2 * STORED_PER_BATCH
    }
}

/// Decode and index updates with nothing around them: the floor the ingest path is measured against.
struct Minimal {
    index: Arc<BlockIndex>,
    streams: Arc<Vec<Stream>>,
    batch: EventBatch,
    round: usize,
}

impl Minimal {
    fn round(&mut self) -> usize {
        let scope = scope_id(MODEL, None);
        for pod in 0..PODS {
            let payload = &self.streams[pod].payloads[self.round % cycle()];
            decode_batch_into(black_box(payload), &mut self.batch).expect("decodes");
            for event in &self.batch.events {
                match event {
                    KvEvent::Stored(s) => {
                        self.index
                            .store(pod as u32, scope, Tier::Gpu, &s.block_hashes)
                    }
                    KvEvent::Removed(r) => {
                        self.index
                            .remove(pod as u32, scope, Tier::Gpu, &r.block_hashes)
                    }
                    KvEvent::AllCleared => self.index.clear_pod(pod as u32),
                }
            }
        }
        self.round += 1;
        PODS * 2 * STORED_PER_BATCH
    }
}

fn rate(mut work: impl FnMut() -> usize) -> f64 {
    let start = Instant::now();
    let mut events = 0usize;
    while start.elapsed() < run_for() {
        events += work();
    }
    events as f64 / start.elapsed().as_secs_f64()
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99), at(0.999))
}

/// Prefixes the stream never touches, held by pods of their own: every lookup
/// matches 16 blocks of one of them, then misses.
fn hot_prefixes(index: &BlockIndex, rng: &mut StdRng) -> Vec<Vec<u64>> {
    let scope = scope_id(MODEL, None);
    (0..1024)
        .map(|i| {
            let run: Vec<u64> = (0..LOOKUP_BLOCKS).map(|_| rng.random()).collect();
            index.store(
                1_000 + (i % PODS) as u32,
                scope,
                Tier::Gpu,
                &run[..LOOKUP_BLOCKS / 2],
            );
            run
        })
        .collect()
}

fn lookup_latencies(index: &BlockIndex, prompts: &[Vec<u64>]) -> Vec<Duration> {
    let scope = scope_id(MODEL, None);
    let mut found = PrefixMatch::new();
    let mut samples = Vec::with_capacity(1 << 20);
    let mut i = 0usize;
    let start = Instant::now();
    while start.elapsed() < run_for() {
        let prompt = &prompts[i % prompts.len()];
        i += 1;
        let t = Instant::now();
        index.lookup(scope, black_box(prompt), &mut found);
        samples.push(t.elapsed());
        black_box(&found);
    }
    samples
}

/// Block events per second the relay is measured at (issue target: ≤ 10 % of a core there).
const RELAY_RATE: f64 = 1e6;

/// CPU time so far of the threads of this process named `name` (the scheduler's own
/// accounting, in ns).
fn threads_cpu(name: &str) -> Duration {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    Duration::from_nanos(
        tasks
            .filter_map(|task| {
                let dir = task.ok()?.path();
                let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                (comm.trim_end() == name)
                    .then(|| std::fs::read_to_string(dir.join("schedstat")).ok())?
            })
            .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
            .sum(),
    )
}

/// The pods' batches at `RELAY_RATE` for `run_for()`, round-robin over the pods, each handed
/// to `hub` as the ingest task hands it what a pod sent; returns how many were sent.
async fn paced_batches(streams: &[Stream], hub: &mut RelayHub) -> usize {
    let batches_per_sec = RELAY_RATE / (2 * STORED_PER_BATCH) as f64;
    let topics: Vec<Bytes> = (0..PODS)
        .map(|i| Bytes::from(format!("kv@10.0.0.{}@{MODEL}", i + 1)))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let start = Instant::now();
    let mut sent = 0usize;
    while start.elapsed() < run_for() {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * batches_per_sec) as usize;
        while sent < due {
            let pod = sent % PODS;
            let seq = (sent / PODS) as u64;
            let mut message = ZmqMessage::from(topics[pod].clone());
            message.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
            message.push_back(streams[pod].payloads[seq as usize % cycle()].clone());
            hub.forward(&message, relay::unix_ns());
            sent += 1;
        }
    }
    sent
}

/// The relay's threads: one replica's end on one core each.
const SENDER: &str = "relay-sender";
const RECEIVER: &str = "relay-receiver";
/// The thread that plays the ingest task, handing each pod's batch to the relay's hub.
const INGEST: &str = "relay-ingest";

fn one_core_runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Fractions of one core per second of wall time, per end of the relay.
struct RelayFigures {
    /// The sending replica: its relay tasks plus what handing batches to the hub added to
    /// the ingest thread (the paced stream with no peer subtracted).
    sender: f64,
    receiver: f64,
    lags: Vec<Duration>,
}

/// Two relay endpoints on loopback, each on a runtime of one thread as two replicas would
/// be, the receiver following the sender (as every replica follows every peer) and
/// authenticated as in production. The stream is paced, so the CPU measured is what
/// relaying that rate costs, not how fast it can go.
fn relay_run(streams: Arc<Vec<Stream>>) -> RelayFigures {
    let sending = one_core_runtime(SENDER);
    let receiving = one_core_runtime(RECEIVER);
    let secret_dir = tempfile::tempdir().expect("temporary directory");
    let secret_file = secret_dir.path().join("secret");
    std::fs::write(&secret_file, "relay-bench-secret-of-32-bytes..\n").expect("secret file");
    let secret = Arc::new(RelaySecret::read(&secret_file).expect("secret"));
    let (_shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let endpoint = |peers: Vec<String>| RelayConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        secret_file: secret_file.clone(),
        peers: PeersConfig::Static(peers),
    };
    let mut home = sending
        .block_on(relay::start(
            &endpoint(Vec::new()),
            Arc::clone(&secret),
            shutdown_rx.clone(),
        ))
        .expect("sending replica's relay");
    let follower = receiving
        .block_on(relay::start(
            &endpoint(vec![home.bound.to_string()]),
            secret,
            shutdown_rx,
        ))
        .expect("receiving replica's relay");
    let join = sending
        .block_on(home.joins.recv())
        .expect("the receiver joins");

    // The ingest thread is a thread of its own, named so its CPU can be read.
    let ingest = std::thread::Builder::new().name(INGEST.into());
    let sender_rt = sending.handle().clone();
    let (total_tx, total) = tokio::sync::oneshot::channel::<usize>();
    let receiver = receiving.spawn(receive_lags(follower, total));
    let cpu = [threads_cpu(SENDER), threads_cpu(RECEIVER)];
    let start = Instant::now();
    let producer = ingest
        .spawn(move || {
            sender_rt.block_on(async {
                let alone = threads_cpu(INGEST);
                paced_batches(&streams, &mut RelayHub::default()).await;
                let alone = threads_cpu(INGEST) - alone;
                let mut hub = RelayHub::default();
                hub.join(join, Vec::new());
                let relayed = threads_cpu(INGEST);
                let sent = paced_batches(&streams, &mut hub).await;
                let _ = total_tx.send(sent);
                // Both runs last run_for(): the difference is what the hub costs.
                (threads_cpu(INGEST) - relayed).saturating_sub(alone)
            })
        })
        .expect("ingest thread");
    let hub_cost = producer.join().expect("ingest thread");
    let lags = receiving.block_on(receiver).expect("receiver");
    let wall = start.elapsed().as_secs_f64() - run_for().as_secs_f64();
    let share = |cpu: Duration| cpu.as_secs_f64() / wall;
    RelayFigures {
        sender: share(threads_cpu(SENDER) - cpu[0] + hub_cost),
        receiver: share(threads_cpu(RECEIVER) - cpu[1]),
        lags,
    }
}

/// The lag of every batch the follower receives, until it has received as many as were
/// sent (known once the sender is done).
async fn receive_lags(
    mut follower: relay::RelayTasks,
    mut total: tokio::sync::oneshot::Receiver<usize>,
) -> Vec<Duration> {
    let mut lags = Vec::with_capacity(1 << 16);
    let mut expected = None;
    let deadline = tokio::time::sleep(run_for() + Duration::from_secs(30));
    tokio::pin!(deadline);
    while expected.is_none_or(|n| lags.len() < n) {
        tokio::select! {
            sent = &mut total, if expected.is_none() => expected = Some(sent.expect("sender")),
            item = follower.inbound.recv() => match item {
                Some(Relayed::Batch { received_at_ns, .. }) => lags.push(Duration::from_nanos(
                    relay::unix_ns().saturating_sub(received_at_ns),
                )),
                Some(Relayed::Snapshot(_)) => {}
                None => break,
            },
            () = &mut deadline => panic!("relayed batches missing: {} of {expected:?} arrived", lags.len()),
        }
    }
    lags
}

fn main() {
    let settings = config(0.0).models[0].hash_settings();
    let hasher = BlockHasher::new(&settings).expect("hasher");
    let mut rng = StdRng::seed_from_u64(0x6b76_6761_7465);
    let streams: Arc<Vec<Stream>> =
        Arc::new((0..PODS).map(|_| stream(&hasher, &mut rng)).collect());
    let payload_bytes: usize = streams[0].payloads.iter().map(Bytes::len).sum::<usize>() / cycle();
    println!(
        "ingest path, one core: {PODS} pods, batches of {STORED_PER_BATCH} stored ({RUNS_PER_BATCH} runs × \
         {BLOCKS_PER_RUN} blocks × {BLOCK_SIZE} tokens) + {STORED_PER_BATCH} removed block events, \
         {payload_bytes} bytes/batch; steady state {} blocks per pod",
        residency() * STORED_PER_BATCH
    );

    let mut batch = EventBatch::default();
    let mut n = 0usize;
    let decode = rate(|| {
        let payload = &streams[n % PODS].payloads[(n / PODS) % cycle()];
        n += 1;
        decode_batch_into(black_box(payload), &mut batch).expect("decodes");
        black_box(&batch);
        2 * STORED_PER_BATCH
    });

    let mut minimal = Minimal {
        index: new_index(),
        streams: Arc::clone(&streams),
        batch: EventBatch::default(),
        round: 0,
    };
    // Every measurement starts at the steady state: one full cycle, unmeasured.
    for _ in 0..cycle() {
        minimal.round();
    }
    let floor = rate(|| minimal.round());
    drop(minimal);

    let mut no_parity = fleet(0.0, Arc::clone(&streams));
    for _ in 0..cycle() {
        no_parity.round();
    }
    let ingest_no_parity = rate(|| no_parity.round());
    drop(no_parity);
    let mut ingesting = fleet(0.05, Arc::clone(&streams));
    for _ in 0..cycle() {
        ingesting.round();
    }
    let ingest = rate(|| ingesting.round());

    for (name, value) in [
        ("decode", decode),
        ("floor", floor),
        ("ingest, parity off", ingest_no_parity),
        ("ingest, parity 5%", ingest),
    ] {
        smoke::figure(name, value);
    }
    let m = |r: f64| r / 1e6;
    println!(
        "  decode only                          {:6.2} M block events/s",
        m(decode)
    );
    println!(
        "  decode + index updates (floor)       {:6.2} M block events/s",
        m(floor)
    );
    println!(
        "  ingest path, parity off              {:6.2} M block events/s  ({:.2}× floor)",
        m(ingest_no_parity),
        ingest_no_parity / floor
    );
    println!(
        "  ingest path, parity 5% (default)     {:6.2} M block events/s  ({:.2}× floor; goal ≥ 5)",
        m(ingest),
        ingest / floor
    );

    let prompts = hot_prefixes(&ingesting.index, &mut rng);
    let index = Arc::clone(&ingesting.index);
    let (i50, i99, i999) = percentiles(lookup_latencies(&index, &prompts));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut events = 0usize;
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                events += ingesting.round();
            }
            events as f64 / start.elapsed().as_secs_f64()
        })
    };
    let busy = lookup_latencies(&index, &prompts);
    stop.store(true, Ordering::Relaxed);
    let concurrent_rate = writer.join().expect("ingest thread");
    smoke::figure("ingest during lookups", concurrent_rate);
    let lookups = busy.len();
    let (b50, b99, b999) = percentiles(busy);
    println!("lookup of a {LOOKUP_BLOCKS}-block prompt, 16 blocks held by one pod:");
    println!("  idle index          p50 {i50:>9.2?}  p99 {i99:>9.2?}  p99.9 {i999:>9.2?}");
    println!(
        "  during full ingest  p50 {b50:>9.2?}  p99 {b99:>9.2?}  p99.9 {b999:>9.2?}  \
         ({:.2}× idle p50, {:.2}× idle p99; {lookups} lookups while another thread ingests {:.2} M block events/s)",
        b50.as_secs_f64() / i50.as_secs_f64(),
        b99.as_secs_f64() / i99.as_secs_f64(),
        m(concurrent_rate)
    );

    let relay = relay_run(Arc::clone(&streams));
    smoke::figure("relay CPU, sender", relay.sender);
    smoke::figure("relay CPU, receiver", relay.receiver);
    let batches = relay.lags.len();
    let (l50, l99, l999) = percentiles(relay.lags);
    smoke::figure("relay lag p99", l99.as_secs_f64());
    println!(
        "relay of bind mode, {:.1} M block events/s ({batches} batches) from one replica to a peer over loopback TCP:",
        m(RELAY_RATE)
    );
    println!("  lag   p50 {l50:>9.2?}  p99 {l99:>9.2?}  p99.9 {l999:>9.2?}  (goal p99 ≤ 5 ms)");
    println!(
        "  CPU   sending replica {:.1} %, receiving replica {:.1} % of a core (goal ≤ 10 % each), \
         against {:.1} % of a core to ingest the same events (at {:.2} M/s on one core above)",
        100.0 * relay.sender,
        100.0 * relay.receiver,
        100.0 * RELAY_RATE / ingest,
        m(ingest)
    );
}
