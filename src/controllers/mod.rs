//! The controllers, one module a kind (`region`, `image`, `share`, `copy`, `quota`), each
//! reconcile reading as decide -> act -> write status, with the rules in [`crate::policy`].
//!
//! - [`context`]: what every controller shares ([`Config`], [`Context`]).
//! - [`watches`]: one cache of each kind, whom each kind's changes re-run, and [`run`].
//! - [`index`]: watch-fed indexes (references by source, shares by image, copies by image).
//! - [`ledger`]: the quota ledger's one writer task per namespace (compare-and-swap batches);
//!   [`quota`] is how the controllers ask it.
//! - [`moves`], [`backoff`], [`error`], [`status`]: byte moves in flight, retry delays, reconcile
//!   errors, status writes.

pub mod backoff;
pub mod context;
pub mod copy;
pub mod error;
pub mod image;
pub mod index;
pub mod ledger;
pub mod moves;
pub mod quota;
pub mod region;
pub mod share;
pub mod status;
pub mod watches;

pub use backoff::Backoff;
pub use context::{Config, Context, MoverConfig};
#[cfg(test)]
pub(crate) use context::{test_api, test_image};
pub use error::Error;
pub use moves::{Moves, Moving};
pub use watches::run;
pub(crate) use watches::{AbortOnDrop, controller, stopping_on};

/// A shutdown trigger every controller can await.
pub type Shutdown = futures::future::Shared<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>>;
