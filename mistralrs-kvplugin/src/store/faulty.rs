//! [`FaultyStore`]: an [`ObjectStore`] in front of a real one that fails the way stores fail in
//! production, switched at run time, for `kvplugin bench faults` and tests.
//!
//! Each [`Fault`] stands for a failure seen from the client's side of the wire: a server that
//! refuses connections, one that accepts and never answers, a slow link, credentials the server
//! rejects, a disk that is full, an object deleted between a lookup's listing and its fetch.
//! Faults in the objects themselves (corrupt, truncated, hostile, planted) are not made here:
//! the benchmark writes those bytes into the real store, where every reader sees them.
//!
//! Invariants:
//! - With [`Fault::None`] every call is the inner store's, unchanged.
//! - A fault changes only the calls it names (reads are GET, ranged GET and HEAD; writes are PUT,
//!   multipart PUT, copy and delete); listing always passes through (the GC's and the tests'
//!   view of the bucket).
//! - [`Fault::Hang`] never completes a call and never fails it: only the caller's own timeout
//!   ends it (as with a server that accepted the connection and went silent).

use std::{
    fmt,
    ops::Range,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::{
    path::Path, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// A failure of the store, as its client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// No fault.
    #[default]
    None,
    /// Every call fails at once (connection refused).
    Down,
    /// Every call is accepted and never answered.
    Hang,
    /// Every read waits this long before it is made.
    SlowReads(Duration),
    /// Every call is refused for its credentials (HTTP 403).
    Denied,
    /// Writes fail with "no space left on device"; reads work.
    Full,
    /// GETs find nothing (the object was deleted after the lookup saw it); HEAD still finds it.
    Vanished,
}

/// The switch a [`FaultyStore`] reads its fault from; clone it to change the fault later.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch(Arc<Mutex<Fault>>);

impl FaultSwitch {
    /// Sets the fault every later call sees.
    pub fn set(&self, fault: Fault) {
        *self.0.lock().expect("fault switch") = fault;
    }

    /// The fault now.
    pub fn get(&self) -> Fault {
        *self.0.lock().expect("fault switch")
    }
}

/// An [`ObjectStore`] that fails as its [`FaultSwitch`] says.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    switch: FaultSwitch,
}

impl FaultyStore {
    /// `inner` behind `switch`.
    pub fn new(inner: Arc<dyn ObjectStore>, switch: FaultSwitch) -> Self {
        Self { inner, switch }
    }

    /// Applies the fault (read once) to one call of kind `call` on `location`.
    async fn before(&self, location: &Path, call: Call) -> object_store::Result<()> {
        let read = call != Call::Write;
        match self.switch.get() {
            Fault::None => Ok(()),
            Fault::Down => Err(generic("connection refused (the store is down)")),
            Fault::Hang => futures::future::pending().await,
            Fault::SlowReads(delay) => {
                if read {
                    tokio::time::sleep(delay).await;
                }
                Ok(())
            }
            Fault::Denied => Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: "403 Forbidden: the access key is not valid for this bucket".into(),
            }),
            Fault::Full if !read => Err(object_store::Error::Generic {
                store: "faulty",
                source: Box::new(std::io::Error::from_raw_os_error(28)),
            }),
            Fault::Vanished if call == Call::Get => Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: "deleted since the lookup saw it".into(),
            }),
            Fault::Full | Fault::Vanished => Ok(()),
        }
    }
}

/// The kinds of call a fault tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// A GET, whole or ranged.
    Get,
    /// A HEAD.
    Head,
    /// PUT, multipart PUT, copy, delete.
    Write,
}

fn generic(reason: &'static str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: reason.into(),
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({}, {:?})", self.inner, self.switch.get())
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.before(location, Call::Write).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.before(location, Call::Write).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let call = if options.head { Call::Head } else { Call::Get };
        self.before(location, call).await?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.before(location, Call::Get).await?;
        self.inner.get_ranges(location, ranges).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.before(location, Call::Write).await?;
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.before(to, Call::Write).await?;
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.before(to, Call::Write).await?;
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;

    #[tokio::test]
    async fn each_fault_fails_the_calls_it_names_and_only_those() {
        let switch = FaultSwitch::default();
        let store = FaultyStore::new(Arc::new(InMemory::new()), switch.clone());
        let path = Path::from("a/b");
        store
            .put(&path, Bytes::from_static(b"x").into())
            .await
            .unwrap();

        switch.set(Fault::Full);
        let full = store.put(&path, Bytes::from_static(b"y").into()).await;
        assert!(format!("{}", full.unwrap_err()).contains("No space left"));
        assert_eq!(
            &store.get(&path).await.unwrap().bytes().await.unwrap()[..],
            b"x"
        );

        switch.set(Fault::Vanished);
        assert!(store.head(&path).await.is_ok());
        assert!(matches!(
            store.get(&path).await,
            Err(object_store::Error::NotFound { .. })
        ));

        switch.set(Fault::Denied);
        assert!(matches!(
            store.head(&path).await,
            Err(object_store::Error::PermissionDenied { .. })
        ));
        switch.set(Fault::Down);
        assert!(store.get(&path).await.is_err());

        switch.set(Fault::Hang);
        let hung = tokio::time::timeout(Duration::from_millis(50), store.get(&path)).await;
        assert!(hung.is_err(), "a hung store answered");

        switch.set(Fault::SlowReads(Duration::from_millis(200)));
        let started = std::time::Instant::now();
        store.get(&path).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));

        switch.set(Fault::None);
        assert_eq!(
            &store.get(&path).await.unwrap().bytes().await.unwrap()[..],
            b"x"
        );
    }
}
