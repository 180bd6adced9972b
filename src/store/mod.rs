//! Region byte stores, through `object_store`: `file://` (a directory; the embedded default) and
//! `s3://bucket/prefix` (any S3-compatible store).
//!
//! Layout inside a store: `<namespace>/<name>/<uid>/<file>`, so a re-created image (new uid)
//! never meets the bytes of its predecessor, and `.ims-probe/` for readiness probes.

mod s3;

use std::{
    path::{Component, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, local::LocalFileSystem, path::Path};

use crate::api::RegionStorage;

/// Where `file://` stores may live.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// `file://` URLs must name a directory under this path (default `/var/lib/ims`): a Region
    /// cannot point the operator at the rest of its filesystem.
    pub file_url_root: PathBuf,
    /// The directory that `file_url_root` stands for on this machine: the same path in a
    /// cluster, the data directory for `ims-operator local`.
    pub file_dir: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { file_url_root: PathBuf::from("/var/lib/ims"), file_dir: PathBuf::from("/var/lib/ims") }
    }
}

/// S3 credentials, from the Secret a Region names.
#[derive(Clone, Debug, Default)]
pub struct S3Credentials {
    /// `accessKeyID`.
    pub access_key_id: String,
    /// `secretAccessKey`.
    pub secret_access_key: String,
}

/// Why a store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The Region's storage spec is unusable; the message says what to change.
    #[error("{0}")]
    InvalidSpec(String),
    /// The store did not do what was asked.
    #[error("{context}: {source}")]
    Backend {
        /// What was being done.
        context: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// A probe read back other bytes than it wrote.
    #[error("the store returned other bytes than were written to {0}")]
    Corrupt(String),
}

impl StoreError {
    fn backend(context: impl Into<String>) -> impl FnOnce(object_store::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Backend { context, source }
    }

    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Backend { .. } | StoreError::Corrupt(_))
    }
}

/// One region's store.
#[derive(Clone, Debug)]
pub struct RegionStore {
    store: Arc<dyn ObjectStore>,
    url: String,
    /// Prefix inside the bucket (S3) or none (file).
    base: Path,
    /// For file stores: the directory on this machine.
    dir: Option<PathBuf>,
    /// For file stores: the same store as `store`, for mapping objects to files.
    local: Option<Arc<LocalFileSystem>>,
    /// The region's KMS, which wraps the data keys of its encrypted images.
    kms: Option<crate::crypt::Kms>,
}

impl RegionStore {
    /// Opens the store a Region describes. `credentials` are needed for `s3://`.
    pub fn open(
        spec: &RegionStorage,
        config: &StoreConfig,
        credentials: Option<&S3Credentials>,
    ) -> Result<Self, StoreError> {
        let url = spec.url.trim();
        if let Some(path) = url.strip_prefix("file://") {
            if spec.endpoint.is_some() || spec.secret_ref.is_some() {
                return Err(StoreError::InvalidSpec(
                    "storage.endpoint and storage.secretRef are only for s3:// stores: remove them, or use an s3:// URL".into(),
                ));
            }
            return Self::file(url, path, config);
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            return s3::open(url, rest, spec, credentials);
        }
        Err(StoreError::InvalidSpec(format!(
            "unsupported storage URL {url:?}: use file:///var/lib/ims/<region> or s3://bucket/prefix"
        )))
    }

    fn file(url: &str, path: &str, config: &StoreConfig) -> Result<Self, StoreError> {
        let requested = PathBuf::from(path);
        if !requested.is_absolute() || requested.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(StoreError::InvalidSpec(format!(
                "storage.url {url:?} must be an absolute path without `..`, e.g. file://{}/<region>",
                config.file_url_root.display()
            )));
        }
        let Ok(relative) = requested.strip_prefix(&config.file_url_root) else {
            return Err(StoreError::InvalidSpec(format!(
                "storage.url {url:?} is outside the operator's file store root {}: use file://{}/<region>",
                config.file_url_root.display(),
                config.file_url_root.display()
            )));
        };
        if relative.as_os_str().is_empty() {
            return Err(StoreError::InvalidSpec(format!(
                "storage.url {url:?} is the store root itself: give each region its own directory, e.g. file://{}/<region>",
                config.file_url_root.display()
            )));
        }
        let dir = config.file_dir.join(relative);
        std::fs::create_dir_all(&dir).map_err(|e| {
            StoreError::InvalidSpec(format!("cannot create the store directory {}: {e}", dir.display()))
        })?;
        let local = Arc::new(
            LocalFileSystem::new_with_prefix(&dir)
                .map_err(StoreError::backend(format!("open {}", dir.display())))?
                .with_automatic_cleanup(true),
        );
        Ok(RegionStore {
            store: local.clone(),
            url: url.to_string(),
            base: Path::default(),
            dir: Some(dir),
            local: Some(local),
            kms: None,
        })
    }

    /// A store over any `ObjectStore` (tests).
    pub fn from_object_store(store: Arc<dyn ObjectStore>, url: &str) -> Self {
        RegionStore { store, url: url.to_string(), base: Path::default(), dir: None, local: None, kms: None }
    }

    /// The same store, with `kms` wrapping the data keys of its encrypted images.
    pub fn with_kms(mut self, kms: crate::crypt::Kms) -> Self {
        self.kms = Some(kms);
        self
    }

    /// The region's KMS.
    pub fn kms(&self) -> Option<&crate::crypt::Kms> {
        self.kms.as_ref()
    }

    /// The store URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// For file stores: the directory on this machine that holds the objects.
    pub fn local_dir(&self) -> Option<&std::path::Path> {
        self.dir.as_deref()
    }

    /// For file stores: the file that holds `object` (whether or not it exists yet).
    pub fn local_file(&self, object: &Path) -> Option<PathBuf> {
        self.local.as_ref()?.path_to_filesystem(object).ok()
    }

    /// Prefix of an image's objects: `<namespace>/<name>/<uid>`.
    pub fn image_prefix(&self, namespace: &str, name: &str, uid: &str) -> Path {
        self.join(&format!("{namespace}/{name}/{uid}"))
    }

    /// A path below the store's base.
    pub fn join(&self, relative: &str) -> Path {
        let mut path = self.base.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        path
    }

    /// URL of an object, for `status.location`: `file:///dir/...` or `s3://bucket/...`.
    pub fn object_url(&self, path: &Path) -> String {
        match &self.dir {
            Some(dir) => format!("file://{}/{}", dir.display(), path),
            None => format!(
                "{}/{}",
                self.url.trim_end_matches('/'),
                path.as_ref().strip_prefix(self.base.as_ref()).unwrap_or(path.as_ref()).trim_start_matches('/')
            ),
        }
    }

    /// Writes, reads back and deletes a probe object: the store works.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let nonce = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        );
        let path = self.join(&format!(".ims-probe/{nonce}"));
        let payload = Bytes::from(format!("ims-operator probe {nonce}"));
        self.store
            .put(&path, PutPayload::from_bytes(payload.clone()))
            .await
            .map_err(StoreError::backend(format!("write probe {path}")))?;
        let read = self.store.get(&path).await.map_err(StoreError::backend(format!("read probe {path}")))?;
        let bytes = read.bytes().await.map_err(StoreError::backend(format!("read probe {path}")))?;
        if bytes != payload {
            return Err(StoreError::Corrupt(path.to_string()));
        }
        self.store.delete(&path).await.map_err(StoreError::backend(format!("delete probe {path}")))?;
        Ok(())
    }

    /// Deletes every object under `prefix`; objects already gone are fine.
    pub async fn delete_prefix(&self, prefix: &Path) -> Result<usize, StoreError> {
        let paths: Vec<Path> = self
            .store
            .list(Some(prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(StoreError::backend(format!("list {prefix}")))?;
        let count = paths.len();
        let mut deletes = futures::stream::iter(paths.into_iter().map(|p| {
            let store = self.store.clone();
            async move {
                match store.delete(&p).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(StoreError::Backend { context: format!("delete {p}"), source: e }),
                }
            }
        }))
        .buffer_unordered(8);
        while let Some(result) = deletes.next().await {
            result?;
        }
        Ok(count)
    }

    /// Objects (path, size) under a prefix.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<(Path, u64)>, StoreError> {
        self.store
            .list(Some(prefix))
            .map_ok(|meta| (meta.location, meta.size))
            .try_collect()
            .await
            .map_err(StoreError::backend(format!("list {prefix}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> RegionStorage {
        RegionStorage { url: url.into(), ..Default::default() }
    }

    #[tokio::test]
    async fn file_store_probes_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: dir.path().into() };
        let store = RegionStore::open(&spec("file:///var/lib/ims/eu-west"), &config, None).unwrap();
        store.probe().await.unwrap();
        assert!(dir.path().join("eu-west").is_dir(), "the region directory is created under the data dir");
        let prefix = store.image_prefix("t", "img", "uid-1");
        store.object_store().put(&prefix.clone().join("disk"), PutPayload::from_static(b"bytes")).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("eu-west/t/img/uid-1/disk")).unwrap(), b"bytes");
        assert_eq!(
            store.object_url(&prefix.clone().join("disk")),
            format!("file://{}/eu-west/t/img/uid-1/disk", dir.path().display())
        );
        assert_eq!(store.delete_prefix(&prefix).await.unwrap(), 1);
        assert_eq!(store.delete_prefix(&prefix).await.unwrap(), 0, "deleting what is gone is fine");
        assert!(store.list(&store.join("")).await.unwrap().is_empty(), "probe and image objects are gone");
    }

    #[test]
    fn bad_storage_urls_say_what_to_use() {
        let config = StoreConfig::default();
        let cases = [
            ("file:///etc/ims", "outside the operator's file store root /var/lib/ims"),
            ("file:///var/lib/ims/../../etc", "must be an absolute path without `..`"),
            ("file:///var/lib/ims", "is the store root itself"),
            (
                "gs://bucket",
                "unsupported storage URL \"gs://bucket\": use file:///var/lib/ims/<region> or s3://bucket/prefix",
            ),
            ("s3://", "s3:// URLs need a bucket"),
        ];
        for (url, want) in cases {
            let err = RegionStore::open(&spec(url), &config, None).unwrap_err().to_string();
            assert!(err.contains(want), "{url}: {err}");
        }
        let mut with_secret = spec("file:///var/lib/ims/x");
        with_secret.secret_ref = Some(crate::api::SecretReference { name: "s".into() });
        assert!(RegionStore::open(&with_secret, &config, None).unwrap_err().to_string().contains("only for s3://"));
    }
}
