//! Reads `usage` out of a response as it streams by, for the predicted-vs-actual
//! cached-token comparison. Never buffers the response: a JSON body keeps only a
//! bounded tail (vLLM writes `usage` after `choices`), an SSE stream only its current
//! line (the usage chunk, when `stream_options.include_usage` asks for it, is the last
//! `data:` line that has one).

use serde::Deserialize;

/// Bytes of a JSON body's end kept to find `usage` in.
const JSON_TAIL: usize = 16 << 10;
/// Longest SSE line examined; longer lines are token chunks, not the usage chunk.
const SSE_MAX_LINE: usize = 64 << 10;

/// What the pod reported about the prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct UsageJson {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Chunk {
    usage: Option<UsageJson>,
}

impl From<UsageJson> for Usage {
    fn from(u: UsageJson) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
            completion_tokens: u.completion_tokens,
        }
    }
}

enum Mode {
    Json { tail: Vec<u8> },
    Sse { line: Vec<u8>, skipping: bool },
    Ignore,
}

/// Fed every response body chunk in order; [`UsageTap::finish`] gives the usage found.
pub struct UsageTap {
    mode: Mode,
    found: Option<Usage>,
}

impl UsageTap {
    /// Picks the parser from the response's `Content-Type`.
    pub fn for_content_type(content_type: &[u8]) -> Self {
        let mode = if starts_with_ignore_case(content_type, b"text/event-stream") {
            Mode::Sse {
                line: Vec::new(),
                skipping: false,
            }
        } else if starts_with_ignore_case(content_type, b"application/json") {
            Mode::Json { tail: Vec::new() }
        } else {
            Mode::Ignore
        };
        Self { mode, found: None }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Json { tail } => {
                tail.extend_from_slice(chunk);
                // Trim in halves so the copy cost stays amortised O(1) per byte.
                if tail.len() > 2 * JSON_TAIL {
                    tail.drain(..tail.len() - JSON_TAIL);
                }
            }
            Mode::Sse { line, skipping } => {
                let mut rest = chunk;
                while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                    let (head, tail) = rest.split_at(end);
                    if !*skipping && line.len() + head.len() <= SSE_MAX_LINE {
                        line.extend_from_slice(head);
                        if let Some(usage) = sse_line_usage(line) {
                            self.found = Some(usage);
                        }
                    }
                    line.clear();
                    *skipping = false;
                    rest = tail.get(1..).unwrap_or_default();
                }
                if !*skipping {
                    if line.len() + rest.len() > SSE_MAX_LINE {
                        line.clear();
                        *skipping = true;
                    } else {
                        line.extend_from_slice(rest);
                    }
                }
            }
            Mode::Ignore => {}
        }
    }

    /// The usage of the response, when it carried one.
    pub fn finish(self) -> Option<Usage> {
        match self.mode {
            Mode::Json { tail } => json_tail_usage(&tail),
            Mode::Sse { line, skipping } => {
                // A stream may end without a final newline.
                let last = (!skipping && !line.is_empty())
                    .then(|| sse_line_usage(&line))
                    .flatten();
                last.or(self.found)
            }
            Mode::Ignore => None,
        }
    }
}

fn starts_with_ignore_case(value: &[u8], prefix: &[u8]) -> bool {
    value
        .get(..prefix.len())
        .is_some_and(|v| v.eq_ignore_ascii_case(prefix))
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

fn sse_line_usage(line: &[u8]) -> Option<Usage> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    // Token chunks are the bulk of the stream: skip JSON parsing unless `usage` is there.
    find_last(data, b"\"usage\"")?;
    serde_json::from_slice::<Chunk>(data.trim_ascii())
        .ok()?
        .usage
        .map(Usage::from)
}

/// Finds the last top-level-looking `"usage":` in `tail` and parses the value after it.
/// Inside JSON strings every `"` is escaped, so the quoted key cannot match generated text.
fn json_tail_usage(tail: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = find_last(tail.get(..end)?, KEY) {
        let after = tail.get(at + KEY.len()..)?.trim_ascii_start();
        if let Some(value) = after.strip_prefix(b":") {
            let mut values =
                serde_json::Deserializer::from_slice(value).into_iter::<Option<UsageJson>>();
            return values.next()?.ok()?.map(Usage::from);
        }
        end = at;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_in_pieces(tap: &mut UsageTap, body: &[u8], piece: usize) {
        for chunk in body.chunks(piece) {
            tap.feed(chunk);
        }
    }

    #[test]
    fn json_usage_found_in_tail_of_large_body() {
        let content = "x\\\"usage\\\": {}".repeat(10_000);
        let body = format!(
            r#"{{"id":"c","choices":[{{"message":{{"content":"{content}"}}}}],"usage":{{"prompt_tokens":120,"total_tokens":130,"completion_tokens":10,"prompt_tokens_details":{{"cached_tokens":96}}}},"kv_transfer_params":null}}"#
        );
        for piece in [1, 7, 4096, body.len()] {
            let mut tap = UsageTap::for_content_type(b"application/json");
            feed_in_pieces(&mut tap, body.as_bytes(), piece);
            assert_eq!(
                tap.finish(),
                Some(Usage {
                    prompt_tokens: Some(120),
                    cached_tokens: Some(96),
                    completion_tokens: Some(10),
                })
            );
        }
    }

    #[test]
    fn json_without_details_or_with_null_usage() {
        let mut tap = UsageTap::for_content_type(b"application/json; charset=utf-8");
        tap.feed(br#"{"usage":{"prompt_tokens":5,"prompt_tokens_details":null}}"#);
        assert_eq!(
            tap.finish(),
            Some(Usage {
                prompt_tokens: Some(5),
                cached_tokens: None,
                completion_tokens: None,
            })
        );
        let mut tap = UsageTap::for_content_type(b"application/json");
        tap.feed(br#"{"choices":[],"usage":null}"#);
        assert_eq!(tap.finish(), None);
    }

    #[test]
    fn sse_last_usage_chunk_wins_across_split_lines() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a \\\"usage\\\"\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"prompt_tokens_details\":{\"cached_tokens\":16}}}\r\n\r\n",
            "data: [DONE]\n\n"
        );
        for piece in [1, 3, 50, stream.len()] {
            let mut tap = UsageTap::for_content_type(b"text/event-stream");
            feed_in_pieces(&mut tap, stream.as_bytes(), piece);
            assert_eq!(
                tap.finish(),
                Some(Usage {
                    prompt_tokens: Some(40),
                    cached_tokens: Some(16),
                    completion_tokens: None,
                })
            );
        }
    }

    #[test]
    fn sse_without_usage_and_overlong_lines() {
        let mut tap = UsageTap::for_content_type(b"text/event-stream");
        let long = format!("data: {}\n", "y".repeat(SSE_MAX_LINE * 2));
        feed_in_pieces(&mut tap, long.as_bytes(), 1000);
        tap.feed(b"data: [DONE]\n\n");
        assert_eq!(tap.finish(), None);
    }

    #[test]
    fn other_content_types_are_ignored() {
        let mut tap = UsageTap::for_content_type(b"text/plain");
        tap.feed(br#"{"usage":{"prompt_tokens":1}}"#);
        assert_eq!(tap.finish(), None);
    }
}
