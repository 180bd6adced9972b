//! The errors of a reconcile.

use kube::runtime::{controller::Action, finalizer};

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

/// The outcome of a reconcile behind a finalizer of ours (kube's `finalizer` helper).
/// A finalizer write refused only because the cached object it was decided on is behind the API
/// server's is no failure: the guarding `test` of the finalizers no longer holds (422 without
/// field causes: they were added or removed meanwhile, by this controller a moment ago or by a
/// previous leader), or the object is already gone (404: its deletion completed). The change
/// that made the cache stale comes through the watch and runs the object again; logging it as a
/// failed reconcile and backing off (as every busy start-up or takeover did) would be wrong.
pub fn finalizer_outcome(result: Result<Action, finalizer::Error<Error>>) -> Result<Action, Error> {
    match result {
        Err(
            finalizer::Error::AddFinalizer(kube::Error::Api(s))
            | finalizer::Error::RemoveFinalizer(kube::Error::Api(s)),
        ) if s.code == 404 || (s.code == 422 && s.details.as_ref().is_none_or(|d| d.causes.is_empty())) => {
            tracing::debug!(code = s.code, "finalizer write on a stale copy of the object: its change is on its way");
            Ok(Action::await_change())
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: serde_json::Value) -> kube::Error {
        kube::Error::Api(Box::new(serde_json::from_value(status).expect("a Status")))
    }

    /// What kube-apiserver answers a finalizer write on a stale copy (a failed JSON-patch `test`:
    /// 422 without causes; the object gone: 404) is no failure; a real refusal (422 with field
    /// causes, or any other error) still is.
    #[test]
    fn finalizer_writes_on_stale_copies_are_no_failures() {
        let stale = || api(serde_json::json!({"code": 422, "reason": "Invalid", "details": {}}));
        let gone = || api(serde_json::json!({"code": 404, "reason": "NotFound"}));
        let invalid = || {
            api(serde_json::json!({"code": 422, "reason": "Invalid",
                "details": {"name": "i", "kind": "Image", "causes": [{"reason": "FieldValueInvalid", "field": "spec.region"}]}}))
        };
        let broken = || api(serde_json::json!({"code": 500, "reason": "InternalError"}));
        assert!(finalizer_outcome(Err(finalizer::Error::AddFinalizer(stale()))).is_ok());
        assert!(finalizer_outcome(Err(finalizer::Error::AddFinalizer(gone()))).is_ok());
        assert!(finalizer_outcome(Err(finalizer::Error::RemoveFinalizer(stale()))).is_ok());
        assert!(finalizer_outcome(Err(finalizer::Error::RemoveFinalizer(gone()))).is_ok());
        assert!(finalizer_outcome(Err(finalizer::Error::AddFinalizer(invalid()))).is_err());
        assert!(finalizer_outcome(Err(finalizer::Error::RemoveFinalizer(broken()))).is_err());
        let failed = finalizer::Error::CleanupFailed(Error::Transient("the store".into()));
        assert!(finalizer_outcome(Err(failed)).is_err());
    }
}
