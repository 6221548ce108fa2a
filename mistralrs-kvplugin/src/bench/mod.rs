//! `kvplugin bench ...`: measurements on the real model, printed as tables and written as JSON.
//! Timings live here, never in pass/fail tests.

pub mod baselines;
pub mod blend;
pub mod codec;
pub mod faults;
pub mod load;
pub mod offload;
pub mod paged;
pub mod plot;
pub mod serve;
pub mod stream;
pub mod transform;

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

/// The mean (0 for none).
pub(crate) fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// The median (nearest rank).
pub(crate) fn median(xs: &[f64]) -> f64 {
    percentile(xs, 0.5)
}

/// The nearest-rank percentile; panics on an empty slice.
pub(crate) fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A progress bar for a benchmark of `len` requests (drawn on stderr when it is a terminal, hidden
/// otherwise); print through [`Say::say`] while it runs.
pub(crate) fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    progress_bar_of(len, what, "requests")
}

/// Printing a result line while a progress bar runs.
pub(crate) trait Say {
    /// Prints `line` on standard output above the bar. Unlike `ProgressBar::println`, which
    /// prints nothing while the bar is hidden, the line also reaches a file or a pipe.
    fn say(&self, line: impl AsRef<str>);
    /// The same on standard error (progress notes rather than results).
    fn note(&self, line: impl AsRef<str>);
}

impl Say for indicatif::ProgressBar {
    fn say(&self, line: impl AsRef<str>) {
        self.suspend(|| println!("{}", line.as_ref()));
    }
    fn note(&self, line: impl AsRef<str>) {
        self.suspend(|| eprintln!("{}", line.as_ref()));
    }
}

/// [`progress_bar`] counting `unit`s (e.g. "schemes") instead of requests.
pub(crate) fn progress_bar_of(len: u64, what: &str, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{elapsed}} (eta {{eta}})"
        ))
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
