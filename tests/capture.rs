//! Capture (`source.volume`) through the real controllers: a claim bound to a `hostPath` or
//! `local` volume is read in-process (as `ims-operator local` does), block claims as the
//! volume's file, filesystem claims as `disk.img` at its root; the image is Active with the
//! volume's sha256 and serves its bytes. A capture waits for its claim and for the running pod
//! that holds it, and what cannot be captured fails with a reason and nothing stored.

mod support;

use std::time::Duration;

use ims_operator::api::Image;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::{Env, apply, reason_is, region};

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn captured(name: &str, region: &str, claim: &str) -> serde_json::Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
        "spec": {"region": region, "type": "DataDisk", "source": {"volume": {"claimName": claim}}}})
}

/// A PersistentVolume `name` at `path` (hostPath, or local with the node affinity the API
/// requires of it), bound to claim `namespace/claim`.
fn volume(
    name: &str,
    path: &std::path::Path,
    block: bool,
    local: bool,
    namespace: &str,
    claim: &str,
) -> serde_json::Value {
    let mut spec = json!({
        "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
        "volumeMode": if block { "Block" } else { "Filesystem" }, "persistentVolumeReclaimPolicy": "Retain",
        "claimRef": {"namespace": namespace, "name": claim},
    });
    if local {
        spec["local"] = json!({"path": path});
        spec["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-1"]}]}]}});
    } else {
        spec["hostPath"] = json!({"path": path});
    }
    json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name}, "spec": spec})
}

fn claim(name: &str, volume: Option<&str>, block: bool) -> serde_json::Value {
    let mut spec = json!({"accessModes": ["ReadWriteOnce"], "storageClassName": "",
        "volumeMode": if block { "Block" } else { "Filesystem" }, "resources": {"requests": {"storage": "1Gi"}}});
    if let Some(volume) = volume {
        spec["volumeName"] = json!(volume);
    }
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec})
}

fn message_of(image: &Image) -> String {
    image.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default()
}

fn phase_of(image: &Image) -> String {
    image.status.as_ref().and_then(|s| s.phase).map(|p| format!("{p:?}")).unwrap_or_default()
}

async fn remove_volumes(env: &Env, names: &[&str]) {
    let volumes: Api<PersistentVolume> = Api::all(env.client.clone());
    for name in names {
        let _ = volumes.delete(name, &DeleteParams::default()).await;
    }
}

scenarios! {
    async fn block_and_filesystem_claims_are_captured_and_served_byte_for_byte(env: &Env) {
        if !support::have_qemu_img() {
            return;
        }
        let ns = env.namespace("cap").await;
        let r = format!("{ns}-r");
        let disks = tempfile::tempdir().unwrap();
        // A block claim: the volume is the disk itself (a qcow2 here).
        let (qcow2, pattern) = support::qcow2_with_data(disks.path(), 3);
        // A filesystem claim: disk.img at the volume's root (a raw disk).
        let fs_root = disks.path().join("fs");
        std::fs::create_dir(&fs_root).unwrap();
        let raw: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(fs_root.join("disk.img"), &raw).unwrap();
        std::fs::write(fs_root.join("other-file"), b"not read").unwrap();
        let (pv_block, pv_fs) = (format!("{ns}-block"), format!("{ns}-fs"));
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        apply(&pvs, volume(&pv_block, &disks.path().join("disk.qcow2"), true, false, &ns, "boot")).await;
        apply(&pvs, volume(&pv_fs, &fs_root, false, true, &ns, "data")).await;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &ns);
        apply(&pvcs, claim("boot", Some(&pv_block), true)).await;
        apply(&pvcs, claim("data", Some(&pv_fs), false)).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, captured("boot-disk", &r, "boot")).await;
        apply(&images, captured("data-disk", &r, "data")).await;
        for (name, bytes, format, virtual_size) in
            [("boot-disk", &qcow2, "Qcow2", pattern.len()), ("data-disk", &raw, "Raw", raw.len())]
        {
            let active = env.wait_for(&images, name, reason_is("Active")).await.unwrap();
            let status = active.status.clone().unwrap();
            assert_eq!(status.checksum.unwrap().sha256, sha256(bytes), "{name}: the volume's sha256");
            assert_eq!(status.size_bytes, Some(bytes.len() as i64));
            assert_eq!(status.format.as_deref(), Some(format));
            assert_eq!(status.virtual_size_bytes, Some(virtual_size as i64));
            let url = status.location.unwrap().url;
            let (code, _, served) = support::http_get_active(&url, &[]).await;
            assert!(code == 200 && &served == bytes, "{name}: served {code}, {} bytes", served.len());
        }
        remove_volumes(env, &[&pv_block, &pv_fs]).await;
    }

    async fn a_capture_waits_for_its_claim_and_for_the_running_pod_that_holds_it(env: &Env) {
        let ns = env.namespace("cap-wait").await;
        let r = format!("{ns}-r");
        let disks = tempfile::tempdir().unwrap();
        let raw: Vec<u8> = (0..500_000u32).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(disks.path().join("vm.raw"), &raw).unwrap();
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, captured("backup", &r, "root")).await;
        let waiting = env.wait_for(&images, "backup", reason_is("VolumeNotFound")).await.unwrap();
        assert_eq!(phase_of(&waiting), "Queued");
        assert!(message_of(&waiting).contains("PersistentVolumeClaim root does not exist"), "{}", message_of(&waiting));

        // Bound, and mounted by a running pod: it waits for the pod.
        let pv = format!("{ns}-root");
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        apply(&pvs, volume(&pv, &disks.path().join("vm.raw"), true, false, &ns, "root")).await;
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
        let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "vm"},
            "spec": {"automountServiceAccountToken": false, "containers": [{"name": "vm", "image": "registry.example/vm:1"}],
                "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "root"}}]}}))
        .unwrap();
        // (A new namespace's default ServiceAccount, which pods need, comes a moment later.)
        let mut created = false;
        for _ in 0..100 {
            if pods.create(&PostParams::default(), &pod).await.is_ok() {
                created = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(created, "the pod is created");
        let running = json!({"status": {"phase": "Running"}});
        pods.patch_status("vm", &PatchParams::default(), &Patch::Merge(&running)).await.unwrap();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &ns);
        apply(&pvcs, claim("root", Some(&pv), true)).await;
        let in_use = env.wait_for(&images, "backup", reason_is("VolumeInUse")).await.unwrap();
        assert_eq!(phase_of(&in_use), "Queued");
        assert!(message_of(&in_use).contains("running pod vm"), "{}", message_of(&in_use));
        assert!(support::stored_files(&env.region_dir(&r)).is_empty(), "nothing moved while in use");

        // The server stops: the capture runs.
        let stopped = json!({"status": {"phase": "Succeeded"}});
        pods.patch_status("vm", &PatchParams::default(), &Patch::Merge(&stopped)).await.unwrap();
        let active = env.wait_for(&images, "backup", reason_is("Active")).await.unwrap();
        assert_eq!(active.status.unwrap().checksum.unwrap().sha256, sha256(&raw));
        remove_volumes(env, &[&pv]).await;
    }

    async fn what_cannot_be_captured_fails_with_a_reason_and_nothing_stored(env: &Env) {
        let ns = env.namespace("cap-bad").await;
        let r = format!("{ns}-r");
        let disks = tempfile::tempdir().unwrap();
        let empty_fs = disks.path().join("empty");
        std::fs::create_dir(&empty_fs).unwrap();
        // qcow2's magic and nothing a qcow2 needs after it.
        let mut broken = b"QFI\xfb\0\0\0\x03".to_vec();
        broken.resize(4096, 0xee);
        std::fs::write(disks.path().join("broken.qcow2"), &broken).unwrap();
        std::fs::write(disks.path().join("fine.raw"), vec![7u8; 100_000]).unwrap();
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        let names: Vec<String> = ["nodisk", "broken", "elsewhere", "nfs"].iter().map(|n| format!("{ns}-{n}")).collect();
        apply(&pvs, volume(&names[0], &empty_fs, false, false, &ns, "nodisk")).await;
        apply(&pvs, volume(&names[1], &disks.path().join("broken.qcow2"), true, false, &ns, "broken")).await;
        // A volume whose claimRef names another claim: this claim's volumeName cannot take it.
        apply(&pvs, volume(&names[2], &disks.path().join("fine.raw"), true, false, "someone-else", "theirs")).await;
        let nfs = json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": names[3]},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain", "claimRef": {"namespace": ns, "name": "nfs"},
                "nfs": {"server": "nfs.example", "path": "/exports/vm"}}});
        apply(&pvs, nfs).await;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &ns);
        apply(&pvcs, claim("nodisk", Some(&names[0]), false)).await;
        apply(&pvcs, claim("broken", Some(&names[1]), true)).await;
        apply(&pvcs, claim("stolen", Some(&names[2]), true)).await;
        apply(&pvcs, claim("unbound", Some(&format!("{ns}-no-such-volume")), true)).await;
        let mut nfs_claim = claim("nfs", Some(&names[3]), false);
        nfs_claim["spec"]["accessModes"] = json!(["ReadWriteMany"]);
        apply(&pvcs, nfs_claim).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        for (image, claim) in
            [("nodisk", "nodisk"), ("broken", "broken"), ("stolen", "stolen"), ("unbound", "unbound"), ("nfs", "nfs")]
        {
            apply(&images, captured(image, &r, claim)).await;
        }
        let nodisk = env.wait_for(&images, "nodisk", reason_is("CaptureFailed")).await.unwrap();
        assert_eq!(phase_of(&nodisk), "Failed");
        assert!(message_of(&nodisk).contains("has no disk.img at its root"), "{}", message_of(&nodisk));
        let broken = env.wait_for(&images, "broken", reason_is("UnsupportedFormat")).await.unwrap();
        assert_eq!(phase_of(&broken), "Failed");
        let nfs = env.wait_for(&images, "nfs", reason_is("CaptureFailed")).await.unwrap();
        assert!(message_of(&nfs).contains("neither hostPath nor local"), "{}", message_of(&nfs));
        // Another's volume and a missing one: the same answer, which tells nothing about either.
        let stolen = env.wait_for(&images, "stolen", reason_is("VolumeNotFound")).await.unwrap();
        let unbound = env.wait_for(&images, "unbound", reason_is("VolumeNotFound")).await.unwrap();
        assert_eq!(phase_of(&stolen), "Queued");
        assert_eq!(message_of(&stolen).replace("stolen", "X"), message_of(&unbound).replace("unbound", "X"));
        assert!(support::stored_files(&env.region_dir(&r)).is_empty(), "nothing stored");

        // A volume source is one disk: never a FullServer.
        let mut full = captured("full", &r, "nodisk");
        full["spec"]["type"] = json!("FullServer");
        full["spec"]["os"] = json!({"type": "Linux", "distribution": "Ubuntu", "version": "24.04", "architecture": "x86_64"});
        let refused = images.patch("full", &PatchParams::apply("test"), &Patch::Apply(&full)).await.unwrap_err();
        assert!(refused.to_string().contains("source.volume captures one disk"), "{refused}");
        remove_volumes(env, &names.iter().map(String::as_str).collect::<Vec<_>>()).await;
    }
}
