//! The sharing rules that need no API: whether an image may be shared at all, which members of
//! which ImageShare are granted under the member limit, and whether a tenant may use an image.

use std::collections::HashSet;

use kube::ResourceExt;

use super::Policy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    Image, ImagePhase, ImageShare, ImageShareStatus, ImageType, MemberState, ShareMember, Visibility,
    conditions::{ConditionType, Reason, Want, conditions},
};

/// Why an image cannot be shared at all: (reason, message). Checked in this order. An image
/// says `visibility: Public` outside the platform namespace `public_namespace` is not public
/// (it is refused that visibility, see [`super::image::effective_visibility`]): it is shared as
/// the Private image it is.
pub fn refusal(name: &str, image: Option<&Image>, public_namespace: &str) -> Option<(Reason, String)> {
    let Some(image) = image else {
        return Some((
            Reason::ImageNotFound,
            format!("Image {name} does not exist in this namespace: create it, or correct spec.image"),
        ));
    };
    if image.spec.source.image.is_some() {
        return Some((
            Reason::NotOwner,
            format!(
                "Image {name} is a reference to another tenant's image: only its owner may share it (references are never re-shared)"
            ),
        ));
    }
    match super::image::effective_visibility(image, public_namespace) {
        Visibility::Public => {
            return Some((
                Reason::PublicImage,
                format!("Image {name} is Public: every tenant may already use it, no ImageShare is needed"),
            ));
        }
        Visibility::Marketplace => {
            return Some((
                Reason::MarketplaceImage,
                format!("Image {name} is published to the Marketplace: it cannot be shared; use a Private image"),
            ));
        }
        Visibility::Private => {}
    }
    if let Some(origin) = super::marketplace::inherited(image) {
        return Some((
            Reason::MarketplaceImage,
            format!(
                "Image {name} is a copy of {}: the Marketplace terms bind every copy, so it cannot be shared; other tenants use the Marketplace image itself (a reference to it)",
                super::marketplace::describe(origin)
            ),
        ));
    }
    if image.spec.encryption.is_some() {
        return Some((
            Reason::EncryptedImage,
            format!(
                "Image {name} is encrypted: encrypted images cannot be shared; copy it without encryption (ImageCopy in the same region) and share the copy"
            ),
        ));
    }
    if image.spec.r#type == ImageType::FullServer && image.spec.backup_id.is_none() {
        return Some((
            Reason::FullServerNotFromBackup,
            format!(
                "Image {name} is a FullServer image not made from a backup: only FullServer images with a backupID can be shared"
            ),
        ));
    }
    if image.status.as_ref().and_then(|s| s.phase) != Some(ImagePhase::Active) {
        return Some((
            Reason::ImageNotActive,
            format!("Image {name} is not Active yet: the share takes effect when it is"),
        ));
    }
    None
}

/// What a member of an ImageShare is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The tenant may use the image (if the share is not refused as a whole).
    Granted,
    /// Not granted; the reason is an API member reason.
    Invalid(Reason),
}

/// The verdicts over all ImageShares of one image.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    /// Why the image cannot be shared at all.
    pub refusal: Option<(Reason, String)>,
    /// Per share (by name), its tenants in spec order with their verdicts.
    pub shares: Vec<(String, Vec<(String, Verdict)>)>,
    /// Distinct tenants granted across the shares.
    pub granted: HashSet<String>,
    /// The member limit of the image.
    pub limit: usize,
}

impl Evaluation {
    /// Whether `tenant` may use the image through some ImageShare.
    pub fn grants(&self, tenant: &str) -> bool {
        self.refusal.is_none() && self.granted.contains(tenant)
    }

    /// Whether an ImageShare lists `tenant` as a granted member, whatever the image's phase
    /// (a reference tells "not shared" from "shared, source not Active yet").
    pub fn lists(&self, tenant: &str) -> bool {
        self.granted.contains(tenant)
            && self.refusal.as_ref().is_none_or(|(reason, _)| *reason == Reason::ImageNotActive)
    }

    /// The verdicts of one share.
    pub fn members(&self, share: &str) -> &[(String, Verdict)] {
        self.shares.iter().find(|(name, _)| name == share).map(|(_, m)| m.as_slice()).unwrap_or(&[])
    }
}

/// The member limit of an image (FullServer images have their own).
pub fn member_limit(image: Option<&Image>, policy: &Policy) -> usize {
    let limit = match image.map(|i| i.spec.r#type) {
        Some(ImageType::FullServer) => policy.full_server_share_members_per_image,
        _ => policy.share_members_per_image,
    };
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// Evaluates every ImageShare of one image (`shares`: those of the owner's namespace naming
/// it, not being deleted). Shares are taken oldest first (creationTimestamp, then name), so
/// when the distinct tenants exceed the limit the members of the newest share are refused.
pub fn evaluate(
    owner_namespace: &str,
    image_name: &str,
    image: Option<&Image>,
    shares: &[&ImageShare],
    tenant_exists: impl Fn(&str) -> bool,
    policy: &Policy,
    public_namespace: &str,
) -> Evaluation {
    let mut ordered: Vec<&&ImageShare> = shares.iter().collect();
    ordered.sort_by_key(|s| (s.metadata.creation_timestamp.as_ref().map(|t| t.0), s.name_any()));
    let limit = member_limit(image, policy);
    let mut granted = HashSet::new();
    let mut out = Vec::with_capacity(ordered.len());
    for share in ordered {
        let members = share
            .spec
            .tenants
            .iter()
            .map(|tenant| {
                let verdict = if tenant == owner_namespace {
                    Verdict::Invalid(Reason::SelfShare)
                } else if !tenant_exists(tenant) {
                    Verdict::Invalid(Reason::TenantNotFound)
                } else if granted.contains(tenant) || granted.len() < limit {
                    granted.insert(tenant.clone());
                    Verdict::Granted
                } else {
                    Verdict::Invalid(Reason::MemberLimitExceeded)
                };
                (tenant.clone(), verdict)
            })
            .collect();
        out.push((share.name_any(), members));
    }
    Evaluation { refusal: refusal(image_name, image, public_namespace), shares: out, granted, limit }
}

/// Whether `tenant` may use `source` without an ImageShare: Public images of the platform
/// namespace and Marketplace images (as their visibility is allowed: see
/// [`super::image::effective_visibility`]), never a reference (references are not re-shared).
/// The owner's own namespace may always use its images.
pub fn open_to(source: &Image, tenant: &str, public_namespace: &str) -> bool {
    if source.spec.source.image.is_some() {
        return false;
    }
    source.namespace().as_deref() == Some(tenant)
        || super::image::effective_visibility(source, public_namespace) != Visibility::Private
}

/// The status of `share` (of the image `eval` evaluated): a member is `Accepted` while its
/// namespace holds a reference to the image (`has_reference`), else `Pending`, or `Invalid`
/// with its reason; a tenant taken off the list while it used the image stays `Revoked` while
/// its reference exists. `since` moves only when a member's state or reason changes.
pub fn status(
    share: &ImageShare,
    eval: &Evaluation,
    has_reference: impl Fn(&str) -> bool,
    now: &Time,
) -> ImageShareStatus {
    let old = share.status.clone().unwrap_or_default();
    let since = |tenant: &str, state: MemberState, reason: &Option<String>| {
        old.members
            .iter()
            .find(|m| m.tenant == tenant && m.state == state && &m.reason == reason)
            .and_then(|m| m.since.clone())
            .or_else(|| Some(now.clone()))
    };
    let mut members: Vec<ShareMember> = Vec::new();
    for (tenant, verdict) in eval.members(&share.name_any()) {
        let (state, reason) = match verdict {
            Verdict::Invalid(reason) => (MemberState::Invalid, Some(reason.to_string())),
            Verdict::Granted if eval.refusal.is_none() && has_reference(tenant) => (MemberState::Accepted, None),
            Verdict::Granted => (MemberState::Pending, None),
        };
        let since = since(tenant, state, &reason);
        members.push(ShareMember { tenant: tenant.clone(), state, reason, since });
    }
    for gone in old.members.iter().filter(|m| !share.spec.tenants.contains(&m.tenant)) {
        if matches!(gone.state, MemberState::Accepted | MemberState::Revoked) && has_reference(&gone.tenant) {
            let reason = Some(Reason::ShareRevoked.to_string());
            let since = since(&gone.tenant, MemberState::Revoked, &reason);
            members.push(ShareMember { tenant: gone.tenant.clone(), state: MemberState::Revoked, reason, since });
        }
    }
    let granted = members.iter().filter(|m| matches!(m.state, MemberState::Pending | MemberState::Accepted)).count();
    let accepted = members.iter().filter(|m| m.state == MemberState::Accepted).count();
    let ready = ready(eval, &members, granted, accepted);
    ImageShareStatus {
        conditions: conditions(&old.conditions, &[ready], share.metadata.generation, now),
        members,
        member_count: Some(granted as i32),
        accepted_count: Some(accepted as i32),
        observed_generation: share.metadata.generation,
    }
}

/// `Ready`: False with the share's refusal, else with the first invalid member's reason
/// (naming every invalid member and how to fix it), else True.
fn ready(eval: &Evaluation, members: &[ShareMember], granted: usize, accepted: usize) -> Want {
    if let Some((reason, message)) = &eval.refusal {
        return Want::new(ConditionType::Ready, false, *reason, format!("{message}; nothing is granted"));
    }
    let invalid: Vec<&ShareMember> = members.iter().filter(|m| m.state == MemberState::Invalid).collect();
    let Some(first) = invalid.first() else {
        return Want::new(
            ConditionType::Ready,
            true,
            Reason::Shared,
            format!("shared with {granted} tenant(s), {accepted} accepted (a reference Image in their namespace)"),
        );
    };
    let reason = first.reason.as_deref().and_then(Reason::parse).unwrap_or(Reason::TenantNotFound);
    let mut parts = Vec::new();
    for reason in [Reason::SelfShare, Reason::TenantNotFound, Reason::MemberLimitExceeded] {
        let names: Vec<&str> = invalid
            .iter()
            .filter(|m| m.reason.as_deref() == Some(reason.as_str()))
            .map(|m| m.tenant.as_str())
            .collect();
        if names.is_empty() {
            continue;
        }
        let list = names.join(", ");
        parts.push(match reason {
            Reason::SelfShare => format!("{list}: the owner's own namespace; remove it from spec.tenants"),
            Reason::TenantNotFound => format!("{list}: no such namespace; create it or correct spec.tenants"),
            _ => format!(
                "{list}: over the limit of {} tenants per image ({} left); remove tenants from this or another ImageShare of the image",
                eval.limit,
                eval.limit.saturating_sub(eval.granted.len())
            ),
        });
    }
    Want::new(ConditionType::Ready, false, reason, format!("members not granted: {}", parts.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ImageShareSpec, ImageSpec, ImageStatus};

    fn image(extra: serde_json::Value, active: bool) -> Image {
        let mut spec =
            serde_json::json!({"region": "r1", "type": "DataDisk", "source": {"url": {"url": "https://x/y"}}});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let spec: ImageSpec = serde_json::from_value(spec).unwrap();
        let mut i = Image::new("img", spec);
        i.metadata.namespace = Some("owner".into());
        i.status = active.then(|| ImageStatus { phase: Some(ImagePhase::Active), ..Default::default() });
        i
    }

    /// `image` as a copy of the Free Marketplace image `pub/m`.
    fn derived(mut image: Image) -> Image {
        let lineage = serde_json::json!({"namespace": "owner", "name": "c", "region": "r1", "marketplace":
            {"namespace": "pub", "name": "m", "publisher": "P", "productCode": "p", "plan": "Free"}});
        image.status.get_or_insert_with(Default::default).lineage = Some(serde_json::from_value(lineage).unwrap());
        image
    }

    fn share(name: &str, created: i64, tenants: &[&str]) -> ImageShare {
        let mut s = ImageShare::new(
            name,
            ImageShareSpec { image: "img".into(), tenants: tenants.iter().map(|t| t.to_string()).collect() },
        );
        s.metadata.namespace = Some("owner".into());
        s.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::from_second(created).unwrap()));
        s
    }

    #[test]
    fn refusals_in_order() {
        let cases = [
            (None, Reason::ImageNotFound),
            (
                Some(image(serde_json::json!({"source": {"image": {"namespace": "a", "name": "b"}}}), true)),
                Reason::NotOwner,
            ),
            // (The test images are in the namespace "owner"; here it is the platform namespace.)
            (Some(image(serde_json::json!({"visibility": "Public"}), true)), Reason::PublicImage),
            (Some(image(serde_json::json!({"visibility": "Marketplace"}), true)), Reason::MarketplaceImage),
            // A copy of a Marketplace image (its lineage says so), Private as it is.
            (Some(derived(image(serde_json::json!({}), true))), Reason::MarketplaceImage),
            (Some(derived(image(serde_json::json!({"visibility": "Public"}), true))), Reason::MarketplaceImage),
            (Some(image(serde_json::json!({"encryption": {"kmsKeyID": "k"}}), true)), Reason::EncryptedImage),
            (Some(image(serde_json::json!({"type": "FullServer"}), true)), Reason::FullServerNotFromBackup),
            (Some(image(serde_json::json!({}), false)), Reason::ImageNotActive),
        ];
        for (img, reason) in cases {
            assert_eq!(refusal("img", img.as_ref(), "owner").map(|r| r.0), Some(reason));
        }
        // `visibility: Public` in a tenant namespace is refused: the image is the Private image
        // it was, and is shared as one (never "every tenant may already use it").
        let tenant_public = image(serde_json::json!({"visibility": "Public"}), true);
        assert_eq!(refusal("img", Some(&tenant_public), "ims-public"), None);
        assert_eq!(
            refusal(
                "img",
                Some(&image(serde_json::json!({"type": "FullServer", "backupID": "b"}), true)),
                "ims-public"
            ),
            None
        );
    }

    #[test]
    fn the_newest_share_is_refused_over_the_limit() {
        let img = image(serde_json::json!({}), true);
        let policy = Policy { share_members_per_image: 3, ..Policy::default() };
        let older = share("older", 100, &["a", "b"]);
        let newer = share("newer", 200, &["b", "c", "d", "owner", "ghost"]);
        // Given newest first: the order comes from creationTimestamp, not the slice.
        let e = evaluate("owner", "img", Some(&img), &[&newer, &older], |t| t != "ghost", &policy, "ims-public");
        assert_eq!(e.members("older"), [("a".into(), Verdict::Granted), ("b".into(), Verdict::Granted)]);
        assert_eq!(
            e.members("newer"),
            [
                ("b".into(), Verdict::Granted),
                ("c".into(), Verdict::Granted),
                ("d".into(), Verdict::Invalid(Reason::MemberLimitExceeded)),
                ("owner".into(), Verdict::Invalid(Reason::SelfShare)),
                ("ghost".into(), Verdict::Invalid(Reason::TenantNotFound)),
            ]
        );
        assert!(e.grants("c") && !e.grants("d") && !e.grants("owner"));
        let full = image(serde_json::json!({"type": "FullServer", "backupID": "b"}), true);
        assert_eq!(member_limit(Some(&full), &Policy::default()), 10);
    }

    #[test]
    fn a_refused_share_grants_nothing() {
        let img = image(serde_json::json!({"encryption": {"kmsKeyID": "k"}}), true);
        let s = share("s", 1, &["a"]);
        let e = evaluate("owner", "img", Some(&img), &[&s], |_| true, &Policy::default(), "ims-public");
        assert_eq!(e.members("s"), [("a".into(), Verdict::Granted)]);
        assert!(!e.grants("a"));
    }

    #[test]
    fn open_images() {
        let mut public = image(serde_json::json!({"visibility": "Public"}), true);
        assert!(!open_to(&public, "t", "ims-public"), "Public outside the platform namespace is not open");
        public.metadata.namespace = Some("ims-public".into());
        assert!(open_to(&public, "t", "ims-public"));
        assert!(open_to(&image(serde_json::json!({"visibility": "Marketplace"}), true), "t", "ims-public"));
        assert!(!open_to(&image(serde_json::json!({}), true), "t", "ims-public"));
        assert!(open_to(&image(serde_json::json!({}), true), "owner", "ims-public"));
        let reference = image(
            serde_json::json!({"visibility": "Marketplace", "source": {"image": {"namespace": "a", "name": "b"}}}),
            true,
        );
        assert!(!open_to(&reference, "t", "ims-public"), "a reference is never re-shared");
        let resold = derived(image(serde_json::json!({"visibility": "Marketplace"}), true));
        assert!(!open_to(&resold, "t", "ims-public"), "another tenant's Marketplace bytes are not resold");
        assert!(open_to(&resold, "owner", "ims-public"));
    }
}
