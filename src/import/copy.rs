//! Store-to-store copies (an image's bytes into another region) and the cleanup of uploads that
//! a killed process abandoned.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::{GetOptions, GetResultPayload, ObjectStore, ObjectStoreExt, path::Path};

use super::{
    Expected, ImportError, Imported, Progress, check, local,
    pipeline::{self, Hashing},
    remove_failed, verify_format,
};
use crate::{
    api::DeclaredFormat,
    crypt::{CryptError, Opener},
    store::{RegionStore, StoreError},
};

/// What a copy moves.
#[derive(Clone, Copy, Debug)]
pub struct CopyRequest<'a> {
    /// The store the bytes are in.
    pub from: &'a RegionStore,
    /// Where they are in `from`.
    pub from_object: &'a object_store::path::Path,
    /// The store they go to.
    pub to: &'a RegionStore,
    /// Where they go in `to`.
    pub to_object: &'a object_store::path::Path,
    /// Lower-case hex sha256 the bytes must hash to (the source image's status.checksum.sha256).
    pub sha256: &'a str,
    /// Whether the source object is encrypted (its image has `encryption`): it is read through
    /// the KMS of `from`.
    pub from_sealed: bool,
    /// The KMS key to encrypt the copy with, by the KMS of `to`.
    pub encrypt: Option<&'a str>,
}

/// Streams `from_object` into `to_object` (multipart, never whole in memory), hashing on the fly;
/// verifies the landed object: its size equals the source's and the sha256 of what was written equals
/// `sha256` — on a mismatch or any failure, nothing stays at `to_object` (delete it / abort the upload).
/// Returns the `Imported` record (object, size, sha256, detected format via verify_format with DeclaredFormat::Auto).
///
/// Between two `file://` stores the kernel copies and the sha256 is that of the landed bytes,
/// read back from the page cache while the copy runs (`local`). Otherwise the sha256 is that of
/// the bytes handed to the upload (the hasher and the upload share each chunk, no copy in
/// between) and the landed object's size is checked (`head`); it is not read back, which on S3
/// would be a second full GET. [`hash_object`] does that when wanted.
///
/// Errors: the source object missing is [`ImportError::SourceGone`] (not transient); a hash
/// that differs from `sha256` is [`ImportError::ChecksumMismatch`] (not transient); store
/// failures, and a source that ends early, are [`ImportError::Store`] (transient).
pub async fn copy(request: CopyRequest<'_>, progress: Progress<'_>) -> Result<Imported, ImportError> {
    let CopyRequest { to, to_object, .. } = request;
    let result = match copy_bytes(request, progress).await {
        Ok((size, sha256, opener)) => verify_format(to, to_object, size, DeclaredFormat::Auto, opener)
            .await
            .map(|detected| Imported { object: to_object.clone(), size, sha256, detected }),
        Err(e) => Err(e),
    };
    if result.is_err() {
        remove_failed(to, to_object, "copy").await;
    }
    result
}

async fn copy_bytes(
    request: CopyRequest<'_>,
    progress: Progress<'_>,
) -> Result<(u64, String, Option<Opener>), ImportError> {
    let CopyRequest { from, from_object, to, to_object, sha256: expected, from_sealed, encrypt } = request;
    if !from_sealed
        && encrypt.is_none()
        && let (Some(source), Some(dest)) = (from.local_file(from_object), to.local_file(to_object))
    {
        let (size, sha256) = file_store_to_file_store(request, &source, &dest, progress).await?;
        return Ok((size, sha256, None));
    }
    // The plaintext of the source, sealed again under the destination's own data key if it is
    // to be encrypted: the hash is over the plaintext either way.
    let (size, mut stream) =
        if from_sealed { open_sealed(from, from_object).await? } else { open_object(from, from_object).await? };
    let stored = if encrypt.is_some() { crate::crypt::sealed_len(size) } else { size };
    let mut sink = pipeline::Sink::start(to, to_object, Some(size), encrypt).await?;
    let mut hashing = Hashing::start(false);
    let mut done: u64 = 0;
    let mut last_report = Instant::now();
    let outcome: Result<(), ImportError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            done += chunk.len() as u64;
            if done > size {
                return Err(changed_under_us(from, from_object, size, "is longer"));
            }
            hashing.feed(&chunk).await?;
            sink.put(chunk).await?;
            if last_report.elapsed() >= progress.every {
                (progress.report)(done, Some(size));
                last_report = Instant::now();
            }
        }
        if done < size {
            return Err(changed_under_us(from, from_object, size, "is shorter"));
        }
        Ok(())
    }
    .await;
    drop(stream);
    if let Err(e) = outcome {
        sink.abort().await;
        return Err(e);
    }
    let (written, digests) = tokio::join!(sink.finish(), hashing.finish());
    let opener = written?;
    let digests = digests?;
    let landed = to.object_store().head(to_object).await?.size;
    if landed != stored {
        return Err(ImportError::Store(object_store::Error::Generic {
            store: "region",
            source: format!("{} holds {landed} bytes after the copy, the source {size}", to.object_url(to_object))
                .into(),
        }));
    }
    (progress.report)(done, Some(done));
    check(expect_sha256(expected), &digests).map(|sha256| (size, sha256, opener))
}

/// Between two `file://` stores: copied by the kernel, the landed bytes hashed (`local`), renamed
/// into place once size and sha256 are right.
async fn file_store_to_file_store(
    request: CopyRequest<'_>,
    source: &std::path::Path,
    dest: &std::path::Path,
    mut progress: Progress<'_>,
) -> Result<(u64, String), ImportError> {
    let CopyRequest { from, from_object, sha256: expected, .. } = request;
    let file = match tokio::fs::File::open(source).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(source_gone(from, from_object)),
        Err(e) => return Err(local::store_error(format!("opening {}: {e}", source.display()))),
    };
    let size = file
        .metadata()
        .await
        .map_err(|e| local::store_error(format!("reading the size of {}: {e}", source.display())))?
        .len();
    let file = file.into_std().await;
    let staged = local::copy_file(file, source, dest, size, false, Some(size), &mut progress).await?;
    if staged.len != size {
        let what = if staged.len < size { "is shorter" } else { "is longer" };
        return Err(changed_under_us(from, from_object, size, what));
    }
    Ok((size, staged.accept(expect_sha256(expected), &mut progress).await?))
}

/// What a copy's bytes must hash to: the source image's sha256 (any case).
fn expect_sha256(sha256: &str) -> Option<Expected> {
    Some(Expected::Sha256(sha256.to_ascii_lowercase()))
}

fn changed_under_us(store: &RegionStore, object: &Path, size: u64, what: &str) -> ImportError {
    ImportError::Store(object_store::Error::Generic {
        store: "region",
        source: format!(
            "the source object {} {what} than the {size} bytes it had when opened",
            store.object_url(object)
        )
        .into(),
    })
}

/// Opens a stored object for streaming: its size and its bytes. Objects a `file://` store
/// hands out as open files are read ahead on a blocking thread in 256 KiB chunks
/// (object_store's own stream reads 8 KiB at a time, one blocking task each); others (S3)
/// stream as they come.
async fn open_object(
    store: &RegionStore,
    object: &Path,
) -> Result<(u64, BoxStream<'static, Result<Bytes, ImportError>>), ImportError> {
    let got = match store.object_store().get_opts(object, GetOptions::default()).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Err(source_gone(store, object)),
        Err(e) => return Err(e.into()),
    };
    let size = got.meta.size;
    let stream = match got.payload {
        GetResultPayload::File(file, path) => pipeline::file_stream(file, path, got.range),
        GetResultPayload::Stream(stream) => stream.map(|chunk| chunk.map_err(ImportError::from)).boxed(),
    };
    Ok((size, stream))
}

/// Opens an encrypted stored object for streaming: its plaintext size and plaintext.
async fn open_sealed(
    store: &RegionStore,
    object: &Path,
) -> Result<(u64, BoxStream<'static, Result<Bytes, ImportError>>), ImportError> {
    let opener = match crate::crypt::open(store, object).await {
        Ok(opener) => std::sync::Arc::new(opener),
        Err(CryptError::Store(object_store::Error::NotFound { .. })) => return Err(source_gone(store, object)),
        Err(e) => return Err(e.into()),
    };
    let size = opener.plain_len();
    let stream = crate::crypt::plain_stream(store.object_store().clone(), object.clone(), opener, 0..size);
    Ok((size, stream.map(|chunk| chunk.map_err(ImportError::from)).boxed()))
}

fn source_gone(store: &RegionStore, object: &Path) -> ImportError {
    ImportError::SourceGone(format!(
        "the source bytes are gone: {} is not in its region store (the source image was deleted, or its bytes \
         were removed); copy from an image that is Active",
        store.object_url(object)
    ))
}

/// Reads `object` back and hashes it, the way [`copy`] reads its source (read-ahead reader,
/// hasher on its own thread): its size and lower-case hex sha256. A missing object is
/// [`ImportError::SourceGone`].
pub async fn hash_object(store: &RegionStore, object: &Path) -> Result<(u64, String), ImportError> {
    let (size, mut stream) = open_object(store, object).await?;
    let mut hashing = Hashing::start(false);
    let mut done = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        done += chunk.len() as u64;
        hashing.feed(&chunk).await?;
    }
    if done != size {
        return Err(changed_under_us(store, object, size, if done < size { "is shorter" } else { "is longer" }));
    }
    Ok((size, hashing.finish().await?.sha256))
}

/// Deletes the staging files of uploads that never completed under `prefix` of a `file://`
/// store; returns how many. See [`sweep_abandoned_older_than`]; this one removes them whatever
/// their age, so call it when no upload into `prefix` should be running (the image is being
/// deleted, or its import is about to be retried after a restart). An upload still running
/// there then fails at completion (a transient store error; nothing wrong is ever stored).
pub async fn sweep_abandoned(store: &RegionStore, prefix: &Path) -> Result<usize, StoreError> {
    sweep_abandoned_older_than(store, prefix, Duration::ZERO).await
}

/// Deletes the staging files of uploads into `prefix` of a `file://` store that were last
/// written at least `min_age` ago; returns how many.
///
/// object_store's `LocalFileSystem` writes an upload (multipart or not, and copies) to
/// `<object>#<n>` next to the object and renames it into place when it completes. A failed or
/// dropped upload removes its file, but a killed process (OOM, node loss, SIGKILL) leaves it:
/// invisible to `list` (so [`RegionStore::delete_prefix`] and quota accounting never see it),
/// it holds disk space and keeps the image's directory from being removed. Empty directories
/// left behind under `prefix` (and above it, up to the store's root) are removed too.
///
/// Other stores report 0. On S3 an abandoned multipart upload cannot be listed or removed
/// through object_store; give the bucket a lifecycle rule that aborts incomplete multipart
/// uploads (`AbortIncompleteMultipartUpload`, e.g. `DaysAfterInitiation: 1`), which removes
/// their parts.
pub async fn sweep_abandoned_older_than(
    store: &RegionStore,
    prefix: &Path,
    min_age: Duration,
) -> Result<usize, StoreError> {
    let Some(root) = store.local_dir().map(std::path::Path::to_path_buf) else {
        return Ok(0);
    };
    let dir = prefix.parts().fold(root.clone(), |dir, part| dir.join(part.as_ref()));
    let swept = tokio::task::spawn_blocking(move || {
        let removed = sweep_dir(&dir, min_age)?;
        // Like LocalFileSystem's automatic cleanup: empty directories up to the root go.
        let mut parent = Some(dir.as_path());
        while let Some(d) = parent.filter(|d| *d != root && d.starts_with(&root)) {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
            parent = d.parent();
        }
        Ok(removed)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    swept.map_err(|e| StoreError::Backend {
        context: format!("sweep abandoned uploads under {prefix}"),
        source: object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) },
    })
}

/// Removes staging files below `dir` (recursively; symlinks are not followed) and the
/// directories that end up empty below it.
fn sweep_dir(dir: &std::path::Path, min_age: Duration) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            removed += sweep_dir(&path, min_age)?;
            let _ = std::fs::remove_dir(&path); // only when empty
            continue;
        }
        if !kind.is_file() || !is_staging_file(&entry.file_name()) {
            continue;
        }
        if !min_age.is_zero() {
            let age = entry.metadata()?.modified()?.elapsed().unwrap_or_default();
            if age < min_age {
                continue;
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(file = %path.display(), "removed the staging file of an abandoned upload");
                removed += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Whether a file name is a LocalFileSystem staging file, `<name>#<digits>`: exactly the names
/// object_store does not take for objects (it splits at the first `#`).
fn is_staging_file(name: &std::ffi::OsStr) -> bool {
    let Some((base, suffix)) = name.to_str().and_then(|n| n.split_once('#')) else {
        return false;
    };
    !base.is_empty() && !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests;
