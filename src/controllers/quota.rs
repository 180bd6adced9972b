//! The quota ledger: the `default` ImageQuota of each namespace holds one reservation per
//! admitted owned image. Every change is a compare-and-swap (a status update carrying the
//! resourceVersion that was read), so concurrent admissions — across workers, restarts and
//! replicas — never admit more than the limit.

use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, PostParams},
};

use super::{Context, Error};
use crate::{
    api::{Image, ImagePhase, ImageQuota, ImageQuotaSpec, QUOTA_NAME, QuotaLimits, Reservation},
    policy::quota::{has_room, images_in, limits, recount},
};

/// Whether an image holds a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The image holds a reservation.
    Admitted,
    /// No room: the message says how full the region is.
    OverQuota(String),
}

const ATTEMPTS: usize = 50;

async fn quota(api: &Api<ImageQuota>) -> Result<ImageQuota, Error> {
    if let Some(q) = api.get_opt(QUOTA_NAME).await? {
        return Ok(q);
    }
    let fresh = ImageQuota {
        metadata: ObjectMeta { name: Some(QUOTA_NAME.into()), ..Default::default() },
        spec: ImageQuotaSpec::default(),
        status: None,
    };
    match api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &fresh).await {
        Ok(q) => Ok(q),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(api.get(QUOTA_NAME).await?),
        Err(e) => Err(e.into()),
    }
}

/// Field manager of the ledger.
pub const MANAGER: &str = "ims-operator/quota";

/// Writes the ledger if nobody changed it since it was read (the resourceVersion in `quota`):
/// true when written, false when the compare-and-swap lost and the caller must re-read.
async fn write(ctx: &Context, api: &Api<ImageQuota>, quota: &ImageQuota) -> Result<bool, Error> {
    let params = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    match api.replace_status(QUOTA_NAME, &params, quota).await {
        Ok(_) => {
            let status = quota.status.clone().unwrap_or_default();
            let hard = status.hard.as_ref().map(|h| h.private_images_per_region).unwrap_or_default();
            let namespace = quota.namespace().unwrap_or_default();
            for used in &status.used {
                ctx.config.metrics.quota(&namespace, &used.region, used.images, hard, used.bytes);
            }
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn waits_for_quota(image: &Image) -> bool {
    image.metadata.deletion_timestamp.is_none()
        && image.spec.source.image.is_none()
        && matches!(image.status.as_ref().and_then(|s| s.phase), None | Some(ImagePhase::Queued))
}

fn line_key(image: &Image) -> (Option<jiff::Timestamp>, String) {
    (image.metadata.creation_timestamp.as_ref().map(|t| t.0), image.name_any())
}

/// Reserves a slot for `image` in its region if there is room and no older image of the
/// namespace waits for the same region (oldest first).
pub async fn admit(ctx: &Context, image: &Image) -> Result<Admission, Error> {
    let namespace = image.namespace().unwrap_or_default();
    let uid = image.uid().unwrap_or_default();
    let api: Api<ImageQuota> = Api::namespaced(ctx.client.clone(), &namespace);
    for _ in 0..ATTEMPTS {
        let mut quota = quota(&api).await?;
        let mut status = quota.status.clone().unwrap_or_default();
        if status.reservations.iter().any(|r| r.uid == uid) {
            return Ok(Admission::Admitted);
        }
        let hard = limits(&quota.spec, &ctx.config.policy);
        let region = &image.spec.region;
        let used = images_in(&status, region);
        let me = line_key(image);
        let ahead = ctx
            .images
            .state()
            .iter()
            .filter(|other| other.namespace().as_deref() == Some(&namespace) && other.spec.region == *region)
            .filter(|other| waits_for_quota(other) && line_key(other) < me)
            .filter(|other| !status.reservations.iter().any(|r| Some(&r.uid) == other.metadata.uid.as_ref()))
            .count() as i64;
        if !has_room(used, ahead, hard.private_images_per_region) {
            let waiting = if ahead > 0 { format!(" and {ahead} older image(s) wait before it") } else { String::new() };
            return Ok(Admission::OverQuota(format!(
                "namespace {namespace} has {used}/{} images in region {region}{waiting}; it is admitted automatically when room appears (oldest first), or raise privateImagesPerRegion in ImageQuota default",
                hard.private_images_per_region
            )));
        }
        status.reservations.push(Reservation {
            uid: uid.clone(),
            name: image.name_any(),
            region: region.clone(),
            bytes: 0,
            importing: false,
            cross_region: false,
        });
        recount(&mut status, hard);
        quota.status = Some(status);
        if write(ctx, &api, &quota).await? {
            return Ok(Admission::Admitted);
        }
    }
    Err(Error::Transient("the quota ledger is busy; retrying".into()))
}

/// Whether an admitted image may move bytes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// It holds an import slot (and a cross-region copy slot if it copies across regions).
    Held,
    /// All `concurrentImports` slots are taken.
    NoImportSlot,
    /// All `concurrentCrossRegionCopies` slots are taken.
    NoCrossRegionSlot,
}

/// Takes an import slot (`concurrentImports` per namespace) for an admitted image, and for a
/// copy from another region also a cross-region slot (`concurrentCrossRegionCopies`): `Held`
/// when the image holds them (also when it already did: a restarted import keeps its slot).
pub async fn start_import(ctx: &Context, image: &Image, cross_region: bool) -> Result<Slot, Error> {
    let namespace = image.namespace().unwrap_or_default();
    let api: Api<ImageQuota> = Api::namespaced(ctx.client.clone(), &namespace);
    for _ in 0..ATTEMPTS {
        let mut quota = quota(&api).await?;
        let mut status = quota.status.clone().unwrap_or_default();
        let hard = limits(&quota.spec, &ctx.config.policy);
        let in_flight = status.reservations.iter().filter(|r| r.importing).count() as i64;
        let copies = status.reservations.iter().filter(|r| r.importing && r.cross_region).count() as i64;
        let Some(mine) = status.reservations.iter_mut().find(|r| Some(&r.uid) == image.metadata.uid.as_ref()) else {
            return Ok(Slot::NoImportSlot);
        };
        if mine.importing {
            return Ok(Slot::Held);
        }
        if cross_region && copies >= hard.concurrent_cross_region_copies {
            return Ok(Slot::NoCrossRegionSlot);
        }
        if in_flight >= hard.concurrent_imports {
            return Ok(Slot::NoImportSlot);
        }
        mine.importing = true;
        mine.cross_region = cross_region;
        recount(&mut status, hard);
        quota.status = Some(status);
        if write(ctx, &api, &quota).await? {
            return Ok(Slot::Held);
        }
    }
    Err(Error::Transient("the quota ledger is busy; retrying".into()))
}

/// Ends an import: frees its slot and records the bytes stored (0 when it failed). When the
/// bytes would take the region over `imageBytesPerRegion`, records 0 and returns why: the
/// caller removes the bytes and fails the image with `QuotaExceeded`.
pub async fn finish_import(ctx: &Context, image: &Image, bytes: i64) -> Result<Option<String>, Error> {
    let exceeded = std::sync::Mutex::new(None);
    let uid = image.metadata.uid.clone();
    update(ctx, image, |reservations, hard| {
        let others: i64 = reservations
            .iter()
            .filter(|r| r.region == image.spec.region && Some(&r.uid) != uid.as_ref())
            .map(|r| r.bytes)
            .sum();
        let limit = hard.image_bytes_per_region.filter(|limit| others.saturating_add(bytes) > *limit);
        if let Some(r) = reservations.iter_mut().find(|r| Some(&r.uid) == uid.as_ref()) {
            r.bytes = if limit.is_some() { 0 } else { bytes };
            r.importing = false;
            r.cross_region = false;
        }
        if let Ok(mut slot) = exceeded.lock() {
            *slot = limit.map(|limit| {
                format!(
                    "the image has {bytes} bytes and the region already holds {others}: more than imageBytesPerRegion {limit}; delete images or raise the limit in ImageQuota default, then re-create this image"
                )
            });
        }
    })
    .await?;
    Ok(exceeded.into_inner().unwrap_or(None))
}

/// Releases an image's slot (deletion); a missing ledger or reservation is fine.
pub async fn release(ctx: &Context, image: &Image) -> Result<(), Error> {
    update(ctx, image, |r, _| r.retain(|r| Some(&r.uid) != image.metadata.uid.as_ref())).await
}

async fn update(
    ctx: &Context,
    image: &Image,
    change: impl Fn(&mut Vec<Reservation>, &QuotaLimits),
) -> Result<(), Error> {
    update_namespace(ctx, &image.namespace().unwrap_or_default(), change).await
}

/// Brings `hard`, `used`, `summary` and `observedGeneration` of a namespace's ledger up to date
/// (after a change of ImageQuota.spec).
pub async fn refresh(ctx: &Context, namespace: &str) -> Result<(), Error> {
    update_namespace(ctx, namespace, |_, _| {}).await
}

async fn update_namespace(
    ctx: &Context,
    namespace: &str,
    change: impl Fn(&mut Vec<Reservation>, &QuotaLimits),
) -> Result<(), Error> {
    let api: Api<ImageQuota> = Api::namespaced(ctx.client.clone(), namespace);
    for _ in 0..ATTEMPTS {
        let Some(mut quota) = api.get_opt(QUOTA_NAME).await? else { return Ok(()) };
        let mut status = quota.status.clone().unwrap_or_default();
        let before = status.clone();
        let hard = limits(&quota.spec, &ctx.config.policy);
        change(&mut status.reservations, &hard);
        recount(&mut status, hard);
        status.observed_generation = quota.metadata.generation;
        if status == before {
            return Ok(());
        }
        quota.status = Some(status);
        if write(ctx, &api, &quota).await? {
            return Ok(());
        }
    }
    Err(Error::Transient("the quota ledger is busy; retrying".into()))
}

/// Removes reservations whose image is gone (deleted without its finalizer running, e.g. a
/// finalizer removed by hand), so the ledger stays equal to a recount. An image missing from
/// the cache is confirmed gone with a GET first: the cache may lag a fresh admission.
pub async fn collect_garbage(ctx: &Context, namespace: &str) -> Result<usize, Error> {
    let api: Api<ImageQuota> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(quota) = api.get_opt(QUOTA_NAME).await? else { return Ok(0) };
    let images: Api<Image> = Api::namespaced(ctx.client.clone(), namespace);
    let mut stale = Vec::new();
    for r in quota.status.iter().flat_map(|s| s.reservations.iter()) {
        let cached = ctx.images.state().iter().any(|i| i.metadata.uid.as_deref() == Some(r.uid.as_str()));
        if cached {
            continue;
        }
        let live = images.get_opt(&r.name).await?;
        if live.and_then(|i| i.metadata.uid).as_deref() != Some(r.uid.as_str()) {
            stale.push(r.uid.clone());
        }
    }
    if !stale.is_empty() {
        tracing::info!(namespace, reservations = stale.len(), "released reservations of images that are gone");
        update_namespace(ctx, namespace, |reservations, _| reservations.retain(|r| !stale.contains(&r.uid))).await?;
    }
    Ok(stale.len())
}

/// How often each ledger is checked for reservations of vanished images.
const GARBAGE_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// The ImageQuota controller: keeps each ledger's `hard` and `summary` current when its spec
/// changes (reservations are written by the Image controller through the same ledger code),
/// and releases reservations of images that are gone.
pub async fn run(ctx: std::sync::Arc<Context>, shutdown: super::Shutdown) {
    use futures::StreamExt;
    use kube::runtime::controller::Action;
    super::controller::<ImageQuota>(&ctx.client, shutdown)
        .run(
            |quota: std::sync::Arc<ImageQuota>, ctx: std::sync::Arc<Context>| async move {
                let _timer = ctx.config.metrics.reconcile("quota");
                match quota.namespace() {
                    Some(namespace) if quota.name_any() == QUOTA_NAME => {
                        refresh(&ctx, &namespace).await?;
                        collect_garbage(&ctx, &namespace).await?;
                        Ok::<_, Error>(Action::requeue(GARBAGE_EVERY))
                    }
                    _ => Ok(Action::await_change()),
                }
            },
            |_quota, err: &Error, ctx: std::sync::Arc<Context>| {
                ctx.config.metrics.error("quota", err.metric_label());
                tracing::warn!(error = %err, label = err.metric_label(), "quota reconcile failed");
                Action::requeue(std::time::Duration::from_secs(5))
            },
            ctx,
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}
