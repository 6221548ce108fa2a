//! Adaptive streaming (CacheGen's adaptation): for each chunk of a prompt's run of stored chunks,
//! in order, fetch it at some codec level or recompute it from text, so that the time to first
//! token stays within a budget.
//!
//! [`StreamPlanner::choose`] picks, for the next chunk, the highest level whose expected fetch
//! and decode fit what is left of the budget once the rest of the prompt is counted at its
//! cheapest (each later chunk at its smallest level or, from some chunk on, recomputed; the
//! uncached suffix at the measured prefill speed). When no level fits it picks whichever of the
//! smallest level and recomputing is expected to be faster. [`StreamPlanner::observe`] updates
//! the bandwidth estimate with every completed transfer, [`StreamPlanner::observe_decode`] the
//! decode speed with every decoded chunk. The loader that follows these choices is
//! [`crate::store::ObjectPrefixStore::load_streamed`].
//!
//! Recomputing is priced with a [`PrefillModel`], `T(n) = a n + b n^2` seconds for a prompt of
//! `n` tokens from scratch, fitted to prefill times measured on the engine
//! ([`PrefillModel::fit`]): attention makes a token's prefill dearer the later it sits, so
//! recomputing tokens `i..j` after a cached `0..i` costs `T(j) - T(i)`, not `(j - i) / speed`.
//!
//! Invariants:
//! - The planner is pure: it reads the clock only through the `elapsed` it is given, so the same
//!   observations give the same choices (tests and benchmark replays are deterministic).
//! - A choice is always possible: every chunk has at least one level on offer, and text is always
//!   allowed (the token ids are in the prompt).
//! - The prefix a load installs is contiguous: once a chunk is recomputed, every chunk after it is
//!   too (the engine prefills from the first token it lacks), and the planner prices it so.
//! - The bandwidth estimate is the harmonic mean of the last [`BANDWIDTH_HISTORY`] transfers'
//!   throughputs (the caller's prior counts as one), capped after a timeout until a transfer
//!   completes; the decode speed is an exponentially weighted mean. An observation of no bytes
//!   or no measurable time moves neither.

use std::{collections::VecDeque, time::Duration};

use serde::Serialize;

use crate::codec::Level;

/// Weight of the newest observation in the decode-speed estimate (an exponentially weighted
/// mean: decoding speed changes little).
pub const DECODE_WEIGHT: f64 = 0.5;

/// Prefill time of the engine: `T(n) = secs_per_token * n + secs_per_token_sq * n^2` for `n`
/// prompt tokens from scratch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct PrefillModel {
    /// Seconds per token (the linear part: weights, MLPs).
    pub secs_per_token: f64,
    /// Seconds per token pair (the quadratic part: attention).
    pub secs_per_token_sq: f64,
}

impl PrefillModel {
    /// A constant speed, `tokens_per_s` at any length.
    pub fn linear(tokens_per_s: f64) -> Self {
        Self {
            secs_per_token: 1.0 / tokens_per_s.max(1e-9),
            secs_per_token_sq: 0.0,
        }
    }

    /// Seconds to prefill a prompt of `n` tokens from scratch.
    pub fn total_secs(&self, n: usize) -> f64 {
        let n = n as f64;
        self.secs_per_token * n + self.secs_per_token_sq * n * n
    }

    /// Seconds to prefill tokens `from..to` with tokens `0..from` already cached.
    pub fn secs(&self, from: usize, to: usize) -> f64 {
        (self.total_secs(to) - self.total_secs(from)).max(0.0)
    }

    /// Least-squares fit of `(prompt tokens, prefill seconds)` samples, both coefficients kept
    /// non-negative; `None` without a sample of at least one token and a positive time.
    pub fn fit(samples: &[(usize, f64)]) -> Option<Self> {
        let samples: Vec<(f64, f64)> = samples
            .iter()
            .filter(|&&(n, t)| n > 0 && t > 0.0 && t.is_finite())
            .map(|&(n, t)| (n as f64, t))
            .collect();
        if samples.is_empty() {
            return None;
        }
        // Normal equations of t = a n + b n^2.
        let (mut s2, mut s3, mut s4, mut tn, mut tn2) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for &(n, t) in &samples {
            s2 += n * n;
            s3 += n * n * n;
            s4 += n * n * n * n;
            tn += t * n;
            tn2 += t * n * n;
        }
        let det = s2 * s4 - s3 * s3;
        let (a, b) = if det.abs() > 1e-12 * s2 * s4 {
            ((tn * s4 - tn2 * s3) / det, (s2 * tn2 - s3 * tn) / det)
        } else {
            (tn / s2, 0.0)
        };
        let model = if b < 0.0 {
            Self {
                secs_per_token: tn / s2,
                secs_per_token_sq: 0.0,
            }
        } else if a < 0.0 {
            Self {
                secs_per_token: 0.0,
                secs_per_token_sq: tn2 / s4,
            }
        } else {
            Self {
                secs_per_token: a,
                secs_per_token_sq: b,
            }
        };
        Some(model)
    }
}

/// What fetching one chunk costs at each level on offer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkOffer {
    /// Position of the chunk's first token in the prompt.
    pub start: usize,
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

    fn end(&self) -> usize {
        self.start + self.tokens
    }
}

/// What to do with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Choice {
    /// Fetch it at this level.
    Fetch(#[serde(serialize_with = "level_name")] Level),
    /// Recompute it from its tokens.
    Text,
}

fn level_name<S: serde::Serializer>(level: &Level, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(level.name())
}

/// The planner's measured inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannerInputs {
    /// The time-to-first-token budget.
    pub budget: Duration,
    /// Prefill time of this engine and model (measured, not assumed).
    pub prefill: PrefillModel,
    /// What a hit costs the engine besides the load (installing the cache, the first decode
    /// step), measured; reserved out of the budget.
    pub engine_overhead: Duration,
    /// Decoding speed of the codec, bytes of object per second, before any chunk was decoded.
    pub decode_bytes_per_s: f64,
    /// Bandwidth assumed before any transfer completed, bytes per second.
    pub prior_bytes_per_s: f64,
}

/// How a streamed load chooses each chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamPolicy {
    /// Per chunk, the [`StreamPlanner`]'s choice; a fetch slower than
    /// [`FETCH_TIMEOUT_FACTOR`] times its expected time is abandoned and the rest recomputed.
    Adaptive(PlannerInputs),
    /// Every full chunk at this level, tails lossless, never text by choice (a failure still
    /// ends the load there).
    Fixed(Level),
    /// These choices in order, text after the list (replays a load, e.g. to measure the
    /// quality of what an adaptive load installed).
    Planned(Vec<Choice>),
}

/// An adaptive fetch is abandoned only once the budget can no longer be met, this many times its
/// expected duration has passed and [`MAX_RISK`] of the time recomputing from its chunk on takes
/// has passed (see [`StreamPlanner::fetch_timeout`])...
pub const FETCH_TIMEOUT_FACTOR: f64 = 2.0;
/// ...and never sooner than this (a first request also pays for its connection).
pub const MIN_FETCH_TIMEOUT: Duration = Duration::from_millis(100);
/// The fraction of recomputing's time a fetch may waste: a fetch waits at least this long
/// before giving up (a slow transfer is still worth it while it costs less than this), and when
/// no choice fits the budget a fetch is only risked if [`FETCH_TIMEOUT_FACTOR`] times its
/// expected duration stays under this fraction, so that once a link has collapsed (the estimate
/// fell with the timeout that revealed it) requests go straight to text instead of betting
/// again. A link that collapses during a request costs that request at most what was left of
/// its budget, or this fraction of recomputing, whichever is more.
pub const MAX_RISK: f64 = 0.1;

/// Transfers the bandwidth estimate remembers (the prior counts as one until pushed out).
pub const BANDWIDTH_HISTORY: usize = 5;

/// Per-chunk choices under a budget (see the module docs).
#[derive(Debug, Clone)]
pub struct StreamPlanner {
    inputs: PlannerInputs,
    /// Throughputs of the last [`BANDWIDTH_HISTORY`] transfers, bytes per second, oldest first.
    recent: VecDeque<f64>,
    /// Set by a timeout, cleared by the next completed transfer: the link is known to be slower.
    cap: Option<f64>,
    decode_speed: f64,
}

impl StreamPlanner {
    /// A planner with its estimates at the priors.
    pub fn new(inputs: PlannerInputs) -> Self {
        Self {
            recent: VecDeque::from([inputs.prior_bytes_per_s.max(1.0)]),
            cap: None,
            decode_speed: inputs.decode_bytes_per_s.max(1.0),
            inputs,
        }
    }

    /// The bandwidth estimate, bytes per second: the harmonic mean of the recent transfers'
    /// throughputs (as robust-MPC video players predict throughput: one fast transfer does not
    /// lift it much, a slow one pulls it down), capped after a timeout.
    pub fn bandwidth(&self) -> f64 {
        let harmonic = self.recent.len() as f64 / self.recent.iter().map(|r| 1.0 / r).sum::<f64>();
        self.cap.map_or(harmonic, |cap| harmonic.min(cap))
    }

    /// The current decode-speed estimate, object bytes per second.
    pub fn decode_speed(&self) -> f64 {
        self.decode_speed
    }

    /// Records a completed transfer of `bytes` that took `took`.
    pub fn observe(&mut self, bytes: u64, took: Duration) {
        let secs = took.as_secs_f64();
        if secs <= 0.0 || bytes == 0 {
            return;
        }
        self.recent.push_back(bytes as f64 / secs);
        if self.recent.len() > BANDWIDTH_HISTORY {
            self.recent.pop_front();
        }
        self.cap = None;
    }

    /// Records the decoding of a chunk of `bytes` that took `took`.
    pub fn observe_decode(&mut self, bytes: u64, took: Duration) {
        let secs = took.as_secs_f64();
        if secs > 0.0 && bytes > 0 {
            let measured = bytes as f64 / secs;
            self.decode_speed =
                DECODE_WEIGHT * measured + (1.0 - DECODE_WEIGHT) * self.decode_speed;
        }
    }

    /// Expected seconds to fetch `bytes` at the current estimate.
    pub fn fetch_secs(&self, bytes: u64) -> f64 {
        bytes as f64 / self.bandwidth()
    }

    /// How long to wait for a fetch of `bytes` of `next` (chosen `elapsed` into the request,
    /// `later` after it) before giving up on it and recomputing from its first token on. The
    /// latest of: as long as the budget can still be met with the rest at its cheapest (waiting
    /// within the budget costs no violation); [`FETCH_TIMEOUT_FACTOR`] times the expected
    /// duration; [`MAX_RISK`] of recomputing; [`MIN_FETCH_TIMEOUT`].
    pub fn fetch_timeout(
        &self,
        elapsed: Duration,
        next: &ChunkOffer,
        later: &[ChunkOffer],
        prompt_tokens: usize,
        bytes: u64,
    ) -> Duration {
        let slack = self.left(elapsed)
            - self.decode_secs(bytes)
            - self.best_rest(later, next.end(), prompt_tokens);
        let floor = MAX_RISK * self.inputs.prefill.secs(next.start, prompt_tokens);
        let secs = (FETCH_TIMEOUT_FACTOR * self.fetch_secs(bytes))
            .max(floor)
            .max(slack);
        Duration::from_secs_f64(secs).max(MIN_FETCH_TIMEOUT)
    }

    /// Seconds of the budget left `elapsed` into the request, the engine's overhead reserved.
    fn left(&self, elapsed: Duration) -> f64 {
        self.inputs.budget.as_secs_f64()
            - elapsed.as_secs_f64()
            - self.inputs.engine_overhead.as_secs_f64()
    }

    fn decode_secs(&self, bytes: u64) -> f64 {
        bytes as f64 / self.decode_speed
    }

    /// The cheapest expected time for the prompt from chunk `later[0]` on: each chunk at its
    /// smallest level, or recomputing everything from some chunk on.
    fn best_rest(&self, later: &[ChunkOffer], from: usize, prompt_tokens: usize) -> f64 {
        let prefill = &self.inputs.prefill;
        let mut rest = prefill.secs(later.last().map_or(from, ChunkOffer::end), prompt_tokens);
        for c in later.iter().rev() {
            let (_, bytes) = c.smallest();
            let fetch = self.fetch_secs(bytes) + self.decode_secs(bytes) + rest;
            rest = fetch.min(prefill.secs(c.start, prompt_tokens));
        }
        rest
    }

    /// The choice for `next`, `elapsed` into the request, with `later` the chunks after it (in
    /// order, contiguous) and `prompt_tokens` the prompt's length (the engine prefills whatever
    /// no chunk covers). In order of preference:
    /// 1. the best level at which this chunk and every later one (each at that level, or its
    ///    smallest) fit the budget: the budget spread evenly, so that no chunk is squeezed to the
    ///    smallest level for an earlier one's sake;
    /// 2. the best level that fits with the rest at its cheapest (smaller levels, or text);
    /// 3. when nothing fits, the faster of text and the smallest level; the smallest level only
    ///    if losing the bet costs little: [`FETCH_TIMEOUT_FACTOR`] times its expected duration
    ///    (what a timeout may waste) must stay under [`MAX_RISK`] of recomputing.
    pub fn choose(
        &self,
        elapsed: Duration,
        next: &ChunkOffer,
        later: &[ChunkOffer],
        prompt_tokens: usize,
    ) -> Choice {
        let left = self.left(elapsed);
        let end = later.last().unwrap_or(next).end();
        let suffix = self.inputs.prefill.secs(end, prompt_tokens);
        let load = |bytes: u64| self.fetch_secs(bytes) + self.decode_secs(bytes);
        for &(level, bytes) in &next.levels {
            let rest: f64 = later
                .iter()
                .map(|c| {
                    let at_level = c.levels.iter().find(|(l, _)| *l == level);
                    load(at_level.copied().unwrap_or_else(|| c.smallest()).1)
                })
                .sum();
            if load(bytes) + rest + suffix <= left {
                return Choice::Fetch(level);
            }
        }
        let rest = self.best_rest(later, next.end(), prompt_tokens);
        let cost = |bytes: u64| load(bytes) + rest;
        if let Some(&(level, _)) = next.levels.iter().find(|&&(_, bytes)| cost(bytes) <= left) {
            return Choice::Fetch(level);
        }
        let (level, bytes) = next.smallest();
        let text = self.inputs.prefill.secs(next.start, prompt_tokens);
        let risk = FETCH_TIMEOUT_FACTOR * self.fetch_secs(bytes);
        if cost(bytes) < text && risk <= MAX_RISK * text {
            Choice::Fetch(level)
        } else {
            Choice::Text
        }
    }

    /// Records a fetch of an expected `bytes` given up after `took`. The link was slower than
    /// `bytes / took`, by how much is unknown (a whole-object GET shows no progress), so the
    /// estimate falls to at most half that: the transfer is taken as at most half done. One
    /// timeout is then enough for the next over-budget choice to be text rather than another
    /// bet on the same link (see [`MAX_RISK`]).
    pub fn observe_timeout(&mut self, bytes: u64, took: Duration) {
        let secs = took.as_secs_f64();
        if secs > 0.0 && bytes > 0 {
            let bound = 0.5 * bytes as f64 / secs;
            self.cap = Some(self.cap.map_or(bound, |cap| cap.min(bound)));
        }
    }
}

/// What happened to one chunk of a streamed load.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkOutcome {
    /// Fetched, decoded and installed.
    Loaded,
    /// Left to the engine to recompute, by choice.
    Text,
    /// Fetched, or fetching it, failed (timed out, backend error, corrupt): it and every later
    /// chunk are recomputed.
    Failed {
        /// What kind of failure: `timeout`, `backend`, `denied`, `corrupt` or `missing`.
        kind: &'static str,
        /// Why.
        reason: String,
    },
}

/// One chunk's decision, with the estimates it was made on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkDecision {
    /// First prompt token of the chunk.
    pub start: usize,
    /// Tokens the chunk covers (installed, or that would have been).
    pub tokens: usize,
    /// The choice.
    pub choice: Choice,
    /// What came of it.
    pub outcome: ChunkOutcome,
    /// Object bytes fetched (0 for text).
    pub bytes: u64,
    /// Seconds the fetch took (0 for text).
    pub fetch_s: f64,
    /// Bandwidth estimate the choice was made with, Mbit/s.
    pub estimate_mbit_s: f64,
    /// Seconds into the load when it was chosen.
    pub at_s: f64,
}

/// What a streamed load did, for metrics, tracing and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StreamReport {
    /// The budget, seconds (0 without one: fixed and planned policies).
    pub budget_s: f64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens installed from the store.
    pub covered_tokens: usize,
    /// Every chunk considered, in order.
    pub chunks: Vec<ChunkDecision>,
    /// Bandwidth estimate at the end, bytes per second (the next load's prior).
    pub bandwidth_bytes_s: f64,
    /// Seconds the load took.
    pub elapsed_s: f64,
}

impl StreamReport {
    /// The choices, in order (what [`StreamPolicy::Planned`] replays).
    pub fn choices(&self) -> Vec<Choice> {
        self.chunks
            .iter()
            .take_while(|c| c.outcome == ChunkOutcome::Loaded)
            .map(|c| c.choice)
            .collect()
    }

    /// A short line: one letter per chunk (its level's initial, `T` for text, `!` for a failure).
    pub fn summary(&self) -> String {
        self.chunks
            .iter()
            .map(|c| match (&c.outcome, c.choice) {
                (ChunkOutcome::Failed { .. }, _) => '!',
                (_, Choice::Text) => 'T',
                (_, Choice::Fetch(level)) => level
                    .name()
                    .chars()
                    .next()
                    .map_or('?', |c| c.to_ascii_uppercase()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn offer_at(start: usize) -> ChunkOffer {
        ChunkOffer {
            start,
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
            prefill: PrefillModel::linear(512.0),
            engine_overhead: Duration::ZERO,
            decode_bytes_per_s: 1e12,
            prior_bytes_per_s: bytes_per_s,
        })
    }

    #[test]
    fn a_fast_link_gets_the_best_level_and_a_slower_one_a_smaller_level() {
        let chunks = [offer_at(0), offer_at(256)];
        // 100 MB/s: 10 MB + 1 MB for the rest = 0.11 s.
        assert_eq!(
            planner(100e6).choose(Duration::ZERO, &chunks[0], &chunks[1..], 512),
            Choice::Fetch(Level::Lossless)
        );
        // 6 MB/s: both chunks at high take 1 s and a little decoding, over the budget; both at
        // default 0.67 s: the budget is spread evenly rather than spent on the first chunk.
        assert_eq!(
            planner(6e6).choose(Duration::ZERO, &chunks[0], &chunks[1..], 512),
            Choice::Fetch(Level::Default)
        );
        // With the next chunk at its cheapest, high would have fitted (0.5 + 0.17 s): that is
        // the choice when the later chunks offer only their smallest level.
        let only_coarse = ChunkOffer {
            levels: vec![(Level::Coarse, MB)],
            ..offer_at(256)
        };
        assert_eq!(
            planner(6e6).choose(Duration::ZERO, &chunks[0], &[only_coarse], 512),
            Choice::Fetch(Level::High)
        );
        // Time already spent leaves less: at 0.6 s elapsed only coarse fits.
        assert_eq!(
            planner(6e6).choose(Duration::from_millis(600), &chunks[0], &chunks[1..], 512),
            Choice::Fetch(Level::Coarse)
        );
    }

    #[test]
    fn past_the_budget_the_faster_of_text_and_the_smallest_level_if_the_bet_is_small() {
        let chunk = offer_at(0);
        // 1 MB/s, 0.9 s left: coarse takes 1 s, recomputing 256 tokens 0.5 s: text.
        assert_eq!(
            planner(1e6).choose(Duration::from_millis(100), &chunk, &[], 256),
            Choice::Text
        );
        // 100 MB/s with the budget gone: coarse (0.01 s) beats text (0.5 s), and a timeout
        // would waste 0.02 s.
        assert_eq!(
            planner(100e6).choose(Duration::from_secs(2), &chunk, &[], 256),
            Choice::Fetch(Level::Coarse)
        );
        // 2.5 MB/s: coarse (0.4 s) is expected to beat text (0.5 s), but a timeout would waste
        // 0.8 s: text.
        assert_eq!(
            planner(2.5e6).choose(Duration::from_secs(2), &chunk, &[], 256),
            Choice::Text
        );
    }

    #[test]
    fn the_engine_overhead_of_a_hit_is_reserved_out_of_the_budget() {
        let chunk = offer_at(0);
        let mut inputs = planner(10e6).inputs;
        // 10 MB/s: lossless takes 1 s, high 0.3 s.
        inputs.budget = Duration::from_millis(1050);
        assert_eq!(
            StreamPlanner::new(inputs).choose(Duration::ZERO, &chunk, &[], 256),
            Choice::Fetch(Level::Lossless)
        );
        inputs.engine_overhead = Duration::from_millis(100);
        assert_eq!(
            StreamPlanner::new(inputs).choose(Duration::ZERO, &chunk, &[], 256),
            Choice::Fetch(Level::High)
        );
    }

    #[test]
    fn the_uncached_suffix_is_counted_against_the_budget() {
        let chunk = offer_at(0);
        // 10 MB/s: high takes 0.3 s; with 256 suffix tokens (0.5 s) it still fits, with 384
        // (0.75 s) default (0.2 s) is the best that fits; with 480 (0.94 s) nothing fits, and
        // coarse (0.1 s) would beat recomputing everything (1.44 s) but bets 0.2 s on the link,
        // more than a tenth of that: text.
        let p = planner(10e6);
        for (suffix, want) in [
            (256, Choice::Fetch(Level::High)),
            (384, Choice::Fetch(Level::Default)),
            (480, Choice::Text),
        ] {
            assert_eq!(
                p.choose(Duration::ZERO, &chunk, &[], 256 + suffix),
                want,
                "{suffix} suffix tokens"
            );
        }
    }

    #[test]
    fn later_chunks_are_priced_as_recomputed_from_where_that_is_cheaper() {
        // 1.25 MB/s: coarse takes 0.8 s a chunk, recomputing 0.5 s. The rest after the first
        // chunk is at best 1.0 s (recompute both), not 1.6 s (fetch both at coarse): coarse for
        // the first chunk (0.8 s) fits a 1.9 s budget, default (1.6 s) does not.
        let p = StreamPlanner::new(PlannerInputs {
            budget: Duration::from_millis(1900),
            prefill: PrefillModel::linear(512.0),
            engine_overhead: Duration::ZERO,
            decode_bytes_per_s: 1e12,
            prior_bytes_per_s: 1.25e6,
        });
        let chunks = [offer_at(0), offer_at(256), offer_at(512)];
        assert_eq!(
            p.choose(Duration::ZERO, &chunks[0], &chunks[1..], 768),
            Choice::Fetch(Level::Coarse)
        );
        // With 0.2 s less, nothing fits and recomputing all (1.5 s) beats coarse + rest (1.8 s).
        assert_eq!(
            p.choose(Duration::from_millis(200), &chunks[0], &chunks[1..], 768),
            Choice::Text
        );
    }

    #[test]
    fn a_quadratic_prefill_makes_later_tokens_dearer() {
        // T(n) = n^2 / 512^2 s: the first 256 tokens cost 0.25 s, the next 256 0.75 s.
        let prefill = PrefillModel {
            secs_per_token: 0.0,
            secs_per_token_sq: 1.0 / (512.0 * 512.0),
        };
        assert!((prefill.secs(0, 256) - 0.25).abs() < 1e-9);
        assert!((prefill.secs(256, 512) - 0.75).abs() < 1e-9);
        let planner = |prefill| {
            StreamPlanner::new(PlannerInputs {
                budget: Duration::ZERO,
                prefill,
                engine_overhead: Duration::ZERO,
                decode_bytes_per_s: 1e12,
                prior_bytes_per_s: 30e6,
            })
        };
        // Past the budget, coarse takes 0.033 s and risks 0.067 s: too much against recomputing
        // the first chunk (0.25 s), not against recomputing the second (0.75 s)...
        let p = planner(prefill);
        assert_eq!(
            p.choose(Duration::ZERO, &offer_at(0), &[], 256),
            Choice::Text
        );
        assert_eq!(
            p.choose(Duration::ZERO, &offer_at(256), &[], 512),
            Choice::Fetch(Level::Coarse)
        );
        // ...which a linear model with the same total would price at 0.5 s.
        let linear = planner(PrefillModel::linear(512.0));
        assert_eq!(
            linear.choose(Duration::ZERO, &offer_at(256), &[], 512),
            Choice::Text
        );
    }

    #[test]
    fn the_prefill_fit_recovers_its_coefficients_and_stays_non_negative() {
        let truth = PrefillModel {
            secs_per_token: 2e-3,
            secs_per_token_sq: 3e-6,
        };
        let samples: Vec<(usize, f64)> = [256, 1024, 3000, 6000]
            .iter()
            .map(|&n| (n, truth.total_secs(n)))
            .collect();
        let fit = PrefillModel::fit(&samples).expect("samples");
        assert!((fit.secs_per_token - 2e-3).abs() < 1e-9, "{fit:?}");
        assert!((fit.secs_per_token_sq - 3e-6).abs() < 1e-12, "{fit:?}");
        // A single sample, or times that fall with length, give a linear model, never a
        // negative one.
        let one = PrefillModel::fit(&[(1000, 2.0)]).expect("one sample");
        assert!(one.secs_per_token > 0.0 && one.secs_per_token_sq >= 0.0);
        assert!((one.total_secs(1000) - 2.0).abs() < 0.2, "{one:?}");
        let odd = PrefillModel::fit(&[(100, 5.0), (1000, 1.0)]).expect("two samples");
        assert!(
            odd.secs_per_token >= 0.0 && odd.secs_per_token_sq >= 0.0,
            "{odd:?}"
        );
        assert_eq!(PrefillModel::fit(&[]), None);
        assert_eq!(PrefillModel::fit(&[(0, 1.0), (10, 0.0)]), None);
    }

    #[test]
    fn the_estimate_follows_observed_transfers() {
        let mut p = planner(100e6);
        // The harmonic mean of the prior and a 1 MB/s transfer: pulled towards the slow one.
        p.observe(MB, Duration::from_millis(1000));
        let want = 2.0 / (1.0 / 100e6 + 1.0 / 1e6);
        assert!((p.bandwidth() - want).abs() < 1.0, "{}", p.bandwidth());
        p.observe(MB, Duration::ZERO);
        p.observe(0, Duration::from_secs(1));
        assert!(
            (p.bandwidth() - want).abs() < 1.0,
            "empty observations are ignored"
        );
        // Only the last few transfers count.
        for _ in 0..BANDWIDTH_HISTORY {
            p.observe(4 * MB, Duration::from_secs(1));
        }
        assert!((p.bandwidth() - 4e6).abs() < 1.0, "{}", p.bandwidth());
        // A fetch is given up once the budget is lost, after twice its expected time and a
        // tenth of what recomputing from its chunk on takes, and not too soon.
        let late = Duration::from_secs(10);
        assert_eq!(
            p.fetch_timeout(late, &offer_at(0), &[], 256, 0),
            MIN_FETCH_TIMEOUT
        );
        let t = p
            .fetch_timeout(late, &offer_at(0), &[], 256, 40 * MB)
            .as_secs_f64();
        assert!((t - FETCH_TIMEOUT_FACTOR * 10.0).abs() < 1e-6, "{t}");
        // 2,560 tokens at 512 per second: 5 s to recompute, so at least 0.5 s.
        let t = p
            .fetch_timeout(late, &offer_at(0), &[], 2560, 1)
            .as_secs_f64();
        assert!((t - MAX_RISK * 5.0).abs() < 1e-6, "{t}");
        // With the whole 1 s budget ahead and nothing after the chunk, it may take all of it.
        let t = p
            .fetch_timeout(Duration::ZERO, &offer_at(0), &[], 256, 1)
            .as_secs_f64();
        assert!((t - 1.0).abs() < 1e-6, "{t}");
        // A fetch of 1 MB given up after 1 s caps the estimate at half a MB per second; one
        // such timeout, and a bet on the same link that would risk a tenth of recomputing is
        // text: coarse (1 MB) would take 2 s against 5 s of recomputing 2,560 tokens.
        let mut q = planner(100e6);
        assert_eq!(
            q.choose(Duration::from_secs(9), &offer_at(0), &[], 2560),
            Choice::Fetch(Level::Coarse)
        );
        q.observe_timeout(MB, Duration::from_secs(1));
        assert!((q.bandwidth() - 0.5e6).abs() < 1.0, "{}", q.bandwidth());
        assert_eq!(
            q.choose(Duration::from_secs(9), &offer_at(0), &[], 2560),
            Choice::Text
        );
        // After a collapse, the next chunk is recomputed instead.
        for _ in 0..20 {
            p.observe(MB, Duration::from_secs(10));
        }
        assert_eq!(
            p.choose(Duration::ZERO, &offer_at(0), &[], 256),
            Choice::Text
        );
    }

    #[test]
    fn a_report_summarises_its_chunks_and_replays_what_was_loaded() {
        let decision = |choice, outcome| ChunkDecision {
            start: 0,
            tokens: 256,
            choice,
            outcome,
            bytes: 0,
            fetch_s: 0.0,
            estimate_mbit_s: 0.0,
            at_s: 0.0,
        };
        let report = StreamReport {
            chunks: vec![
                decision(Choice::Fetch(Level::High), ChunkOutcome::Loaded),
                decision(Choice::Fetch(Level::Coarse), ChunkOutcome::Loaded),
                decision(
                    Choice::Fetch(Level::High),
                    ChunkOutcome::Failed {
                        kind: "timeout",
                        reason: "timed out".into(),
                    },
                ),
                decision(Choice::Text, ChunkOutcome::Text),
            ],
            ..StreamReport::default()
        };
        assert_eq!(report.summary(), "HC!T");
        assert_eq!(
            report.choices(),
            vec![Choice::Fetch(Level::High), Choice::Fetch(Level::Coarse)]
        );
    }
}
