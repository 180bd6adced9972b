//! Status plumbing shared by the controllers: conditions as kstatus expects them, no-op
//! detection, and server-side-apply status writes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

/// Now, at second precision (as the API server stores times).
pub fn now() -> Time {
    let ts = jiff::Timestamp::now();
    Time(jiff::Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

/// Desired state of one condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// `Ready`, `Reconciling`, `Stalled`.
    pub typ: &'static str,
    /// True or False.
    pub status: bool,
    /// Machine-readable reason.
    pub reason: String,
    /// Human message.
    pub message: String,
}

impl Want {
    /// A condition.
    pub fn new(typ: &'static str, status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Want { typ, status, reason: reason.into(), message: message.into() }
    }
}

/// The conditions after applying `wants` to `old`: `lastTransitionTime` moves only when a
/// condition's status flips; conditions not wanted are dropped (a `Reconciling` that ended
/// disappears, as kstatus expects).
pub fn conditions(old: &[Condition], wants: &[Want], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    wants
        .iter()
        .map(|want| {
            let status = if want.status { "True" } else { "False" };
            let previous = old.iter().find(|c| c.type_ == want.typ);
            let last_transition_time = match previous {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: want.typ.to_string(),
                status: status.to_string(),
                reason: want.reason.clone(),
                message: want.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Whether two statuses are the same but for condition timestamps (a write would be a no-op).
pub fn same_ignoring_time<S: Serialize>(a: &S, b: &S) -> bool {
    fn strip(mut v: serde_json::Value) -> serde_json::Value {
        if let Some(conds) = v.get_mut("conditions").and_then(|c| c.as_array_mut()) {
            for c in conds {
                if let Some(o) = c.as_object_mut() {
                    o.remove("lastTransitionTime");
                }
            }
        }
        v
    }
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => strip(a) == strip(b),
        _ => false,
    }
}

/// Writes `status` with server-side apply as `manager`, unless it equals `current` (ignoring
/// condition timestamps). Returns whether a write happened: not when the object was deleted
/// meanwhile (a status for an object that is gone is nobody's concern, not a failed reconcile).
pub async fn apply_status<K, S>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    current: Option<&S>,
    status: &S,
) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    if current.is_some_and(|c| same_ignoring_time(c, status)) {
        return Ok(false);
    }
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    match api.patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&patch)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            tracing::debug!(name, "not writing the status of an object that is gone");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_status_of_an_object_that_is_gone_is_not_written_and_not_an_error() {
        use crate::api::{Region, RegionStatus};
        let api: Api<Region> = Api::all(crate::api::embedded().client());
        let status = RegionStatus { images: Some(1), ..Default::default() };
        assert!(!apply_status(&api, "gone", "test", None, &status).await.unwrap());
        let region = serde_json::json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": "here"},
            "spec": {"storage": {"url": "file:///var/lib/ims/here"}}});
        api.create(&Default::default(), &serde_json::from_value(region).unwrap()).await.unwrap();
        assert!(apply_status(&api, "here", "test", None, &status).await.unwrap());
        assert_eq!(api.get_status("here").await.unwrap().status.unwrap().images, Some(1));
    }

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first =
            conditions(&[], &[Want::new("Ready", false, "Importing", "working")], Some(1), &t("2026-01-01T00:00:00Z"));
        assert_eq!(first[0].last_transition_time, t("2026-01-01T00:00:00Z"));
        let same =
            conditions(&first, &[Want::new("Ready", false, "Importing", "50%")], Some(1), &t("2026-01-01T00:01:00Z"));
        assert_eq!(same[0].last_transition_time, t("2026-01-01T00:00:00Z"), "same status keeps the time");
        assert_eq!(same[0].message, "50%");
        let flipped =
            conditions(&same, &[Want::new("Ready", true, "Active", "done")], Some(2), &t("2026-01-01T00:02:00Z"));
        assert_eq!(flipped[0].last_transition_time, t("2026-01-01T00:02:00Z"));
        assert_eq!(flipped[0].observed_generation, Some(2));
    }

    #[test]
    fn statuses_differing_only_in_times_are_the_same() {
        let a = crate::api::RegionStatus {
            conditions: conditions(
                &[],
                &[Want::new("Ready", true, "StoreReady", "ok")],
                Some(1),
                &t("2026-01-01T00:00:00Z"),
            ),
            ..Default::default()
        };
        let mut b = a.clone();
        b.conditions[0].last_transition_time = t("2027-01-01T00:00:00Z");
        assert!(same_ignoring_time(&a, &b));
        b.conditions[0].message = "changed".into();
        assert!(!same_ignoring_time(&a, &b));
    }
}
