//! The errors of a reconcile.

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing a finalizer, or the step behind it, failed.
    #[error("{0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    /// Deletion is held by `spec.protected`.
    #[error("{0}")]
    Protected(String),
    /// Deletion waits for what still uses the object (a Region's images).
    #[error("{0}")]
    InUse(String),
    /// A step that may succeed when retried (source or store unavailable).
    #[error("{0}")]
    Transient(String),
}

impl Error {
    /// Label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
            Error::Protected(_) => "protected",
            Error::InUse(_) => "in_use",
            Error::Transient(_) => "transient",
        }
    }
}
