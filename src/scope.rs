//! Index scopes. vLLM's block hashes already differ per LoRA adapter (the adapter
//! is an extra key), but the 64-bit event values of two models served by
//! different pods could collide, so every index entry is scoped by
//! (served model, adapter). Scope ids are a stable hash of the names, so they
//! survive config reloads and reordering, and every kvgate replica agrees.

use xxhash_rust::xxh3::xxh3_64;

/// Index scope of a model, or of one of its LoRA adapters.
pub fn scope_id(model: &str, adapter: Option<&str>) -> u32 {
    let mut key = Vec::with_capacity(model.len() + 1 + adapter.map_or(0, str::len));
    key.extend_from_slice(model.as_bytes());
    if let Some(adapter) = adapter {
        // 0xff never occurs in UTF-8, so ("a", "bc") and ("ab", "c") cannot meet.
        key.push(0xff);
        key.extend_from_slice(adapter.as_bytes());
    }
    xxh3_64(&key) as u32
}

#[cfg(test)]
mod tests {
    use super::scope_id;

    #[test]
    fn scopes_are_stable_and_distinct() {
        assert_eq!(scope_id("Qwen3-32B", None), scope_id("Qwen3-32B", None));
        assert_ne!(
            scope_id("Qwen3-32B", None),
            scope_id("Qwen3-32B", Some("sql-lora"))
        );
        assert_ne!(scope_id("a", Some("bc")), scope_id("ab", Some("c")));
    }
}
