//! Local-disk writes that are durable once acknowledged: object_store's [`LocalFileSystem`]
//! writes a staging file and renames (or links) it into place, but never calls `fsync`, so after
//! a power loss an acknowledged object can be empty or torn. [`SyncedLocal`] syncs the object's
//! file and then its directory (the entry that names it) before a write returns.
//!
//! Invariant: a write that returned `Ok` survives a crash of the machine. The window between the
//! rename and the sync (a crash there leaves a torn object that was never acknowledged) is caught
//! by the object's seal on the next load ([`super::seal`]), which then has the next save replace
//! it. Reads, listing and deletes pass through, and so do multipart uploads (the store never
//! makes one; they keep object_store's unsynced behaviour).

use std::{fmt, path::PathBuf, sync::Arc};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::{
    local::LocalFileSystem, path::Path, GetOptions, GetResult, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// See the module docs.
#[derive(Debug)]
pub struct SyncedLocal {
    inner: Arc<LocalFileSystem>,
}

impl SyncedLocal {
    /// Syncing writes of `inner`.
    pub fn new(inner: LocalFileSystem) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    async fn sync(&self, location: &Path) -> object_store::Result<()> {
        let file = self.inner.path_to_filesystem(location)?;
        tokio::task::spawn_blocking(move || sync_file_and_dir(&file))
            .await
            .map_err(|e| generic(e.to_string()))?
            .map_err(|e| generic(e.to_string()))
    }
}

fn sync_file_and_dir(file: &PathBuf) -> std::io::Result<()> {
    std::fs::File::open(file)?.sync_all()?;
    if let Some(dir) = file.parent() {
        // A directory opened read-only can be synced on Linux and the BSDs (the entry that names
        // the file is in it).
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn generic(reason: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "local disk (sync)",
        source: reason.into(),
    }
}

impl fmt::Display for SyncedLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SyncedLocal({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for SyncedLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let result = self.inner.put_opts(location, payload, opts).await?;
        self.sync(location).await?;
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        // Unsynced: see the module docs.
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
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
        self.inner.copy(from, to).await?;
        self.sync(to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await?;
        self.sync(to).await
    }
}
