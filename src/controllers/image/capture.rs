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

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::{Api, ResourceExt, api::ListParams, runtime::controller::Action};

use super::{
    Shown, Step, WAITING_RECHECK,
    bytes::{From, Part},
};
use crate::{
    api::{Image, ImagePhase, conditions::Reason},
    controllers::Context,
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
    if !ctx.config.capture_in_process {
        let message = "this operator cannot capture volumes yet: it reads only claims bound to hostPath or local volumes, in-process, when run as ims-operator local; the mover Job is not built yet";
        return Err(Shown::step(ImagePhase::Failed, Reason::CaptureFailed, message, Action::await_change()));
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
    let Some(root) = pv_spec.host_path.map(|h| h.path).or(pv_spec.local.map(|l| l.path)) else {
        let message = format!(
            "PersistentVolumeClaim {claim} is bound to a volume that is neither hostPath nor local: this operator reads only those, in-process"
        );
        return Err(Shown::step(ImagePhase::Failed, Reason::CaptureFailed, message, Action::await_change()));
    };
    let block = spec.and_then(|s| s.volume_mode.as_deref()) == Some("Block");
    let root = PathBuf::from(root);
    let path = if block { root } else { root.join(DISK_FILE) };
    Ok(Part { role: None, from: From::Volume { claim: claim.to_string(), path, block } })
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
    Ok(running.items.into_iter().find_map(|pod| {
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
