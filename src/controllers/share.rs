//! The ImageShare controller: decides, for every member of a share, whether the tenant may use
//! the image (the rules live in [`crate::policy::share`]) and reports it. A member is
//! `Accepted` while a reference to the image exists in its namespace; a tenant removed from the
//! list stays `Revoked` while its reference still exists. The grants themselves are read by the
//! Image controller when it binds references.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, channel::mpsc::UnboundedReceiver};
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{Context, Error, Shutdown, status};
use crate::{
    api::{
        Image, ImageShare, ImageShareStatus, MemberState,
        conditions::{ConditionType, Reason, find},
    },
    policy::{
        self,
        share::{Evaluation, evaluate},
    },
};

/// Field manager of ImageShare status.
pub const MANAGER: &str = "ims-operator/imageshare";

/// Runs the ImageShare controller until shutdown; `triggers` re-run shares whose image, or a
/// reference to it, or a member namespace changed.
pub async fn run(ctx: Arc<Context>, triggers: UnboundedReceiver<ObjectRef<ImageShare>>, shutdown: Shutdown) {
    super::controller(ctx.shares.clone(), shutdown)
        .reconcile_on(triggers)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Every ImageShare of `namespace` naming `image` and not being deleted, from the cache.
pub fn shares_of(ctx: &Context, namespace: &str, image: &str) -> Vec<Arc<ImageShare>> {
    ctx.shares_of
        .get(namespace, image)
        .iter()
        .filter_map(|r| ctx.shares.get(r))
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .collect()
}

/// The verdicts over every ImageShare of `namespace/image`.
pub fn evaluation(ctx: &Context, namespace: &str, image: &str) -> Evaluation {
    evaluation_with(ctx, namespace, image, None)
}

/// [`evaluation`], with `current` (the share being reconciled, which its own watch may have
/// delivered before the cache has it, or has this version of it) in place of its cached copy.
fn evaluation_with(ctx: &Context, namespace: &str, image: &str, current: Option<&ImageShare>) -> Evaluation {
    let cached = shares_of(ctx, namespace, image);
    let mut shares: Vec<&ImageShare> =
        cached.iter().map(|s| s.as_ref()).filter(|s| current.is_none_or(|c| c.uid() != s.uid())).collect();
    shares.extend(current);
    let source = ctx.images.get(&ObjectRef::<Image>::new(image).within(namespace));
    evaluate(
        namespace,
        image,
        source.as_deref(),
        &shares,
        |tenant| ctx.namespaces.get(&ObjectRef::new(tenant)).is_some(),
        &ctx.config.policy,
        &ctx.config.public_namespace,
    )
}

/// Whether `tenant` holds a reference to `namespace/image` (acceptance).
fn has_reference(ctx: &Context, namespace: &str, image: &str, tenant: &str) -> bool {
    ctx.references.get(namespace, image).iter().any(|r| r.namespace.as_deref() == Some(tenant))
}

#[tracing::instrument(skip_all, fields(share = %share.name_any(), namespace = ?share.namespace()))]
async fn reconcile(share: Arc<ImageShare>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.config.metrics.reconcile("share");
    let Some(namespace) = share.namespace() else { return Ok(Action::await_change()) };
    if share.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let image = &share.spec.image;
    let eval = evaluation_with(&ctx, &namespace, image, Some(&share));
    let desired =
        policy::share::status(&share, &eval, |tenant| has_reference(&ctx, &namespace, image, tenant), &status::now());
    let api: Api<ImageShare> = Api::namespaced(ctx.client.clone(), &namespace);
    announce(&ctx, &share, &desired).await;
    status::apply_status(&api, &share.name_any(), MANAGER, share.status.as_ref(), &desired).await?;
    ctx.backoff.reset(&backoff_key(&share));
    Ok(Action::await_change())
}

/// An Event for the owner when the share's Ready reason changes (refused, member invalid,
/// shared), and one per member that was revoked; requeues that change nothing publish nothing.
async fn announce(ctx: &Context, share: &ImageShare, desired: &ImageShareStatus) {
    use kube::Resource;
    let ready = |s: Option<&ImageShareStatus>| {
        s.and_then(|s| find(&s.conditions, ConditionType::Ready)).map(|c| (c.status.clone(), c.reason.clone()))
    };
    let mut events = Vec::new();
    if ready(Some(desired)) != ready(share.status.as_ref())
        && let Some(c) = find(&desired.conditions, ConditionType::Ready)
    {
        events.push((c.status != "True", c.reason.clone(), c.message.clone()));
    }
    let old = share.status.clone().unwrap_or_default();
    for m in desired.members.iter().filter(|m| m.state == MemberState::Revoked) {
        if !old.members.iter().any(|o| o.tenant == m.tenant && o.state == MemberState::Revoked) {
            events.push((
                false,
                Reason::ShareRevoked.into(),
                format!("stopped sharing with {}: its references are Unavailable", m.tenant),
            ));
        }
    }
    for (warning, reason, note) in events {
        ctx.publish_event(&share.object_ref(&()), warning, reason, &note, "Share").await;
    }
}

fn error_policy(share: Arc<ImageShare>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.config.metrics.error("share", err.metric_label());
    tracing::warn!(share = %share.name_any(), error = %err, label = err.metric_label(), "reconcile failed");
    Action::requeue(ctx.backoff.next(&backoff_key(&share)).min(Duration::from_secs(60)))
}

fn backoff_key(share: &ImageShare) -> String {
    format!("share/{}/{}", share.namespace().unwrap_or_default(), share.name_any())
}

#[cfg(test)]
mod tests {

    use kube::api::PostParams;
    use serde_json::json;

    use super::*;

    /// A share's own watch can run it before the shared cache has it (or has its new spec):
    /// its status is of the share as it is, not as the cache last saw it.
    #[tokio::test]
    async fn a_share_the_cache_has_not_seen_yet_lists_its_members() {
        let (client, namespaces) = crate::controllers::test_api(&["t", "u"]).await;
        let (ctx, mut caches) = Context::for_test(client.clone());
        for ns in namespaces {
            caches.namespaces.apply_watcher_event(&kube::runtime::watcher::Event::Apply(ns));
        }
        let shares: Api<ImageShare> = Api::namespaced(client, "t");
        let share = json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageShare", "metadata": {"name": "s"},
            "spec": {"image": "img", "tenants": ["u"]}});
        let share = shares.create(&PostParams::default(), &serde_json::from_value(share).unwrap()).await.unwrap();

        reconcile(Arc::new(share), Arc::new(ctx)).await.unwrap();
        let status = shares.get("s").await.unwrap().status.unwrap();
        let members: Vec<(String, MemberState)> = status.members.into_iter().map(|m| (m.tenant, m.state)).collect();
        assert_eq!(members, [("u".to_string(), MemberState::Pending)]);
    }
}
