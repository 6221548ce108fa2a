//! The decision at the heart of adaptive streaming (CacheGen's adaptation): for each chunk of a
//! prompt's run of stored chunks, in order, fetch it at some codec level or recompute it from
//! text, so that the time to first token stays within a budget.
//!
//! [`StreamPlanner::choose`] picks, for the next chunk, the highest level whose expected transfer
//! fits what is left of the budget once the chunks after it are counted at their smallest level
//! and the prompt's uncached suffix at the measured prefill speed; when no level fits it picks the
//! smallest level, or text when recomputing the chunk is expected to be faster than fetching even
//! that. [`StreamPlanner::observe`] updates the bandwidth estimate with every completed transfer.
//!
//! Invariants:
//! - The planner is pure: it reads the clock only through the `elapsed` it is given, so the same
//!   observations give the same choices (tests and benchmark replays are deterministic).
//! - A choice is always possible: every chunk has at least one level on offer, and text is always
//!   allowed (the token ids are in the prompt).
//! - The estimate is an exponentially weighted mean of observed throughputs (weight
//!   [`BANDWIDTH_WEIGHT`] on the newest), starting from a prior the caller gives; a transfer that
//!   took no measurable time does not move it.

use std::time::Duration;

use crate::codec::Level;

/// Weight of the newest observation in the bandwidth estimate.
pub const BANDWIDTH_WEIGHT: f64 = 0.5;

/// What fetching one chunk costs at each level on offer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkOffer {
    /// Tokens in the chunk.
    pub tokens: usize,
    /// Object bytes per level, from the highest quality to the smallest; never empty.
    pub levels: Vec<(Level, u64)>,
}

impl ChunkOffer {
    /// The smallest level on offer and its bytes.
    fn smallest(&self) -> (Level, u64) {
        self.levels
            .iter()
            .min_by_key(|&&(_, b)| b)
            .copied()
            .expect("a chunk offers at least one level")
    }
}

/// What to do with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Fetch it at this level.
    Fetch(Level),
    /// Recompute it from its tokens.
    Text,
}

/// The planner's measured inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannerInputs {
    /// The time-to-first-token budget.
    pub budget: Duration,
    /// Prefill speed of this engine and model at this context length, tokens per second
    /// (measured, not assumed).
    pub prefill_tokens_per_s: f64,
    /// Decoding speed of the codec, bytes of object per second (the decode of a chunk overlaps
    /// the next fetch, so only the last chunk's decode adds to the time).
    pub decode_bytes_per_s: f64,
    /// Bandwidth assumed before any transfer completed, bytes per second.
    pub prior_bytes_per_s: f64,
}

/// Per-chunk choices under a budget (see the module docs).
#[derive(Debug, Clone)]
pub struct StreamPlanner {
    inputs: PlannerInputs,
    bandwidth: f64,
}

impl StreamPlanner {
    /// A planner with the bandwidth estimate at the prior.
    pub fn new(inputs: PlannerInputs) -> Self {
        Self {
            bandwidth: inputs.prior_bytes_per_s.max(1.0),
            inputs,
        }
    }

    /// The current bandwidth estimate, bytes per second.
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// Records a completed transfer of `bytes` that took `took`.
    pub fn observe(&mut self, bytes: u64, took: Duration) {
        let secs = took.as_secs_f64();
        if secs <= 0.0 || bytes == 0 {
            return;
        }
        let measured = bytes as f64 / secs;
        self.bandwidth = BANDWIDTH_WEIGHT * measured + (1.0 - BANDWIDTH_WEIGHT) * self.bandwidth;
    }

    /// Expected seconds to fetch `bytes` at the current estimate.
    fn fetch_secs(&self, bytes: u64) -> f64 {
        bytes as f64 / self.bandwidth
    }

    /// Expected seconds to recompute `tokens` tokens.
    fn prefill_secs(&self, tokens: usize) -> f64 {
        tokens as f64 / self.inputs.prefill_tokens_per_s.max(1e-9)
    }

    /// The choice for `next`, `elapsed` into the request, with `later` the chunks after it and
    /// `suffix_tokens` the prompt tokens no chunk covers (the engine prefills them anyway).
    pub fn choose(
        &self,
        elapsed: Duration,
        next: &ChunkOffer,
        later: &[ChunkOffer],
        suffix_tokens: usize,
    ) -> Choice {
        let left = self.inputs.budget.as_secs_f64() - elapsed.as_secs_f64();
        // The rest at its cheapest: each later chunk at its smallest level or as text.
        let rest: f64 = later
            .iter()
            .map(|c| {
                self.fetch_secs(c.smallest().1)
                    .min(self.prefill_secs(c.tokens))
            })
            .sum::<f64>()
            + self.prefill_secs(suffix_tokens);
        let text_secs = self.prefill_secs(next.tokens);
        let fits = |bytes: u64| {
            let decode = bytes as f64 / self.inputs.decode_bytes_per_s.max(1.0);
            self.fetch_secs(bytes) + decode + rest <= left
        };
        if let Some(&(level, _)) = next.levels.iter().find(|&&(_, bytes)| fits(bytes)) {
            return Choice::Fetch(level);
        }
        let (level, bytes) = next.smallest();
        if text_secs < self.fetch_secs(bytes) {
            Choice::Text
        } else {
            Choice::Fetch(level)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn offer() -> ChunkOffer {
        ChunkOffer {
            tokens: 256,
            levels: vec![
                (Level::Lossless, 10 * MB),
                (Level::High, 3 * MB),
                (Level::Default, 2 * MB),
                (Level::Coarse, MB),
            ],
        }
    }

    fn planner(bytes_per_s: f64) -> StreamPlanner {
        StreamPlanner::new(PlannerInputs {
            budget: Duration::from_secs(1),
            // 256 tokens in 0.5 s.
            prefill_tokens_per_s: 512.0,
            decode_bytes_per_s: 1e12,
            prior_bytes_per_s: bytes_per_s,
        })
    }

    #[test]
    fn a_fast_link_gets_the_best_level_and_a_slower_one_a_smaller_level() {
        let chunks = [offer(), offer()];
        // 100 MB/s: 10 MB + 1 MB for the rest = 0.11 s.
        assert_eq!(
            planner(100e6).choose(Duration::ZERO, &chunks[0], &chunks[1..], 0),
            Choice::Fetch(Level::Lossless)
        );
        // 6 MB/s: lossless 1.67 s, high 0.5 s + rest 0.17 s fits, default too.
        assert_eq!(
            planner(6e6).choose(Duration::ZERO, &chunks[0], &chunks[1..], 0),
            Choice::Fetch(Level::High)
        );
        // Time already spent leaves less: at 0.6 s elapsed only coarse fits.
        assert_eq!(
            planner(6e6).choose(Duration::from_millis(600), &chunks[0], &chunks[1..], 0),
            Choice::Fetch(Level::Coarse)
        );
    }

    #[test]
    fn text_when_recomputing_beats_the_smallest_fetch_else_the_smallest_level() {
        let chunks = [offer()];
        // 1 MB/s, 0.9 s left: coarse takes 1 s, recomputing 256 tokens 0.5 s: text.
        assert_eq!(
            planner(1e6).choose(Duration::from_millis(100), &chunks[0], &[], 0),
            Choice::Text
        );
        // 2.5 MB/s with the budget gone: coarse (0.4 s) still beats text (0.5 s).
        assert_eq!(
            planner(2.5e6).choose(Duration::from_secs(2), &chunks[0], &[], 0),
            Choice::Fetch(Level::Coarse)
        );
    }

    #[test]
    fn the_uncached_suffix_is_counted_against_the_budget() {
        let chunks = [offer()];
        // 10 MB/s: high takes 0.3 s; with 256 suffix tokens (0.5 s) it still fits, with 384
        // (0.75 s) default (0.2 s) is the best that fits, with 480 (0.94 s) nothing fits and
        // coarse (0.1 s) beats text (0.5 s).
        let p = planner(10e6);
        for (suffix, want) in [
            (256, Level::High),
            (384, Level::Default),
            (480, Level::Coarse),
        ] {
            assert_eq!(
                p.choose(Duration::ZERO, &chunks[0], &[], suffix),
                Choice::Fetch(want),
                "{suffix} suffix tokens"
            );
        }
    }

    #[test]
    fn the_estimate_follows_observed_transfers() {
        let mut p = planner(100e6);
        p.observe(MB, Duration::from_millis(1000));
        assert!((p.bandwidth() - 0.5 * 1e6 - 0.5 * 100e6).abs() < 1.0);
        p.observe(MB, Duration::ZERO);
        p.observe(0, Duration::from_secs(1));
        assert!(
            (p.bandwidth() - 50.5e6).abs() < 1.0,
            "empty observations are ignored"
        );
        // After a collapse, the next chunk is recomputed instead.
        for _ in 0..20 {
            p.observe(MB, Duration::from_secs(10));
        }
        assert_eq!(p.choose(Duration::ZERO, &offer(), &[], 0), Choice::Text);
    }
}
