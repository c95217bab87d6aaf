//! Writes the traffic trace off the request path.
//!
//! The proxy hands each finished request to [`TraceRecorder::record`], which only moves the
//! request's own buffers into a bounded queue: when the queue is full (by entries, or by the
//! bytes of block hashes it holds) the record is dropped and counted, so a slow disk never
//! makes a request wait and a burst never makes kvgate hold more than the bound. One writer
//! thread drains the queue, keys the hashes, writes JSON lines, flushes whenever the queue
//! runs dry and rotates the file at `maxBytes`.
//!
//! The writer reads the trace section of the running config before each batch, so a hot
//! reload turns recording on or off, moves it to another file or changes the rotation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sha2::{Digest as _, Sha256};

use super::TraceRecord;
use crate::config::TraceConfig;
use crate::metrics::{Metrics, TraceOutcome};

/// Records waiting for the writer, at most.
const QUEUE_ENTRIES: usize = 4_096;
/// Bytes of block hashes waiting for the writer, at most (a 128k-token prompt holds 16 KiB).
const QUEUE_BYTES: usize = 64 << 20;
/// How often an idle writer looks at the config (to close a trace turned off).
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// `hash_ids` are cut to this many bits: exact in every JSON reader (IEEE doubles).
const ID_BITS: u32 = 53;

/// What the proxy knows of a finished request, moved (not copied) out of its context.
#[derive(Debug, Default)]
pub struct TraceEntry {
    pub arrived_unix_ms: u64,
    pub model: Option<String>,
    /// The prompt's full-block hashes as the index keys them.
    pub block_keys: Vec<u64>,
    pub block_size: usize,
    pub prompt_tokens: usize,
    pub output_tokens: Option<u64>,
    pub pod: Option<SocketAddr>,
    pub policy: Option<String>,
    pub predicted_cached_tokens: Option<usize>,
    pub actual_cached_tokens: Option<u64>,
    pub status: Option<u16>,
    /// A disaggregated request's prefill leg: its pod and cache accounting.
    pub prefill_pod: Option<SocketAddr>,
    pub prefill_predicted_cached_tokens: Option<usize>,
    pub prefill_actual_cached_tokens: Option<u64>,
}

impl TraceEntry {
    fn queued_bytes(&self) -> usize {
        self.block_keys.len() * std::mem::size_of::<u64>()
    }
}

/// Where the writer gets the trace section of the running config.
pub type TraceSettings = Box<dyn Fn() -> Option<TraceConfig> + Send>;

/// The request side of the trace: a bounded queue to the writer thread.
pub struct TraceRecorder {
    queue: SyncSender<TraceEntry>,
    queued_bytes: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl TraceRecorder {
    /// Starts the writer thread; `settings` gives it the running config's trace section.
    pub fn start(settings: TraceSettings, metrics: Arc<Metrics>) -> io::Result<Self> {
        let (queue, entries) = mpsc::sync_channel(QUEUE_ENTRIES);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let mut salt = [0u8; 32];
        rand::rng().fill(&mut salt);
        let writer = Writer {
            settings,
            queued_bytes: Arc::clone(&queued_bytes),
            metrics: Arc::clone(&metrics),
            drawn_salt: salt,
            replica: format!("{:08x}", rand::rng().random::<u32>()),
            open: None,
            failing: false,
            line: Vec::new(),
        };
        std::thread::Builder::new()
            .name("kvgate-trace".into())
            .spawn(move || writer.run(&entries))?;
        Ok(Self {
            queue,
            queued_bytes,
            metrics,
        })
    }

    /// Queues a request for the trace, or drops and counts it when the queue is full.
    pub fn record(&self, entry: TraceEntry) {
        let bytes = entry.queued_bytes();
        if self.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes > QUEUE_BYTES {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.metrics.trace_records(TraceOutcome::Dropped, 1);
            return;
        }
        match self.queue.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                self.metrics.trace_records(TraceOutcome::Dropped, 1);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                self.metrics.trace_records(TraceOutcome::Failed, 1);
            }
        }
    }
}

/// The file being written.
struct OpenTrace {
    path: PathBuf,
    file: BufWriter<File>,
    bytes: u64,
}

struct Writer {
    settings: TraceSettings,
    queued_bytes: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// The salt used when the config names none: one per process.
    drawn_salt: [u8; 32],
    replica: String,
    open: Option<OpenTrace>,
    /// The last write failed; logged once until one succeeds.
    failing: bool,
    line: Vec<u8>,
}

impl Writer {
    fn run(mut self, entries: &mpsc::Receiver<TraceEntry>) {
        loop {
            match entries.recv_timeout(IDLE_CHECK) {
                Ok(first) => {
                    let settings = (self.settings)();
                    self.write(first, settings.as_ref());
                    while let Ok(entry) = entries.try_recv() {
                        self.write(entry, settings.as_ref());
                    }
                    self.flush();
                }
                Err(RecvTimeoutError::Timeout) => {
                    if (self.settings)().is_none() {
                        self.close();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.close();
                    return;
                }
            }
        }
    }

    fn write(&mut self, entry: TraceEntry, settings: Option<&TraceConfig>) {
        self.queued_bytes
            .fetch_sub(entry.queued_bytes(), Ordering::Relaxed);
        // Recording was turned off after the request was queued.
        let Some(settings) = settings else {
            self.close();
            return;
        };
        let salt = settings
            .salt
            .as_deref()
            .map_or(&self.drawn_salt[..], str::as_bytes);
        let record = TraceRecord {
            timestamp: entry.arrived_unix_ms,
            input_length: u32::try_from(entry.prompt_tokens).unwrap_or(u32::MAX),
            output_length: entry
                .output_tokens
                .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
            hash_ids: entry
                .block_keys
                .iter()
                .map(|&key| keyed_id(salt, key))
                .collect(),
            block_size: u32::try_from(entry.block_size).ok(),
            model: entry.model,
            replica: Some(self.replica.clone()),
            pod: entry.pod.map(|p| p.to_string()),
            policy: entry.policy,
            predicted_cached_tokens: entry.predicted_cached_tokens.map(|n| n as u64),
            actual_cached_tokens: entry.actual_cached_tokens,
            status: entry.status,
            prefill_pod: entry.prefill_pod.map(|p| p.to_string()),
            prefill_predicted_cached_tokens: entry
                .prefill_predicted_cached_tokens
                .map(|n| n as u64),
            prefill_actual_cached_tokens: entry.prefill_actual_cached_tokens,
        };
        self.line.clear();
        if serde_json::to_writer(&mut self.line, &record).is_err() {
            // Plain numbers and strings always serialize.
            self.metrics.trace_records(TraceOutcome::Failed, 1);
            return;
        }
        self.line.push(b'\n');
        let outcome = self.append(settings);
        self.report(outcome, settings);
    }

    /// Appends the line, opening or rotating the file as the settings say.
    fn append(&mut self, settings: &TraceConfig) -> io::Result<()> {
        if self
            .open
            .as_ref()
            .is_some_and(|open| open.path != settings.path)
        {
            self.close();
        }
        let line_len = self.line.len() as u64;
        let open = match &mut self.open {
            Some(open) if open.bytes > 0 && open.bytes + line_len > settings.max_bytes => {
                open.file.flush()?;
                self.open = None;
                rotate(&settings.path, settings.max_files)?;
                self.open.insert(create(&settings.path)?)
            }
            Some(open) => open,
            None => {
                // A file left by an earlier process (or recording period) is kept whole.
                if fs::metadata(&settings.path).is_ok_and(|m| m.len() > 0) {
                    rotate(&settings.path, settings.max_files)?;
                }
                self.open.insert(create(&settings.path)?)
            }
        };
        open.file.write_all(&self.line)?;
        open.bytes += line_len;
        Ok(())
    }

    fn report(&mut self, outcome: io::Result<()>, settings: &TraceConfig) {
        match outcome {
            Ok(()) => {
                self.metrics.trace_records(TraceOutcome::Written, 1);
                if self.failing {
                    self.failing = false;
                    tracing::info!(path = %settings.path.display(), "traffic trace writable again");
                }
            }
            Err(error) => {
                self.metrics.trace_records(TraceOutcome::Failed, 1);
                self.open = None;
                if !self.failing {
                    self.failing = true;
                    tracing::error!(path = %settings.path.display(), %error, "cannot write the traffic trace; records are counted as failed");
                }
            }
        }
    }

    fn flush(&mut self) {
        if let Some(open) = &mut self.open {
            if let Err(error) = open.file.flush() {
                tracing::error!(path = %open.path.display(), %error, "cannot flush the traffic trace");
                self.open = None;
            }
        }
    }

    fn close(&mut self) {
        self.flush();
        self.open = None;
    }
}

/// The id a block hash is written as: keyed, so the trace cannot be matched against
/// hashes of guessed prompts, and cut to [`ID_BITS`].
fn keyed_id(salt: &[u8], key: u64) -> u64 {
    let digest = Sha256::new()
        .chain_update(salt)
        .chain_update(key.to_le_bytes())
        .finalize();
    let mut low = [0u8; 8];
    low.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(low) & ((1 << ID_BITS) - 1)
}

fn create(path: &Path) -> io::Result<OpenTrace> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    Ok(OpenTrace {
        path: path.to_path_buf(),
        file: BufWriter::new(file),
        bytes: 0,
    })
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// `path` → `path.1`, `path.1` → `path.2`, …; the oldest beyond `max_files` is overwritten.
fn rotate(path: &Path, max_files: u32) -> io::Result<()> {
    if max_files == 0 {
        return fs::remove_file(path);
    }
    for n in (1..max_files).rev() {
        match fs::rename(numbered(path, n), numbered(path, n + 1)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    fs::rename(path, numbered(path, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn settings(path: &Path, max_bytes: u64, salt: Option<&str>) -> TraceConfig {
        TraceConfig {
            path: path.to_path_buf(),
            max_bytes,
            max_files: 2,
            salt: salt.map(str::to_string),
        }
    }

    fn entry(keys: &[u64]) -> TraceEntry {
        TraceEntry {
            arrived_unix_ms: 1_765_000_000_000,
            model: Some("m".into()),
            block_keys: keys.to_vec(),
            block_size: 64,
            prompt_tokens: keys.len() * 64 + 10,
            output_tokens: Some(5),
            pod: Some("127.0.0.1:8001".parse().unwrap()),
            policy: Some("default".into()),
            predicted_cached_tokens: Some(64),
            actual_cached_tokens: Some(64),
            status: Some(200),
            ..TraceEntry::default()
        }
    }

    /// The complete lines of a trace file: the writer may be halfway through the last one.
    fn lines(path: &Path) -> Vec<TraceRecord> {
        let text = fs::read_to_string(path).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).expect("a trace line"))
            .collect()
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_disaggregated_request_names_its_prefill_pod_after_the_mooncake_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        let config = Some(settings(&path, MIN_TRACE_BYTES_FOR_TESTS, None));
        let metrics = Arc::new(Metrics::new().unwrap());
        let recorder = TraceRecorder::start(Box::new(move || config.clone()), metrics).unwrap();
        recorder.record(TraceEntry {
            prefill_pod: Some("127.0.0.1:8002".parse().unwrap()),
            prefill_predicted_cached_tokens: Some(128),
            prefill_actual_cached_tokens: Some(192),
            ..entry(&[1, 2, 3])
        });
        recorder.record(entry(&[4]));
        wait_for("both lines", || lines(&path).len() == 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with(
                r#"{"timestamp":1765000000000,"input_length":202,"output_length":5,"hash_ids":["#
            ),
            "{first}"
        );
        assert!(
            first.ends_with(r#","status":200,"prefill_pod":"127.0.0.1:8002","prefill_predicted_cached_tokens":128,"prefill_actual_cached_tokens":192}"#),
            "{first}"
        );
        let written = lines(&path);
        assert_eq!(written[0].pod.as_deref(), Some("127.0.0.1:8001"));
        assert_eq!(written[0].prefill_pod.as_deref(), Some("127.0.0.1:8002"));
        // An aggregated request's line has no prefill fields at all.
        assert!(!text.lines().nth(1).unwrap().contains("prefill"));
        assert_eq!(written[1].prefill_actual_cached_tokens, None);
    }

    #[test]
    fn records_are_written_keyed_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        let current = Arc::new(parking_lot::Mutex::new(Some(settings(
            &path,
            MIN_TRACE_BYTES_FOR_TESTS,
            Some("s3cret"),
        ))));
        let metrics = Arc::new(Metrics::new().unwrap());
        let reader = Arc::clone(&current);
        let recorder = TraceRecorder::start(
            Box::new(move || reader.lock().clone()),
            Arc::clone(&metrics),
        )
        .unwrap();
        let keys: Vec<u64> = (1..=100).collect();
        recorder.record(entry(&keys));
        wait_for("the first line", || lines(&path).len() == 1);
        let first = &lines(&path)[0];
        assert_eq!(first.input_length, 100 * 64 + 10);
        assert_eq!(first.output_length, 5);
        assert_eq!(first.block_size, Some(64));
        assert_eq!(first.hash_ids.len(), 100);
        assert_eq!(first.hash_ids[3], keyed_id(b"s3cret", 4));
        assert!(first.hash_ids.iter().all(|&id| id < 1 << ID_BITS));
        assert!(
            !first.hash_ids.iter().any(|id| keys.contains(id)),
            "the raw block hashes are not written"
        );
        assert_eq!(first.pod.as_deref(), Some("127.0.0.1:8001"));

        // Enough lines to pass maxBytes twice: the file rotates, keeping maxFiles old ones.
        let line_len = fs::metadata(&path).unwrap().len();
        let per_file = MIN_TRACE_BYTES_FOR_TESTS / line_len;
        for _ in 0..per_file * 2 {
            recorder.record(entry(&keys));
        }
        let total = 1 + per_file * 2;
        wait_for("every line", || {
            let written = [path.clone(), numbered(&path, 1), numbered(&path, 2)]
                .iter()
                .map(|p| lines(p).len() as u64)
                .sum::<u64>();
            written + metrics_value(&metrics, "dropped") == total
        });
        for p in [&path, &numbered(&path, 1), &numbered(&path, 2)] {
            assert!(fs::metadata(p).unwrap().len() <= MIN_TRACE_BYTES_FOR_TESTS);
        }
        assert!(!numbered(&path, 3).exists(), "only maxFiles rotated files");

        // Turned off by a reload: nothing more is written.
        *current.lock() = None;
        let before = lines(&path).len();
        recorder.record(entry(&keys));
        wait_for("the record to be discarded", || {
            recorder.queued_bytes.load(Ordering::Relaxed) == 0
        });
        assert_eq!(lines(&path).len(), before);
    }

    const MIN_TRACE_BYTES_FOR_TESTS: u64 = crate::config::MIN_TRACE_BYTES;

    fn metrics_value(metrics: &Metrics, result: &str) -> u64 {
        let text = metrics.render().unwrap_or_default();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "kvgate_trace_records_total{{result=\"{result}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let (queue, _entries) = mpsc::sync_channel(1);
        let recorder = TraceRecorder {
            queue,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            metrics: Arc::clone(&metrics),
        };
        let started = Instant::now();
        for _ in 0..3 {
            recorder.record(entry(&[1, 2]));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(metrics_value(&metrics, "dropped"), 2);
        // A record larger than the byte bound is dropped too.
        let huge = vec![7u64; QUEUE_BYTES / 8 + 1];
        recorder.record(entry(&huge));
        assert_eq!(metrics_value(&metrics, "dropped"), 3);
        assert_eq!(recorder.queued_bytes.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn ids_depend_on_the_salt() {
        assert_eq!(keyed_id(b"a", 42), keyed_id(b"a", 42));
        assert_ne!(keyed_id(b"a", 42), keyed_id(b"b", 42));
        assert_ne!(keyed_id(b"a", 42), keyed_id(b"a", 43));
    }
}
