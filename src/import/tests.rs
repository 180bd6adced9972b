use std::{path::PathBuf, process::Command};

use sha2::{Digest, Sha256, Sha512};

use super::*;
use crate::{api::RegionStorage, store::StoreConfig};

struct Fixture {
    dir: tempfile::TempDir,
    store: RegionStore,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: dir.path().join("stores") };
        let spec = RegionStorage { url: "file:///var/lib/ims/eu".into(), ..Default::default() };
        let store = RegionStore::open(&spec, &config, None).unwrap();
        Fixture { dir, store }
    }

    fn source(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn policy(&self) -> FetchPolicy {
        FetchPolicy { allow_file: true, file_roots: vec![self.dir.path().to_path_buf()], ..FetchPolicy::default() }
    }

    fn stored_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.is_dir() { walk(&p, out) } else { out.push(p) }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir.path().join("stores"), &mut out);
        out
    }

    async fn import(
        &self,
        file: &str,
        checksum: Option<&str>,
        declared: DeclaredFormat,
        limit: u64,
    ) -> Result<Imported, ImportError> {
        let object = self.store.image_prefix("t", "img", "uid").join("disk");
        let url = format!("file://{}", self.source(file).display());
        let mut reports = Vec::new();
        let mut report = |done: u64, total: Option<u64>| reports.push((done, total));
        let result = import(
            &self.store,
            &object,
            Request { url: &url, checksum, declared, limit, image_type: None, encrypt: None },
            &self.policy(),
            Progress { every: Duration::from_secs(3600), report: &mut report },
        )
        .await;
        if let Ok(imported) = &result {
            assert_eq!(reports.last(), Some(&(imported.size, Some(imported.size))), "a final progress report");
            assert_eq!(reports.len(), 1, "no per-chunk reports");
        }
        result
    }
}

fn qemu_img(args: &[&str]) {
    let out =
        Command::new("qemu-img").args(args).output().expect("qemu-img is installed (.ci/run installs qemu-utils)");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn sha256_of(path: &std::path::Path) -> String {
    hex(&Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test]
async fn a_qcow2_import_stores_verified_bytes_with_format_and_virtual_size() {
    let f = Fixture::new();
    let raw = f.source("disk.raw");
    std::fs::write(&raw, vec![0xabu8; 3 * 1024 * 1024 + 17]).unwrap();
    let qcow2 = f.source("disk.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), qcow2.to_str().unwrap()]);
    let digest = sha256_of(&qcow2);
    let checksum = format!("sha256:{}", digest.to_uppercase());
    let imported = f.import("disk.qcow2", Some(&checksum), DeclaredFormat::Qcow2, 1 << 30).await.unwrap();
    assert_eq!(imported.sha256, digest);
    assert_eq!(imported.size, std::fs::metadata(&qcow2).unwrap().len());
    assert_eq!((imported.detected.format, imported.detected.virtual_size), (Format::Qcow2, 3 * 1024 * 1024 + 512));
    let stored = f.stored_files();
    assert_eq!(stored.len(), 1);
    assert_eq!(sha256_of(&stored[0]), digest, "the bytes on disk are the source's");
    assert!(stored[0].ends_with("eu/t/img/uid/disk"));
}

#[tokio::test]
async fn sha512_checksums_are_verified_too() {
    let f = Fixture::new();
    std::fs::write(f.source("data.raw"), b"some raw data").unwrap();
    let good = format!("sha512:{}", hex(&Sha512::digest(b"some raw data")));
    assert_eq!(
        f.import("data.raw", Some(&good), DeclaredFormat::Auto, 1 << 20).await.unwrap().detected.format,
        Format::Raw
    );
    let bad = format!("sha512:{}", "0".repeat(128));
    let err = f.import("data.raw", Some(&bad), DeclaredFormat::Auto, 1 << 20).await.unwrap_err();
    assert_eq!(err.reason(), Reason::ChecksumMismatch);
    assert!(f.stored_files().is_empty(), "a mismatch leaves no bytes behind");
}

#[tokio::test]
async fn failures_leave_nothing_in_the_store_and_say_why() {
    let f = Fixture::new();
    std::fs::write(f.source("big.raw"), vec![1u8; 4096]).unwrap();
    let err = f.import("big.raw", None, DeclaredFormat::Auto, 1000).await.unwrap_err();
    assert_eq!(err.reason(), Reason::TooLarge);
    assert!(!err.is_transient());

    let wrong = format!("sha256:{}", "f".repeat(64));
    let err = f.import("big.raw", Some(&wrong), DeclaredFormat::Auto, 1 << 20).await.unwrap_err();
    assert_eq!(err.reason(), Reason::ChecksumMismatch);
    assert!(err.to_string().contains(&sha256_of(&f.source("big.raw"))), "{err}");

    let err = f.import("big.raw", None, DeclaredFormat::Qcow2, 1 << 20).await.unwrap_err();
    assert_eq!(err.reason(), Reason::UnsupportedFormat);
    assert_eq!(
        err.to_string(),
        "spec declares format Qcow2 but the bytes are Raw: set format to Raw (or Auto), or fix the URL"
    );

    let qcow2 = f.source("t.qcow2");
    qemu_img(&["create", "-f", "qcow2", qcow2.to_str().unwrap(), "64M"]);
    let bytes = std::fs::read(&qcow2).unwrap();
    std::fs::write(f.source("truncated.qcow2"), &bytes[..40]).unwrap();
    let err = f.import("truncated.qcow2", None, DeclaredFormat::Auto, 1 << 20).await.unwrap_err();
    assert_eq!(err.reason(), Reason::UnsupportedFormat);
    assert!(err.to_string().contains("truncated"), "{err}");

    let err = f.import("missing.raw", None, DeclaredFormat::Auto, 1 << 20).await.unwrap_err();
    assert_eq!(err.reason(), Reason::SourceUnreachable);
    assert!(f.stored_files().is_empty(), "no failure left bytes behind: {:?}", f.stored_files());
}

#[tokio::test]
async fn a_multi_part_import_hashes_both_digests_and_reports_progress() {
    let f = Fixture::new();
    // Two upload parts and more, in many source chunks.
    let bytes = noise(PART_SIZE + 5 * fetch::FILE_CHUNK_SIZE + 3);
    std::fs::write(f.source("big.raw"), &bytes).unwrap();
    let checksum = format!("sha512:{}", hex(&Sha512::digest(&bytes)));
    let url = format!("file://{}", f.source("big.raw").display());
    let total = bytes.len() as u64;
    // Into the file store (the kernel copies; reports at most every 100 ms), and into a store
    // that takes streams (as S3 does; a report per chunk with `every` = 0).
    let memory = RegionStore::from_object_store(Arc::new(object_store::memory::InMemory::new()), "memory://");
    for (store, reported_per_chunk) in [(&f.store, false), (&memory, true)] {
        let object = store.image_prefix("t", "img", "uid").join("disk");
        let mut reports = Vec::new();
        let mut report = |done: u64, total: Option<u64>| reports.push((done, total));
        let imported = import(
            store,
            &object,
            Request {
                url: &url,
                checksum: Some(&checksum),
                declared: DeclaredFormat::Raw,
                limit: 1 << 30,
                image_type: None,
                encrypt: None,
            },
            &f.policy(),
            Progress { every: Duration::ZERO, report: &mut report },
        )
        .await
        .unwrap();
        assert_eq!((imported.size, imported.sha256.clone()), (total, hex(&Sha256::digest(&bytes))));
        assert!(!reported_per_chunk || reports.len() > 5, "{reports:?}");
        assert!(reports[..reports.len() - 1].iter().all(|&(_, t)| t == Some(total)));
        assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(reports.last(), Some(&(total, Some(total))));
        let landed = store.object_store().get(&object).await.unwrap().bytes().await.unwrap();
        assert!(landed == bytes, "the store holds the source's bytes");
    }
    let stored = f.stored_files();
    assert_eq!(stored.len(), 1, "no staging file is left: {stored:?}");
    assert!(std::fs::read(&stored[0]).unwrap() == bytes);

    // The same import limited below its size stops while streaming and leaves nothing.
    let err = f.import("big.raw", None, DeclaredFormat::Auto, total - 1).await.unwrap_err();
    assert_eq!(err.reason(), Reason::TooLarge);
    let wrong = format!("sha512:{}", "0".repeat(128));
    let err = f.import("big.raw", Some(&wrong), DeclaredFormat::Auto, 1 << 30).await.unwrap_err();
    assert_eq!(err.reason(), Reason::ChecksumMismatch);
    assert!(f.stored_files().is_empty(), "{:?}", f.stored_files());
}

#[tokio::test]
async fn the_import_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let f = Fixture::new();
    let object = f.store.image_prefix("t", "img", "uid").join("disk");
    let policy = f.policy();
    let mut report = |_: u64, _: Option<u64>| {};
    let future = import(
        &f.store,
        &object,
        Request {
            url: "file:///nowhere",
            checksum: None,
            declared: DeclaredFormat::Auto,
            limit: 1,
            image_type: None,
            encrypt: None,
        },
        &policy,
        Progress { every: Duration::ZERO, report: &mut report },
    );
    assert_send(&future);
}
