//! The test files: N GiB of pseudo-random bytes, written once and reused, and their sha256.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use sha2::{Digest, Sha256};

use crate::{GIB, common::Xorshift64};

/// `dir/import-bench-<N>GiB.bin`: N GiB of xorshift64 output, written once and reused.
pub fn test_file(dir: &Path, gib: u64) -> PathBuf {
    let path = dir.join(format!("import-bench-{gib}GiB.bin"));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == gib * GIB) {
        return path;
    }
    let started = Instant::now();
    let partial = dir.join(format!("import-bench-{gib}GiB.bin.partial"));
    let mut file = std::fs::File::create(&partial).expect("create the test file");
    let mut words = Xorshift64(0x2545_F491_4F6C_DD1D ^ gib);
    let mut block = vec![0u8; 8 << 20];
    for _ in 0..(gib * GIB) / block.len() as u64 {
        for (word, x) in block.chunks_exact_mut(8).zip(&mut words) {
            word.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&block).expect("write the test file");
    }
    file.sync_all().expect("sync the test file");
    drop(file);
    std::fs::rename(&partial, &path).expect("rename the test file");
    let _ = std::fs::remove_file(path.with_extension("bin.sha256"));
    eprintln!("# wrote {} in {:.1}s", path.display(), started.elapsed().as_secs_f64());
    path
}

/// The sha256 of a test file (sha2, streamed), cached in `<file>.sha256`.
pub fn digest_of(path: &Path) -> String {
    let cache = path.with_extension("bin.sha256");
    if let Ok(digest) = std::fs::read_to_string(&cache)
        && digest.trim().len() == 64
    {
        return digest.trim().to_string();
    }
    let mut file = std::fs::File::open(path).expect("open the test file");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).expect("read the test file");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&cache, &digest).expect("cache the digest");
    digest
}
