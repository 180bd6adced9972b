//! The moving parts shared by imports and copies: a hasher on its own threads, fed the same
//! `Bytes` the upload gets (no copy); a multipart upload with bounded memory; and a read-ahead
//! reader for objects a `file://` store hands out as open files.
//!
//! Sizes are chosen so the bytes are hashed and written while they are still in the CPU caches:
//! on the benchmark machine 1 MiB source chunks instead of 256 KiB, or 16 MiB parts instead of
//! 1 MiB on a `file://` store, each made imports and copies 1.3-1.6x slower (docs/PERFORMANCE.md).

use std::{
    io::{Read, Seek, SeekFrom},
    ops::Range,
};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::{ObjectStoreExt, WriteMultipart, path::Path};
use sha2::{Digest, Sha256, Sha512};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{ImportError, PART_SIZE, hex};
use crate::store::RegionStore;

/// Most parts of one upload being written at a time. With the part being filled, an upload
/// buffers at most `(PARTS_IN_FLIGHT + 1) * part size`: 48 MiB at [`PART_SIZE`], 3 MiB at
/// [`LOCAL_PART_SIZE`].
pub(crate) const PARTS_IN_FLIGHT: usize = 2;

/// Part size on a `file://` store (object_store's `LocalFileSystem`: parts are plain writes into
/// one staging file, with no minimum size or part count).
pub(crate) const LOCAL_PART_SIZE: usize = 1 << 20;

/// S3 allows at most 10,000 parts per upload.
const MAX_PARTS: u64 = 10_000;

/// S3's largest part.
const MAX_PART_SIZE: u64 = 5 << 30;

/// How many bytes the hasher is handed at a time, and how many such batches may wait for it.
/// Chunks are batched (not copied) so small network chunks do not cost a channel hop each.
const HASH_BATCH: usize = 1 << 20;
const HASH_BATCHES_QUEUED: usize = 4;

/// Chunk size and read-ahead (in chunks) of [`file_stream`].
pub(crate) const FILE_READ_CHUNK: usize = 256 << 10;
const FILE_READ_AHEAD: usize = 4;

/// The part size for an upload of `expected` bytes to a store other than a `file://` one:
/// [`PART_SIZE`], or more when that would need more than 10,000 parts (S3's limit: 156 GiB at
/// 16 MiB parts). Unknown sizes get [`PART_SIZE`].
pub(crate) fn part_size(expected: Option<u64>) -> usize {
    let needed = expected.unwrap_or(0).div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    needed.clamp(PART_SIZE as u64, MAX_PART_SIZE) as usize
}

/// Hashes a stream of chunks on blocking threads (one per algorithm), overlapped with whatever
/// the caller does with the same chunks. Memory: at most [`HASH_BATCHES_QUEUED`] + 2 batches of
/// about [`HASH_BATCH`] bytes are referenced (queued, being filled, being hashed).
pub(crate) struct Hashing {
    workers: Vec<Worker>,
    batch: Vec<Bytes>,
    batch_len: usize,
}

struct Worker {
    algorithm: &'static str,
    queue: mpsc::Sender<Vec<Bytes>>,
    done: JoinHandle<String>,
}

/// What [`Hashing`] computed: lower-case hex.
#[derive(Debug)]
pub(crate) struct Digests {
    pub(crate) sha256: String,
    pub(crate) sha512: Option<String>,
}

impl Hashing {
    /// Starts sha256, and sha512 too when asked.
    pub(crate) fn start(sha512: bool) -> Self {
        let mut workers = vec![Worker::spawn::<Sha256>("sha256")];
        if sha512 {
            workers.push(Worker::spawn::<Sha512>("sha512"));
        }
        Hashing { workers, batch: Vec::new(), batch_len: 0 }
    }

    /// Hands `chunk` (a cheap clone) to the hashers; waits only when they are behind.
    pub(crate) async fn feed(&mut self, chunk: &Bytes) -> Result<(), ImportError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.batch_len += chunk.len();
        self.batch.push(chunk.clone());
        if self.batch_len >= HASH_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ImportError> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_len = 0;
        if batch.is_empty() {
            return Ok(());
        }
        let (last, others) = self.workers.split_last().expect("sha256 always runs");
        for worker in others {
            worker.queue.send(batch.clone()).await.map_err(|_| hasher_failed(worker.algorithm))?;
        }
        last.queue.send(batch).await.map_err(|_| hasher_failed(last.algorithm))
    }

    /// Hashes what is left and returns the digests.
    pub(crate) async fn finish(mut self) -> Result<Digests, ImportError> {
        self.flush().await?;
        let mut digests = Digests { sha256: String::new(), sha512: None };
        for Worker { algorithm, queue, done } in self.workers {
            drop(queue);
            let digest = done.await.map_err(|_| hasher_failed(algorithm))?;
            match algorithm {
                "sha512" => digests.sha512 = Some(digest),
                _ => digests.sha256 = digest,
            }
        }
        Ok(digests)
    }
}

impl Worker {
    fn spawn<D: Digest + Send + 'static>(algorithm: &'static str) -> Self {
        let (queue, mut batches) = mpsc::channel::<Vec<Bytes>>(HASH_BATCHES_QUEUED);
        // Ends when the sender is dropped: at `finish`, or when the import is dropped or fails.
        let done = tokio::task::spawn_blocking(move || {
            let mut hasher = D::new();
            while let Some(batch) = batches.blocking_recv() {
                for chunk in &batch {
                    hasher.update(chunk);
                }
            }
            hex(&hasher.finalize())
        });
        Worker { algorithm, queue, done }
    }
}

fn hasher_failed(algorithm: &'static str) -> ImportError {
    ImportError::Store(object_store::Error::Generic {
        store: "import",
        source: format!("the {algorithm} hasher thread failed").into(),
    })
}

/// A multipart upload fed owned chunks (`WriteMultipart::put`: no copy into part buffers), with
/// at most [`PARTS_IN_FLIGHT`] parts being written while the next one fills.
pub(crate) struct Upload {
    writer: WriteMultipart,
}

impl Upload {
    /// Starts an upload of about `expected` bytes (when known) to `object`.
    pub(crate) async fn start(store: &RegionStore, object: &Path, expected: Option<u64>) -> Result<Self, ImportError> {
        let part = if store.local_dir().is_some() { LOCAL_PART_SIZE } else { part_size(expected) };
        let upload = store.object_store().put_multipart(object).await?;
        Ok(Upload { writer: WriteMultipart::new_with_chunk_size(upload, part) })
    }

    /// Adds `chunk`; waits while [`PARTS_IN_FLIGHT`] parts are being written.
    pub(crate) async fn put(&mut self, chunk: Bytes) -> Result<(), ImportError> {
        self.writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        self.writer.put(chunk);
        Ok(())
    }

    /// Writes the last part and completes the upload (aborting it on failure).
    pub(crate) async fn finish(self) -> Result<(), ImportError> {
        self.writer.finish().await?;
        Ok(())
    }

    /// Abandons the upload and removes what it wrote.
    pub(crate) async fn abort(self) {
        if let Err(e) = self.writer.abort().await {
            tracing::debug!(error = %e, "aborting a multipart upload");
        }
    }
}

/// Where the bytes of an import or copy go: an upload, or, for an encrypted image, a sealer on
/// a thread of its own (fed the same `Bytes` as the hasher) whose sealed segments a task of their
/// own writes to the upload, so hashing, sealing and writing overlap.
pub(crate) enum Sink {
    /// The bytes as they are.
    Plain(Upload),
    /// Sealed first.
    Sealed(Box<Sealing>),
}

/// The sealed side of a [`Sink`].
pub(crate) struct Sealing {
    queue: Option<mpsc::Sender<Bytes>>,
    sealer: JoinHandle<Result<(), crate::crypt::EnvelopeError>>,
    writer: JoinHandle<(Upload, Result<(), ImportError>)>,
    header: Vec<u8>,
    key: crate::crypt::DataKey,
    plain: u64,
}

/// Sealed chunks queued for the writer, and plaintext chunks for the sealer.
const SEAL_QUEUE: usize = 4;

impl Sink {
    /// An upload of `expected` plaintext bytes (when known) to `object`, sealed under KMS key
    /// `encrypt` by the store's KMS when set.
    pub(crate) async fn start(
        store: &RegionStore,
        object: &Path,
        expected: Option<u64>,
        encrypt: Option<&str>,
    ) -> Result<Sink, ImportError> {
        let Some(key_id) = encrypt else { return Ok(Sink::Plain(Upload::start(store, object, expected).await?)) };
        let (mut sealer, header, key) = crate::crypt::seal(store, key_id).await?;
        let mut upload = Upload::start(store, object, expected.map(crate::crypt::sealed_len)).await?;
        let (queue, mut plain) = mpsc::channel::<Bytes>(SEAL_QUEUE);
        let (sealed_tx, mut sealed) = mpsc::channel::<Bytes>(SEAL_QUEUE);
        let first = Bytes::from(header.clone());
        let writer = tokio::spawn(async move {
            let mut written = upload.put(first).await;
            while written.is_ok()
                && let Some(chunk) = sealed.recv().await
            {
                written = upload.put(chunk).await;
            }
            (upload, written)
        });
        let sealer = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = plain.blocking_recv() {
                let out = sealer.push(&chunk)?;
                if !out.is_empty() && sealed_tx.blocking_send(Bytes::from(out)).is_err() {
                    return Ok(());
                }
            }
            let last = sealer.finish()?;
            let _ = sealed_tx.blocking_send(Bytes::from(last));
            Ok(())
        });
        Ok(Sink::Sealed(Box::new(Sealing { queue: Some(queue), sealer, writer, header, key, plain: 0 })))
    }

    /// Adds `chunk`; waits while the upload (or the sealer) is behind.
    pub(crate) async fn put(&mut self, chunk: Bytes) -> Result<(), ImportError> {
        match self {
            Sink::Plain(upload) => upload.put(chunk).await,
            Sink::Sealed(sealing) => {
                sealing.plain += chunk.len() as u64;
                let sent = match &sealing.queue {
                    Some(queue) => queue.send(chunk).await.is_ok(),
                    None => false,
                };
                if sent { Ok(()) } else { Err(sink_failed("the sealer stopped")) }
            }
        }
    }

    /// Writes what is left and completes the upload: for a sealed one, the opener of what was
    /// written, to read it back.
    pub(crate) async fn finish(self) -> Result<Option<crate::crypt::Opener>, ImportError> {
        match self {
            Sink::Plain(upload) => upload.finish().await.map(|()| None),
            Sink::Sealed(mut sealing) => {
                drop(sealing.queue.take());
                let sealed = sealing.sealer.await.map_err(|_| sink_failed("the sealer thread failed"))?;
                let (upload, written) = sealing.writer.await.map_err(|_| sink_failed("the sealed writer failed"))?;
                if let Err(e) = sealed.map_err(crate::crypt::CryptError::from).map_err(ImportError::from).and(written) {
                    upload.abort().await;
                    return Err(e);
                }
                upload.finish().await?;
                let opener =
                    crate::crypt::Opener::new(&sealing.key.0, &sealing.header, crate::crypt::sealed_len(sealing.plain))
                        .map_err(crate::crypt::CryptError::from)?;
                Ok(Some(opener))
            }
        }
    }

    /// Abandons the upload and removes what it wrote.
    pub(crate) async fn abort(self) {
        match self {
            Sink::Plain(upload) => upload.abort().await,
            Sink::Sealed(mut sealing) => {
                drop(sealing.queue.take());
                let _ = sealing.sealer.await;
                if let Ok((upload, _)) = sealing.writer.await {
                    upload.abort().await;
                }
            }
        }
    }
}

fn sink_failed(what: &str) -> ImportError {
    ImportError::Store(object_store::Error::Generic { store: "import", source: what.to_string().into() })
}

/// `range` of an open file as a stream of [`FILE_READ_CHUNK`] chunks, read ahead on a blocking
/// thread straight into the chunks' buffers (one copy from the page cache, no per-chunk task).
/// The thread stops when the stream is dropped.
pub(crate) fn file_stream(
    mut file: std::fs::File,
    path: std::path::PathBuf,
    range: Range<u64>,
) -> BoxStream<'static, Result<Bytes, ImportError>> {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(FILE_READ_AHEAD);
    let read_error = move |e: std::io::Error| {
        ImportError::Store(object_store::Error::Generic {
            store: "LocalFileSystem",
            source: format!("reading {}: {e}", path.display()).into(),
        })
    };
    tokio::task::spawn_blocking(move || {
        if let Err(e) = file.seek(SeekFrom::Start(range.start)) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        let mut left = range.end.saturating_sub(range.start);
        while left > 0 {
            // Zeroed, then filled by plain reads: `read_to_end` would start with 8 KiB reads.
            let mut buf = vec![0u8; left.min(FILE_READ_CHUNK as u64) as usize];
            let chunk = match read_full(&mut file, &mut buf) {
                Ok(0) => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the file ended {left} bytes early"),
                )),
                Ok(n) => {
                    left -= n as u64;
                    buf.truncate(n);
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    futures::stream::unfold((rx, read_error), |(mut rx, read_error)| async move {
        let chunk = rx.recv().await?;
        Some((chunk.map_err(&read_error), (rx, read_error)))
    })
    .boxed()
}

/// Reads until `buf` is full or the file ends; how many bytes were read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_only_past_s3s_part_count_limit() {
        let mib = 1u64 << 20;
        assert_eq!(part_size(None), PART_SIZE);
        assert_eq!(part_size(Some(0)), PART_SIZE);
        assert_eq!(part_size(Some(4 << 30)), PART_SIZE);
        assert_eq!(part_size(Some(PART_SIZE as u64 * MAX_PARTS)), PART_SIZE);
        assert_eq!(part_size(Some(PART_SIZE as u64 * MAX_PARTS + 1)), PART_SIZE + (1 << 20));
        let tib = part_size(Some(1 << 40)) as u64;
        assert_eq!(tib, 105 * mib, "1 TiB takes 105 MiB parts");
        assert!(tib * MAX_PARTS >= 1 << 40);
        assert_eq!(part_size(Some(u64::MAX)) as u64, MAX_PART_SIZE);
    }

    #[tokio::test]
    async fn hashing_batches_and_both_digests_match_one_shot() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut hashing = Hashing::start(true);
        for piece in data.chunks(123_457) {
            hashing.feed(&Bytes::copy_from_slice(piece)).await.unwrap();
        }
        hashing.feed(&Bytes::new()).await.unwrap();
        let digests = hashing.finish().await.unwrap();
        assert_eq!(digests.sha256, hex(&Sha256::digest(&data)));
        assert_eq!(digests.sha512, Some(hex(&Sha512::digest(&data))));

        let digests = Hashing::start(false).finish().await.unwrap();
        assert_eq!(digests.sha256, hex(&Sha256::digest(b"")), "nothing hashed is the empty digest");
        assert_eq!(digests.sha512, None);
    }

    #[tokio::test]
    async fn file_stream_reads_the_range_in_chunks_and_reports_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(2 * FILE_READ_CHUNK + 100)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let open = || std::fs::File::open(&path).unwrap();

        let chunks: Vec<Bytes> =
            file_stream(open(), path.clone(), 10..data.len() as u64).map(|c| c.unwrap()).collect().await;
        assert_eq!(chunks.iter().map(Bytes::len).collect::<Vec<_>>(), [FILE_READ_CHUNK, FILE_READ_CHUNK, 90]);
        assert_eq!(chunks.concat(), &data[10..]);

        let results: Vec<_> = file_stream(open(), path.clone(), 0..data.len() as u64 + 5).collect().await;
        let err = results.last().unwrap().as_ref().unwrap_err().to_string();
        assert!(err.contains("ended 5 bytes early"), "{err}");
    }
}
