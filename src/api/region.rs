use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Condition;

/// A region: a failure domain with the object store that holds its images' bytes.
///
/// Cluster-scoped. Images name the region they live in with `spec.region`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ims.io",
    version = "v1alpha1",
    kind = "Region",
    shortname = "rgn",
    category = "ims",
    status = "RegionStatus",
    doc = "A region and the object store that holds its image bytes.",
    printcolumn(name = "Store", type_ = "string", json_path = ".spec.storage.url"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Images", type_ = "integer", json_path = ".status.images"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct RegionSpec {
    /// Where this region keeps image bytes.
    pub storage: RegionStorage,
    /// A human-readable name for the region, e.g. "Europe West (Paris)".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub display_name: Option<String>,
    /// Largest image this region accepts, in GiB. Unset: the operator policy's limit.
    #[serde(default, rename = "maxImageSizeGiB", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_image_size_gib: Option<i64>,
    /// The KMS that wraps the data keys of this region's encrypted images (those with
    /// `spec.encryption.kmsKeyID`). Unset: `Local`, the keys of the Secret `ims-kms-keys` in
    /// the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<RegionKms>,
}

/// A region's KMS.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.provider == 'AWS' ? has(self.endpoint) && has(self.secretRef) : !has(self.endpoint) && !has(self.awsRegion) && !has(self.secretRef)")
        .message("kms: provider AWS needs endpoint and secretRef; provider Local takes neither endpoint, awsRegion nor secretRef"),
)]
pub struct RegionKms {
    /// `Local` (default): keys in the Secret `ims-kms-keys` of the operator's namespace, one
    /// entry of 32 random bytes per key id. `AWS`: the AWS KMS API (or a compatible one) at
    /// `endpoint`; `kmsKeyID` is then a key id, ARN or alias of that KMS.
    #[serde(default)]
    pub provider: KmsProvider,
    /// The KMS API endpoint, e.g. `https://kms.eu-west-1.amazonaws.com`. Only for AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(r"^https?://.+$"))]
    pub endpoint: Option<String>,
    /// Signing region of the KMS (default `us-east-1`). Only for AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub aws_region: Option<String>,
    /// Secret with the KMS credentials (keys `accessKeyID` and `secretAccessKey`). Only for AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
}

/// Who wraps the data keys.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KmsProvider {
    /// Keys in a Secret of the operator's namespace.
    #[default]
    Local,
    /// The AWS KMS API.
    #[serde(rename = "AWS")]
    Aws,
}

/// The object store of a region.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegionStorage {
    /// Store URL: `file:///var/lib/ims/<region>` (a directory on the operator's volume, the
    /// embedded default) or `s3://bucket/prefix` for an S3-compatible store. Each Region needs
    /// a store of its own: one that is, holds or is inside another Region's is refused
    /// (`StoreConflict`).
    #[schemars(length(min = 1, max = 1024), pattern(r"^(file|s3)://.+$"))]
    pub url: String,
    /// S3 endpoint, e.g. `https://s3.eu-west-1.amazonaws.com` or a MinIO/Ceph RGW address.
    /// Only for `s3://` URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(r"^https?://.+$"))]
    pub endpoint: Option<String>,
    /// Signing region of the S3 store (default `us-east-1`). Only for `s3://` URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub s3_region: Option<String>,
    /// Secret with the S3 credentials (keys `accessKeyID` and `secretAccessKey`).
    /// Only for `s3://` URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
}

/// A reference to a Secret in the operator's namespace (`ims-system` by default): the operator
/// reads Secrets only there.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), pattern(super::DNS_SUBDOMAIN))]
    pub name: String,
}

/// Observed state of a region.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// `Ready`: the store answered a write, read-back and delete probe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Owned images (not references) stored in this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<i64>,
    /// Bytes stored in this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
