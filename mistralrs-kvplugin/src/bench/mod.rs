//! `kvplugin bench ...`: measurements on the real model, printed as tables and written as JSON.
//! Timings live here, never in pass/fail tests.

pub mod baselines;
pub mod codec;
pub mod offload;
pub mod stream;

use std::time::{Duration, Instant};

/// Median wall time of `reps` runs of `f` (after one warm-up run).
pub fn median_time(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}
