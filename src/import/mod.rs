//! Moving an image's bytes into a region store: streamed (never whole in memory), hashed on the
//! fly, size-limited while streaming, verified against the declared checksum, and the format
//! detected from the stored bytes. On any failure nothing stays in the store.
//!
//! The bytes are hashed on their own threads (see `pipeline`), overlapped with the reads and
//! the store writes: the hashers and the multipart upload share each chunk (`Bytes` clones, no
//! copy). [`copy()`] moves a stored object from one region store to another the same way. From a
//! local file into a `file://` store, the kernel copies and the landed bytes are hashed (see
//! `local`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, path::Path};

use crate::{
    api::{DeclaredFormat, ImageType, conditions::Reason},
    crypt::{CryptError, KmsError, Opener},
    fetch::{self, FetchError, FetchPolicy},
    format::{self, Detected, Format, FormatError, ReadAt},
    store::RegionStore,
};

mod copy;
mod local;
mod pipeline;

pub use copy::{CopyRequest, copy, hash_object, sweep_abandoned, sweep_abandoned_older_than};

/// Part size of multipart uploads to S3 (larger for objects that would otherwise need more than
/// S3's 10,000 parts, i.e. above 156 GiB; `file://` stores take 1 MiB parts). At most two parts
/// are written while the next one fills, so an upload to S3 buffers at most 48 MiB.
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
    /// The bytes are not what `checksum` says (an import), or not what the source image's
    /// `status.checksum` says (a copy).
    #[error(
        "checksum mismatch: the source's {algorithm} is {actual}, but {expected} is expected; for an import, fix \
         spec.source's checksum or URL; for a copy, the source image's stored bytes no longer match its checksum"
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
    /// A copy's source object is not in its store (the source image was deleted, or its bytes
    /// removed). Not transient: the source must become Ready again.
    #[error("{0}")]
    SourceGone(String),
    /// Encrypting or decrypting failed: the KMS key is unavailable, or sealed bytes do not open.
    #[error("{0}")]
    Crypt(#[from] crate::crypt::CryptError),
    /// A captured volume could not be read (the message says what to change).
    #[error("{0}")]
    Capture(String),
    /// A capture could not start or follow its mover Job for now (the API server did not
    /// answer): retried.
    #[error("{0}")]
    CaptureRetry(String),
}

impl ImportError {
    /// The condition reason.
    pub fn reason(&self) -> Reason {
        match self {
            ImportError::Source(_) => Reason::SourceUnreachable,
            ImportError::ChecksumMismatch { .. } => Reason::ChecksumMismatch,
            ImportError::TooLarge { .. } => Reason::TooLarge,
            ImportError::UnsupportedFormat(_) => Reason::UnsupportedFormat,
            ImportError::Store(_) => Reason::RegionNotReady,
            ImportError::SourceGone(_) => Reason::SourceNotActive,
            ImportError::Crypt(CryptError::Key(_)) => Reason::KeyUnavailable,
            ImportError::Crypt(CryptError::Envelope(_)) => Reason::ChecksumMismatch,
            ImportError::Crypt(CryptError::Store(_)) => Reason::RegionNotReady,
            ImportError::Capture(_) => Reason::CaptureFailed,
            ImportError::CaptureRetry(_) => Reason::Capturing,
        }
    }

    /// Whether a retry may succeed without a spec change.
    pub fn is_transient(&self) -> bool {
        match self {
            ImportError::Source(e) => e.is_transient(),
            ImportError::Store(_) | ImportError::CaptureRetry(_) => true,
            ImportError::Crypt(CryptError::Key(KmsError::Transient(_)) | CryptError::Store(_)) => true,
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
    /// The image's `spec.type`, which the bytes must fit (an ISO holds an ISO 9660 image, a
    /// disk type a disk); `None` checks nothing.
    pub image_type: Option<ImageType>,
    /// The KMS key to encrypt the stored bytes with (`encryption.kmsKeyID`), by the store's KMS.
    pub encrypt: Option<&'a str>,
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
    finish(store, object, request, result).await
}

/// Imports bytes that arrive as `stream` (an upload of `length` bytes) into `object` of
/// `store`, like [`import`] (`request.url` only names the source).
pub async fn import_stream(
    store: &RegionStore,
    object: &Path,
    request: Request<'_>,
    length: Option<u64>,
    stream: futures::stream::BoxStream<'static, Result<bytes::Bytes, ImportError>>,
    progress: Progress<'_>,
) -> Result<Imported, ImportError> {
    let result = stream_source(store, object, request, length, stream, progress).await;
    finish(store, object, request, result).await
}

/// Checks what landed (format, type), and removes it when anything failed.
async fn finish(
    store: &RegionStore,
    object: &Path,
    request: Request<'_>,
    result: Result<(u64, String, Option<Opener>), ImportError>,
) -> Result<Imported, ImportError> {
    let result = match result {
        Ok((size, sha256, opener)) => {
            verify_format(store, object, size, request.declared, opener).await.and_then(|detected| {
                match request.image_type.and_then(|t| crate::policy::image::contents_mismatch(t, detected.format)) {
                    Some(message) => Err(ImportError::UnsupportedFormat(message)),
                    None => Ok(Imported { object: object.clone(), size, sha256, detected }),
                }
            })
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        remove_failed(store, object, "import").await;
    }
    result
}

/// Deletes what a failed import or copy may have left at `object`.
async fn remove_failed(store: &RegionStore, object: &Path, what: &str) {
    match store.object_store().delete(object).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => tracing::warn!(object = %object, error = %e, "could not remove a failed {what}"),
    }
}

async fn stream_into(
    store: &RegionStore,
    object: &Path,
    request: Request<'_>,
    fetch_policy: &FetchPolicy,
    progress: Progress<'_>,
) -> Result<(u64, String, Option<Opener>), ImportError> {
    let Request { url, checksum, limit, encrypt, .. } = request;
    if encrypt.is_none()
        && fetch::is_file_url(url)
        && let Some(dest) = store.local_file(object)
    {
        let (len, sha256) = file_into_file_store(url, &dest, checksum, limit, fetch_policy, progress).await?;
        return Ok((len, sha256, None));
    }
    let source = fetch::open(url, fetch_policy).await?;
    let stream = futures::TryStreamExt::map_err(source.stream, ImportError::from).boxed();
    stream_source(store, object, request, source.content_length, stream, progress).await
}

async fn stream_source(
    store: &RegionStore,
    object: &Path,
    request: Request<'_>,
    content_length: Option<u64>,
    mut stream: futures::stream::BoxStream<'static, Result<bytes::Bytes, ImportError>>,
    progress: Progress<'_>,
) -> Result<(u64, String, Option<Opener>), ImportError> {
    let Request { checksum, limit, encrypt, .. } = request;
    if content_length.is_some_and(|len| len > limit) {
        return Err(ImportError::TooLarge { limit });
    }
    let want = expected(checksum);
    // Encrypted: the header first, then the sealed segments; the plaintext is what is hashed.
    let mut sink = pipeline::Sink::start(store, object, content_length, encrypt).await?;
    let mut hashing = pipeline::Hashing::start(matches!(want, Some(Expected::Sha512(_))));
    let mut done: u64 = 0;
    let mut last_report = Instant::now();
    let outcome: Result<(), ImportError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            done += chunk.len() as u64;
            if done > limit {
                return Err(ImportError::TooLarge { limit });
            }
            hashing.feed(&chunk).await?;
            sink.put(chunk).await?;
            if last_report.elapsed() >= progress.every {
                (progress.report)(done, content_length);
                last_report = Instant::now();
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        sink.abort().await;
        return Err(e);
    }
    let (written, digests) = tokio::join!(sink.finish(), hashing.finish());
    let opener = written?;
    let digests = digests?;
    (progress.report)(done, Some(done));
    check(want, &digests).map(|sha256| (done, sha256, opener))
}

/// A `file://` source into a `file://` store: copied by the kernel, the landed bytes hashed
/// (`local`), renamed into place once size and checksum are right.
async fn file_into_file_store(
    url: &str,
    dest: &std::path::Path,
    checksum: Option<&str>,
    limit: u64,
    fetch_policy: &FetchPolicy,
    mut progress: Progress<'_>,
) -> Result<(u64, String), ImportError> {
    let source = fetch::open_local_file(url, fetch_policy).await?;
    if source.len > limit {
        return Err(ImportError::TooLarge { limit });
    }
    let want = expected(checksum);
    let sha512 = matches!(want, Some(Expected::Sha512(_)));
    let staged =
        local::copy_file(source.file, &source.path, dest, limit, sha512, Some(source.len), &mut progress).await?;
    if staged.len > limit {
        return Err(ImportError::TooLarge { limit });
    }
    let len = staged.len;
    Ok((len, staged.accept(want, &mut progress).await?))
}

/// The sha256 of the bytes, when they match the expected checksum (if any).
fn check(want: Option<Expected>, digests: &pipeline::Digests) -> Result<String, ImportError> {
    match want {
        Some(Expected::Sha256(expected)) if expected != digests.sha256 => {
            Err(ImportError::ChecksumMismatch { algorithm: "sha256", expected, actual: digests.sha256.clone() })
        }
        Some(Expected::Sha512(expected)) => {
            let actual = digests.sha512.clone().unwrap_or_default();
            if expected != actual {
                return Err(ImportError::ChecksumMismatch { algorithm: "sha512", expected, actual });
            }
            Ok(digests.sha256.clone())
        }
        _ => Ok(digests.sha256.clone()),
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

/// Detects the stored format and checks it against the declared one; an encrypted object is
/// read through `opener` (its plaintext is `size` bytes).
pub async fn verify_format(
    store: &RegionStore,
    object: &Path,
    size: u64,
    declared: DeclaredFormat,
    opener: Option<Opener>,
) -> Result<Detected, ImportError> {
    let (store, path) = (store.object_store().clone(), object.clone());
    let mut reader: Box<dyn ReadAt + Send> = match opener {
        Some(opener) => Box::new(crate::crypt::PlainReader::new(store, path, Arc::new(opener))),
        None => Box::new(StoredObject { store, path, size, runtime: tokio::runtime::Handle::current() }),
    };
    let detected = tokio::task::spawn_blocking(move || format::detect(&mut *reader, size))
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

/// Non-zero pseudo-random bytes (xorshift64), for the tests of this module and its children.
#[cfg(test)]
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

#[cfg(test)]
mod tests;
