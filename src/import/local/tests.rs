use std::time::Duration;

use super::*;
use crate::import::noise;

fn staging_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

struct Copied {
    result: Result<Staged, ImportError>,
    reports: Vec<(u64, Option<u64>)>,
}

async fn run(source: &Path, dest: &Path, max: u64, sha512: bool) -> Copied {
    let mut reports = Vec::new();
    let mut report = |done, expected| reports.push((done, expected));
    let file = File::open(source).unwrap();
    let len = file.metadata().unwrap().len();
    let mut progress = Progress { every: Duration::ZERO, report: &mut report };
    let result = copy_file(file, source, dest, max, sha512, Some(len), &mut progress).await;
    Copied { result, reports }
}

#[tokio::test]
async fn the_landed_bytes_are_hashed_and_appear_only_when_committed() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = noise(2 * STEP as usize + 12_345);
    let source = dir.path().join("source.img");
    std::fs::write(&source, &bytes).unwrap();
    let dest = dir.path().join("store/ns/image/uid/image");

    let Copied { result, reports } = run(&source, &dest, u64::MAX, true).await;
    let staged = result.unwrap();
    assert_eq!(staged.len, bytes.len() as u64);
    assert_eq!(staged.digests.sha256, hex(&Sha256::digest(&bytes)));
    assert_eq!(staged.digests.sha512, Some(hex(&Sha512::digest(&bytes))));
    assert!(reports.iter().all(|&(done, expected)| done <= bytes.len() as u64 && expected == Some(bytes.len() as u64)));
    let parent = dest.parent().unwrap();
    assert_eq!(staging_files(parent), ["image#1"], "only the staging file until committed");

    staged.commit().await.unwrap();
    assert_eq!(staging_files(parent), ["image"]);
    assert!(std::fs::read(&dest).unwrap() == bytes, "the object holds the source's bytes");
}

#[tokio::test]
async fn a_copy_not_committed_leaves_nothing_and_staging_names_do_not_collide() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    std::fs::write(&source, noise(100_000)).unwrap();
    let dest = dir.path().join("store/image");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(dir.path().join("store/image#1"), b"another upload's").unwrap();

    let staged = run(&source, &dest, u64::MAX, false).await.result.unwrap();
    assert_eq!(staged.digests.sha512, None);
    assert_eq!(staging_files(&dir.path().join("store")), ["image#1", "image#2"]);
    drop(staged);
    assert_eq!(staging_files(&dir.path().join("store")), ["image#1"], "the other upload's file is left alone");
    assert!(!dest.exists());
}

#[tokio::test]
async fn a_source_over_the_limit_is_copied_one_byte_past_it_and_no_further() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let bytes = noise(3 * STEP as usize);
    std::fs::write(&source, &bytes).unwrap();
    let dest = dir.path().join("store/image");

    let staged = run(&source, &dest, STEP + 10, false).await.result.unwrap();
    assert_eq!(staged.len, STEP + 11, "the caller sees it is over the limit without copying it all");
    assert_eq!(staged.digests.sha256, hex(&Sha256::digest(&bytes[..STEP as usize + 11])));
}

#[tokio::test]
async fn an_empty_source_gives_an_empty_object() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("empty");
    std::fs::write(&source, b"").unwrap();
    let dest = dir.path().join("store/image");
    let staged = run(&source, &dest, u64::MAX, false).await.result.unwrap();
    assert_eq!((staged.len, staged.digests.sha256.as_str()), (0, hex(&Sha256::digest(b"")).as_str()));
    staged.commit().await.unwrap();
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 0);
}

#[tokio::test]
async fn an_unwritable_store_is_a_store_error_naming_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    std::fs::write(&source, b"bytes").unwrap();
    // A file where the object's directory should be.
    std::fs::write(dir.path().join("store"), b"").unwrap();
    let err = run(&source, &dir.path().join("store/image"), u64::MAX, false).await.result.unwrap_err();
    assert!(matches!(err, ImportError::Store(_)), "{err:?}");
    let blocked = dir.path().join("store").display().to_string();
    assert!(err.to_string().contains(&format!("creating {blocked}")), "{err}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn dropping_the_copy_midway_stops_it_and_removes_the_staging_file() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    std::fs::write(&source, noise(8 * STEP as usize)).unwrap();
    let store = dir.path().join("store");
    let dest = store.join("image");
    let mut report = |_, _| {};
    let file = File::open(&source).unwrap();
    let mut progress = Progress { every: Duration::ZERO, report: &mut report };
    let mut copy = Box::pin(copy_file(file, &source, &dest, u64::MAX, false, None, &mut progress));
    // Polled until its staging file is there (256 MiB take far longer to copy and hash), then
    // dropped, as a cancelled import is.
    while staging_files(&store).is_empty() {
        if futures::poll!(&mut copy).is_ready() {
            panic!("256 MiB were copied and hashed before the staging file was seen");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(futures::poll!(&mut copy).is_pending());
    drop(copy);
    assert_eq!(staging_files(&store), Vec::<String>::new(), "removed when dropped");
    assert!(!dest.exists());
}
