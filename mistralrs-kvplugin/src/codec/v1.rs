//! Format version 1's lossy tensor section, read-only: chunks written by version 1 must decode
//! forever (the golden files in `tests/golden/v1-*` check it), so this reader is frozen. What
//! differs from version 2 (`FORMAT.md`): symbols are ordered group by group (for per-channel
//! groups: channel-major, each channel's tokens in a row), token differences run along the group
//! (for per-token groups: along the channels), and the rANS stream is the four-state one
//! ([`rans::decode4`]).

use super::{
    quant::{Dest, Dims, Grouping, TensorHead},
    rans,
    reader::Reader,
    CodecError,
};

/// Decodes a version-1 lossy tensor (dimensions `dims`) into `dest`, which the caller has
/// checked with [`Dest::check`] against `dims` widened by any exact leading tokens.
pub fn decode(r: &mut Reader<'_>, dims: Dims, dest: &mut Dest<'_>) -> Result<(), CodecError> {
    let TensorHead {
        grouping,
        delta,
        mus,
        scales,
        offset,
        table,
    } = TensorHead::read(r, dims)?;
    let (n_groups, group_len) = dims.groups(grouping);
    let mut symbols = vec![0u16; dims.len()];
    rans::decode4(r, &table, &mut symbols)?;
    let channels = dims.channels;
    for (g, group) in symbols
        .chunks_exact(group_len.max(1))
        .enumerate()
        .take(n_groups)
    {
        let scale = scales[g];
        let mu = mus[g];
        match grouping {
            Grouping::PerChannel => {
                let (h, c) = (g / channels, g % channels);
                let base = dest.at(channels, h, 0) + c;
                let kept = dest.take.min(group.len());
                let data = &mut *dest.data;
                if delta {
                    let mut acc = 0i64;
                    for (t, &s) in group[..kept].iter().enumerate() {
                        acc += i64::from(s as i32 - offset);
                        data[base + t * channels] = mu + scale * acc as f32;
                    }
                } else {
                    for (t, &s) in group[..kept].iter().enumerate() {
                        data[base + t * channels] = mu + scale * (s as i32 - offset) as f32;
                    }
                }
            }
            Grouping::PerToken | Grouping::PerHead => {
                // Groups are runs of whole token rows: `[token, channel]` within a head.
                let (h, first_token) = match grouping {
                    Grouping::PerToken => (g / dims.tokens, g % dims.tokens),
                    _ => (g, 0),
                };
                let kept_tokens = dest
                    .take
                    .saturating_sub(first_token)
                    .min(group_len / channels);
                if kept_tokens == 0 {
                    // A per-token group at or past `take`: its row may lie beyond `dest` (the
                    // chunk at the end of the buffer), so not even an empty slice is taken.
                    continue;
                }
                let kept = kept_tokens * channels;
                let base = dest.at(channels, h, first_token);
                let out = &mut dest.data[base..base + kept];
                // A value depends only on the symbols before it, so decoding stops at `kept`.
                // The sums run in i64: a per-head group holds up to 2^27 symbols, whose sum can
                // pass `i32` even within the format's offset bound.
                let mut acc = 0i64;
                for (o, &s) in out.iter_mut().zip(&group[..kept]) {
                    let q = i64::from(s as i32 - offset);
                    acc = if delta { acc + q } else { q };
                    *o = mu + scale * acc as f32;
                }
            }
        }
    }
    Ok(())
}
