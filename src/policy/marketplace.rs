//! The Marketplace rules that need no API: which terms bind an image's bytes (its own, as a
//! published Marketplace image, or those its copy lineage carries), which visibility such bytes
//! may have, who may copy them, and the usage a billing system is sent (references per tenant).
//!
//! The terms follow the bytes: a copy of a Marketplace image, or of a reference to one, records
//! the Marketplace image in `status.lineage.marketplace`, and every copy of that copy keeps it.
//! Such an image cannot be shared (`MarketplaceImage`), made Public, or published to the
//! Marketplace outside the publisher's tenant (`VisibilityNotAllowed`); bytes of a `Paid` image
//! are copied by the publisher's tenant only (`MarketplaceImage`).

use std::collections::{BTreeMap, HashMap};

use kube::ResourceExt;

use crate::api::{Image, ImagePhase, Marketplace, MarketplaceOrigin, Plan, Visibility};

/// The terms a copy's lineage carries (the Marketplace image its bytes come from).
pub fn inherited(image: &Image) -> Option<&MarketplaceOrigin> {
    image.status.as_ref()?.lineage.as_ref()?.marketplace.as_ref()
}

/// Why bytes bound by `origin` cannot have `visibility` in `namespace`, saying why (`None`:
/// allowed). Never Public; Marketplace only in the publisher's tenant (the publisher offering
/// its own product again, e.g. a copy in another region).
pub fn visibility_refusal(visibility: Visibility, namespace: &str, origin: &MarketplaceOrigin) -> Option<String> {
    let from = describe(origin);
    match visibility {
        Visibility::Private => None,
        Visibility::Marketplace if namespace == origin.namespace => None,
        Visibility::Public => Some(format!(
            "its bytes come from {from}, whose terms bind every copy: a copy of a Marketplace image cannot be made Public"
        )),
        Visibility::Marketplace => Some(format!(
            "its bytes come from {from}, whose terms bind every copy: only the publisher's tenant {} may publish them to the Marketplace",
            origin.namespace
        )),
    }
}

/// The terms `image` is published under: an owned image with `visibility: Marketplace` and
/// `spec.marketplace`, unless its bytes are another tenant's Marketplace image (then it is the
/// Private image it was; see [`visibility_refusal`]). An image stored before `spec.marketplace`
/// existed has no terms: it is not metered and its copies are not bound.
pub fn published_terms(image: &Image) -> Option<&Marketplace> {
    if image.spec.source.image.is_some() || image.spec.visibility != Visibility::Marketplace {
        return None;
    }
    let namespace = image.namespace().unwrap_or_default();
    if inherited(image).is_some_and(|o| visibility_refusal(Visibility::Marketplace, &namespace, o).is_some()) {
        return None;
    }
    image.spec.marketplace.as_ref()
}

/// [`published_terms`] as the origin a copy records.
pub fn published(image: &Image) -> Option<MarketplaceOrigin> {
    let terms = published_terms(image)?;
    Some(MarketplaceOrigin {
        namespace: image.namespace().unwrap_or_default(),
        name: image.name_any(),
        publisher: terms.publisher.clone(),
        product_code: terms.product_code.clone(),
        plan: terms.pricing.plan,
    })
}

/// The terms binding the bytes `holder` holds (an owned image, or the image a reference is
/// bound to): its own if it is published, else those its lineage carries.
pub fn binding(holder: &Image) -> Option<MarketplaceOrigin> {
    published(holder).or_else(|| inherited(holder).cloned())
}

/// Whether `tenant` may not copy bytes bound by `origin`: those of a `Paid` image, outside the
/// publisher's tenant.
pub fn copy_refused(origin: &MarketplaceOrigin, tenant: &str) -> bool {
    origin.plan == Plan::Paid && tenant != origin.namespace
}

/// `namespace/name (plan, product, publisher)` of a Marketplace image, for messages.
pub fn describe(origin: &MarketplaceOrigin) -> String {
    format!(
        "Marketplace image {}/{} (product {} of {}, plan {})",
        origin.namespace,
        origin.name,
        origin.product_code,
        origin.publisher,
        origin.plan.as_str()
    )
}

/// One series of the usage a billing system reads: the references of `tenant` to the
/// Marketplace image `image_namespace/image`, with its terms.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Usage {
    /// Namespace of the Marketplace image: the publisher's tenant.
    pub image_namespace: String,
    /// Name of the Marketplace image.
    pub image: String,
    /// Namespace holding the references.
    pub tenant: String,
    /// `spec.marketplace.publisher`.
    pub publisher: String,
    /// `spec.marketplace.productCode`.
    pub product: String,
    /// `spec.marketplace.pricing.plan`.
    pub plan: Plan,
}

/// How many references each tenant has to each Marketplace image, counting the references that
/// can be used now: Active and bound to the image as it is (its uid), which is published.
pub fn usage<'a>(images: impl IntoIterator<Item = &'a Image> + Clone) -> BTreeMap<Usage, i64> {
    let by_name: HashMap<(String, String), &Image> =
        images.clone().into_iter().map(|i| ((i.namespace().unwrap_or_default(), i.name_any()), i)).collect();
    let mut out = BTreeMap::new();
    for reference in images {
        let Some(target) = &reference.spec.source.image else { continue };
        let status = reference.status.as_ref();
        if status.and_then(|s| s.phase) != Some(ImagePhase::Active) {
            continue;
        }
        let Some(source) = by_name.get(&(target.namespace.clone(), target.name.clone())) else { continue };
        let bound = status.and_then(|s| s.source.as_ref()).map(|s| s.uid.as_str());
        if bound.is_none() || bound != source.metadata.uid.as_deref() {
            continue;
        }
        let Some(terms) = published_terms(source) else { continue };
        let key = Usage {
            image_namespace: target.namespace.clone(),
            image: target.name.clone(),
            tenant: reference.namespace().unwrap_or_default(),
            publisher: terms.publisher.clone(),
            product: terms.product_code.clone(),
            plan: terms.pricing.plan,
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// An image `namespace/name` (uid `name`) with `spec` over a DataDisk import, and `status`.
    fn image(namespace: &str, name: &str, spec: serde_json::Value, status: serde_json::Value) -> Image {
        let mut full = json!({"region": "r", "type": "DataDisk", "source": {"url": {"url": "https://x/y"}}});
        full.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
        let mut image = Image::new(name, serde_json::from_value(full).unwrap());
        image.metadata.namespace = Some(namespace.into());
        image.metadata.uid = Some(name.into());
        image.status = Some(serde_json::from_value(status).unwrap());
        image
    }

    fn terms(plan: &str) -> serde_json::Value {
        let pricing = match plan {
            "Paid" => json!({"plan": "Paid", "hourlyPrice": "0.05", "currency": "USD"}),
            _ => json!({"plan": plan}),
        };
        json!({"visibility": "Marketplace", "marketplace": {"publisher": "Acme", "productCode": "tool", "pricing": pricing}})
    }

    fn origin(namespace: &str, plan: Plan) -> MarketplaceOrigin {
        MarketplaceOrigin {
            namespace: namespace.into(),
            name: "m".into(),
            publisher: "Acme".into(),
            product_code: "tool".into(),
            plan,
        }
    }

    fn copy_of(namespace: &str, name: &str, origin: &MarketplaceOrigin, spec: serde_json::Value) -> Image {
        let lineage = json!({"namespace": namespace, "name": "before", "region": "r", "marketplace": origin});
        image(namespace, name, spec, json!({"phase": "Active", "lineage": lineage}))
    }

    #[test]
    fn the_terms_of_an_image_and_of_its_bytes() {
        let paid = image("pub", "m", terms("Paid"), json!({"phase": "Active"}));
        assert_eq!(published(&paid), Some(origin("pub", Plan::Paid)));
        assert_eq!(binding(&paid), Some(origin("pub", Plan::Paid)));
        // Not Marketplace, a reference, or stored before spec.marketplace existed: no terms.
        let plain = image("pub", "p", json!({}), json!({}));
        let reference = image("t", "r", json!({"source": {"image": {"namespace": "pub", "name": "m"}}}), json!({}));
        let legacy = image("pub", "old", json!({"visibility": "Marketplace"}), json!({}));
        for unbound in [&plain, &reference, &legacy] {
            assert_eq!((published(unbound), binding(unbound)), (None, None), "{}", unbound.name_any());
        }
        // A copy: bound by its lineage, published by nobody outside the publisher's tenant.
        let copy = copy_of("t", "c", &origin("pub", Plan::Free), json!({}));
        assert_eq!((published(&copy), binding(&copy)), (None, Some(origin("pub", Plan::Free))));
        let republished = copy_of("t", "c", &origin("pub", Plan::Free), terms("Paid"));
        assert_eq!(published(&republished), None, "another tenant cannot sell the publisher's bytes");
        assert_eq!(binding(&republished), Some(origin("pub", Plan::Free)));
        // The publisher offers its own bytes again (a copy in another region): its new terms.
        let own = copy_of("pub", "m", &origin("pub", Plan::Free), terms("Paid"));
        assert_eq!(binding(&own), Some(origin("pub", Plan::Paid)));
    }

    #[test]
    fn bound_bytes_are_never_public_and_marketplace_only_for_the_publisher() {
        let paid = origin("pub", Plan::Paid);
        assert_eq!(visibility_refusal(Visibility::Private, "t", &paid), None);
        assert_eq!(visibility_refusal(Visibility::Marketplace, "pub", &paid), None);
        let public = visibility_refusal(Visibility::Public, "pub", &paid).unwrap();
        assert!(public.contains("pub/m") && public.contains("cannot be made Public"), "{public}");
        let resold = visibility_refusal(Visibility::Marketplace, "t", &paid).unwrap();
        assert!(resold.contains("only the publisher's tenant pub"), "{resold}");
    }

    #[test]
    fn paid_bytes_are_copied_by_the_publisher_only() {
        assert!(copy_refused(&origin("pub", Plan::Paid), "t"));
        assert!(!copy_refused(&origin("pub", Plan::Paid), "pub"));
        assert!(!copy_refused(&origin("pub", Plan::Free), "t"));
    }

    #[test]
    fn usage_counts_usable_references_per_tenant_and_image() {
        let paid = image("pub", "m", terms("Paid"), json!({"phase": "Active"}));
        let free = image("pub", "f", terms("Free"), json!({"phase": "Active"}));
        let plain = image("pub", "p", json!({}), json!({"phase": "Active"}));
        let reference = |tenant: &str, name: &str, to: &str, phase: &str, uid: &str| {
            let spec = json!({"source": {"image": {"namespace": "pub", "name": to}}});
            image(tenant, name, spec, json!({"phase": phase, "source": {"uid": uid}}))
        };
        let images = [
            paid,
            free,
            plain,
            reference("a", "r1", "m", "Active", "m"),
            reference("a", "r2", "m", "Active", "m"),
            reference("b", "r1", "m", "Active", "m"),
            reference("b", "r2", "f", "Active", "f"),
            // Not counted: not Active, bound to an older image of the name, not Marketplace.
            reference("b", "r3", "f", "Unavailable", "f"),
            reference("c", "r1", "m", "Active", "older"),
            reference("c", "r2", "p", "Active", "p"),
        ];
        let got: Vec<(String, String, Plan, i64)> =
            usage(images.iter()).into_iter().map(|(k, n)| (k.tenant, k.image, k.plan, n)).collect();
        assert_eq!(
            got,
            [
                ("b".into(), "f".into(), Plan::Free, 1),
                ("a".into(), "m".into(), Plan::Paid, 2),
                ("b".into(), "m".into(), Plan::Paid, 1),
            ]
        );
        let key = usage(images.iter()).into_keys().next().unwrap();
        assert_eq!(
            (key.image_namespace.as_str(), key.publisher.as_str(), key.product.as_str()),
            ("pub", "Acme", "tool")
        );
    }
}
