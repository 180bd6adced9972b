//! The ImageCopy controller: checks a copy request, creates the destination Image
//! (`source.copy`, same namespace, labelled with the copy's uid so a restart finds its own
//! destination again) and mirrors the destination's progress. One writer per status: the Image
//! controller moves the bytes; this controller only reads them. Deleting an ImageCopy that has
//! not succeeded cancels it: its destination Image, and with it the partial bytes, go.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, channel::mpsc::UnboundedReceiver};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::{
        controller::Action,
        finalizer::{Event, finalizer},
        reflector::ObjectRef,
    },
};

use super::{Context, Error, Shutdown, status};
use crate::{
    api::{
        CLEANUP_FINALIZER, CopyPhase, CopySource, Image, ImageCopy, ImageCopyStatus, ImagePhase, ImageQuota,
        ImageSource, ImageSpec, Progress, QUOTA_NAME, Visibility,
        conditions::{ConditionType, Progressing, Reason, conditions, find, kstatus, ready_reason},
    },
    policy::{self, quota::limits},
};

/// Field manager of ImageCopy status (and creator of destination Images).
pub const MANAGER: &str = "ims-operator/imagecopy";
/// Label on a destination Image: the uid of the ImageCopy that made it.
pub const COPY_UID_LABEL: &str = "ims.io/copy-uid";
/// Label on a destination Image: the name of the ImageCopy that made it.
pub const COPY_NAME_LABEL: &str = "ims.io/copy";
/// A waiting copy re-checks this often (every change it waits for also re-runs it).
const RECHECK: Duration = Duration::from_secs(10);

/// Runs the ImageCopy controller until shutdown; `triggers` re-run copies whose source or
/// destination Image changed, or that wait for a cross-region slot another copy freed.
pub async fn run(ctx: Arc<Context>, triggers: UnboundedReceiver<ObjectRef<ImageCopy>>, shutdown: Shutdown) {
    super::controller(ctx.copies.clone(), shutdown)
        .reconcile_on(triggers)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

async fn reconcile(copy: Arc<ImageCopy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.config.metrics.reconcile("copy");
    let Some(namespace) = copy.namespace() else { return Ok(Action::await_change()) };
    let api: Api<ImageCopy> = Api::namespaced(ctx.client.clone(), &namespace);
    let outcome = finalizer(&api, CLEANUP_FINALIZER, copy, |event| async {
        match event {
            Event::Apply(copy) => apply(copy, &ctx).await,
            Event::Cleanup(copy) => cancel(copy, &ctx).await,
        }
    })
    .await;
    super::error::finalizer_outcome(outcome)
}

/// Whether a copy is over (Succeeded or Failed).
pub fn finished(copy: &ImageCopy) -> bool {
    matches!(copy.status.as_ref().and_then(|s| s.phase), Some(CopyPhase::Succeeded | CopyPhase::Failed))
}

/// Whether `image` is the destination `copy` made: its labels name the copy's uid, and it copies
/// the copy's source (so its bytes are the source's, verified by the Image controller). Labels
/// alone are not trusted: anyone may write them on an Image that imports other bytes.
fn is_mine(image: &Image, copy: &ImageCopy) -> bool {
    image.labels().get(COPY_UID_LABEL) == copy.metadata.uid.as_ref()
        && image.spec.source.copy.as_ref().is_some_and(|c| c.name == copy.spec.source)
}

/// The status for a phase: Ready True only when Succeeded, Reconciling while Pending/Copying,
/// Stalled when Failed.
fn with_phase(copy: &ImageCopy, phase: CopyPhase, reason: Reason, message: &str) -> ImageCopyStatus {
    let old = copy.status.clone().unwrap_or_default();
    let now = status::now();
    let progress = match phase {
        CopyPhase::Pending | CopyPhase::Copying => Progressing::Working,
        CopyPhase::Failed => Progressing::Stalled,
        CopyPhase::Succeeded => Progressing::Settled,
    };
    let wants = kstatus(phase == CopyPhase::Succeeded, progress, reason, message);
    let started_at = match phase {
        CopyPhase::Pending => old.started_at.clone(),
        _ => old.started_at.clone().or_else(|| Some(now.clone())),
    };
    let completed_at = match phase {
        CopyPhase::Succeeded | CopyPhase::Failed => old.completed_at.clone().or_else(|| Some(now.clone())),
        _ => None,
    };
    ImageCopyStatus {
        phase: Some(phase),
        conditions: conditions(&old.conditions, &wants, copy.metadata.generation, &now),
        observed_generation: copy.metadata.generation,
        started_at,
        completed_at,
        ..old
    }
}

async fn write(ctx: &Context, copy: &ImageCopy, desired: &ImageCopyStatus) -> Result<(), Error> {
    let api: Api<ImageCopy> = Api::namespaced(ctx.client.clone(), &copy.namespace().unwrap_or_default());
    announce(ctx, copy, desired).await;
    status::apply_status(&api, &copy.name_any(), MANAGER, copy.status.as_ref(), desired).await?;
    Ok(())
}

/// An Event when the phase or reason changes.
async fn announce(ctx: &Context, copy: &ImageCopy, desired: &ImageCopyStatus) {
    let key = |s: Option<&ImageCopyStatus>| s.map(|s| (s.phase, ready_reason(&s.conditions).map(str::to_string)));
    if key(Some(desired)) == key(copy.status.as_ref()) {
        return;
    }
    let Some(ready) = find(&desired.conditions, ConditionType::Ready) else { return };
    let warning = desired.phase == Some(CopyPhase::Failed);
    ctx.publish_event(&copy.object_ref(&()), warning, ready.reason.clone(), &ready.message, "Copy").await;
}

/// Why a copy waits or fails before its destination exists: (phase, reason, message).
fn check(ctx: &Context, copy: &ImageCopy, namespace: &str) -> Result<Arc<Image>, (CopyPhase, Reason, String)> {
    let source = &copy.spec.source;
    let dest = &copy.spec.destination;
    let Some(src) = ctx.images.get(&ObjectRef::<Image>::new(source).within(namespace)) else {
        return Err((
            CopyPhase::Pending,
            Reason::SourceNotFound,
            format!("Image {source} does not exist in namespace {namespace}: create it, or correct spec.source"),
        ));
    };
    let refused = |r: policy::copy::Refusal| {
        let phase = if r.waits() { CopyPhase::Pending } else { CopyPhase::Failed };
        (phase, r.copy_reason(), r.message(source))
    };
    if src.status.as_ref().and_then(|s| s.phase) != Some(ImagePhase::Active) {
        return Err(refused(policy::copy::Refusal::SourceNotActive));
    }
    let Some(region) = ctx.regions.get(&ObjectRef::new(&dest.region)) else {
        return Err((
            CopyPhase::Pending,
            Reason::RegionNotFound,
            format!("Region {} does not exist: create it, or correct spec.destination.region", dest.region),
        ));
    };
    if !super::region::is_ready(&region) {
        return Err((
            CopyPhase::Pending,
            Reason::RegionNotReady,
            format!("Region {} is not Ready: the copy starts when it is", dest.region),
        ));
    }
    // A reference's bytes (and encryption) are those of the image it points at.
    let owner = match &src.spec.source.image {
        Some(t) => ctx.images.get(&ObjectRef::<Image>::new(&t.name).within(&t.namespace)).unwrap_or(src.clone()),
        None => src.clone(),
    };
    policy::copy::check(&src, &owner, &dest.region, &ctx.config.policy).map_err(refused)?;
    Ok(src)
}

/// Older unfinished cross-region copies of the namespace that are ahead in line.
fn copies_ahead(ctx: &Context, copy: &ImageCopy, namespace: &str) -> usize {
    let key = |c: &ImageCopy| (c.metadata.creation_timestamp.as_ref().map(|t| t.0), c.name_any());
    let me = key(copy);
    ctx.copies
        .state()
        .iter()
        .filter(|c| c.namespace().as_deref() == Some(namespace) && c.metadata.uid != copy.metadata.uid)
        .filter(|c| c.metadata.deletion_timestamp.is_none() && !finished(c) && key(c) < me)
        .filter(|c| {
            let src = ctx.images.get(&ObjectRef::<Image>::new(&c.spec.source).within(namespace));
            src.is_some_and(|s| s.spec.region != c.spec.destination.region)
        })
        .filter(|c| {
            let status = c.status.clone().unwrap_or_default();
            match status.phase {
                None | Some(CopyPhase::Copying) => true,
                Some(CopyPhase::Pending) => ready_reason(&status.conditions) == Some(Reason::ConcurrencyLimit.as_str()),
                _ => false,
            }
        })
        .count()
}

/// What a cross-region copy waiting for its turn shows: with a limit of 0 no copy ahead
/// will finish and free a place, so the message says that raising the limit is the way.
fn concurrency_message(namespace: &str, ahead: usize, limit: usize) -> String {
    if limit == 0 {
        return format!(
            "no cross-region copies may run in namespace {namespace}: concurrentCrossRegionCopies is 0; raise it in ImageQuota default (spec.concurrentCrossRegionCopies) and the copy starts"
        );
    }
    format!(
        "{ahead} older cross-region copies of namespace {namespace} are in flight or waiting (concurrentCrossRegionCopies {limit}); this one starts when one finishes (first come, first served)"
    )
}

async fn apply(copy: Arc<ImageCopy>, ctx: &Context) -> Result<Action, Error> {
    let namespace = copy.namespace().unwrap_or_default();
    if finished(&copy) {
        // History, like a finished Job: the destination is the user's now.
        return Ok(Action::await_change());
    }
    let dest_name = &copy.spec.destination.name;
    let images: Api<Image> = Api::namespaced(ctx.client.clone(), &namespace);
    let created = copy.status.as_ref().and_then(|s| s.destination_image.as_ref()).is_some();
    let dest = match ctx.images.get(&ObjectRef::<Image>::new(dest_name).within(&namespace)) {
        // The cache can lag the API server: the Image watch may not have delivered the
        // destination this copy just created (its own status write can re-run it first), or a
        // deleted namesake's removal. Ask the API server before a verdict that ends the copy.
        None if created => images.get_opt(dest_name).await?.map(Arc::new),
        Some(dest) if !is_mine(&dest, &copy) => match images.get_opt(dest_name).await? {
            Some(live) => Some(Arc::new(live)),
            None => return Ok(Action::requeue(Duration::from_secs(1))),
        },
        cached => cached,
    };
    match dest {
        Some(dest) if !is_mine(&dest, &copy) => {
            let message = format!(
                "Image {dest_name} already exists and was not made by this copy: choose another spec.destination.name (an ImageCopy is immutable: delete it and create a new one)"
            );
            write(ctx, &copy, &with_phase(&copy, CopyPhase::Failed, Reason::DestinationExists, &message)).await?;
            Ok(Action::await_change())
        }
        Some(dest) => mirror(ctx, &copy, &dest).await,
        None if created => {
            let message = format!("the destination Image {dest_name} was deleted before the copy finished");
            write(ctx, &copy, &with_phase(&copy, CopyPhase::Failed, Reason::DestinationDeleted, &message)).await?;
            Ok(Action::await_change())
        }
        None => {
            let src = match check(ctx, &copy, &namespace) {
                Ok(src) => src,
                Err((phase, reason, message)) => {
                    write(ctx, &copy, &with_phase(&copy, phase, reason, &message)).await?;
                    return Ok(match phase {
                        CopyPhase::Failed => Action::await_change(),
                        _ => Action::requeue(RECHECK),
                    });
                }
            };
            if src.spec.region != copy.spec.destination.region {
                let quotas: Api<ImageQuota> = Api::namespaced(ctx.client.clone(), &namespace);
                let spec = quotas.get_opt(QUOTA_NAME).await?.map(|q| q.spec).unwrap_or_default();
                let limit = limits(&spec, &ctx.config.policy).concurrent_cross_region_copies.max(0) as usize;
                let ahead = copies_ahead(ctx, &copy, &namespace);
                if ahead >= limit {
                    let message = concurrency_message(&namespace, ahead, limit);
                    write(ctx, &copy, &with_phase(&copy, CopyPhase::Pending, Reason::ConcurrencyLimit, &message))
                        .await?;
                    return Ok(Action::requeue(RECHECK));
                }
            }
            let destination = destination(&copy, &src);
            match images
                .create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &destination)
                .await
            {
                Ok(_) => {}
                // Someone took the name meanwhile: the next run tells whose it is.
                Err(kube::Error::Api(s)) if s.code == 409 => return Ok(Action::requeue(Duration::from_secs(1))),
                Err(e) => return Err(e.into()),
            }
            let mut copying = with_phase(
                &copy,
                CopyPhase::Copying,
                Reason::Copying,
                &format!("copying {} to {dest_name}", copy.spec.source),
            );
            copying.destination_image = Some(dest_name.clone());
            write(ctx, &copy, &copying).await?;
            Ok(Action::await_change())
        }
    }
}

/// The destination Image of a copy: the source's description of the image, Private, in the
/// destination region, with the destination's encryption.
fn destination(copy: &ImageCopy, src: &Image) -> Image {
    let status = src.status.clone().unwrap_or_default();
    let dest = &copy.spec.destination;
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(COPY_UID_LABEL.to_string(), copy.uid().unwrap_or_default());
    labels.insert(COPY_NAME_LABEL.to_string(), copy.name_any());
    Image {
        metadata: ObjectMeta { name: Some(dest.name.clone()), labels: Some(labels), ..Default::default() },
        spec: ImageSpec {
            region: dest.region.clone(),
            r#type: status.r#type.unwrap_or(src.spec.r#type),
            visibility: Visibility::Private,
            marketplace: None,
            os: status.os.clone().or_else(|| src.spec.os.clone()),
            min_disk_gib: src.spec.min_disk_gib,
            min_memory_mib: src.spec.min_memory_mib,
            description: dest.description.clone().or_else(|| src.spec.description.clone()),
            server_models: src.spec.server_models.clone(),
            tags: src.spec.tags.clone(),
            encryption: dest.encryption.clone(),
            backup_id: src.spec.backup_id.clone(),
            protected: false,
            source: ImageSource { copy: Some(CopySource { name: copy.spec.source.clone() }), ..Default::default() },
        },
        status: None,
    }
}

/// Mirrors the destination Image into the copy's status.
async fn mirror(ctx: &Context, copy: &ImageCopy, dest: &Image) -> Result<Action, Error> {
    let status = dest.status.clone().unwrap_or_default();
    let ready = find(&status.conditions, ConditionType::Ready);
    // The destination's reason (an Image reason of the contract) is the copy's.
    let reason = ready.and_then(|c| Reason::parse(&c.reason)).unwrap_or(Reason::Copying);
    let message = ready.map(|c| c.message.clone()).unwrap_or_else(|| "the destination Image is being created".into());
    let (phase, reason) = match status.phase {
        Some(ImagePhase::Active) => (CopyPhase::Succeeded, Reason::Succeeded),
        Some(ImagePhase::Failed | ImagePhase::Unavailable) => (CopyPhase::Failed, reason),
        Some(ImagePhase::Queued) if reason != Reason::Queued => (CopyPhase::Pending, reason),
        _ => (CopyPhase::Copying, Reason::Copying),
    };
    let message = match phase {
        CopyPhase::Succeeded => format!("Image {} is Active: the copy is verified", dest.name_any()),
        _ => message,
    };
    let mut desired = with_phase(copy, phase, reason, &message);
    desired.destination_image = Some(dest.name_any());
    desired.progress = match phase {
        CopyPhase::Succeeded => {
            let size = status.size_bytes.unwrap_or(0);
            Some(Progress { bytes_done: size, bytes_total: Some(size), percent: Some(100) })
        }
        _ => status.progress.clone().or(desired.progress),
    };
    write(ctx, copy, &desired).await?;
    Ok(match phase {
        CopyPhase::Succeeded | CopyPhase::Failed => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(60)),
    })
}

/// Deleting a copy that has not succeeded cancels it: its destination goes (the Image's
/// finalizer stops the byte move and removes what landed). After success the destination stays.
async fn cancel(copy: Arc<ImageCopy>, ctx: &Context) -> Result<Action, Error> {
    if copy.status.as_ref().and_then(|s| s.phase) == Some(CopyPhase::Succeeded) {
        return Ok(Action::await_change());
    }
    let namespace = copy.namespace().unwrap_or_default();
    let images: Api<Image> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(dest) = images.get_opt(&copy.spec.destination.name).await?
        && is_mine(&dest, &copy)
        && dest.status.as_ref().and_then(|s| s.phase) != Some(ImagePhase::Active)
        && dest.metadata.deletion_timestamp.is_none()
    {
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions { uid: dest.uid(), resource_version: None }),
            ..Default::default()
        };
        match images.delete(&dest.name_any(), &params).await {
            Ok(_) => tracing::info!(destination = %dest.name_any(), "copy cancelled: destination deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

fn error_policy(copy: Arc<ImageCopy>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.config.metrics.error("copy", err.metric_label());
    tracing::warn!(copy = %copy.name_any(), error = %err, label = err.metric_label(), "reconcile failed");
    let key = format!("copy/{}/{}", copy.namespace().unwrap_or_default(), copy.name_any());
    Action::requeue(ctx.backoff.next(&key).min(Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use kube::api::{Patch, PatchParams};
    use serde_json::json;

    use super::*;

    /// An embedded API server with namespace `t` and its ImageCopy `c` of `src` to `b/dst`.
    async fn setup() -> (kube::Client, Api<ImageCopy>, Api<Image>, ImageCopy) {
        let (client, _) = crate::controllers::test_api(&["t"]).await;
        let copies: Api<ImageCopy> = Api::namespaced(client.clone(), "t");
        let images: Api<Image> = Api::namespaced(client.clone(), "t");
        let copy = json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageCopy", "metadata": {"name": "c"},
            "spec": {"source": "src", "destination": {"region": "b", "name": "dst"}}});
        let copy = copies.create(&PostParams::default(), &serde_json::from_value(copy).unwrap()).await.unwrap();
        (client, copies, images, copy)
    }

    fn ready(copy: &ImageCopy) -> (Option<CopyPhase>, String) {
        let status = copy.status.clone().unwrap_or_default();
        (status.phase, ready_reason(&status.conditions).unwrap_or_default().to_string())
    }

    /// A wait for a cross-region place says what ends it: with a limit of 0 no copy ahead
    /// finishes to free one, and the message says to raise the limit instead.
    #[test]
    fn a_concurrency_wait_says_what_ends_it() {
        let none = concurrency_message("t", 0, 0);
        assert!(none.contains("concurrentCrossRegionCopies is 0") && none.contains("raise it"), "{none}");
        assert!(!none.contains("when one finishes"), "{none}");
        let some = concurrency_message("t", 5, 5);
        assert!(some.starts_with("5 older cross-region copies") && some.contains("when one finishes"), "{some}");
    }

    /// The copy's own status write can re-run it before the Image watch has delivered the
    /// destination it just created: a destination missing from the cache is not yet gone.
    #[tokio::test]
    async fn a_destination_the_cache_has_not_seen_yet_is_not_taken_for_deleted() {
        let (client, copies, images, copy) = setup().await;
        let copying = json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageCopy",
            "status": {"phase": "Copying", "destinationImage": "dst"}});
        let pp = PatchParams::apply(MANAGER).force();
        copies.patch_status("c", &pp, &Patch::Apply(copying)).await.unwrap();
        let dest = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image",
            "metadata": {"name": "dst", "labels": {COPY_UID_LABEL: copy.uid().unwrap()}},
            "spec": {"region": "b", "type": "DataDisk", "source": {"copy": {"name": "src"}}}});
        images.create(&PostParams::default(), &serde_json::from_value(dest).unwrap()).await.unwrap();
        // Empty caches: nothing feeds them in this test.
        let (ctx, _caches) = Context::for_test(client);

        apply(Arc::new(copies.get("c").await.unwrap()), &ctx).await.unwrap();
        assert_eq!(ready(&copies.get("c").await.unwrap()), (Some(CopyPhase::Copying), "Copying".into()));

        // Once the API server says it is gone, it is.
        images.delete("dst", &DeleteParams::default()).await.unwrap();
        apply(Arc::new(copies.get("c").await.unwrap()), &ctx).await.unwrap();
        assert_eq!(ready(&copies.get("c").await.unwrap()), (Some(CopyPhase::Failed), "DestinationDeleted".into()));
    }

    /// A namesake the cache still holds after it was deleted does not refuse a new copy; one
    /// the API server has does.
    #[tokio::test]
    async fn only_a_namesake_the_api_server_has_refuses_a_copy() {
        let (client, copies, images, _) = setup().await;
        let namesake = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "dst"},
            "spec": {"region": "b", "type": "DataDisk", "source": {"url": {"url": "https://example.com/d.raw"}}}});
        let namesake: Image =
            images.create(&PostParams::default(), &serde_json::from_value(namesake).unwrap()).await.unwrap();
        let (ctx, mut caches) = Context::for_test(client);
        caches.images.apply_watcher_event(&kube::runtime::watcher::Event::Apply(namesake));
        images.delete("dst", &DeleteParams::default()).await.unwrap();

        apply(Arc::new(copies.get("c").await.unwrap()), &ctx).await.unwrap();
        assert_eq!(copies.get("c").await.unwrap().status, None, "no verdict on a stale cache");

        let namesake = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "dst"},
            "spec": {"region": "b", "type": "DataDisk", "source": {"url": {"url": "https://example.com/e.raw"}}}});
        images.create(&PostParams::default(), &serde_json::from_value(namesake).unwrap()).await.unwrap();
        apply(Arc::new(copies.get("c").await.unwrap()), &ctx).await.unwrap();
        assert_eq!(ready(&copies.get("c").await.unwrap()), (Some(CopyPhase::Failed), "DestinationExists".into()));
    }

    /// A destination forged by hand with the copy's labels, importing other bytes, is not taken
    /// for the copy's own (it would be reported "verified"): the copy fails DestinationExists.
    #[tokio::test]
    async fn a_forged_destination_with_the_copys_labels_is_not_its_own() {
        let (client, copies, images, copy) = setup().await;
        let forged = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image",
            "metadata": {"name": "dst", "labels": {(COPY_UID_LABEL): copy.uid().unwrap(), (COPY_NAME_LABEL): "c"}},
            "spec": {"region": "b", "type": "DataDisk", "source": {"url": {"url": "https://example.com/other.raw"}}},
            "status": {"phase": "Active"}});
        let forged: Image =
            images.create(&PostParams::default(), &serde_json::from_value(forged).unwrap()).await.unwrap();
        assert!(!is_mine(&forged, &copy));
        let (ctx, mut caches) = Context::for_test(client);
        caches.images.apply_watcher_event(&kube::runtime::watcher::Event::Apply(forged));
        apply(Arc::new(copies.get("c").await.unwrap()), &ctx).await.unwrap();
        assert_eq!(ready(&copies.get("c").await.unwrap()), (Some(CopyPhase::Failed), "DestinationExists".into()));
    }
}
