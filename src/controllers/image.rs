//! The Image controller: imports `source.url` images into their region's store and reports
//! phases and conditions as the API contract says; the finalizer removes the bytes.
//!
//! References (`source.image`), copies (`source.copy`), full-server disks and the quota ledger
//! join with their issues; until then those images are left untouched.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        Controller,
        controller::Action,
        finalizer::{Event, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};

use super::{Context, Error, Shutdown, quota, status};
use crate::{
    api::{
        CLEANUP_FINALIZER, Image, ImageChecksum, ImageLocation, ImagePhase, ImageQuota, ImageStatus, Progress, Region,
    },
    import::{self, Request},
    policy::image::{percent, visibility_allowed, with_phase},
};

/// Field manager of Image status.
pub const MANAGER: &str = "ims-operator/image";
const GIB: u64 = 1 << 30;
/// A waiting image (region, quota, import slot) is re-run by the watches on Regions and
/// ImageQuotas; this re-check covers an image that entered the cache after such an event.
const WAITING_RECHECK: Duration = Duration::from_secs(10);

/// Runs the Image controller until shutdown.
pub async fn run(ctx: Arc<Context>, shutdown: Shutdown) {
    let client = ctx.client.clone();
    let images = ctx.images.clone();
    Controller::new(Api::<Image>::all(client.clone()), watcher::Config::default())
        .watches(Api::<Region>::all(client), watcher::Config::default(), move |region: Region| {
            let name = region.name_any();
            images
                .state()
                .iter()
                .filter(|i| i.spec.region == name)
                .map(|i| ObjectRef::from_obj(i.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches(Api::<ImageQuota>::all(ctx.client.clone()), watcher::Config::default(), {
            let images = ctx.images.clone();
            move |quota: ImageQuota| {
                let namespace = quota.namespace();
                images
                    .state()
                    .iter()
                    .filter(|i| i.namespace() == namespace)
                    .filter(|i| i.status.as_ref().and_then(|s| s.phase) == Some(ImagePhase::Queued))
                    .map(|i| ObjectRef::from_obj(i.as_ref()))
                    .collect::<Vec<_>>()
            }
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[tracing::instrument(skip_all, fields(image = %image.name_any(), namespace = ?image.namespace()))]
async fn reconcile(image: Arc<Image>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(namespace) = image.namespace() else { return Ok(Action::await_change()) };
    let api: Api<Image> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, CLEANUP_FINALIZER, image, |event| async {
        match event {
            Event::Apply(image) => apply(image, &ctx, &api).await,
            Event::Cleanup(image) => cleanup(image, &ctx, &api).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn write(ctx: &Context, api: &Api<Image>, image: &Image, desired: &ImageStatus) -> Result<(), Error> {
    announce(ctx, image, desired).await;
    status::apply_status(api, &image.name_any(), MANAGER, image.status.as_ref(), desired).await?;
    Ok(())
}

/// An Event for a transition a person should see (admitted, active, failed, over quota),
/// published only when the phase or reason changes, so requeues make no event storm.
async fn announce(ctx: &Context, image: &Image, desired: &ImageStatus) {
    let ready = |s: Option<&ImageStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| (s.and_then(|s| s.phase), c.reason.clone()))
    };
    let now = ready(Some(desired));
    if now == ready(image.status.as_ref()) {
        return;
    }
    let Some((phase, reason)) = now else { return };
    let warning = matches!(phase, Some(ImagePhase::Failed)) || reason == "QuotaExceeded";
    let event = kube::runtime::events::Event {
        type_: if warning {
            kube::runtime::events::EventType::Warning
        } else {
            kube::runtime::events::EventType::Normal
        },
        reason,
        note: desired.message.clone().map(|m| m.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &image.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

async fn apply(image: Arc<Image>, ctx: &Context, api: &Api<Image>) -> Result<Action, Error> {
    let Some(source) = image.spec.source.url.clone() else {
        return Ok(Action::await_change());
    };
    // The cache may lag our own last status write (a reconcile queued by it sees the phase
    // before it); never start byte work from a stale view: decide on a fresh read.
    let cached_done = matches!(image.status.as_ref().and_then(|s| s.phase), Some(ImagePhase::Active))
        || image
            .status
            .as_ref()
            .is_some_and(|s| s.phase == Some(ImagePhase::Failed) && s.observed_generation == image.metadata.generation);
    let image = if cached_done {
        image
    } else {
        match api.get_opt(&image.name_any()).await? {
            Some(fresh) => Arc::new(fresh),
            None => return Ok(Action::await_change()),
        }
    };
    let namespace = image.namespace().unwrap_or_default();
    let generation = image.metadata.generation;
    let old = image.status.clone().unwrap_or_default();
    let now = status::now();
    match old.phase {
        // Bytes are immutable once Active: later spec changes only move observedGeneration.
        Some(ImagePhase::Active) => {
            let desired = with_phase(&old, generation, ImagePhase::Active, "Active", "the image is ready to use", &now);
            write(ctx, api, &image, &desired).await?;
            return Ok(Action::requeue(Duration::from_secs(3600)));
        }
        Some(ImagePhase::Failed) if old.observed_generation == generation => return Ok(Action::await_change()),
        _ => {}
    }
    if !visibility_allowed(image.spec.visibility, &namespace, &ctx.config.public_namespace) {
        let message = format!(
            "visibility Public is only allowed in the platform namespace {}: use Private or Marketplace",
            ctx.config.public_namespace
        );
        write(
            ctx,
            api,
            &image,
            &with_phase(&old, generation, ImagePhase::Failed, "VisibilityNotAllowed", &message, &now),
        )
        .await?;
        return Ok(Action::await_change());
    }
    let region_name = &image.spec.region;
    let Some(region) = ctx.regions.get(&ObjectRef::new(region_name)) else {
        let message = format!("Region {region_name} does not exist: create it, or correct spec.region");
        write(ctx, api, &image, &with_phase(&old, generation, ImagePhase::Queued, "RegionNotFound", &message, &now))
            .await?;
        return Ok(Action::requeue(WAITING_RECHECK));
    };
    let ready =
        region.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let Some(store) = ctx.store(region_name).filter(|_| ready) else {
        let message = format!("Region {region_name} is not Ready; the import starts when it is");
        write(ctx, api, &image, &with_phase(&old, generation, ImagePhase::Queued, "RegionNotReady", &message, &now))
            .await?;
        return Ok(Action::requeue(WAITING_RECHECK));
    };
    if let quota::Admission::OverQuota(message) = quota::admit(ctx, &image).await? {
        write(ctx, api, &image, &with_phase(&old, generation, ImagePhase::Queued, "QuotaExceeded", &message, &now))
            .await?;
        return Ok(Action::requeue(WAITING_RECHECK));
    }
    if !quota::start_import(ctx, &image).await? {
        let message = format!(
            "waiting for an import slot: namespace {namespace} has as many imports in flight as concurrentImports allows; it starts when one finishes"
        );
        write(ctx, api, &image, &with_phase(&old, generation, ImagePhase::Queued, "Queued", &message, &now)).await?;
        return Ok(Action::requeue(WAITING_RECHECK));
    }
    let limit_gib = match region.spec.max_image_size_gib {
        Some(region_limit) if region_limit > 0 => ctx.config.policy.max_image_size_gib.min(region_limit as u64),
        _ => ctx.config.policy.max_image_size_gib,
    };
    // A retry after a transient failure keeps showing that failure until the outcome changes,
    // so a retry loop writes nothing.
    let retrying = old.phase == Some(ImagePhase::Saving)
        && old.conditions.iter().any(|c| c.type_ == "Ready" && c.reason != "Importing")
        && old.observed_generation == generation;
    let saving = if retrying {
        old.clone()
    } else {
        with_phase(
            &old,
            generation,
            ImagePhase::Saving,
            "Importing",
            &format!("importing {}", redact(&source.url)),
            &now,
        )
    };
    write(ctx, api, &image, &saving).await?;

    // Progress goes through a channel; a writer task patches it at most every progress_every.
    let (tx, mut rx) = tokio::sync::watch::channel::<Option<(u64, Option<u64>)>>(None);
    let progress_writer = {
        let api = api.clone();
        let name = image.name_any();
        let base = saving.clone();
        let every = ctx.config.progress_every;
        tokio::spawn(async move {
            let mut written = base.clone();
            while rx.changed().await.is_ok() {
                let Some((done, total)) = *rx.borrow_and_update() else { continue };
                let mut next = base.clone();
                next.progress = Some(Progress {
                    bytes_done: done as i64,
                    bytes_total: total.map(|t| t as i64),
                    percent: percent(done, total),
                });
                if status::apply_status(&api, &name, MANAGER, Some(&written), &next).await.is_ok() {
                    written = next;
                }
                tokio::time::sleep(every).await;
            }
        })
    };
    let object = store.image_prefix(&namespace, &image.name_any(), &image.uid().unwrap_or_default()).join("disk");
    let mut report = move |done: u64, total: Option<u64>| {
        let _ = tx.send(Some((done, total)));
    };
    let result = import::import(
        &store,
        &object,
        Request {
            url: &source.url,
            checksum: source.checksum.as_deref(),
            declared: source.format,
            limit: limit_gib.saturating_mul(GIB),
        },
        &ctx.config.fetch,
        import::Progress { every: ctx.config.progress_every, report: &mut report },
    )
    .await;
    drop(report);
    let _ = progress_writer.await;
    let now = status::now();
    match result {
        Ok(imported) => {
            let size = imported.size as i64;
            if let Some(message) = quota::finish_import(ctx, &image, size).await? {
                let prefix = store.image_prefix(&namespace, &image.name_any(), &image.uid().unwrap_or_default());
                store.delete_prefix(&prefix).await.map_err(|e| Error::Transient(e.to_string()))?;
                let failed = ImageStatus {
                    progress: None,
                    ..with_phase(&saving, generation, ImagePhase::Failed, "QuotaExceeded", &message, &now)
                };
                write(ctx, api, &image, &failed).await?;
                return Ok(Action::await_change());
            }
            let mut active =
                with_phase(&saving, generation, ImagePhase::Active, "Active", "the image is ready to use", &now);
            active.format = Some(imported.detected.format.as_api_str().to_string());
            active.size_bytes = Some(size);
            active.virtual_size_bytes = Some(imported.detected.virtual_size as i64);
            active.checksum = Some(ImageChecksum { sha256: imported.sha256.clone() });
            active.location = Some(ImageLocation {
                url: store.object_url(&imported.object),
                checksum: format!("sha256:{}", imported.sha256),
                format: imported.detected.format.lowercase().to_string(),
            });
            active.progress = Some(Progress { bytes_done: size, bytes_total: Some(size), percent: Some(100) });
            active.r#type = Some(image.spec.r#type);
            active.os = image.spec.os.clone();
            write(ctx, api, &image, &active).await?;
            tracing::info!(size, format = %imported.detected.format, "image imported");
            Ok(Action::requeue(Duration::from_secs(3600)))
        }
        Err(e) if e.is_transient() => {
            let queued =
                with_phase(&saving, generation, ImagePhase::Saving, e.reason(), &format!("{e}; retrying"), &now);
            write(ctx, api, &image, &queued).await?;
            Err(Error::Transient(e.to_string()))
        }
        Err(e) => {
            let failed = ImageStatus {
                progress: None,
                ..with_phase(&saving, generation, ImagePhase::Failed, e.reason(), &e.to_string(), &now)
            };
            write(ctx, api, &image, &failed).await?;
            quota::finish_import(ctx, &image, 0).await?;
            Ok(Action::await_change())
        }
    }
}

/// A URL without its query string (it may hold signatures or tokens).
fn redact(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    }
}

async fn cleanup(image: Arc<Image>, ctx: &Context, api: &Api<Image>) -> Result<Action, Error> {
    let old = image.status.clone().unwrap_or_default();
    if image.spec.protected {
        let message = "deletion is held: spec.protected is true; set it to false to delete the image";
        let held =
            with_phase(&old, image.metadata.generation, ImagePhase::Deleting, "Protected", message, &status::now());
        write(ctx, api, &image, &held).await?;
        return Err(Error::Protected(message.into()));
    }
    let namespace = image.namespace().unwrap_or_default();
    if let Some(store) = ctx.store(&image.spec.region) {
        let prefix = store.image_prefix(&namespace, &image.name_any(), &image.uid().unwrap_or_default());
        let removed = store.delete_prefix(&prefix).await.map_err(|e| Error::Transient(e.to_string()))?;
        tracing::info!(objects = removed, "image bytes removed");
    }
    quota::release(ctx, &image).await?;
    Ok(Action::await_change())
}

fn error_policy(image: Arc<Image>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(image = %image.name_any(), error = %err, label = err.metric_label(), "reconcile failed");
    match err {
        Error::Protected(_) => Action::requeue(Duration::from_secs(60)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}
