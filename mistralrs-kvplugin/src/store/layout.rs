//! Object names of [`super::ObjectPrefixStore`]: written by the store, parsed back by the store
//! operations ([`super::admin`]). See the layout in `object.rs`'s module docs.

use std::fmt;

use crate::codec::Level;

/// The path segment after the namespace. `v1` (before chunk names carried their parent and
/// index) and `v2` (objects without a seal, see [`super::seal`]) are no longer read; the GC
/// removes their objects.
pub const LAYOUT_VERSION: &str = "v3";

/// The layout versions that came before [`LAYOUT_VERSION`].
pub const LEGACY_LAYOUT_VERSIONS: &[&str] = &["v1", "v2"];

/// Hex characters of a hash kept in names (the first 128 bits).
pub const SHORT_HASH_HEX: usize = 32;

/// The first 128 bits of `hash`, in hex.
pub fn short_hash(hash: &blake3::Hash) -> String {
    hash.to_hex()[..SHORT_HASH_HEX].to_string()
}

/// The last segment of an object's path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ObjectName {
    /// Full chunk `index` (0 = the first) of a chain, at `level`.
    Chunk {
        /// Full chunks before it.
        index: usize,
        /// Short hash of the prefix before it.
        parent: String,
        /// Its own short hash.
        hash: String,
        /// Codec level.
        level: Level,
    },
    /// The tail after `index` full chunks.
    Tail {
        /// Full chunks before it.
        index: usize,
        /// Short hash of the prefix before it.
        parent: String,
        /// Codec level (lossless in practice).
        level: Level,
    },
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectName::Chunk {
                index,
                parent,
                hash,
                level,
            } => write!(f, "c-{index}-{parent}-{hash}.{}", level.name()),
            ObjectName::Tail {
                index,
                parent,
                level,
            } => write!(f, "t-{index}-{parent}.{}", level.name()),
        }
    }
}

fn is_short_hash(s: &str) -> bool {
    s.len() == SHORT_HASH_HEX && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ObjectName {
    /// Parses a name this version writes; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        let (stem, level) = name.rsplit_once('.')?;
        let level = *Level::ALL.iter().find(|l| l.name() == level)?;
        let mut parts = stem.split('-');
        let kind = parts.next()?;
        let index: usize = parts.next()?.parse().ok()?;
        let parent = parts.next().filter(|p| is_short_hash(p))?.to_string();
        let parsed = match kind {
            "c" => ObjectName::Chunk {
                index,
                parent,
                hash: parts.next().filter(|h| is_short_hash(h))?.to_string(),
                level,
            },
            "t" => ObjectName::Tail {
                index,
                parent,
                level,
            },
            _ => return None,
        };
        parts.next().is_none().then_some(parsed)
    }

    /// Full chunks before this object.
    pub fn index(&self) -> usize {
        match self {
            ObjectName::Chunk { index, .. } | ObjectName::Tail { index, .. } => *index,
        }
    }

    /// Short hash of the prefix before this object.
    pub fn parent(&self) -> &str {
        match self {
            ObjectName::Chunk { parent, .. } | ObjectName::Tail { parent, .. } => parent,
        }
    }

    /// The level it is coded at.
    pub fn level(&self) -> Level {
        match self {
            ObjectName::Chunk { level, .. } | ObjectName::Tail { level, .. } => *level,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_refused() {
        let h = |c: char| c.to_string().repeat(SHORT_HASH_HEX);
        let chunk = ObjectName::Chunk {
            index: 3,
            parent: h('a'),
            hash: h('b'),
            level: Level::High,
        };
        let tail = ObjectName::Tail {
            index: 0,
            parent: h('c'),
            level: Level::Lossless,
        };
        for name in [chunk, tail] {
            assert_eq!(ObjectName::parse(&name.to_string()), Some(name.clone()));
        }
        for bad in [
            "c-1-abc-def.high",
            &format!("c-x-{}-{}.high", h('a'), h('b')),
            &format!("c-1-{}-{}.nope", h('a'), h('b')),
            &format!("t-1-{}-{}.lossless", h('a'), h('b')),
            &format!("c-{}.high", h('a')),
            "README",
        ] {
            assert_eq!(ObjectName::parse(bad), None, "{bad}");
        }
    }
}
