//! ims-operator: a Kubernetes-native Image Management Service.
//!
//! - [`api`]: the five `ims.io/v1alpha1` kinds.
//! - [`controllers`]: one controller a kind.
//! - [`policy`]: the operator policy (limits) and the pure rules.
//! - [`schema`]: validation of objects against the generated CRD schemas (structure and CEL),
//!   as kube-apiserver does it.
//! - [`fetch`]: image sources (http, https, file) behind an SSRF guard.
//! - [`format`]: disk image format detection from the bytes.
//! - [`import`]: moving an image's bytes into a store, verified.
//! - [`store`]: region byte stores (file://, s3://).
//! - [`admin`]: health and metrics endpoints.
//! - [`metrics`]: the Prometheus metrics.
//! - [`leader`]: leader election on a Lease.
//! - [`embedded`]: an in-memory Kubernetes API server (tests, `local`, kubectl).
//! - [`local`]: `ims-operator local`, the operator on the embedded API.
//! - [`cli`]: the command line.
//! - [`signal`]: shutdown signals.

pub mod admin;
pub mod api;
pub mod cli;
pub mod controllers;
pub mod embedded;
pub mod fetch;
pub mod format;
pub mod import;
pub mod leader;
pub mod local;
pub mod metrics;
pub mod policy;
pub mod schema;
pub mod signal;
pub mod store;
