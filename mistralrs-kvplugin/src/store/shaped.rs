//! [`ShapedStore`]: an [`ObjectStore`] whose reads are as slow as a network link described by a
//! bandwidth trace, for testing and benchmarking loads under limited or varying bandwidth.
//!
//! object_store's `ThrottledStore` is the model; it waits a fixed time per call and per byte, where
//! this store follows a trace (one bandwidth value per request, or per second of wall time) plus
//! a fixed latency, so that a benchmark can replay the same link conditions for every policy.
//!
//! Invariants:
//! - A read (GET, ranged GET) returns the inner store's answer, complete, no sooner than
//!   `latency + bytes * 8 / bandwidth` after it started, the bandwidth being the trace's value
//!   when it started. Concurrent reads do not share the bandwidth (each is one transfer at the
//!   trace's rate), which is how CacheGen's per-chunk traces are defined.
//! - A HEAD costs the latency only and does not advance a per-request trace.
//! - A bandwidth of 0 is a link that is down: the read fails, after the latency, with an error
//!   (as a dead server would), never a hang.
//! - Writes, lists and deletes pass straight through: the plugin writes in the background, and
//!   the time budget being studied is the reader's.

use std::{
    fmt,
    ops::Range,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{stream::BoxStream, StreamExt};
use object_store::{
    path::Path, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// How a trace advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceClock {
    /// One value per read request, in order (CacheGen's per-chunk traces).
    PerRequest,
    /// One value per second since the store was made.
    PerSecond,
}

/// Bandwidth over time, in Mbit/s; replayed from the start again after its end.
#[derive(Debug, Clone, PartialEq)]
pub struct BandwidthTrace {
    /// The values, in Mbit/s (0 = link down).
    pub mbit_s: Vec<f64>,
    /// How the trace advances.
    pub clock: TraceClock,
}

impl BandwidthTrace {
    /// A constant bandwidth.
    pub fn steady(mbit_s: f64) -> Self {
        Self {
            mbit_s: vec![mbit_s],
            clock: TraceClock::PerRequest,
        }
    }

    /// Parses a trace file: one value in Mbit/s per line; blank lines and `#` comments are
    /// ignored; a line `# clock: per-second` (or `per-request`, the default) sets the clock.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut clock = TraceClock::PerRequest;
        let mut mbit_s = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(comment) = line.strip_prefix('#') {
                match comment.trim().strip_prefix("clock:").map(str::trim) {
                    Some("per-second") => clock = TraceClock::PerSecond,
                    Some("per-request") => clock = TraceClock::PerRequest,
                    Some(other) => return Err(format!("line {}: unknown clock `{other}`", i + 1)),
                    None => {}
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let v: f64 = line
                .parse()
                .map_err(|_| format!("line {}: `{line}` is not a number of Mbit/s", i + 1))?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("line {}: bandwidth {v} must be 0 or more", i + 1));
            }
            mbit_s.push(v);
        }
        if mbit_s.is_empty() {
            return Err("the trace has no values".into());
        }
        Ok(Self { mbit_s, clock })
    }
}

/// An [`ObjectStore`] whose reads follow a [`BandwidthTrace`] (see the module docs).
#[derive(Debug)]
pub struct ShapedStore {
    inner: Arc<dyn ObjectStore>,
    trace: BandwidthTrace,
    latency: Duration,
    started: Instant,
    requests: AtomicUsize,
}

impl ShapedStore {
    /// Wraps `inner`; every read waits `latency` plus its transfer time at the trace's rate.
    pub fn new(inner: Arc<dyn ObjectStore>, trace: BandwidthTrace, latency: Duration) -> Self {
        Self {
            inner,
            trace,
            latency,
            started: Instant::now(),
            requests: AtomicUsize::new(0),
        }
    }

    /// Moves a per-request trace to its `position`-th value (a benchmark replays the same
    /// stretch of trace for every policy it compares).
    pub fn seek(&self, position: usize) {
        self.requests.store(position, Ordering::Relaxed);
    }

    /// The value the next read would get, without taking it.
    fn peek_mbit_s(&self) -> f64 {
        let n = self.trace.mbit_s.len();
        let at = match self.trace.clock {
            TraceClock::PerRequest => self.requests.load(Ordering::Relaxed),
            TraceClock::PerSecond => self.started.elapsed().as_secs() as usize,
        };
        self.trace.mbit_s[at % n]
    }

    /// The bandwidth a read starting now gets, in Mbit/s.
    fn current_mbit_s(&self) -> f64 {
        let n = self.trace.mbit_s.len();
        let at = match self.trace.clock {
            TraceClock::PerRequest => self.requests.fetch_add(1, Ordering::Relaxed),
            TraceClock::PerSecond => self.started.elapsed().as_secs() as usize,
        };
        self.trace.mbit_s[at % n]
    }
}

fn link_down() -> object_store::Error {
    object_store::Error::Generic {
        store: "ShapedStore",
        source: "the link is down (bandwidth 0 in the trace)".into(),
    }
}

impl fmt::Display for ShapedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShapedStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for ShapedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let start = Instant::now();
        if options.head {
            // A HEAD moves no payload: it costs the latency, fails on a dead link, and does not
            // advance a per-request trace (whose values are per transfer).
            tokio::time::sleep(self.latency).await;
            if self.peek_mbit_s() == 0.0 {
                return Err(link_down());
            }
            return self.inner.get_opts(location, options).await;
        }
        let mbit_s = self.current_mbit_s();
        if mbit_s == 0.0 {
            tokio::time::sleep(self.latency).await;
            return Err(link_down());
        }
        let result = self.inner.get_opts(location, options).await?;
        let (meta, range, attributes) = (
            result.meta.clone(),
            result.range.clone(),
            result.attributes.clone(),
        );
        let bytes = result.bytes().await?;
        let transfer = Duration::from_secs_f64(bytes.len() as f64 * 8.0 / (mbit_s * 1e6));
        let due = start + self.latency + transfer;
        tokio::time::sleep_until(due.into()).await;
        Ok(GetResult {
            payload: GetResultPayload::Stream(
                futures::stream::once(async move { Ok(bytes) }).boxed(),
            ),
            meta,
            range,
            attributes,
        })
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(ranges.len());
        for range in ranges {
            out.push(self.get_range(location, range.clone()).await?);
        }
        Ok(out)
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;

    #[test]
    fn traces_parse_with_their_clock_and_reject_bad_lines() {
        let t =
            BandwidthTrace::parse("# a steady link\n# clock: per-second\n100\n\n2.5\n").unwrap();
        assert_eq!(t.mbit_s, vec![100.0, 2.5]);
        assert_eq!(t.clock, TraceClock::PerSecond);
        assert_eq!(
            BandwidthTrace::parse("10\n").unwrap().clock,
            TraceClock::PerRequest
        );
        for bad in [
            "",
            "# only a comment\n",
            "10\nfast\n",
            "-1\n",
            "# clock: hourly\n1\n",
        ] {
            assert!(BandwidthTrace::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// Lower bounds only: the shaper's promise is "no sooner than"; how much later depends on
    /// the machine (timings are measured in benchmarks, never asserted).
    #[tokio::test]
    async fn reads_take_at_least_latency_plus_size_over_the_traced_bandwidth() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let path = Path::from("object");
        // 125,000 bytes = 1 Mbit.
        inner
            .put(&path, PutPayload::from(vec![7u8; 125_000]))
            .await
            .unwrap();
        let trace = BandwidthTrace {
            mbit_s: vec![10.0, 5.0, 0.0],
            clock: TraceClock::PerRequest,
        };
        let store = ShapedStore::new(inner, trace, Duration::from_millis(20));
        let start = Instant::now();
        let first = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(first, vec![7u8; 125_000], "the inner store's bytes");
        assert!(
            start.elapsed() >= Duration::from_millis(120),
            "1 Mbit at 10 Mbit/s"
        );
        let start = Instant::now();
        store.get(&path).await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(220),
            "1 Mbit at 5 Mbit/s"
        );
        let start = Instant::now();
        assert!(
            store.get(&path).await.is_err(),
            "bandwidth 0 is a dead link"
        );
        assert!(start.elapsed() >= Duration::from_millis(20));
        // The trace wraps around; a ranged read pays for its bytes only.
        let start = Instant::now();
        let part = store.get_range(&path, 0..12_500).await.unwrap();
        assert_eq!(part.len(), 12_500);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(30),
            "0.1 Mbit at 10 Mbit/s: {took:?}"
        );
        assert!(
            took < Duration::from_millis(120),
            "not the whole object's time: {took:?}"
        );
    }
}
