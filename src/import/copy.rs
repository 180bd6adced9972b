//! Store-to-store copies (interim version; the overlapped engine replaces it).

use futures::StreamExt;
use object_store::{ObjectStoreExt, WriteMultipart, path::Path};
use sha2::{Digest, Sha256};

use super::{ImportError, Imported, PART_SIZE, Progress, hex, verify_format};
use crate::{api::DeclaredFormat, store::RegionStore};

/// What a copy moves.
pub struct CopyRequest<'a> {
    /// Source store.
    pub from: &'a RegionStore,
    /// Source object.
    pub from_object: &'a Path,
    /// Destination store.
    pub to: &'a RegionStore,
    /// Destination object.
    pub to_object: &'a Path,
    /// Lower-case hex sha256 the bytes must hash to.
    pub sha256: &'a str,
}

/// Streams `from_object` into `to_object`, hashing on the fly; nothing stays on failure.
pub async fn copy(request: CopyRequest<'_>, progress: Progress<'_>) -> Result<Imported, ImportError> {
    let result = stream(&request, progress).await;
    let result = match result {
        Ok(size) => verify_format(request.to, request.to_object, size, DeclaredFormat::Auto).await.map(|detected| {
            Imported { object: request.to_object.clone(), size, sha256: request.sha256.to_string(), detected }
        }),
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = request.to.object_store().delete(request.to_object).await;
    }
    result
}

async fn stream(request: &CopyRequest<'_>, progress: Progress<'_>) -> Result<u64, ImportError> {
    let source = match request.from.object_store().get(request.from_object).await {
        Ok(s) => s,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ImportError::UnsupportedFormat(format!("the source object {} is gone", request.from_object)));
        }
        Err(e) => return Err(e.into()),
    };
    let total = source.meta.size;
    let upload = request.to.object_store().put_multipart(request.to_object).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let mut last = std::time::Instant::now();
    let mut body = source.into_stream();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e.into());
            }
        };
        hasher.update(&chunk);
        done += chunk.len() as u64;
        if let Err(e) = writer.wait_for_capacity(4).await {
            return Err(e.into());
        }
        writer.put(chunk);
        if last.elapsed() >= progress.every {
            (progress.report)(done, Some(total));
            last = std::time::Instant::now();
        }
    }
    writer.finish().await?;
    (progress.report)(done, Some(total));
    let actual = hex(&hasher.finalize());
    if actual != request.sha256 {
        return Err(ImportError::ChecksumMismatch {
            algorithm: "sha256",
            expected: request.sha256.to_string(),
            actual,
        });
    }
    Ok(done)
}

/// Removes what interrupted uploads left under `prefix`: a file store's multipart staging files
/// (`<object>#<n>`, which object_store's listings do not show). S3 keeps abandoned multipart
/// uploads invisibly until they are aborted: a bucket lifecycle rule
/// (`AbortIncompleteMultipartUpload`) cleans those (see docs/OPERATIONS.md).
pub async fn sweep_abandoned(store: &RegionStore, prefix: &Path) -> Result<usize, crate::store::StoreError> {
    let Some(dir) = store.local_dir() else { return Ok(0) };
    let root = dir.join(prefix.as_ref());
    let swept = tokio::task::spawn_blocking(move || {
        let mut swept = 0;
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if entry.file_name().to_string_lossy().contains('#') && std::fs::remove_file(&path).is_ok() {
                    swept += 1;
                }
            }
        }
        swept
    })
    .await
    .unwrap_or(0);
    Ok(swept)
}
