//! Live hash-parity self-check: recompute a sample of the block hashes a pod
//! announces and compare. A wrong PYTHONHASHSEED, block size or hash algorithm
//! makes every announced hash differ from what kvgate computes for the same
//! tokens, so requests would never find their prefix; this check catches it on
//! the first events instead of as a silently low hit rate.
//!
//! A BlockStored run carries its tokens and the hash of the block before it.
//! Runs that start a request (no parent) chain from NONE_HASH and can always be
//! checked. A run that continues a prefix carries only the 64-bit truncation of
//! its parent, which cannot be chained from (except on 0.10.x, where the int is
//! the whole chain value), so it is checked only when kvgate computed that
//! parent itself: digests of agreeing runs are kept in a small direct-mapped
//! table per pod.
//!
//! Extra keys: the LoRA adapter comes from the event (name or int id, mapped
//! through the config); the cache salt only from `extra_keys` (0.17+). Before
//! 0.17 a salted request cannot be reproduced and looks like a disagreement,
//! which is why one disagreement alone does not condemn a pod: it is untrusted
//! when most checked runs disagree (all of them do when a setting is wrong), or
//! at once when its block size differs.

use std::fmt;

use crate::events::codec::{BlockStored, ExtraKey, ExtraKeys as EventExtraKeys};
use crate::events::stats::ParityVerdict;
use crate::hash::{BlockHash, BlockHasher, Digest, ExtraKeys, LoraKey};

/// Runs checked regardless of the sample rate, so a misconfiguration shows on
/// a pod's first requests.
const ALWAYS_CHECK: u64 = 8;
/// Checked runs before a majority of disagreements condemns a pod.
const MIN_CHECKS: u64 = 4;
/// Digests of verified blocks kept per pod, to check continuation runs.
const CHAIN_SLOTS: usize = 512;

/// Why a recomputed run disagrees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParityMismatch {
    /// The pod hashes blocks of another size.
    BlockSize { announced: u32, configured: usize },
    /// Block `block` of the run hashes differently.
    Hash {
        block: usize,
        announced: u64,
        computed: u64,
        /// The run starts a request (parent nil): only seed, algorithm, tokens and extra keys entered it.
        from_root: bool,
    },
}

impl fmt::Display for ParityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BlockSize {
                announced,
                configured,
            } => write!(
                f,
                "the pod announces blocks of {announced} tokens but blockSize is {configured}"
            ),
            Self::Hash {
                block,
                announced,
                computed,
                from_root,
            } => write!(
                f,
                "block {block} of a {} run: the pod announced {announced:#018x}, kvgate computes {computed:#018x} \
                 (check hashSeed against the pods' PYTHONHASHSEED, hashAlgo against --prefix-caching-hash-algo, \
                 and vllmRelease)",
                if *from_root { "root" } else { "continuation" }
            ),
        }
    }
}

/// What checking one BlockStored run found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParityOutcome {
    /// Not in the sample.
    NotSampled,
    /// Cannot be recomputed (unknown parent, multimodal or embeds keys, …).
    Unverifiable(&'static str),
    Agree,
    Disagree(ParityMismatch),
}

/// One pod's parity state.
#[derive(Debug)]
pub struct ParityChecker {
    /// A sample of 0 turns checking off.
    enabled: bool,
    /// Runs whose first hash mixes below this are sampled.
    threshold: u64,
    checked: u64,
    mismatched: u64,
    untrusted: bool,
    chain: Box<[Option<(u64, Digest)>]>,
    scratch: Vec<BlockHash>,
}

impl ParityChecker {
    /// `sample`: fraction of runs (0..=1) re-hashed after the first few; 0
    /// turns the check off.
    pub fn new(sample: f64) -> Self {
        let sample = if sample.is_finite() {
            sample.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Self {
            enabled: sample > 0.0,
            threshold: (sample * u64::MAX as f64) as u64,
            checked: 0,
            mismatched: 0,
            untrusted: false,
            chain: vec![None; CHAIN_SLOTS].into_boxed_slice(),
            scratch: Vec::new(),
        }
    }

    /// The hashes disagree: stop trusting the pod's events.
    pub fn untrusted(&self) -> bool {
        self.untrusted
    }

    pub fn verdict(&self) -> ParityVerdict {
        if self.untrusted {
            ParityVerdict::Disagree
        } else if self.checked > self.mismatched {
            ParityVerdict::Agree
        } else {
            ParityVerdict::Unchecked
        }
    }

    /// Forgets every verdict (the configuration was reloaded).
    pub fn reset(&mut self) {
        self.checked = 0;
        self.mismatched = 0;
        self.untrusted = false;
        self.chain.fill(None);
    }

    fn sampled(&self, first_hash: u64) -> bool {
        self.enabled && (self.checked < ALWAYS_CHECK || mix(first_hash) < self.threshold)
    }

    /// Checks one run if it is in the sample. `lora` is the adapter the event
    /// names, resolved through the config (`None` for the base model).
    pub fn check(
        &mut self,
        hasher: &BlockHasher,
        stored: &BlockStored,
        lora: Option<&LoraKey>,
    ) -> ParityOutcome {
        let Some(&first) = stored.block_hashes.first() else {
            return ParityOutcome::Unverifiable("no blocks");
        };
        if self.untrusted || !self.sampled(first) {
            return ParityOutcome::NotSampled;
        }
        let block_size = hasher.settings().block_size;
        if stored.block_size as usize != block_size {
            let mismatch = ParityMismatch::BlockSize {
                announced: stored.block_size,
                configured: block_size,
            };
            self.checked += 1;
            self.mismatched += 1;
            self.untrusted = true;
            return ParityOutcome::Disagree(mismatch);
        }
        if stored.token_ids.len() != stored.block_hashes.len() * block_size {
            return ParityOutcome::Unverifiable("token count is not blocks × block size");
        }
        let parent = match stored.parent_block_hash {
            None => None,
            Some(key) => match hasher
                .digest_from_event_int(key)
                .or_else(|| self.known_digest(key))
            {
                Some(digest) => Some(digest),
                None => return ParityOutcome::Unverifiable("parent not computed by kvgate"),
            },
        };
        let extra = match extra_keys(stored, lora) {
            Ok(extra) => extra,
            Err(reason) => return ParityOutcome::Unverifiable(reason),
        };
        self.scratch.clear();
        let first_block_index = usize::from(parent.is_some());
        hasher.hash_continuation(
            parent,
            first_block_index,
            &stored.token_ids,
            &extra,
            &mut self.scratch,
        );
        self.checked += 1;
        let differing = stored
            .block_hashes
            .iter()
            .zip(&self.scratch)
            .position(|(&announced, computed)| announced != computed.key);
        match differing {
            None => {
                for computed in &self.scratch {
                    let slot = slot_of(computed.key);
                    self.chain[slot] = Some((computed.key, computed.digest));
                }
                ParityOutcome::Agree
            }
            Some(block) => {
                self.mismatched += 1;
                if self.checked >= MIN_CHECKS && self.mismatched * 2 > self.checked {
                    self.untrusted = true;
                }
                ParityOutcome::Disagree(ParityMismatch::Hash {
                    block,
                    announced: stored.block_hashes[block],
                    computed: self.scratch[block].key,
                    from_root: parent.is_none(),
                })
            }
        }
    }

    fn known_digest(&self, key: u64) -> Option<Digest> {
        match self.chain[slot_of(key)] {
            Some((stored, digest)) if stored == key => Some(digest),
            _ => None,
        }
    }
}

fn slot_of(key: u64) -> usize {
    (mix(key) % CHAIN_SLOTS as u64) as usize
}

/// A bijective mix, so sampling and table slots do not depend on how the
/// hash bits happen to be distributed.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The hash extra keys of a run, from the event: the LoRA adapter in every
/// block, a cache salt in the request's first block (published from 0.17).
fn extra_keys(stored: &BlockStored, lora: Option<&LoraKey>) -> Result<ExtraKeys, &'static str> {
    let mut extra = ExtraKeys {
        lora: lora.cloned(),
        cache_salt: None,
    };
    let per_block = match &stored.extra_keys {
        EventExtraKeys::Absent => return Ok(extra),
        EventExtraKeys::Plain if lora.is_some() => {
            return Err("LoRA run published without its adapter key")
        }
        EventExtraKeys::Plain => return Ok(extra),
        EventExtraKeys::PerBlock(per_block) => per_block,
    };
    for (index, keys) in per_block.iter().enumerate() {
        let keys = keys.as_deref().unwrap_or_default();
        let mut has_lora = false;
        for key in keys {
            match key {
                ExtraKey::Str(s) if lora.is_some_and(|l| *l.name == **s) && !has_lora => {
                    has_lora = true;
                }
                ExtraKey::Str(salt)
                    if index == 0
                        && stored.parent_block_hash.is_none()
                        && extra.cache_salt.is_none() =>
                {
                    extra.cache_salt = Some(salt.to_string());
                }
                ExtraKey::Tuple(_) | ExtraKey::Str(_) => return Err("multimodal extra keys"),
                ExtraKey::Bytes(_) => return Err("prompt-embeds extra keys"),
                ExtraKey::Nil | ExtraKey::Int(_) | ExtraKey::UInt(_) => {
                    return Err("unrecognized extra keys")
                }
            }
        }
        if lora.is_some() && !has_lora {
            return Err("LoRA run published without its adapter key");
        }
    }
    Ok(extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::codec::Medium;
    use crate::hash::{HashAlgo, HashSettings};
    use crate::vllm::VllmRelease;

    fn hasher(seed: &str, block_size: usize) -> BlockHasher {
        BlockHasher::new(&HashSettings {
            algo: HashAlgo::Sha256Cbor,
            block_size,
            seed: Some(seed.into()),
            release: VllmRelease::new(0, 22, 0),
        })
        .expect("valid settings")
    }

    /// A run as a pod with `pod` settings would announce it.
    fn run(
        pod: &BlockHasher,
        tokens: &[u32],
        parent: Option<&BlockHash>,
        extra: &ExtraKeys,
        published: EventExtraKeys,
    ) -> (BlockStored, Vec<BlockHash>) {
        let mut hashes = Vec::new();
        pod.hash_continuation(
            parent.map(|p| p.digest),
            usize::from(parent.is_some()),
            tokens,
            extra,
            &mut hashes,
        );
        let stored = BlockStored {
            block_hashes: hashes.iter().map(|h| h.key).collect(),
            parent_block_hash: parent.map(|p| p.key),
            token_ids: tokens.to_vec(),
            block_size: pod.settings().block_size as u32,
            medium: Medium::Gpu,
            extra_keys: published,
            lora_name: extra.lora.as_ref().map(|l| l.name.clone()),
            ..BlockStored::default()
        };
        (stored, hashes)
    }

    fn tokens(n: u32, salt: u32) -> Vec<u32> {
        (0..n).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn matching_settings_agree_and_continuations_chain() {
        let ours = hasher("42", 16);
        let mut checker = ParityChecker::new(1.0);
        let all = tokens(64, 1);
        let (root, root_hashes) = run(
            &ours,
            &all[..32],
            None,
            &ExtraKeys::default(),
            EventExtraKeys::Absent,
        );
        assert_eq!(checker.check(&ours, &root, None), ParityOutcome::Agree);
        let (cont, _) = run(
            &ours,
            &all[32..],
            root_hashes.last(),
            &ExtraKeys::default(),
            EventExtraKeys::Absent,
        );
        assert_eq!(checker.check(&ours, &cont, None), ParityOutcome::Agree);
        assert_eq!(checker.verdict(), ParityVerdict::Agree);

        // A continuation of a run kvgate never saw cannot be chained.
        let mut fresh = ParityChecker::new(1.0);
        assert!(matches!(
            fresh.check(&ours, &cont, None),
            ParityOutcome::Unverifiable(_)
        ));
    }

    #[test]
    fn a_wrong_seed_is_caught_within_a_few_runs() {
        let ours = hasher("42", 16);
        let pod = hasher("0", 16);
        // The first runs are checked however small the sample.
        let mut checker = ParityChecker::new(1e-9);
        for i in 0..MIN_CHECKS as u32 {
            let (stored, _) = run(
                &pod,
                &tokens(32, i),
                None,
                &ExtraKeys::default(),
                EventExtraKeys::Plain,
            );
            assert!(matches!(
                checker.check(&ours, &stored, None),
                ParityOutcome::Disagree(ParityMismatch::Hash {
                    block: 0,
                    from_root: true,
                    ..
                })
            ));
        }
        assert!(checker.untrusted());
        assert_eq!(checker.verdict(), ParityVerdict::Disagree);
        checker.reset();
        assert_eq!(checker.verdict(), ParityVerdict::Unchecked);
    }

    #[test]
    fn a_wrong_block_size_is_condemned_at_once() {
        let ours = hasher("42", 16);
        let pod = hasher("42", 32);
        let mut checker = ParityChecker::new(1.0);
        let (stored, _) = run(
            &pod,
            &tokens(64, 3),
            None,
            &ExtraKeys::default(),
            EventExtraKeys::Plain,
        );
        assert_eq!(
            checker.check(&ours, &stored, None),
            ParityOutcome::Disagree(ParityMismatch::BlockSize {
                announced: 32,
                configured: 16
            })
        );
        assert!(checker.untrusted());
    }

    #[test]
    fn published_salt_and_lora_are_reproduced() {
        let ours = hasher("42", 16);
        let lora = LoraKey {
            name: "sql-lora".into(),
            int_id: 1,
            path: "/adapters/sql-lora".into(),
        };
        let extra = ExtraKeys {
            lora: Some(lora.clone()),
            cache_salt: Some("tenant-a-salt".into()),
        };
        let name = || ExtraKey::Str("sql-lora".into());
        let published = EventExtraKeys::PerBlock(vec![
            Some(vec![name(), ExtraKey::Str("tenant-a-salt".into())].into_boxed_slice()),
            Some(vec![name()].into_boxed_slice()),
        ]);
        let (stored, _) = run(&ours, &tokens(32, 5), None, &extra, published);
        let mut checker = ParityChecker::new(1.0);
        assert_eq!(
            checker.check(&ours, &stored, Some(&lora)),
            ParityOutcome::Agree
        );

        // Multimodal keys are not reproducible: skipped, not held against the pod.
        let mut mm = stored.clone();
        mm.extra_keys = EventExtraKeys::PerBlock(vec![
            Some(
                vec![
                    name(),
                    ExtraKey::Tuple(vec![ExtraKey::Str("img".into())].into()),
                ]
                .into(),
            ),
            Some(vec![name()].into_boxed_slice()),
        ]);
        assert!(matches!(
            checker.check(&ours, &mm, Some(&lora)),
            ParityOutcome::Unverifiable(_)
        ));
        assert_eq!(checker.verdict(), ParityVerdict::Agree);
    }

    #[test]
    fn an_occasional_disagreement_does_not_condemn() {
        let ours = hasher("42", 16);
        let mut checker = ParityChecker::new(1.0);
        // A salted request on a release that does not publish the salt.
        let salted = ExtraKeys {
            lora: None,
            cache_salt: Some("s".into()),
        };
        let (stored, _) = run(&ours, &tokens(32, 9), None, &salted, EventExtraKeys::Absent);
        assert!(matches!(
            checker.check(&ours, &stored, None),
            ParityOutcome::Disagree(_)
        ));
        for i in 0..6 {
            let (stored, _) = run(
                &ours,
                &tokens(32, 20 + i),
                None,
                &ExtraKeys::default(),
                EventExtraKeys::Absent,
            );
            assert_eq!(checker.check(&ours, &stored, None), ParityOutcome::Agree);
        }
        assert!(!checker.untrusted());
    }
}
