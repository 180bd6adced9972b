//! Regions through the real controllers: the store is probed, Ready says why.

mod support;

use ims_operator::api::Region;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::wait::Condition,
};
use serde_json::json;

fn ready_reason(region: Option<&Region>) -> Option<(String, String)> {
    let c = region?.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

fn has_ready(status: &'static str, reason: &'static str) -> impl Condition<Region> {
    move |r: Option<&Region>| ready_reason(r) == Some((status.to_string(), reason.to_string()))
}

scenarios! {
    async fn a_file_region_becomes_ready_and_a_bad_one_says_why(env: &Env) {
        let regions: Api<Region> = Api::all(env.client.clone());
        let suffix = env.namespace("rgn").await; // unique per run, also on a shared cluster
        let good = format!("{suffix}-good");
        let bad = format!("{suffix}-bad");
        env.start_operator();
        let apply = |name: &str, url: &str| {
            json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": name}, "spec": {"storage": {"url": url}}})
        };
        regions.patch(&good, &PatchParams::apply("test"), &Patch::Apply(apply(&good, &format!("file:///var/lib/ims/{good}")))).await.unwrap();
        regions.patch(&bad, &PatchParams::apply("test"), &Patch::Apply(apply(&bad, "file:///etc/ims"))).await.unwrap();

        let ready = env.wait_for(&regions, &good, has_ready("True", "StoreReady")).await.unwrap();
        let status = ready.status.unwrap();
        assert_eq!((status.images, status.bytes, status.observed_generation), (Some(0), Some(0), ready.metadata.generation));
        if env.server().is_some() {
            let dir = env.region_dir(&good);
            assert!(dir.is_dir(), "the store directory exists");
            assert_eq!(std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.path().is_file()).count(), 0, "the probe leaves nothing behind");
        }

        let refused = env.wait_for(&regions, &bad, has_ready("False", "InvalidSpec")).await.unwrap();
        let conditions = refused.status.unwrap().conditions;
        let ready = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert!(ready.message.contains("outside the operator's file store root /var/lib/ims"), "{}", ready.message);
        assert!(conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True"), "a spec error stalls");

        // Fixing the spec makes it Ready: the reconcile follows the generation.
        regions.patch(&bad, &PatchParams::apply("test"), &Patch::Apply(apply(&bad, &format!("file:///var/lib/ims/{bad}")))).await.unwrap();
        let fixed = env.wait_for(&regions, &bad, has_ready("True", "StoreReady")).await.unwrap();
        assert!(fixed.status.unwrap().conditions.iter().all(|c| c.type_ != "Stalled"));

        // A steady region is not rewritten.
        let before = regions.get(&good).await.unwrap().resource_version();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(regions.get(&good).await.unwrap().resource_version(), before, "no writes while nothing changes");
        for name in [&good, &bad] {
            regions.delete(name, &DeleteParams::default()).await.unwrap();
        }
    }

    async fn an_s3_region_without_its_secret_is_not_ready(env: &Env) {
        let regions: Api<Region> = Api::all(env.client.clone());
        let name = format!("{}-s3", env.namespace("s3").await);
        env.start_operator();
        let region = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": name},
            "spec": {"storage": {"url": "s3://images/eu", "endpoint": "http://127.0.0.1:9", "secretRef": {"name": "missing-s3-creds"}}}});
        regions.patch(&name, &PatchParams::apply("test"), &Patch::Apply(region)).await.unwrap();
        let r = env.wait_for(&regions, &name, has_ready("False", "SecretNotFound")).await.unwrap();
        let message = r.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
        assert_eq!(message, "Secret ims-system/missing-s3-creds not found: create it with the keys accessKeyID and secretAccessKey");
        regions.delete(&name, &DeleteParams::default()).await.unwrap();
    }
}
