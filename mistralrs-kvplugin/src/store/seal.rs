//! Sealing objects: what makes an object in a shared bucket trustworthy.
//!
//! Every object the store writes carries a 32-byte tag over its binding (which object it is: a
//! chunk or a tail, and the full 256-bit chain hash that names it) and every other byte of it
//! (token ids, codec chunk). Two kinds of seal:
//! - **keyed** (a [`StoreKey`] is configured): the tag is a BLAKE3 keyed hash under a key derived
//!   from the deployment's secret. Only a writer holding the secret can make an object this
//!   store accepts, and an object moved to another name fails its binding. Object names are
//!   keyed too (the chain hashes start from a keyed root), so a reader without the secret can
//!   neither find a prompt's objects nor test whether a prompt was seen.
//! - **checksum** (no key): the tag is an unkeyed BLAKE3 hash. It catches accidents (bit rot,
//!   torn writes, objects copied to the wrong name), not writers: anyone can compute it.
//!
//! A store accepts only its own kind of seal: a keyed store refuses unkeyed objects (planted by
//! someone without the secret) and objects sealed under another key; an unkeyed store refuses
//! keyed objects (it cannot check them). Refused objects are misses, counted, never decoded: the
//! tag is checked before any value is read ([`open`]).
//!
//! Invariant: the secret never leaves this module in the clear: it is held in
//! [`secrecy::SecretBox`] (zeroed on drop), the derived keys too, and `Debug` prints neither.

use std::{fmt, path::Path};

use secrecy::{ExposeSecret, SecretBox};

use super::StoreError;

/// Fewest bytes a secret may have: 128 bits of a random key, or a long passphrase.
pub const MIN_SECRET_BYTES: usize = 16;

const MAC_CONTEXT: &str = "mistralrs-kvplugin 2026-12 object seal";
const NAMES_CONTEXT: &str = "mistralrs-kvplugin 2026-12 object names";
const CHECKSUM_DOMAIN: &[u8] = b"mistralrs-kvplugin/object-checksum/v1";

/// A deployment's secret, as the keys derived from it. Every process that shares a cache must
/// hold the same secret; tenants that must not share one hold different ones.
pub struct StoreKey {
    mac: SecretBox<[u8; 32]>,
    names: SecretBox<[u8; 32]>,
}

impl StoreKey {
    /// Derives the keys from `secret` (any bytes, at least [`MIN_SECRET_BYTES`]; leading and
    /// trailing ASCII whitespace, such as a file's final newline, is not part of it).
    pub fn from_secret(secret: &[u8]) -> Result<Self, StoreError> {
        let secret = secret.trim_ascii();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(StoreError::Config {
                field: "key",
                reason: format!(
                    "the secret has {} bytes; use at least {MIN_SECRET_BYTES} \
                     (`kvplugin store keygen` writes a random one)",
                    secret.len()
                ),
            });
        }
        Ok(Self {
            mac: SecretBox::new(Box::new(blake3::derive_key(MAC_CONTEXT, secret))),
            names: SecretBox::new(Box::new(blake3::derive_key(NAMES_CONTEXT, secret))),
        })
    }

    /// Reads the secret from a file (its whole content).
    pub fn from_file(path: &Path) -> Result<Self, StoreError> {
        let secret = SecretBox::new(
            std::fs::read(path)
                .map_err(|e| StoreError::Config {
                    field: "key_file",
                    reason: format!("cannot read {}: {e}", path.display()),
                })?
                .into_boxed_slice(),
        );
        Self::from_secret(secret.expose_secret())
    }

    /// A hasher keyed for object names (see [`super::ObjectPrefixStore`]'s chain).
    pub(super) fn names_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(self.names.expose_secret())
    }
}

/// Two keys are equal when they come from the same secret (compared in constant time).
impl PartialEq for StoreKey {
    fn eq(&self, other: &Self) -> bool {
        blake3::Hash::from_bytes(*self.mac.expose_secret())
            == blake3::Hash::from_bytes(*other.mac.expose_secret())
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreKey(<redacted>)")
    }
}

/// What an object is: the chunk whose chain hash is `hash`, or the tail after the prefix whose
/// chain hash is `hash`. A loader knows it from the prompt before it fetches anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Chunk or tail.
    pub kind: ObjectKind,
    /// The full chain hash behind the object's name.
    pub hash: [u8; 32],
}

/// The two kinds of object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A full chunk.
    Chunk,
    /// The tokens after the last full chunk.
    Tail,
}

impl ObjectKind {
    fn code(self) -> u8 {
        match self {
            ObjectKind::Chunk => 0,
            ObjectKind::Tail => 1,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(ObjectKind::Chunk),
            1 => Some(ObjectKind::Tail),
            _ => None,
        }
    }
}

const MAGIC: [u8; 4] = *b"KVOB";
/// Version 1 (no seal, no binding) is no longer read: its objects live under the `v2` layout,
/// which the GC removes.
const VERSION: u16 = 2;
const SEAL_CHECKSUM: u8 = 0;
const SEAL_KEYED: u8 = 1;
/// Bytes before the token ids: magic, version, seal, kind, binding, tag, token count.
pub const HEADER_BYTES: usize = 4 + 2 + 1 + 1 + 32 + 32 + 4;
const TAG_AT: usize = 4 + 2 + 1 + 1 + 32;

/// The object holding `tokens` and the codec chunk `encoded`, sealed (with `key`, or by
/// checksum) and bound to `binding`.
pub fn seal(binding: Binding, tokens: &[u32], encoded: &[u8], key: Option<&StoreKey>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + 4 * tokens.len() + encoded.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(if key.is_some() {
        SEAL_KEYED
    } else {
        SEAL_CHECKSUM
    });
    out.push(binding.kind.code());
    out.extend_from_slice(&binding.hash);
    out.extend_from_slice(&[0; 32]);
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out.extend_from_slice(encoded);
    let tag = tag_of(&out, key);
    out[TAG_AT..TAG_AT + 32].copy_from_slice(tag.as_bytes());
    out
}

/// The tag over every byte of `object` but the tag's own.
fn tag_of(object: &[u8], key: Option<&StoreKey>) -> blake3::Hash {
    let mut h = match key {
        Some(key) => blake3::Hasher::new_keyed(key.mac.expose_secret()),
        None => {
            let mut h = blake3::Hasher::new();
            h.update(CHECKSUM_DOMAIN);
            h
        }
    };
    h.update(&object[..TAG_AT]);
    let rest = &object[TAG_AT + 32..];
    // Objects are megabytes: hash them on every core where they are (this runs on the blocking
    // pool or inside a rayon task).
    if rest.len() >= 1 << 20 {
        h.update_rayon(rest);
    } else {
        h.update(rest);
    }
    h.finalize()
}

/// The header of an object: the token ids it covers (checked against the prompt before
/// anything else is read). Needs only the header and the ids, not the whole object.
pub fn peek_tokens(object: &[u8]) -> Result<Vec<u32>, StoreError> {
    let (_, _, _, n) = header(object)?;
    Ok(token_ids(object, n)?.0)
}

/// The `n` token ids after the header, and where they end.
fn token_ids(object: &[u8], n: usize) -> Result<(Vec<u32>, usize), StoreError> {
    let end = HEADER_BYTES + 4 * n;
    let ids = object
        .get(HEADER_BYTES..end)
        .ok_or_else(|| corrupt(format!("object ends inside its {n} token ids")))?;
    let ids = ids
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((ids, end))
}

/// Checks an object's seal and binding, then returns its token ids and codec chunk. Costs one
/// pass of BLAKE3 over the object; nothing of the chunk is read before the tag is checked.
pub fn open<'a>(
    object: &'a [u8],
    expected: Binding,
    key: Option<&StoreKey>,
) -> Result<(Vec<u32>, &'a [u8]), StoreError> {
    let (seal, kind, binding, n) = header(object)?;
    match (seal, key) {
        (SEAL_KEYED, None) => {
            return Err(unauthenticated(
                "the object is sealed with a key and this store has none",
            ))
        }
        (SEAL_CHECKSUM, Some(_)) => {
            return Err(unauthenticated(
                "the object carries no MAC; a store with a key accepts only objects sealed with it",
            ))
        }
        (SEAL_KEYED | SEAL_CHECKSUM, _) => {}
        (other, _) => return Err(corrupt(format!("unknown seal {other}"))),
    }
    let tag = blake3::Hash::from_bytes(
        object[TAG_AT..TAG_AT + 32]
            .try_into()
            .expect("header() checked the length"),
    );
    // `blake3::Hash`'s equality is constant-time.
    if tag_of(object, key) != tag {
        return Err(match key {
            Some(_) => unauthenticated("the MAC does not match: not written with this store's key"),
            None => corrupt("the checksum does not match".into()),
        });
    }
    if (kind, binding) != (Some(expected.kind), expected.hash) {
        return Err(unauthenticated(
            "the object was sealed for another name (moved or copied)",
        ));
    }
    let (tokens, body) = token_ids(object, n)?;
    Ok((tokens, &object[body..]))
}

type Header = (u8, Option<ObjectKind>, [u8; 32], usize);

fn header(object: &[u8]) -> Result<Header, StoreError> {
    if object.len() < HEADER_BYTES {
        return Err(corrupt(format!(
            "{} bytes, shorter than an object header",
            object.len()
        )));
    }
    if object[..4] != MAGIC {
        return Err(corrupt("not a kvplugin object".into()));
    }
    let version = u16::from_le_bytes([object[4], object[5]]);
    if version != VERSION {
        return Err(corrupt(format!("object envelope version {version}")));
    }
    let n = u32::from_le_bytes(
        object[HEADER_BYTES - 4..HEADER_BYTES]
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    let binding: [u8; 32] = object[8..40].try_into().expect("32 bytes");
    Ok((object[6], ObjectKind::from_code(object[7]), binding, n))
}

fn corrupt(reason: String) -> StoreError {
    StoreError::Corrupt { reason }
}

fn unauthenticated(reason: &str) -> StoreError {
    StoreError::Unauthenticated {
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: &str) -> StoreKey {
        StoreKey::from_secret(secret.as_bytes()).unwrap()
    }

    const CHUNK: Binding = Binding {
        kind: ObjectKind::Chunk,
        hash: [7; 32],
    };

    #[test]
    fn a_sealed_object_opens_with_its_key_and_binding_only() {
        let (a, b) = (
            key("correct horse battery staple"),
            key("another deployment secret"),
        );
        let object = seal(CHUNK, &[1, 2, 3], b"payload", Some(&a));
        let (tokens, chunk) = open(&object, CHUNK, Some(&a)).unwrap();
        assert_eq!((tokens, chunk), (vec![1, 2, 3], &b"payload"[..]));
        assert_eq!(peek_tokens(&object).unwrap(), vec![1, 2, 3]);
        let refused = |r: Result<_, StoreError>| match r {
            Err(StoreError::Unauthenticated { reason }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        refused(open(&object, CHUNK, Some(&b)));
        refused(open(&object, CHUNK, None));
        let tail = Binding {
            kind: ObjectKind::Tail,
            ..CHUNK
        };
        assert!(refused(open(&object, tail, Some(&a))).contains("another name"));
        let moved = Binding {
            hash: [8; 32],
            ..CHUNK
        };
        assert!(refused(open(&object, moved, Some(&a))).contains("another name"));
        // Unkeyed objects: accepted by an unkeyed store, refused by a keyed one.
        let plain = seal(CHUNK, &[1, 2, 3], b"payload", None);
        assert!(open(&plain, CHUNK, None).is_ok());
        assert!(refused(open(&plain, CHUNK, Some(&a))).contains("no MAC"));
    }

    #[test]
    fn every_flipped_bit_is_caught_before_the_chunk_is_read() {
        let k = key("0123456789abcdef0123");
        for key in [Some(&k), None] {
            let object = seal(CHUNK, &[5, 6], &[9; 40], key);
            for i in 0..object.len() {
                for bit in [0, 3, 7] {
                    let mut bad = object.clone();
                    bad[i] ^= 1 << bit;
                    assert!(open(&bad, CHUNK, key).is_err(), "byte {i} bit {bit}");
                }
            }
            for cut in 0..object.len() {
                assert!(open(&object[..cut], CHUNK, key).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn short_secrets_are_refused_and_keys_never_print() {
        let e = StoreKey::from_secret(b"  short\n").unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
        let k = key("a secret long enough to use");
        assert_eq!(format!("{k:?}"), "StoreKey(<redacted>)");
        // Trailing whitespace (a file's newline) is not part of the secret.
        let object = seal(CHUNK, &[1], b"x", Some(&k));
        assert!(open(&object, CHUNK, Some(&key("a secret long enough to use\n"))).is_ok());
    }
}
