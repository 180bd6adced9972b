//! The wiring: one watch (and cache) of each kind, and for each, one named function saying whom
//! its events re-run; then the controllers, started once every cache has synced.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, channel::mpsc, future::BoxFuture};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher::{self, watcher},
    },
};
use serde::de::DeserializeOwned;

use super::{Backoff, Config, Context, Moves, Shutdown, copy, image, index, ledger, quota, region, share};
use crate::api::{Image, ImageCopy, ImageShare, Region};

/// A reflector store of `K` over all namespaces, and the task that keeps it current: the one
/// cache of `K` in the process (its controller reads it too). Every object it applies is sent
/// to `own` (its controller's queue); `hook` sees every event after the store has it (to keep
/// indexes and trigger dependents).
fn reflect<K>(
    client: &Client,
    own: Option<mpsc::UnboundedSender<ObjectRef<K>>>,
    mut hook: impl FnMut(&watcher::Event<K>, &Store<K>) + Send + 'static,
) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let store = reader.clone();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        // Nobody reads managedFields: not kept (a third of a cached Image).
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer)
        .for_each(move |event| {
            if let Ok(event) = event {
                if let (Some(own), watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = (&own, &event) {
                    let _ = own.unbounded_send(ObjectRef::from_obj(o));
                }
                hook(&event, &store);
            }
            futures::future::ready(())
        });
    (reader, Box::pin(stream))
}

/// A Controller of every `K` in `cache` (the process's one cache of `K`, see [`reflect`], which
/// also queues every change of a `K` for it) that stops gracefully on `shutdown`, but not
/// before that cache has synced: kube holds a controller's reconciles until its cache syncs, and
/// a SIGTERM right after the start would otherwise leave it waiting forever.
pub(crate) fn controller<K>(cache: Store<K>, shutdown: Shutdown) -> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let own = futures::stream::pending::<Result<K, watcher::Error>>();
    stopping_on(Controller::for_stream(own, cache), shutdown)
}

/// `controller` stopping gracefully on `shutdown` once its cache has synced (see [`controller`]).
pub(crate) fn stopping_on<K>(controller: Controller<K>, shutdown: Shutdown) -> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let synced = controller.store();
    controller.graceful_shutdown_on(async move {
        shutdown.await;
        let _ = synced.wait_until_ready().await;
    })
}

/// Queues of objects to reconcile because something they depend on changed.
#[derive(Clone)]
struct Triggers {
    regions: mpsc::UnboundedSender<ObjectRef<Region>>,
    images: mpsc::UnboundedSender<ObjectRef<Image>>,
    shares: mpsc::UnboundedSender<ObjectRef<ImageShare>>,
    copies: mpsc::UnboundedSender<ObjectRef<ImageCopy>>,
}

impl Triggers {
    fn regions(&self, refs: Vec<ObjectRef<Region>>) {
        for r in refs {
            let _ = self.regions.unbounded_send(r);
        }
    }

    fn images(&self, refs: Vec<ObjectRef<Image>>) {
        for r in refs {
            let _ = self.images.unbounded_send(r);
        }
    }

    fn shares(&self, refs: Vec<ObjectRef<ImageShare>>) {
        for r in refs {
            let _ = self.shares.unbounded_send(r);
        }
    }

    fn copies(&self, refs: Vec<ObjectRef<ImageCopy>>) {
        for r in refs {
            let _ = self.copies.unbounded_send(r);
        }
    }
}

/// The indexes over Images and ImageCopies that dependents are found by.
struct Indexes {
    references: Arc<index::Index<Image>>,
    copy_images: index::Index<Image>,
    shares_of: Arc<index::Index<ImageShare>>,
    copies_of: index::Index<ImageCopy>,
}

/// An image changed: its references, shares, copying images and ImageCopies re-run (an owned
/// image), or the shares of its source (a reference: acceptance); a copy's destination re-runs
/// its ImageCopy.
fn image_changed(image: &Image, ix: &Indexes, t: &Triggers) {
    // Its region recounts its images and bytes (from the cache, which already has this change).
    t.regions(vec![ObjectRef::new(&image.spec.region)]);
    let Some(namespace) = image.namespace() else { return };
    let name = image.name_any();
    if let Some((source_ns, source)) = index::reference_target(image) {
        t.shares(ix.shares_of.get(&source_ns, &source));
    } else {
        t.images(ix.references.get(&namespace, &name));
        t.shares(ix.shares_of.get(&namespace, &name));
    }
    t.images(ix.copy_images.get(&namespace, &name));
    t.copies(ix.copies_of.get(&namespace, &name));
    if let Some(copy) = image.labels().get(copy::COPY_NAME_LABEL) {
        t.copies(vec![ObjectRef::new(copy).within(&namespace)]);
    }
}

/// The index maintenance and dependent triggers of one watch event.
fn on_event<K: Resource<DynamicType = ()> + Clone>(
    event: &watcher::Event<K>,
    store: &Store<K>,
    index: &index::Index<K>,
    changed: impl Fn(&K),
) {
    match event {
        watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
            index.upsert(obj);
            changed(obj);
        }
        watcher::Event::Delete(obj) => {
            index.remove(obj);
            changed(obj);
        }
        watcher::Event::InitDone => index.rebuild(store.state().iter().map(|o| o.as_ref())),
        watcher::Event::Init => {}
    }
}

/// Images: a byte move hears of its image's deletion; the copy and reference indexes follow;
/// an image's dependents re-run ([`image_changed`]); after a re-list every region recounts.
fn on_image(event: &watcher::Event<Image>, store: &Store<Image>, ix: &Indexes, t: &Triggers, moves: &Moves) {
    moves.on_image_event(event, store);
    on_event(event, store, &ix.copy_images, |_| {});
    on_event(event, store, &ix.references, |i| image_changed(i, ix, t));
    if let watcher::Event::InitDone = event {
        // A re-list reports no deletes: every region recounts.
        let regions: std::collections::BTreeSet<String> = store.state().iter().map(|i| i.spec.region.clone()).collect();
        t.regions(regions.iter().map(|r| ObjectRef::new(r)).collect());
    }
}

/// ImageCopies: a copy that ended or went away re-runs the unfinished copies of its namespace
/// (those waiting for a cross-region slot; first come, first served).
fn on_copy(event: &watcher::Event<ImageCopy>, store: &Store<ImageCopy>, ix: &Indexes, t: &Triggers) {
    on_event(event, store, &ix.copies_of, |c| {
        if copy::finished(c) || c.metadata.deletion_timestamp.is_some() || matches!(event, watcher::Event::Delete(_)) {
            let namespace = c.namespace();
            t.copies(
                store
                    .state()
                    .iter()
                    .filter(|o| o.namespace() == namespace && !copy::finished(o))
                    .map(|o| ObjectRef::from_obj(o.as_ref()))
                    .collect(),
            );
        }
    });
}

/// ImageShares: the references to a share's image re-run (a grant or a revocation).
fn on_share(event: &watcher::Event<ImageShare>, store: &Store<ImageShare>, ix: &Indexes, t: &Triggers) {
    on_event(event, store, &ix.shares_of, |s| {
        if let Some((namespace, name)) = index::share_target(s) {
            t.images(ix.references.get(&namespace, &name));
        }
    });
}

/// Namespaces: one that came or went re-runs the shares naming it (`TenantNotFound`). Rare.
fn on_namespace(event: &watcher::Event<Namespace>, shares: &Store<ImageShare>, t: &Triggers) {
    let (watcher::Event::Apply(ns) | watcher::Event::Delete(ns)) = event else { return };
    let name = ns.name_any();
    t.shares(
        shares
            .state()
            .iter()
            .filter(|s| s.spec.tenants.contains(&name))
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect(),
    );
}

/// Regions: one that came, went, or changed its spec or readiness (not its counts, which change
/// with every image; `seen` remembers what was last told) re-runs its images and the copies
/// waiting for it.
fn on_region(
    event: &watcher::Event<Region>,
    seen: &mut HashMap<String, (Option<i64>, bool)>,
    regions: &Store<Region>,
    images: &Store<Image>,
    copies: &Store<ImageCopy>,
    t: &Triggers,
) {
    let (name, moved) = match event {
        // After a re-list too: a region may have changed while the watch was down.
        watcher::Event::Apply(region) | watcher::Event::InitApply(region) => {
            let now = (region.metadata.generation, region::is_ready(region));
            let before = seen.insert(region.name_any(), now);
            if before == Some(now) {
                return;
            }
            // Created, or its spec changed.
            (region.name_any(), before.map(|b| b.0) != Some(now.0))
        }
        watcher::Event::Delete(region) => {
            seen.remove(&region.name_any());
            (region.name_any(), true)
        }
        _ => return,
    };
    if moved {
        // Whether another region's store is free (store conflicts) depends on where this one is.
        t.regions(
            regions.state().iter().filter(|r| r.name_any() != name).map(|r| ObjectRef::from_obj(r.as_ref())).collect(),
        );
    }
    t.images(
        images.state().iter().filter(|i| i.spec.region == name).map(|i| ObjectRef::from_obj(i.as_ref())).collect(),
    );
    t.copies(
        copies
            .state()
            .iter()
            .filter(|c| c.spec.destination.region == name && !copy::finished(c))
            .map(|c| ObjectRef::from_obj(c.as_ref()))
            .collect(),
    );
}

/// Removes the Marketplace usage series when the gauges stop (the leader lost its Lease, or the
/// operator stops): a billing system must see one process's figures, the leader's.
struct MarketplaceSeries(Arc<crate::metrics::Metrics>);

impl Drop for MarketplaceSeries {
    fn drop(&mut self) {
        self.0.marketplace_stopped();
    }
}

/// Keeps the cache-derived gauges current: Images by phase, the work queues, and the references
/// to Marketplace images (billing).
async fn refresh_gauges(ctx: Arc<Context>) {
    use crate::{
        api::{CopyPhase, ImagePhase},
        metrics::{PhaseLabel, QueueLabel},
    };
    let phases = [
        ImagePhase::Queued,
        ImagePhase::Saving,
        ImagePhase::Active,
        ImagePhase::Failed,
        ImagePhase::Unavailable,
        ImagePhase::Deleting,
    ];
    let _series = MarketplaceSeries(ctx.config.metrics.clone());
    loop {
        let images = ctx.images.state();
        let metrics = &ctx.config.metrics;
        metrics.marketplace_usage(&crate::policy::marketplace::usage(images.iter().map(|i| i.as_ref())));
        for phase in phases {
            let n = images.iter().filter(|i| i.status.as_ref().and_then(|s| s.phase) == Some(phase)).count();
            metrics.images.get_or_create(&PhaseLabel { phase: format!("{phase:?}") }).set(n as i64);
        }
        let queued =
            images.iter().filter(|i| i.status.as_ref().and_then(|s| s.phase) == Some(ImagePhase::Queued)).count();
        metrics.queue_depth.get_or_create(&QueueLabel { queue: "quota".into() }).set(queued as i64);
        let pending = ctx
            .copies
            .state()
            .iter()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase).is_none_or(|p| p == CopyPhase::Pending))
            .count();
        metrics.queue_depth.get_or_create(&QueueLabel { queue: "copies".into() }).set(pending as i64);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The image server and what keeps it current (its key and certificate Secrets), for as long as
/// the returned guards live: a key rotation re-runs every Active image, which writes its new
/// locations (one status write each).
fn serve_images(
    ctx: &Arc<Context>,
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
    triggers: &Triggers,
    key: tokio::sync::watch::Sender<Option<crate::delivery::Key>>,
    delivery: crate::delivery::Delivery,
    config: crate::delivery::DeliveryConfig,
) -> Vec<AbortOnDrop<()>> {
    use crate::{api::ImagePhase, delivery};
    let rotated = {
        let (images, t) = (ctx.images.clone(), triggers.clone());
        move || {
            t.images(
                images
                    .state()
                    .iter()
                    .filter(|i| i.status.as_ref().and_then(|s| s.phase) == Some(ImagePhase::Active))
                    .map(|i| ObjectRef::from_obj(i.as_ref()))
                    .collect(),
            )
        }
    };
    let mut tasks =
        vec![AbortOnDrop(tokio::spawn(delivery::key::keep_current(secrets.clone(), config.key_secret, key, rotated)))];
    let tls = config.tls_secret.map(|name| {
        let (tx, rx) = tokio::sync::watch::channel(None);
        tasks.push(AbortOnDrop(tokio::spawn(delivery::tls::keep_current(secrets.clone(), name, tx))));
        rx
    });
    let serving = delivery::http::serve(config.listener, ctx.clone(), delivery.keys, tls, config.limits);
    tasks.push(AbortOnDrop(tokio::spawn(serving)));
    tasks
}

/// A spawned task that is aborted when this guard is dropped.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs every controller until `shutdown` resolves; in-flight reconciles finish first. Dropped
/// (the leader election aborts it when the Lease is lost), it stops at once and takes what it
/// spawned with it: the watch caches and the gauges.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown: Shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    // File imports never read the region stores: other tenants' bytes are there.
    let mut config = config;
    config.fetch.file_denied.push(config.stores.file_dir.clone());
    // Not ready until every watch cache has synced.
    config.readiness.set(false);
    let references = Arc::new(index::Index::new(index::reference_target));
    let shares_of = Arc::new(index::Index::new(index::share_target));
    let ix = Arc::new(Indexes {
        references: references.clone(),
        copy_images: index::Index::new(index::copy_target),
        shares_of: shares_of.clone(),
        copies_of: index::Index::new(index::image_copy_target),
    });
    let (region_tx, region_rx) = mpsc::unbounded();
    let (image_tx, image_rx) = mpsc::unbounded();
    let (share_tx, share_rx) = mpsc::unbounded();
    let (copy_tx, copy_rx) = mpsc::unbounded();
    let triggers = Triggers { regions: region_tx, images: image_tx, shares: share_tx, copies: copy_tx };
    let moves = Arc::new(Moves::default());
    let (images, images_task) = reflect::<Image>(&client, Some(triggers.images.clone()), {
        let (ix, t, moves) = (ix.clone(), triggers.clone(), moves.clone());
        move |event, store| on_image(event, store, &ix, &t, &moves)
    });
    let (copies, copies_task) = reflect::<ImageCopy>(&client, Some(triggers.copies.clone()), {
        let (ix, t) = (ix.clone(), triggers.clone());
        move |event, store| on_copy(event, store, &ix, &t)
    });
    let (shares, shares_task) = reflect::<ImageShare>(&client, Some(triggers.shares.clone()), {
        let (ix, t) = (ix.clone(), triggers.clone());
        move |event, store| on_share(event, store, &ix, &t)
    });
    let (namespaces, namespaces_task) = reflect::<Namespace>(&client, None, {
        let (t, shares) = (triggers.clone(), shares.clone());
        move |event, _| on_namespace(event, &shares, &t)
    });
    let (regions, regions_task) = reflect::<Region>(&client, Some(triggers.regions.clone()), {
        let (t, copies, images) = (triggers.clone(), copies.clone(), images.clone());
        let mut seen = HashMap::new();
        move |event, regions| on_region(event, &mut seen, regions, &images, &copies, &t)
    });
    let _caches = AbortOnDrop(tokio::spawn(futures::future::join_all([
        images_task,
        shares_task,
        namespaces_task,
        regions_task,
        copies_task,
    ])));
    let ready = async {
        let _ = futures::future::join5(
            images.wait_until_ready(),
            regions.wait_until_ready(),
            shares.wait_until_ready(),
            namespaces.wait_until_ready(),
            copies.wait_until_ready(),
        )
        .await;
    };
    tokio::select! {
        _ = ready => {}
        _ = shutdown.clone() => return,
    }
    // The image server's key, before any image writes its locations.
    let delivery_config = config.delivery.clone();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &config.operator_namespace);
    let mut delivery = None;
    if let Some(dc) = &delivery_config {
        let Some(key) = crate::delivery::first_key(&secrets, dc, shutdown.clone()).await else { return };
        let (tx, keys) = tokio::sync::watch::channel(Some(key));
        delivery = Some((tx, crate::delivery::Delivery { base_url: dc.base_url.clone(), keys }));
    }
    // The local KMS keys, watched: a change re-runs every encrypted image (its key may have
    // gone, or come back).
    let (kms_tx, kms_rx) = tokio::sync::watch::channel(None);
    let local_kms = crate::crypt::LocalKeys {
        secret: format!("{}/{}", config.operator_namespace, crate::crypt::kms::DEFAULT_SECRET),
        keys: kms_rx,
    };
    let _kms = AbortOnDrop(tokio::spawn(crate::crypt::kms::keep_local_keys(
        secrets.clone(),
        crate::crypt::kms::DEFAULT_SECRET.into(),
        kms_tx,
        {
            let (images, t) = (images.clone(), triggers.clone());
            move || {
                let encrypted = images
                    .state()
                    .iter()
                    .filter(|i| i.spec.encryption.is_some())
                    .map(|i| ObjectRef::from_obj(i.as_ref()))
                    .collect();
                t.images(encrypted)
            }
        },
    )));
    let ledger = ledger::Ledger::new(
        client.clone(),
        config.policy.clone(),
        images.clone(),
        triggers.images.clone(),
        config.metrics.clone(),
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        ledger,
        config,
        images,
        regions,
        shares,
        namespaces,
        references,
        shares_of,
        copies,
        probes: Mutex::new(HashMap::new()),
        stores: Mutex::new(HashMap::new()),
        backoff: Backoff::default(),
        stopping: shutdown.clone(),
        moves,
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "ims-operator".into(),
                instance: std::env::var("HOSTNAME").ok(),
            },
        ),
        delivery: delivery.as_ref().map(|(_, d)| d.clone()),
        local_kms,
        uploads: Default::default(),
    });
    let _delivery =
        delivery.zip(delivery_config).map(|((tx, d), dc)| serve_images(&ctx, &secrets, &triggers, tx, d, dc));
    let controllers: Vec<BoxFuture<'static, ()>> = vec![
        Box::pin(region::run(ctx.clone(), region_rx, shutdown.clone())),
        Box::pin(image::run(ctx.clone(), image_rx, shutdown.clone())),
        Box::pin(share::run(ctx.clone(), share_rx, shutdown.clone())),
        Box::pin(copy::run(ctx.clone(), copy_rx, shutdown.clone())),
        Box::pin(quota::run(ctx.clone(), shutdown.clone())),
    ];
    ctx.config.readiness.set(true);
    let gauges = AbortOnDrop(tokio::spawn(refresh_gauges(ctx.clone())));
    futures::future::join_all(controllers).await;
    drop(gauges);
    ctx.config.readiness.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SIGTERM as soon as the operator reports ready, before the controllers' own caches have
    /// synced: the controllers still stop (they used to wait forever for those caches).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_right_after_the_start_stops_every_controller() {
        for _ in 0..5 {
            let client = crate::api::embedded().client();
            let config = Config::default();
            let readiness = config.readiness.clone();
            let shutdown = async move {
                while !readiness.get() {
                    tokio::task::yield_now().await;
                }
            };
            let stopped = tokio::time::timeout(Duration::from_secs(30), run(client, config, shutdown)).await;
            assert!(stopped.is_ok(), "the controllers did not stop within 30 s of the shutdown");
        }
    }

    /// Controllers dropped at once, as the leader election does when the Lease is lost, leave
    /// nothing of theirs running: the watch caches and the gauges (which hold the context, and
    /// with it the ledger) used to run on, one more copy of every cache after each lost Lease.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn controllers_dropped_at_once_leave_nothing_running() {
        let config = Config::default();
        let (readiness, metrics) = (config.readiness.clone(), config.metrics.clone());
        let controllers = tokio::spawn(run(crate::api::embedded().client(), config, futures::future::pending()));
        let started = tokio::time::timeout(Duration::from_secs(30), async {
            while !readiness.get() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(started.await.is_ok(), "the controllers did not start");
        assert!(Arc::strong_count(&metrics) > 1, "the running controllers hold the configuration");
        controllers.abort();
        let _ = controllers.await;
        // An aborted task is dropped when it is next polled: give them a moment.
        for _ in 0..100 {
            if Arc::strong_count(&metrics) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(Arc::strong_count(&metrics), 1, "something the controllers spawned still runs");
    }
}
