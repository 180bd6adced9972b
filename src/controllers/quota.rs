//! The quota ledger as the controllers use it: the `default` ImageQuota of each namespace holds
//! one reservation per admitted owned image. Every change goes through [`super::ledger`], which
//! batches a namespace's requests into one compare-and-swap write, so concurrent admissions —
//! across workers, restarts and replicas — never admit more than the limit.

use kube::{Api, ResourceExt};

use super::{Context, Error, ledger::line_of};
use crate::{
    api::{Image, ImageQuota, QUOTA_NAME},
    policy::quota::{Answer, Applicant, Request},
};

pub use super::ledger::MANAGER;

/// Reserves a place for `image` in its region if there is room and no older image of the
/// namespace waits for the same region (oldest first), then takes an import slot (and a
/// cross-region one for a copy from another region). A refused image is re-run by the ledger
/// when its turn can have come.
pub async fn admit(ctx: &Context, image: &Image, cross_region: bool) -> Result<Answer, Error> {
    let applicant = Applicant {
        uid: image.uid().unwrap_or_default(),
        name: image.name_any(),
        region: image.spec.region.clone(),
        line: line_of(image),
        cross_region,
    };
    ask(ctx, image, Request::Admit(applicant)).await
}

async fn ask(ctx: &Context, image: &Image, request: Request) -> Result<Answer, Error> {
    ctx.ledger.ask(&image.namespace().unwrap_or_default(), request).await
}

/// Ends an import: frees its slot and records the bytes stored (0 when it failed). When the
/// bytes would take the region over `imageBytesPerRegion`, records 0 and returns why: the
/// caller removes the bytes and fails the image with `QuotaExceeded`.
pub async fn finish_import(ctx: &Context, image: &Image, bytes: i64) -> Result<Option<String>, Error> {
    let request = Request::Finish { uid: image.uid().unwrap_or_default(), bytes };
    Ok(match ask(ctx, image, request).await? {
        Answer::Finished(exceeded) => exceeded,
        _ => None,
    })
}

/// Releases an image's slot (deletion); a missing ledger or reservation is fine.
pub async fn release(ctx: &Context, image: &Image) -> Result<(), Error> {
    ask(ctx, image, Request::Release { uid: image.uid().unwrap_or_default() }).await.map(|_| ())
}

/// Brings `hard`, `used`, `summary` and `observedGeneration` of a namespace's ledger up to date
/// (after a change of ImageQuota.spec); images waiting for room it now has are re-run.
pub async fn refresh(ctx: &Context, namespace: &str) -> Result<(), Error> {
    ctx.ledger.ask(namespace, Request::Refresh).await.map(|_| ())
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
        let releases = stale.iter().map(|uid| ctx.ledger.ask(namespace, Request::Release { uid: uid.clone() }));
        futures::future::try_join_all(releases).await?;
    }
    Ok(stale.len())
}

/// How often each ledger is checked for reservations of vanished images.
const GARBAGE_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// The ImageQuota controller: keeps each ledger's `hard` and `summary` current when its spec
/// changes (reservations are written by the Image controller through the same ledger), and
/// releases reservations of images that are gone. It runs on spec changes (a new generation)
/// and every [`GARBAGE_EVERY`], not on the ledger's own writes; its cache holds no status.
pub async fn run(ctx: std::sync::Arc<Context>, shutdown: super::Shutdown) {
    use futures::StreamExt;
    use kube::{
        Resource,
        runtime::{Controller, WatchStreamExt, controller::Action, predicates, reflector, watcher},
    };
    let (reader, writer) = reflector::store();
    let specs = watcher::watcher(Api::<ImageQuota>::all(ctx.client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|quota: &mut ImageQuota| {
            quota.status = None;
            quota.meta_mut().managed_fields = None;
        })
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    super::stopping_on(Controller::for_stream(specs, reader), shutdown)
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
