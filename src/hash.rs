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
pub struct BlockHasher;
impl BlockHasher {
    pub fn new(_s: &HashSettings) -> Result<Self, HashConfigError> {
        Ok(Self)
    }
}
