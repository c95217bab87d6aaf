//! vLLM release numbers. The wire format of KV events and the block-hash era
//! both depend on the release the pods run (docs: vllm-kv-events.md §8), so the
//! release is part of every model's configuration.

use std::fmt;
use std::str::FromStr;

/// A vLLM release such as `0.10.1.1`. Ordered, so eras are range checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VllmRelease {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
    pub post: u16,
}

impl VllmRelease {
    pub const fn new(major: u16, minor: u16, patch: u16) -> Self {
        Self {
            major,
            minor,
            patch,
            post: 0,
        }
    }

    pub const fn with_post(major: u16, minor: u16, patch: u16, post: u16) -> Self {
        Self {
            major,
            minor,
            patch,
            post,
        }
    }

    /// The oldest release kvgate understands (the first with a usable KV event publisher).
    pub const OLDEST: Self = Self::new(0, 10, 0);
    /// The newest release the wire/hash spec was checked against.
    pub const NEWEST: Self = Self::new(0, 33, 0);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid vLLM release {text:?}: expected a version such as \"0.11.0\" or \"0.10.1.1\"")]
pub struct ParseReleaseError {
    text: String,
}

impl FromStr for VllmRelease {
    type Err = ParseReleaseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseReleaseError {
            text: s.to_string(),
        };
        let trimmed = s.trim().trim_start_matches('v');
        let mut parts = [0u16; 4];
        let mut count = 0;
        for part in trimmed.split('.') {
            if count == 4 || part.is_empty() {
                return Err(err());
            }
            parts[count] = part.parse().map_err(|_| err())?;
            count += 1;
        }
        if count < 2 {
            return Err(err());
        }
        Ok(Self::with_post(parts[0], parts[1], parts[2], parts[3]))
    }
}

impl fmt::Display for VllmRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if self.post != 0 {
            write!(f, ".{}", self.post)?;
        }
        Ok(())
    }
}

impl<'de> serde::Deserialize<'de> for VllmRelease {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for VllmRelease {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_releases() {
        let a: VllmRelease = "0.10.1.1".parse().unwrap();
        let b: VllmRelease = "0.10.2".parse().unwrap();
        assert!(a < b);
        assert_eq!(a.to_string(), "0.10.1.1");
        assert_eq!(
            "0.24".parse::<VllmRelease>().unwrap(),
            VllmRelease::new(0, 24, 0)
        );
        assert!("0.x".parse::<VllmRelease>().is_err());
        assert!("".parse::<VllmRelease>().is_err());
        assert!("1.2.3.4.5".parse::<VllmRelease>().is_err());
    }
}
