//! Encryption at rest: an image with `encryption.kmsKeyID` is stored as ciphertext.
//!
//! Envelope encryption: every disk gets a random data key, its bytes are sealed in segments
//! under it ([`envelope`]), and the data key is wrapped by the named KMS key ([`kms`]) and kept
//! in the object's header. The sha256 in status is the plaintext's; format detection, copies
//! and delivery read the plaintext through [`open`].

pub mod aws;
pub mod envelope;
pub mod kms;

use std::{ops::Range, sync::Arc};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, path::Path};

pub use envelope::{EnvelopeError, HEADER_LEN, Header, Opener, Opening, Sealer, sealed_len};
pub use kms::{DataKey, Kms, KmsError, LocalKeys};

use crate::store::RegionStore;

/// Sealed bytes read from the store per request when streaming plaintext: 16 segments.
const READ_SEGMENTS: u64 = 16;

/// Why encrypted bytes cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    /// The KMS key is missing, disabled or refused, or the KMS did not answer.
    #[error("{0}")]
    Key(#[from] KmsError),
    /// The stored bytes are not what was sealed.
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    /// The store failed.
    #[error("region store: {0}")]
    Store(#[from] object_store::Error),
}

impl CryptError {
    /// Whether the key is what is missing (not the KMS's answer, the store or the bytes).
    pub fn key_unavailable(&self) -> bool {
        matches!(self, CryptError::Key(KmsError::Unavailable(_)))
    }
}

/// The KMS of `store`, or why there is none.
fn kms_of(store: &RegionStore) -> Result<&Kms, CryptError> {
    store.kms().ok_or_else(|| {
        CryptError::Key(KmsError::Unavailable(format!("region store {} has no KMS configured", store.url())))
    })
}

/// Starts sealing a new object of `store` under KMS key `key_id`: a fresh data key, wrapped by
/// the region's KMS. Returns the sealer, the header bytes (the object's first bytes) and the data
/// key (to read the object back for format detection).
pub async fn seal(store: &RegionStore, key_id: &str) -> Result<(Sealer, Vec<u8>, DataKey), CryptError> {
    let kms = kms_of(store)?;
    let (data_key, wrapped) = kms.generate(key_id).await?;
    let mut nonce_prefix = [0u8; 7];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce_prefix)
        .map_err(|_| KmsError::Transient("the system's random source failed".into()))?;
    let header = Header { provider: kms.provider().into(), key_id: key_id.into(), wrapped, nonce_prefix };
    let (sealer, bytes) = Sealer::new(&data_key.0, &header)?;
    Ok((sealer, bytes, data_key))
}

/// Opens the sealed `object` of `store`: its header read, its data key unwrapped by the
/// region's KMS (or its recent answers: see [`Kms::unwrap`]).
pub async fn open(store: &RegionStore, object: &Path) -> Result<Opener, CryptError> {
    open_with(store, object, true).await
}

/// [`open`], asking the KMS itself: whether the key opens the data key now.
pub async fn open_uncached(store: &RegionStore, object: &Path) -> Result<Opener, CryptError> {
    open_with(store, object, false).await
}

async fn open_with(store: &RegionStore, object: &Path, cached: bool) -> Result<Opener, CryptError> {
    let kms = kms_of(store)?;
    // One request: the header, and the object's size with it.
    let options = GetOptions { range: Some(GetRange::Bounded(0..HEADER_LEN)), ..Default::default() };
    let got = store.object_store().get_opts(object, options).await?;
    let size = got.meta.size;
    let header_bytes = got.bytes().await?;
    let header = Header::decode(&header_bytes)?;
    if header.provider != kms.provider() {
        return Err(CryptError::Key(KmsError::Unavailable(format!(
            "the image was encrypted by KMS provider {} but its Region now uses {}: set the Region's spec.kms back",
            header.provider,
            kms.provider()
        ))));
    }
    let data_key = kms.unwrap(&header.key_id, &header.wrapped, cached).await?;
    Ok(Opener::new(&data_key.0, &header_bytes, size)?)
}

/// Plaintext `range` of the sealed `object` (opened by `opener`): the segments it touches, read
/// in one request and opened.
async fn read_plain(
    store: &dyn ObjectStore,
    object: &Path,
    opener: &Opener,
    range: &Range<u64>,
) -> Result<Vec<u8>, CryptError> {
    let (_, sealed) = opener.sealed_range(range);
    let bytes = store.get_range(object, sealed).await?;
    let mut opening = Opening::new(opener, range);
    let plain = opening.push(&bytes)?;
    opening.finish()?;
    Ok(plain)
}

/// Plaintext `range` of the sealed `object` (opened by `opener`), read [`READ_SEGMENTS`] sealed
/// segments at a time (its consumers stop at the first error).
pub fn plain_stream(
    store: Arc<dyn ObjectStore>,
    object: Path,
    opener: Arc<Opener>,
    range: Range<u64>,
) -> BoxStream<'static, Result<Bytes, CryptError>> {
    let (segments, _) = opener.sealed_range(&range);
    let batches: Vec<Range<u64>> = (segments.start..segments.end)
        .step_by(READ_SEGMENTS as usize)
        .map(|s| s..(s + READ_SEGMENTS).min(segments.end))
        .collect();
    futures::stream::iter(batches)
        .then(move |batch| {
            let (store, object, opener, range) = (store.clone(), object.clone(), opener.clone(), range.clone());
            async move {
                let plain = batch.start * envelope::SEGMENT..(batch.end * envelope::SEGMENT).min(opener.plain_len());
                let want = range.start.max(plain.start)..range.end.min(plain.end);
                read_plain(&*store, &object, &opener, &want).await.map(Bytes::from)
            }
        })
        .boxed()
}

/// Random access to the plaintext of a sealed object, for format detection (on a blocking
/// thread): one segment at a time, the last one read kept.
pub struct PlainReader {
    store: Arc<dyn ObjectStore>,
    object: Path,
    opener: Arc<Opener>,
    runtime: tokio::runtime::Handle,
    last: Option<(u64, Vec<u8>)>,
}

impl PlainReader {
    /// A reader of `object` of `store`, opened by `opener`.
    pub fn new(store: Arc<dyn ObjectStore>, object: Path, opener: Arc<Opener>) -> PlainReader {
        PlainReader { store, object, opener, runtime: tokio::runtime::Handle::current(), last: None }
    }

    fn segment(&mut self, index: u64) -> std::io::Result<&[u8]> {
        if self.last.as_ref().is_none_or(|(i, _)| *i != index) {
            let range = index * envelope::SEGMENT..((index + 1) * envelope::SEGMENT).min(self.opener.plain_len());
            let read = read_plain(&*self.store, &self.object, &self.opener, &range);
            let plain = self.runtime.block_on(read).map_err(std::io::Error::other)?;
            self.last = Some((index, plain));
        }
        Ok(self.last.as_ref().map(|(_, p)| p.as_slice()).unwrap_or_default())
    }
}

impl crate::format::ReadAt for PlainReader {
    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let end = offset.saturating_add(len as u64).min(self.opener.plain_len());
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let index = at / envelope::SEGMENT;
            let segment = self.segment(index)?;
            let from = (at - index * envelope::SEGMENT) as usize;
            let to = ((end - index * envelope::SEGMENT) as usize).min(segment.len());
            out.extend_from_slice(&segment[from..to]);
            at = index * envelope::SEGMENT + to as u64;
        }
        Ok(out)
    }
}
