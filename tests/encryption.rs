//! Encryption at rest through the real controllers: an image with `encryption.kmsKeyID` is
//! stored as ciphertext (no 4 KiB run of its source in the store), served decrypted (ranges
//! too), refused when its stored bytes are changed, unavailable while its key is gone and
//! available again when it is back; a missing key fails an import with nothing stored; copies in
//! one region encrypt, decrypt and change the key.

mod support;

use std::process::Command;

use ims_operator::api::{Image, ImageCopy};
use kube::Api;
use serde_json::json;
use sha2::{Digest, Sha256};
use support::{apply, reason_is, region};

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn encrypted(name: &str, region: &str, url: &str, key: &str) -> serde_json::Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
        "spec": {"region": region, "type": "DataDisk", "encryption": {"kmsKeyID": key}, "source": {"url": {"url": url}}}})
}

fn plain(name: &str, region: &str, url: &str) -> serde_json::Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
        "spec": {"region": region, "type": "DataDisk", "source": {"url": {"url": url}}}})
}

fn url_of(image: &Image) -> String {
    image.status.as_ref().and_then(|s| s.location.as_ref()).map(|l| l.url.clone()).expect("a location")
}

/// curl of `url` into `file`: its exit code.
fn curl(url: &str, file: &std::path::Path, args: &[&str]) -> Option<i32> {
    let _ = std::fs::remove_file(file);
    Command::new("curl").args(["-sS", "-f"]).args(args).arg("-o").arg(file).arg(url).status().expect("curl runs").code()
}

scenarios! {
    async fn an_encrypted_image_is_stored_as_ciphertext_and_served_as_its_plaintext(env: &Env) {
        if !support::have_qemu_img() {
            return;
        }
        let ns = env.namespace("enc").await;
        let r = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        let (source, pattern) = support::qcow2_with_data(files.path(), 6);
        let addr = support::serve_files(files.path().to_path_buf()).await;
        support::kms_keys(env, &[("k1", [1; 32])]).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, encrypted("vm", &r, &format!("http://{addr}/disk.qcow2"), "k1")).await;
        let active = env.wait_for(&images, "vm", reason_is("Active")).await.unwrap();
        let status = active.status.clone().unwrap();
        // Status speaks of the plaintext: its checksum, size and format.
        assert_eq!(status.checksum.unwrap().sha256, sha256(&source));
        assert_eq!(status.size_bytes, Some(source.len() as i64));
        assert_eq!((status.format.as_deref(), status.virtual_size_bytes), (Some("Qcow2"), Some(pattern.len() as i64)));

        // The store holds ciphertext: no 4 KiB run of the source anywhere in the image's objects.
        let dir = env.stored_file(&active, "disk").parent().unwrap().to_path_buf();
        let objects: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(objects.len(), 1, "{objects:?}");
        let stored = std::fs::read(&objects[0]).unwrap();
        assert_eq!(support::shared_run(&stored, &source, 4096), None, "a 4 KiB run of the source is in the store");
        assert_eq!(support::shared_run(&source, &source, 4096), Some(0), "the search finds a run that is there");
        assert_eq!(stored.len() as u64, ims_operator::crypt::sealed_len(source.len() as u64));

        // Served decrypted: whole, in ranges, to curl and to qemu-img.
        let url = url_of(&active);
        let (code, headers, body) = support::http_get_active(&url, &[]).await;
        assert_eq!(code, 200);
        assert!(body == source, "the served bytes are the plaintext");
        assert_eq!(headers.get("content-length").unwrap().to_str().unwrap(), source.len().to_string());
        for (a, b) in [(0usize, 100usize), (65_530, 65_560), (200_000, 1_500_000), (source.len() - 10, source.len())] {
            let (code, _, part) = support::http_get(&url, &[("Range", &format!("bytes={a}-{}", b - 1))]).await;
            assert!(code == 206 && part == source[a..b], "range {a}-{b}: {code}");
        }
        let fetched = files.path().join("fetched");
        assert_eq!(curl(&url, &fetched, &[]), Some(0));
        assert_eq!(sha256(&std::fs::read(&fetched).unwrap()), sha256(&source));
        let info = Command::new("qemu-img").args(["info", "--output=json", &url]).output().unwrap();
        if !String::from_utf8_lossy(&info.stderr).contains("Unable to load module curl") {
            let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img info of the URL");
            assert_eq!(info["virtual-size"].as_u64(), Some(pattern.len() as u64));
        }

        // One byte flipped in a stored segment: never a wrong byte served.
        // Past the first batch the server opens before its headers (16 segments): the cut comes
        // mid-stream for the whole download, and as a clean 500 for a range that starts there.
        let segment = 20u64;
        let at = (ims_operator::crypt::HEADER_LEN + segment * ims_operator::crypt::envelope::SEALED + 100) as usize;
        let mut flipped = stored.clone();
        flipped[at] ^= 0x01;
        std::fs::write(&objects[0], &flipped).unwrap();
        let inside = segment * ims_operator::crypt::envelope::SEGMENT + 10;
        let (code, _, body) = support::http_get(&url, &[("Range", &format!("bytes={inside}-{}", inside + 99))]).await;
        assert_eq!(code, 500, "a range in the changed segment is refused: {}", String::from_utf8_lossy(&body));
        let (code, _, part) = support::http_get(&url, &[("Range", "bytes=0-999")]).await;
        assert!(code == 206 && part == source[..1000], "a range before it still reads");
        let whole = curl(&url, &fetched, &[]);
        assert_ne!(whole, Some(0), "the whole download fails");
        let got = std::fs::read(&fetched).unwrap_or_default();
        assert!(!got.is_empty() && got.len() < source.len(), "cut mid-stream: {} bytes", got.len());
        assert!(source.starts_with(&got), "what came before the failure is the plaintext");
        std::fs::write(&objects[0], &stored).unwrap();
        assert_eq!(curl(&url, &fetched, &[]), Some(0), "restored, it serves again");
    }

    async fn a_removed_key_makes_the_image_unavailable_and_the_restored_key_available(env: &Env) {
        let ns = env.namespace("enc-key").await;
        let r = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        let source: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(files.path().join("d.raw"), &source).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        support::kms_keys(env, &[("k1", [1; 32]), ("other", [2; 32])]).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, encrypted("d", &r, &format!("http://{addr}/d.raw"), "k1")).await;
        let url = url_of(&env.wait_for(&images, "d", reason_is("Active")).await.unwrap());
        let (code, _, body) = support::http_get_active(&url, &[]).await;
        assert!(code == 200 && body == source, "{code}: {}", String::from_utf8_lossy(&body[..body.len().min(200)]));

        // The key removed from the Secret: the image says why, and is not served.
        support::kms_keys(env, &[("other", [2; 32])]).await;
        let gone = env.wait_for(&images, "d", reason_is("KeyUnavailable")).await.unwrap();
        let status = gone.status.clone().unwrap();
        assert_eq!(format!("{:?}", status.phase.unwrap()), "Unavailable");
        assert!(status.message.unwrap_or_default().contains("\"k1\" is not in Secret ims-system/ims-kms-keys"));
        assert_eq!(support::http_code_unavailable(&url).await, 404, "an Unavailable image is not served");
        // A new import under the missing key fails, with nothing stored.
        apply(&images, encrypted("new", &r, &format!("http://{addr}/d.raw"), "k1")).await;
        let failed = env.wait_for(&images, "new", reason_is("KeyUnavailable")).await.unwrap();
        assert_eq!(format!("{:?}", failed.status.as_ref().unwrap().phase.unwrap()), "Failed");
        let dir = env.region_dir(&r).join(&ns).join("new");
        let leftovers: Vec<_> = walk(&dir);
        assert!(leftovers.is_empty(), "nothing stored for a failed import: {leftovers:?}");

        // The key back: both Active, the old URL serving again.
        support::kms_keys(env, &[("k1", [1; 32]), ("other", [2; 32])]).await;
        env.wait_for(&images, "d", reason_is("Active")).await.unwrap();
        assert!(support::http_get_active(&url, &[]).await.2 == source, "available again, same URL");
        let new = env.wait_for(&images, "new", reason_is("Active")).await.unwrap();
        let (code, _, body) = support::http_get_active(&url_of(&new), &[]).await;
        assert!(code == 200 && body == source, "{code} {} {:?}", body.len(), new.status);

        // Another key under the same id: the stored data keys do not open with it.
        support::kms_keys(env, &[("k1", [9; 32])]).await;
        let replaced = env.wait_for(&images, "d", reason_is("KeyUnavailable")).await.unwrap();
        assert!(replaced.status.unwrap().message.unwrap_or_default().contains("was replaced"));
    }

    async fn copies_in_a_region_encrypt_decrypt_and_change_the_key(env: &Env) {
        let ns = env.namespace("enc-copy").await;
        let r = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        let source: Vec<u8> = (0..700_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        std::fs::write(files.path().join("d.raw"), &source).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        support::kms_keys(env, &[("k1", [1; 32]), ("k2", [2; 32])]).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, plain("src", &r, &format!("http://{addr}/d.raw"))).await;
        env.wait_for(&images, "src", reason_is("Active")).await.unwrap();
        let copy = |name: &str, from: &str, key: Option<&str>| {
            let mut destination = json!({"region": r, "name": name});
            if let Some(key) = key {
                destination["encryption"] = json!({"kmsKeyID": key});
            }
            json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageCopy", "metadata": {"name": name},
                "spec": {"source": from, "destination": destination}})
        };
        // Encrypt, change the key, decrypt: each verified against the plaintext's sha256.
        for (name, from, key) in [("sealed", "src", Some("k1")), ("rekeyed", "sealed", Some("k2")), ("opened", "rekeyed", None)] {
            apply(&copies, copy(name, from, key)).await;
            let image = env.wait_for(&images, name, reason_is("Active")).await.unwrap();
            assert_eq!(image.status.as_ref().unwrap().checksum.as_ref().unwrap().sha256, sha256(&source), "{name}");
            assert_eq!(image.spec.encryption.as_ref().map(|e| e.kms_key_id.as_str()), key, "{name}");
            let stored = std::fs::read(env.stored_file(&image, "disk")).unwrap();
            match key {
                Some(_) => assert_eq!(support::shared_run(&stored, &source, 4096), None, "{name} stores ciphertext"),
                None => assert!(stored == source, "{name} stores the plaintext"),
            }
            assert!(support::http_get_active(&url_of(&image), &[]).await.2 == source, "{name} serves the plaintext");
        }
        // Re-encrypted under k2, the copy does not need k1.
        support::kms_keys(env, &[("k2", [2; 32])]).await;
        env.wait_for(&images, "sealed", reason_is("KeyUnavailable")).await.unwrap();
        let rekeyed = images.get("rekeyed").await.unwrap();
        assert_eq!(support::http_get_active(&url_of(&rekeyed), &[]).await.0, 200, "the re-keyed copy is served");
    }
}

/// Every file under `dir` (none when it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] })
        .collect()
}
