//! The five `ims.io/v1alpha1` kinds of the API contract (docs/API.md), one file a kind, and
//! their condition vocabulary ([`conditions`]).
//!
//! Doc comments on fields are what `kubectl explain` shows: they are written for users.

// kube's `printcolumn(name = .., type_ = ..)` repeats the same keys once per column.
#[allow(clippy::duplicated_attributes)]
mod image;
#[allow(clippy::duplicated_attributes)]
mod image_copy;
#[allow(clippy::duplicated_attributes)]
mod image_quota;
#[allow(clippy::duplicated_attributes)]
mod image_share;
#[allow(clippy::duplicated_attributes)]
mod region;

pub mod conditions;

pub use image::*;
pub use image_copy::*;
pub use image_quota::*;
pub use image_share::*;
pub use region::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every ims kind.
pub const GROUP: &str = "ims.io";
/// API version of every ims kind.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "ims.io/v1alpha1";

/// A status condition (`metav1.Condition`): `Ready`, `Reconciling`, `Stalled`.
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The CustomResourceDefinitions of all five kinds, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Region::crd(), Image::crd(), ImageShare::crd(), ImageCopy::crd(), ImageQuota::crd()]
}

/// An in-memory Kubernetes API serving [`crds()`] (tests, `ims-operator local`, kubectl).
pub fn embedded() -> kube_embedded::ApiServer {
    kube_embedded::ApiServer::new(crds())
}

/// A DNS-1123 label: namespace names, tenant names.
pub(crate) const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 subdomain: object names.
pub(crate) const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// `sha256:<64 hex>` or `sha512:<128 hex>`.
pub(crate) const CHECKSUM: &str = r"^(sha256:[0-9a-fA-F]{64}|sha512:[0-9a-fA-F]{128})$";
/// URL of an image file to import.
pub(crate) const SOURCE_URL: &str = r"^(https?|file)://.+$";
/// A name shown to people: no leading or trailing blank, no line break.
pub(crate) const DISPLAY_NAME: &str = r"^\S(.*\S)?$";
/// A non-negative decimal with at most 6 decimals: `0.05`, `12`.
pub(crate) const DECIMAL: &str = r"^(0|[1-9][0-9]{0,8})(\.[0-9]{1,6})?$";
/// An ISO 4217 currency code.
pub(crate) const CURRENCY: &str = r"^[A-Z]{3}$";
