use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Name of the one ImageQuota of a tenant namespace.
pub const QUOTA_NAME: &str = "default";

/// A tenant's image limits and live usage: the quota ledger. One per namespace, named
/// `default`; the operator creates it when missing. Users and GitOps may own `spec`
/// (overrides of the operator policy); the operator owns `status`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "ims.io",
    version = "v1alpha1",
    kind = "ImageQuota",
    namespaced,
    shortname = "imgquota",
    category = "ims",
    status = "ImageQuotaStatus",
    doc = "A tenant's limits and live usage (the quota ledger).",
    validation = Rule::new("self.metadata.name == 'default'").message("an ImageQuota must be named default (one per namespace)"),
    printcolumn(name = "Used", type_ = "string", json_path = ".status.summary", description = "Usage against limits, per region"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ImageQuotaSpec {
    /// Owned images allowed per region (policy default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub private_images_per_region: Option<i64>,
    /// Bytes of owned images allowed per region (policy default: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub image_bytes_per_region: Option<i64>,
    /// Imports in flight at once (policy default 40).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub concurrent_imports: Option<i64>,
    /// Cross-region copies in flight at once (policy default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub concurrent_cross_region_copies: Option<i64>,
}

/// Effective limits: the spec's overrides over the operator policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct QuotaLimits {
    /// Owned images allowed per region.
    pub private_images_per_region: i64,
    /// Bytes of owned images allowed per region; unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_bytes_per_region: Option<i64>,
    /// Imports in flight at once.
    pub concurrent_imports: i64,
    /// Cross-region copies in flight at once.
    pub concurrent_cross_region_copies: i64,
}

/// Usage in one region.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegionUsage {
    /// Region name.
    pub region: String,
    /// Owned images admitted in this region.
    pub images: i64,
    /// Bytes of owned images in this region.
    pub bytes: i64,
}

/// A slot held by one image: admitted to a region, and possibly importing.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// uid of the Image holding the slot.
    pub uid: String,
    /// Name of the Image.
    pub name: String,
    /// Region the slot is in.
    pub region: String,
    /// Bytes counted for this image (known once stored; omitted while 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: i64,
    /// True while the image's bytes are being imported (counts against concurrentImports;
    /// omitted while false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub importing: bool,
    /// True while the image's bytes are being copied from another region (counts against
    /// concurrentCrossRegionCopies as well).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cross_region: bool,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Live usage, kept by the operator with compare-and-swap writes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageQuotaStatus {
    /// Effective limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard: Option<QuotaLimits>,
    /// Usage per region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["region".into()]))]
    pub used: Vec<RegionUsage>,
    /// The ledger: one entry per admitted owned image. Written whole by the operator alone
    /// (an atomic list: its field ownership is one entry, not one per image, so the object stays
    /// small enough for etcd at 10,000 images).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub reservations: Vec<Reservation>,
    /// Readable usage, e.g. `eu-west: 3/50 images`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
