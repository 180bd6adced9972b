//! References (`source.image`): a tenant's handle on another tenant's image. No bytes move and
//! no quota is used; the reference is Active while its source is Active, in the same region,
//! and open to the tenant (Public in the platform namespace, Marketplace, or granted by an
//! ImageShare). It binds to the source's uid, so a source re-created under the same name is
//! `SourceReplaced`, never followed silently.
//!
//! No existence oracle: until a reference has been granted once, a missing source and one not
//! shared with the tenant look the same (`NotShared`, same message).

use std::{sync::Arc, time::Duration};

use kube::{Api, ResourceExt, runtime::controller::Action, runtime::reflector::ObjectRef};

use super::write;
use crate::{
    api::{
        BoundSource, Image, ImagePhase, ImageReference, ImageStatus,
        conditions::{Reason, ready_reason},
    },
    controllers::{Context, Error, share, status},
    policy::{
        image::{ACTIVE_MESSAGE, with_phase},
        share::open_to,
    },
};

/// How often a reference re-checks on its own (every change it depends on also re-runs it).
const RECHECK: Duration = Duration::from_secs(300);

/// What a reference should show.
#[derive(Debug)]
enum Outcome {
    Active(Arc<Image>),
    Waiting(ImagePhase, Reason, String),
}

fn decide(ctx: &Context, image: &Image, target: &ImageReference, old: &ImageStatus) -> Outcome {
    let tenant = image.namespace().unwrap_or_default();
    let source_name = format!("{}/{}", target.namespace, target.name);
    let bound = old.source.as_ref().map(|s| s.uid.as_str());
    let was = ready_reason(&old.conditions);
    let source = ctx.images.get(&ObjectRef::<Image>::new(&target.name).within(&target.namespace));
    let not_shared = || {
        Outcome::Waiting(
            ImagePhase::Unavailable,
            Reason::NotShared,
            format!(
                "Image {source_name} is not shared with namespace {tenant}: ask its owner to add {tenant} to an ImageShare of it (the reference becomes Active by itself)"
            ),
        )
    };
    let revoked = || {
        Outcome::Waiting(
            ImagePhase::Unavailable,
            Reason::ShareRevoked,
            format!(
                "Image {source_name} is no longer shared with namespace {tenant}: its owner stopped sharing it; running servers are not affected, new ones cannot use it"
            ),
        )
    };
    let granted = source.as_ref().is_some_and(|s| {
        open_to(s, &tenant, &ctx.config.public_namespace)
            || share::evaluation(ctx, &target.namespace, &target.name).lists(&tenant)
    });
    let Some(source) = source.clone().filter(|_| granted) else {
        return match (bound, source) {
            (None, _) => not_shared(),
            // Once granted, the tenant may learn that the source went away, unless its grant
            // had gone first.
            (Some(_), None) if was != Some(Reason::ShareRevoked.as_str()) => Outcome::Waiting(
                ImagePhase::Unavailable,
                Reason::SourceDeleted,
                format!(
                    "Image {source_name} was deleted by its owner: this reference can no longer be used; delete it (running servers are not affected)"
                ),
            ),
            (Some(_), _) => revoked(),
        };
    };
    let uid = source.uid().unwrap_or_default();
    if bound.is_some_and(|b| b != uid) {
        return Outcome::Waiting(
            ImagePhase::Unavailable,
            Reason::SourceReplaced,
            format!(
                "Image {source_name} was deleted and created again: this reference stays bound to the image it was granted (uid {}) and does not follow new bytes; delete and re-create the reference to use the new image",
                bound.unwrap_or_default()
            ),
        );
    }
    if source.spec.region != image.spec.region {
        return Outcome::Waiting(
            ImagePhase::Failed,
            Reason::RegionMismatch,
            format!(
                "Image {source_name} is in region {}, this reference in {}: create the reference in region {}, or ask the owner to copy the image to {} (ImageCopy)",
                source.spec.region, image.spec.region, source.spec.region, image.spec.region
            ),
        );
    }
    if source.status.as_ref().and_then(|s| s.phase) != Some(ImagePhase::Active) {
        let phase = if bound.is_some() { ImagePhase::Unavailable } else { ImagePhase::Queued };
        return Outcome::Waiting(
            phase,
            Reason::SourceNotActive,
            format!("Image {source_name} is not Active: the reference becomes Active when it is"),
        );
    }
    Outcome::Active(source)
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
    let desired = match decide(ctx, &image, target, &old) {
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
                progress: None,
                ..active
            }
        }
        Outcome::Waiting(phase, reason, message) => ImageStatus {
            location: None,
            progress: None,
            ..with_phase(&old, generation, phase, reason, &message, &now)
        },
    };
    write(ctx, api, &image, &desired).await?;
    Ok(Action::requeue(RECHECK))
}
