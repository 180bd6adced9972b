//! Region readiness: the pure decision from a store probe and the images stored.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    Image, ImagePhase, RegionStatus,
    conditions::{Progressing, Reason, conditions, kstatus},
};

/// What probing a region's store found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Write, read-back and delete worked.
    Ready,
    /// The storage spec is unusable; the message says what to change.
    InvalidSpec(String),
    /// The Secret with S3 credentials is missing or incomplete.
    SecretNotFound(String),
    /// The store did not answer as it should (retried).
    Unreachable(String),
}

/// Owned images (not references) Active in `region`, and their bytes.
pub fn usage<'a>(region: &str, images: impl IntoIterator<Item = &'a Image>) -> (i64, i64) {
    images
        .into_iter()
        .filter(|i| i.spec.region == region && i.spec.source.image.is_none())
        .filter(|i| i.status.as_ref().and_then(|s| s.phase) == Some(ImagePhase::Active))
        .fold((0, 0), |(n, bytes), i| (n + 1, bytes + i.status.as_ref().and_then(|s| s.size_bytes).unwrap_or(0)))
}

/// The status a region should have.
pub fn status(
    generation: Option<i64>,
    probe: &Probe,
    usage: (i64, i64),
    old: &RegionStatus,
    now: &Time,
) -> RegionStatus {
    let (ready, reason, message, progress) = match probe {
        Probe::Ready => {
            (true, Reason::StoreReady, "the store answered a write, read-back and delete probe", Progressing::Settled)
        }
        Probe::InvalidSpec(m) => (false, Reason::InvalidSpec, m.as_str(), Progressing::Stalled),
        Probe::SecretNotFound(m) => (false, Reason::SecretNotFound, m.as_str(), Progressing::Stalled),
        Probe::Unreachable(m) => (false, Reason::StoreUnreachable, m.as_str(), Progressing::Settled),
    };
    let wants = kstatus(ready, progress, reason, message);
    RegionStatus {
        conditions: conditions(&old.conditions, &wants, generation, now),
        images: Some(usage.0),
        bytes: Some(usage.1),
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(region: &str, phase: Option<ImagePhase>, size: i64, reference: bool) -> Image {
        let source = if reference {
            serde_json::json!({"image": {"namespace": "a", "name": "b"}})
        } else {
            serde_json::json!({"url": {"url": "https://x/y"}})
        };
        let mut img: Image = serde_json::from_value(serde_json::json!({
            "apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "i", "namespace": "n"},
            "spec": {"region": region, "type": "DataDisk", "source": source}
        }))
        .unwrap();
        img.status = Some(crate::api::ImageStatus { phase, size_bytes: Some(size), ..Default::default() });
        img
    }

    #[test]
    fn usage_counts_active_owned_images_of_the_region() {
        let images = [
            image("eu", Some(ImagePhase::Active), 10, false),
            image("eu", Some(ImagePhase::Active), 5, false),
            image("eu", Some(ImagePhase::Saving), 7, false),
            image("eu", Some(ImagePhase::Active), 100, true),
            image("us", Some(ImagePhase::Active), 1000, false),
        ];
        assert_eq!(usage("eu", &images), (2, 15));
        assert_eq!(usage("ap", &images), (0, 0));
    }

    #[test]
    fn reasons_and_stalled_follow_the_probe() {
        let now = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let cases = [
            (Probe::Ready, "True", "StoreReady", false),
            (Probe::InvalidSpec("bad url".into()), "False", "InvalidSpec", true),
            (Probe::SecretNotFound("no secret".into()), "False", "SecretNotFound", true),
            (Probe::Unreachable("timeout".into()), "False", "StoreUnreachable", false),
        ];
        for (probe, ready, reason, stalled) in cases {
            let s = status(Some(3), &probe, (1, 2), &RegionStatus::default(), &now);
            let r = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
            assert_eq!((r.status.as_str(), r.reason.as_str()), (ready, reason), "{probe:?}");
            assert_eq!(s.conditions.iter().any(|c| c.type_ == "Stalled"), stalled, "{probe:?}");
            assert_eq!((s.images, s.bytes, s.observed_generation), (Some(1), Some(2), Some(3)));
        }
    }
}
