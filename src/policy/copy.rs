//! The copy rules, one set for every copy: an ImageCopy, and any Image with `source.copy`
//! (written by an ImageCopy or by hand, so there is no way around them). Which source may be
//! copied where; the controllers look the images up and show the reason of their kind.

use kube::ResourceExt;

use super::{GIB, Policy, marketplace};
use crate::api::{Image, ImagePhase, ImageType, MarketplaceOrigin, conditions::Reason};

/// Why a source cannot be copied to a region (now, or at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source is not Active (or the image a reference is bound to is gone): wait for it.
    SourceNotActive,
    /// The bytes are a Paid Marketplace image's (or a copy's of one), and the copying tenant
    /// is not its publisher's.
    PaidMarketplace {
        /// The Marketplace image.
        origin: MarketplaceOrigin,
    },
    /// An encrypted image never leaves its region.
    Encrypted {
        /// The source's region.
        region: String,
    },
    /// More bytes than a cross-region copy may move.
    TooLarge {
        /// The source's bytes.
        size: i64,
        /// The limit (policy `maxCrossRegionCopyGiB`).
        max_gib: i64,
    },
    /// An image whose `source.copy` names itself (it would wait for itself forever).
    SelfCopy,
    /// A FullServer image is copied to another region only.
    FullServerWithinRegion {
        /// The source's region.
        region: String,
    },
}

impl Refusal {
    /// Whether waiting helps (else only a spec change does).
    pub fn waits(&self) -> bool {
        matches!(self, Refusal::SourceNotActive)
    }

    /// The reason an ImageCopy shows.
    pub fn copy_reason(&self) -> Reason {
        match self {
            Refusal::SourceNotActive => Reason::SourceNotActive,
            Refusal::PaidMarketplace { .. } => Reason::MarketplaceImage,
            Refusal::Encrypted { .. } => Reason::EncryptedImage,
            Refusal::TooLarge { .. } => Reason::TooLarge,
            Refusal::FullServerWithinRegion { .. } => Reason::FullServerNotCopyable,
            Refusal::SelfCopy => Reason::InvalidSpec,
        }
    }

    /// The reason an Image with `source.copy` shows: the Image reasons of the contract, so a
    /// rule about the spec is `InvalidSpec` (its message names the copy reason).
    pub fn image_reason(&self) -> Reason {
        match self {
            Refusal::SourceNotActive => Reason::SourceNotActive,
            Refusal::TooLarge { .. } => Reason::TooLarge,
            Refusal::PaidMarketplace { .. }
            | Refusal::Encrypted { .. }
            | Refusal::FullServerWithinRegion { .. }
            | Refusal::SelfCopy => Reason::InvalidSpec,
        }
    }

    /// What to tell the user about copying the image named `source`.
    pub fn message(&self, source: &str) -> String {
        match self {
            Refusal::SourceNotActive => format!("Image {source} is not Active: the copy starts when it is"),
            Refusal::PaidMarketplace { origin } => format!(
                "Image {source} holds the bytes of {} (MarketplaceImage): a Paid Marketplace image, and every copy of it, is copied only by its publisher's tenant {}; use it through a reference (source.image) instead",
                marketplace::describe(origin),
                origin.namespace
            ),
            Refusal::Encrypted { region } => format!(
                "Image {source} is encrypted (EncryptedImage): encrypted images cannot be copied to another region; copy it without encryption in region {region} first (an ImageCopy in the same region without destination.encryption)"
            ),
            Refusal::TooLarge { size, max_gib } => format!(
                "Image {source} has {size} bytes: more than the {max_gib} GiB a cross-region copy may move (policy maxCrossRegionCopyGiB)"
            ),
            Refusal::SelfCopy => format!(
                "source.copy names this image ({source}) itself: it would wait for itself forever; name another Image of the namespace"
            ),
            Refusal::FullServerWithinRegion { region } => format!(
                "Image {source} is a FullServer image (FullServerNotCopyable): it cannot be copied within region {region}; copy it to another region"
            ),
        }
    }
}

/// Checks copying `source` into `destination_region` (in the source's namespace). `owner` is
/// the image holding the bytes: the source itself, or the image a reference is bound to (its
/// encryption and Marketplace terms are what count). Returns whether the copy crosses regions.
pub fn check(source: &Image, owner: &Image, destination_region: &str, policy: &Policy) -> Result<bool, Refusal> {
    let status = source.status.clone().unwrap_or_default();
    if status.phase != Some(ImagePhase::Active) {
        return Err(Refusal::SourceNotActive);
    }
    if let Some(origin) = marketplace::binding(owner)
        && marketplace::copy_refused(&origin, &source.namespace().unwrap_or_default())
    {
        return Err(Refusal::PaidMarketplace { origin });
    }
    let region = &source.spec.region;
    let cross_region = destination_region != region;
    if cross_region && owner.spec.encryption.is_some() {
        return Err(Refusal::Encrypted { region: region.clone() });
    }
    let max_gib = i64::try_from(policy.max_cross_region_copy_gib).unwrap_or(i64::MAX);
    let size = status.size_bytes.unwrap_or(0);
    if cross_region && size > max_gib.saturating_mul(GIB as i64) {
        return Err(Refusal::TooLarge { size, max_gib });
    }
    if !cross_region && status.r#type.unwrap_or(source.spec.r#type) == ImageType::FullServer {
        return Err(Refusal::FullServerWithinRegion { region: region.clone() });
    }
    Ok(cross_region)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn image(spec: serde_json::Value, status: serde_json::Value) -> Image {
        let mut full = json!({"region": "a", "type": "DataDisk", "source": {"url": {"url": "https://x/y"}}});
        full.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
        let mut image = Image::new("src", serde_json::from_value(full).unwrap());
        image.status = Some(serde_json::from_value(status).unwrap());
        image
    }

    #[test]
    fn the_rules_in_order_with_the_reason_of_each_kind() {
        let active = json!({"phase": "Active", "sizeBytes": 1024});
        let policy = Policy { max_cross_region_copy_gib: 1, ..Policy::default() };
        let big = json!({"phase": "Active", "sizeBytes": (1i64 << 30) + 1});
        // (source, destination region, cross-region or the (ImageCopy, Image) reasons)
        type Outcome = Result<bool, (Reason, Reason)>;
        let cases: [(Image, &str, Outcome); 8] = [
            (image(json!({}), active.clone()), "a", Ok(false)),
            (image(json!({}), active.clone()), "b", Ok(true)),
            (
                image(json!({}), json!({"phase": "Saving"})),
                "b",
                Err((Reason::SourceNotActive, Reason::SourceNotActive)),
            ),
            (
                image(json!({"encryption": {"kmsKeyID": "k"}}), active.clone()),
                "b",
                Err((Reason::EncryptedImage, Reason::InvalidSpec)),
            ),
            // Re-encrypting within the region is allowed.
            (image(json!({"encryption": {"kmsKeyID": "k"}}), active.clone()), "a", Ok(false)),
            (image(json!({}), big.clone()), "b", Err((Reason::TooLarge, Reason::TooLarge))),
            (image(json!({}), big), "a", Ok(false)),
            (
                image(
                    json!({"type": "FullServer", "source": {"disks": [{"role": "System", "url": "https://x/s"}]}}),
                    active,
                ),
                "a",
                Err((Reason::FullServerNotCopyable, Reason::InvalidSpec)),
            ),
        ];
        for (i, (source, to, want)) in cases.into_iter().enumerate() {
            let got = check(&source, &source, to, &policy).map_err(|r| (r.copy_reason(), r.image_reason()));
            assert_eq!(got, want, "case {i}");
        }
    }

    /// The Paid rule reads the terms of the bytes: the Marketplace image a reference is bound
    /// to, or the lineage of a copy; the publisher's tenant copies its own bytes.
    #[test]
    fn paid_marketplace_bytes_are_copied_by_the_publisher_only() {
        let paid = json!({"visibility": "Marketplace", "marketplace": {"publisher": "Acme", "productCode": "tool",
            "pricing": {"plan": "Paid", "hourlyPrice": "1", "currency": "EUR"}}});
        let in_ns = |namespace: &str, mut image: Image| {
            image.metadata.namespace = Some(namespace.into());
            image
        };
        let owner = in_ns("pub", image(paid.clone(), json!({"phase": "Active"})));
        let reference = in_ns("t", image(json!({}), json!({"phase": "Active"})));
        let refused = check(&reference, &owner, "a", &Policy::default()).unwrap_err();
        assert_eq!((refused.copy_reason(), refused.image_reason()), (Reason::MarketplaceImage, Reason::InvalidSpec));
        let message = refused.message("ref");
        assert!(
            message.contains("pub/src") && message.contains("MarketplaceImage") && message.contains("reference"),
            "{message}"
        );
        assert_eq!(check(&owner, &owner, "a", &Policy::default()), Ok(false), "the publisher copies its own");
        // A copy of a copy: the lineage carries the terms.
        let lineage = json!({"namespace": "t", "name": "c1", "region": "a", "marketplace":
            {"namespace": "pub", "name": "src", "publisher": "Acme", "productCode": "tool", "plan": "Paid"}});
        let copy = in_ns("t", image(json!({}), json!({"phase": "Active", "lineage": lineage})));
        assert!(matches!(check(&copy, &copy, "b", &Policy::default()), Err(Refusal::PaidMarketplace { .. })));
        let own_copy = in_ns("pub", copy);
        assert_eq!(check(&own_copy, &own_copy, "b", &Policy::default()), Ok(true));
        let free = json!({"visibility": "Marketplace", "marketplace": {"publisher": "Acme", "productCode": "tool",
            "pricing": {"plan": "Free"}}});
        let free = in_ns("pub", image(free, json!({"phase": "Active"})));
        assert_eq!(check(&reference, &free, "a", &Policy::default()), Ok(false));
    }

    #[test]
    fn the_owner_s_encryption_counts_for_a_reference() {
        let source = image(json!({}), json!({"phase": "Active"}));
        let owner = image(json!({"encryption": {"kmsKeyID": "k"}}), json!({"phase": "Active"}));
        assert_eq!(check(&source, &owner, "b", &Policy::default()), Err(Refusal::Encrypted { region: "a".into() }));
    }

    #[test]
    fn messages_name_the_copy_reason_and_what_to_change() {
        let m = Refusal::Encrypted { region: "a".into() }.message("s");
        assert!(m.contains("EncryptedImage") && m.contains("without encryption"), "{m}");
        let m = Refusal::TooLarge { size: 5, max_gib: 1 }.message("s");
        assert!(m.contains("maxCrossRegionCopyGiB"), "{m}");
        assert!(Refusal::FullServerWithinRegion { region: "a".into() }.message("s").contains("another region"));
        assert!(Refusal::SourceNotActive.waits() && !Refusal::TooLarge { size: 1, max_gib: 0 }.waits());
        assert!(!Refusal::SelfCopy.waits() && Refusal::SelfCopy.message("me").contains("itself"));
        assert_eq!(Refusal::SelfCopy.image_reason(), Reason::InvalidSpec);
    }
}
