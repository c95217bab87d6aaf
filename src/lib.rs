//! kvgate: a KV-cache-aware load balancer for vLLM fleets, built on Pingora.
//!
//! Data flows one way: request → tokens → block hashes → scores → pod; and
//! events → index. Each stage is one module.

pub mod bench;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod events;
pub mod flow;
pub mod gateway;
pub mod hash;
pub mod health;
pub mod index;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod pods;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod scheduler;
pub mod scope;
pub mod serve;
pub mod sim;
pub mod tls;
pub mod tokenize;
pub mod trace;
pub mod upgrade;
pub mod vllm;

/// The git commit kvgate was built from (`build.rs`: `KVGATE_GIT_COMMIT`, else `git rev-parse
/// HEAD`, else "unknown").
pub const COMMIT: &str = env!("KVGATE_COMMIT");
/// What `kvgate --version` prints after the name.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KVGATE_COMMIT"),
    ")"
);

#[path = "../plugins/mod.rs"]
pub mod plugins;
