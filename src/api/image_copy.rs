use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, Encryption, Progress};

/// A request to copy an image to another region, or to re-encrypt it in the same region.
/// Like a Job, it is history once done: deleting it after success keeps the destination image.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ims.io",
    version = "v1alpha1",
    kind = "ImageCopy",
    namespaced,
    shortname = "imgcopy",
    category = "ims",
    status = "ImageCopyStatus",
    doc = "A request to copy an image to another region (or re-encrypt in the same region).",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(name = "Destination", type_ = "string", json_path = ".spec.destination.name"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.destination.region"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.progress.percent",
        description = "Percent copied"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("an ImageCopy is immutable: delete it and create a new one"))]
#[serde(rename_all = "camelCase")]
pub struct ImageCopySpec {
    /// Name of the Image to copy, in this namespace: an owned image or an accepted reference.
    #[schemars(length(min = 1, max = 253), pattern(super::DNS_SUBDOMAIN))]
    pub source: String,
    /// The image to create.
    pub destination: CopyDestination,
}

/// The image a copy creates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CopyDestination {
    /// Region of the new image. The source's region means an in-region copy (to encrypt,
    /// decrypt or change the key).
    #[schemars(length(min = 1, max = 63), pattern(super::DNS_LABEL))]
    pub region: String,
    /// Name of the new Image, in this namespace.
    #[schemars(length(min = 1, max = 253), pattern(super::DNS_SUBDOMAIN))]
    pub name: String,
    /// Encrypt the new image with this KMS key (unset: unencrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Description of the new image (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// Phase of a copy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyPhase {
    /// Waiting: validation, a concurrency slot or quota.
    Pending,
    /// Bytes are moving.
    Copying,
    /// The destination image is Active.
    Succeeded,
    /// The copy cannot succeed; see the Ready condition.
    Failed,
}

/// Observed state of a copy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageCopyStatus {
    /// `Pending`, `Copying`, `Succeeded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CopyPhase>,
    /// Progress mirrored from the destination image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Name of the destination Image, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_image: Option<String>,
    /// When bytes started moving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the copy succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// `Ready`, `Reconciling`, `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
