//! References (`source.image`): a tenant's handle on another tenant's image. No bytes move and
//! no quota is used. The rules are [`crate::policy::reference`]; this looks up the source and
//! its grants (Public in the platform namespace, Marketplace, or an ImageShare) and writes the
//! outcome once.

use std::{sync::Arc, time::Duration};

use kube::{Api, ResourceExt, runtime::controller::Action, runtime::reflector::ObjectRef};

use super::write;
use crate::{
    api::{BoundSource, Image, ImagePhase, ImageReference, ImageStatus, conditions::Reason},
    controllers::{Context, Error, share, status},
    policy::{
        image::{ACTIVE_MESSAGE, with_phase},
        marketplace,
        reference::{Outcome, decide},
        share::open_to,
    },
};

/// How often a reference re-checks on its own (every change it depends on also re-runs it).
const RECHECK: Duration = Duration::from_secs(300);

/// The source a reference to `target` from namespace `tenant` names (from the cache), and
/// whether it is open to `tenant` right now: Public in the platform namespace, Marketplace, or
/// listed in an ImageShare of it.
pub fn source_and_grant(ctx: &Context, tenant: &str, target: &ImageReference) -> (Option<Arc<Image>>, bool) {
    let source = ctx.images.get(&ObjectRef::<Image>::new(&target.name).within(&target.namespace));
    let granted = source.as_ref().is_some_and(|s| {
        open_to(s, tenant, &ctx.config.public_namespace)
            || share::evaluation(ctx, &target.namespace, &target.name).lists(tenant)
    });
    (source, granted)
}

/// Reconciles a reference.
pub async fn apply(
    image: Arc<Image>,
    target: &ImageReference,
    ctx: &Context,
    api: &Api<Image>,
) -> Result<Action, Error> {
    let old = image.status.clone().unwrap_or_default();
    let generation = image.metadata.generation;
    let now = status::now();
    let (source, granted) = source_and_grant(ctx, &image.namespace().unwrap_or_default(), target);
    let desired = match decide(&image, target, source.as_deref(), granted) {
        Outcome::Active(source) => {
            let from = source.status.clone().unwrap_or_default();
            let active = with_phase(&old, generation, ImagePhase::Active, Reason::Active, ACTIVE_MESSAGE, &now);
            ImageStatus {
                source: Some(BoundSource { uid: source.uid().unwrap_or_default() }),
                format: from.format,
                size_bytes: from.size_bytes,
                virtual_size_bytes: from.virtual_size_bytes,
                checksum: from.checksum,
                location: from.location,
                disks: from.disks,
                r#type: Some(source.spec.r#type),
                os: source.spec.os.clone(),
                // The terms the tenant uses a Marketplace image under (metered per hour).
                marketplace: marketplace::published_terms(source).cloned(),
                progress: None,
                ..active
            }
        }
        Outcome::Waiting(phase, reason, message) => ImageStatus {
            location: None,
            progress: None,
            marketplace: None,
            ..with_phase(&old, generation, phase, reason, &message, &now)
        },
    };
    write(ctx, api, &image, &desired).await?;
    Ok(Action::requeue(RECHECK))
}
