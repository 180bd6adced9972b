//! ims-operator: a Kubernetes-native Image Management Service.
//!
//! - [`api`]: the five `ims.io/v1alpha1` kinds.
//! - [`controllers`]: one controller a kind.
//! - [`policy`]: the operator policy (limits) and the pure rules.
//! - [`fetch`]: image sources (http, https, file) behind an SSRF guard.
//! - [`format`]: disk image format detection from the bytes.
//! - [`import`]: moving an image's bytes into a store, verified.
//! - [`store`]: region byte stores (file://, s3://).
//! - [`admin`]: health and metrics endpoints.
//! - [`metrics`]: the Prometheus metrics.
//! - [`leader`]: leader election on a Lease.
//! - [`local`]: `ims-operator local`, the operator on the embedded API.
//! - [`cli`]: the command line.
//! - [`signal`]: shutdown signals.
//!
//! The in-memory Kubernetes API server (tests, `local`, kubectl) and the validation of objects
//! against the CRD schemas (structure and CEL) are the workspace crate `kube_embedded`
//! (`crates/kube-embedded/`); [`api::embedded`] is it serving the operator's CRDs.

pub mod admin;
pub mod api;
pub mod cli;
pub mod controllers;
pub mod crypt;
pub mod delivery;
pub mod fetch;
pub mod format;
pub mod import;
pub mod leader;
pub mod local;
pub mod metrics;
pub mod mover;
pub mod policy;
pub mod signal;
pub mod store;

#[cfg(test)]
mod fuzz_regressions;
