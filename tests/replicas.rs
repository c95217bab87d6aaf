//! Issue 7.4 with real processes: several `kvgate serve` replicas in connect mode, each
//! subscribed to every pod's KV events, sharing no store. The pods are `kvgate sim`
//! pods (the stand-in for vLLM): they cache prompt blocks, publish BlockStored over
//! ZeroMQ PUB sockets they bind, and report `usage.prompt_tokens_details.cached_tokens`.
//!
//! Each conversation's first turn goes to one replica and its second turn to another,
//! as a `LoadBalancer` Service may do. The replica that never saw the first turn must
//! still send the second to the pod holding its prefix: it learns where the prefix is
//! from the pod's events alone. Checked from the pods' own answers (cached tokens).

// Shared by the tests that start `kvgate sim` pods, each using part of it.
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;
// Shared with the gateway tests, which use more of it.
#[allow(dead_code)]
mod upstream;

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use sim::{document, SimPods, BLOCK};
use upstream::{http_request, metric, wait_for, Serve};

const PODS: usize = 4;
const REPLICAS: usize = 3;
const CONVERSATIONS: usize = 12;
const MODEL: &str = "qwen";
const LIMIT: Duration = Duration::from_secs(60);

/// One `kvgate serve` replica with its own ports and config file.
struct Replica {
    _serve: Serve,
    listen: u16,
    admin: u16,
}

impl Replica {
    fn start(dir: &Path, n: usize, sim: &SimPods) -> Self {
        let config = dir.join(format!("kvgate-{n}.yaml"));
        // Port 0 for both listeners: the replica reports what the OS picked.
        let yaml = sim.gateway_config(MODEL, 0, 0, 0);
        fs::write(&config, yaml).expect("write config");
        let (serve, listening) = Serve::start(&config, &dir.join(format!("kvgate-{n}.log")), &[]);
        let replica = Self {
            _serve: serve,
            listen: listening.proxy,
            admin: listening.admin,
        };
        wait_for("replica ready", LIMIT, || {
            (http_request(replica.admin, "GET", "/readyz", &[], b"").0 == 200).then_some(())
        });
        replica
    }

    fn chat(&self, messages: &Value) -> Value {
        let body = json!({"model": MODEL, "messages": messages, "max_tokens": 4});
        let (status, response) = http_request(
            self.listen,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
        let response: Value = serde_json::from_slice(&response).expect("JSON response");
        assert_eq!(status, 200, "{response}");
        response
    }

    /// Index entries (block, pod) this replica holds.
    fn index_entries(&self) -> f64 {
        metric(self.admin, "kvgate_index_entries")
    }
}

#[test]
fn a_second_turn_on_another_replica_finds_the_first_turns_pod() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = SimPods::start_publishing(dir.path(), MODEL, PODS);
    let replicas: Vec<Replica> = (0..REPLICAS)
        .map(|n| Replica::start(dir.path(), n, &sim))
        .collect();

    let mut first_turns = Vec::new();
    for c in 0..CONVERSATIONS {
        let messages =
            json!([{"role": "user", "content": format!("{}\nWhere is fact{c}x5?", document(c))}]);
        let answer = replicas[c % REPLICAS].chat(&messages);
        first_turns.push((messages, answer));
    }
    // Every replica indexes every pod's events: each holds at least the first turns' full
    // prompt blocks, and they converge on the same entries.
    let prompt_blocks: u64 = first_turns
        .iter()
        .map(|(_, answer)| {
            answer["usage"]["prompt_tokens"]
                .as_u64()
                .expect("prompt tokens")
        })
        .map(|tokens| tokens / BLOCK as u64)
        .sum();
    wait_for("replicas index the first turns", LIMIT, || {
        let entries: Vec<f64> = replicas.iter().map(Replica::index_entries).collect();
        (entries[0] >= prompt_blocks as f64 && entries.iter().all(|&e| e == entries[0]))
            .then_some(())
    });

    for (c, (messages, answer)) in first_turns.iter().enumerate() {
        let prompt = answer["usage"]["prompt_tokens"]
            .as_u64()
            .expect("prompt tokens");
        let mut turns = messages.as_array().cloned().expect("messages");
        turns.push(
            json!({"role": "assistant", "content": answer["choices"][0]["message"]["content"]}),
        );
        turns.push(json!({"role": "user", "content": format!("And fact{c}x9?")}));
        let other = &replicas[(c + 1) % REPLICAS];
        let second = other.chat(&Value::Array(turns));
        let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached tokens");
        assert!(
            cached + 2 * BLOCK as u64 >= prompt,
            "conversation {c}: the second replica sent its second turn to a pod holding {cached} of the first turn's {prompt} tokens"
        );
    }
}
