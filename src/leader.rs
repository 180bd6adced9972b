//! Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it: only
//! the holder runs the controllers (and so moves bytes); a standby takes the Lease over when the
//! holder has not renewed it for a lease duration, measured on the standby's own clock from the
//! moment it saw the last change (no clock-skew assumptions). Every write carries the
//! resourceVersion it read, so two candidates never both win.
//!
//! A leader that cannot renew within two thirds of the duration stops its controllers at once
//! (before anybody else may take over); on a graceful shutdown it releases the Lease so the
//! standby takes over without waiting.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use crate::controllers::{self, Config};

/// How a candidate takes part.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name (`ims-operator`).
    pub name: String,
    /// Namespace of the Lease (the operator's).
    pub namespace: String,
    /// This candidate's identity (the pod name).
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    fn retry(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }

    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// What a standby saw of the Lease last, and when (its own clock).
struct Observed {
    holder: Option<String>,
    renew: Option<MicroTime>,
    at: Instant,
}

/// Outcome of one attempt to become leader.
enum Attempt {
    Won,
    Held(String),
}

async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig, seen: &mut Option<Observed>) -> Result<Attempt, kube::Error> {
    let spec = |transitions: i32| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
        acquire_time: Some(now()),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let fresh =
            Lease { metadata: ObjectMeta { name: Some(cfg.name.clone()), ..Default::default() }, spec: Some(spec(0)) };
        return match api.create(&PostParams::default(), &fresh).await {
            Ok(_) => Ok(Attempt::Won),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Held("another candidate".into())),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let holder = current.holder_identity.clone().filter(|h| !h.is_empty());
    let changed = seen.as_ref().is_none_or(|s| {
        s.holder != holder || s.renew.as_ref().map(|t| t.0) != current.renew_time.as_ref().map(|t| t.0)
    });
    if changed {
        *seen = Some(Observed { holder: holder.clone(), renew: current.renew_time.clone(), at: Instant::now() });
    }
    let duration = current.lease_duration_seconds.map(|s| Duration::from_secs(s.max(1) as u64)).unwrap_or(cfg.duration);
    let expired = seen.as_ref().is_some_and(|s| s.at.elapsed() >= duration);
    match &holder {
        Some(h) if h != &cfg.identity && !expired => return Ok(Attempt::Held(h.clone())),
        _ => {}
    }
    let transitions = current.lease_transitions.unwrap_or(0) + i32::from(holder.as_deref() != Some(&cfg.identity));
    lease.spec = Some(spec(transitions));
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Attempt::Won),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Held(holder.unwrap_or_default())),
        Err(e) => Err(e),
    }
}

/// Renews while we hold the Lease; returns when it is lost (or cannot be renewed in time).
async fn hold(api: &Api<Lease>, cfg: &LeaseConfig) {
    let renew = || async {
        let mut lease = api.get(&cfg.name).await?;
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(&cfg.identity) {
            return Ok::<bool, kube::Error>(false);
        }
        spec.renew_time = Some(now());
        lease.spec = Some(spec);
        api.replace(&cfg.name, &PostParams::default(), &lease).await?;
        Ok(true)
    };
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(cfg.retry()).await;
        // As client-go does: keep trying until the renew deadline, an attempt taking as long as
        // is left of it, so an API server that is slow but answers still gets the renewal.
        loop {
            let left = cfg.renew_deadline().saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, renew()).await {
                Ok(Ok(true)) => {
                    renewed = Instant::now();
                    break;
                }
                Ok(Ok(false)) => {
                    tracing::warn!(lease = %cfg.name, "leadership lost: another candidate holds the lease");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not renew the lease");
                    let left = cfg.renew_deadline().saturating_sub(renewed.elapsed());
                    tokio::time::sleep((cfg.retry() / 4).min(left)).await;
                }
                Err(_) => {}
            }
            if renewed.elapsed() >= cfg.renew_deadline() {
                tracing::warn!(lease = %cfg.name, "leadership lost: the lease was not renewed in time");
                return;
            }
        }
    }
}

/// Gives the Lease up (graceful shutdown): the standby need not wait for it to expire.
async fn release_lease(api: &Api<Lease>, cfg: &LeaseConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else { return };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(&cfg.identity) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    lease.spec = Some(spec);
    if let Err(e) = api.replace(&cfg.name, &PostParams::default(), &lease).await {
        tracing::warn!(error = %e, "could not release the lease");
    }
}

/// How the elector is told to stop: the graceful path releases the Lease; a candidate that dies
/// (its future dropped) stops renewing without releasing it, as a killed process would.
struct Release;

/// Takes part in the election until told to stop: says through `leading` whether this candidate
/// holds the Lease now.
async fn elect(
    client: Client,
    lease: LeaseConfig,
    leading: tokio::sync::watch::Sender<bool>,
    readiness: crate::admin::Readiness,
    mut stop: tokio::sync::oneshot::Receiver<Release>,
) {
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    let mut seen = None;
    let mut waiting_on = None;
    loop {
        let won = tokio::select! {
            release = &mut stop => {
                if release.is_ok() {
                    release_lease(&api, &lease).await;
                }
                return;
            }
            attempt = try_acquire(&api, &lease, &mut seen) => attempt,
        };
        let pause = match won {
            Ok(Attempt::Won) => None,
            Ok(Attempt::Held(holder)) => {
                // A healthy standby is ready: it has nothing to sync until it leads.
                readiness.set(true);
                if waiting_on.as_ref() != Some(&holder) {
                    tracing::info!(%holder, "standing by: another instance leads");
                    waiting_on = Some(holder);
                }
                Some(lease.retry())
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read or take the lease");
                Some(lease.retry())
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                release = &mut stop => {
                    if release.is_ok() {
                        release_lease(&api, &lease).await;
                    }
                    return;
                }
                _ = tokio::time::sleep(pause) => continue,
            }
        }
        tracing::info!(identity = %lease.identity, "leading: starting controllers");
        waiting_on = None;
        seen = None;
        let _ = leading.send(true);
        tokio::select! {
            _ = hold(&api, &lease) => {
                let _ = leading.send(false);
            }
            release = &mut stop => {
                if release.is_ok() {
                    release_lease(&api, &lease).await;
                }
                return;
            }
        }
    }
}

/// Waits until `leading` says `leads`; false when the elector is gone.
async fn until(leading: &mut tokio::sync::watch::Receiver<bool>, leads: bool) -> bool {
    leading.wait_for(|now| *now == leads).await.is_ok()
}

/// Runs the controllers whenever this candidate holds the Lease, until `shutdown` resolves.
/// Losing the Lease stops the controllers at once (no graceful wait: another leader may start);
/// `shutdown` stops them gracefully (byte moves in flight are cancelled) and releases the Lease.
/// A candidate that is dropped (a test's dead process) takes its controllers with it.
///
/// The election runs on a thread of its own with its own runtime, and with the client that
/// `lease_client` makes there (its own connections): however busy the controllers keep this
/// process and its client, renewals are neither queued behind them nor starved of CPU.
pub async fn run(
    client: Client,
    lease_client: impl FnOnce() -> Client + Send + 'static,
    lease: LeaseConfig,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let (leading_tx, mut leading) = tokio::sync::watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    let readiness = config.readiness.clone();
    let elector = std::thread::Builder::new().name("ims-lease".into()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            // The client is made inside the runtime: its connections and workers live there.
            Ok(runtime) => runtime.block_on(async move {
                elect(lease_client(), lease, leading_tx, readiness, stopped).await;
            }),
            Err(e) => tracing::error!(error = %e, "cannot start the leader election's runtime"),
        }
        let _ = done_tx.send(());
    });
    if let Err(e) = elector {
        tracing::error!(error = %e, "cannot start the leader election's thread");
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.clone() => break,
            elector_alive = until(&mut leading, true) => if !elector_alive { return },
        }
        let mut controllers =
            controllers::AbortOnDrop(tokio::spawn(controllers::run(client.clone(), config.clone(), shutdown.clone())));
        tokio::select! {
            _ = until(&mut leading, false) => {
                controllers.0.abort();
                let _ = (&mut controllers.0).await;
                config.readiness.set(false);
            }
            _ = shutdown.clone() => {
                let _ = (&mut controllers.0).await;
                break;
            }
        }
    }
    // Graceful: release the Lease and wait for the elector to say it has.
    let _ = stop.send(Release);
    let _ = done.await;
}
