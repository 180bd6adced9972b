//! File to file, in the kernel: when the source is a local file (a `file://` import, or a copy
//! out of a `file://` store) and the destination is a `file://` store.
//!
//! The kernel copies the bytes (`copy_file_range`, which `std::io::copy` uses between two files
//! and replaces with plain reads and writes where the filesystems cannot do it) into a staging
//! file next to the object, while a thread of its own reads the landed bytes back (from the page
//! cache) as the copy publishes them and hashes them. So the digests are those of the bytes in
//! the store, not of the bytes read. The staging file is renamed into place only when the caller
//! has accepted the size and the digests ([`Staged::commit`]); on any failure, a mismatch, or
//! when the import is dropped (cancelled), it is removed. It is named like object_store's own
//! uploads (`<object>#<n>`), so what a killed process leaves is swept alike
//! (`sweep_abandoned`).
//!
//! Why: copying through user space (read into a buffer, hash, write) makes the kernel copy from
//! user memory into new page-cache pages, which on the benchmark machine made a 4 GiB import
//! several times slower than `cp`; see docs/PERFORMANCE.md.

use std::{
    fs::File,
    io::{self, Read},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::Duration,
};

use sha2::{Digest, Sha256, Sha512};

use super::{Expected, ImportError, Progress, check, hex, pipeline::Digests};

/// How much the copier copies before it tells the hasher. For a 4 GiB import, 32 MiB steps took
/// 3.17 s (median of 5) against 3.40 s for 4 MiB and 4.75 s for 1 MiB; for 1 GiB, smaller steps
/// did better (0.86 s against 0.77 s and 0.78 s): the larger images, the goal, decide.
const STEP: u64 = 32 << 20;

/// How much the hasher reads at a time (stays in the CPU caches while it is hashed).
const HASH_READ: usize = 256 << 10;

/// The shortest time between progress reports, whatever [`Progress::every`] says.
const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// A copy that landed in its staging file and has not been accepted yet.
#[derive(Debug)]
pub(crate) struct Staged {
    staging: Option<PathBuf>,
    dest: PathBuf,
    /// Bytes copied (and hashed back).
    pub(crate) len: u64,
    /// Digests of the landed bytes.
    pub(crate) digests: Digests,
}

impl Staged {
    /// Accepts the copy when its digests match `want`: reports it done, renames the staging file
    /// into place and returns the sha256.
    pub(crate) async fn accept(
        self,
        want: Option<Expected>,
        progress: &mut Progress<'_>,
    ) -> Result<String, ImportError> {
        (progress.report)(self.len, Some(self.len));
        let sha256 = check(want, &self.digests)?;
        self.commit().await?;
        Ok(sha256)
    }

    /// Renames the staging file into place.
    pub(crate) async fn commit(mut self) -> Result<(), ImportError> {
        let staging = self.staging.take().expect("a staged copy is committed once");
        if let Err(e) = tokio::fs::rename(&staging, &self.dest).await {
            let _ = std::fs::remove_file(&staging);
            return Err(store_error(format!("renaming {} to {}: {e}", staging.display(), self.dest.display())));
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(staging) = self.staging.take() {
            remove_quietly(&staging);
        }
    }
}

/// Copies `source` (at `source_path`, for messages) into a staging file for `dest`, at most
/// `max + 1` bytes (so a caller sees that a source is larger than `max`), hashing the landed
/// bytes with sha256, and sha512 too when asked. Reports progress against `expected`.
pub(crate) async fn copy_file(
    source: File,
    source_path: &Path,
    dest: &Path,
    max: u64,
    sha512: bool,
    expected: Option<u64>,
    progress: &mut Progress<'_>,
) -> Result<Staged, ImportError> {
    let dest = dest.to_path_buf();
    let shared = Arc::new(Shared::default());
    // From here on, dropping this (a failure, or the import future dropped) stops both threads
    // and removes the staging file, even one still being created.
    let running = Running { shared: shared.clone() };
    let (staging, staging_path) = {
        let (dest, shared) = (dest.clone(), shared.clone());
        tokio::task::spawn_blocking(move || {
            let (file, path) = new_staging(&dest)?;
            let mut state = shared.lock();
            if state.cancelled {
                remove_quietly(&path);
                return Err(store_error("the copy was abandoned".into()));
            }
            state.staging = Some(path.clone());
            Ok((file, path))
        })
        .await
        .map_err(|e| store_error(format!("creating a staging file: {e}")))??
    };
    let landed = File::open(&staging_path)
        .map_err(|e| store_error(format!("opening {} to hash it: {e}", staging_path.display())))?;

    let copier_shared = shared.clone();
    let mut copier = tokio::task::spawn_blocking(move || copy_steps(source, staging, max, &copier_shared));
    let hasher_shared = shared.clone();
    let hasher = tokio::task::spawn_blocking(move || hash_landed(landed, sha512, &hasher_shared));

    let every = progress.every.max(MIN_REPORT_INTERVAL);
    let copied = loop {
        tokio::select! {
            copied = &mut copier => break copied,
            () = tokio::time::sleep(every) => (progress.report)(shared.lock().copied, expected),
        }
    };
    let copy_failed =
        |e: io::Error| store_error(format!("copying {} to {}: {e}", source_path.display(), staging_path.display()));
    let copied = copied.map_err(|e| copy_failed(io::Error::other(e)))?.map_err(copy_failed)?;
    let hash_failed = |e: io::Error| store_error(format!("reading back {} to hash it: {e}", staging_path.display()));
    let (hashed, digests) = hasher.await.map_err(|e| hash_failed(io::Error::other(e)))?.map_err(hash_failed)?;
    if hashed != copied {
        return Err(hash_failed(io::Error::other(format!("read back {hashed} bytes of the {copied} copied"))));
    }
    let staging = running.shared.lock().staging.take();
    Ok(Staged { staging, dest, len: copied, digests })
}

/// What the copier and the hasher share: bytes copied so far, and whether the copier is done or
/// the copy was abandoned.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    copied: u64,
    finished: bool,
    cancelled: bool,
    /// The staging file, until it is handed over as [`Staged`].
    staging: Option<PathBuf>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }

    /// Waits until more than `hashed` bytes are copied or the copier finished: (bytes copied,
    /// finished). `None` when the copy was abandoned.
    fn wait_past(&self, hashed: u64) -> Option<(u64, bool)> {
        let state = self
            .changed
            .wait_while(self.lock(), |s| s.copied <= hashed && !s.finished && !s.cancelled)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (!state.cancelled).then_some((state.copied, state.finished))
    }
}

/// Stops the threads and removes the staging file unless it was handed over.
struct Running {
    shared: Arc<Shared>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let staging = {
            let mut state = self.shared.lock();
            state.cancelled = true;
            state.staging.take()
        };
        self.shared.changed.notify_all();
        if let Some(staging) = staging {
            remove_quietly(&staging);
        }
    }
}

/// The copier: `STEP` bytes at a time, telling the hasher after each, until the source ends,
/// `max + 1` bytes are copied, or the copy is abandoned.
fn copy_steps(source: File, staging: File, max: u64, shared: &Shared) -> io::Result<u64> {
    let limit = max.saturating_add(1);
    let mut copied = 0u64;
    let result = loop {
        let want = STEP.min(limit - copied);
        if want == 0 || shared.lock().cancelled {
            break Ok(copied);
        }
        match io::copy(&mut (&source).take(want), &mut &staging) {
            Ok(0) => break Ok(copied),
            Ok(n) => {
                copied += n;
                shared.update(|s| s.copied = copied);
            }
            Err(e) => break Err(e),
        }
    };
    shared.update(|s| s.finished = true);
    result
}

/// The hasher: reads the staging file up to what the copier published and hashes it; returns
/// how many bytes it hashed and the digests.
fn hash_landed(mut landed: File, sha512: bool, shared: &Shared) -> io::Result<(u64, Digests)> {
    let mut sha256_hasher = Sha256::new();
    let mut sha512_hasher = sha512.then(Sha512::new);
    let mut buf = vec![0u8; HASH_READ];
    let mut hashed = 0u64;
    loop {
        let Some((copied, finished)) = shared.wait_past(hashed) else {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "the copy was abandoned"));
        };
        if copied <= hashed {
            if finished {
                break;
            }
            continue;
        }
        let want = (copied - hashed).min(HASH_READ as u64) as usize;
        let n = landed.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the staging file ends at {hashed} bytes, but {copied} were copied into it"),
            ));
        }
        sha256_hasher.update(&buf[..n]);
        if let Some(h) = &mut sha512_hasher {
            h.update(&buf[..n]);
        }
        hashed += n as u64;
    }
    let digests = Digests { sha256: hex(&sha256_hasher.finalize()), sha512: sha512_hasher.map(|h| hex(&h.finalize())) };
    Ok((hashed, digests))
}

/// Creates `<dest>#<n>` (the first free n) and the directories above it, as object_store's
/// `LocalFileSystem` names its staging files.
fn new_staging(dest: &Path) -> Result<(File, PathBuf), ImportError> {
    let parent = dest.parent().ok_or_else(|| store_error(format!("{} has no parent directory", dest.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| store_error(format!("creating {}: {e}", parent.display())))?;
    for n in 1u32.. {
        let mut staging = dest.as_os_str().to_owned();
        staging.push(format!("#{n}"));
        let staging = PathBuf::from(staging);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&staging) {
            Ok(file) => return Ok((file, staging)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(store_error(format!("creating {}: {e}", staging.display()))),
        }
    }
    Err(store_error(format!("no free staging file name next to {}", dest.display())))
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a staging file");
    }
}

/// A failure of a `file://` store (transient), saying what was being done.
pub(crate) fn store_error(message: String) -> ImportError {
    ImportError::Store(object_store::Error::Generic { store: "LocalFileSystem", source: message.into() })
}

#[cfg(test)]
mod tests;
