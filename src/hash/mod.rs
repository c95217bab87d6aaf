//! vLLM's chained prefix-cache block hashes, bit-exact per release (docs: vllm-kv-events.md §6, §8).
//!
//! Block i of a prompt hashes `(parent, tokens_i, extra_i)` with the configured algorithm, where the
//! parent is block i-1's full digest (NONE_HASH for block 0). Events carry a 64-bit value derived from
//! the digest ([`BlockHash::key`]); the index keys on that, chains use the full [`Digest`].

mod cbor;
mod pickle;

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use crate::vllm::VllmRelease;

/// `--prefix-caching-hash-algo` values kvgate can reproduce. `builtin` (Python's `hash()`) is not
/// one: it is not reproducible outside the vLLM process (§6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum HashAlgo {
    /// 0.10.0–0.10.1.1: low 64 bits of SHA-256 over canonical CBOR, chained as ints.
    #[serde(rename = "sha256_cbor_64bit")]
    Sha256Cbor64bit,
    /// SHA-256 over pickle protocol 5 (vLLM's default from 0.10.2).
    Sha256,
    /// SHA-256 over canonical CBOR (0.10.2+).
    Sha256Cbor,
    /// XXH3-128 over pickle (0.13+).
    Xxhash,
    /// XXH3-128 over canonical CBOR (0.13+).
    XxhashCbor,
}

impl HashAlgo {
    /// The name vLLM's `--prefix-caching-hash-algo` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256Cbor64bit => "sha256_cbor_64bit",
            Self::Sha256 => "sha256",
            Self::Sha256Cbor => "sha256_cbor",
            Self::Xxhash => "xxhash",
            Self::XxhashCbor => "xxhash_cbor",
        }
    }

    const ALL: [Self; 5] = [
        Self::Sha256Cbor64bit,
        Self::Sha256,
        Self::Sha256Cbor,
        Self::Xxhash,
        Self::XxhashCbor,
    ];

    fn serializer(self) -> Serializer {
        match self {
            Self::Sha256 | Self::Xxhash => Serializer::Pickle,
            Self::Sha256Cbor64bit | Self::Sha256Cbor | Self::XxhashCbor => Serializer::Cbor,
        }
    }

    fn function(self) -> HashFunction {
        match self {
            Self::Sha256Cbor64bit | Self::Sha256 | Self::Sha256Cbor => HashFunction::Sha256,
            Self::Xxhash | Self::XxhashCbor => HashFunction::Xxh3_128,
        }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "builtin" {
            return Err(HashConfigError::BuiltinAlgo);
        }
        Self::ALL
            .into_iter()
            .find(|algo| algo.name() == s)
            .ok_or_else(|| HashConfigError::UnknownAlgo(s.to_string()))
    }
}

impl TryFrom<String> for HashAlgo {
    type Error = HashConfigError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// What decides a model's block hashes: vLLM's `--prefix-caching-hash-algo`, `--block-size`, the pods'
/// `PYTHONHASHSEED` and the vLLM release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashSettings {
    pub algo: HashAlgo,
    pub block_size: usize,
    /// PYTHONHASHSEED exactly as set on the pods (vLLM hashes the string); `None` = unset.
    pub seed: Option<String>,
    pub release: VllmRelease,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashConfigError {
    #[error(
        "hash algorithm \"builtin\" is not supported: it is Python's per-process hash(), which no other \
         process can reproduce; run vLLM with --prefix-caching-hash-algo sha256_cbor (or sha256_cbor_64bit \
         on 0.10.0–0.10.1.1)"
    )]
    BuiltinAlgo,
    #[error(
        "unknown hash algorithm {0:?}: expected one of sha256_cbor_64bit, sha256, sha256_cbor, xxhash, xxhash_cbor"
    )]
    UnknownAlgo(String),
    #[error("vLLM {release} is older than {oldest}, the oldest release whose KV events kvgate understands")]
    ReleaseTooOld {
        release: VllmRelease,
        oldest: VllmRelease,
    },
    #[error(
        "hash algorithm sha256_cbor_64bit does not exist in vLLM {release} (only 0.10.0–0.10.1.1, vLLM would \
         refuse to start); use sha256_cbor on vLLM 0.10.2+ (event values are still the low 64 bits of SHA-256 \
         over CBOR)"
    )]
    Sha256Cbor64bitRemoved { release: VllmRelease },
    #[error(
        "hash algorithm sha256_cbor does not exist in vLLM {release} (it arrived in 0.10.2); on 0.10.0–0.10.1.1 \
         use sha256_cbor_64bit"
    )]
    Sha256CborTooNew { release: VllmRelease },
    #[error("hash algorithm {algo} does not exist in vLLM {release} (xxhash and xxhash_cbor arrived in 0.13.0)")]
    XxhashTooNew {
        algo: HashAlgo,
        release: VllmRelease,
    },
    #[error(
        "hash algorithm sha256 on vLLM {release} makes 256-bit block hashes that vLLM's event publisher cannot \
         encode (msgspec OverflowError): every batch with a BlockStored or BlockRemoved is dropped, so kvgate \
         would never see the cache; use sha256_cbor_64bit on 0.10.0–0.10.1.1, or vLLM 0.10.2+"
    )]
    UnpublishableSha256 { release: VllmRelease },
    #[error("block size must be positive")]
    ZeroBlockSize,
    #[error(
        "PYTHONHASHSEED is unset, so vLLM {release} with {algo} starts every process from a random NONE_HASH and \
         nobody else can reproduce its block hashes{hint}; set PYTHONHASHSEED to one value on all pods and \
         hashSeed to the same value in kvgate"
    )]
    UnsetSeed {
        algo: HashAlgo,
        release: VllmRelease,
        hint: &'static str,
    },
    #[error(
        "PYTHONHASHSEED {0:?} is not a value Python accepts (\"random\" or an integer 0–4294967295), so the pods \
         could not start with it; set hashSeed to the pods' PYTHONHASHSEED exactly as written"
    )]
    InvalidSeed(String),
}

/// The release eras that change what enters a block hash (vectors: `eras`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Era {
    /// 0.10.0–0.10.1.1: int chain values, LoRA int id.
    IntChain,
    /// 0.10.2–0.11.0: digest bytes chain, LoRA int id.
    BytesLoraId,
    /// 0.11.1–0.28: LoRA name.
    LoraName,
    /// 0.29–0.30: an unset seed means "vllm-none-hash" for sha256 and sha256_cbor.
    FixedDefaultSeed,
    /// 0.31+: tagged extra keys.
    Tagged,
}

impl Era {
    fn of(release: VllmRelease) -> Self {
        if release < VllmRelease::new(0, 10, 2) {
            Self::IntChain
        } else if release < VllmRelease::new(0, 11, 1) {
            Self::BytesLoraId
        } else if release < VllmRelease::new(0, 29, 0) {
            Self::LoraName
        } else if release < VllmRelease::new(0, 31, 0) {
            Self::FixedDefaultSeed
        } else {
            Self::Tagged
        }
    }
}

/// The seed vLLM 0.29+ uses for sha256 and sha256_cbor when PYTHONHASHSEED is unset.
const DEFAULT_SEED: &str = "vllm-none-hash";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serializer {
    Cbor,
    Pickle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HashFunction {
    Sha256,
    Xxh3_128,
}

/// How a chain value is held and serialized as the next block's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum DigestForm {
    /// 0.10.x `sha256_cbor_64bit`: a Python int below 2^64.
    Int64,
    /// 0.10.x `sha256`: a 256-bit Python int.
    Int256,
    /// 0.10.2+ xxhash: 16 digest bytes.
    Bytes16,
    /// 0.10.2+ sha256: 32 digest bytes.
    Bytes32,
}

impl DigestForm {
    fn len(self) -> usize {
        match self {
            Self::Int64 => 8,
            Self::Bytes16 => 16,
            Self::Int256 | Self::Bytes32 => 32,
        }
    }
}

/// A block's chain value as vLLM holds it: 32 bytes (sha256*), 16 (xxhash*), or an int on 0.10.x
/// (kept as its big-endian bytes). Chains feed the full digest into the next block.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    form: DigestForm,
    bytes: [u8; 32],
}

impl Digest {
    fn new(form: DigestForm, raw: &[u8]) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..raw.len()].copy_from_slice(raw);
        Self { form, bytes }
    }

    /// The raw digest bytes, what events carry with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`; for the
    /// 0.10.x int chains, the int as fixed-width big-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.form.len()]
    }

    /// The 64-bit value events carry by default: the digest's last 8 bytes as a big-endian u64 (on
    /// 0.10.x `sha256_cbor_64bit`, the int itself).
    pub fn key(&self) -> u64 {
        let end = self.form.len();
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&self.bytes[end - 8..end]);
        u64::from_be_bytes(tail)
    }

    fn as_parent(&self) -> Parent<'_> {
        match self.form {
            DigestForm::Int64 | DigestForm::Int256 => Parent::Int(self.as_bytes()),
            DigestForm::Bytes16 | DigestForm::Bytes32 => Parent::Bytes(self.as_bytes()),
        }
    }

    /// Python's truth test on the parent: an int chain value of 0 is replaced by NONE_HASH.
    fn is_falsy(&self) -> bool {
        matches!(self.form, DigestForm::Int64 | DigestForm::Int256)
            && self.as_bytes().iter().all(|&b| b == 0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// One full block's hash: the chain value and the 64-bit value events carry for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash {
    pub digest: Digest,
    pub key: u64,
}

/// The index key of a hash that arrived as raw bytes (events with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`):
/// the last 8 bytes, big-endian. `None` for fewer than 8 bytes.
pub fn key_from_event_bytes(bytes: &[u8]) -> Option<u64> {
    let tail = bytes
        .len()
        .checked_sub(8)
        .and_then(|start| bytes.get(start..))?;
    tail.try_into().ok().map(u64::from_be_bytes)
}

/// Per-request inputs that enter block hashes besides the tokens (§6.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtraKeys {
    pub lora: Option<LoraKey>,
    /// The request's `cache_salt`; an empty salt is no salt, as in vLLM.
    pub cache_salt: Option<String>,
}

/// A LoRA adapter as the pods know it. The release decides which part enters the hash: the int id
/// (≤0.11.0), the name (0.11.1–0.30), or ("lora", name, path) (0.31+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraKey {
    pub name: String,
    pub int_id: i64,
    pub path: String,
}

/// A chain parent as it is serialized.
#[derive(Clone, Copy)]
enum Parent<'a> {
    /// A Python int, as big-endian bytes.
    Int(&'a [u8]),
    Bytes(&'a [u8]),
}

/// One element of the extra-keys tuple.
#[derive(Clone, Copy)]
enum KeyItem<'a> {
    Int(i64),
    Str(&'a str),
    /// `(tag, a)`, e.g. `("cache_salt", salt)`.
    Tagged2(&'static str, &'a str),
    /// `(tag, a, b)`, e.g. `("lora", name, path)`.
    Tagged3(&'static str, &'a str, &'a str),
}

thread_local! {
    /// Pre-image buffer reused across calls so hashing allocates nothing once warm.
    static PREIMAGE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Computes one model's block hashes. Built once from its settings; immutable, Send + Sync.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    settings: HashSettings,
    era: Era,
    form: DigestForm,
    none_hash: Digest,
}

impl BlockHasher {
    /// A hasher for a configuration whose hashes vLLM publishes and others can reproduce.
    pub fn new(settings: &HashSettings) -> Result<Self, HashConfigError> {
        let hasher = Self::new_for_inspection(settings)?;
        if hasher.form == DigestForm::Int256 {
            return Err(HashConfigError::UnpublishableSha256 {
                release: settings.release,
            });
        }
        Ok(hasher)
    }

    /// Like [`BlockHasher::new`], but also accepts sha256 on 0.10.x, whose 256-bit hashes vLLM computes
    /// yet cannot publish (§9.2), so `kvgate inspect` can show what such pods hold. Their
    /// [`BlockHash::key`] matches no event.
    pub fn new_for_inspection(settings: &HashSettings) -> Result<Self, HashConfigError> {
        let release = settings.release;
        if release < VllmRelease::OLDEST {
            return Err(HashConfigError::ReleaseTooOld {
                release,
                oldest: VllmRelease::OLDEST,
            });
        }
        if release > VllmRelease::NEWEST {
            tracing::warn!(
                %release,
                newest = %VllmRelease::NEWEST,
                "vLLM release is newer than the block hash spec kvgate was checked against; hashing as the newest"
            );
        }
        let era = Era::of(release);
        let algo = settings.algo;
        let form = match (algo, era) {
            (HashAlgo::Sha256Cbor64bit, Era::IntChain) => DigestForm::Int64,
            (HashAlgo::Sha256Cbor64bit, _) => {
                return Err(HashConfigError::Sha256Cbor64bitRemoved { release })
            }
            (HashAlgo::Sha256, Era::IntChain) => DigestForm::Int256,
            (HashAlgo::Sha256Cbor, Era::IntChain) => {
                return Err(HashConfigError::Sha256CborTooNew { release })
            }
            (HashAlgo::Sha256 | HashAlgo::Sha256Cbor, _) => DigestForm::Bytes32,
            (HashAlgo::Xxhash | HashAlgo::XxhashCbor, _)
                if release < VllmRelease::new(0, 13, 0) =>
            {
                return Err(HashConfigError::XxhashTooNew { algo, release });
            }
            (HashAlgo::Xxhash | HashAlgo::XxhashCbor, _) => DigestForm::Bytes16,
        };
        if settings.block_size == 0 {
            return Err(HashConfigError::ZeroBlockSize);
        }
        let seed = match settings.seed.as_deref() {
            Some(seed) => {
                validate_seed(seed)?;
                seed
            }
            None if era >= Era::FixedDefaultSeed
                && matches!(algo, HashAlgo::Sha256 | HashAlgo::Sha256Cbor) =>
            {
                DEFAULT_SEED
            }
            None => {
                let hint = match algo {
                    HashAlgo::Sha256 | HashAlgo::Sha256Cbor => {
                        " (from vLLM 0.29 sha256 and sha256_cbor need no seed)"
                    }
                    HashAlgo::Sha256Cbor64bit | HashAlgo::Xxhash | HashAlgo::XxhashCbor => "",
                };
                return Err(HashConfigError::UnsetSeed {
                    algo,
                    release,
                    hint,
                });
            }
        };
        let none_hash = PREIMAGE.with_borrow_mut(|buf| {
            seed_preimage(algo, seed, buf);
            digest_of(algo, form, buf)
        });
        Ok(Self {
            settings: settings.clone(),
            era,
            form,
            none_hash,
        })
    }

    pub fn settings(&self) -> &HashSettings {
        &self.settings
    }

    /// H(seed): the parent of every request's first block.
    pub fn none_hash(&self) -> Digest {
        self.none_hash
    }

    /// A chain value received as raw digest bytes (events with int block hashes off), or `None` if the
    /// length does not fit this hasher's algorithm.
    pub fn digest_from_event_bytes(&self, bytes: &[u8]) -> Option<Digest> {
        let bytes_form = matches!(self.form, DigestForm::Bytes16 | DigestForm::Bytes32);
        (bytes_form && bytes.len() == self.form.len()).then(|| Digest::new(self.form, bytes))
    }

    /// A chain value received as an event int. Only on 0.10.x `sha256_cbor_64bit` is the event int the
    /// whole chain value; elsewhere it is a truncation and `None` is returned.
    pub fn digest_from_event_int(&self, value: u64) -> Option<Digest> {
        (self.form == DigestForm::Int64).then(|| Digest::new(self.form, &value.to_be_bytes()))
    }

    /// Appends one [`BlockHash`] per full block of `tokens`, chained from NONE_HASH. Allocation-free
    /// apart from `out`.
    pub fn hash_prompt(&self, tokens: &[u32], extra: &ExtraKeys, out: &mut Vec<BlockHash>) {
        self.hash_continuation(None, 0, tokens, extra, out);
    }

    /// Continues a chain: hashes the full blocks of `tokens`, whose first block has index
    /// `first_block_index` in its request and follows `parent`. As in vLLM, a `None` parent means
    /// NONE_HASH, and block-0-only keys (cache_salt) apply to the block whose index is 0.
    pub fn hash_continuation(
        &self,
        parent: Option<Digest>,
        first_block_index: usize,
        tokens: &[u32],
        extra: &ExtraKeys,
        out: &mut Vec<BlockHash>,
    ) {
        let block_size = self.settings.block_size;
        out.reserve(tokens.len() / block_size);
        PREIMAGE.with_borrow_mut(|buf| {
            let mut parent = parent;
            for (offset, block) in tokens.chunks_exact(block_size).enumerate() {
                // Only index 0 is special (cache_salt), so saturating keeps a huge caller index harmless.
                let block_index = first_block_index.saturating_add(offset);
                self.preimage(parent, block_index, block, extra, buf);
                let digest = digest_of(self.settings.algo, self.form, buf);
                out.push(BlockHash {
                    digest,
                    key: digest.key(),
                });
                parent = Some(digest);
            }
        });
    }

    /// Replaces `out` with the serialized pre-image of block `block_index` (for `kvgate inspect` and the
    /// vectors test).
    pub fn preimage(
        &self,
        parent: Option<Digest>,
        block_index: usize,
        block_tokens: &[u32],
        extra: &ExtraKeys,
        out: &mut Vec<u8>,
    ) {
        let parent = match parent {
            Some(digest) if !digest.is_falsy() => digest,
            _ => self.none_hash,
        };
        let mut items = [KeyItem::Int(0); 2];
        let mut count = 0;
        if let Some(lora) = &extra.lora {
            items[count] = match self.era {
                Era::IntChain | Era::BytesLoraId => KeyItem::Int(lora.int_id),
                Era::LoraName | Era::FixedDefaultSeed => KeyItem::Str(&lora.name),
                Era::Tagged => KeyItem::Tagged3("lora", &lora.name, &lora.path),
            };
            count += 1;
        }
        if let Some(salt) = extra
            .cache_salt
            .as_deref()
            .filter(|salt| block_index == 0 && !salt.is_empty())
        {
            items[count] = match self.era {
                Era::Tagged => KeyItem::Tagged2("cache_salt", salt),
                _ => KeyItem::Str(salt),
            };
            count += 1;
        }
        let items = &items[..count];
        match self.settings.algo.serializer() {
            Serializer::Cbor => cbor::block_preimage(parent.as_parent(), block_tokens, items, out),
            Serializer::Pickle => {
                pickle::block_preimage(parent.as_parent(), block_tokens, items, out)
            }
        }
    }

    /// Replaces `out` with the serialized pre-image of NONE_HASH (the seed string).
    pub fn none_hash_preimage(&self, out: &mut Vec<u8>) {
        // `new` only succeeds without a seed where vLLM falls back to DEFAULT_SEED.
        let seed = self.settings.seed.as_deref().unwrap_or(DEFAULT_SEED);
        seed_preimage(self.settings.algo, seed, out);
    }
}

fn seed_preimage(algo: HashAlgo, seed: &str, out: &mut Vec<u8>) {
    match algo.serializer() {
        Serializer::Cbor => cbor::seed_preimage(seed, out),
        Serializer::Pickle => pickle::seed_preimage(seed, out),
    }
}

fn digest_of(algo: HashAlgo, form: DigestForm, preimage: &[u8]) -> Digest {
    match algo.function() {
        HashFunction::Sha256 => {
            let full: [u8; 32] = sha2::Sha256::digest(preimage).into();
            match form {
                // `& (2**64 - 1)` on the big-endian int keeps the last 8 bytes.
                DigestForm::Int64 => Digest::new(form, &full[24..]),
                DigestForm::Int256 | DigestForm::Bytes16 | DigestForm::Bytes32 => {
                    Digest::new(form, &full)
                }
            }
        }
        HashFunction::Xxh3_128 => {
            Digest::new(form, &xxhash_rust::xxh3::xxh3_128(preimage).to_be_bytes())
        }
    }
}

/// Python refuses to start unless PYTHONHASHSEED is empty, "random" or an integer 0–4294967295 (parsed
/// like C `strtoul`: optional leading whitespace and sign). vLLM then hashes the string as written.
fn validate_seed(seed: &str) -> Result<(), HashConfigError> {
    if seed.is_empty() || seed == "random" {
        return Ok(());
    }
    let invalid = || HashConfigError::InvalidSeed(seed.to_string());
    let digits = seed.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    // All-digit strings too long for u64 are out of range as well.
    match digits.parse::<u64>() {
        Ok(value) if value <= u64::from(u32::MAX) => Ok(()),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(algo: HashAlgo, release: &str, seed: Option<&str>) -> HashSettings {
        HashSettings {
            algo,
            block_size: 16,
            seed: seed.map(str::to_string),
            release: release.parse().expect("valid release"),
        }
    }

    fn error(algo: HashAlgo, release: &str, seed: Option<&str>) -> String {
        match BlockHasher::new(&settings(algo, release, seed)) {
            Ok(_) => panic!("{algo} on {release} with seed {seed:?} was accepted"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn algo_names_round_trip_and_builtin_is_refused() {
        for algo in HashAlgo::ALL {
            let json = serde_json::to_string(&algo).expect("serializes");
            assert_eq!(json, format!("\"{}\"", algo.name()));
            assert_eq!(
                serde_json::from_str::<HashAlgo>(&json).expect("parses"),
                algo
            );
        }
        let err = serde_json::from_str::<HashAlgo>("\"builtin\"").expect_err("builtin refused");
        assert!(
            err.to_string().contains("not reproducible") || err.to_string().contains("no other"),
            "{err}"
        );
        assert_eq!(
            "md5".parse::<HashAlgo>(),
            Err(HashConfigError::UnknownAlgo("md5".into()))
        );
    }

    #[test]
    fn algorithms_outside_their_releases_are_refused() {
        let msg = error(HashAlgo::Sha256Cbor64bit, "0.10.2", Some("42"));
        assert!(msg.contains("use sha256_cbor on vLLM 0.10.2+ (event values are still the low 64 bits of SHA-256 over CBOR)"), "{msg}");
        let msg = error(HashAlgo::Sha256Cbor, "0.10.1.1", Some("42"));
        assert!(msg.contains("use sha256_cbor_64bit"), "{msg}");
        let msg = error(HashAlgo::Xxhash, "0.12.0", Some("42"));
        assert!(msg.contains("0.13.0"), "{msg}");
        let msg = error(HashAlgo::Sha256, "0.10.1", Some("42"));
        assert!(
            msg.contains("cannot encode") && msg.contains("256-bit"),
            "{msg}"
        );
        assert!(
            BlockHasher::new_for_inspection(&settings(HashAlgo::Sha256, "0.10.1", Some("42")))
                .is_ok()
        );
        let msg = error(HashAlgo::Sha256Cbor, "0.9.2", Some("42"));
        assert!(msg.contains("older than 0.10.0"), "{msg}");
    }

    #[test]
    fn zero_block_size_is_refused() {
        let mut zero = settings(HashAlgo::Sha256Cbor, "0.33.0", Some("42"));
        zero.block_size = 0;
        assert_eq!(
            BlockHasher::new(&zero).err(),
            Some(HashConfigError::ZeroBlockSize)
        );
    }

    #[test]
    fn unset_seed_is_refused_unless_vllm_fixes_it() {
        for (algo, release) in [
            (HashAlgo::Sha256Cbor, "0.28.0"),
            (HashAlgo::Sha256, "0.11.0"),
            (HashAlgo::Sha256Cbor64bit, "0.10.1.1"),
            (HashAlgo::Xxhash, "0.33.0"),
            (HashAlgo::XxhashCbor, "0.29.0"),
        ] {
            let msg = error(algo, release, None);
            assert!(
                msg.contains("set PYTHONHASHSEED") && msg.contains("hashSeed"),
                "{msg}"
            );
        }
        assert!(error(HashAlgo::Sha256Cbor, "0.28.0", None).contains("from vLLM 0.29"));
        for algo in [HashAlgo::Sha256, HashAlgo::Sha256Cbor] {
            assert!(BlockHasher::new(&settings(algo, "0.29.0", None)).is_ok());
        }
    }

    #[test]
    fn seeds_python_would_refuse_are_refused() {
        for seed in ["", "0", "42", "random", "4294967295", " 7", "+7"] {
            assert!(validate_seed(seed).is_ok(), "{seed:?}");
        }
        for seed in [
            "abc",
            "4294967296",
            "-1",
            "42 ",
            "+",
            "99999999999999999999999",
            "Random",
        ] {
            let err = validate_seed(seed).expect_err(seed);
            assert!(err.to_string().contains("Python accepts"), "{err}");
        }
    }

    #[test]
    fn event_keys_are_the_last_eight_bytes() {
        assert_eq!(
            key_from_event_bytes(&[9, 0, 0, 0, 0, 0, 0, 1, 2]),
            Some(0x0102)
        );
        assert_eq!(key_from_event_bytes(&[1, 2, 3]), None);
        let hasher =
            BlockHasher::new(&settings(HashAlgo::Sha256Cbor, "0.33.0", Some("42"))).expect("valid");
        let none = hasher.none_hash();
        assert_eq!(key_from_event_bytes(none.as_bytes()), Some(none.key()));
        assert_eq!(none.key(), 0xa74f_fcc4_f31c_1780);
        assert_eq!(hasher.digest_from_event_bytes(none.as_bytes()), Some(none));
        assert_eq!(hasher.digest_from_event_int(none.key()), None);
    }

    #[test]
    fn hasher_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<BlockHasher>();
    }

    #[test]
    fn continuation_matches_the_whole_prompt() {
        let hasher =
            BlockHasher::new(&settings(HashAlgo::Sha256, "0.33.0", Some("42"))).expect("valid");
        let tokens: Vec<u32> = (0..100).map(|i| i * 7919).collect();
        let extra = ExtraKeys {
            lora: None,
            cache_salt: Some("salt".into()),
        };
        let mut whole = Vec::new();
        hasher.hash_prompt(&tokens, &extra, &mut whole);
        assert_eq!(whole.len(), 6);
        let mut head = Vec::new();
        hasher.hash_continuation(None, 0, &tokens[..32], &extra, &mut head);
        hasher.hash_continuation(Some(head[1].digest), 2, &tokens[32..], &extra, &mut head);
        assert_eq!(head, whole);
    }
}
