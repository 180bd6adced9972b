//! The controllers, one module a kind. Each reconcile reads as fetch -> decide -> act -> write
//! status; the decisions live in [`crate::policy`].

pub mod copy;
pub mod image;
pub mod index;
pub mod ledger;
pub mod quota;
pub mod region;
pub mod share;
pub mod status;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
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

use crate::{
    api::{Image, ImageCopy, ImageShare, Region},
    fetch::FetchPolicy,
    policy::{Policy, region::Probe},
    store::{RegionStore, StoreConfig},
};

/// What the operator is configured with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Limits.
    pub policy: Policy,
    /// The platform namespace: the only one where `visibility: Public` is allowed.
    pub public_namespace: String,
    /// The operator's own namespace: S3 credential Secrets and the leader Lease live there.
    pub operator_namespace: String,
    /// Where `file://` region stores may live.
    pub stores: StoreConfig,
    /// What imports may reach (SSRF guard, file:// imports).
    pub fetch: FetchPolicy,
    /// How often import progress is written to status.
    pub progress_every: Duration,
    /// Set when every watch cache has synced and the controllers run (`/readyz`).
    pub readiness: crate::admin::Readiness,
    /// Prometheus metrics (`/metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::default(),
            public_namespace: "ims-public".into(),
            operator_namespace: "ims-system".into(),
            stores: StoreConfig::default(),
            fetch: FetchPolicy::default(),
            progress_every: Duration::from_secs(2),
            readiness: crate::admin::Readiness::default(),
            metrics: Arc::default(),
        }
    }
}

/// A region's last probe: the generation probed, when, and the outcome.
type ProbeRecord = (Option<i64>, Instant, Probe);

/// What every controller shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Configuration.
    pub config: Config,
    /// Every Image, kept current by a watch.
    pub images: Store<Image>,
    /// Every Region, kept current by a watch.
    pub regions: Store<Region>,
    /// Every ImageShare, kept current by a watch.
    pub shares: Store<ImageShare>,
    /// Every Namespace (ImageShare members must exist).
    pub namespaces: Store<Namespace>,
    /// References by the image they point at.
    pub references: Arc<index::Index<Image>>,
    /// ImageShares by the image they share.
    pub shares_of: Arc<index::Index<ImageShare>>,
    /// Every ImageCopy, kept current by a watch.
    pub copies: Store<ImageCopy>,
    /// Last probe of each region: (generation, when, outcome).
    probes: Mutex<HashMap<String, ProbeRecord>>,
    /// Opened stores of Ready regions.
    pub stores: Mutex<HashMap<String, RegionStore>>,
    /// Publishes events.k8s.io Events (de-duplicated into series by kube's recorder).
    pub recorder: kube::runtime::events::Recorder,
    /// Retry delays after failures.
    pub backoff: Backoff,
    /// Resolves when the operator shuts down: byte moves in flight stop.
    pub stopping: Shutdown,
    /// Byte moves in flight; the Image watch stops the one whose image is being deleted.
    pub moves: Arc<Moves>,
    /// The quota ledgers (one writer task per namespace).
    pub ledger: ledger::Ledger,
}

/// A DataDisk Image `t/name` with `uid`, being deleted or not, for controller unit tests.
#[cfg(test)]
pub(crate) fn test_image(name: &str, uid: &str, deleting: bool) -> Image {
    let spec = serde_json::json!({"region": "r", "type": "DataDisk", "source": {"url": {"url": "https://x/y"}}});
    let mut image = Image::new(name, serde_json::from_value(spec).expect("a valid spec"));
    image.metadata.namespace = Some("t".into());
    image.metadata.uid = Some(uid.into());
    if deleting {
        image.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
    }
    image
}

/// A fresh embedded API server with `namespaces` created: its client and those Namespaces, for
/// controller unit tests.
#[cfg(test)]
pub(crate) async fn test_api(namespaces: &[&str]) -> (Client, Vec<Namespace>) {
    let client = crate::api::embedded().client();
    let api: Api<Namespace> = Api::all(client.clone());
    let mut created = Vec::new();
    for name in namespaces {
        let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("a Namespace");
        created.push(api.create(&Default::default(), &ns).await.expect("the namespace is created"));
    }
    (client, created)
}

/// Writers of a test context's caches (see `Context::for_test`).
#[cfg(test)]
pub(crate) struct TestCaches {
    pub images: reflector::store::Writer<Image>,
    pub namespaces: reflector::store::Writer<Namespace>,
    pub regions: reflector::store::Writer<Region>,
}

/// Byte moves in flight, by image uid. The Image watch tells a move when its image is being
/// deleted or is gone, so a move waits on that instead of polling the cache.
#[derive(Default)]
pub struct Moves(Mutex<HashMap<String, Arc<tokio::sync::Notify>>>);

impl Moves {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Notify>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a move of the image with `uid`, until the returned guard is dropped.
    pub fn start(self: &Arc<Self>, uid: &str) -> Moving {
        let deleted = Arc::new(tokio::sync::Notify::new());
        self.lock().insert(uid.to_string(), deleted.clone());
        Moving { moves: self.clone(), uid: uid.to_string(), deleted }
    }

    /// The image with `uid` is being deleted, or is gone.
    fn image_deleted(&self, uid: &str) {
        if let Some(deleted) = self.lock().get(uid) {
            // Stores a permit when nobody waits yet (between two disks), so it is not lost.
            deleted.notify_one();
        }
    }

    /// The Image watch's part: a deletion timestamp or a delete, and after a re-list (which
    /// reports no deletes) every moving image that is no longer there.
    fn on_image_event(&self, event: &watcher::Event<Image>, store: &Store<Image>) {
        match event {
            watcher::Event::Apply(image) | watcher::Event::InitApply(image)
                if image.metadata.deletion_timestamp.is_some() =>
            {
                self.image_deleted(&image.uid().unwrap_or_default());
            }
            watcher::Event::Delete(image) => self.image_deleted(&image.uid().unwrap_or_default()),
            watcher::Event::InitDone => {
                let present: std::collections::HashSet<String> = store.state().iter().filter_map(|i| i.uid()).collect();
                let gone: Vec<String> = self.lock().keys().filter(|uid| !present.contains(*uid)).cloned().collect();
                for uid in gone {
                    self.image_deleted(&uid);
                }
            }
            _ => {}
        }
    }
}

/// One registered byte move (see [`Moves::start`]).
pub struct Moving {
    moves: Arc<Moves>,
    uid: String,
    deleted: Arc<tokio::sync::Notify>,
}

impl Moving {
    /// Resolves when the Image watch reports the image deleted (or gone).
    pub async fn deleted(&self) {
        self.deleted.notified().await;
    }
}

impl Drop for Moving {
    fn drop(&mut self) {
        self.moves.lock().remove(&self.uid);
    }
}

impl Context {
    /// A context whose caches only the test feeds (through the returned writers), for
    /// controller unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(client: Client) -> (Context, TestCaches) {
        let (images, images_writer) = reflector::store();
        let (namespaces, namespaces_writer) = reflector::store();
        let (regions, regions_writer) = reflector::store();
        let ctx = Context {
            client: client.clone(),
            config: Config::default(),
            images: images.clone(),
            regions,
            shares: reflector::store().0,
            namespaces,
            references: Arc::new(index::Index::new(index::reference_target)),
            shares_of: Arc::new(index::Index::new(index::share_target)),
            copies: reflector::store().0,
            probes: Mutex::new(HashMap::new()),
            stores: Mutex::new(HashMap::new()),
            backoff: Backoff::default(),
            stopping: futures::future::FutureExt::shared(Box::pin(futures::future::pending())),
            moves: Arc::default(),
            ledger: ledger::Ledger::new(
                client.clone(),
                Policy::default(),
                images.clone(),
                mpsc::unbounded().0,
                Arc::default(),
            ),
            recorder: kube::runtime::events::Recorder::new(
                client,
                kube::runtime::events::Reporter { controller: "ims-operator-test".into(), instance: None },
            ),
        };
        (ctx, TestCaches { images: images_writer, namespaces: namespaces_writer, regions: regions_writer })
    }

    /// Publishes an Event about `object` (the note cut to 1000 characters). A failure is logged:
    /// Events are for people and never fail a reconcile.
    async fn publish_event(
        &self,
        object: &k8s_openapi::api::core::v1::ObjectReference,
        warning: bool,
        reason: String,
        note: &str,
        action: &str,
    ) {
        use kube::runtime::events::{Event, EventType};
        // A namespace being deleted refuses new objects, and nobody is left to read them (a
        // deleted source's thousands of references would each try).
        if object.namespace.as_deref().is_some_and(|ns| self.terminating(ns)) {
            return;
        }
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason,
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        match self.recorder.publish(&event, object).await {
            Ok(()) => {}
            // The namespace went, or is going, meanwhile (faster than its watch told us).
            Err(kube::Error::Api(s)) if s.code == 404 || (s.code == 403 && s.message.contains("being terminated")) => {
                tracing::debug!(error = %s, "no event: its namespace is gone");
            }
            Err(e) => tracing::warn!(error = %e, "could not publish an event"),
        }
    }

    /// Whether `namespace` is being deleted (as the Namespace cache shows it).
    pub fn terminating(&self, namespace: &str) -> bool {
        self.namespaces.get(&ObjectRef::new(namespace)).is_some_and(|n| n.metadata.deletion_timestamp.is_some())
    }

    fn cached_probe(&self, region: &str, generation: Option<i64>) -> Option<Probe> {
        let probes = self.probes.lock().ok()?;
        let (g, at, probe) = probes.get(region)?;
        (*g == generation && at.elapsed() < region::REPROBE && *probe == Probe::Ready).then(|| probe.clone())
    }

    /// Forgets a region's last probe, so its next reconcile probes again (its Secret changed).
    fn forget_probe(&self, region: &str) {
        if let Ok(mut probes) = self.probes.lock() {
            probes.remove(region);
        }
    }

    fn remember_probe(&self, region: &str, generation: Option<i64>, probe: &Probe) {
        if let Ok(mut probes) = self.probes.lock() {
            probes.insert(region.to_string(), (generation, Instant::now(), probe.clone()));
        }
    }

    /// The opened store of a Ready region.
    pub fn store(&self, region: &str) -> Option<RegionStore> {
        self.stores.lock().ok()?.get(region).cloned()
    }

    /// The store of region `name`: the one its probe opened, or, when this process has not
    /// probed the region yet (it just started, or took over the lease), one opened now. None
    /// when the region is unknown or its store cannot be opened.
    pub async fn open_store(&self, name: &str) -> Option<RegionStore> {
        if let Some(store) = self.store(name) {
            return Some(store);
        }
        let region = self.regions.get(&ObjectRef::new(name))?;
        match region::open(&region, self).await {
            Ok(store) => Some(self.stores.lock().ok()?.entry(name.to_string()).or_insert(store).clone()),
            Err(why) => {
                tracing::info!(region = name, ?why, "cannot open the region's store");
                None
            }
        }
    }

    /// The store of region `name` if its status says Ready (see [`Context::open_store`]).
    pub async fn ready_store(&self, name: &str) -> Option<RegionStore> {
        let ready = self.regions.get(&ObjectRef::new(name)).is_some_and(|r| region::is_ready(&r));
        if !ready {
            return None;
        }
        self.open_store(name).await
    }
}

/// Per-object exponential backoff after failed reconciles: 1 s, 2 s, 4 s ... up to 5 min,
/// back to the start after a success (so a source that is down is not hammered, and one that
/// comes back is picked up soon after).
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// The first delay.
    pub const BASE: Duration = Duration::from_secs(1);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(300);

    /// The delay before the next attempt for `key`, counting this failure.
    pub fn next(&self, key: &str) -> Duration {
        let Ok(mut failures) = self.failures.lock() else { return Self::BASE };
        let n = failures.entry(key.to_string()).or_insert(0);
        let delay = Self::BASE.saturating_mul(1u32 << (*n).min(16)).min(Self::MAX);
        *n = n.saturating_add(1);
        delay
    }

    /// Forgets the failures of `key` (after a success).
    pub fn reset(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }
}

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing a finalizer, or the step behind it, failed.
    #[error("{0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    /// Deletion is held by `spec.protected`.
    #[error("{0}")]
    Protected(String),
    /// A step that may succeed when retried (source or store unavailable).
    #[error("{0}")]
    Transient(String),
}

impl Error {
    /// Label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
            Error::Protected(_) => "protected",
            Error::Transient(_) => "transient",
        }
    }
}

/// A shutdown trigger every controller can await.
pub type Shutdown = futures::future::Shared<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>>;

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

/// Keeps the cache-derived gauges current: Images by phase, and the work queues.
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
    loop {
        let images = ctx.images.state();
        let metrics = &ctx.config.metrics;
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

/// Runs every controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown: Shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
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
        move |event, store| {
            moves.on_image_event(event, store);
            on_event(event, store, &ix.copy_images, |_| {});
            on_event(event, store, &ix.references, |i| image_changed(i, &ix, &t));
            if let watcher::Event::InitDone = event {
                // A re-list reports no deletes: every region recounts.
                let regions: std::collections::BTreeSet<String> =
                    store.state().iter().map(|i| i.spec.region.clone()).collect();
                t.regions(regions.iter().map(|r| ObjectRef::new(r)).collect());
            }
        }
    });
    let (copies, copies_task) = reflect::<ImageCopy>(&client, Some(triggers.copies.clone()), {
        let (ix, t) = (ix.clone(), triggers.clone());
        move |event, store| {
            // A copy ended or went away: the copies of its namespace waiting for a cross-region
            // slot re-run (first come, first served).
            on_event(event, store, &ix.copies_of, |c| {
                if copy::finished(c)
                    || c.metadata.deletion_timestamp.is_some()
                    || matches!(event, watcher::Event::Delete(_))
                {
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
    });
    let (shares, shares_task) = reflect::<ImageShare>(&client, Some(triggers.shares.clone()), {
        let (references, shares_of, t) = (references.clone(), shares_of.clone(), triggers.clone());
        move |event, store| {
            // A share changed: the references to its image re-run (grant or revocation).
            on_event(event, store, &shares_of, |s| {
                if let Some((namespace, name)) = index::share_target(s) {
                    t.images(references.get(&namespace, &name));
                }
            });
        }
    });
    let (namespaces, namespaces_task) = reflect::<Namespace>(&client, None, {
        let t = triggers.clone();
        let shares = shares.clone();
        move |event, _store| {
            // A namespace came or went: the shares naming it re-run (TenantNotFound). Rare.
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
    });
    let (regions, regions_task) = reflect::<Region>(&client, Some(triggers.regions.clone()), {
        let (t, copies, images) = (triggers.clone(), copies.clone(), images.clone());
        // What images and copies depend on, by region: its spec and whether it is Ready (not its
        // counts, which change with every image).
        let mut seen: HashMap<String, (Option<i64>, bool)> = HashMap::new();
        move |event, _store| {
            // A region came, went or changed: its images and the copies waiting for it re-run.
            let name = match event {
                // After a re-list too: a region may have changed while the watch was down.
                watcher::Event::Apply(region) | watcher::Event::InitApply(region) => {
                    let now = (region.metadata.generation, region::is_ready(region));
                    if seen.insert(region.name_any(), now) == Some(now) {
                        return;
                    }
                    region.name_any()
                }
                watcher::Event::Delete(region) => {
                    seen.remove(&region.name_any());
                    region.name_any()
                }
                _ => return,
            };
            t.images(
                images
                    .state()
                    .iter()
                    .filter(|i| i.spec.region == name)
                    .map(|i| ObjectRef::from_obj(i.as_ref()))
                    .collect(),
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
    });
    let caches =
        tokio::spawn(futures::future::join_all([images_task, shares_task, namespaces_task, regions_task, copies_task]));
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
        _ = shutdown.clone() => { caches.abort(); return; }
    }
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
    });
    let controllers: Vec<BoxFuture<'static, ()>> = vec![
        Box::pin(region::run(ctx.clone(), region_rx, shutdown.clone())),
        Box::pin(image::run(ctx.clone(), image_rx, shutdown.clone())),
        Box::pin(share::run(ctx.clone(), share_rx, shutdown.clone())),
        Box::pin(copy::run(ctx.clone(), copy_rx, shutdown.clone())),
        Box::pin(quota::run(ctx.clone(), shutdown.clone())),
    ];
    ctx.config.readiness.set(true);
    let gauges = tokio::spawn(refresh_gauges(ctx.clone()));
    futures::future::join_all(controllers).await;
    gauges.abort();
    ctx.config.readiness.set(false);
    caches.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let b = Backoff::default();
        let delays: Vec<u64> = (0..12).map(|_| b.next("ns/a").as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.next("ns/b"), Backoff::BASE, "keys are independent");
        b.reset("ns/a");
        assert_eq!(b.next("ns/a"), Backoff::BASE);
    }

    fn image(uid: &str, deleting: bool) -> Image {
        test_image(uid, uid, deleting)
    }

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

    /// No Event goes into a namespace being deleted (it would be refused, and nobody reads it);
    /// one goes into a live namespace.
    #[tokio::test]
    async fn events_skip_a_namespace_being_deleted() {
        let (client, namespaces) = test_api(&["live", "gone"]).await;
        let (ctx, mut caches) = Context::for_test(client.clone());
        let mut gone = namespaces[1].clone();
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
        caches.namespaces.apply_watcher_event(&watcher::Event::Apply(namespaces[0].clone()));
        caches.namespaces.apply_watcher_event(&watcher::Event::Apply(gone));
        for ns in ["live", "gone"] {
            let mut image = test_image("i", "u", false);
            image.metadata.namespace = Some(ns.into());
            ctx.publish_event(&image.object_ref(&()), true, "SourceDeleted".into(), "gone", "Reconcile").await;
        }
        let events = |ns: &str| Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns);
        assert_eq!(events("live").list(&Default::default()).await.unwrap().items.len(), 1);
        assert!(events("gone").list(&Default::default()).await.unwrap().items.is_empty());
    }

    async fn told(moving: &Moving) -> bool {
        tokio::time::timeout(Duration::from_millis(50), moving.deleted()).await.is_ok()
    }

    #[tokio::test]
    async fn a_move_hears_of_its_image_being_deleted_or_gone_after_a_relist() {
        let (store, mut writer) = reflector::store::<Image>();
        let moves = Arc::new(Moves::default());
        let (a, b, c) = (moves.start("a"), moves.start("b"), moves.start("c"));
        for uid in ["a", "b", "c"] {
            writer.apply_watcher_event(&watcher::Event::Apply(image(uid, false)));
        }

        // An update that does not delete tells nobody.
        moves.on_image_event(&watcher::Event::Apply(image("a", false)), &store);
        assert!(!told(&a).await);
        // A deletion timestamp tells that image's move, and only it; told before it waits.
        moves.on_image_event(&watcher::Event::Apply(image("a", true)), &store);
        assert!(!told(&b).await);
        assert!(told(&a).await);
        // A delete event.
        moves.on_image_event(&watcher::Event::Delete(image("b", false)), &store);
        assert!(told(&b).await);
        // A re-list reports no deletes: the moves whose image is not in the new list are told.
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(image("a", true)));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        moves.on_image_event(&watcher::Event::InitDone, &store);
        assert!(told(&c).await);

        // A finished move is forgotten.
        drop(c);
        assert!(!moves.lock().contains_key("c"));
        assert_eq!(moves.lock().len(), 2);
    }
}
