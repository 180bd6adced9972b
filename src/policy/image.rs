//! The Image rules that need no API: which phase and conditions an image shows.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    ImagePhase, ImageStatus,
    conditions::{Progressing, Reason, conditions, kstatus},
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

/// Whether `visibility: Public` is allowed in `namespace`.
pub fn visibility_allowed(visibility: crate::api::Visibility, namespace: &str, public_namespace: &str) -> bool {
    visibility != crate::api::Visibility::Public || namespace == public_namespace
}

/// Percent of `done` over `total`, 0..=100.
pub fn percent(done: u64, total: Option<u64>) -> Option<i32> {
    let total = total.filter(|t| *t > 0)?;
    Some(((done.min(total) as u128 * 100) / total as u128) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Visibility;

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
    }

    #[test]
    fn percent_is_bounded() {
        assert_eq!(percent(50, Some(200)), Some(25));
        assert_eq!(percent(300, Some(200)), Some(100));
        assert_eq!(percent(1, None), None);
        assert_eq!(percent(1, Some(0)), None);
    }
}
