//! Moving an image's bytes into a region store: streamed (never whole in memory), hashed on the
//! fly, size-limited while streaming, verified against the declared checksum, and the format
//! detected from the stored bytes. On any failure nothing stays in the store.

mod copy;

pub use copy::{CopyRequest, copy, sweep_abandoned};

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart, path::Path};
use sha2::{Digest, Sha256, Sha512};

use crate::{
    api::DeclaredFormat,
    fetch::{self, FetchError, FetchPolicy},
    format::{self, Detected, Format, FormatError, ReadAt},
    store::RegionStore,
};

/// Part size of multipart uploads.
pub const PART_SIZE: usize = 16 * 1024 * 1024;

/// What an import stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    /// Where the bytes are.
    pub object: Path,
    /// Bytes stored.
    pub size: u64,
    /// Lower-case hex sha256 of the stored bytes.
    pub sha256: String,
    /// Format and virtual size, from the bytes.
    pub detected: Detected,
}

/// Why an import failed. The reason strings are the API's condition reasons.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The source could not be read (SSRF refusal, 404, DNS, ...).
    #[error("{0}")]
    Source(#[from] FetchError),
    /// The bytes are not what `checksum` says.
    #[error(
        "checksum mismatch: the source's {algorithm} is {actual}, spec.source says {expected}; fix the checksum or the URL"
    )]
    ChecksumMismatch {
        /// sha256 or sha512.
        algorithm: &'static str,
        /// What spec says.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// The image is larger than the limit.
    #[error(
        "the image is larger than the limit of {limit} bytes (policy maxImageSizeGiB or the Region's maxImageSizeGiB)"
    )]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The bytes are no image we take, or disagree with the declared format.
    #[error("{0}")]
    UnsupportedFormat(String),
    /// The store failed.
    #[error("region store: {0}")]
    Store(#[from] object_store::Error),
}

impl ImportError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ImportError::Source(_) => "SourceUnreachable",
            ImportError::ChecksumMismatch { .. } => "ChecksumMismatch",
            ImportError::TooLarge { .. } => "TooLarge",
            ImportError::UnsupportedFormat(_) => "UnsupportedFormat",
            ImportError::Store(_) => "RegionNotReady",
        }
    }

    /// Whether a retry may succeed without a spec change.
    pub fn is_transient(&self) -> bool {
        match self {
            ImportError::Source(e) => e.is_transient(),
            ImportError::Store(_) => true,
            _ => false,
        }
    }
}

/// Where an import reports progress: (bytes done, bytes expected if known). Called at most
/// every `every`, and once at the end.
pub struct Progress<'a> {
    /// Minimum time between reports.
    pub every: Duration,
    /// The report.
    pub report: &'a mut (dyn FnMut(u64, Option<u64>) + Send),
}

enum Expected {
    Sha256(String),
    Sha512(String),
}

fn expected(checksum: Option<&str>) -> Option<Expected> {
    let (algorithm, hex) = checksum?.split_once(':')?;
    match algorithm {
        "sha256" => Some(Expected::Sha256(hex.to_ascii_lowercase())),
        "sha512" => Some(Expected::Sha512(hex.to_ascii_lowercase())),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to import.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Source URL.
    pub url: &'a str,
    /// `sha256:<hex>` or `sha512:<hex>` the bytes must hash to.
    pub checksum: Option<&'a str>,
    /// Format the spec declares.
    pub declared: DeclaredFormat,
    /// Largest size accepted, in bytes.
    pub limit: u64,
}

/// Imports `request.url` into `object` of `store`.
pub async fn import(
    store: &RegionStore,
    object: &Path,
    request: Request<'_>,
    fetch_policy: &FetchPolicy,
    progress: Progress<'_>,
) -> Result<Imported, ImportError> {
    let result = stream_into(store, object, request, fetch_policy, progress).await;
    let result = match result {
        Ok((size, sha256)) => verify_format(store, object, size, request.declared).await.map(|detected| Imported {
            object: object.clone(),
            size,
            sha256,
            detected,
        }),
        Err(e) => Err(e),
    };
    if result.is_err() {
        match store.object_store().delete(object).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(object = %object, error = %e, "could not remove a failed import"),
        }
    }
    result
}

async fn stream_into(
    store: &RegionStore,
    object: &Path,
    request: Request<'_>,
    fetch_policy: &FetchPolicy,
    progress: Progress<'_>,
) -> Result<(u64, String), ImportError> {
    let Request { url, checksum, limit, .. } = request;
    let source = fetch::open(url, fetch_policy).await?;
    if source.content_length.is_some_and(|len| len > limit) {
        return Err(ImportError::TooLarge { limit });
    }
    let upload = store.object_store().put_multipart(object).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let want = expected(checksum);
    let mut sha256 = Sha256::new();
    let mut sha512 = matches!(want, Some(Expected::Sha512(_))).then(Sha512::new);
    let mut done: u64 = 0;
    let mut last_report = Instant::now();
    let mut stream = source.stream;
    let outcome: Result<(), ImportError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            done += chunk.len() as u64;
            if done > limit {
                return Err(ImportError::TooLarge { limit });
            }
            sha256.update(&chunk);
            if let Some(h) = sha512.as_mut() {
                h.update(&chunk);
            }
            writer.wait_for_capacity(4).await?;
            writer.write(&chunk);
            if last_report.elapsed() >= progress.every {
                (progress.report)(done, source.content_length);
                last_report = Instant::now();
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        let _ = writer.abort().await;
        return Err(e);
    }
    writer.finish().await?;
    (progress.report)(done, Some(done));
    let sha256 = hex(&sha256.finalize());
    match want {
        Some(Expected::Sha256(expected)) if expected != sha256 => {
            Err(ImportError::ChecksumMismatch { algorithm: "sha256", expected, actual: sha256 })
        }
        Some(Expected::Sha512(expected)) => {
            let actual = hex(&sha512.map(|h| h.finalize().to_vec()).unwrap_or_default());
            if expected != actual {
                return Err(ImportError::ChecksumMismatch { algorithm: "sha512", expected, actual });
            }
            Ok((done, sha256))
        }
        _ => Ok((done, sha256)),
    }
}

/// Random access to a stored object, for format detection (runs on a blocking thread).
struct StoredObject {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    runtime: tokio::runtime::Handle,
}

impl ReadAt for StoredObject {
    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        self.runtime
            .block_on(self.store.get_range(&self.path, offset..end))
            .map(|b| b.to_vec())
            .map_err(std::io::Error::other)
    }
}

/// Detects the stored format and checks it against the declared one.
pub async fn verify_format(
    store: &RegionStore,
    object: &Path,
    size: u64,
    declared: DeclaredFormat,
) -> Result<Detected, ImportError> {
    let mut reader = StoredObject {
        store: store.object_store().clone(),
        path: object.clone(),
        size,
        runtime: tokio::runtime::Handle::current(),
    };
    let detected = tokio::task::spawn_blocking(move || format::detect(&mut reader, size))
        .await
        .map_err(|e| ImportError::UnsupportedFormat(format!("format detection failed: {e}")))?;
    let detected = match detected {
        Ok(d) => d,
        Err(FormatError::Io(e)) => {
            return Err(ImportError::Store(object_store::Error::Generic { store: "region", source: Box::new(e) }));
        }
        Err(e) => return Err(ImportError::UnsupportedFormat(format!("the image is not usable: {e}"))),
    };
    if let Some(want) = declared_format(declared)
        && want != detected.format
    {
        return Err(ImportError::UnsupportedFormat(format!(
            "spec declares format {} but the bytes are {}: set format to {} (or Auto), or fix the URL",
            want.as_api_str(),
            detected.format.as_api_str(),
            detected.format.as_api_str()
        )));
    }
    Ok(detected)
}

fn declared_format(declared: DeclaredFormat) -> Option<Format> {
    Some(match declared {
        DeclaredFormat::Auto => return None,
        DeclaredFormat::Raw => Format::Raw,
        DeclaredFormat::Qcow2 => Format::Qcow2,
        DeclaredFormat::Vmdk => Format::Vmdk,
        DeclaredFormat::Vhd => Format::Vhd,
        DeclaredFormat::Vhdx => Format::Vhdx,
        DeclaredFormat::Vdi => Format::Vdi,
        DeclaredFormat::Iso => Format::Iso,
    })
}

#[cfg(test)]
mod tests;
