//! The quota rules: effective limits, usage from the ledger, who is next in line.

use crate::{
    api::{ImageQuotaSpec, ImageQuotaStatus, QuotaLimits, RegionUsage},
    policy::Policy,
};

/// The limits in force: the ImageQuota's spec over the operator policy.
pub fn limits(spec: &ImageQuotaSpec, policy: &Policy) -> QuotaLimits {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    QuotaLimits {
        private_images_per_region: spec.private_images_per_region.unwrap_or(clamp(policy.private_images_per_region)),
        image_bytes_per_region: spec.image_bytes_per_region.or(policy.image_bytes_per_region.map(clamp)),
        concurrent_imports: spec.concurrent_imports.unwrap_or(clamp(policy.concurrent_imports)),
        concurrent_cross_region_copies: spec
            .concurrent_cross_region_copies
            .unwrap_or(clamp(policy.concurrent_cross_region_copies)),
    }
}

/// Images reserved in a region.
pub fn images_in(status: &ImageQuotaStatus, region: &str) -> i64 {
    status.reservations.iter().filter(|r| r.region == region).count() as i64
}

/// Recomputes `used`, `hard` and `summary` from the reservations (the ledger is the truth).
pub fn recount(status: &mut ImageQuotaStatus, hard: QuotaLimits) {
    let mut regions: Vec<String> = status.reservations.iter().map(|r| r.region.clone()).collect();
    regions.sort();
    regions.dedup();
    status.used = regions
        .iter()
        .map(|region| RegionUsage {
            region: region.clone(),
            images: images_in(status, region),
            bytes: status.reservations.iter().filter(|r| &r.region == region).map(|r| r.bytes).sum(),
        })
        .collect();
    status.summary = Some(if status.used.is_empty() {
        format!("0/{} images per region", hard.private_images_per_region)
    } else {
        status
            .used
            .iter()
            .map(|u| format!("{}: {}/{} images", u.region, u.images, hard.private_images_per_region))
            .collect::<Vec<_>>()
            .join(", ")
    });
    status.hard = Some(hard);
}

/// Whether an image may take a slot: `used` reserved, `ahead` older images waiting, `limit`.
pub fn has_room(used: i64, ahead: i64, limit: i64) -> bool {
    used + ahead < limit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Reservation;

    #[test]
    fn spec_overrides_policy() {
        let policy = Policy::default();
        let l = limits(&ImageQuotaSpec { private_images_per_region: Some(3), ..Default::default() }, &policy);
        assert_eq!((l.private_images_per_region, l.concurrent_imports, l.concurrent_cross_region_copies), (3, 40, 5));
        assert_eq!(l.image_bytes_per_region, None);
    }

    #[test]
    fn recount_derives_usage_from_reservations() {
        let r = |uid: &str, region: &str, bytes| Reservation {
            cross_region: false,
            uid: uid.into(),
            name: uid.into(),
            region: region.into(),
            bytes,
            importing: false,
        };
        let mut status = ImageQuotaStatus {
            reservations: vec![r("a", "eu", 10), r("b", "us", 1), r("c", "eu", 5)],
            ..Default::default()
        };
        recount(&mut status, limits(&ImageQuotaSpec::default(), &Policy::default()));
        assert_eq!(
            status.used,
            vec![
                RegionUsage { region: "eu".into(), images: 2, bytes: 15 },
                RegionUsage { region: "us".into(), images: 1, bytes: 1 },
            ]
        );
        assert_eq!(status.summary.as_deref(), Some("eu: 2/50 images, us: 1/50 images"));
    }

    #[test]
    fn room_counts_those_ahead() {
        assert!(has_room(4, 0, 5));
        assert!(!has_room(4, 1, 5));
        assert!(!has_room(5, 0, 5));
        assert!(!has_room(0, 0, 0));
    }
}
