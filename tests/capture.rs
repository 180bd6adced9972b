//! Capture (`source.volume`) through the real controllers: a claim bound to a `hostPath` or
//! `local` volume is read in-process (as `ims-operator local` does), block claims as the
//! volume's file, filesystem claims as `disk.img` at its root; the image is Active with the
//! volume's sha256 and serves its bytes. A capture waits for its claim and for the running pod
//! that holds it, and what cannot be captured fails with a reason and nothing stored.

mod support;

use std::time::Duration;

use ims_operator::api::Image;
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde::Deserialize;
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

/// The operator with mover Jobs (as `run` does): nothing is read in-process.
fn with_movers(env: &Env) -> ims_operator::controllers::Config {
    let mut config = env.operator_config();
    config.capture_in_process = false;
    let base_url = config.delivery.as_ref().map(|d| d.base_url.clone()).unwrap();
    config.mover = Some(ims_operator::controllers::MoverConfig {
        image: "registry.example/ims-operator:test".into(),
        upload_base_url: base_url,
        deadline: Duration::from_secs(600),
    });
    config
}

/// The mover Job of `image` (disk 0), once the operator has created it and its Secret (the Job
/// first: a kubelet would wait for the Secret).
async fn mover_job(env: &Env, images: &Api<Image>, ns: &str, image: &str) -> Job {
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    for _ in 0..300 {
        let uid = images.get(image).await.unwrap().metadata.uid.unwrap();
        let name = format!("ims-capture-{uid}-0");
        if let Some(job) = jobs.get_opt(&name).await.unwrap()
            && secrets.get_opt(&name).await.unwrap().is_some()
        {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no mover Job for {image}");
}

/// What a kubelet would do with the mover Job: run its container's command, with `volume` where
/// the claim is and the token of the Job's Secret. Returns the exit code and the termination
/// message.
async fn run_mover(env: &Env, job: &Job, volume: &std::path::Path, token: Option<&str>) -> (i32, String) {
    let ns = job.metadata.namespace.clone().unwrap();
    let name = job.metadata.name.clone().unwrap();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    let token = match token {
        Some(token) => token.to_string(),
        None => {
            let secret = secrets.get(&name).await.expect("the token Secret");
            String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap()
        }
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), token).unwrap();
    let container = &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    let mut args: Vec<String> = container.args.clone().unwrap();
    for arg in args.iter_mut() {
        if arg == "/dev/ims-disk" || arg == "/mnt/disk/disk.img" {
            *arg = volume.display().to_string();
        } else if arg == "/var/run/ims-capture/token" {
            *arg = dir.path().join("token").display().to_string();
        }
    }
    let log = dir.path().join("termination-log");
    args.extend(["--termination-log".to_string(), log.display().to_string()]);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ims-operator")).args(&args).output().unwrap()
    })
    .await
    .unwrap();
    (out.status.code().unwrap_or(-1), std::fs::read_to_string(&log).unwrap_or_default())
}

/// Whether `kind` `name` of `ns` is gone within the wait.
async fn gone<K>(api: &Api<K>, name: &str) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for _ in 0..300 {
        if api.get_opt(name).await.unwrap().is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Fails the mover Job's pod with `message` as its termination message, as a kubelet would;
/// on the embedded API, which runs no Job controller, the pod is made and the Job failed too.
async fn fail_mover(env: &Env, job: &Job, message: &str) {
    let ns = job.metadata.namespace.clone().unwrap();
    let name = job.metadata.name.clone().unwrap();
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let selector = format!("batch.kubernetes.io/job-name={name}");
    let terminated = json!({"status": {"phase": "Failed", "containerStatuses": [{"name": "mover",
        "image": "registry.example/ims-operator:test", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}}}]}});
    if env.server().is_some() {
        let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-x"), "labels": {"batch.kubernetes.io/job-name": name}},
            "spec": {"containers": [{"name": "mover", "image": "registry.example/ims-operator:test"}]}}))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        pods.patch_status(&format!("{name}-x"), &PatchParams::default(), &Patch::Merge(&terminated)).await.unwrap();
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        let failed = json!({"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}});
        jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&failed)).await.unwrap();
        return;
    }
    // The Job controller made the pod; once it fails, the controller fails the Job.
    for _ in 0..300 {
        let listed = pods.list(&kube::api::ListParams::default().labels(&selector)).await.unwrap();
        if let Some(pod) = listed.items.first() {
            let pod_name = pod.metadata.name.clone().unwrap();
            pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&terminated)).await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the Job controller made no pod for {name}");
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

    async fn a_mover_job_uploads_the_claim_once_and_leaves_nothing_behind(env: &Env) {
        let ns = env.namespace("cap-job").await;
        let r = format!("{ns}-r");
        let disks = tempfile::tempdir().unwrap();
        let raw: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 247) as u8).collect();
        let device = disks.path().join("sdb");
        std::fs::write(&device, &raw).unwrap();
        let pv = format!("{ns}-sdb");
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        // Where the volume is does not matter to the operator now: the Job's pod mounts it.
        apply(&pvs, volume(&pv, std::path::Path::new("/dev/not-on-this-machine"), true, false, &ns, "sdb")).await;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &ns);
        apply(&pvcs, claim("sdb", Some(&pv), true)).await;
        region(env, &r).await;
        env.start_operator_with(with_movers(env));
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, captured("sdb-backup", &r, "sdb")).await;
        let capturing = env.wait_for(&images, "sdb-backup", reason_is("Capturing")).await.unwrap();
        assert_eq!(phase_of(&capturing), "Saving");
        let job = mover_job(env, &images, &ns, "sdb-backup").await;
        let name = job.metadata.name.clone().unwrap();

        // The Job as a kubelet gets it: owned by the Image, the claim read-only as a device,
        // the token from its Secret, no service account token, no privilege, a deadline.
        let uid = capturing.metadata.uid.clone().unwrap();
        let owners = job.metadata.owner_references.clone().unwrap();
        assert!(owners.iter().any(|o| o.kind == "Image" && o.uid == uid && o.controller == Some(true)), "{owners:?}");
        let spec = job.spec.clone().unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.active_deadline_seconds, Some(600));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        let disk = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "disk").unwrap();
        let disk_claim = disk.persistent_volume_claim.as_ref().unwrap();
        assert_eq!((disk_claim.claim_name.as_str(), disk_claim.read_only), ("sdb", Some(true)));
        let token_volume = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "token").unwrap();
        assert_eq!(token_volume.secret.as_ref().unwrap().secret_name.as_deref(), Some(name.as_str()));
        let mover = &pod.containers[0];
        assert_eq!(mover.image.as_deref(), Some("registry.example/ims-operator:test"));
        assert_eq!(mover.volume_devices.as_ref().unwrap()[0].device_path, "/dev/ims-disk");
        assert!(mover.volume_mounts.as_ref().unwrap().iter().all(|m| m.name != "disk"), "a block claim is no mount");
        let context = mover.security_context.clone().unwrap();
        assert_eq!(context.privileged, Some(false));
        assert_eq!(context.allow_privilege_escalation, Some(false));
        assert_eq!(context.read_only_root_filesystem, Some(true));
        assert_eq!(context.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
        let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
        let secret = secrets.get(&name).await.unwrap();
        let secret_owners = secret.metadata.owner_references.clone().unwrap();
        assert!(secret_owners.iter().any(|o| o.kind == "Job" && Some(&o.uid) == job.metadata.uid.as_ref()));
        assert!(secret_owners.iter().any(|o| o.kind == "Image" && o.uid == uid));

        // A wrong token is refused and changes nothing; the right one uploads.
        let (code, said) = run_mover(env, &job, &device, Some("0123456789abcdef")).await;
        assert_eq!(code, 1, "wrong token");
        assert!(said.contains("token is wrong or used already"), "{said}");
        let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
        let (code, said) = run_mover(env, &job, &device, Some(&token)).await;
        assert_eq!(code, 0, "the mover succeeds: {said}");
        let active = env.wait_for(&images, "sdb-backup", reason_is("Active")).await.unwrap();
        let status = active.status.unwrap();
        assert_eq!(status.checksum.unwrap().sha256, sha256(&raw));
        assert_eq!(status.size_bytes, Some(raw.len() as i64));
        let (code, _, served) = support::http_get_active(&status.location.unwrap().url, &[]).await;
        assert!(code == 200 && served == raw, "served {code}, {} bytes", served.len());
        // The Job and its Secret go when the capture ends; the token served once.
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        assert!(gone(&jobs, &name).await, "the Job is deleted");
        assert!(gone(&secrets, &name).await, "the Secret is deleted");
        let (code, said) = run_mover(env, &job, &device, Some(&token)).await;
        assert_eq!(code, 1, "a used token");
        assert!(said.contains("token is wrong or used already"), "{said}");
        remove_volumes(env, &[&pv]).await;
    }

    async fn a_mover_that_fails_breaks_off_or_sends_too_much_leaves_nothing(env: &Env) {
        let ns = env.namespace("cap-jobfail").await;
        let r = format!("{ns}-r");
        let disks = tempfile::tempdir().unwrap();
        let fs_root = disks.path().join("fs");
        std::fs::create_dir(&fs_root).unwrap();
        std::fs::write(fs_root.join("disk.img"), vec![5u8; 2 << 20]).unwrap();
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &ns);
        let names: Vec<String> = ["dies", "cut", "small"].iter().map(|n| format!("{ns}-{n}")).collect();
        for (pv, claim_name) in names.iter().zip(["dies", "cut", "small"]) {
            let mut manifest = volume(pv, &fs_root, false, false, &ns, claim_name);
            if claim_name == "small" {
                // A 1 MiB volume cannot hold a 2 MiB disk: the mover reads past it.
                manifest["spec"]["capacity"]["storage"] = json!("1Mi");
            }
            apply(&pvs, manifest).await;
            apply(&pvcs, claim(claim_name, Some(pv), false)).await;
        }
        region(env, &r).await;
        env.start_operator_with(with_movers(env));
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        for name in ["dies", "cut", "small"] {
            apply(&images, captured(name, &r, name)).await;
        }

        // The mover's pod fails before it uploads: its termination message is the reason.
        let job = mover_job(env, &images, &ns, "dies").await;
        fail_mover(env, &job, "could not open /mnt/disk/disk.img: Input/output error (os error 5)").await;
        let failed = env.wait_for(&images, "dies", reason_is("CaptureFailed")).await.unwrap();
        assert_eq!(phase_of(&failed), "Failed");
        assert!(message_of(&failed).contains("failed: could not open /mnt/disk/disk.img: Input/output error"), "{}", message_of(&failed));

        // The mover dies mid-stream: half a body, then the connection closes.
        let job = mover_job(env, &images, &ns, "cut").await;
        let name = job.metadata.name.clone().unwrap();
        let args = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].args.clone().unwrap();
        let url = args[args.iter().position(|a| a == "--url").unwrap() + 1].clone();
        let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
        let token = String::from_utf8(secrets.get(&name).await.unwrap().data.unwrap()["token"].0.clone()).unwrap();
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let mut socket = tokio::net::TcpStream::connect(host).await.unwrap();
        let head = format!("PUT {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Length: 1048576\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut socket, head.as_bytes()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut socket, &vec![9u8; 100_000]).await.unwrap();
        drop(socket);
        let cut = env.wait_for(&images, "cut", reason_is("CaptureFailed")).await.unwrap();
        assert!(message_of(&cut).contains("the upload broke off after 100000 of 1048576 bytes"), "{}", message_of(&cut));

        // More bytes than the claim holds.
        let job = mover_job(env, &images, &ns, "small").await;
        let (code, said) = run_mover(env, &job, &fs_root.join("disk.img"), None).await;
        assert_eq!(code, 1);
        assert!(said.contains("more than PersistentVolumeClaim small holds (1048576 bytes)"), "{said}");
        let small = env.wait_for(&images, "small", reason_is("CaptureFailed")).await.unwrap();
        assert!(message_of(&small).contains("more than PersistentVolumeClaim small holds"), "{}", message_of(&small));

        assert!(support::stored_files(&env.region_dir(&r)).is_empty(), "nothing stored");
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns);
        for image in ["dies", "cut", "small"] {
            let uid = images.get(image).await.unwrap().metadata.uid.unwrap();
            assert!(gone(&jobs, &format!("ims-capture-{uid}-0")).await, "{image}: its Job is deleted");
        }
        remove_volumes(env, &names.iter().map(String::as_str).collect::<Vec<_>>()).await;
    }

    async fn a_backup_restored_by_the_restore_job_is_the_captured_disk_byte_for_byte(env: &Env) {
        if !support::have_qemu_img() {
            return;
        }
        let ns = env.namespace("cap-restore").await;
        let r = format!("{ns}-r");
        let disks = tempfile::tempdir().unwrap();
        let (qcow2, _) = support::qcow2_with_data(disks.path(), 3);
        let pv = format!("{ns}-root");
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        apply(&pvs, volume(&pv, &disks.path().join("disk.qcow2"), true, false, &ns, "root")).await;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &ns);
        apply(&pvcs, claim("root", Some(&pv), true)).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, captured("backup", &r, "root")).await;
        let active = env.wait_for(&images, "backup", reason_is("Active")).await.unwrap();
        let location = active.status.unwrap().location.unwrap();

        // The documented restore Job, filled in as its comment says, run as a kubelet would.
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/restore/restore-job.yaml")).unwrap();
        let run_restore = |checksum: &str, target: &std::path::Path| {
            let text = text.replace("@URL@", &location.url).replace("@CHECKSUM@", checksum);
            let job: Job = serde_yaml_ng::Deserializer::from_str(&text)
                .map(|doc| serde_yaml_ng::Value::deserialize(doc).unwrap())
                .find(|doc| doc["kind"].as_str() == Some("Job"))
                .map(|doc| serde_yaml_ng::from_value(doc).unwrap())
                .expect("the example holds a Job");
            let container = job.spec.unwrap().template.spec.unwrap().containers.remove(0);
            let vars: Vec<(String, String)> =
                container.env.unwrap().into_iter().map(|e| (format!("$({})", e.name), e.value.unwrap())).collect();
            let device = &container.volume_devices.unwrap()[0].device_path;
            let mut args = container.args.unwrap();
            for arg in args.iter_mut() {
                for (var, value) in &vars {
                    *arg = arg.replace(var, value);
                }
                if arg == device {
                    *arg = target.display().to_string();
                }
            }
            args.extend(["--termination-log".into(), disks.path().join("log").display().to_string()]);
            let code = std::process::Command::new(env!("CARGO_BIN_EXE_ims-operator")).args(&args).status().unwrap().code();
            (code, std::fs::read_to_string(disks.path().join("log")).unwrap_or_default())
        };
        let restored = disks.path().join("restored-device");
        std::fs::write(&restored, b"").unwrap();
        let (code, said) = tokio::task::block_in_place(|| run_restore(&location.checksum, &restored));
        assert_eq!(code, Some(0), "{said}");
        let bytes = std::fs::read(&restored).unwrap();
        assert_eq!(sha256(&bytes), sha256(&qcow2), "the restored disk is the captured one");
        let same = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(disks.path().join("disk.qcow2"))
            .arg(&restored)
            .status()
            .unwrap();
        assert!(same.success(), "qemu-img compare: the restored disk has the same contents");
        // A checksum that does not match is an error, not a silent restore.
        let wrong = format!("sha256:{}", "0".repeat(64));
        std::fs::write(disks.path().join("other"), b"").unwrap();
        let (code, said) = tokio::task::block_in_place(|| run_restore(&wrong, &disks.path().join("other")));
        assert_eq!(code, Some(1));
        assert!(said.contains(&format!("hash to {}, not {wrong}", location.checksum)), "{said}");
        remove_volumes(env, &[&pv]).await;
    }

    async fn a_stopped_virtual_machine_is_captured_whole_or_one_disk(env: &Env) {
        if !support::have_qemu_img() {
            return;
        }
        let ns = env.namespace("cap-vm").await;
        let r = format!("{ns}-r");
        let disks = tempfile::tempdir().unwrap();
        let (qcow2, _) = support::qcow2_with_data(disks.path(), 2);
        let raw: Vec<u8> = (0..1_500_000u32).map(|i| (i * 17 % 241) as u8).collect();
        std::fs::write(disks.path().join("data.raw"), &raw).unwrap();
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        let (pv_root, pv_data) = (format!("{ns}-root"), format!("{ns}-data"));
        apply(&pvs, volume(&pv_root, &disks.path().join("disk.qcow2"), true, false, &ns, "web-root")).await;
        apply(&pvs, volume(&pv_data, &disks.path().join("data.raw"), true, false, &ns, "web-data")).await;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &ns);
        apply(&pvcs, claim("web-root", Some(&pv_root), true)).await;
        apply(&pvcs, claim("web-data", Some(&pv_data), true)).await;
        let vms: Api<kube::api::DynamicObject> = Api::namespaced_with(
            env.client.clone(),
            &ns,
            &kube::core::ApiResource::from_gvk_with_plural(
                &kube::core::GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"),
                "virtualmachines",
            ),
        );
        // The data disk comes first in the device list; the boot order makes root the System disk.
        apply(&vms, json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "web"},
            "spec": {"runStrategy": "Always", "template": {"spec": {
                "domain": {"devices": {"disks": [
                    {"name": "data", "disk": {"bus": "virtio"}},
                    {"name": "root", "bootOrder": 1, "disk": {"bus": "virtio"}},
                    {"name": "cloudinit", "disk": {"bus": "virtio"}}]}},
                "volumes": [
                    {"name": "root", "persistentVolumeClaim": {"claimName": "web-root"}},
                    {"name": "data", "dataVolume": {"name": "web-data"}},
                    {"name": "cloudinit", "cloudInitNoCloud": {"userData": "#cloud-config"}}]}}}})).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let os = json!({"type": "Linux", "distribution": "Ubuntu", "version": "24.04", "architecture": "x86_64"});
        let server = |name: &str, kind: &str, vm: serde_json::Value| {
            json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
                "spec": {"region": r, "type": kind, "os": os, "source": {"virtualMachine": vm}}})
        };
        apply(&images, server("web-backup", "FullServer", json!({"name": "web"}))).await;
        apply(&images, server("web-data", "DataDisk", json!({"name": "web", "disk": "data"}))).await;
        apply(&images, server("web-nope", "DataDisk", json!({"name": "web", "disk": "nope"}))).await;
        apply(&images, server("no-vm", "SystemDisk", json!({"name": "db"}))).await;
        let waiting = env.wait_for(&images, "web-backup", reason_is("ServerRunning")).await.unwrap();
        assert_eq!(phase_of(&waiting), "Queued");
        assert!(message_of(&waiting).contains("VirtualMachine web is set to run"), "{}", message_of(&waiting));
        let no_vm = env.wait_for(&images, "no-vm", reason_is("VolumeNotFound")).await.unwrap();
        assert!(message_of(&no_vm).contains("VirtualMachine db does not exist"), "{}", message_of(&no_vm));
        assert!(support::stored_files(&env.region_dir(&r)).is_empty(), "nothing moved while it runs");

        // Stopped: every claim disk is captured, the boot disk as System.
        let halted = json!({"spec": {"runStrategy": "Halted"}});
        vms.patch("web", &PatchParams::default(), &Patch::Merge(&halted)).await.unwrap();
        let active = env.wait_for(&images, "web-backup", reason_is("Active")).await.unwrap();
        let status = active.status.unwrap();
        let got: Vec<(String, String)> =
            status.disks.iter().map(|d| (d.role.clone(), d.sha256.clone().unwrap())).collect();
        assert_eq!(got, vec![("System".to_string(), sha256(&qcow2)), ("Data".to_string(), sha256(&raw))]);
        assert_eq!(status.checksum.unwrap().sha256, sha256(&qcow2), "the image's own checksum is its System disk's");
        let data = env.wait_for(&images, "web-data", reason_is("Active")).await.unwrap();
        assert_eq!(data.status.unwrap().checksum.unwrap().sha256, sha256(&raw));
        let nope = env.wait_for(&images, "web-nope", reason_is("CaptureFailed")).await.unwrap();
        assert!(message_of(&nope).contains("has no disk nope on a PersistentVolumeClaim or DataVolume: name one of root, data"), "{}", message_of(&nope));

        // The disk is for DataDisk images only; an ISO cannot come from a server.
        let refused = images
            .patch("bad", &PatchParams::apply("test"), &Patch::Apply(&server("bad", "SystemDisk", json!({"name": "web", "disk": "root"}))))
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("source.virtualMachine.disk names the disk of a DataDisk image"), "{refused}");
        remove_volumes(env, &[&pv_root, &pv_data]).await;
    }

    async fn a_ready_snapshot_is_restored_into_a_temporary_claim_and_captured(env: &Env) {
        let ns = env.namespace("cap-snap").await;
        let r = format!("{ns}-r");
        let disks = tempfile::tempdir().unwrap();
        let raw: Vec<u8> = (0..1_200_000u32).map(|i| (i * 11 % 239) as u8).collect();
        std::fs::write(disks.path().join("restored.raw"), &raw).unwrap();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &ns);
        // The snapshot's source: a block claim (its mode and class go to the restored claim).
        apply(&pvcs, claim("db-root", None, true)).await;
        let snapshots: Api<kube::api::DynamicObject> = Api::namespaced_with(
            env.client.clone(),
            &ns,
            &kube::core::ApiResource::from_gvk_with_plural(
                &kube::core::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
                "volumesnapshots",
            ),
        );
        apply(&snapshots, json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "db-nightly"}, "spec": {"source": {"persistentVolumeClaimName": "db-root"}}})).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let from_snapshot = |name: &str, snapshot: &str| {
            json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
                "spec": {"region": r, "type": "DataDisk", "source": {"volumeSnapshot": {"name": snapshot}}}})
        };
        apply(&images, from_snapshot("db-backup", "db-nightly")).await;
        apply(&images, from_snapshot("nothing", "no-such-snapshot")).await;
        let missing = env.wait_for(&images, "nothing", reason_is("VolumeNotFound")).await.unwrap();
        assert!(message_of(&missing).contains("VolumeSnapshot no-such-snapshot does not exist"), "{}", message_of(&missing));
        let not_ready = env
            .wait_for(&images, "db-backup", |i: Option<&Image>| message_of(i.unwrap()).contains("not ready to use yet"))
            .await
            .unwrap();
        assert_eq!(phase_of(&not_ready), "Queued");

        // Ready: the operator restores it into a claim of its own.
        let ready = json!({"status": {"readyToUse": true, "restoreSize": "1Gi"}});
        snapshots.patch_status("db-nightly", &PatchParams::default(), &Patch::Merge(&ready)).await.unwrap();
        let uid = not_ready.metadata.uid.clone().unwrap();
        let temporary = format!("ims-capture-{uid}");
        let mut restored = None;
        for _ in 0..300 {
            restored = pvcs.get_opt(&temporary).await.unwrap();
            if restored.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let restored = restored.expect("the temporary claim");
        let spec = restored.spec.clone().unwrap();
        let source = spec.data_source.unwrap();
        assert_eq!((source.kind.as_str(), source.name.as_str()), ("VolumeSnapshot", "db-nightly"));
        assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
        let owners = restored.metadata.owner_references.unwrap();
        assert!(owners.iter().any(|o| o.kind == "Image" && o.uid == uid), "{owners:?}");
        // Playing the provisioner: a volume holding the restored bytes, bound to that claim.
        let pv = format!("{ns}-restored");
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        apply(&pvs, volume(&pv, &disks.path().join("restored.raw"), true, false, &ns, &temporary)).await;
        let bind = json!({"spec": {"volumeName": pv}});
        pvcs.patch(&temporary, &PatchParams::default(), &Patch::Merge(&bind)).await.unwrap();
        let active = env.wait_for(&images, "db-backup", reason_is("Active")).await.unwrap();
        assert_eq!(active.status.unwrap().checksum.unwrap().sha256, sha256(&raw));
        // The temporary claim goes when the capture ends.
        let mut deleted = false;
        for _ in 0..300 {
            match pvcs.get_opt(&temporary).await.unwrap() {
                None => deleted = true,
                Some(c) if c.metadata.deletion_timestamp.is_some() => deleted = true,
                Some(_) => {}
            }
            if deleted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(deleted, "the temporary claim is deleted");
        remove_volumes(env, &[&pv]).await;
    }
}
