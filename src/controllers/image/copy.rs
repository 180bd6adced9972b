//! Copies (`source.copy`): the bytes of another image of the same namespace — owned, or an
//! Active reference (then the bytes of the image it is bound to) — moved store to store into
//! this image. The copy rules hold for every such Image, written by an ImageCopy or by hand.

use kube::{ResourceExt, runtime::reflector::ObjectRef};

use super::bytes::{From, Part, object_name};
use crate::{
    api::{DiskRole, Image, ImagePhase, Lineage, conditions::Reason},
    controllers::Context,
    policy,
};

/// Why a copy cannot run now: (phase, reason, message).
pub type Refusal = (ImagePhase, Reason, String);

/// What a copy moves.
pub struct Plan {
    /// Region the bytes are in.
    pub from_region: String,
    /// Whether they cross regions.
    pub cross_region: bool,
    /// The image the bytes belong to (the bound source of a reference).
    pub lineage: Lineage,
    /// `(namespace, name, uid)` of the image whose store prefix holds the bytes.
    origin: (String, String, String),
    /// `(disk index, role, sha256, size)` of every object to move.
    objects: Vec<(usize, Option<DiskRole>, String, i64)>,
    /// Whether those objects are encrypted.
    sealed: bool,
}

impl Plan {
    /// The parts to move, from the source region's store.
    pub fn parts(&self, from: &crate::store::RegionStore) -> Vec<Part> {
        let (namespace, name, uid) = &self.origin;
        let prefix = from.image_prefix(namespace, name, uid);
        self.objects
            .iter()
            .map(|(index, role, sha256, _)| Part {
                role: *role,
                from: From::Object {
                    store: from.clone(),
                    object: prefix.clone().join(object_name(*role, *index).as_str()),
                    sha256: sha256.clone(),
                    sealed: self.sealed,
                },
            })
            .collect()
    }

    /// Bytes to move.
    pub fn total(&self) -> u64 {
        self.objects.iter().map(|o| o.3.max(0) as u64).sum()
    }

    /// What the image shows while its bytes move.
    pub fn message(&self, source: &str) -> String {
        let Lineage { namespace, name, region, .. } = &self.lineage;
        format!("copying {source} ({namespace}/{name}, region {region})")
    }
}

/// Checks the copy rules and finds the bytes for `image`, whose `source.copy` names `source`.
pub fn plan(ctx: &Context, image: &Image, source: &str) -> Result<Plan, Refusal> {
    let namespace = image.namespace().unwrap_or_default();
    if source == image.name_any() {
        // It could never become Active: it would wait for itself.
        let refused = policy::copy::Refusal::SelfCopy;
        return Err((ImagePhase::Failed, refused.image_reason(), refused.message(source)));
    }
    let waiting = || {
        (
            ImagePhase::Queued,
            Reason::SourceNotActive,
            format!(
                "Image {source} does not exist or is not Active in namespace {namespace}: the copy starts when it is"
            ),
        )
    };
    let src = ctx.images.get(&ObjectRef::<Image>::new(source).within(&namespace)).ok_or_else(waiting)?;
    let status = src.status.clone().unwrap_or_default();
    if status.phase != Some(ImagePhase::Active) {
        return Err(waiting());
    }
    // A reference's bytes are those of the image it is bound to.
    let (origin, origin_image) = match &src.spec.source.image {
        Some(target) => {
            let uid = status.source.as_ref().map(|s| s.uid.clone()).unwrap_or_default();
            let owner = ctx.images.get(&ObjectRef::<Image>::new(&target.name).within(&target.namespace));
            match owner {
                Some(owner) if owner.uid().as_deref() == Some(uid.as_str()) => {
                    ((target.namespace.clone(), target.name.clone(), uid), owner)
                }
                _ => return Err(waiting()),
            }
        }
        None => ((namespace.clone(), src.name_any(), src.uid().unwrap_or_default()), src.clone()),
    };
    let cross_region =
        policy::copy::check(&src, &origin_image, &image.spec.region, &ctx.config.policy).map_err(|r| {
            let phase = if r.waits() { ImagePhase::Queued } else { ImagePhase::Failed };
            (phase, r.image_reason(), r.message(source))
        })?;
    let size = status.size_bytes.unwrap_or(0);
    let objects = if status.disks.is_empty() {
        let sha256 = status.checksum.as_ref().map(|c| c.sha256.clone()).unwrap_or_default();
        vec![(0, None, sha256, size)]
    } else {
        status
            .disks
            .iter()
            .map(|d| {
                let role = if d.role == "Data" { DiskRole::Data } else { DiskRole::System };
                (
                    usize::try_from(d.index).unwrap_or_default(),
                    Some(role),
                    d.sha256.clone().unwrap_or_default(),
                    d.size_bytes.unwrap_or(0),
                )
            })
            .collect()
    };
    Ok(Plan {
        from_region: src.spec.region.clone(),
        cross_region,
        lineage: Lineage {
            namespace: origin.0.clone(),
            name: origin.1.clone(),
            region: origin_image.spec.region.clone(),
            // The terms follow the bytes: those of the Marketplace image they come from.
            marketplace: policy::marketplace::binding(&origin_image),
        },
        origin,
        objects,
        sealed: origin_image.spec.encryption.is_some(),
    })
}
