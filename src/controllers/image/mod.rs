//! The Image controller: imports owned images (`source.url`, a FullServer's `source.disks`)
//! into their region's store, binds references (`source.image`), and reports phases and
//! conditions as the API contract says; the finalizer removes the bytes and releases the quota.
//!
//! Copies (`source.copy`) move the bytes of another image of the namespace (see `copy.rs`).
//!
//! An owned image's reconcile decides first (`decide`: wait, fail, or move bytes, from its status,
//! the caches and the rules in [`crate::policy`]), then acts (admission by the quota ledger, the
//! byte move) and writes the outcome once.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        controller::Action,
        finalizer::{Event, finalizer},
        reflector::ObjectRef,
    },
};

mod bytes;
mod capture;
mod copy;
pub mod reference;

use super::{Context, Error, Shutdown, quota, status};
use crate::{
    api::{
        CLEANUP_FINALIZER, Image, ImagePhase, ImageStatus, Lineage,
        conditions::{ConditionType, Reason, find, ready_reason},
    },
    policy::{
        image::{ACTIVE_MESSAGE, active_refusing, visibility_refusal, with_phase},
        marketplace,
        quota::Answer,
    },
    store::RegionStore,
};

/// Field manager of Image status.
pub const MANAGER: &str = "ims-operator/image";
/// A waiting image (region, quota, import slot) is re-run by the Region watch and by the quota
/// ledger; this re-check covers an image that entered the cache after such an event, and one
/// waiting behind older images in line (which may end without asking the ledger).
const WAITING_RECHECK: Duration = Duration::from_secs(10);
/// A backstop for an image the ledger wakes (a full region, no import slot).
const LEDGER_RECHECK: Duration = Duration::from_secs(300);

/// Runs the Image controller until shutdown.
pub async fn run(
    ctx: Arc<Context>,
    triggers: futures::channel::mpsc::UnboundedReceiver<ObjectRef<Image>>,
    shutdown: Shutdown,
) {
    // A Region change re-runs its images through `triggers`, sent by the shared Region watch
    // once its cache has the change (a watch of its own could run them on a stale cache); the
    // quota ledger sends those waiting for room or a slot when their turn can have come.
    super::controller(ctx.images.clone(), shutdown)
        .reconcile_on(triggers)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[tracing::instrument(skip_all, fields(image = %image.name_any(), namespace = ?image.namespace()))]
async fn reconcile(image: Arc<Image>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.config.metrics.reconcile("image");
    let Some(namespace) = image.namespace() else { return Ok(Action::await_change()) };
    let key = format!("{namespace}/{}", image.name_any());
    let api: Api<Image> = Api::namespaced(ctx.client.clone(), &namespace);
    if image.spec.source.image.is_some() && !image.finalizers().iter().any(|f| f == CLEANUP_FINALIZER) {
        // A reference holds no bytes and no quota: nothing to clean up, so no finalizer (one
        // write fewer per reference). One that has it from an older version is cleaned up below.
        if image.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        return apply(image, &ctx, &api).await.inspect(|_| ctx.backoff.reset(&key));
    }
    let outcome = finalizer(&api, CLEANUP_FINALIZER, image, |event| async {
        match event {
            Event::Apply(image) => apply(image, &ctx, &api).await,
            Event::Cleanup(image) => cleanup(image, &ctx, &api).await,
        }
    })
    .await;
    super::error::finalizer_outcome(outcome).inspect(|_| ctx.backoff.reset(&key))
}

async fn write(ctx: &Context, api: &Api<Image>, image: &Image, desired: &ImageStatus) -> Result<(), Error> {
    // An Active image's locations are capabilities on the image server, of this image's uid.
    let desired = crate::delivery::locations(ctx.delivery.as_ref(), image, desired.clone());
    announce(ctx, image, &desired).await;
    status::apply_status(api, &image.name_any(), MANAGER, image.status.as_ref(), &desired).await?;
    Ok(())
}

/// An Event for a transition a person should see (admitted, active, failed, over quota),
/// published only when the phase or reason changes, so requeues make no event storm.
async fn announce(ctx: &Context, image: &Image, desired: &ImageStatus) {
    // The headline: the phase, and the Stalled reason if any (what was refused), else Ready's.
    let headline = |s: Option<&ImageStatus>| {
        let s = s?;
        let stalled = find(&s.conditions, ConditionType::Stalled).map(|c| c.reason.as_str());
        stalled.or(ready_reason(&s.conditions)).map(|r| (s.phase, r.to_string(), stalled.is_some()))
    };
    let now = headline(Some(desired));
    if now == headline(image.status.as_ref()) {
        return;
    }
    let Some((phase, reason, stalled)) = now else { return };
    let warning = stalled
        || matches!(phase, Some(ImagePhase::Failed | ImagePhase::Unavailable))
        || reason == Reason::QuotaExceeded;
    if !warning && image.spec.source.image.is_some() {
        // A reference binding is no news (10,000 of them would be 10,000 Events): only what
        // goes wrong with it is.
        return;
    }
    let note = desired.message.as_deref().unwrap_or_default();
    ctx.publish_event(&image.object_ref(&()), warning, reason, note, "Reconcile").await;
}

async fn apply(image: Arc<Image>, ctx: &Context, api: &Api<Image>) -> Result<Action, Error> {
    if let Some(target) = image.spec.source.image.clone() {
        return reference::apply(image, &target, ctx, api).await;
    }
    let Some(work) = Work::of(&image) else { return Ok(Action::await_change()) };
    // The cache may lag our own last status write (a reconcile queued by it sees the phase
    // before it); never start byte work from a stale view: decide on a fresh read.
    let settled = matches!(image.status.as_ref().and_then(|s| s.phase), Some(ImagePhase::Active))
        || image
            .status
            .as_ref()
            .is_some_and(|s| s.phase == Some(ImagePhase::Failed) && s.observed_generation == image.metadata.generation);
    let image = if settled {
        image
    } else {
        match api.get_opt(&image.name_any()).await? {
            Some(fresh) => Arc::new(fresh),
            None => return Ok(Action::await_change()),
        }
    };
    match decide(ctx, &image, work).await {
        Step::Idle => Ok(Action::await_change()),
        Step::Show(shown) => {
            write(ctx, api, &image, &shown.status(&image)).await?;
            Ok(shown.then)
        }
        Step::Move(job) => start(ctx, api, &image, *job).await,
    }
}

/// What an owned image does next.
enum Step {
    /// Nothing (no bytes to move, or its namespace is going).
    Idle,
    /// Shows a phase and waits.
    Show(Shown),
    /// Asks for admission, then moves bytes.
    Move(Box<Move>),
}

/// A phase to show, with its reason and message, and when to look again.
struct Shown {
    phase: ImagePhase,
    reason: Reason,
    message: String,
    then: Action,
}

impl Shown {
    fn step(phase: ImagePhase, reason: Reason, message: impl Into<String>, then: Action) -> Step {
        Step::Show(Shown { phase, reason, message: message.into(), then })
    }

    /// Waits in `Queued` (re-run by the Region watch, the ledger, or the re-check).
    fn queued(reason: Reason, message: impl Into<String>, recheck: Duration) -> Step {
        Shown::step(ImagePhase::Queued, reason, message, Action::requeue(recheck))
    }

    fn status(&self, image: &Image) -> ImageStatus {
        let old = image.status.clone().unwrap_or_default();
        let (generation, now) = (image.metadata.generation, status::now());
        match (self.phase, self.reason) {
            // Active with another reason: an Active image refusing a change of its spec.
            (ImagePhase::Active, reason) if reason != Reason::Active => {
                active_refusing(&old, generation, reason, &self.message, &now)
            }
            _ => with_phase(&old, generation, self.phase, self.reason, &self.message, &now),
        }
    }
}

/// Bytes to move into `store` once admitted.
struct Move {
    store: RegionStore,
    parts: Vec<bytes::Part>,
    cross_region: bool,
    reason: Reason,
    message: String,
    lineage: Option<Lineage>,
    known_total: Option<u64>,
    limit_gib: u64,
}

impl Move {
    /// New bytes (an import or a capture) into the image's own region.
    fn into_region(store: RegionStore, parts: Vec<bytes::Part>, reason: Reason, limit_gib: u64) -> Step {
        let message = bytes::saving_message(&parts);
        let (cross_region, lineage, known_total) = (false, None, None);
        Step::Move(Box::new(Move { store, parts, cross_region, reason, message, lineage, known_total, limit_gib }))
    }
}

/// Decides what an owned image does, from its status, the caches and the rules: no API writes.
async fn decide(ctx: &Context, image: &Image, work: Work) -> Step {
    let namespace = image.namespace().unwrap_or_default();
    let old = image.status.clone().unwrap_or_default();
    if old.phase != Some(ImagePhase::Active) && ctx.terminating(&namespace) {
        // Its namespace is being deleted, and the image with it: no admission (its ledger may
        // be gone already, and nothing new can be made there), no bytes.
        return Step::Idle;
    }
    let refused = |bound| visibility_refusal(image.spec.visibility, &namespace, &ctx.config.public_namespace, bound);
    match old.phase {
        // An Active image cannot become Public outside the platform namespace, nor Public or
        // Marketplace with another tenant's Marketplace bytes: it stays the Private image it was
        // (shares and references treat it so), and says why.
        // Bytes are immutable once Active: later spec changes only move observedGeneration. An
        // encrypted image is Active while its KMS key opens its data keys.
        Some(ImagePhase::Active) => {
            if let Some(refusal) = refused(marketplace::inherited(image)) {
                let then = Action::requeue(Duration::from_secs(3600));
                return Shown::step(ImagePhase::Active, Reason::VisibilityNotAllowed, refusal.message(true), then);
            }
            if image.spec.encryption.is_some() {
                if let Some(unavailable) = key_unavailable(ctx, image).await {
                    return Shown::step(ImagePhase::Unavailable, Reason::KeyUnavailable, unavailable, key_recheck());
                }
                return Shown::step(ImagePhase::Active, Reason::Active, ACTIVE_MESSAGE, key_recheck());
            }
            return Shown::step(
                ImagePhase::Active,
                Reason::Active,
                ACTIVE_MESSAGE,
                Action::requeue(Duration::from_secs(3600)),
            );
        }
        // Its key went: Active again once it is back (the bytes never left).
        Some(ImagePhase::Unavailable) if image.spec.encryption.is_some() => {
            return match key_unavailable(ctx, image).await {
                Some(unavailable) => {
                    Shown::step(ImagePhase::Unavailable, Reason::KeyUnavailable, unavailable, key_recheck())
                }
                None => Shown::step(ImagePhase::Active, Reason::Active, ACTIVE_MESSAGE, key_recheck()),
            };
        }
        // Failed for good until the spec changes; but for a missing KMS key, which comes back
        // without one (the local keys' watch re-runs encrypted images when they change).
        Some(ImagePhase::Failed)
            if old.observed_generation == image.metadata.generation
                && (ready_reason(&old.conditions) != Some(Reason::KeyUnavailable.as_str())
                    || !key_back(ctx, image).await) =>
        {
            return Step::Idle;
        }
        _ => {}
    }
    if let Some(refusal) = refused(None) {
        return Shown::step(
            ImagePhase::Failed,
            Reason::VisibilityNotAllowed,
            refusal.message(false),
            Action::await_change(),
        );
    }
    let region_name = &image.spec.region;
    let Some(region) = ctx.regions.get(&ObjectRef::new(region_name)) else {
        let message = format!("Region {region_name} does not exist: create it, or correct spec.region");
        return Shown::queued(Reason::RegionNotFound, message, WAITING_RECHECK);
    };
    if region.metadata.deletion_timestamp.is_some() {
        let message = format!(
            "Region {region_name} is being deleted: nothing new is stored there; correct spec.region (a new Image) to use another region"
        );
        return Shown::queued(Reason::RegionNotReady, message, WAITING_RECHECK);
    }
    let Some(store) = ctx.ready_store(region_name).await else {
        let message = format!("Region {region_name} is not Ready; the import starts when it is");
        return Shown::queued(Reason::RegionNotReady, message, WAITING_RECHECK);
    };
    let limit_gib = max_image_gib(ctx.config.policy.max_image_size_gib, region.spec.max_image_size_gib);
    match work {
        Work::Import(parts) => Move::into_region(store, parts, Reason::Importing, limit_gib),
        Work::Capture(claim) => match capture::resolve(ctx, image, &claim).await {
            Err(step) => step,
            Ok(part) => Move::into_region(store, vec![part], Reason::Capturing, limit_gib),
        },
        Work::CaptureSnapshot(snapshot) => match capture::resolve_snapshot(ctx, image, &snapshot).await {
            Err(step) => step,
            Ok(part) => Move::into_region(store, vec![part], Reason::Capturing, limit_gib),
        },
        Work::CaptureServer(vm) => match capture::resolve_server(ctx, image, &vm).await {
            Err(step) => step,
            Ok(parts) => Move::into_region(store, parts, Reason::Capturing, limit_gib),
        },
        // The copy rules first, then the bytes of the image the copy names.
        Work::Copy(source) => match copy::plan(ctx, image, &source) {
            Err((phase, reason, message)) => {
                let then = match phase {
                    ImagePhase::Failed => Action::await_change(),
                    _ => Action::requeue(WAITING_RECHECK),
                };
                Shown::step(phase, reason, message, then)
            }
            Ok(plan) => {
                // The terms of the bytes it copies bind its visibility before anything moves.
                if let Some(refusal) = refused(plan.lineage.marketplace.as_ref()) {
                    let message = refusal.message(false);
                    return Shown::step(
                        ImagePhase::Failed,
                        Reason::VisibilityNotAllowed,
                        message,
                        Action::await_change(),
                    );
                }
                let Some(from) = ctx.ready_store(&plan.from_region).await else {
                    let message =
                        format!("the source's Region {} is not Ready; the copy starts when it is", plan.from_region);
                    return Shown::queued(Reason::RegionNotReady, message, WAITING_RECHECK);
                };
                Step::Move(Box::new(Move {
                    store,
                    parts: plan.parts(&from),
                    cross_region: plan.cross_region,
                    reason: Reason::Copying,
                    message: plan.message(&source),
                    lineage: Some(plan.lineage.clone()),
                    known_total: Some(plan.total()),
                    limit_gib,
                }))
            }
        },
    }
}

/// How often an encrypted image's KMS key is checked (besides every change of the local keys).
const KEY_RECHECK: Duration = Duration::from_secs(300);

fn key_recheck() -> Action {
    Action::requeue(KEY_RECHECK)
}

/// Why the stored data keys of an encrypted image with stored bytes do not open now, if they
/// do not: the KMS key is missing, disabled or refused. A KMS that does not answer, or a store
/// that cannot be read, says nothing (the image stays as it is).
async fn key_unavailable(ctx: &Context, image: &Image) -> Option<String> {
    let status = image.status.as_ref()?;
    let store = ctx.open_store(&image.spec.region).await?;
    let prefix =
        store.image_prefix(&image.namespace().unwrap_or_default(), &image.name_any(), &image.uid().unwrap_or_default());
    let objects: Vec<String> = match status.disks.as_slice() {
        [] => vec!["disk".into()],
        disks => disks.iter().map(|d| format!("disk-{}", d.index)).collect(),
    };
    for object in objects {
        match crate::crypt::open_uncached(&store, &prefix.clone().join(object.as_str())).await {
            Err(e) if e.key_unavailable() => {
                return Some(format!("{e}; the image is not served until its key is back, and is Active again then"));
            }
            Err(e) => tracing::debug!(error = %e, "cannot check an encrypted image's key now"),
            Ok(_) => {}
        }
    }
    None
}

/// Whether the KMS key of an image that failed for want of it makes data keys now.
async fn key_back(ctx: &Context, image: &Image) -> bool {
    let (Some(encryption), Some(store)) = (&image.spec.encryption, ctx.open_store(&image.spec.region).await) else {
        return false;
    };
    match store.kms() {
        Some(kms) => kms.generate(&encryption.kms_key_id).await.is_ok(),
        None => false,
    }
}

/// The largest image an import stores, GiB: the policy's, lowered by the region's.
fn max_image_gib(policy: u64, region: Option<i64>) -> u64 {
    match region {
        Some(region) if region > 0 => policy.min(region as u64),
        _ => policy,
    }
}

/// What an image the ledger did not admit shows, and when it looks again; `None`: admitted.
fn waiting(answer: Answer, namespace: &str) -> Option<Shown> {
    let (reason, message, recheck) = match answer {
        Answer::Started => return None,
        // A full region: the ledger wakes it when room appears.
        Answer::OverQuota(message) => (Reason::QuotaExceeded, message, LEDGER_RECHECK),
        // Behind older images in line (a burst): those may also end without asking the ledger.
        Answer::InLine(message) => (Reason::QuotaExceeded, message, WAITING_RECHECK),
        Answer::NoCrossRegionSlot { limit } => (
            Reason::Queued,
            slot_message(namespace, "cross-region copies", "concurrentCrossRegionCopies", limit),
            LEDGER_RECHECK,
        ),
        Answer::NoImportSlot { limit } => {
            (Reason::Queued, slot_message(namespace, "imports", "concurrentImports", limit), LEDGER_RECHECK)
        }
        // (Finished and Done answer other requests.)
        Answer::Finished(_) | Answer::Done => (
            Reason::Queued,
            format!("waiting for the quota ledger of namespace {namespace}: it is re-checked shortly"),
            WAITING_RECHECK,
        ),
    };
    Some(Shown { phase: ImagePhase::Queued, reason, message, then: Action::requeue(recheck) })
}

/// What an image waiting for a slot shows: when the limit is 0 nothing can end the wait but
/// raising it, and the message says so.
fn slot_message(namespace: &str, what: &str, field: &str, limit: i64) -> String {
    if limit <= 0 {
        return format!(
            "no {what} may run in namespace {namespace}: {field} is {limit}; raise it in ImageQuota default (spec.{field}) and the image starts"
        );
    }
    format!(
        "waiting for a slot: namespace {namespace} has {limit} {what} in flight, as many as {field} allows; it starts when one finishes"
    )
}

/// Admits the image (a place in its region and an import slot), shows it Saving, moves its
/// bytes and writes the outcome.
async fn start(ctx: &Context, api: &Api<Image>, image: &Image, job: Move) -> Result<Action, Error> {
    let namespace = image.namespace().unwrap_or_default();
    if let Some(shown) = waiting(quota::admit(ctx, image, job.cross_region).await?, &namespace) {
        write(ctx, api, image, &shown.status(image)).await?;
        return Ok(shown.then);
    }
    let old = image.status.clone().unwrap_or_default();
    let generation = image.metadata.generation;
    // A retry after a transient failure keeps showing that failure until the outcome changes,
    // so a retry loop writes nothing.
    let retrying = old.phase == Some(ImagePhase::Saving)
        && ready_reason(&old.conditions).is_some_and(|r| r != job.reason.as_str())
        && old.observed_generation == generation;
    let saving = if retrying {
        old
    } else {
        ImageStatus {
            lineage: job.lineage.clone(),
            ..with_phase(&old, generation, ImagePhase::Saving, job.reason, &job.message, &status::now())
        }
    };
    write(ctx, api, image, &saving).await?;
    let moving = bytes::Job { parts: &job.parts, saving, limit_gib: job.limit_gib, known_total: job.known_total };
    let moved = bytes::move_all(ctx, api, image, &job.store, &moving).await;
    let settled = bytes::settle(ctx, api, image, &job.store, &moving, moved).await;
    if image.spec.source.volume_snapshot.is_some() {
        // The snapshot's temporary claim served its purpose, whatever came of it.
        capture::remove_restored(ctx, image).await;
    }
    settled
}

/// What an owned image's bytes come from.
enum Work {
    /// Imported from URLs.
    Import(Vec<bytes::Part>),
    /// Copied from the image of this name.
    Copy(String),
    /// Captured from the PersistentVolumeClaim of this name.
    Capture(String),
    /// Captured from a VolumeSnapshot of this name (restored into a temporary claim).
    CaptureSnapshot(String),
    /// Captured from the disks of a VirtualMachine.
    CaptureServer(crate::api::VirtualMachineSource),
}

impl Work {
    /// The work of an owned image; `None` when it has no byte source.
    fn of(image: &Image) -> Option<Work> {
        if let Some(volume) = &image.spec.source.volume {
            return Some(Work::Capture(volume.claim_name.clone()));
        }
        if let Some(snapshot) = &image.spec.source.volume_snapshot {
            return Some(Work::CaptureSnapshot(snapshot.name.clone()));
        }
        if let Some(vm) = &image.spec.source.virtual_machine {
            return Some(Work::CaptureServer(vm.clone()));
        }
        match (&image.spec.source.copy, bytes::parts(&image.spec.source)) {
            (Some(copy), _) => Some(Work::Copy(copy.name.clone())),
            (None, Some(parts)) => Some(Work::Import(parts)),
            (None, None) => None,
        }
    }
}

async fn cleanup(image: Arc<Image>, ctx: &Context, api: &Api<Image>) -> Result<Action, Error> {
    let old = image.status.clone().unwrap_or_default();
    if image.spec.protected {
        let message = "deletion is held: spec.protected is true; set it to false to delete the image";
        let held = with_phase(
            &old,
            image.metadata.generation,
            ImagePhase::Deleting,
            Reason::Protected,
            message,
            &status::now(),
        );
        write(ctx, api, &image, &held).await?;
        return Err(Error::Protected(message.into()));
    }
    let namespace = image.namespace().unwrap_or_default();
    // The store is opened if this process has not probed the region yet (it just started or
    // took over): the bytes go with the image, never left behind.
    if let Some(store) = ctx.open_store(&image.spec.region).await {
        let prefix = store.image_prefix(&namespace, &image.name_any(), &image.uid().unwrap_or_default());
        let removed = store.delete_prefix(&prefix).await.map_err(|e| Error::Transient(e.to_string()))?
            + crate::import::sweep_abandoned(&store, &prefix).await.map_err(|e| Error::Transient(e.to_string()))?;
        tracing::info!(objects = removed, "image bytes removed");
    }
    quota::release(ctx, &image).await?;
    Ok(Action::await_change())
}

fn error_policy(image: Arc<Image>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.config.metrics.error("image", err.metric_label());
    tracing::warn!(image = %image.name_any(), error = %err, label = err.metric_label(), "reconcile failed");
    match err {
        Error::Protected(_) => Action::requeue(Duration::from_secs(60)),
        _ => Action::requeue(ctx.backoff.next(&format!(
            "{}/{}",
            image.namespace().unwrap_or_default(),
            image.name_any()
        ))),
    }
}

#[cfg(test)]
mod tests {

    use kube::api::PostParams;
    use serde_json::json;

    use super::*;
    use crate::{
        api::Region,
        store::{RegionStore, StoreConfig},
    };

    /// A wait for a slot says what ends it; with a limit of 0 nothing in flight will, and the
    /// message says to raise the limit instead of "when one finishes".
    #[test]
    fn a_slot_wait_says_what_ends_it() {
        let message = |answer| match waiting(answer, "t") {
            Some(Shown { reason, message, .. }) => (reason, message),
            None => panic!("admitted"),
        };
        let (reason, none) = message(Answer::NoImportSlot { limit: 0 });
        assert_eq!(reason, Reason::Queued);
        assert!(none.contains("concurrentImports is 0") && none.contains("raise it"), "{none}");
        assert!(!none.contains("when one finishes"), "{none}");
        let (_, some) = message(Answer::NoImportSlot { limit: 3 });
        assert!(some.contains("3 imports in flight") && some.contains("when one finishes"), "{some}");
        let (_, copies) = message(Answer::NoCrossRegionSlot { limit: 0 });
        assert!(copies.contains("concurrentCrossRegionCopies is 0"), "{copies}");
        assert!(waiting(Answer::Started, "t").is_none());
    }

    /// An embedded API with namespace `t` and the DataDisk Image `t/i` in it (region `r`).
    async fn an_image() -> (kube::Client, Api<Image>, Image) {
        let (client, _) = crate::controllers::test_api(&["t"]).await;
        let api: Api<Image> = Api::namespaced(client.clone(), "t");
        let image = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "i"},
            "spec": {"region": "r", "type": "DataDisk", "source": {"url": {"url": "https://example.com/d.raw"}}}});
        let image = api.create(&PostParams::default(), &serde_json::from_value(image).unwrap()).await.unwrap();
        (client, api, image)
    }

    /// Reconciles of a cached copy behind the API server's are no failures: the finalizer this
    /// controller added a moment ago is not in the cache yet (the guarded add is refused), or the
    /// image's deletion completed and the cache still shows it deleting (the removal finds it
    /// gone). Both used to fail the reconcile (a warning and a backoff), as busy start-ups and
    /// takeovers in the chaos run showed.
    #[tokio::test]
    async fn a_stale_cached_copy_of_an_image_is_no_failure() {
        let (client, api, cached) = an_image().await;
        let mut live = cached.clone();
        live.metadata.finalizers = Some(vec![CLEANUP_FINALIZER.into()]);
        let live = api.replace("i", &PostParams::default(), &live).await.unwrap();
        let (ctx, _) = Context::for_test(client);
        let ctx = Arc::new(ctx);
        assert!(reconcile(Arc::new(cached), ctx.clone()).await.is_ok(), "the finalizer is there already");

        let mut deleting = live.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
        let mut gone = live;
        gone.metadata.finalizers = None;
        api.replace("i", &PostParams::default(), &gone).await.unwrap();
        api.delete("i", &Default::default()).await.unwrap();
        assert!(api.get_opt("i").await.unwrap().is_none());
        assert!(reconcile(Arc::new(deleting), ctx).await.is_ok(), "its deletion completed already");
    }

    /// An operator that just started (or took over the lease) has not probed the region yet:
    /// deleting an image then still removes its bytes.
    #[tokio::test]
    async fn deleting_an_image_removes_its_bytes_before_the_region_is_probed() {
        let (client, api, image) = an_image().await;
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, mut caches) = Context::for_test(client);
        ctx.config.stores = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: dir.path().into() };
        let region: Region = serde_json::from_value(json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region",
            "metadata": {"name": "r"}, "spec": {"storage": {"url": "file:///var/lib/ims/r"}}}))
        .unwrap();
        caches.regions.apply_watcher_event(&kube::runtime::watcher::Event::Apply(region.clone()));
        // The bytes a previous leader stored.
        let store = RegionStore::open(&region.spec.storage, &ctx.config.stores, None).unwrap();
        let prefix = store.image_prefix("t", "i", &image.uid().unwrap());
        let object = prefix.clone().join("disk");
        object_store::ObjectStoreExt::put(store.object_store(), &object, b"bytes".to_vec().into()).await.unwrap();
        let on_disk = dir.path().join("r/t/i").join(image.uid().unwrap()).join("disk");
        assert!(on_disk.exists());
        assert!(ctx.store("r").is_none(), "not probed by this process");

        cleanup(Arc::new(image), &ctx, &api).await.unwrap();
        assert!(!on_disk.exists(), "the bytes went with the image");
    }
}
