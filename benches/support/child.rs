//! Benchmarks that start kvgate (or `kvgate sim`) as a child process read what it reports
//! on stdout: one JSON line per event (`ready`, `listening`), addresses as `ip:port`.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::{Duration, Instant};

/// The first line of `child`'s stdout that parses as JSON with `key`, within 60 s.
pub fn json_line(child: &mut Child, key: &str) -> serde_json::Value {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {key:?} line within 60 s"));
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
            if value.get(key).is_some() {
                return value[key].clone();
            }
        }
    }
}

/// The port of an `ip:port` address in a JSON line.
pub fn port_of(address: &serde_json::Value) -> u16 {
    address
        .as_str()
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {address}"))
}
