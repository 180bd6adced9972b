//! What every controller shares: the configuration, the caches and indexes, the opened region
//! stores and probes, the Event recorder, the byte moves and the quota ledger.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Namespace;
#[cfg(test)]
use kube::{Api, runtime::reflector};
use kube::{
    Client,
    runtime::reflector::{ObjectRef, Store},
};

use super::{Backoff, Moves, Shutdown, index, ledger, region};
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
    /// The image server (`None`: locations stay the stores' own URLs, as in unit tests).
    pub delivery: Option<crate::delivery::DeliveryConfig>,
    /// Whether captures (`source.volume`) read claims bound to `hostPath` or `local` volumes
    /// in-process (`ims-operator local`: the operator runs where those paths are).
    pub capture_in_process: bool,
    /// How captures run mover Jobs (`None`: they cannot, unless `capture_in_process`).
    pub mover: Option<MoverConfig>,
}

/// The mover Jobs of captures (`run --mover-image`).
#[derive(Clone, Debug)]
pub struct MoverConfig {
    /// The container image (the operator's own).
    pub image: String,
    /// The URL a mover reaches this operator's image server at (the leader's pod, where the
    /// capture waits), no trailing `/`.
    pub upload_base_url: String,
    /// The Job's `activeDeadlineSeconds`.
    pub deadline: Duration,
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
            delivery: None,
            capture_in_process: false,
            mover: None,
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
    pub(super) probes: Mutex<HashMap<String, ProbeRecord>>,
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
    /// The image server's base URL and current key, when it runs.
    pub delivery: Option<crate::delivery::Delivery>,
    /// The local KMS provider's keys (the Secret `ims-kms-keys`), kept current by a watch.
    pub local_kms: crate::crypt::LocalKeys,
    /// The captures waiting for their mover's upload.
    pub uploads: Arc<crate::delivery::upload::Uploads>,
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
                futures::channel::mpsc::unbounded().0,
                Arc::default(),
            ),
            recorder: kube::runtime::events::Recorder::new(
                client,
                kube::runtime::events::Reporter { controller: "ims-operator-test".into(), instance: None },
            ),
            delivery: None,
            local_kms: crate::crypt::LocalKeys::fixed("ims-system/ims-kms-keys", Default::default()),
            uploads: Default::default(),
        };
        (ctx, TestCaches { images: images_writer, namespaces: namespaces_writer, regions: regions_writer })
    }

    /// Publishes an Event about `object` (the note cut to 1000 characters). A failure is logged:
    /// Events are for people and never fail a reconcile.
    pub(super) async fn publish_event(
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

    pub(super) fn cached_probe(&self, region: &str, generation: Option<i64>) -> Option<Probe> {
        let probes = self.probes.lock().ok()?;
        let (g, at, probe) = probes.get(region)?;
        (*g == generation && at.elapsed() < region::REPROBE && *probe == Probe::Ready).then(|| probe.clone())
    }

    /// Forgets a region's last probe, so its next reconcile probes again (its Secret changed).
    pub(super) fn forget_probe(&self, region: &str) {
        if let Ok(mut probes) = self.probes.lock() {
            probes.remove(region);
        }
    }

    /// Drops a region's opened store (its region goes, or its store is refused).
    pub(super) fn forget_store(&self, region: &str) {
        if let Ok(mut stores) = self.stores.lock() {
            stores.remove(region);
        }
    }

    pub(super) fn remember_probe(&self, region: &str, generation: Option<i64>, probe: &Probe) {
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

#[cfg(test)]
mod tests {
    use kube::{Resource, runtime::watcher};

    use super::*;

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
}
