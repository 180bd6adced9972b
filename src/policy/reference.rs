//! The reference rules (`source.image`): a tenant's handle on another tenant's image is Active
//! while its source is Active, in the same region, and open to the tenant; it binds to the
//! source's uid, so a source re-created under the same name is `SourceReplaced`, never followed
//! silently.

use kube::ResourceExt;

use crate::api::{
    Image, ImagePhase, ImageReference,
    conditions::{Reason, ready_reason},
};

/// What a reference should show.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// Active, bound to this source.
    Active(&'a Image),
    /// Not usable: the phase, reason and message to show.
    Waiting(ImagePhase, Reason, String),
}

/// What the reference `image` (to `target`) shows, given its source (`None`: not found) and
/// whether the source is open to the reference's namespace (Public, Marketplace, or an
/// ImageShare listing it). Until a reference has been granted once, a missing source and one
/// not shared look the same: no existence oracle.
pub fn decide<'a>(image: &Image, target: &ImageReference, source: Option<&'a Image>, granted: bool) -> Outcome<'a> {
    let old = image.status.clone().unwrap_or_default();
    let tenant = image.namespace().unwrap_or_default();
    let source_name = format!("{}/{}", target.namespace, target.name);
    let bound = old.source.as_ref().map(|s| s.uid.as_str());
    let was = ready_reason(&old.conditions);
    // What the tenant may always be told: about its own namespace.
    if target.namespace == tenant && target.name == image.name_any() {
        return Outcome::Waiting(
            ImagePhase::Failed,
            Reason::InvalidSpec,
            "source.image names this image itself: a reference points at another image (a shared, Public or Marketplace one); correct spec.source.image".into(),
        );
    }
    if target.namespace == tenant && source.is_some_and(|s| s.spec.source.image.is_some()) {
        return Outcome::Waiting(
            ImagePhase::Failed,
            Reason::InvalidSpec,
            format!(
                "Image {source_name} is itself a reference: references are never re-shared or chained; point spec.source.image at the image it refers to"
            ),
        );
    }
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
    let Some(source) = source.filter(|_| granted) else {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn image(namespace: &str, uid: &str, region: &str, spec: serde_json::Value, status: serde_json::Value) -> Image {
        let mut full = json!({"region": region, "type": "DataDisk", "source": {"url": {"url": "https://x/y"}}});
        full.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
        let mut image = Image::new("i", serde_json::from_value(full).unwrap());
        image.metadata.namespace = Some(namespace.into());
        image.metadata.uid = Some(uid.into());
        image.status = Some(serde_json::from_value(status).unwrap());
        image
    }

    /// A reference in `tenant`, bound to `bound` (or never granted) with `was` as its Ready reason.
    fn reference(bound: Option<&str>, was: Option<&str>) -> Image {
        let mut status = json!({});
        if let Some(uid) = bound {
            status["source"] = json!({"uid": uid});
        }
        if let Some(reason) = was {
            status["conditions"] = json!([{"type": "Ready", "status": "False", "reason": reason, "message": "m",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
        }
        image("tenant", "ref", "r1", json!({"source": {"image": {"namespace": "owner", "name": "i"}}}), status)
    }

    fn outcome(o: Outcome<'_>) -> (ImagePhase, Option<Reason>) {
        match o {
            Outcome::Active(_) => (ImagePhase::Active, None),
            Outcome::Waiting(phase, reason, _) => (phase, Some(reason)),
        }
    }

    #[test]
    fn every_outcome_of_the_contract() {
        let active = image("owner", "u1", "r1", json!({}), json!({"phase": "Active"}));
        let saving = image("owner", "u1", "r1", json!({}), json!({"phase": "Saving"}));
        let elsewhere = image("owner", "u1", "r2", json!({}), json!({"phase": "Active"}));
        let recreated = image("owner", "u2", "r1", json!({}), json!({"phase": "Active"}));
        let self_reference = || {
            let spec = json!({"source": {"image": {"namespace": "tenant", "name": "i"}}});
            image("tenant", "ref", "r1", spec, json!({}))
        };
        let chained = || {
            let spec = json!({"source": {"image": {"namespace": "tenant", "name": "other"}}});
            image("tenant", "ref", "r1", spec, json!({}))
        };
        let spec = json!({"source": {"image": {"namespace": "owner", "name": "i"}}});
        let same_namespace_reference = image("tenant", "u3", "r1", spec, json!({"phase": "Active"}));
        use ImagePhase::{Active, Failed, Queued, Unavailable};
        // (reference, its source, granted, what it shows)
        type Case<'a> = (Image, Option<&'a Image>, bool, (ImagePhase, Option<Reason>));
        let cases: [Case; 12] = [
            (reference(None, None), Some(&active), true, (Active, None)),
            // No oracle: never granted, missing and not shared look the same.
            (reference(None, None), None, false, (Unavailable, Some(Reason::NotShared))),
            (reference(None, None), Some(&active), false, (Unavailable, Some(Reason::NotShared))),
            (reference(Some("u1"), None), None, false, (Unavailable, Some(Reason::SourceDeleted))),
            (reference(Some("u1"), None), Some(&active), false, (Unavailable, Some(Reason::ShareRevoked))),
            // Revoked first, then deleted: the tenant does not learn of the deletion.
            (reference(Some("u1"), Some("ShareRevoked")), None, false, (Unavailable, Some(Reason::ShareRevoked))),
            (reference(Some("u1"), None), Some(&recreated), true, (Unavailable, Some(Reason::SourceReplaced))),
            (reference(None, None), Some(&elsewhere), true, (Failed, Some(Reason::RegionMismatch))),
            (reference(None, None), Some(&saving), true, (Queued, Some(Reason::SourceNotActive))),
            (reference(Some("u1"), None), Some(&saving), true, (Unavailable, Some(Reason::SourceNotActive))),
            // Its own namespace it may be told about: a reference to itself, or to a reference.
            (self_reference(), None, false, (Failed, Some(Reason::InvalidSpec))),
            (chained(), Some(&same_namespace_reference), true, (Failed, Some(Reason::InvalidSpec))),
        ];
        for (i, (image, source, granted, want)) in cases.into_iter().enumerate() {
            let target = image.spec.source.image.clone().unwrap();
            assert_eq!(outcome(decide(&image, &target, source, granted)), want, "case {i}");
        }
    }

    #[test]
    fn not_shared_says_the_same_for_a_missing_source_and_one_not_shared() {
        let target = ImageReference { namespace: "owner".into(), name: "i".into() };
        let active = image("owner", "u1", "r1", json!({}), json!({"phase": "Active"}));
        let message = |source| match decide(&reference(None, None), &target, source, false) {
            Outcome::Waiting(_, _, message) => message,
            Outcome::Active(_) => panic!("not granted"),
        };
        assert_eq!(message(None), message(Some(&active)));
    }
}
