//! TEMPORARY interface shim until the `hash` branch merges (replaced whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgo {
    Sha256Cbor64bit,
    Sha256,
    Sha256Cbor,
    Xxhash,
    XxhashCbor,
}
#[derive(Clone, Debug)]
pub struct HashSettings {
    pub algo: HashAlgo,
    pub block_size: usize,
    pub seed: Option<String>,
    pub release: crate::vllm::VllmRelease,
}
#[derive(Debug, thiserror::Error)]
#[error("shim")]
pub struct HashConfigError;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash {
    pub digest: u64,
    pub key: u64,
}
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtraKeys {
    pub lora: Option<LoraKey>,
    pub cache_salt: Option<String>,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraKey {
    pub name: String,
    pub int_id: i64,
    pub path: String,
}
#[derive(Clone, Debug)]
pub struct BlockHasher {
    block_size: usize,
}
impl BlockHasher {
    pub fn new(s: &HashSettings) -> Result<Self, HashConfigError> {
        if s.block_size == 0 {
            return Err(HashConfigError);
        }
        Ok(Self {
            block_size: s.block_size,
        })
    }
    pub fn hash_prompt(&self, tokens: &[u32], extra: &ExtraKeys, out: &mut Vec<BlockHash>) {
        let mut parent = xxhash_rust::xxh3::xxh3_64(
            format!(
                "{:?}{:?}",
                extra.lora.as_ref().map(|l| &l.name),
                extra.cache_salt
            )
            .as_bytes(),
        );
        for block in tokens.chunks_exact(self.block_size) {
            let mut bytes = parent.to_le_bytes().to_vec();
            for t in block {
                bytes.extend_from_slice(&t.to_le_bytes());
            }
            parent = xxhash_rust::xxh3::xxh3_64(&bytes);
            out.push(BlockHash {
                digest: parent,
                key: parent,
            });
        }
    }
}
