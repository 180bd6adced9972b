//! Region readiness: the pure decision from a store probe and the images stored.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use kube::ResourceExt;

use crate::api::{
    Image, ImagePhase, Region, RegionStatus, RegionStorage,
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
    /// The store is (or holds, or is inside) an older Region's store; the message names it.
    Conflict(String),
}

/// Where a store keeps its objects, comparable across Regions: the kind of store (`file`, or
/// `s3` with its endpoint) and the path components (an S3 store's bucket first).
fn location(storage: &RegionStorage) -> Option<(String, Vec<String>)> {
    let url = storage.url.trim();
    let components = |path: &str| -> Vec<String> {
        path.split('/').filter(|c| !c.is_empty() && *c != ".").map(str::to_string).collect()
    };
    if let Some(path) = url.strip_prefix("file://") {
        return Some(("file".into(), components(path)));
    }
    let rest = url.strip_prefix("s3://")?;
    let endpoint = storage.endpoint.as_deref().unwrap_or("").trim().trim_end_matches('/').to_ascii_lowercase();
    Some((format!("s3 {endpoint}"), components(rest)))
}

/// Whether `region`'s store is, holds, or is inside the store of a Region of `regions` that
/// comes first: two Regions on one store would mix their images' bytes. First comes the one
/// that holds the store (Ready for its current spec), so editing a Region's URL onto another's
/// store never takes it from its holder; then the older (created first, then by name). The
/// message says which Region and what to change.
pub fn store_conflict<'a>(region: &Region, regions: impl IntoIterator<Item = &'a Region>) -> Option<String> {
    let (kind, mine) = location(&region.spec.storage)?;
    let holds = |r: &Region| {
        r.status.as_ref().is_some_and(|s| {
            s.observed_generation == r.metadata.generation
                && crate::api::conditions::is_ready(&s.conditions)
                && location(&r.spec.storage).is_some()
        })
    };
    let age = |r: &Region| (!holds(r), r.metadata.creation_timestamp.as_ref().map(|t| t.0), r.name_any());
    regions
        .into_iter()
        .filter(|other| other.name_any() != region.name_any() && age(other) < age(region))
        .filter_map(|other| {
            let (other_kind, theirs) = location(&other.spec.storage)?;
            let how = match () {
                _ if other_kind != kind => return None,
                _ if theirs == mine => "is the store of",
                _ if mine.starts_with(&theirs) => "is inside the store of",
                _ if theirs.starts_with(&mine) => "holds the store of",
                _ => return None,
            };
            Some((age(other), format!(
                "storage.url {} {how} Region {} ({}): regions need stores of their own, or their images' bytes mix; change spec.storage.url (Region {} keeps its store)",
                region.spec.storage.url.trim(),
                other.name_any(),
                other.spec.storage.url.trim(),
                other.name_any()
            )))
        })
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, message)| message)
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
        Probe::Conflict(m) => (false, Reason::StoreConflict, m.as_str(), Progressing::Stalled),
    };
    let wants = kstatus(ready, progress, reason, message);
    RegionStatus {
        conditions: conditions(&old.conditions, &wants, generation, now),
        images: Some(usage.0),
        bytes: Some(usage.1),
        observed_generation: generation,
    }
}

/// The status of a Region being deleted while `using` (images of any namespace, owned or
/// references) still name it, and the note each of their owners is told.
pub fn deleting(
    region: &str,
    generation: Option<i64>,
    using: &[&Image],
    old: &RegionStatus,
    now: &Time,
) -> (RegionStatus, String) {
    let references = using.iter().filter(|i| i.spec.source.image.is_some()).count();
    let owned = using.len() - references;
    let message = format!(
        "deletion waits for the {} images that use this region ({owned} owned, {references} references): it completes when they are deleted",
        using.len()
    );
    let wants = kstatus(false, Progressing::Working, Reason::RegionInUse, &message);
    let status = RegionStatus {
        conditions: conditions(&old.conditions, &wants, generation, now),
        observed_generation: generation,
        ..old.clone()
    };
    let note = format!(
        "Region {region} is being deleted: it waits until this image is deleted; copy the image to another region (ImageCopy) to keep it"
    );
    (status, note)
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
            (Probe::Conflict("shared".into()), "False", "StoreConflict", true),
        ];
        for (probe, ready, reason, stalled) in cases {
            let s = status(Some(3), &probe, (1, 2), &RegionStatus::default(), &now);
            let r = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
            assert_eq!((r.status.as_str(), r.reason.as_str()), (ready, reason), "{probe:?}");
            assert_eq!(s.conditions.iter().any(|c| c.type_ == "Stalled"), stalled, "{probe:?}");
            assert_eq!((s.images, s.bytes, s.observed_generation), (Some(1), Some(2), Some(3)));
        }
    }

    fn region(name: &str, created: i64, url: &str, endpoint: Option<&str>) -> Region {
        let mut r: Region = serde_json::from_value(serde_json::json!({
            "apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": name},
            "spec": {"storage": {"url": url, "endpoint": endpoint}}
        }))
        .unwrap();
        r.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(created).unwrap()));
        r
    }

    /// Two Regions never share a store: the same place, one inside the other, in any spelling;
    /// the older keeps it (of two not yet Ready). Other endpoints, buckets and sibling directories do not conflict.
    #[test]
    fn the_older_region_keeps_a_shared_store() {
        let old = region("old", 10, "file:///var/lib/ims/eu", None);
        let cases = [
            ("file:///var/lib/ims/eu", Some("is the store of")),
            ("file:///var/lib/ims//eu/", Some("is the store of")),
            ("file:///var/lib/ims/./eu", Some("is the store of")),
            ("file:///var/lib/ims/eu/inner", Some("is inside the store of")),
            ("file:///var/lib/ims/eu-2", None),
            ("file:///var/lib/ims/e", None),
        ];
        for (url, want) in cases {
            let new = region("new", 20, url, None);
            let got = store_conflict(&new, [&old, &new]);
            assert_eq!(got.is_some(), want.is_some(), "{url}: {got:?}");
            if let (Some(got), Some(want)) = (got, want) {
                assert!(
                    got.contains(want) && got.contains("Region old") && got.contains("change spec.storage.url"),
                    "{got}"
                );
            }
            assert_eq!(store_conflict(&old, [&old, &new]), None, "{url}: the older keeps it");
        }
        // A newer region holding an older one's store.
        let outer = region("outer", 30, "file:///var/lib/ims", None);
        assert!(store_conflict(&outer, [&old]).unwrap().contains("holds the store of"));
        // The same age: the name decides, so exactly one of them is refused.
        let (a, b) = (region("a", 5, "file:///var/lib/ims/x", None), region("b", 5, "file:///var/lib/ims/x", None));
        assert_eq!((store_conflict(&a, [&a, &b]).is_some(), store_conflict(&b, [&a, &b]).is_some()), (false, true));
        // S3: the endpoint and bucket tell stores apart; a prefix inside another conflicts.
        let s3 = region("s3", 1, "s3://bucket/images", Some("https://s3.example.com/"));
        let inside = region("s3b", 2, "s3://bucket/images/eu", Some("https://S3.example.com"));
        assert!(store_conflict(&inside, [&s3]).unwrap().contains("is inside the store of"));
        // A Region edited onto the store another holds (Ready for its spec) does not take it,
        // however old it is.
        let mut holder = region("holder", 50, "file:///var/lib/ims/h", None);
        holder.status = Some(status(
            Some(1),
            &Probe::Ready,
            (0, 0),
            &RegionStatus::default(),
            &Time(jiff::Timestamp::from_second(60).unwrap()),
        ));
        holder.metadata.generation = Some(1);
        let mut edited = region("edited", 1, "file:///var/lib/ims/h", None);
        edited.status = holder.status.clone();
        edited.metadata.generation = Some(2);
        assert!(store_conflict(&edited, [&holder]).unwrap().contains("Region holder"));
        assert_eq!(store_conflict(&holder, [&edited]), None);
        let elsewhere = region("s3c", 2, "s3://bucket/images", Some("https://other.example.com"));
        let bucket = region("s3d", 2, "s3://bucket2/images", Some("https://s3.example.com"));
        let file = region("f", 2, "file:///bucket/images", None);
        for r in [&elsewhere, &bucket, &file] {
            assert_eq!(store_conflict(r, [&s3]), None, "{}", r.name_any());
        }
    }
}
