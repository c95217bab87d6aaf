//! What the benchmarks that drive kvgate over HTTP share.

use std::time::{Duration, Instant};

/// POSTs the JSON `body` to `url` with `headers`, checks that the answer is a success, and
/// returns how long the whole exchange took, the answer's body read.
pub async fn timed_post(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: bytes::Bytes,
) -> Duration {
    let start = Instant::now();
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let resp = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status();
    let answer = resp.bytes().await.expect("read response body");
    assert!(
        status.is_success(),
        "POST {url}: {status} {}",
        String::from_utf8_lossy(&answer)
    );
    start.elapsed()
}
