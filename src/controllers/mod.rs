//! The controllers, one module a kind. Each reconcile reads as fetch -> decide -> act -> write
//! status; the decisions live in [`crate::policy`].
//!
//! Until a kind's issue lands its reconciler observes only: it writes nothing.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, future::BoxFuture};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{Controller, controller::Action, watcher},
};
use serde::de::DeserializeOwned;

use crate::{
    api::{Image, ImageCopy, ImageQuota, ImageShare, Region},
    policy::Policy,
};

/// What every controller shares.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Limits.
    pub policy: Policy,
    /// The platform namespace: the only one where `visibility: Public` is allowed.
    pub public_namespace: String,
}

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
        }
    }
}

/// A shutdown trigger every controller can await.
type Shutdown = futures::future::Shared<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>>;

/// Runs every controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(ctx: Context, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let ctx = Arc::new(ctx);
    let shutdown: Shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let controllers: Vec<BoxFuture<'static, ()>> = vec![
        observe::<Region>(Api::all(ctx.client.clone()), ctx.clone(), shutdown.clone()),
        observe::<Image>(Api::all(ctx.client.clone()), ctx.clone(), shutdown.clone()),
        observe::<ImageShare>(Api::all(ctx.client.clone()), ctx.clone(), shutdown.clone()),
        observe::<ImageCopy>(Api::all(ctx.client.clone()), ctx.clone(), shutdown.clone()),
        observe::<ImageQuota>(Api::all(ctx.client.clone()), ctx.clone(), shutdown.clone()),
    ];
    futures::future::join_all(controllers).await;
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
