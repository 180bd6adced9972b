//! Capture (`source.volume`): an image made from a PersistentVolumeClaim of its own namespace.
//!
//! Before any byte moves, the claim is resolved: it must exist, be bound to a PersistentVolume
//! whose `claimRef` names it back (a tenant can write any `volumeName` into its own claim, but
//! only an administrator or the binder writes a volume's `claimRef`), and not be a ReadWriteOnce
//! claim mounted by a running pod (`VolumeInUse`: Queued until the pod stops). A claim bound to a
//! `hostPath` or `local` volume is then read in-process (`ims-operator local`, and operators
//! configured so): the volume's path itself for a block claim, `disk.img` at its root for a
//! filesystem claim. The bytes go through the import engine (sha256, format detection from the
//! bytes, the size limit, quota, encryption, nothing left on failure).
//!
//! Answers never tell one tenant about volumes it cannot see: a volume that is missing and a
//! volume bound to another claim get the same message.

use std::path::PathBuf;

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    runtime::controller::Action,
};

use super::{
    Shown, Step, WAITING_RECHECK,
    bytes::{From, Part},
};
use crate::{
    api::{DeclaredFormat, DiskRole, Image, ImagePhase, ImageType, conditions::Reason},
    controllers::Context,
    delivery::upload,
    import::{self, ImportError, Imported},
};

/// A claim of the image's namespace, resolved to what to read; or the step to show instead.
pub(super) async fn resolve(ctx: &Context, image: &Image, claim: &str) -> Result<Part, Step> {
    let namespace = image.namespace().unwrap_or_default();
    let unreadable = |what: &str, e: kube::Error| {
        let message = format!("could not read {what} to capture claim {claim}: {e}; retrying");
        Shown::queued(Reason::Capturing, message, WAITING_RECHECK)
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(pvc) = claims.get_opt(claim).await.map_err(|e| unreadable("the claim", e))? else {
        let message = format!(
            "PersistentVolumeClaim {claim} does not exist in namespace {namespace}: create it, or correct spec.source.volume.claimName; the capture starts when it exists"
        );
        return Err(Shown::queued(Reason::VolumeNotFound, message, WAITING_RECHECK));
    };
    let spec = pvc.spec.as_ref();
    let not_bound = || {
        let message = format!(
            "PersistentVolumeClaim {claim} is not bound to a volume (yet): its spec.volumeName must name a PersistentVolume whose spec.claimRef names the claim; the capture starts when it is"
        );
        Shown::queued(Reason::VolumeNotFound, message, WAITING_RECHECK)
    };
    let Some(volume_name) = spec.and_then(|s| s.volume_name.as_deref()).filter(|v| !v.is_empty()) else {
        return Err(not_bound());
    };
    if let Some(pod) = mounted_by_running_pod(ctx, &namespace, &pvc).await.map_err(|e| unreadable("the pods", e))? {
        let message = format!(
            "PersistentVolumeClaim {claim} is ReadWriteOnce and mounted by the running pod {pod}: stop the pod (or its server) and the capture starts; a disk in use would be captured inconsistent"
        );
        return Err(Shown::queued(Reason::VolumeInUse, message, WAITING_RECHECK));
    }
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(pv) = volumes.get_opt(volume_name).await.map_err(|e| unreadable("the volume", e))? else {
        return Err(not_bound());
    };
    let pv_spec = pv.spec.unwrap_or_default();
    let claimed = pv_spec.claim_ref.as_ref().is_some_and(|r| {
        r.namespace.as_deref() == Some(namespace.as_str())
            && r.name.as_deref() == Some(claim)
            && (r.uid.is_none() || r.uid == pvc.metadata.uid)
    });
    if !claimed {
        return Err(not_bound());
    }
    let block = spec.and_then(|s| s.volume_mode.as_deref()) == Some("Block");
    if !ctx.config.capture_in_process {
        if ctx.config.mover.is_none() {
            let message = "this operator runs no mover Jobs: start it with --mover-image (deploy/ sets IMS_MOVER_IMAGE to its own image)";
            return Err(Shown::step(ImagePhase::Failed, Reason::CaptureFailed, message, Action::await_change()));
        }
        // The volume's capacity (what the device holds); the claim's status repeats it.
        let capacity = pv_spec
            .capacity
            .as_ref()
            .and_then(|c| c.get("storage"))
            .or_else(|| pvc.status.as_ref().and_then(|s| s.capacity.as_ref()).and_then(|c| c.get("storage")));
        let capacity = capacity.and_then(|q| quantity_bytes(&q.0));
        return Ok(Part { role: None, from: From::Upload { claim: claim.to_string(), block, capacity } });
    }
    let Some(root) = pv_spec.host_path.map(|h| h.path).or(pv_spec.local.map(|l| l.path)) else {
        let message = format!(
            "PersistentVolumeClaim {claim} is bound to a volume that is neither hostPath nor local: this operator reads only those, in-process"
        );
        return Err(Shown::step(ImagePhase::Failed, Reason::CaptureFailed, message, Action::await_change()));
    };
    let root = PathBuf::from(root);
    let path = if block { root } else { root.join(DISK_FILE) };
    Ok(Part { role: None, from: From::Volume { claim: claim.to_string(), path, block } })
}

/// The CSI VolumeSnapshot kind a capture reads (`snapshot.storage.k8s.io/v1`).
fn volume_snapshots() -> kube::core::ApiResource {
    let gvk = kube::core::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    kube::core::ApiResource::from_gvk_with_plural(&gvk, "volumesnapshots")
}

/// The temporary claim a VolumeSnapshot of `image` is restored into.
fn restored_claim(image: &Image) -> String {
    format!("ims-capture-{}", image.uid().unwrap_or_default())
}

/// A ready VolumeSnapshot of the image's namespace, restored into a temporary claim (made here
/// when missing: the snapshot's source claim's class, mode and access modes, its
/// `restoreSize`, owned by the Image) and resolved as that claim; or the step to show instead
/// (Queued while the snapshot is not ready or the claim not bound).
pub(super) async fn resolve_snapshot(ctx: &Context, image: &Image, name: &str) -> Result<Part, Step> {
    let namespace = image.namespace().unwrap_or_default();
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(ctx.client.clone(), &namespace, &volume_snapshots());
    let retry = |what: &str, e: kube::Error| {
        let message = format!("could not {what} to capture VolumeSnapshot {name}: {e}; retrying");
        Shown::queued(Reason::Capturing, message, WAITING_RECHECK)
    };
    let found = match api.get_opt(name).await {
        Ok(found) => found,
        // No snapshot support (the kind is not served): the same answer as a missing snapshot.
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => return Err(retry("read it", e)),
    };
    let Some(snapshot) = found else {
        let message = format!(
            "VolumeSnapshot {name} does not exist in namespace {namespace} (snapshot.storage.k8s.io/v1): create it, or correct spec.source.volumeSnapshot.name; the capture starts when it exists"
        );
        return Err(Shown::queued(Reason::VolumeNotFound, message, WAITING_RECHECK));
    };
    let status = &snapshot.data["status"];
    if let Some(error) = status["error"]["message"].as_str() {
        let message = format!("VolumeSnapshot {name} failed: {error}");
        return Err(Shown::step(ImagePhase::Failed, Reason::CaptureFailed, message, Action::await_change()));
    }
    if status["readyToUse"].as_bool() != Some(true) {
        let message = format!("VolumeSnapshot {name} is not ready to use yet: the capture starts when it is");
        return Err(Shown::queued(Reason::Capturing, message, WAITING_RECHECK));
    }
    let claim = restored_claim(image);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    if claims.get_opt(&claim).await.map_err(|e| retry("read its temporary claim", e))?.is_none() {
        let source = snapshot.data["spec"]["source"]["persistentVolumeClaimName"].as_str();
        let source = match source {
            Some(source) => claims.get_opt(source).await.map_err(|e| retry("read its source claim", e))?,
            None => None,
        };
        let spec = source.and_then(|c| c.spec).unwrap_or_default();
        let size = status["restoreSize"].as_str().unwrap_or("1Gi");
        let mut restored = serde_json::json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace, "labels": labels(image), "ownerReferences": [owner(image)]},
            "spec": {
                "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                "volumeMode": spec.volume_mode.unwrap_or_else(|| "Filesystem".into()),
                "resources": {"requests": {"storage": size}},
                "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name},
            },
        });
        if let Some(class) = spec.storage_class_name {
            restored["spec"]["storageClassName"] = class.into();
        }
        let restored: PersistentVolumeClaim = serde_json::from_value(restored).expect("a claim");
        let params = PostParams { field_manager: Some(super::MANAGER.into()), ..Default::default() };
        match claims.create(&params, &restored).await {
            Ok(_) => tracing::info!(claim = %claim, snapshot = name, "restoring the snapshot into a temporary claim"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(retry("create its temporary claim", e)),
        }
    }
    match resolve(ctx, image, &claim).await {
        Ok(part) => Ok(part),
        Err(Step::Show(Shown { phase: ImagePhase::Queued, .. })) => {
            let message = format!(
                "VolumeSnapshot {name} is being restored into the temporary claim {claim}: the capture starts when it is bound"
            );
            Err(Shown::queued(Reason::Capturing, message, WAITING_RECHECK))
        }
        Err(step) => {
            remove_restored(ctx, image).await;
            Err(step)
        }
    }
}

/// Deletes the temporary claim of a snapshot capture, if it is there.
pub(super) async fn remove_restored(ctx: &Context, image: &Image) {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &image.namespace().unwrap_or_default());
    match claims.delete(&restored_claim(image), &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => tracing::warn!(error = %e, "could not delete a snapshot's temporary claim"),
    }
}

/// The KubeVirt VirtualMachine kind a capture reads (`kubevirt.io/v1`).
fn virtual_machines() -> kube::core::ApiResource {
    let gvk = kube::core::GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine");
    kube::core::ApiResource::from_gvk_with_plural(&gvk, "virtualmachines")
}

/// A stopped VirtualMachine of the image's namespace, resolved to the claims of its disks: for a
/// FullServer every PersistentVolumeClaim and DataVolume disk (the boot disk first, as the
/// System disk), for a SystemDisk the boot disk, for a DataDisk the disk `vm.disk`; or the step
/// to show instead.
pub(super) async fn resolve_server(
    ctx: &Context,
    image: &Image,
    vm: &crate::api::VirtualMachineSource,
) -> Result<Vec<Part>, Step> {
    let namespace = image.namespace().unwrap_or_default();
    let name = &vm.name;
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(ctx.client.clone(), &namespace, &virtual_machines());
    let missing = || {
        let message = format!(
            "VirtualMachine {name} does not exist in namespace {namespace} (kubevirt.io/v1): create it, or correct spec.source.virtualMachine.name; the capture starts when it exists"
        );
        Shown::queued(Reason::VolumeNotFound, message, WAITING_RECHECK)
    };
    let found = match api.get_opt(name).await {
        Ok(found) => found,
        // No KubeVirt (the kind is not served): the same answer as a missing machine.
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => {
            let message = format!("could not read VirtualMachine {name}: {e}; retrying");
            return Err(Shown::queued(Reason::Capturing, message, WAITING_RECHECK));
        }
    };
    let Some(found) = found else { return Err(missing()) };
    if let Some(state) = running(&found.data) {
        let message = format!(
            "VirtualMachine {name} is {state}: stop it (virtctl stop {name}, or spec.runStrategy: Halted) and the capture starts; the disks of a running server would be captured inconsistent"
        );
        return Err(Shown::queued(Reason::ServerRunning, message, WAITING_RECHECK));
    }
    let disks = claim_disks(&found.data);
    let failed =
        |message: String| Shown::step(ImagePhase::Failed, Reason::CaptureFailed, message, Action::await_change());
    let chosen: Vec<(Option<DiskRole>, String)> = match (image.spec.r#type, vm.disk.as_deref()) {
        (ImageType::DataDisk, Some(disk)) => match disks.iter().find(|(d, _)| d == disk) {
            Some((_, claim)) => vec![(None, claim.clone())],
            None => {
                return Err(failed(format!(
                    "VirtualMachine {name} has no disk {disk} on a PersistentVolumeClaim or DataVolume: name one of {}",
                    names(&disks)
                )));
            }
        },
        (ImageType::FullServer, _) => disks
            .iter()
            .enumerate()
            .map(|(i, (_, claim))| (Some(if i == 0 { DiskRole::System } else { DiskRole::Data }), claim.clone()))
            .collect(),
        _ => disks.first().map(|(_, claim)| vec![(None, claim.clone())]).unwrap_or_default(),
    };
    if chosen.is_empty() {
        return Err(failed(format!(
            "VirtualMachine {name} has no disk on a PersistentVolumeClaim or DataVolume (containerDisk and cloud-init volumes are not captured)"
        )));
    }
    let mut parts = Vec::with_capacity(chosen.len());
    for (role, claim) in chosen {
        let part = resolve(ctx, image, &claim).await?;
        parts.push(Part { role, ..part });
    }
    Ok(parts)
}

/// How the VirtualMachine `vm` runs, when it is not stopped: its `runStrategy` or `running` asks
/// for it, or its status says it is not `Stopped`.
fn running(vm: &serde_json::Value) -> Option<String> {
    let strategy = vm["spec"]["runStrategy"].as_str();
    if vm["spec"]["running"].as_bool() == Some(true) || matches!(strategy, Some("Always" | "RerunOnFailure")) {
        return Some("set to run".into());
    }
    match vm["status"]["printableStatus"].as_str() {
        None | Some("Stopped") => None,
        Some(status) => Some(format!("not stopped (status {status})")),
    }
}

/// The disks of `vm` that are claims: (disk name, claim name), in device order with the boot
/// disk (lowest `bootOrder`) first. A DataVolume's claim has the DataVolume's name.
fn claim_disks(vm: &serde_json::Value) -> Vec<(String, String)> {
    let template = &vm["spec"]["template"]["spec"];
    let volumes = template["volumes"].as_array().cloned().unwrap_or_default();
    let claim_of = |volume: &str| {
        let v = volumes.iter().find(|v| v["name"].as_str() == Some(volume))?;
        v["persistentVolumeClaim"]["claimName"].as_str().or(v["dataVolume"]["name"].as_str()).map(str::to_string)
    };
    let mut disks: Vec<(u64, String, String)> = template["domain"]["devices"]["disks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|d| {
            let name = d["name"].as_str()?;
            Some((d["bootOrder"].as_u64().unwrap_or(u64::MAX), name.to_string(), claim_of(name)?))
        })
        .collect();
    disks.sort_by_key(|(order, _, _)| *order);
    disks.into_iter().map(|(_, disk, claim)| (disk, claim)).collect()
}

fn names(disks: &[(String, String)]) -> String {
    let names: Vec<&str> = disks.iter().map(|(d, _)| d.as_str()).collect();
    if names.is_empty() { "(none)".into() } else { names.join(", ") }
}

/// The file a filesystem claim holds its disk in (KubeVirt's convention).
pub(super) const DISK_FILE: &str = "disk.img";

/// The running pod (if any) that mounts `pvc`, when the claim is ReadWriteOnce(Pod).
async fn mounted_by_running_pod(
    ctx: &Context,
    namespace: &str,
    pvc: &PersistentVolumeClaim,
) -> Result<Option<String>, kube::Error> {
    let once = pvc
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_ref())
        .is_some_and(|modes| modes.iter().any(|m| m == "ReadWriteOnce" || m == "ReadWriteOncePod"));
    if !once {
        return Ok(None);
    }
    let claim = pvc.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    // Only the running ones, and only when a capture is about to start or waits for the pod.
    let running = pods.list(&ListParams::default().fields("status.phase=Running")).await?;
    // A capture's own mover (of an attempt being replaced) mounts the claim read-only.
    let movers = |pod: &Pod| pod.labels().contains_key(CAPTURE_LABEL);
    Ok(running.items.into_iter().filter(|pod| !movers(pod)).find_map(|pod| {
        let mounts = pod.spec.as_ref().and_then(|s| s.volumes.as_ref()).is_some_and(|volumes| {
            volumes.iter().any(|v| v.persistent_volume_claim.as_ref().is_some_and(|c| c.claim_name == claim))
        });
        mounts.then(|| pod.name_any())
    }))
}

/// Why reading a captured volume failed, for its status: what to change, in the claim's terms
/// (not those of `file://` imports, which the user did not write).
pub(super) fn read_failure(
    claim: &str,
    path: &std::path::Path,
    block: bool,
    error: &crate::fetch::FetchError,
) -> String {
    use crate::fetch::FetchError;
    match error {
        FetchError::FileOpen { source, .. } if source.kind() == std::io::ErrorKind::NotFound && !block => format!(
            "the filesystem of PersistentVolumeClaim {claim} has no {DISK_FILE} at its root ({}): put the disk there, or use a Block claim",
            path.display()
        ),
        FetchError::FileOpen { source, .. } => {
            format!("could not open the volume of PersistentVolumeClaim {claim} ({}): {source}", path.display())
        }
        FetchError::FileRefused { reason, .. } => {
            format!("the volume of PersistentVolumeClaim {claim} cannot be read ({}): {reason}", path.display())
        }
        other => format!("reading the volume of PersistentVolumeClaim {claim}: {other}"),
    }
}

/// A capture through a mover Job: what it reads and what it may store.
pub(super) struct Upload<'a> {
    /// The claim.
    pub claim: &'a str,
    /// Whether it is a block claim.
    pub block: bool,
    /// Its capacity, when it says.
    pub capacity: Option<u64>,
    /// The disk's index (names the Job).
    pub index: usize,
    /// The disk's object name (ends the upload path).
    pub disk: &'a str,
    /// The size limit, bytes.
    pub limit: u64,
    /// The KMS key to encrypt with.
    pub encrypt: Option<&'a str>,
}

/// Where the mover finds its token and the volume.
const TOKEN_DIR: &str = "/var/run/ims-capture";
const DEVICE_PATH: &str = "/dev/ims-disk";
const MOUNT_PATH: &str = "/mnt/disk";
/// The unprivileged user and group the mover runs as.
const MOVER_USER: i64 = 65532;

/// Captures a claim through a mover Job: registers the upload with a new one-time token,
/// creates the Job and then its token Secret (owned by the Image and the Job), and stores what
/// the Job uploads through the import engine; or fails with the Job's termination message.
/// The Job and the Secret are deleted when the capture ends (the Image owns them meanwhile, so
/// deleting it removes them too).
pub(super) async fn upload(
    ctx: &Context,
    image: &Image,
    store: &crate::store::RegionStore,
    object: &object_store::path::Path,
    up: Upload<'_>,
    progress: import::Progress<'_>,
) -> Result<Imported, ImportError> {
    let Some(mover) = ctx.config.mover.as_ref() else {
        return Err(ImportError::Capture("this operator runs no mover Jobs (--mover-image)".into()));
    };
    let namespace = image.namespace().unwrap_or_default();
    let uid = image.uid().unwrap_or_default();
    let name = format!("ims-capture-{uid}-{}", up.index);
    let token = upload::new_token().map_err(|_| ImportError::CaptureRetry("no randomness for a token".into()))?;
    let path = upload::path(&namespace, &image.name_any(), &uid, up.disk);
    let mut waiting = ctx.uploads.expect(path.clone(), &token);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let retry = |what: &str, e: kube::Error| {
        ImportError::CaptureRetry(format!("could not create the mover {what} {name}: {e}"))
    };
    let params = PostParams { field_manager: Some(super::MANAGER.into()), ..Default::default() };
    let spec = mover_job(image, &name, &up, &format!("{}{path}", mover.upload_base_url), mover);
    let job = match jobs.create(&params, &spec).await {
        Ok(job) => job,
        // What an interrupted attempt left (its token is void: the registration is new): only
        // then are two deletes spent.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            remove(&jobs, &secrets, &name).await?;
            jobs.create(&params, &spec).await.map_err(|e| retry("Job", e))?
        }
        Err(e) => return Err(retry("Job", e)),
    };
    let secret = token_secret(image, &job, &name, &token);
    if let Err(e) = secrets.create(&params, &secret).await {
        let _ = remove(&jobs, &secrets, &name).await;
        return Err(retry("Secret", e));
    }
    tracing::info!(job = %name, claim = up.claim, "mover Job created");
    let result = tokio::select! {
        upload = &mut waiting.upload => match upload {
            Ok(upload) => receive(store, object, image, &up, upload, progress).await,
            Err(_) => Err(ImportError::CaptureRetry("the upload registration was withdrawn".into())),
        },
        why = job_failure(&jobs, &pods, &name, ctx.config.progress_every) => Err(ImportError::Capture(why)),
    };
    if let Err(e) = remove(&jobs, &secrets, &name).await {
        tracing::warn!(job = %name, error = %e, "could not remove a mover Job");
    }
    result
}

/// Stores what the mover sends.
async fn receive(
    store: &crate::store::RegionStore,
    object: &object_store::path::Path,
    image: &Image,
    up: &Upload<'_>,
    upload: upload::Upload,
    progress: import::Progress<'_>,
) -> Result<Imported, ImportError> {
    let upload::Upload { length, body, answer } = upload;
    if let Some(capacity) = up.capacity.filter(|c| length > *c) {
        let why = format!(
            "the mover sent {length} bytes, more than PersistentVolumeClaim {} holds ({capacity} bytes): nothing is stored",
            up.claim
        );
        let _ = answer.send(Err(why.clone()));
        return Err(ImportError::Capture(why));
    }
    let request = import::Request {
        url: "upload",
        checksum: None,
        declared: DeclaredFormat::Auto,
        limit: up.limit,
        image_type: Some(image.spec.r#type),
        encrypt: up.encrypt,
    };
    // The body ends early only with an error (see the server): a shorter one is refused too.
    let stream = futures::stream::unfold((body, 0u64), move |(mut body, got)| async move {
        match body.recv().await {
            Some(Ok(chunk)) => {
                let got = got + chunk.len() as u64;
                Some((Ok(chunk), (body, got)))
            }
            Some(Err(why)) => Some((Err(ImportError::Capture(why)), (body, u64::MAX))),
            None if got < length => {
                let why = format!("the upload broke off after {got} of {length} bytes");
                Some((Err(ImportError::Capture(why)), (body, u64::MAX)))
            }
            None => None,
        }
    });
    let result = import::import_stream(store, object, request, Some(length), Box::pin(stream), progress).await;
    let _ = answer.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    result
}

/// Resolves when the mover Job has failed, with why (its pod's termination message); checks
/// every `every`.
async fn job_failure(jobs: &Api<Job>, pods: &Api<Pod>, name: &str, every: std::time::Duration) -> String {
    loop {
        tokio::time::sleep(every).await;
        let job = match jobs.get_opt(name).await {
            Ok(Some(job)) => job,
            Ok(None) => return format!("the mover Job {name} was deleted before it uploaded the volume"),
            Err(_) => continue,
        };
        let status = job.status.unwrap_or_default();
        let failed =
            status.conditions.unwrap_or_default().into_iter().find(|c| c.type_ == "Failed" && c.status == "True");
        if failed.is_none() && status.failed.unwrap_or(0) == 0 {
            continue;
        }
        let listed = pods.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}"))).await;
        let said = listed.ok().and_then(|pods| {
            pods.items.into_iter().find_map(|pod| {
                let statuses = pod.status?.container_statuses?;
                statuses.into_iter().find_map(|c| {
                    let terminated = c.state.and_then(|s| s.terminated).or(c.last_state.and_then(|s| s.terminated))?;
                    terminated.message.map(|m| m.trim().to_string()).filter(|m| !m.is_empty())
                })
            })
        });
        let condition = failed.and_then(|c| c.message).unwrap_or_else(|| "its pod failed".into());
        return match said {
            Some(message) => format!("the mover Job {name} failed: {message}"),
            None => format!("the mover Job {name} failed ({condition})"),
        };
    }
}

/// Deletes the Job (and its pods) and the Secret `name`, if they are there.
async fn remove(jobs: &Api<Job>, secrets: &Api<Secret>, name: &str) -> Result<(), ImportError> {
    let gone = |r: Result<_, kube::Error>| match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(ImportError::CaptureRetry(format!("could not remove the mover Job {name}: {e}"))),
    };
    gone(jobs.delete(name, &DeleteParams::background()).await.map(|_| ()))?;
    gone(secrets.delete(name, &DeleteParams::default()).await.map(|_| ()))
}

fn owner(image: &Image) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "ims.io/v1alpha1",
        "kind": "Image",
        "name": image.name_any(),
        "uid": image.uid().unwrap_or_default(),
        "controller": true,
    })
}

fn labels(image: &Image) -> serde_json::Value {
    serde_json::json!({"app.kubernetes.io/managed-by": "ims-operator", CAPTURE_LABEL: image.name_any()})
}

/// The label of a mover Job and its pod: the Image it captures for.
const CAPTURE_LABEL: &str = "ims.io/capture-of";

/// The mover Job: the operator's image runs `mover`, unprivileged, with the claim read-only
/// and the token Secret mounted; no service account token, no retries, a deadline.
fn mover_job(image: &Image, name: &str, up: &Upload<'_>, url: &str, mover: &crate::controllers::MoverConfig) -> Job {
    let token_file = format!("{TOKEN_DIR}/token");
    let (source_flag, source) =
        if up.block { ("--device", DEVICE_PATH.to_string()) } else { ("--file", format!("{MOUNT_PATH}/{DISK_FILE}")) };
    let mut mounts = vec![serde_json::json!({"name": "token", "mountPath": TOKEN_DIR, "readOnly": true})];
    let mut devices = Vec::new();
    if up.block {
        devices.push(serde_json::json!({"name": "disk", "devicePath": DEVICE_PATH}));
    } else {
        mounts.push(serde_json::json!({"name": "disk", "mountPath": MOUNT_PATH, "readOnly": true}));
    }
    let job = serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": image.namespace(),
            "labels": labels(image),
            "ownerReferences": [owner(image)],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": mover.deadline.as_secs(),
            "template": {
                "metadata": {"labels": labels(image)},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": MOVER_USER,
                        "runAsGroup": MOVER_USER,
                        "fsGroup": MOVER_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "mover",
                        "image": mover.image,
                        "args": ["mover", source_flag, source, "--url", url, "--token-file", token_file],
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                        "securityContext": {
                            "privileged": false,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "terminationMessagePolicy": "File",
                        "volumeMounts": mounts,
                        "volumeDevices": devices,
                    }],
                    "volumes": [
                        {"name": "disk", "persistentVolumeClaim": {"claimName": up.claim, "readOnly": true}},
                        {"name": "token", "secret": {"secretName": name, "defaultMode": 0o440}},
                    ],
                },
            },
        },
    });
    serde_json::from_value(job).expect("the mover Job is a Job")
}

/// The Secret holding the one-time token, owned by the Image (its controller) and the Job.
fn token_secret(image: &Image, job: &Job, name: &str, token: &str) -> Secret {
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": image.namespace(),
            "labels": labels(image),
            "ownerReferences": [
                owner(image),
                {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job.uid().unwrap_or_default()},
            ],
        },
        "type": "Opaque",
        "data": {"token": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, token)},
    });
    serde_json::from_value(secret).expect("the token Secret is a Secret")
}

/// The bytes of a Kubernetes quantity (`10Gi`, `500M`, `1.5Gi`, `1e9`); `None` when it is not one.
fn quantity_bytes(quantity: &str) -> Option<u64> {
    let quantity = quantity.trim();
    let split = quantity.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let scale: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    if let (Ok(n), true) = (number.parse::<u64>(), scale.fract() == 0.0) {
        return n.checked_mul(scale as u64);
    }
    let bytes = number.parse::<f64>().ok()? * scale;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then(|| bytes.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::quantity_bytes;

    #[test]
    fn claim_capacities_read_as_bytes() {
        assert_eq!(quantity_bytes("10Gi"), Some(10 << 30));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(quantity_bytes("4096"), Some(4096));
        assert_eq!(quantity_bytes("1e9"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(quantity_bytes("1Xi"), None);
    }
}
