//! Sealing objects: what makes an object in a shared bucket trustworthy, and private.
//!
//! Every object the store writes is bound to its name (a chunk or a tail, and the full 256-bit
//! chain hash that names it) and protected by one of three seals:
//! - **encrypted** (a [`StoreKey`] is configured, the default with one): token ids and codec
//!   chunk are encrypted with XChaCha20-Poly1305 under keys derived from the deployment's
//!   secret, a fresh random 192-bit nonce per object (no counter to keep across processes;
//!   collisions are out of reach). The header (binding, token count, nonce) is the associated
//!   data of both segments: the token ids (their own segment and tag, so a loader checks them
//!   against the prompt before it fetches or decrypts the rest, and a save reads them with one
//!   ranged GET) and the codec chunk. A reader without the secret learns an object's size and
//!   whether it is a chunk or a tail, nothing of its prompt or cache.
//! - **keyed** (a key with `encrypt = false`): the clear object carries a BLAKE3 keyed MAC over
//!   every byte. Only a writer holding the secret can make an object this store accepts.
//! - **checksum** (no key): an unkeyed BLAKE3 hash. It catches accidents (bit rot, torn writes,
//!   objects copied to the wrong name), not writers: anyone can compute it.
//!
//! With a key, object names are keyed too (the chain hashes start from a keyed root), so a
//! reader without the secret can neither find a prompt's objects nor test whether a prompt was
//! seen; different secrets share nothing (tenants).
//!
//! What a store accepts: a keyed store accepts objects encrypted or MAC-sealed under its own
//! secret (both prove the writer held it; a deployment can switch `encrypt` without losing its
//! cache) and refuses unkeyed objects (planted by someone without the secret) and objects
//! sealed under another secret; an unkeyed store refuses both keyed kinds (it cannot check
//! them). Refused objects are misses, counted, never decoded: the tag is checked before any
//! value is read ([`open`]).
//!
//! Invariant: the secret never leaves this module in the clear: it is held in
//! [`secrecy::SecretBox`] (zeroed on drop), the derived keys too, and `Debug` prints neither.

use std::{borrow::Cow, fmt, path::Path};

use chacha20poly1305::{
    aead::{AeadInPlace, KeyInit},
    Key, Tag, XChaCha20Poly1305, XNonce,
};
use secrecy::{ExposeSecret, SecretBox};

use super::StoreError;

/// Fewest bytes a secret may have: 128 bits of a random key, or a long passphrase.
pub const MIN_SECRET_BYTES: usize = 16;

const MAC_CONTEXT: &str = "mistralrs-kvplugin 2026-12 object seal";
const NAMES_CONTEXT: &str = "mistralrs-kvplugin 2026-12 object names";
const TOKENS_CIPHER_CONTEXT: &str = "mistralrs-kvplugin 2026-12 object token ids cipher";
const CHUNK_CIPHER_CONTEXT: &str = "mistralrs-kvplugin 2026-12 object codec chunk cipher";
const CHECKSUM_DOMAIN: &[u8] = b"mistralrs-kvplugin/object-checksum/v1";

/// A deployment's secret, as the keys derived from it. Every process that shares a cache must
/// hold the same secret; tenants that must not share one hold different ones.
pub struct StoreKey {
    mac: SecretBox<[u8; 32]>,
    names: SecretBox<[u8; 32]>,
    /// The two segments of an encrypted object have keys of their own, so one nonce serves
    /// both.
    tokens_cipher: SecretBox<[u8; 32]>,
    chunk_cipher: SecretBox<[u8; 32]>,
    /// Whether objects this key writes are encrypted (else MAC-sealed in the clear).
    encrypt: bool,
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
        let derive = |context| SecretBox::new(Box::new(blake3::derive_key(context, secret)));
        Ok(Self {
            mac: derive(MAC_CONTEXT),
            names: derive(NAMES_CONTEXT),
            tokens_cipher: derive(TOKENS_CIPHER_CONTEXT),
            chunk_cipher: derive(CHUNK_CIPHER_CONTEXT),
            encrypt: true,
        })
    }

    /// The same secret, writing encrypted objects (`true`, the default) or MAC-sealed clear
    /// ones (`false`: a little cheaper, for a bucket nobody else can read). Either reads both.
    pub fn encrypting(&self, encrypt: bool) -> Self {
        let copy = |k: &SecretBox<[u8; 32]>| SecretBox::new(Box::new(*k.expose_secret()));
        Self {
            mac: copy(&self.mac),
            names: copy(&self.names),
            tokens_cipher: copy(&self.tokens_cipher),
            chunk_cipher: copy(&self.chunk_cipher),
            encrypt,
        }
    }

    /// Whether objects this key writes are encrypted.
    pub fn encrypts(&self) -> bool {
        self.encrypt
    }

    fn cipher(key: &SecretBox<[u8; 32]>) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(key.expose_secret()))
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
        write!(f, "StoreKey(<redacted>, encrypt: {})", self.encrypt)
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
const SEAL_ENCRYPTED: u8 = 2;
/// Bytes before the token ids: magic, version, seal, kind, binding, tag, token count.
pub const HEADER_BYTES: usize = 4 + 2 + 1 + 1 + 32 + 32 + 4;
const TAG_AT: usize = 4 + 2 + 1 + 1 + 32;
/// An encrypted object's nonce lies in the first bytes of the tag field (the rest are zero).
const NONCE_BYTES: usize = 24;
/// Bytes an encrypted object carries on top of a clear one: a Poly1305 tag per segment.
pub const AEAD_OVERHEAD: usize = 2 * AEAD_TAG_BYTES;
const AEAD_TAG_BYTES: usize = 16;

/// The object holding `tokens` and the codec chunk `encoded`, sealed (with `key`: encrypted or
/// MAC-sealed as the key says; without: by checksum) and bound to `binding`.
pub fn seal(
    binding: Binding,
    tokens: &[u32],
    encoded: &[u8],
    key: Option<&StoreKey>,
) -> Result<Vec<u8>, StoreError> {
    let seal = match key {
        Some(key) if key.encrypt => SEAL_ENCRYPTED,
        Some(_) => SEAL_KEYED,
        None => SEAL_CHECKSUM,
    };
    let mut out =
        Vec::with_capacity(HEADER_BYTES + 4 * tokens.len() + encoded.len() + AEAD_OVERHEAD);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(seal);
    out.push(binding.kind.code());
    out.extend_from_slice(&binding.hash);
    out.extend_from_slice(&[0; 32]);
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    let key = match key {
        Some(key) if key.encrypt => key,
        _ => {
            for t in tokens {
                out.extend_from_slice(&t.to_le_bytes());
            }
            out.extend_from_slice(encoded);
            let tag = tag_of(&out, key);
            out[TAG_AT..TAG_AT + 32].copy_from_slice(tag.as_bytes());
            return Ok(out);
        }
    };
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce)
        .map_err(|e| StoreError::backend(format!("no random nonce for an object: {e}")))?;
    out[TAG_AT..TAG_AT + NONCE_BYTES].copy_from_slice(&nonce);
    let nonce = XNonce::from(nonce);
    // Each segment is encrypted where it lies, the header (nonce included) as associated data.
    let segment = |out: &mut Vec<u8>, cipher: XChaCha20Poly1305, clear: &[u8]| {
        let start = out.len();
        out.extend_from_slice(clear);
        let (header, body) = out.split_at_mut(start);
        let tag = cipher
            .encrypt_in_place_detached(&nonce, &header[..HEADER_BYTES], body)
            .map_err(|_| StoreError::backend("an object too large to encrypt"))?;
        out.extend_from_slice(&tag);
        Ok::<_, StoreError>(())
    };
    let ids: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    segment(&mut out, StoreKey::cipher(&key.tokens_cipher), &ids)?;
    segment(&mut out, StoreKey::cipher(&key.chunk_cipher), encoded)?;
    Ok(out)
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

/// The token ids an object covers, to check against the prompt before the rest is fetched or
/// read. Needs only the header and the ids (a ranged read is enough), not the whole object. An
/// encrypted object's ids are decrypted and authenticated (they need this store's key); a clear
/// object's are read as they are: [`open`] checks them with the rest.
pub fn peek_tokens(object: &[u8], key: Option<&StoreKey>) -> Result<Vec<u32>, StoreError> {
    let header = header(object)?;
    if header.seal != SEAL_ENCRYPTED {
        return Ok(token_ids(object, header.n)?.0);
    }
    let key = key.ok_or_else(|| unauthenticated(NO_KEY))?;
    Ok(decrypt_token_ids(object, &header, key)?.0)
}

const NO_KEY: &str = "the object is sealed with a key and this store has none";
const WRONG_KEY: &str = "the MAC does not match: not written with this store's key";

/// The `n` token ids after the header, and where they end.
fn token_ids(object: &[u8], n: usize) -> Result<(Vec<u32>, usize), StoreError> {
    let end = HEADER_BYTES + 4 * n;
    let ids = object
        .get(HEADER_BYTES..end)
        .ok_or_else(|| corrupt(format!("object ends inside its {n} token ids")))?;
    Ok((ids_of(ids), end))
}

fn ids_of(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// An encrypted object's token ids, authenticated, and where their segment ends.
fn decrypt_token_ids(
    object: &[u8],
    header: &Header,
    key: &StoreKey,
) -> Result<(Vec<u32>, usize), StoreError> {
    let end = HEADER_BYTES + 4 * header.n + AEAD_TAG_BYTES;
    let segment = object
        .get(HEADER_BYTES..end)
        .ok_or_else(|| corrupt(format!("object ends inside its {} token ids", header.n)))?;
    let clear = decrypt(object, segment, StoreKey::cipher(&key.tokens_cipher))?;
    Ok((ids_of(&clear), end))
}

/// One segment (ciphertext, then its tag) of the encrypted `object`, decrypted and checked.
fn decrypt(
    object: &[u8],
    segment: &[u8],
    cipher: XChaCha20Poly1305,
) -> Result<Vec<u8>, StoreError> {
    let (ciphertext, tag) = segment
        .split_last_chunk::<AEAD_TAG_BYTES>()
        .map(|(c, t)| (c, Tag::from(*t)))
        .ok_or_else(|| corrupt("an encrypted segment shorter than its tag".into()))?;
    let nonce = XNonce::from_slice(&object[TAG_AT..TAG_AT + NONCE_BYTES]);
    let mut clear = ciphertext.to_vec();
    cipher
        .decrypt_in_place_detached(nonce, &object[..HEADER_BYTES], &mut clear, &tag)
        .map_err(|_| unauthenticated(WRONG_KEY))?;
    Ok(clear)
}

/// Checks an object's seal and binding, then returns its token ids and codec chunk (borrowed
/// from a clear object, decrypted from an encrypted one). Costs one pass of BLAKE3 or of
/// XChaCha20-Poly1305 over the object; nothing of the chunk is read before its tag is checked.
pub fn open<'a>(
    object: &'a [u8],
    expected: Binding,
    key: Option<&StoreKey>,
) -> Result<(Vec<u32>, Cow<'a, [u8]>), StoreError> {
    let header = header(object)?;
    let moved = || unauthenticated("the object was sealed for another name (moved or copied)");
    let bound = (header.kind, header.binding) == (Some(expected.kind), expected.hash);
    match (header.seal, key) {
        (SEAL_KEYED | SEAL_ENCRYPTED, None) => return Err(unauthenticated(NO_KEY)),
        (SEAL_CHECKSUM, Some(_)) => {
            return Err(unauthenticated(
                "the object carries no MAC; a store with a key accepts only objects sealed with it",
            ))
        }
        (SEAL_ENCRYPTED, Some(key)) => {
            // The header is both segments' associated data: once the ids decrypt, the binding
            // is the writer's.
            let (tokens, end) = decrypt_token_ids(object, &header, key)?;
            if !bound {
                return Err(moved());
            }
            let chunk = decrypt(object, &object[end..], StoreKey::cipher(&key.chunk_cipher))?;
            return Ok((tokens, Cow::Owned(chunk)));
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
            Some(_) => unauthenticated(WRONG_KEY),
            None => corrupt("the checksum does not match".into()),
        });
    }
    if !bound {
        return Err(moved());
    }
    let (tokens, body) = token_ids(object, header.n)?;
    Ok((tokens, Cow::Borrowed(&object[body..])))
}

/// The binding and token count an object's clear header claims, unchecked (nothing is
/// authenticated: for tools and tests that rewrite objects, never for loading one).
pub fn claimed_binding(object: &[u8]) -> Result<(Binding, usize), StoreError> {
    let header = header(object)?;
    let kind = header
        .kind
        .ok_or_else(|| corrupt("an unknown object kind".into()))?;
    Ok((
        Binding {
            kind,
            hash: header.binding,
        },
        header.n,
    ))
}

/// The clear fields of an object's header.
struct Header {
    seal: u8,
    kind: Option<ObjectKind>,
    binding: [u8; 32],
    /// Token ids the object covers.
    n: usize,
}

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
    Ok(Header {
        seal: object[6],
        kind: ObjectKind::from_code(object[7]),
        binding,
        n,
    })
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

    fn refused(r: Result<impl fmt::Debug, StoreError>) -> String {
        match r {
            Err(StoreError::Unauthenticated { reason }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_sealed_object_opens_with_its_key_and_binding_only() {
        let (a, b) = (
            key("correct horse battery staple"),
            key("another deployment secret"),
        );
        for a in [a.encrypting(true), a.encrypting(false)] {
            let object = seal(CHUNK, &[1, 2, 3], b"payload", Some(&a)).unwrap();
            let (tokens, chunk) = open(&object, CHUNK, Some(&a)).unwrap();
            assert_eq!((tokens, &chunk[..]), (vec![1, 2, 3], &b"payload"[..]));
            assert_eq!(peek_tokens(&object, Some(&a)).unwrap(), vec![1, 2, 3]);
            // The same secret reads what it wrote either way.
            let other_mode = a.encrypting(!a.encrypts());
            assert_eq!(
                open(&object, CHUNK, Some(&other_mode)).unwrap().0,
                [1, 2, 3]
            );
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
        }
        // Unkeyed objects: accepted by an unkeyed store, refused by a keyed one.
        let plain = seal(CHUNK, &[1, 2, 3], b"payload", None).unwrap();
        assert!(open(&plain, CHUNK, None).is_ok());
        assert!(refused(open(&plain, CHUNK, Some(&key("0123456789abcdef")))).contains("no MAC"));
    }

    #[test]
    fn an_encrypted_object_shows_nothing_of_its_tokens_or_chunk_and_needs_the_key_to_peek() {
        let k = key("correct horse battery staple");
        let tokens: Vec<u32> = (1000..1064).collect();
        let chunk = b"a codec chunk that must not be readable in the bucket".repeat(4);
        let object = seal(CHUNK, &tokens, &chunk, Some(&k)).unwrap();
        assert_eq!(
            object.len(),
            HEADER_BYTES + 4 * 64 + chunk.len() + AEAD_OVERHEAD
        );
        let ids: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let contains = |needle: &[u8]| object.windows(needle.len()).any(|w| w == needle);
        assert!(!contains(&ids[..16]) && !contains(&chunk[..16]));
        // Two seals of the same content differ (a fresh nonce each).
        assert_ne!(object, seal(CHUNK, &tokens, &chunk, Some(&k)).unwrap());
        // Only the header and the ids' segment are needed to peek (one ranged read).
        let ranged = &object[..HEADER_BYTES + 4 * 64 + AEAD_TAG_BYTES];
        assert_eq!(peek_tokens(ranged, Some(&k)).unwrap(), tokens);
        assert!(refused(peek_tokens(&object, None)).contains("has none"));
        refused(peek_tokens(
            &object,
            Some(&key("another deployment secret")),
        ));
    }

    #[test]
    fn every_flipped_bit_is_caught_before_the_chunk_is_read() {
        let k = key("0123456789abcdef0123");
        let clear = k.encrypting(false);
        for key in [Some(&k), Some(&clear), None] {
            let object = seal(CHUNK, &[5, 6], &[9; 40], key).unwrap();
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
        assert_eq!(format!("{k:?}"), "StoreKey(<redacted>, encrypt: true)");
        // Trailing whitespace (a file's newline) is not part of the secret.
        let object = seal(CHUNK, &[1], b"x", Some(&k)).unwrap();
        assert!(open(&object, CHUNK, Some(&key("a secret long enough to use\n"))).is_ok());
    }
}
