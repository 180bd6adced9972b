//! ImageCopy through the real controllers: verified cross-region copies, refusals, the
//! cross-region concurrency limit, cancellation and restarts.

mod support;

use std::process::Command;

use ims_operator::api::{CopyPhase, Image, ImageCopy, ImagePhase, ImageQuota};
use kube::{
    Api, ResourceExt,
    api::DeleteParams,
    runtime::{conditions::is_deleted, wait::Condition},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::{Env, apply, reason_is, region, stored_files};

fn copy_is(phase: CopyPhase, reason: &'static str) -> impl Condition<ImageCopy> {
    move |c: Option<&ImageCopy>| {
        c.and_then(|c| c.status.as_ref()).is_some_and(|s| {
            s.phase == Some(phase) && s.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == reason)
        })
    }
}

fn copy_phase(c: &ImageCopy) -> (Option<CopyPhase>, String) {
    let s = c.status.clone().unwrap_or_default();
    (s.phase, s.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.reason.clone()).unwrap_or_default())
}

/// A fresh namespace and regions `<ns>-a` and `<ns>-b`, the operator running, both Ready.
async fn two_regions(env: &Env, tag: &str) -> (String, String, String) {
    let ns = env.namespace(tag).await;
    let (a, b) = (format!("{ns}-a"), format!("{ns}-b"));
    region(env, &a).await;
    region(env, &b).await;
    env.start_operator();
    for name in [&a, &b] {
        support::region_ready(env, name).await;
    }
    (ns, a, b)
}

fn image(name: &str, region: &str, url: &str, extra: Value) -> Value {
    let mut spec = json!({"region": region, "type": "DataDisk", "source": {"url": {"url": url}}});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name}, "spec": spec})
}

fn image_copy(name: &str, source: &str, region: &str, dest: &str, extra: Value) -> Value {
    let mut destination = json!({"region": region, "name": dest});
    for (k, v) in extra.as_object().unwrap() {
        destination[k] = v.clone();
    }
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageCopy", "metadata": {"name": name},
        "spec": {"source": source, "destination": destination}})
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A 64 MiB qcow2 made by qemu-img from non-zero data, served from 127.0.0.1.
async fn qcow2_64m() -> (std::net::SocketAddr, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; 64 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = ((i / 4096) as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
    }
    std::fs::write(&raw, &data).unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), qcow2.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&raw).unwrap();
    std::fs::write(dir.path().join("small.raw"), vec![9u8; 10_000]).unwrap();
    let digest = sha256(&std::fs::read(&qcow2).unwrap());
    (support::serve_files(dir.path().to_path_buf()).await, dir, digest)
}

scenarios! {
    async fn a_cross_region_copy_lands_verified_and_outlives_its_request(env: &Env) {
        let (ns, a, b) = two_regions(env, "copy").await;
        let (addr, _dir, digest) = qcow2_64m().await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, image("base", &a, &format!("http://{addr}/disk.qcow2"), json!({"description": "golden"}))).await;
        env.wait_for(&images, "base", reason_is("Active")).await;
        apply(&copies, image_copy("to-b", "base", &b, "base-b", json!({}))).await;
        let done = env.wait_for(&copies, "to-b", copy_is(CopyPhase::Succeeded, "Succeeded")).await.unwrap();
        let status = done.status.clone().unwrap();
        assert_eq!(status.destination_image.as_deref(), Some("base-b"));
        assert!(status.started_at.is_some() && status.completed_at.is_some());
        assert_eq!(status.progress.unwrap().percent, Some(100));

        let dest = images.get("base-b").await.unwrap();
        let s = dest.status.clone().unwrap();
        assert_eq!((dest.spec.region.as_str(), s.phase), (b.as_str(), Some(ImagePhase::Active)));
        assert_eq!(s.checksum.unwrap().sha256, digest, "the copy hashes as the source");
        assert_eq!(s.format.as_deref(), Some("Qcow2"));
        let lineage = s.lineage.unwrap();
        assert_eq!((lineage.namespace.as_str(), lineage.name.as_str(), lineage.region.as_str()), (ns.as_str(), "base", a.as_str()));
        assert_eq!(dest.spec.description.as_deref(), Some("golden"));
        if env.server().is_some() {
            let stored = std::fs::read(env.stored_file(&dest, "disk")).unwrap();
            assert_eq!(sha256(&stored), digest, "the bytes in region B's store hash to the source's sha256");
            assert!(stored_files(&env.region_dir(&b)).iter().all(|p| p.to_string_lossy().contains("/base-b/")));
        }
        // History, like a Job: deleting the request leaves the image.
        copies.delete("to-b", &DeleteParams::default()).await.unwrap();
        env.wait_for(&copies, "to-b", is_deleted(&done.uid().unwrap())).await;
        assert_eq!(images.get("base-b").await.unwrap().status.unwrap().phase, Some(ImagePhase::Active));
    }

    async fn copy_refusals_say_why_and_hand_written_copies_follow_the_same_rules(env: &Env) {
        let (ns, a, b) = two_regions(env, "rules").await;
        let (addr, _dir, _) = qcow2_64m().await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &ns);
        let url = format!("http://{addr}/small.raw");
        apply(&images, image("plain", &a, &url, json!({}))).await;
        support::kms_keys(env, &[("k1", [1; 32]), ("k2", [2; 32])]).await;
        apply(&images, image("sealed", &a, &url, json!({"encryption": {"kmsKeyID": "k1"}}))).await;
        let os = json!({"type": "Linux", "distribution": "Debian", "version": "13", "architecture": "x86_64"});
        let mut server = image("server", &a, &url, json!({"type": "FullServer", "os": os, "backupID": "bk"}));
        server["spec"]["source"] = json!({"disks": [{"role": "System", "url": url}, {"role": "Data", "url": url}]});
        apply(&images, server).await;
        apply(&images, image("taken", &b, &url, json!({}))).await;
        for name in ["plain", "sealed", "server", "taken"] {
            env.wait_for(&images, name, reason_is("Active")).await;
        }
        let cases = [
            ("enc", image_copy("enc", "sealed", &b, "sealed-b", json!({})), CopyPhase::Failed, "EncryptedImage"),
            ("full", image_copy("full", "server", &a, "server-2", json!({})), CopyPhase::Failed, "FullServerNotCopyable"),
            ("exists", image_copy("exists", "plain", &b, "taken", json!({})), CopyPhase::Failed, "DestinationExists"),
            ("nowhere", image_copy("nowhere", "plain", "no-such-region", "x", json!({})), CopyPhase::Pending, "RegionNotFound"),
            ("ghost", image_copy("ghost", "missing", &b, "y", json!({})), CopyPhase::Pending, "SourceNotFound"),
        ];
        for (_, manifest, _, _) in &cases {
            apply(&copies, manifest.clone()).await;
        }
        for (name, _, phase, reason) in cases {
            let c = env.wait_for(&copies, name, copy_is(phase, reason)).await.unwrap();
            let ready = c.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
            assert!(!ready.message.is_empty(), "{name}: says why");
        }
        assert!(images.get_opt("sealed-b").await.unwrap().is_none(), "a refused copy creates nothing");
        // Re-encrypting within the region is allowed; so is a FullServer to another region.
        apply(&copies, image_copy("rekey", "sealed", &a, "sealed-k2", json!({"encryption": {"kmsKeyID": "k2"}}))).await;
        apply(&copies, image_copy("move", "server", &b, "server-b", json!({}))).await;
        env.wait_for(&copies, "rekey", copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        env.wait_for(&copies, "move", copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        assert_eq!(images.get("sealed-k2").await.unwrap().spec.encryption.unwrap().kms_key_id, "k2");
        let moved = images.get("server-b").await.unwrap().status.unwrap();
        let original = images.get("server").await.unwrap().status.unwrap();
        assert_eq!(moved.disks.len(), 2, "every disk of a FullServer is copied");
        assert_eq!(moved.disks.iter().map(|d| d.sha256.clone()).collect::<Vec<_>>(), original.disks.iter().map(|d| d.sha256.clone()).collect::<Vec<_>>());
        // The missing source appears: the waiting copy runs by itself.
        apply(&images, image("missing", &a, &url, json!({}))).await;
        env.wait_for(&copies, "ghost", copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        // No bypass: an Image written by hand with source.copy obeys the same rules.
        let mut by_hand = image("by-hand", &b, &url, json!({}));
        by_hand["spec"]["source"] = json!({"copy": {"name": "sealed"}});
        apply(&images, by_hand).await;
        let refused = env.wait_for(&images, "by-hand", reason_is("InvalidSpec")).await.unwrap();
        let status = refused.status.unwrap();
        assert_eq!(status.phase, Some(ImagePhase::Failed));
        assert!(status.message.unwrap().contains("EncryptedImage"));
        // A copy of itself would wait for itself forever: refused at once.
        let mut selfish = image("selfish", &b, &url, json!({}));
        selfish["spec"]["source"] = json!({"copy": {"name": "selfish"}});
        apply(&images, selfish).await;
        let refused = env.wait_for(&images, "selfish", reason_is("InvalidSpec")).await.unwrap().status.unwrap();
        assert_eq!(refused.phase, Some(ImagePhase::Failed));
        assert!(refused.message.unwrap().contains("itself"));
    }

    async fn six_cross_region_copies_run_five_at_a_time_and_a_cancel_leaves_nothing(env: &Env) {
        let (ns, a, b) = two_regions(env, "conc").await;
        let (addr, _dir, _) = qcow2_64m().await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &ns);
        let quotas: Api<ImageQuota> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, image("src", &a, &format!("http://{addr}/small.raw"), json!({}))).await;
        env.wait_for(&images, "src", reason_is("Active")).await;
        // No import slots: destinations hold their cross-region slot without moving bytes yet.
        apply(&quotas, json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageQuota", "metadata": {"name": "default"}, "spec": {"concurrentImports": 0}})).await;
        for n in 0..6 {
            apply(&copies, image_copy(&format!("c{n}"), "src", &b, &format!("d{n}"), json!({}))).await;
            // Distinct creation seconds: first come, first served is by creationTimestamp.
            tokio::time::sleep(std::time::Duration::from_millis(1050)).await;
        }
        env.wait_for(&copies, "c5", copy_is(CopyPhase::Pending, "ConcurrencyLimit")).await;
        for n in 0..5 {
            env.wait_for(&copies, &format!("c{n}"), copy_is(CopyPhase::Copying, "Copying")).await;
        }
        assert!(images.get_opt("d5").await.unwrap().is_none(), "the sixth has no destination yet");
        let c5 = copies.get("c5").await.unwrap();
        assert!(c5.status.unwrap().conditions[0].message.contains("concurrentCrossRegionCopies 5"));

        // Cancel one in flight: its destination and any bytes go; the waiting copy takes its slot.
        let d0 = images.get("d0").await.unwrap();
        copies.delete("c0", &DeleteParams::default()).await.unwrap();
        env.wait_for(&images, "d0", is_deleted(&d0.uid().unwrap())).await;
        env.wait_for(&copies, "c5", copy_is(CopyPhase::Copying, "Copying")).await;
        apply(&quotas, json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageQuota", "metadata": {"name": "default"}, "spec": {"concurrentImports": 10}})).await;
        for n in 1..6 {
            env.wait_for(&copies, &format!("c{n}"), copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        }
        let states: Vec<_> = copies.list(&Default::default()).await.unwrap().items.iter().map(copy_phase).collect();
        assert_eq!(states.len(), 5);
        if env.server().is_some() {
            let left: Vec<_> = stored_files(&env.region_dir(&b)).into_iter().filter(|p| p.to_string_lossy().contains("/d0/")).collect();
            assert!(left.is_empty(), "the cancelled copy left nothing: {left:?}");
        }
    }

    async fn an_operator_killed_mid_copy_converges_with_the_right_bytes(env: &Env) {
        let (ns, a, b) = two_regions(env, "kill").await;
        let (addr, _dir, digest) = qcow2_64m().await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, image("big", &a, &format!("http://{addr}/disk.qcow2"), json!({}))).await;
        env.wait_for(&images, "big", reason_is("Active")).await;
        apply(&copies, image_copy("go", "big", &b, "big-b", json!({}))).await;
        env.wait_for(&copies, "go", copy_is(CopyPhase::Copying, "Copying")).await;
        env.stop_operator().await;
        env.start_operator();
        env.wait_for(&copies, "go", copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        let s = images.get("big-b").await.unwrap().status.unwrap();
        assert_eq!(s.checksum.unwrap().sha256, digest);
        if env.server().is_some() {
            let files = stored_files(&env.region_dir(&b));
            assert_eq!(files.len(), 1, "one object, no partial leftovers: {files:?}");
            assert_eq!(sha256(&std::fs::read(&files[0]).unwrap()), digest);
        }
    }
}
