//! Delivery: the image bytes served over HTTP to provisioners (curl, `qemu-img`, KubeVirt CDI,
//! Metal3). Every URL is a capability: it names one Image (namespace, name, uid) and one disk,
//! with an HMAC-SHA256 over them keyed by a Secret of the operator namespace, and is checked
//! again on every request. This module holds the pure parts: the capability ([`token`]) and the
//! byte ranges a request asks for ([`range`]).

pub mod range;
pub mod server;
pub mod token;

pub use range::{Ranged, ranged};
pub use token::{Capability, Key};
