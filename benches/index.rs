//! Block index benchmarks: update rate, lookup latency (idle and while another thread ingests
//! at full speed), and memory per (block, pod) entry at 10 M entries, both as the index counts
//! it and as resident memory. Figures are printed next to a naive baseline measured in the same
//! run (one `RwLock<HashMap<(scope, hash), Vec<(pod, tiers)>>>`).
//!
//! `cargo bench --bench index`. `INDEX_BENCH_ENTRIES` scales the memory runs (default 10 M);
//! `INDEX_BENCH_SECTIONS` picks sections (default `update,lookup,concurrent,memory`).
//! Memory runs execute in child processes of this binary so each starts from a clean heap.

#[path = "support/smoke.rs"]
mod smoke;

use kvgate::index::{BlockIndex, IndexConfig, PodId, PrefixMatch, ScopeId, Tier};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

const PODS: u32 = 64;
const BATCH: usize = 16;

/// A size of the full run, or 1/256 of it (at least 16) in a smoke run.
fn scaled(n: usize) -> usize {
    smoke::size(n, (n / 256).max(16))
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// (scope, hash) → holders with their tier bits.
type NaiveMap = HashMap<(ScopeId, u64), Vec<(PodId, u8)>>;

/// The baseline: a plain map behind one lock, with the same lookup semantics.
#[derive(Default)]
struct Naive {
    map: RwLock<NaiveMap>,
}

impl Naive {
    fn store(&self, pod: PodId, scope: ScopeId, tier: u8, hashes: &[u64]) {
        let mut map = self.map.write().expect("poisoned");
        for &h in hashes {
            let holders = map.entry((scope, h)).or_default();
            match holders.iter_mut().find(|(p, _)| *p == pod) {
                Some((_, t)) => *t |= tier,
                None => holders.push((pod, tier)),
            }
        }
    }

    fn lookup(&self, scope: ScopeId, hashes: &[u64], out: &mut HashMap<PodId, (u32, u32)>) {
        out.clear();
        let map = self.map.read().expect("poisoned");
        for (i, h) in hashes.iter().enumerate() {
            let i = i as u32;
            let Some(holders) = map.get(&(scope, *h)) else {
                break;
            };
            let mut matching = false;
            for &(pod, tiers) in holders {
                if i == 0 {
                    out.insert(pod, (u32::from(tiers & 1), 1));
                    matching = true;
                } else if let Some(p) = out.get_mut(&pod) {
                    if p.1 == i {
                        p.1 += 1;
                        matching = true;
                        if p.0 == i && tiers & 1 != 0 {
                            p.0 += 1;
                        }
                    }
                }
            }
            if !matching {
                break;
            }
        }
    }
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

struct Latency {
    samples: Vec<u32>,
}

impl Latency {
    fn new() -> Self {
        Self {
            samples: Vec::with_capacity(1 << 20),
        }
    }

    fn record(&mut self, d: Duration) {
        self.samples
            .push(d.as_nanos().min(u128::from(u32::MAX)) as u32);
    }

    fn pct(&mut self, p: f64) -> f64 {
        self.samples.sort_unstable();
        let idx = ((self.samples.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.samples.get(idx).copied().unwrap_or(0)) / 1000.0
    }

    fn summary(&mut self) -> String {
        format!(
            "p50 {:.2} µs  p99 {:.2} µs  p99.9 {:.2} µs  max {:.1} µs  (n={})",
            self.pct(0.5),
            self.pct(0.99),
            self.pct(0.999),
            self.pct(1.0),
            self.samples.len()
        )
    }
}

fn index(budget_bytes: usize) -> BlockIndex {
    BlockIndex::new(IndexConfig {
        budget_bytes,
        shards: 256,
    })
}

fn rate(events: usize, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64() / 1e6
}

/// Best rates (M per second) of one update-rate run.
#[derive(Default, Clone, Copy)]
struct Rates {
    naive: f64,
    fresh: f64,
    refresh: f64,
    removed: f64,
    removed_batched: f64,
    churn: f64,
}

impl Rates {
    fn best(self, o: Rates) -> Rates {
        Rates {
            naive: self.naive.max(o.naive),
            fresh: self.fresh.max(o.fresh),
            refresh: self.refresh.max(o.refresh),
            removed: self.removed.max(o.removed),
            removed_batched: self.removed_batched.max(o.removed_batched),
            churn: self.churn.max(o.churn),
        }
    }
}

fn update_once(hashes: &[u64]) -> Rates {
    let blocks = hashes.len();
    let pod_of = |i: usize| (i / BATCH) as u32 % PODS;
    let mut r = Rates::default();

    let naive = Naive::default();
    let t = Instant::now();
    for (i, chunk) in hashes.chunks(BATCH).enumerate() {
        naive.store(pod_of(i * BATCH), 0, 1, chunk);
    }
    r.naive = rate(blocks, t.elapsed());
    drop(naive);

    let idx = index(4 << 30);
    let store_all = |idx: &BlockIndex| {
        let t = Instant::now();
        for (i, chunk) in hashes.chunks(BATCH).enumerate() {
            idx.store(pod_of(i * BATCH), 0, Tier::Gpu, chunk);
        }
        rate(blocks, t.elapsed())
    };
    r.fresh = store_all(&idx);
    r.refresh = store_all(&idx);
    let t = Instant::now();
    for (i, h) in hashes.iter().enumerate() {
        idx.remove(pod_of(i), 0, Tier::Gpu, std::slice::from_ref(h));
    }
    r.removed = rate(blocks, t.elapsed());
    assert_eq!(idx.stats().entries, 0);
    store_all(&idx);
    let t = Instant::now();
    for (i, chunk) in hashes.chunks(BATCH).enumerate() {
        idx.remove(pod_of(i * BATCH), 0, Tier::Gpu, chunk);
    }
    r.removed_batched = rate(blocks, t.elapsed());
    assert_eq!(idx.stats().entries, 0);

    // Churn as vLLM produces it: half the blocks resident; each batch stores 16 new blocks and
    // removes 16 old ones, one BlockRemoved (one call) each.
    let half = blocks / 2;
    for (i, chunk) in hashes[..half].chunks(BATCH).enumerate() {
        idx.store(pod_of(i * BATCH), 0, Tier::Gpu, chunk);
    }
    let t = Instant::now();
    let mut events = 0;
    for (i, chunk) in hashes[half..].chunks(BATCH).enumerate() {
        idx.store(pod_of(half + i * BATCH), 0, Tier::Gpu, chunk);
        for h in &hashes[i * BATCH..i * BATCH + chunk.len()] {
            idx.remove(pod_of(i * BATCH), 0, Tier::Gpu, std::slice::from_ref(h));
        }
        events += 2 * chunk.len();
    }
    r.churn = rate(events, t.elapsed());
    r
}

/// Block-event update rate on one thread (best of several runs): fresh stores (16-hash
/// BlockStored batches), re-stores, removals one hash per call (as BlockRemoved comes) and 16
/// per call, and churn at a fixed size.
fn update_rate(blocks: usize, runs: usize) -> f64 {
    println!("\n== update rate, one thread, {blocks} blocks over {PODS} pods, best of {runs} ==");
    let mut rng = Rng(1);
    let hashes: Vec<u64> = (0..blocks).map(|_| rng.next()).collect();
    let r = (0..runs)
        .map(|_| update_once(&hashes))
        .fold(Rates::default(), Rates::best);
    println!("baseline store (fresh)     {:8.2} M blocks/s", r.naive);
    println!(
        "index store (fresh)        {:8.2} M blocks/s   {:.2}x baseline",
        r.fresh,
        r.fresh / r.naive
    );
    println!("index store (re-store)     {:8.2} M blocks/s", r.refresh);
    println!("index remove (1 per call)  {:8.2} M blocks/s", r.removed);
    println!(
        "index remove (16 per call) {:8.2} M blocks/s",
        r.removed_batched
    );
    println!(
        "index churn store+remove   {:8.2} M block events/s",
        r.churn
    );
    r.fresh.min(r.refresh).min(r.removed).min(r.churn)
}

/// Latency of a dependent load at a random address in 256 MiB: what a cache miss costs on
/// this machine, to read the figures above against.
fn memory_latency() -> f64 {
    let mut rng = Rng(9);
    let words: Vec<u32> = (0..scaled(1 << 26)).map(|_| rng.next() as u32).collect();
    let mask = words.len() - 1;
    let steps = scaled(4_000_000);
    let mut x = 0usize;
    let t = Instant::now();
    for i in 0..steps {
        x = (words[x] as usize ^ i) & mask;
    }
    std::hint::black_box(x);
    t.elapsed().as_nanos() as f64 / steps as f64
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// Request chains with per-pod prefix holdings, plus unrelated background blocks.
struct LookupSet {
    chains: Vec<Vec<u64>>,
}

/// Fills `idx` (and the baseline) with `chains` chains of `len` blocks; each pod holds a
/// prefix of each chain, of a uniform random length (or the whole chain when `all`).
fn lookup_set(
    idx: &BlockIndex,
    naive: &Naive,
    chains: usize,
    len: usize,
    all: bool,
    rng: &mut Rng,
) -> LookupSet {
    let chains: Vec<Vec<u64>> = (0..chains)
        .map(|_| (0..len).map(|_| rng.next()).collect())
        .collect();
    for chain in &chains {
        for pod in 0..PODS {
            let n = if all {
                len
            } else {
                rng.below(len as u64 + 1) as usize
            };
            let tier = if pod % 4 == 3 { Tier::Cpu } else { Tier::Gpu };
            idx.store(pod, 0, tier, &chain[..n]);
            naive.store(pod, 0, if tier == Tier::Gpu { 1 } else { 2 }, &chain[..n]);
        }
    }
    LookupSet { chains }
}

fn background(idx: &BlockIndex, naive: &Naive, blocks: usize, rng: &mut Rng) {
    let mut batch = [0u64; BATCH];
    for i in 0..blocks / BATCH {
        batch.iter_mut().for_each(|h| *h = rng.next());
        idx.store(i as u32 % PODS, 0, Tier::Gpu, &batch);
        naive.store(i as u32 % PODS, 0, 1, &batch);
    }
}

fn time_lookups(idx: &BlockIndex, set: &LookupSet, n: usize, rng: &mut Rng) -> Latency {
    let mut out = PrefixMatch::new();
    let mut lat = Latency::new();
    for _ in 0..n {
        let chain = &set.chains[rng.below(set.chains.len() as u64) as usize];
        let t = Instant::now();
        idx.lookup(0, chain, &mut out);
        lat.record(t.elapsed());
        std::hint::black_box(out.longest());
    }
    lat
}

fn time_naive(naive: &Naive, set: &LookupSet, n: usize, rng: &mut Rng) -> Latency {
    let mut out = HashMap::new();
    let mut lat = Latency::new();
    for _ in 0..n {
        let chain = &set.chains[rng.below(set.chains.len() as u64) as usize];
        let t = Instant::now();
        naive.lookup(0, chain, &mut out);
        lat.record(t.elapsed());
        std::hint::black_box(out.len());
    }
    lat
}

fn lookup_latency() {
    println!("\n== lookup latency, {PODS} pods, 1 M background blocks ==");
    let mut rng = Rng(2);
    let idx = index(4 << 30);
    let naive = Naive::default();
    background(&idx, &naive, scaled(1 << 20), &mut rng);
    let cases = [
        ("64-block prefix, random prefix per pod", 512, 64, false),
        ("64-block prefix, every pod holds all  ", 64, 64, true),
        ("1600-block prefix, random per pod    ", 16, 1600, false),
        ("1600-block prefix, every pod holds all", 4, 1600, true),
    ];
    let mut p50_64 = 0.0;
    for (name, chains, len, all) in cases {
        let set = lookup_set(&idx, &naive, chains, len, all, &mut rng);
        let n = scaled(if len > 100 { 20_000 } else { 200_000 });
        time_lookups(&idx, &set, n / 10, &mut rng);
        let mut lat = time_lookups(&idx, &set, n, &mut rng);
        let mut base = time_naive(&naive, &set, n / 4, &mut rng);
        let (p50, base_p50) = (lat.pct(0.5), base.pct(0.5));
        if len == 64 && !all {
            p50_64 = p50;
        }
        println!("{name}  index    {}", lat.summary());
        println!(
            "{name}  baseline p50 {base_p50:.2} µs → index {:.1}x faster",
            base_p50 / p50
        );
    }
    smoke::figure("lookup p50", p50_64);
    println!(
        "goal p50 ≤ 5 µs (64 blocks, 64 pods): {p50_64:.2} µs → {}",
        verdict(p50_64 <= 5.0)
    );
}

/// Lookups on this thread while another thread stores and removes as fast as it can.
fn lookup_under_ingestion() {
    println!("\n== lookup latency while another thread ingests at full speed ==");
    let mut rng = Rng(3);
    let idx = Arc::new(index(4 << 30));
    let naive = Naive::default();
    background(&idx, &naive, scaled(1 << 20), &mut rng);
    let set = lookup_set(&idx, &naive, 512, 64, false, &mut rng);
    drop(naive);
    time_lookups(&idx, &set, scaled(20_000), &mut rng);
    let mut idle = time_lookups(&idx, &set, scaled(200_000), &mut rng);

    let stop = Arc::new(AtomicBool::new(false));
    let ingested = Arc::new(AtomicU64::new(0));
    let writer = {
        let (idx, stop, ingested) = (Arc::clone(&idx), Arc::clone(&stop), Arc::clone(&ingested));
        std::thread::spawn(move || {
            // A ring of 1 M resident blocks: each batch stores 16 new ones and removes 16 old.
            let mut rng = Rng(4);
            let ring_batches = scaled(1 << 20) / BATCH;
            let mut ring: Vec<[u64; BATCH]> = Vec::with_capacity(ring_batches);
            let mut i = 0usize;
            let mut calls = Latency::new();
            while !stop.load(Ordering::Relaxed) {
                let mut batch = [0u64; BATCH];
                batch.iter_mut().for_each(|h| *h = rng.next());
                let pod = (i % PODS as usize) as u32;
                let t = Instant::now();
                idx.store(pod, 1, Tier::Gpu, &batch);
                calls.record(t.elapsed());
                if ring.len() < ring_batches {
                    ring.push(batch);
                } else {
                    let slot = i % ring_batches;
                    let old = std::mem::replace(&mut ring[slot], batch);
                    let old_pod = ((i - ring_batches) % PODS as usize) as u32;
                    for h in &old {
                        idx.remove(old_pod, 1, Tier::Gpu, std::slice::from_ref(h));
                    }
                    ingested.fetch_add(BATCH as u64, Ordering::Relaxed);
                }
                ingested.fetch_add(BATCH as u64, Ordering::Relaxed);
                i += 1;
            }
            calls
        })
    };
    // The writer's ring fills first: measure at its steady state.
    std::thread::sleep(smoke::size(
        Duration::from_millis(300),
        Duration::from_millis(10),
    ));
    let before = ingested.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut busy = time_lookups(&idx, &set, scaled(400_000), &mut rng);
    let events = ingested.load(Ordering::Relaxed) - before;
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut calls = writer.join().expect("writer thread panicked");
    smoke::figure("idle lookup p50", idle.pct(0.5));
    smoke::figure("busy lookup p50", busy.pct(0.5));
    println!("idle:            {}", idle.summary());
    println!("under ingestion: {}", busy.summary());
    println!(
        "ingestion meanwhile: {:.2} M block events/s; p50 ratio busy/idle {:.2}, p99 ratio {:.2}",
        rate(events as usize, elapsed),
        busy.pct(0.5) / idle.pct(0.5),
        busy.pct(0.99) / idle.pct(0.99)
    );
    println!(
        "writer store() calls (16 blocks; shard locks held within a call): {}",
        calls.summary()
    );
}

/// Child process: builds `entries` entries with the given sharing and prints one result line.
fn memory_child(kind: &str, entries: usize) {
    let rss0 = rss_bytes();
    let idx = index(8 << 30);
    let mut rng = Rng(5);
    let mut made = 0usize;
    let mut batch = Vec::with_capacity(BATCH);
    let t = Instant::now();
    let mut i = 0u64;
    let mut longest = Duration::ZERO;
    while made < entries {
        batch.clear();
        (0..BATCH).for_each(|_| batch.push(rng.next()));
        // Holders per batch: one pod, or (shared) 1 (60%), 2 (25%), 3-4 (10%), 32 (5%).
        let holders = match kind {
            "single" => 1,
            _ => match rng.below(100) {
                0..60 => 1,
                60..85 => 2,
                85..95 => 3 + rng.below(2) as u32,
                _ => 32,
            },
        };
        let first = rng.below(u64::from(PODS)) as u32;
        for k in 0..holders {
            let call = Instant::now();
            idx.store((first + k) % PODS, 0, Tier::Gpu, &batch);
            longest = longest.max(call.elapsed());
        }
        made += BATCH * holders as usize;
        i += 1;
    }
    let build = t.elapsed();
    let stats = idx.stats();
    let rss = rss_bytes().saturating_sub(rss0);
    println!(
        "RESULT {kind} entries={} blocks={} bytes={} registry={} rss={} secs={:.3} batches={i} \
         longest_us={}",
        stats.entries,
        stats.blocks,
        stats.bytes,
        stats.registry_bytes,
        rss,
        build.as_secs_f64(),
        longest.as_micros()
    );
}

fn memory(entries: usize) {
    println!(
        "\n== memory at {} M entries, {PODS} pods (fresh process each) ==",
        entries / 1_000_000
    );
    for (kind, what) in [
        ("single", "every block on one pod (worst case per entry)"),
        ("shared", "blocks on 1/2/3-4/32 pods at 60/25/10/5%"),
    ] {
        let out = std::env::current_exe().and_then(|exe| {
            std::process::Command::new(exe)
                .args(["--memory-child", kind, &entries.to_string()])
                .output()
        });
        let Some(line) = out.ok().and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.starts_with("RESULT"))
                .map(str::to_owned)
        }) else {
            println!("{kind}: child process failed");
            continue;
        };
        let field = |name: &str| -> f64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        let (e, b) = (
            smoke::figure("entries", field("entries")),
            smoke::figure("blocks", field("blocks")),
        );
        smoke::figure("bytes", field("bytes"));
        println!("{what}:");
        println!(
            "  {e:.0} entries, {b:.0} blocks ({:.2} pods/block); built at {:.2} M entries/s",
            e / b,
            e / field("secs") / 1e6
        );
        println!(
            "  longest single store() call while building (table growth included): {:.0} µs",
            field("longest_us")
        );
        println!(
            "  counted {:.1} B/entry ({:.1} B/block); resident {:.1} B/entry; registry {:.0} KiB",
            field("bytes") / e,
            field("bytes") / b,
            field("rss") / e,
            field("registry") / 1024.0
        );
        if kind == "single" {
            println!(
                "  goal ≤ 32 B/entry: {:.1} → {}",
                field("bytes") / e,
                verdict(field("bytes") / e <= 32.0)
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--memory-child") {
        let kind = args.get(pos + 1).map_or("single", String::as_str);
        let entries = args
            .get(pos + 2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(10_000_000);
        memory_child(kind, entries);
        return;
    }
    let entries = std::env::var("INDEX_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(smoke::size(10_000_000, 40_000));
    let sections = std::env::var("INDEX_BENCH_SECTIONS")
        .unwrap_or_else(|_| "update,lookup,concurrent,memory".to_owned());
    let run = |name: &str| sections.split(',').any(|s| s.trim() == name);
    if run("update") {
        println!(
            "machine: dependent random load (256 MiB) {:.0} ns",
            memory_latency()
        );
        let runs = |full: usize| smoke::size(full, 1);
        let small = smoke::figure("update rate", update_rate(scaled(1 << 16), runs(9)));
        let large = smoke::figure("update rate", update_rate(scaled(1 << 21), runs(3)));
        println!(
            "goal ≥ 5 M block events/s/core, slowest kind: {small:.2} (cache-resident), \
             {large:.2} (2 M blocks) → {}",
            verdict(small >= 5.0 && large >= 5.0)
        );
    } else if run("update-small") {
        update_rate(scaled(1 << 16), smoke::size(30, 1));
    }
    if run("lookup") {
        lookup_latency();
    }
    if run("concurrent") {
        lookup_under_ingestion();
    }
    if run("memory") {
        memory(entries);
    }
}
