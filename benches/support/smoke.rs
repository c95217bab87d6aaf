//! Every benchmark is also a smoke test. `cargo bench` passes `--bench`: a full run.
//! `cargo test` runs the bench targets too (`test = true` in Cargo.toml), without that
//! argument: then a benchmark runs at tiny sizes, in seconds, and still reports its
//! figures, each checked to be a finite number above zero. A benchmark that no longer
//! builds, runs or measures fails the test suite instead of rotting until someone
//! reruns it.

/// Whether this is a smoke run (`cargo test`) rather than a measurement (`cargo bench`).
pub fn smoke() -> bool {
    !std::env::args().any(|arg| arg == "--bench")
}

/// `full` when measuring, `tiny` in a smoke run.
pub fn size<T>(full: T, tiny: T) -> T {
    if smoke() {
        tiny
    } else {
        full
    }
}

/// A figure the benchmark reports: a finite number above zero, or the run fails.
pub fn figure(name: &str, value: f64) -> f64 {
    assert!(
        value.is_finite() && value > 0.0,
        "{name} came out as {value}: the benchmark no longer measures it"
    );
    value
}
