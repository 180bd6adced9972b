//! The Region controller: probes each region's store and reports `Ready`, with the number of
//! images and bytes it holds.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, channel::mpsc::UnboundedReceiver};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        controller::Action,
        finalizer::{Event, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};

use super::{Context, Error, Shutdown, status};
use crate::{
    api::{
        Image, Region,
        conditions::{Reason, ready_reason},
    },
    policy::region::{self, Probe},
    store::{RegionStore, S3Credentials, StoreError},
};

/// Field manager of Region status.
pub const MANAGER: &str = "ims-operator/region";
/// Holds a Region's deletion while images use it.
pub const REGION_FINALIZER: &str = "ims.io/region-in-use";
/// How often a Ready region is probed again.
pub const REPROBE: Duration = Duration::from_secs(300);

/// Runs the Region controller until shutdown; `triggers` re-run the regions whose images changed
/// (sent by the shared Image watch after its cache has the change, so the recount sees it).
pub async fn run(ctx: Arc<Context>, triggers: UnboundedReceiver<ObjectRef<Region>>, shutdown: Shutdown) {
    let client = ctx.client.clone();
    let on_secret = ctx.clone();
    // A Secret created, rotated or deleted re-probes the Regions that name it, with the new
    // credentials, at once (only the operator's namespace is watched: the Role grants no more).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ctx.config.operator_namespace);
    super::controller(ctx.regions.clone(), shutdown)
        .reconcile_on(triggers)
        .watches(secrets, watcher::Config::default().any_semantic(), move |secret: Secret| {
            let name = secret.name_any();
            let named: Vec<ObjectRef<Region>> = on_secret
                .regions
                .state()
                .iter()
                .filter(|r| {
                    let kms = r.spec.kms.as_ref().and_then(|k| k.secret_ref.as_ref());
                    [r.spec.storage.secret_ref.as_ref(), kms].into_iter().flatten().any(|s| s.name == name)
                })
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect();
            for region in &named {
                on_secret.forget_probe(&region.name);
            }
            named
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[tracing::instrument(skip_all, fields(region = %region.name_any()))]
async fn reconcile(region: Arc<Region>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.config.metrics.reconcile("region");
    let api: Api<Region> = Api::all(ctx.client.clone());
    let outcome = finalizer(&api, REGION_FINALIZER, region, |event| async {
        match event {
            Event::Apply(region) => apply(&region, &ctx, &api).await,
            Event::Cleanup(region) => cleanup(&region, &ctx, &api).await,
        }
    })
    .await;
    super::error::finalizer_outcome(outcome)
}

async fn apply(region: &Region, ctx: &Context, api: &Api<Region>) -> Result<Action, Error> {
    let name = region.name_any();
    let generation = region.metadata.generation;
    // Decide: a store an older Region has is refused before anything touches it.
    let conflict = region::store_conflict(region, ctx.regions.state().iter().map(|r| r.as_ref()));
    // Fetch + act: probe at most every REPROBE per generation; image changes only recount.
    let probe = match (conflict, ctx.cached_probe(&name, generation)) {
        (Some(message), _) => {
            ctx.forget_store(&name);
            Probe::Conflict(message)
        }
        (None, Some(p)) => p,
        (None, None) => {
            let p = probe(region, ctx).await;
            ctx.remember_probe(&name, generation, &p);
            p
        }
    };
    let images = ctx.images.state();
    let usage = region::usage(&name, images.iter().map(|i| i.as_ref()));
    let old = region.status.clone().unwrap_or_default();
    let desired = region::status(generation, &probe, usage, &old, &status::now());
    // Write status.
    status::apply_status(api, &name, MANAGER, region.status.as_ref(), &desired).await?;
    Ok(match probe {
        Probe::Ready => Action::requeue(REPROBE),
        Probe::Unreachable(_) => Action::requeue(Duration::from_secs(30)),
        Probe::InvalidSpec(_) | Probe::SecretNotFound(_) | Probe::Conflict(_) => Action::await_change(),
    })
}

/// A Region being deleted waits for every image that uses it (their bytes are in its store,
/// and their cleanup needs it): it shows `Ready=False/RegionInUse`, tells each image's owner
/// once with an Event, and goes when the last image has (image changes re-run it).
async fn cleanup(region: &Region, ctx: &Context, api: &Api<Region>) -> Result<Action, Error> {
    let name = region.name_any();
    let images = ctx.images.state();
    let using: Vec<&Image> = images.iter().map(|i| i.as_ref()).filter(|i| i.spec.region == name).collect();
    if using.is_empty() {
        ctx.forget_probe(&name);
        ctx.forget_store(&name);
        return Ok(Action::await_change());
    }
    let old = region.status.clone().unwrap_or_default();
    let announced = ready_reason(&old.conditions) == Some(Reason::RegionInUse.as_str());
    let (desired, note) = region::deleting(&name, region.metadata.generation, &using, &old, &status::now());
    if !announced {
        for image in &using {
            ctx.publish_event(&image.object_ref(&()), true, "RegionDeleting".into(), &note, "Delete").await;
        }
    }
    status::apply_status(api, &name, MANAGER, region.status.as_ref(), &desired).await?;
    Err(Error::InUse(desired.conditions.first().map(|c| c.message.clone()).unwrap_or_default()))
}

async fn probe(region: &Region, ctx: &Context) -> Probe {
    let store = match open(region, ctx).await {
        Ok(store) => store,
        Err(probe) => return probe,
    };
    match tokio::time::timeout(Duration::from_secs(30), store.probe()).await {
        Ok(Ok(())) => {
            ctx.stores.lock().map(|mut s| s.insert(region.name_any(), store)).ok();
            Probe::Ready
        }
        Ok(Err(StoreError::InvalidSpec(m))) => Probe::InvalidSpec(m),
        Ok(Err(e)) => Probe::Unreachable(format!("the store failed a write/read/delete probe: {e}")),
        Err(_) => Probe::Unreachable("the store did not answer a probe within 30s".into()),
    }
}

/// Opens a region's store, with the credentials its Secret holds, without probing it; the
/// error is the probe outcome that says why it cannot be opened.
pub async fn open(region: &Region, ctx: &Context) -> Result<RegionStore, Probe> {
    let storage = &region.spec.storage;
    let credentials = match &storage.secret_ref {
        Some(secret_ref) if storage.url.starts_with("s3://") => Some(credentials(ctx, secret_ref, "").await?),
        _ => None,
    };
    let kms = kms(region, ctx).await?;
    let store = RegionStore::open(storage, &ctx.config.stores, credentials.as_ref()).map_err(|e| match e {
        StoreError::InvalidSpec(m) => Probe::InvalidSpec(m),
        e => Probe::Unreachable(e.to_string()),
    })?;
    Ok(store.with_kms(kms))
}

/// The `accessKeyID` and `secretAccessKey` of the Secret `secret_ref` names in the operator's
/// namespace, or the probe outcome that says what is wrong (`field` names the reference in it).
async fn credentials(
    ctx: &Context,
    secret_ref: &crate::api::SecretReference,
    field: &str,
) -> Result<S3Credentials, Probe> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.operator_namespace);
    let name = format!("{}/{}{field}", ctx.config.operator_namespace, secret_ref.name);
    match secrets.get_opt(&secret_ref.name).await {
        Ok(Some(secret)) => s3_credentials(&secret).ok_or_else(|| {
            Probe::SecretNotFound(format!("Secret {name} needs the keys accessKeyID and secretAccessKey"))
        }),
        Ok(None) => Err(Probe::SecretNotFound(format!(
            "Secret {name} not found: create it with the keys accessKeyID and secretAccessKey"
        ))),
        Err(e) => Err(Probe::Unreachable(format!("cannot read Secret {name}: {e}"))),
    }
}

/// The KMS a Region names (`spec.kms`; the local one when unset), or the probe outcome that
/// says why it cannot be had.
async fn kms(region: &Region, ctx: &Context) -> Result<crate::crypt::Kms, Probe> {
    use crate::{api::KmsProvider, crypt};
    let Some(spec) = region.spec.kms.as_ref().filter(|k| k.provider == KmsProvider::Aws) else {
        return Ok(crypt::Kms::Local(ctx.local_kms.clone()));
    };
    let (Some(endpoint), Some(secret_ref)) = (spec.endpoint.as_deref(), spec.secret_ref.as_ref()) else {
        return Err(Probe::InvalidSpec("kms: provider AWS needs endpoint and secretRef".into()));
    };
    let S3Credentials { access_key_id, secret_access_key } =
        credentials(ctx, secret_ref, " (spec.kms.secretRef)").await?;
    let credentials = crypt::aws::Credentials { access_key_id, secret_access_key, session_token: None };
    let client = crypt::aws::AwsKms::new(endpoint, spec.aws_region.as_deref().unwrap_or("us-east-1"), credentials)
        .map_err(|e| Probe::InvalidSpec(format!("kms: {e}")))?;
    Ok(crypt::Kms::aws(client))
}

/// Whether a region's status says Ready.
pub fn is_ready(region: &Region) -> bool {
    region.status.as_ref().is_some_and(|s| crate::api::conditions::is_ready(&s.conditions))
}

/// Credentials from a Secret's `accessKeyID` and `secretAccessKey`.
pub fn s3_credentials(secret: &Secret) -> Option<S3Credentials> {
    let data = secret.data.as_ref()?;
    let get = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|s| !s.is_empty());
    Some(S3Credentials { access_key_id: get("accessKeyID")?, secret_access_key: get("secretAccessKey")? })
}

fn error_policy(region: Arc<Region>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.config.metrics.error("region", err.metric_label());
    tracing::warn!(region = %region.name_any(), error = %err, label = err.metric_label(), "reconcile failed");
    match err {
        // Its images' changes re-run it; this is a backstop.
        Error::Finalizer(e)
            if matches!(e.as_ref(), kube::runtime::finalizer::Error::CleanupFailed(Error::InUse(_))) =>
        {
            Action::requeue(Duration::from_secs(60))
        }
        _ => Action::requeue(Duration::from_secs(5)),
    }
}
