//! The controllers, one module a kind. Each reconcile reads as fetch -> decide -> act -> write
//! status; the decisions live in [`crate::policy`].

pub mod image;
pub mod quota;
pub mod region;
pub mod status;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, future::BoxFuture};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        reflector::{self, Store},
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
    /// Last probe of each region: (generation, when, outcome).
    probes: Mutex<HashMap<String, ProbeRecord>>,
    /// Opened stores of Ready regions.
    pub stores: Mutex<HashMap<String, RegionStore>>,
    /// Publishes events.k8s.io Events (de-duplicated into series by kube's recorder).
    pub recorder: kube::runtime::events::Recorder,
    /// Retry delays after failures.
    pub backoff: Backoff,
}

impl Context {
    fn cached_probe(&self, region: &str, generation: Option<i64>) -> Option<Probe> {
        let probes = self.probes.lock().ok()?;
        let (g, at, probe) = probes.get(region)?;
        (*g == generation && at.elapsed() < region::REPROBE && *probe == Probe::Ready).then(|| probe.clone())
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

/// A reflector store of `K` over all namespaces, and the task that keeps it current.
fn reflect<K>(client: &Client) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(|_| futures::future::ready(()));
    (reader, Box::pin(stream))
}

/// Runs every controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown: Shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let (images, images_task) = reflect::<Image>(&client);
    let (regions, regions_task) = reflect::<Region>(&client);
    let caches = tokio::spawn(futures::future::join(images_task, regions_task));
    let ready = async {
        let _ = futures::future::join(images.wait_until_ready(), regions.wait_until_ready()).await;
    };
    tokio::select! {
        _ = ready => {}
        _ = shutdown.clone() => { caches.abort(); return; }
    }
    let ctx = Arc::new(Context {
        client: client.clone(),
        config,
        images,
        regions,
        probes: Mutex::new(HashMap::new()),
        stores: Mutex::new(HashMap::new()),
        backoff: Backoff::default(),
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "ims-operator".into(),
                instance: std::env::var("HOSTNAME").ok(),
            },
        ),
    });
    let controllers: Vec<BoxFuture<'static, ()>> = vec![
        Box::pin(region::run(ctx.clone(), shutdown.clone())),
        Box::pin(image::run(ctx.clone(), shutdown.clone())),
        observe::<ImageShare>(Api::all(client.clone()), ctx.clone(), shutdown.clone()),
        observe::<ImageCopy>(Api::all(client.clone()), ctx.clone(), shutdown.clone()),
        Box::pin(quota::run(ctx.clone(), shutdown.clone())),
    ];
    futures::future::join_all(controllers).await;
    caches.abort();
}

/// A controller that only observes (logs) its objects: the placeholder until a kind's issue lands.
fn observe<K>(api: Api<K>, ctx: Arc<Context>, shutdown: Shutdown) -> BoxFuture<'static, ()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    Box::pin(
        Controller::new(api, watcher::Config::default().any_semantic())
            .graceful_shutdown_on(shutdown)
            .run(
                |obj: Arc<K>, _ctx: Arc<Context>| async move {
                    tracing::debug!(kind = %K::kind(&()), name = %obj.name_any(), namespace = ?obj.namespace(), "observed");
                    Ok::<_, Error>(Action::await_change())
                },
                |_obj, err: &Error, _ctx| {
                    tracing::warn!(error = %err, label = err.metric_label(), "reconcile failed");
                    Action::requeue(Duration::from_secs(5))
                },
                ctx,
            )
            .for_each(|_| futures::future::ready(())),
    )
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
}
