use std::{path::PathBuf, process::Command, sync::Arc};

use object_store::{PutPayload, WriteMultipart, memory::InMemory};
use sha2::{Digest, Sha256};

use super::*;
use crate::{
    api::RegionStorage,
    api::conditions::Reason,
    format::Format,
    import::{PART_SIZE, hex, noise},
    store::StoreConfig,
};

struct Regions {
    dir: tempfile::TempDir,
    eu: RegionStore,
    us: RegionStore,
}

impl Regions {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: dir.path().join("stores") };
        let open = |region: &str| {
            let spec = RegionStorage { url: format!("file:///var/lib/ims/{region}"), ..Default::default() };
            RegionStore::open(&spec, &config, None).unwrap()
        };
        Regions { eu: open("eu"), us: open("us"), dir }
    }

    /// Every file under a region's directory, staging files included.
    fn files(&self, region: &str) -> Vec<PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.is_dir() { walk(&p, out) } else { out.push(p) }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir.path().join("stores").join(region), &mut out);
        out.sort();
        out
    }

    fn region_dir(&self, region: &str) -> PathBuf {
        self.dir.path().join("stores").join(region)
    }
}

fn object(store: &RegionStore, uid: &str) -> Path {
    store.image_prefix("t", "img", uid).join("disk")
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

async fn put(store: &RegionStore, object: &Path, bytes: &[u8]) {
    store.object_store().put(object, PutPayload::from(bytes.to_vec())).await.unwrap();
}

async fn read(store: &RegionStore, object: &Path) -> Vec<u8> {
    store.object_store().get(object).await.unwrap().bytes().await.unwrap().to_vec()
}

/// Runs a copy; returns its result and the progress reports.
async fn run_copy(
    from: &RegionStore,
    from_object: &Path,
    to: &RegionStore,
    to_object: &Path,
    sha256: &str,
    every: Duration,
) -> (Result<Imported, ImportError>, Vec<(u64, Option<u64>)>) {
    let mut reports = Vec::new();
    let mut report = |done: u64, total: Option<u64>| reports.push((done, total));
    let result = copy(
        CopyRequest { from, from_object, to, to_object, sha256, from_sealed: false, encrypt: None },
        Progress { every, report: &mut report },
    )
    .await;
    (result, reports)
}

#[tokio::test]
async fn a_copy_lands_the_same_bytes_and_sha256_in_the_other_region() {
    let r = Regions::new();
    // More than one read chunk and more than one upload part.
    let bytes = noise(PART_SIZE + 3 * pipeline::FILE_READ_CHUNK + 17);
    let digest = sha256(&bytes);
    let (src, dst) = (object(&r.eu, "uid-1"), object(&r.us, "uid-2"));
    put(&r.eu, &src, &bytes).await;

    let (result, reports) = run_copy(&r.eu, &src, &r.us, &dst, &digest.to_uppercase(), Duration::ZERO).await;
    let imported = result.unwrap();
    assert_eq!(imported.object, dst);
    assert_eq!((imported.size, imported.sha256.as_str()), (bytes.len() as u64, digest.as_str()));
    assert_eq!((imported.detected.format, imported.detected.virtual_size), (Format::Raw, bytes.len() as u64));
    assert!(read(&r.us, &dst).await == bytes, "the destination holds the source's bytes");
    assert_eq!(r.files("us"), [r.region_dir("us").join("t/img/uid-2/disk")], "no staging file is left");
    assert!(read(&r.eu, &src).await == bytes, "the source is untouched");

    // Progress (file store to file store: the kernel copies, reports at most every 100 ms): with
    // the total, increasing, then the final report.
    let total = bytes.len() as u64;
    assert!(!reports.is_empty());
    assert!(reports.iter().all(|&(_, t)| t == Some(total)));
    assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(reports.last(), Some(&(total, Some(total))));

    // With a long `every`, only the final report.
    let again = object(&r.us, "uid-3");
    let (result, reports) = run_copy(&r.eu, &src, &r.us, &again, &digest, Duration::from_secs(3600)).await;
    result.unwrap();
    assert_eq!(reports, [(total, Some(total))]);
    assert_eq!(hash_object(&r.us, &again).await.unwrap(), (total, digest));
}

#[tokio::test]
async fn a_copy_detects_the_format_from_the_landed_bytes() {
    let r = Regions::new();
    let raw = r.dir.path().join("d.raw");
    let qcow2 = r.dir.path().join("d.qcow2");
    std::fs::write(&raw, noise(1024 * 1024)).unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), qcow2.to_str().unwrap()])
        .output()
        .expect("qemu-img is installed (.ci/run installs qemu-utils)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&qcow2).unwrap();
    let (src, dst) = (object(&r.eu, "a"), object(&r.us, "b"));
    put(&r.eu, &src, &bytes).await;
    let (result, _) = run_copy(&r.eu, &src, &r.us, &dst, &sha256(&bytes), Duration::from_secs(60)).await;
    let detected = result.unwrap().detected;
    assert_eq!((detected.format, detected.virtual_size), (Format::Qcow2, 1024 * 1024));
}

#[tokio::test]
async fn a_wrong_sha256_leaves_nothing_at_the_destination() {
    let r = Regions::new();
    let bytes = noise(2 * pipeline::FILE_READ_CHUNK + 5);
    let (src, dst) = (object(&r.eu, "a"), object(&r.us, "b"));
    put(&r.eu, &src, &bytes).await;
    // Something already at the destination goes too: nothing stays there on a failure.
    put(&r.us, &dst, b"an older attempt").await;
    let wrong = "0".repeat(64);
    let (result, _) = run_copy(&r.eu, &src, &r.us, &dst, &wrong, Duration::from_secs(60)).await;
    let err = result.unwrap_err();
    assert_eq!((err.reason(), err.is_transient()), (Reason::ChecksumMismatch, false));
    let message = err.to_string();
    assert!(message.contains(&sha256(&bytes)) && message.contains(&wrong), "{message}");
    assert!(r.files("us").is_empty(), "nothing at the destination: {:?}", r.files("us"));
    assert!(!r.region_dir("us").join("t").exists(), "not even its directories");
    assert_eq!(r.files("eu").len(), 1, "the source stays");
}

#[tokio::test]
async fn a_missing_source_is_source_gone_and_not_transient() {
    let r = Regions::new();
    let (src, dst) = (object(&r.eu, "gone"), object(&r.us, "b"));
    let (result, reports) = run_copy(&r.eu, &src, &r.us, &dst, &"0".repeat(64), Duration::ZERO).await;
    let err = result.unwrap_err();
    assert!(matches!(err, ImportError::SourceGone(_)), "{err:?}");
    assert_eq!((err.reason(), err.is_transient()), (Reason::SourceNotActive, false));
    assert!(err.to_string().contains("t/img/gone/disk"), "{err}");
    assert!(reports.is_empty());
    assert!(r.files("us").is_empty());
    assert!(matches!(hash_object(&r.eu, &src).await, Err(ImportError::SourceGone(_))));
}

#[tokio::test]
async fn copies_work_between_streaming_stores_too() {
    // InMemory hands out streams (as S3 does), not open files.
    let r = Regions::new();
    let memory = RegionStore::from_object_store(Arc::new(InMemory::new()), "memory://");
    let bytes = noise(PART_SIZE + 1000);
    let digest = sha256(&bytes);
    let (src, mid, dst) = (object(&memory, "a"), object(&r.eu, "b"), object(&memory, "c"));
    put(&memory, &src, &bytes).await;
    let (result, _) = run_copy(&memory, &src, &r.eu, &mid, &digest, Duration::ZERO).await;
    assert_eq!(result.unwrap().sha256, digest);
    let (result, reports) = run_copy(&r.eu, &mid, &memory, &dst, &digest, Duration::ZERO).await;
    assert_eq!(result.unwrap().size, bytes.len() as u64);
    assert!(read(&memory, &dst).await == bytes);
    // Streamed: a report for every chunk (every = 0), with the total, increasing, then the last.
    let total = bytes.len() as u64;
    assert!(reports.len() >= 5, "{reports:?}");
    assert!(reports.iter().all(|&(_, t)| t == Some(total)));
    assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(reports.last(), Some(&(total, Some(total))));
    let (result, _) = run_copy(&r.eu, &mid, &memory, &dst, &"f".repeat(64), Duration::ZERO).await;
    assert_eq!(result.unwrap_err().reason(), Reason::ChecksumMismatch);
    assert!(memory.list(&memory.join("")).await.unwrap().len() == 1, "only the source stays in memory");
}

#[tokio::test]
async fn the_copy_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let r = Regions::new();
    let (src, dst) = (object(&r.eu, "a"), object(&r.us, "b"));
    let mut report = |_: u64, _: Option<u64>| {};
    let future = copy(
        CopyRequest {
            from: &r.eu,
            from_object: &src,
            to: &r.us,
            to_object: &dst,
            sha256: "",
            from_sealed: false,
            encrypt: None,
        },
        Progress { every: Duration::ZERO, report: &mut report },
    );
    assert_send(&future);
}

/// What a killed process leaves: an upload that is neither completed nor aborted nor dropped.
async fn abandon_upload(store: &RegionStore, object: &Path) {
    let upload = store.object_store().put_multipart(object).await.unwrap();
    let mut writer = WriteMultipart::new(upload);
    writer.write(b"half an image");
    writer.wait_for_capacity(0).await.unwrap();
    std::mem::forget(writer);
}

#[tokio::test]
async fn sweeping_removes_the_staging_files_of_abandoned_uploads_only() {
    let r = Regions::new();
    let image = r.eu.image_prefix("t", "img", "uid-1");
    let other = r.eu.image_prefix("t", "other", "uid-2");
    abandon_upload(&r.eu, &image.clone().join("disk")).await;
    abandon_upload(&r.eu, &image.clone().join("disk")).await;
    abandon_upload(&r.eu, &other.clone().join("disk")).await;
    put(&r.eu, &image.clone().join("kept"), b"an object").await;
    let dir = r.region_dir("eu");
    let names = |files: Vec<PathBuf>| -> Vec<String> {
        files.iter().map(|p| p.strip_prefix(&dir).unwrap().display().to_string()).collect()
    };
    assert_eq!(
        names(r.files("eu")),
        ["t/img/uid-1/disk#1", "t/img/uid-1/disk#2", "t/img/uid-1/kept", "t/other/uid-2/disk#1"]
    );
    assert_eq!(r.eu.list(&image).await.unwrap().len(), 1, "staging files are not objects");

    // Young staging files may belong to running uploads.
    assert_eq!(sweep_abandoned_older_than(&r.eu, &image, Duration::from_secs(3600)).await.unwrap(), 0);
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::options().write(true).open(dir.join("t/img/uid-1/disk#2")).unwrap().set_modified(old).unwrap();
    assert_eq!(sweep_abandoned_older_than(&r.eu, &image, Duration::from_secs(3600)).await.unwrap(), 1);

    assert_eq!(sweep_abandoned(&r.eu, &image).await.unwrap(), 1);
    assert_eq!(names(r.files("eu")), ["t/img/uid-1/kept", "t/other/uid-2/disk#1"], "other prefixes are untouched");
    assert_eq!(r.eu.delete_prefix(&image).await.unwrap(), 1);
    assert!(!dir.join("t/img").exists(), "the image's directories are gone");

    // The whole store; empty directories go, up to (not including) the root.
    assert_eq!(sweep_abandoned(&r.eu, &r.eu.join("")).await.unwrap(), 1);
    assert!(r.files("eu").is_empty());
    assert!(dir.is_dir() && std::fs::read_dir(&dir).unwrap().next().is_none(), "the root stays, empty");
    assert_eq!(sweep_abandoned(&r.eu, &image).await.unwrap(), 0, "a prefix that is gone is fine");

    // Other stores have nothing to sweep.
    let memory = RegionStore::from_object_store(Arc::new(InMemory::new()), "memory://");
    assert_eq!(sweep_abandoned(&memory, &memory.join("")).await.unwrap(), 0);
}

#[test]
fn staging_names_are_exactly_what_object_store_does_not_list() {
    for (name, staging) in [
        ("disk#1", true),
        ("disk#123", true),
        ("disk", false),
        ("disk#", false),
        ("#1", false),
        ("disk#1a", false),
        ("a#b#1", false),
        ("disk.qcow2#7", true),
    ] {
        assert_eq!(is_staging_file(std::ffi::OsStr::new(name)), staging, "{name}");
    }
}

#[test]
fn a_file_store_knows_its_directory_and_other_stores_have_none() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: dir.path().join("a b%c#ü") };
    let spec = RegionStorage { url: "file:///var/lib/ims/eu".into(), ..Default::default() };
    let store = RegionStore::open(&spec, &config, None).unwrap();
    assert_eq!(store.local_dir(), Some(dir.path().join("a b%c#ü/eu").as_path()));
    let memory = RegionStore::from_object_store(Arc::new(InMemory::new()), "mem://x");
    assert_eq!(memory.local_dir(), None);
}
