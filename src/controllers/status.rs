//! Status writes shared by the controllers: the time conditions are stamped with, no-op
//! detection, and server-side-apply status writes. What the conditions say is
//! [`crate::api::conditions`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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
    use crate::api::conditions::{ConditionType, Reason, Want, conditions};

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
    fn statuses_differing_only_in_times_are_the_same() {
        let a = crate::api::RegionStatus {
            conditions: conditions(
                &[],
                &[Want::new(ConditionType::Ready, true, Reason::StoreReady, "ok")],
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
