//! The Image rules that need no API: which phase and conditions an image shows.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use kube::ResourceExt;

use crate::{
    api::{
        Image, ImagePhase, ImageStatus, ImageType, MarketplaceOrigin, Visibility,
        conditions::{ConditionType, Progressing, Reason, Want, conditions, kstatus},
    },
    format::Format,
};

/// What an Active image says.
pub const ACTIVE_MESSAGE: &str = "the image is ready to use";

/// Status for a phase with a reason and message: Ready False unless Active, Reconciling while
/// work goes on (Queued, Saving, Deleting), Stalled when only a spec change helps (Failed).
pub fn with_phase(
    old: &ImageStatus,
    generation: Option<i64>,
    phase: ImagePhase,
    reason: Reason,
    message: &str,
    now: &Time,
) -> ImageStatus {
    let progress = match phase {
        ImagePhase::Queued | ImagePhase::Saving | ImagePhase::Deleting => Progressing::Working,
        ImagePhase::Failed => Progressing::Stalled,
        ImagePhase::Active | ImagePhase::Unavailable => Progressing::Settled,
    };
    let wants = kstatus(phase == ImagePhase::Active, progress, reason, message);
    ImageStatus {
        phase: Some(phase),
        conditions: conditions(&old.conditions, &wants, generation, now),
        observed_generation: generation,
        message: Some(message.to_string()),
        ..old.clone()
    }
}

/// Status of an Active image whose latest spec asks for what it cannot have (`reason`, e.g.
/// `VisibilityNotAllowed`): it stays Active and Ready with the bytes it has, and `Stalled` says
/// what was refused and what to change (kstatus: the spec is not, and will not be, reconciled).
pub fn active_refusing(
    old: &ImageStatus,
    generation: Option<i64>,
    reason: Reason,
    message: &str,
    now: &Time,
) -> ImageStatus {
    let wants = [
        Want::new(ConditionType::Ready, true, Reason::Active, ACTIVE_MESSAGE),
        Want::new(ConditionType::Stalled, true, reason, message),
    ];
    ImageStatus {
        phase: Some(ImagePhase::Active),
        conditions: conditions(&old.conditions, &wants, generation, now),
        observed_generation: generation,
        message: Some(message.to_string()),
        ..old.clone()
    }
}

/// Whether `visibility: Public` is allowed in `namespace`.
pub fn visibility_allowed(visibility: Visibility, namespace: &str, public_namespace: &str) -> bool {
    visibility != Visibility::Public || namespace == public_namespace
}

/// Why an image cannot have the visibility its spec asks for (reason `VisibilityNotAllowed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VisibilityRefusal {
    /// `Public` outside the platform namespace.
    PlatformOnly {
        /// The platform namespace.
        public_namespace: String,
    },
    /// Bytes bound by a Marketplace image's terms (see [`super::marketplace::visibility_refusal`]).
    Marketplace {
        /// Why, naming the Marketplace image.
        why: String,
    },
}

impl VisibilityRefusal {
    /// What to tell the owner: of an Active image (it stays the Private image it was), or of
    /// one that has no bytes yet (it fails).
    pub fn message(&self, active: bool) -> String {
        match (self, active) {
            (VisibilityRefusal::PlatformOnly { public_namespace }, true) => format!(
                "visibility Public is only allowed in the platform namespace {public_namespace}: the image stays Private; set spec.visibility back to Private (or Marketplace)"
            ),
            (VisibilityRefusal::PlatformOnly { public_namespace }, false) => format!(
                "visibility Public is only allowed in the platform namespace {public_namespace}: use Private or Marketplace"
            ),
            (VisibilityRefusal::Marketplace { why }, true) => format!(
                "this image's visibility is refused: {why}; the image stays Private: set spec.visibility back to Private (and remove spec.marketplace)"
            ),
            (VisibilityRefusal::Marketplace { why }, false) => format!(
                "this image's visibility is refused: {why}; set spec.visibility to Private (and remove spec.marketplace)"
            ),
        }
    }
}

/// Why `visibility` is refused for an image of `namespace` whose bytes `bound` binds (the
/// Marketplace image they come from), if it is.
pub fn visibility_refusal(
    visibility: Visibility,
    namespace: &str,
    public_namespace: &str,
    bound: Option<&MarketplaceOrigin>,
) -> Option<VisibilityRefusal> {
    if !visibility_allowed(visibility, namespace, public_namespace) {
        return Some(VisibilityRefusal::PlatformOnly { public_namespace: public_namespace.to_string() });
    }
    let why = super::marketplace::visibility_refusal(visibility, namespace, bound?)?;
    Some(VisibilityRefusal::Marketplace { why })
}

/// Why bytes of `format` cannot be an image of `image_type`, saying what to change: an ISO
/// image holds an ISO 9660 medium, every other type (each FullServer disk too) a disk.
pub fn contents_mismatch(image_type: ImageType, format: Format) -> Option<String> {
    match (image_type, format) {
        (ImageType::Iso, Format::Iso) => None,
        (ImageType::Iso, other) => Some(format!(
            "type ISO needs an ISO 9660 image, but the bytes are a {} disk: set type to SystemDisk or DataDisk, or fix the URL",
            other.as_api_str()
        )),
        (disk, Format::Iso) => Some(format!(
            "type {} needs a disk image, but the bytes are an ISO 9660 image: set type to ISO, or fix the URL",
            type_name(disk)
        )),
        _ => None,
    }
}

/// The API spelling of an image type.
pub fn type_name(image_type: ImageType) -> &'static str {
    match image_type {
        ImageType::SystemDisk => "SystemDisk",
        ImageType::DataDisk => "DataDisk",
        ImageType::FullServer => "FullServer",
        ImageType::Iso => "ISO",
    }
}

/// The visibility an image has: a refused visibility ([`visibility_refusal`]: `Public` outside
/// the platform namespace, `Public` or `Marketplace` for another tenant's Marketplace bytes) makes
/// the image Failed, or, once Active, keeps it the Private image it was, so it counts as Private.
pub fn effective_visibility(image: &Image, public_namespace: &str) -> Visibility {
    let visibility = image.spec.visibility;
    let namespace = image.namespace().unwrap_or_default();
    let bound = super::marketplace::inherited(image);
    match visibility_refusal(visibility, &namespace, public_namespace, bound) {
        None => visibility,
        Some(_) => Visibility::Private,
    }
}

/// Percent of `done` over `total`, 0..=100.
pub fn percent(done: u64, total: Option<u64>) -> Option<i32> {
    let total = total.filter(|t| *t > 0)?;
    Some(((done.min(total) as u128 * 100) / total as u128) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_follow_the_phase() {
        let now = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let cases = [
            (ImagePhase::Saving, "False", Some("Reconciling")),
            (ImagePhase::Queued, "False", Some("Reconciling")),
            (ImagePhase::Failed, "False", Some("Stalled")),
            (ImagePhase::Active, "True", None),
            (ImagePhase::Unavailable, "False", None),
        ];
        for (phase, ready, extra) in cases {
            let s = with_phase(&ImageStatus::default(), Some(2), phase, Reason::Queued, "m", &now);
            let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
            assert_eq!(s.conditions[0].status, ready, "{phase:?}");
            assert_eq!(types.get(1).copied(), extra, "{phase:?}");
            assert_eq!((s.phase, s.observed_generation), (Some(phase), Some(2)));
        }
    }

    #[test]
    fn public_only_in_the_platform_namespace() {
        assert!(visibility_allowed(Visibility::Public, "ims-public", "ims-public"));
        assert!(!visibility_allowed(Visibility::Public, "tenant-a", "ims-public"));
        assert!(visibility_allowed(Visibility::Marketplace, "tenant-a", "ims-public"));
        assert!(visibility_allowed(Visibility::Private, "tenant-a", "ims-public"));
        let image = |namespace: &str, visibility: &str, bound: Option<&str>| {
            let spec = serde_json::json!({"region": "r", "type": "DataDisk", "visibility": visibility,
                "source": {"url": {"url": "https://x/y"}}});
            let mut image = Image::new("i", serde_json::from_value(spec).unwrap());
            image.metadata.namespace = Some(namespace.into());
            let marketplace = bound.map(|ns| {
                serde_json::json!({"namespace": ns, "name": "m", "publisher": "P", "productCode": "p", "plan": "Free"})
            });
            let lineage =
                serde_json::json!({"namespace": namespace, "name": "c", "region": "r", "marketplace": marketplace});
            image.status = Some(serde_json::from_value(serde_json::json!({"lineage": lineage})).unwrap());
            image
        };
        let effective = |i: Image| effective_visibility(&i, "ims-public");
        assert_eq!(effective(image("tenant-a", "Public", None)), Visibility::Private);
        assert_eq!(effective(image("ims-public", "Public", None)), Visibility::Public);
        assert_eq!(effective(image("tenant-a", "Marketplace", None)), Visibility::Marketplace);
        // A copy of a Marketplace image: never Public, Marketplace only in the publisher's tenant.
        assert_eq!(effective(image("ims-public", "Public", Some("pub"))), Visibility::Private);
        assert_eq!(effective(image("tenant-a", "Marketplace", Some("pub"))), Visibility::Private);
        assert_eq!(effective(image("pub", "Marketplace", Some("pub"))), Visibility::Marketplace);
        let refused = visibility_refusal(Visibility::Public, "ims-public", "ims-public", Some(&origin())).unwrap();
        assert!(matches!(refused, VisibilityRefusal::Marketplace { .. }), "{refused:?}");
        assert!(
            refused.message(true).contains("stays Private")
                && refused.message(false).contains("set spec.visibility to Private")
        );
        let platform = visibility_refusal(Visibility::Public, "tenant-a", "ims-public", Some(&origin())).unwrap();
        assert!(platform.message(true).contains("only allowed in the platform namespace ims-public"));
    }

    fn origin() -> MarketplaceOrigin {
        MarketplaceOrigin {
            namespace: "pub".into(),
            name: "m".into(),
            publisher: "P".into(),
            product_code: "p".into(),
            plan: crate::api::Plan::Free,
        }
    }

    /// An ISO image holds ISO 9660 bytes and nothing else; a disk type holds anything but.
    #[test]
    fn the_type_must_fit_the_bytes() {
        for format in Format::ALL {
            let iso = contents_mismatch(ImageType::Iso, format);
            assert_eq!(iso.is_none(), format == Format::Iso, "ISO with {format:?}");
            for disk in [ImageType::SystemDisk, ImageType::DataDisk, ImageType::FullServer] {
                let refused = contents_mismatch(disk, format);
                assert_eq!(refused.is_some(), format == Format::Iso, "{disk:?} with {format:?}");
            }
        }
        let iso = contents_mismatch(ImageType::Iso, Format::Qcow2).unwrap();
        assert!(iso.contains("Qcow2") && iso.contains("set type to SystemDisk or DataDisk"), "{iso}");
        let disk = contents_mismatch(ImageType::SystemDisk, Format::Iso).unwrap();
        assert!(disk.starts_with("type SystemDisk needs a disk image") && disk.contains("set type to ISO"), "{disk}");
    }

    #[test]
    fn percent_is_bounded() {
        assert_eq!(percent(50, Some(200)), Some(25));
        assert_eq!(percent(300, Some(200)), Some(100));
        assert_eq!(percent(1, None), None);
        assert_eq!(percent(1, Some(0)), None);
    }
}
