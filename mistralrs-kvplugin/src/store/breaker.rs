//! A circuit breaker around any [`ObjectStore`]: after [`BreakerSettings::failures`] failed
//! requests in a row the store is skipped for a cool-down (every request fails at once, without
//! reaching it), then one request probes it; a success closes the breaker, a failure opens it for
//! another cool-down.
//!
//! Why: a store that is down or silent costs every lookup its connect timeout and retries, up to
//! the hook's load timeout, for as long as the outage lasts. With the breaker open, a lookup is a
//! recompute that costs nothing on top of it.
//!
//! Invariants: only failures of the store count (a missing object, an existing one under
//! `PutMode::Create`, a failed precondition are answers, not failures); while open, at most one
//! request at a time probes; listing (store operations, not lookups) passes through untouched.

use std::{
    fmt,
    ops::Range,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::{
    path::Path, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// When a [`CircuitBreaker`] opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Failed requests in a row that open it.
    pub failures: u32,
    /// How long it stays open before a probe.
    pub cool_down: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            cool_down: Duration::from_secs(10),
        }
    }
}

/// See the module docs.
pub struct CircuitBreaker {
    inner: Arc<dyn ObjectStore>,
    settings: BreakerSettings,
    failures_in_a_row: AtomicU32,
    /// Until when requests are refused; `None` while closed.
    open_until: Mutex<Option<Instant>>,
    probing: AtomicBool,
    skipped: AtomicU64,
    opened: AtomicU64,
}

/// What the breaker decided for one request.
enum Pass {
    /// Closed: go ahead.
    Closed,
    /// Open past its cool-down: this request probes.
    Probe,
}

impl CircuitBreaker {
    /// A breaker around `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, settings: BreakerSettings) -> Self {
        Self {
            inner,
            settings,
            failures_in_a_row: AtomicU32::new(0),
            open_until: Mutex::new(None),
            probing: AtomicBool::new(false),
            skipped: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        }
    }

    /// Requests refused while open.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Times it opened.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Whether requests are refused now.
    pub fn is_open(&self) -> bool {
        self.open_until().is_some()
    }

    fn open_until(&self) -> Option<Instant> {
        *self.open_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(&self) -> object_store::Result<Pass> {
        let Some(until) = self.open_until() else {
            return Ok(Pass::Closed);
        };
        if Instant::now() >= until
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Ok(Pass::Probe);
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        Err(object_store::Error::Generic {
            store: "circuit breaker",
            source: format!(
                "the store failed {} requests in a row; skipped for a cool-down of {:?}",
                self.settings.failures, self.settings.cool_down
            )
            .into(),
        })
    }

    fn record<T>(&self, pass: Pass, result: &object_store::Result<T>) {
        let failed = match result {
            Ok(_) => false,
            Err(e) => is_failure(e),
        };
        let mut open_until = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        if failed {
            let n = self.failures_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
            if matches!(pass, Pass::Probe) || n >= self.settings.failures {
                if open_until.is_none() {
                    self.opened.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        failures = n,
                        cool_down_ms = self.settings.cool_down.as_millis() as u64,
                        "kvplugin: store failing; skipping it for a cool-down"
                    );
                }
                *open_until = Some(Instant::now() + self.settings.cool_down);
            }
        } else {
            self.failures_in_a_row.store(0, Ordering::Release);
            if open_until.take().is_some() {
                tracing::info!("kvplugin: store answers again");
            }
        }
        if matches!(pass, Pass::Probe) {
            self.probing.store(false, Ordering::Release);
        }
    }

    async fn guarded<T>(
        &self,
        request: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        let pass = self.admit()?;
        let result = request.await;
        self.record(pass, &result);
        result
    }
}

/// Whether an error says the store is failing (not an answer about one object).
fn is_failure(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotModified { .. }
    )
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner.to_string())
            .field("settings", &self.settings)
            .field("open", &self.is_open())
            .finish()
    }
}

impl fmt::Display for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CircuitBreaker({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CircuitBreaker {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.guarded(self.inner.put_opts(location, payload, opts))
            .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.guarded(self.inner.put_multipart_opts(location, opts))
            .await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.guarded(self.inner.get_opts(location, options)).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.guarded(self.inner.get_ranges(location, ranges)).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.guarded(self.inner.delete(location)).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.guarded(self.inner.copy(from, to)).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.guarded(self.inner.copy_if_not_exists(from, to)).await
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;

    /// A store that fails every request while `down` is set, counting the requests it sees.
    #[derive(Debug, Default)]
    struct Flaky {
        inner: InMemory,
        down: AtomicBool,
        seen: AtomicU64,
    }

    impl fmt::Display for Flaky {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Flaky")
        }
    }

    impl Flaky {
        fn check(&self) -> object_store::Result<()> {
            self.seen.fetch_add(1, Ordering::Relaxed);
            if self.down.load(Ordering::Relaxed) {
                return Err(object_store::Error::Generic {
                    store: "flaky",
                    source: "connection refused".into(),
                });
            }
            Ok(())
        }
    }

    #[async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.check()?;
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.check()?;
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.check()?;
            self.inner.get_opts(location, options).await
        }
        async fn delete(&self, location: &Path) -> object_store::Result<()> {
            self.check()?;
            self.inner.delete(location).await
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.check()?;
            self.inner.copy(from, to).await
        }
        async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.check()?;
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    #[tokio::test]
    async fn a_failing_store_is_skipped_for_a_cool_down_then_probed_once() {
        let flaky = Arc::new(Flaky::default());
        let breaker = CircuitBreaker::new(
            flaky.clone(),
            BreakerSettings {
                failures: 3,
                cool_down: Duration::from_millis(200),
            },
        );
        let path = Path::from("a");
        breaker.put(&path, "x".into()).await.unwrap();
        // Misses are answers: they never open it.
        for _ in 0..5 {
            let missing = breaker.get(&Path::from("missing")).await;
            assert!(matches!(missing, Err(object_store::Error::NotFound { .. })));
        }
        assert!(!breaker.is_open());

        flaky.down.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            assert!(breaker.get(&path).await.is_err());
        }
        assert!(breaker.is_open());
        let seen = flaky.seen.load(Ordering::Relaxed);
        // Open: refused without reaching the store.
        for _ in 0..10 {
            assert!(breaker.head(&path).await.is_err());
        }
        assert_eq!(flaky.seen.load(Ordering::Relaxed), seen);
        assert_eq!((breaker.skipped(), breaker.opened()), (10, 1));

        // After the cool-down one request probes; still down, it opens again.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(breaker.get(&path).await.is_err());
        assert_eq!(flaky.seen.load(Ordering::Relaxed), seen + 1);
        assert!(breaker.get(&path).await.is_err());
        assert_eq!(flaky.seen.load(Ordering::Relaxed), seen + 1, "reopened");

        // The store comes back: the next probe closes it.
        flaky.down.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let body = breaker.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&body[..], b"x");
        assert!(!breaker.is_open());
        assert!(breaker.head(&path).await.is_ok());
    }
}
