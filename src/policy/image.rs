//! The Image rules that need no API: which phase and conditions an image shows.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::{
    api::{
        ImagePhase, ImageStatus, ImageType, Visibility,
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

/// The visibility an image has: `visibility: Public` outside the platform namespace is refused
/// (an image is Failed for it, or, once Active, keeps being the Private image it was), so
/// there it counts as Private.
pub fn effective_visibility(visibility: Visibility, namespace: &str, public_namespace: &str) -> Visibility {
    match visibility_allowed(visibility, namespace, public_namespace) {
        true => visibility,
        false => Visibility::Private,
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
        assert_eq!(effective_visibility(Visibility::Public, "tenant-a", "ims-public"), Visibility::Private);
        assert_eq!(effective_visibility(Visibility::Public, "ims-public", "ims-public"), Visibility::Public);
        assert_eq!(effective_visibility(Visibility::Marketplace, "tenant-a", "ims-public"), Visibility::Marketplace);
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
