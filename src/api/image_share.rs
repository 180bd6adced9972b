use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// The image owner grants other tenants (namespaces) use of one of its images, in the image's
/// region only. A tenant accepts by creating a reference Image (`source.image`) in its namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ims.io",
    version = "v1alpha1",
    kind = "ImageShare",
    namespaced,
    shortname = "imgshare",
    category = "ims",
    status = "ImageShareStatus",
    doc = "Owner grants other tenants use of one of its images, same region only.",
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image"),
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.memberCount"),
    printcolumn(name = "Accepted", type_ = "integer", json_path = ".status.acceptedCount"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ImageShareSpec {
    /// Name of the Image to share, in this namespace. Immutable.
    #[schemars(length(min = 1, max = 253), pattern(super::DNS_SUBDOMAIN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("image is immutable: create another ImageShare to share another image"))]
    pub image: String,
    /// Namespaces (tenants) that may use the image: 1 to 128, unique, not this namespace.
    #[schemars(length(min = 1, max = 128), inner(length(min = 1, max = 63), pattern(super::DNS_LABEL)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub tenants: Vec<String>,
}

/// State of one member of a share.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Granted; the tenant has not created a reference yet (pending and declined are the same).
    Pending,
    /// The tenant has a reference Image to the shared image.
    Accepted,
    /// The grant was withdrawn.
    Revoked,
    /// Not granted; `reason` says why (`TenantNotFound`, `SelfShare`, `MemberLimitExceeded`).
    Invalid,
}

/// One member of a share.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ShareMember {
    /// Namespace of the member.
    pub tenant: String,
    /// `Pending`, `Accepted`, `Revoked` or `Invalid`.
    pub state: MemberState,
    /// Why the member is in this state (for `Invalid`: `TenantNotFound`, `SelfShare`,
    /// `MemberLimitExceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the member entered this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// Observed state of a share.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageShareStatus {
    /// One entry per tenant of the share.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["tenant".into()]))]
    pub members: Vec<ShareMember>,
    /// Number of members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_count: Option<i32>,
    /// Number of members in state `Accepted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_count: Option<i32>,
    /// `Ready`: every member is granted; otherwise the reason of the refusal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
