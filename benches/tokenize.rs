//! Tokenization throughput: OpenAI chat request → token ids, on one thread.
//!
//! For conversations of about 4k and 100k tokens built from LooGLE documents:
//! * cold: caches cleared, then parse + render + tokenize the whole request;
//! * warm: the previous request of the conversation was seen; the next one
//!   (every earlier turn, the answer, and a new question) is parsed, rendered
//!   and tokenized.
//!
//! The same work in Python `transformers` (json.loads, apply_chat_template,
//! encode) runs in the same process tree for the ratio. Python keeps no cache,
//! so its warm and cold times are the same work.
//!
//! Then the routing work (parse + render + tokenize + vLLM block hashes) for a 100k-token
//! user message whose first 99 % was seen before (a document followed by new text and a
//! question), against the same messages with an empty piece cache (cold) and a message
//! seen whole, in the same run.
//!
//! Run: `cargo bench --bench tokenize [-- --shared PATH --tokenizer-dir PATH]`.

#[path = "support/smoke.rs"]
mod smoke;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvgate::hash::{BlockHasher, ExtraKeys, HashAlgo, HashSettings};
use kvgate::tokenize::{parse_request, Endpoint, ModelTokenizer};

/// Characters of LooGLE text per token with the Qwen3 tokenizer, to size conversations.
const CHARS_PER_TOKEN: usize = 4;
const TURNS: usize = 8;

struct Scenario {
    name: &'static str,
    /// The request before the last turn: what a warm cache has seen.
    previous: Vec<u8>,
    /// Requests of the last turn, each with a different new question.
    finals: Vec<Vec<u8>>,
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn loogle_text(shared: &Path) -> String {
    let mut text = String::new();
    for name in ["loogle_longdep_qa.jsonl", "loogle_shortdep_qa.jsonl"] {
        let path = shared.join("data/traces").join(name);
        let data = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        for line in data.lines() {
            let doc: serde_json::Value = serde_json::from_str(line).expect("LooGLE line is JSON");
            text.push_str(doc["input"].as_str().unwrap_or_default());
            text.push_str("\n\n");
        }
    }
    text
}

fn char_prefix(text: &str, chars: usize) -> &str {
    match text.char_indices().nth(chars) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// A conversation whose first user turns carry consecutive chunks of
/// `source`, followed by question/answer turns (`exchanges`, the last one unanswered).
fn conversation(source: &str, target_tokens: usize, exchanges: &[(&str, Option<&str>)]) -> Vec<u8> {
    let per_turn = target_tokens * CHARS_PER_TOKEN / TURNS;
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": "You answer questions about long documents."}),
    ];
    let mut rest = source;
    for turn in 0..TURNS {
        let chunk = char_prefix(rest, per_turn);
        rest = &rest[chunk.len()..];
        messages
            .push(serde_json::json!({"role": "user", "content": format!("Part {turn}:\n{chunk}")}));
        messages.push(
            serde_json::json!({"role": "assistant", "content": format!("Noted part {turn}.")}),
        );
    }
    for (question, answer) in exchanges {
        messages.push(serde_json::json!({"role": "user", "content": question}));
        if let Some(answer) = answer {
            messages.push(serde_json::json!({"role": "assistant", "content": answer}));
        }
    }
    serde_json::to_vec(&serde_json::json!({
        "model": "Qwen/Qwen3-8B",
        "messages": messages,
        "chat_template_kwargs": {"enable_thinking": false},
    }))
    .expect("request serializes")
}

fn scenario(name: &'static str, source: &str, target_tokens: usize, iterations: usize) -> Scenario {
    let first = "Who is the main subject of these documents?";
    let answer = "The documents describe several people; the first part is about an architect.";
    let previous = conversation(source, target_tokens, &[(first, None)]);
    let finals = (0..iterations)
        .map(|i| {
            let next = format!("Follow-up {i}: which places are mentioned most often, and why?");
            conversation(
                source,
                target_tokens,
                &[(first, Some(answer)), (&next, None)],
            )
        })
        .collect();
    Scenario {
        name,
        previous,
        finals,
    }
}

fn tokens(model: &ModelTokenizer, body: &[u8]) -> usize {
    let request = parse_request(Endpoint::ChatCompletions, body).expect("bench request parses");
    model
        .tokens(&request)
        .expect("bench request tokenizes")
        .len()
}

/// Which time of a sample a table shows.
type Clock = fn(&Sample) -> Duration;

/// The time of one call: wall clock (median of the loop) and CPU (mean over the loop).
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    wall: Duration,
    cpu: Duration,
}

/// This thread's time on a CPU so far, from the scheduler's accounting. It
/// advances at scheduler events, so it is read around whole loops of calls,
/// not single calls. On a shared machine it shows per-core cost, where wall
/// time also counts the time other processes held the core.
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// Times each call (wall clock) and the whole loop (CPU time, averaged per call).
fn timed_loop<I>(items: I, mut call: impl FnMut(I::Item) -> usize) -> (Sample, usize)
where
    I: ExactSizeIterator,
{
    let calls = items.len().max(1) as u32;
    let cpu_start = thread_cpu_time();
    let loop_start = Instant::now();
    let mut walls = Vec::with_capacity(items.len());
    let mut count = 0;
    for item in items {
        let start = Instant::now();
        count = call(item);
        walls.push(start.elapsed());
    }
    let loop_wall = loop_start.elapsed();
    let cpu = match (cpu_start, thread_cpu_time()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => loop_wall,
    };
    walls.sort();
    let sample = Sample {
        wall: walls.get(walls.len() / 2).copied().unwrap_or_default(),
        cpu: cpu / calls,
    };
    (sample, count)
}

struct Measured {
    tokens: usize,
    first: Sample,
    cold: Sample,
    warm: Sample,
    whole_encode: Sample,
}

/// Run once on a fresh tokenizer before timing, as the Python side does.
const WARM_UP: &[u8] = br#"{"model": "m", "messages": [{"role": "user", "content": "warm up"}]}"#;

fn load(tokenizer_dir: &Path) -> ModelTokenizer {
    ModelTokenizer::load(
        &tokenizer_dir.join("tokenizer.json"),
        Some(&tokenizer_dir.join("tokenizer_config.json")),
        None,
    )
    .expect("Qwen3 tokenizer loads (run .ci/setup)")
    .with_threads(1)
}

fn measure(tokenizer_dir: &Path, scenario: &Scenario, first_samples: usize) -> Measured {
    // First sight: a freshly loaded tokenizer, every cache empty (the Hugging
    // Face BPE's own word cache included). Loading is not timed.
    let fresh: Vec<ModelTokenizer> = (0..first_samples.min(scenario.finals.len()))
        .map(|_| {
            let model = load(tokenizer_dir);
            tokens(&model, WARM_UP);
            model
        })
        .collect();
    let (first, _) = timed_loop(fresh.iter().zip(&scenario.finals), |(model, body)| {
        tokens(model, body)
    });
    drop(fresh);

    let model = load(tokenizer_dir);
    // Steady state: word-level caches have seen this kind of text before.
    tokens(&model, &scenario.finals[0]);
    let (cold, count) = timed_loop(scenario.finals.iter(), |body| {
        model.clear_piece_cache();
        tokens(&model, body)
    });

    // Each final request extends the previous one with a new question.
    model.clear_piece_cache();
    tokens(&model, &scenario.previous);
    let (warm, warm_count) = timed_loop(scenario.finals.iter(), |body| tokens(&model, body));
    assert_eq!(warm_count, count);

    let prompts: Vec<String> = scenario
        .finals
        .iter()
        .map(|body| {
            let request = parse_request(Endpoint::ChatCompletions, body).expect("parses");
            model
                .render(&request)
                .expect("renders")
                .expect("chat prompt")
        })
        .collect();
    let (whole_encode, whole_count) = timed_loop(prompts.iter(), |prompt| {
        model
            .encode_text_uncached(prompt, false)
            .expect("encodes")
            .len()
    });
    assert_eq!(whole_count, count);
    Measured {
        tokens: count,
        first,
        cold,
        warm,
        whole_encode,
    }
}

const PYTHON: &str = r#"
import json, sys, time, logging, os
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.disable(logging.WARNING)
from transformers import AutoTokenizer

def run(tok, body):
    wall, cpu = time.perf_counter(), time.thread_time()
    req = json.loads(body)
    text = tok.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True,
                                   **req.get("chat_template_kwargs", {}))
    ids = tok.encode(text, add_special_tokens=False)
    return (time.perf_counter() - wall, time.thread_time() - cpu), len(ids)

def median(values):
    return sorted(values)[len(values) // 2]

scenarios = json.load(sys.stdin)
warmup = json.dumps({"model": "m", "messages": [{"role": "user", "content": "warm up"}]})
out = {}
for name, bodies in scenarios.items():
    firsts = []
    for body in bodies[:5]:
        tok = AutoTokenizer.from_pretrained(sys.argv[1])
        run(tok, warmup)  # compiles the template
        firsts.append(run(tok, body)[0])
    samples = []
    for body in bodies:
        sample, count = run(tok, body)
        samples.append(sample)
    out[name] = {
        "first": [median([s[0] for s in firsts]), sum(s[1] for s in firsts) / len(firsts)],
        "median": [median([s[0] for s in samples]), sum(s[1] for s in samples) / len(samples)],
        "tokens": count,
    }
print(json.dumps(out))
"#;

/// The same work in Python `transformers`: the first request on a fresh
/// tokenizer, and the median over all requests.
struct PythonTimes {
    first: Sample,
    median: Sample,
    tokens: usize,
}

fn sample_of(value: &serde_json::Value) -> Option<Sample> {
    let pair = value.as_array()?;
    Some(Sample {
        wall: Duration::from_secs_f64(pair.first()?.as_f64()?),
        cpu: Duration::from_secs_f64(pair.get(1)?.as_f64()?),
    })
}

fn python_baseline(tokenizer_dir: &Path, scenarios: &[Scenario]) -> Vec<Option<PythonTimes>> {
    let input: serde_json::Map<String, serde_json::Value> = scenarios
        .iter()
        .map(|s| {
            let bodies = s
                .finals
                .iter()
                .map(|b| serde_json::Value::String(String::from_utf8_lossy(b).into_owned()))
                .collect();
            (s.name.to_owned(), serde_json::Value::Array(bodies))
        })
        .collect();
    let output = Command::new("python3")
        .args(["-c", PYTHON])
        .arg(tokenizer_dir)
        .env("OMP_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(serde_json::Value::Object(input).to_string().as_bytes())?;
            }
            child.wait_with_output()
        });
    let parsed: Option<serde_json::Value> = match output {
        Ok(output) if output.status.success() => serde_json::from_slice(&output.stdout).ok(),
        Ok(output) => {
            eprintln!(
                "python baseline failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("python baseline did not run: {e}");
            None
        }
    };
    scenarios
        .iter()
        .map(|s| {
            let times = parsed.as_ref()?.get(s.name)?;
            Some(PythonTimes {
                first: sample_of(times.get("first")?)?,
                median: sample_of(times.get("median")?)?,
                tokens: usize::try_from(times.get("tokens")?.as_u64()?).ok()?,
            })
        })
        .collect()
}

fn mtok_per_s(tokens: usize, time: Duration) -> f64 {
    tokens as f64 / time.as_secs_f64() / 1e6
}

fn ms(time: Duration) -> f64 {
    time.as_secs_f64() * 1e3
}

/// Characters of the document a prefix-reuse message starts with (~100k tokens).
const DOCUMENT_CHARS: usize = 100_000 * CHARS_PER_TOKEN;
const PREFIX_ROUNDS: usize = 21;

fn user_message(text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "Qwen/Qwen3-8B",
        "messages": [{"role": "user", "content": text}],
    }))
    .expect("request serializes")
}

/// Parse, render, tokenize and block-hash one request, as the gateway routes it.
fn route(model: &ModelTokenizer, hasher: &BlockHasher, body: &[u8]) -> usize {
    let request = parse_request(Endpoint::ChatCompletions, body).expect("bench request parses");
    let tokens = model.tokens(&request).expect("bench request tokenizes");
    let mut hashes = Vec::with_capacity(tokens.len() / 64 + 1);
    hasher.hash_prompt(&tokens, &ExtraKeys::default(), &mut hashes);
    tokens.len()
}

fn prefix_reuse(tokenizer_dir: &Path, source: &str) {
    let hasher = BlockHasher::new(&HashSettings {
        algo: HashAlgo::Sha256Cbor,
        block_size: 64,
        seed: Some("42".into()),
        release: "0.11.0".parse().expect("a release"),
    })
    .expect("hash settings");
    let document = char_prefix(source, DOCUMENT_CHARS);
    let seen = char_prefix(document, DOCUMENT_CHARS * 99 / 100);
    let later = &source[document.len()..];
    // Each message: the seen 99 %, then 1 % of text never seen, then a question.
    let messages: Vec<Vec<u8>> = (0..PREFIX_ROUNDS)
        .map(|i| {
            let skip = char_prefix(later, i * 5_000).len();
            let fresh = char_prefix(&later[skip..], DOCUMENT_CHARS / 100);
            user_message(&format!(
                "{seen}{fresh}\n\nQuestion {i}: what does this add?"
            ))
        })
        .collect();
    let seen_message = user_message(&format!("{document}\n\nQuestion: what is this about?"));
    let mut threads = vec![1];
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if cores > 1 {
        threads.push(cores.min(8));
    }
    println!("\n[routing a 100k-token user message: parse + render + tokenize + block hashes, {PREFIX_ROUNDS} messages]");
    println!("(CPU: this thread's time, mean; with 2+ threads the other threads' time is not in it. wall: median)");
    println!(
        "{:>7} | {:>7} | {:>15} | {:>21} | {:>15} | {:>17}",
        "threads", "tokens", "cold CPU/wall", "first 99 % seen", "seen whole", "cold / 99 % seen"
    );
    for threads in threads {
        let model = load(tokenizer_dir).with_threads(threads);
        route(&model, &hasher, &messages[0]);
        let (cold, count) = timed_loop(messages.iter(), |body| {
            model.clear_piece_cache();
            route(&model, &hasher, body)
        });
        model.clear_piece_cache();
        route(&model, &hasher, &seen_message);
        let before = model.cache_stats().prefix_hits;
        let (prefix, prefix_count) =
            timed_loop(messages.iter(), |body| route(&model, &hasher, body));
        assert_eq!(prefix_count, count);
        assert_eq!(
            model.cache_stats().prefix_hits - before,
            PREFIX_ROUNDS as u64,
            "every message reuses the seen prefix"
        );
        let (whole, _) = timed_loop(std::iter::repeat_n(&messages[0], PREFIX_ROUNDS), |body| {
            route(&model, &hasher, body)
        });
        let cell = |sample: &Sample| format!("{:.2} / {:.2}", ms(sample.cpu), ms(sample.wall));
        println!(
            "{threads:>7} | {count:>7} | {:>15} | {:>21} | {:>15} | {:>16.1}x",
            cell(&cold),
            cell(&prefix),
            cell(&whole),
            cold.wall.as_secs_f64() / prefix.wall.as_secs_f64()
        );
    }
}

fn main() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shared = arg("--shared")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../shared"));
    let tokenizer_dir = arg("--tokenizer-dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join(".tokenizers/qwen3"));
    let source = loogle_text(&shared);
    // A smoke run tokenizes the 4k conversation a few times.
    let scenarios = if smoke::smoke() {
        vec![scenario("chat-4k", &source, 4_000, 3)]
    } else {
        vec![
            scenario("chat-4k", &source, 4_000, 41),
            scenario("chat-100k", &source, 100_000, 7),
        ]
    };
    let measured: Vec<Measured> = scenarios
        .iter()
        .map(|s| measure(&tokenizer_dir, s, smoke::size(5, 1)))
        .collect();
    let python = python_baseline(&tokenizer_dir, &scenarios);
    for (m, py) in measured.iter().zip(&python) {
        for sample in [&m.first, &m.cold, &m.warm] {
            smoke::figure("kvgate time", sample.wall.as_secs_f64());
        }
        // A measurement without Python reports n/a for it; the smoke run insists on it.
        if smoke::smoke() {
            let py = py
                .as_ref()
                .expect("the Python transformers baseline did not run");
            smoke::figure("python time", py.median.wall.as_secs_f64());
        }
    }

    println!("tokenize bench: one thread, parse + render + tokenize of a Qwen3 chat request");
    let clocks: [(&str, Clock); 2] = [
        ("CPU time of the thread, mean per request", |s| s.cpu),
        ("wall clock, median", |s| s.wall),
    ];
    for (label, clock) in clocks {
        println!("\n[{label}]");
        println!(
            "{:<10} {:>7} | {:>18} | {:>18} | {:>18} | {:>9} | {:>17} | {:>23}",
            "scenario",
            "tokens",
            "first ms (Mtok/s)",
            "cold ms (Mtok/s)",
            "warm ms (Mtok/s)",
            "HF enc ms",
            "python first/med",
            "speedup first/cold/warm"
        );
        for ((scenario, m), py) in scenarios.iter().zip(&measured).zip(&python) {
            if let Some(py) = py {
                assert_eq!(
                    py.tokens, m.tokens,
                    "python and kvgate disagree on {}",
                    scenario.name
                );
            }
            let cell = |sample: &Sample| {
                let time = clock(sample);
                format!("{:.2} ({:.2})", ms(time), mtok_per_s(m.tokens, time))
            };
            let (python_cell, speedup) = match py {
                Some(py) => (
                    format!("{:.1} / {:.1}", ms(clock(&py.first)), ms(clock(&py.median))),
                    format!(
                        "{:.1}x / {:.1}x / {:.1}x",
                        clock(&py.first).as_secs_f64() / clock(&m.first).as_secs_f64(),
                        clock(&py.median).as_secs_f64() / clock(&m.cold).as_secs_f64(),
                        clock(&py.median).as_secs_f64() / clock(&m.warm).as_secs_f64()
                    ),
                ),
                None => ("n/a".to_owned(), "n/a".to_owned()),
            };
            println!(
                "{:<10} {:>7} | {:>18} | {:>18} | {:>18} | {:>9.2} | {:>17} | {:>23}",
                scenario.name,
                m.tokens,
                cell(&m.first),
                cell(&m.cold),
                cell(&m.warm),
                ms(clock(&m.whole_encode)),
                python_cell,
                speedup,
            );
        }
    }
    println!("\nfirst: fresh tokenizer, every cache empty; cold: segment cache emptied, word caches warm;");
    println!("warm: the conversation's previous request was seen; HF enc: Tokenizer::encode of the rendered prompt;");
    println!("speedup: python first / kvgate first, python median / kvgate cold, python median / kvgate warm");
    prefix_reuse(&tokenizer_dir, &source);
}
