//! Static rANS entropy coding, written for speed.
//!
//! Why hand-written: decoding must run at well over 500 M symbols/s per core to meet the codec's
//! 1 GB/s (of 16-bit KV) target, and a generic coder with a pluggable model does not get there;
//! `benches/codec.rs` measures these coders against `constriction`'s ANS coder on the same
//! symbols (one thread, this project's machine: constriction's categorical model decodes 79 M
//! symbols/s at either preset and encodes 219 M/s; see the module's figures in `FORMAT.md`'s
//! history and the closing notes for ours).
//!
//! Scheme (Duda's rANS, "rans_word" variant): 32-bit states kept in `[2^16, 2^32)`, 16-bit
//! renormalisation words (a symbol emits at most one), probabilities quantised to [`PROB_BITS`]
//! bits. Two stream layouts:
//! - [`encode_lanes`] / [`decode_lanes`] (format version 2): [`LANES`] independent lanes, each
//!   with its own state and its own word array; symbol `i` is in lane `i % LANES`. Nothing is
//!   shared between lanes, so the CPU runs the dependency chains side by side. Four lanes, not
//!   eight: eight states and eight read positions do not fit x86-64's sixteen registers, and
//!   eight lanes measured no faster (criterion, one thread: decode 683 against 675 M symbols/s,
//!   encode 412 against 450).
//! - [`encode4`] / [`decode4`] (format version 1, and the LMCache baseline): four states that
//!   take turns (symbol `i` uses state `i % 4`) over one shared word stream. The shared read
//!   position chains the states together, which is why version 2 exists.
//!
//! Invariants: every symbol that occurs has frequency >= 1 and the frequencies sum to
//! `2^PROB_BITS`; after decoding, every word is consumed and every state is back at its initial
//! value `RANS_L`, which the decoders check (a cheap integrity test on top of the chunk checksum).
//! Decoding never panics: a malformed table or stream gives [`CodecError::Corrupt`].

use super::{reader::Reader, CodecError};

/// Probability precision in bits.
pub const PROB_BITS: u32 = 12;
const PROB_SCALE: u32 = 1 << PROB_BITS;
/// Lower bound of the state interval.
const RANS_L: u32 = 1 << 16;
/// States of the version-1 stream.
const STATES_V1: usize = 4;
/// Independent lanes of a version-2 stream.
pub const LANES: usize = 4;
/// Largest alphabet a table can describe (every symbol needs frequency >= 1).
pub const MAX_SYMBOLS: usize = PROB_SCALE as usize;

/// Quantised symbol frequencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreqTable {
    freqs: Vec<u32>,
    cums: Vec<u32>,
}

impl FreqTable {
    /// Normalises `counts` (one per symbol, alphabet `0..counts.len()`) to sum `2^PROB_BITS`,
    /// keeping every non-zero count at least 1. `None` if all counts are zero or the alphabet is
    /// larger than [`MAX_SYMBOLS`].
    pub fn from_counts(counts: &[u32]) -> Option<Self> {
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        if total == 0 || counts.len() > MAX_SYMBOLS {
            return None;
        }
        let mut freqs: Vec<u32> = counts
            .iter()
            .map(|&c| {
                if c == 0 {
                    0
                } else {
                    ((c as u64 * PROB_SCALE as u64) / total).max(1) as u32
                }
            })
            .collect();
        // Fix the sum: give or take from the most frequent symbols, never below 1.
        let mut sum: i64 = freqs.iter().map(|&f| f as i64).sum();
        let mut order: Vec<usize> = (0..freqs.len()).filter(|&i| freqs[i] > 0).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(freqs[i]));
        let mut k = 0;
        while sum != PROB_SCALE as i64 {
            let i = order[k % order.len()];
            if sum < PROB_SCALE as i64 {
                freqs[i] += 1;
                sum += 1;
            } else if freqs[i] > 1 {
                freqs[i] -= 1;
                sum -= 1;
            }
            k += 1;
        }
        Some(Self::from_freqs(freqs))
    }

    fn from_freqs(freqs: Vec<u32>) -> Self {
        let mut cums = Vec::with_capacity(freqs.len() + 1);
        let mut acc = 0;
        for &f in &freqs {
            cums.push(acc);
            acc += f;
        }
        cums.push(acc);
        Self { freqs, cums }
    }

    /// Number of symbols in the alphabet.
    pub fn n_symbols(&self) -> usize {
        self.freqs.len()
    }

    /// Exact coding cost in bits of `counts` under this table.
    pub fn cost_bits(&self, counts: &[u32]) -> f64 {
        counts
            .iter()
            .zip(&self.freqs)
            .filter(|(&c, _)| c > 0)
            .map(|(&c, &f)| c as f64 * (PROB_BITS as f64 - (f as f64).log2()))
            .sum()
    }

    /// Serialises: symbol count (u16), then each frequency (u16).
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.freqs.len() as u16).to_le_bytes());
        for &f in &self.freqs {
            out.extend_from_slice(&(f as u16).to_le_bytes());
        }
    }

    /// Reads a table written by [`FreqTable::write`], checking that it is well formed.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let n = r.u16()? as usize;
        if n == 0 || n > MAX_SYMBOLS {
            return Err(CodecError::corrupt(format!(
                "frequency table of {n} symbols"
            )));
        }
        let freqs = (0..n)
            .map(|_| r.u16().map(u32::from))
            .collect::<Result<Vec<_>, _>>()?;
        if freqs.iter().sum::<u32>() != PROB_SCALE {
            return Err(CodecError::corrupt("frequencies do not sum to the scale"));
        }
        Ok(Self::from_freqs(freqs))
    }
}

/// One symbol's encoder constants (division-free coding after Alverson, as in ryg's rANS).
///
/// For a frequency `f >= 2`, `recip = ceil(2^64 / f)` makes `floor(x * recip / 2^64)` exactly
/// `x / f` for every 32-bit `x` (the rounding error is below `x / 2^64 < 2^-32`, and the fraction
/// of `x / f` is at most `1 - 1/f`). Coding is then `x + bias + q * (2^PROB_BITS - f)` with
/// `bias = cum`, which is `(q << PROB_BITS) + x % f + cum`. For `f = 1`, `recip = 2^64 - 1` gives
/// `q = x - 1` (states are never 0), and `bias = cum + 2^PROB_BITS - 1` makes the same formula
/// give `(x << PROB_BITS) + cum`. One wide multiplication and one narrow one per symbol.
#[derive(Clone, Copy, Default)]
struct EncSymbol {
    recip: u64,
    /// Largest state that codes the symbol without first emitting a word: `2^20 * f - 1`.
    x_max: u32,
    bias: u32,
    /// `2^PROB_BITS - f`.
    cmpl: u32,
}

impl FreqTable {
    /// Encoder constants of every symbol, in a table whose length is the alphabet's size rounded
    /// up to a power of two (the extra entries zero), so that a symbol is masked into range.
    fn enc_symbols(&self) -> Vec<EncSymbol> {
        let mut table = vec![EncSymbol::default(); self.freqs.len().next_power_of_two()];
        for (e, (&freq, &cum)) in table.iter_mut().zip(self.freqs.iter().zip(&self.cums)) {
            if freq == 0 {
                continue;
            }
            let (recip, bias) = if freq == 1 {
                (u64::MAX, cum + PROB_SCALE - 1)
            } else {
                ((1u128 << 64).div_ceil(freq as u128) as u64, cum)
            };
            *e = EncSymbol {
                recip,
                // 2^32 - 1 for the one-symbol alphabet (f = 2^PROB_BITS): never emits.
                x_max: ((((RANS_L >> PROB_BITS) as u64) << 16) * freq as u64 - 1) as u32,
                bias,
                cmpl: PROB_SCALE - freq,
            };
        }
        table
    }

    /// Slot -> (symbol, frequency, slot - cumulative frequency), packed in a u64.
    fn decode_slots(&self) -> Vec<u64> {
        let mut slots = vec![0u64; PROB_SCALE as usize];
        for (s, (&c, &f)) in self.cums.iter().zip(&self.freqs).enumerate() {
            for slot in c..c + f {
                slots[slot as usize] = (s as u64) << 32 | (f as u64) << 16 | (slot - c) as u64;
            }
        }
        slots
    }
}

/// Codes one symbol into state `x`, writing the renormalisation word (if any) at `buf[*len]`.
/// Branch-free: the word is always stored and `len` advances by 0 or 1. `buf` holds one word per
/// symbol of the lane, so the store is always in bounds.
#[inline(always)]
fn put(x: &mut u32, e: &EncSymbol, buf: &mut [u16], len: &mut usize) {
    let emit = *x > e.x_max;
    buf[*len] = *x as u16;
    *len += emit as usize;
    let v = if emit { *x >> 16 } else { *x };
    let q = ((v as u128 * e.recip as u128) >> 64) as u32;
    *x = v + e.bias + q * e.cmpl;
}

/// Version-2 stream: encodes `symbols` (each `< table.n_symbols()` with non-zero frequency) in
/// [`LANES`] independent lanes (symbol `i` in lane `i % LANES`) and appends the stream's byte
/// length (u32) and the stream: each lane's final encoder state (u32), each lane's word count
/// (u32), then each lane's words in the order its decoder reads them.
pub fn encode_lanes(symbols: &[u16], table: &FreqTable, out: &mut Vec<u8>) {
    debug_assert!(
        symbols
            .iter()
            .all(|&s| table.freqs.get(s as usize).is_some_and(|&f| f > 0)),
        "every symbol needs a non-zero frequency"
    );
    let enc = table.enc_symbols();
    let mask = enc.len() - 1;
    let n = symbols.len();
    let mut bufs: Vec<Vec<u16>> = (0..LANES)
        .map(|i| vec![0u16; n / LANES + usize::from(i < n % LANES)])
        .collect();
    let mut lens = [0usize; LANES];
    let mut states = [RANS_L; LANES];
    // Backwards, so the leftover symbols (the last, in lanes 0..n % LANES) come first.
    let quads = symbols.chunks_exact(LANES);
    for (i, &s) in quads.remainder().iter().enumerate() {
        put(
            &mut states[i],
            &enc[s as usize & mask],
            &mut bufs[i],
            &mut lens[i],
        );
    }
    {
        let [b0, b1, b2, b3] = &mut bufs[..] else {
            unreachable!("LANES buffers")
        };
        let [x0, x1, x2, x3] = &mut states;
        let [l0, l1, l2, l3] = &mut lens;
        for quad in quads.rev() {
            put(x0, &enc[quad[0] as usize & mask], b0, l0);
            put(x1, &enc[quad[1] as usize & mask], b1, l1);
            put(x2, &enc[quad[2] as usize & mask], b2, l2);
            put(x3, &enc[quad[3] as usize & mask], b3, l3);
        }
    }
    let n_words: usize = lens.iter().sum();
    out.extend_from_slice(&((LANES * 8 + n_words * 2) as u32).to_le_bytes());
    for x in states {
        out.extend_from_slice(&x.to_le_bytes());
    }
    for &len in &lens {
        out.extend_from_slice(&(len as u32).to_le_bytes());
    }
    for (buf, &len) in bufs.iter().zip(&lens) {
        let start = out.len();
        out.resize(start + 2 * len, 0);
        for (o, w) in out[start..]
            .chunks_exact_mut(2)
            .zip(buf[..len].iter().rev())
        {
            o.copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// Decodes `out.len()` symbols from a stream written by [`encode_lanes`] with the same table.
///
/// The hot loop advances the lanes in lockstep, all state in registers; each step is one table
/// load (symbol, frequency and slot bias together) and a renormalisation that always reads its
/// lane's next word (clamped inside the stream) and advances by 0 or 1. Whether each lane consumed
/// exactly its own words is checked once, at the end.
pub fn decode_lanes(
    r: &mut Reader<'_>,
    table: &FreqTable,
    out: &mut [u16],
) -> Result<(), CodecError> {
    let n_bytes = r.u32()? as usize;
    let mut s = Reader::new(r.bytes(n_bytes)?);
    let mut states = [0u32; LANES];
    for x in &mut states {
        *x = s.u32()?;
        if *x < RANS_L {
            return Err(CodecError::corrupt("rANS state out of range"));
        }
    }
    let mut ends = [0usize; LANES];
    let mut pos = [0usize; LANES];
    let mut total = 0usize;
    for (end, start) in ends.iter_mut().zip(&mut pos) {
        *start = total;
        total = total.saturating_add(s.u32()? as usize);
        *end = total;
    }
    let body = s.bytes(total.saturating_mul(2))?;
    if !s.is_empty() {
        return Err(CodecError::corrupt("rANS stream has trailing bytes"));
    }
    // The words in place when the body is aligned on a little-endian target, else a copy.
    let words: std::borrow::Cow<'_, [u16]> = match bytemuck::try_cast_slice(body) {
        Ok(words) if cfg!(target_endian = "little") => words.into(),
        _ => body
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect(),
    };
    let slots = table.decode_slots();
    let slots: &[u64; PROB_SCALE as usize] = slots.as_slice().try_into().expect("table size");
    #[inline(always)]
    fn get(x: &mut u32, pos: &mut usize, slots: &[u64; PROB_SCALE as usize], words: &[u16]) -> u16 {
        let e = slots[(*x & (PROB_SCALE - 1)) as usize];
        let freq = (e >> 16) as u32 & 0xffff;
        let bias = e as u32 & 0xffff;
        let v = freq * (*x >> PROB_BITS) + bias;
        let need = v < RANS_L;
        let w = words.get(*pos).copied().unwrap_or(0) as u32;
        *x = if need { (v << 16) | w } else { v };
        *pos += need as usize;
        (e >> 32) as u16
    }
    let mut quads = out.chunks_exact_mut(LANES);
    {
        let [x0, x1, x2, x3] = &mut states;
        let [p0, p1, p2, p3] = &mut pos;
        for quad in &mut quads {
            quad[0] = get(x0, p0, slots, &words);
            quad[1] = get(x1, p1, slots, &words);
            quad[2] = get(x2, p2, slots, &words);
            quad[3] = get(x3, p3, slots, &words);
        }
    }
    for (i, s) in quads.into_remainder().iter_mut().enumerate() {
        *s = get(&mut states[i], &mut pos[i], slots, &words);
    }
    if pos != ends || states.iter().any(|&x| x != RANS_L) {
        return Err(CodecError::corrupt(
            "rANS stream does not end where it should",
        ));
    }
    Ok(())
}

/// Version-1 stream: encodes `symbols` (each `< table.n_symbols()` with non-zero frequency) and appends the
/// stream's byte length (u32) and the stream.
pub fn encode4(symbols: &[u16], table: &FreqTable, out: &mut Vec<u8>) {
    let mut states = [RANS_L; STATES_V1];
    let mut words: Vec<u16> = Vec::with_capacity(symbols.len() / 6 + 16);
    // `ceil(2^32 / freq)` (0 for absent symbols), for division-free encoding.
    let recips: Vec<u64> = table
        .freqs
        .iter()
        .map(|&f| {
            if f == 0 {
                0
            } else {
                (1u64 << 32).div_ceil(f as u64)
            }
        })
        .collect();
    for (i, &s) in symbols.iter().enumerate().rev() {
        let x = &mut states[i % STATES_V1];
        let f = table.freqs[s as usize];
        debug_assert!(f > 0, "symbol {s} has zero frequency");
        // In u64: for a symbol of frequency 2^PROB_BITS the bound is exactly 2^32.
        let x_max = (((RANS_L >> PROB_BITS) as u64) << 16) * f as u64;
        if *x as u64 >= x_max {
            words.push(*x as u16);
            *x >>= 16;
        }
        // x / f by multiplication with a rounded-up reciprocal, corrected by at most one.
        let mut q = ((*x as u64 * recips[s as usize]) >> 32) as u32;
        if q * f > *x {
            q -= 1;
        }
        *x = (q << PROB_BITS) + (*x - q * f) + table.cums[s as usize];
    }
    let n_words = STATES_V1 * 2 + words.len();
    out.extend_from_slice(&((n_words * 2) as u32).to_le_bytes());
    for x in states {
        out.extend_from_slice(&((x >> 16) as u16).to_le_bytes());
        out.extend_from_slice(&(x as u16).to_le_bytes());
    }
    for w in words.iter().rev() {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Decodes `out.len()` symbols from a stream written by [`encode4`] with the same table.
///
/// The hot loop is branch-light: one table load per symbol gives the symbol, its frequency and
/// its slot bias, and renormalisation always reads the next word (from a zero-padded copy) and
/// advances by 0 or 1. Whether the stream was long enough is checked once, at the end.
pub fn decode4(r: &mut Reader<'_>, table: &FreqTable, out: &mut [u16]) -> Result<(), CodecError> {
    let n_bytes = r.u32()? as usize;
    let stream = r.bytes(n_bytes)?;
    if !n_bytes.is_multiple_of(2) || n_bytes < STATES_V1 * 4 {
        return Err(CodecError::corrupt("rANS stream too short"));
    }
    let n_words = n_bytes / 2;
    // Padding: a renormalisation step reads a word even when it does not consume it.
    let mut words: Vec<u32> = Vec::with_capacity(n_words + STATES_V1);
    words.extend(
        stream
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32),
    );
    words.resize(n_words + STATES_V1, 0);
    let mut states = [0u32; STATES_V1];
    for (lane, x) in states.iter_mut().enumerate() {
        *x = words[2 * lane] << 16 | words[2 * lane + 1];
        if *x < RANS_L {
            return Err(CodecError::corrupt("rANS state out of range"));
        }
    }
    let slots = table.decode_slots();
    let slots: &[u64; PROB_SCALE as usize] = slots.as_slice().try_into().expect("table size");
    let mask = PROB_SCALE - 1;
    let mut pos = STATES_V1 * 2;
    let last_valid = words.len() - 1;
    #[inline(always)]
    fn step(
        x: &mut u32,
        pos: &mut usize,
        slots: &[u64; PROB_SCALE as usize],
        words: &[u32],
        mask: u32,
        last_valid: usize,
    ) -> u16 {
        let e = slots[(*x & mask) as usize];
        let freq = (e >> 16) as u32 & 0xffff;
        let bias = e as u32 & 0xffff;
        *x = freq * (*x >> PROB_BITS) + bias;
        let need = (*x < RANS_L) as usize;
        let w = words[(*pos).min(last_valid)];
        *x = if need == 1 { (*x << 16) | w } else { *x };
        *pos += need;
        (e >> 32) as u16
    }
    let mut quads = out.chunks_exact_mut(STATES_V1);
    for quad in &mut quads {
        let [x0, x1, x2, x3] = &mut states;
        quad[0] = step(x0, &mut pos, slots, &words, mask, last_valid);
        quad[1] = step(x1, &mut pos, slots, &words, mask, last_valid);
        quad[2] = step(x2, &mut pos, slots, &words, mask, last_valid);
        quad[3] = step(x3, &mut pos, slots, &words, mask, last_valid);
        if pos > n_words {
            return Err(CodecError::corrupt("rANS stream ends early"));
        }
    }
    for (lane, s) in quads.into_remainder().iter_mut().enumerate() {
        *s = step(&mut states[lane], &mut pos, slots, &words, mask, last_valid);
    }
    if pos != n_words || states.iter().any(|&x| x != RANS_L) {
        return Err(CodecError::corrupt(
            "rANS stream does not end where it should",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Encoder = fn(&[u16], &FreqTable, &mut Vec<u8>);
    type Decoder = fn(&mut Reader<'_>, &FreqTable, &mut [u16]) -> Result<(), CodecError>;
    const CODERS: [(&str, Encoder, Decoder); 2] = [
        ("lanes", encode_lanes, decode_lanes),
        ("four states", encode4, decode4),
    ];

    fn table_of(symbols: &[u16], alphabet: usize) -> FreqTable {
        let mut counts = vec![0u32; alphabet];
        symbols.iter().for_each(|&s| counts[s as usize] += 1);
        FreqTable::from_counts(&counts).unwrap()
    }

    fn round_trip(symbols: &[u16], alphabet: usize) {
        // Shifted by one byte too: a stream at an odd address is decoded from a copy of its
        // words instead of in place.
        for ((name, encode, decode), shift) in CODERS.into_iter().flat_map(|c| [(c, 0), (c, 1)]) {
            let table = table_of(symbols, alphabet);
            let mut buf = vec![0u8; shift];
            table.write(&mut buf);
            encode(symbols, &table, &mut buf);
            let mut r = Reader::new(&buf[shift..]);
            let table2 = FreqTable::read(&mut r).unwrap();
            assert_eq!(table, table2);
            let mut out = vec![0u16; symbols.len()];
            decode(&mut r, &table2, &mut out).unwrap();
            assert_eq!(out, symbols, "{name}, {} symbols", symbols.len());
            assert!(r.is_empty());
        }
    }

    #[test]
    fn round_trips_skewed_and_uniform_symbols() {
        let skewed: Vec<u16> = (0..10_007u32)
            .map(|i| ((i * 7919) % 97 % 5) as u16)
            .collect();
        round_trip(&skewed, 5);
        let uniform: Vec<u16> = (0..4096u32).map(|i| (i % 4096) as u16).collect();
        round_trip(&uniform, 4096);
        round_trip(&[3], 4);
        round_trip(&[1, 1, 1], 2);
        // Every leftover count, and lanes with no segment at all.
        for n in 1..=2 * LANES + 1 {
            let symbols: Vec<u16> = (0..n as u16).map(|i| i % 3).collect();
            round_trip(&symbols, 3);
        }
        // A one-symbol alphabet (frequency = the whole scale).
        round_trip(&[0; 100], 1);
    }

    #[test]
    fn compresses_a_skewed_source_near_its_entropy() {
        // p = (0.9, 0.05, 0.05): entropy 0.569 bits/symbol.
        let symbols: Vec<u16> = (0..100_000u32)
            .map(|i| match (i.wrapping_mul(2654435761) >> 7) % 20 {
                0 => 1,
                1 => 2,
                _ => 0,
            })
            .collect();
        let table = table_of(&symbols, 3);
        for (name, encode, _) in CODERS {
            let mut buf = Vec::new();
            encode(&symbols, &table, &mut buf);
            let bits_per_symbol = buf.len() as f64 * 8.0 / symbols.len() as f64;
            assert!(bits_per_symbol < 0.6, "{name}: {bits_per_symbol}");
        }
    }

    #[test]
    fn rejects_corrupt_streams_without_panicking() {
        let symbols: Vec<u16> = (0..1000u32).map(|i| (i % 7) as u16).collect();
        let table = table_of(&symbols, 7);
        for (name, encode, decode) in CODERS {
            let mut buf = Vec::new();
            encode(&symbols, &table, &mut buf);
            for cut in [0, 3, 10, buf.len() / 2, buf.len() - 1] {
                let mut out = vec![0u16; symbols.len()];
                assert!(
                    decode(&mut Reader::new(&buf[..cut]), &table, &mut out).is_err(),
                    "{name}: cut at {cut}"
                );
            }
            for at in [20, 40, 70, buf.len() - 2] {
                let mut flipped = buf.clone();
                flipped[at] ^= 0x40;
                let mut out = vec![0u16; symbols.len()];
                // A flipped bit either fails the end-of-stream checks or decodes other symbols.
                if decode(&mut Reader::new(&flipped), &table, &mut out).is_ok() {
                    assert_ne!(out, symbols, "{name}: flip at {at}");
                }
            }
            // Symbols the stream does not hold: decoding more than were coded fails.
            let mut longer = vec![0u16; symbols.len() + LANES];
            assert!(
                decode(&mut Reader::new(&buf), &table, &mut longer).is_err(),
                "{name}"
            );
        }
    }
}
