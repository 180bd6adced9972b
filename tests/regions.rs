//! Regions through the real controllers: the store is probed, Ready says why.

mod support;

use ims_operator::api::{Image, ImagePhase, Region};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::wait::Condition,
};
use serde_json::json;
use support::reason_is;

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
            "spec": {"storage": {"url": format!("s3://images/{name}"), "endpoint": "http://127.0.0.1:9", "secretRef": {"name": "missing-s3-creds"}}}});
        regions.patch(&name, &PatchParams::apply("test"), &Patch::Apply(region)).await.unwrap();
        let r = env.wait_for(&regions, &name, has_ready("False", "SecretNotFound")).await.unwrap();
        let message = r.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
        assert_eq!(message, "Secret ims-system/missing-s3-creds not found: create it with the keys accessKeyID and secretAccessKey");
        regions.delete(&name, &DeleteParams::default()).await.unwrap();
    }

    async fn two_regions_never_share_a_store(env: &Env) {
        let regions: Api<Region> = Api::all(env.client.clone());
        let p = env.namespace("share").await; // unique per run, also on a shared cluster
        let url = |dir: &str| format!("file:///var/lib/ims/{p}/{dir}");
        let region = |name: &str, url: String| {
            json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": name}, "spec": {"storage": {"url": url}}})
        };
        let names = [format!("{p}-first"), format!("{p}-same"), format!("{p}-inner"), format!("{p}-sibling")];
        let [first, same, inner, sibling] = &names;
        env.start_operator();
        regions.patch(first, &PatchParams::apply("test"), &Patch::Apply(region(first, url("eu")))).await.unwrap();
        env.wait_for(&regions, first, has_ready("True", "StoreReady")).await;
        // The same directory in another spelling, one inside it, and a sibling.
        regions.patch(same, &PatchParams::apply("test"), &Patch::Apply(region(same, url("./eu/")))).await.unwrap();
        regions.patch(inner, &PatchParams::apply("test"), &Patch::Apply(region(inner, url("eu/inner")))).await.unwrap();
        regions.patch(sibling, &PatchParams::apply("test"), &Patch::Apply(region(sibling, url("eu-2")))).await.unwrap();
        for (name, how) in [(same, "is the store of"), (inner, "is inside the store of")] {
            let refused = env.wait_for(&regions, name, has_ready("False", "StoreConflict")).await.unwrap();
            let conditions = refused.status.unwrap().conditions;
            let message = &conditions.iter().find(|c| c.type_ == "Ready").unwrap().message;
            assert!(message.contains(how) && message.contains(&format!("Region {first}")) && message.contains("change spec.storage.url"), "{message}");
            assert!(conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True"), "{name}: only a spec change helps");
        }
        env.wait_for(&regions, sibling, has_ready("True", "StoreReady")).await;
        assert_eq!(ready_reason(regions.get(first).await.ok().as_ref()).unwrap().1, "StoreReady", "the first keeps its store");
        if env.server().is_some() {
            assert!(!env.region_dir(&format!("{p}/eu/inner")).exists(), "a refused store is never touched");
        }
        // The first goes: one of the two refused takes the store (the older; created in the
        // same second, the first by name), and the other is refused naming it.
        regions.delete(first, &DeleteParams::default()).await.unwrap();
        env.wait_for(&regions, first, |r: Option<&Region>| r.is_none()).await;
        let (winner, loser) = if same < inner { (same, inner) } else { (inner, same) };
        let (created_same, created_inner) = (
            regions.get(same).await.unwrap().metadata.creation_timestamp,
            regions.get(inner).await.unwrap().metadata.creation_timestamp,
        );
        let (winner, loser) = match created_same.cmp(&created_inner) {
            std::cmp::Ordering::Less => (same, inner),
            std::cmp::Ordering::Greater => (inner, same),
            std::cmp::Ordering::Equal => (winner, loser),
        };
        env.wait_for(&regions, winner, has_ready("True", "StoreReady")).await;
        let refused = env.wait_for(&regions, loser, has_ready("False", "StoreConflict")).await.unwrap();
        let message = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
        assert!(message.contains(&format!("Region {winner} ")), "{message}");
        for name in &names[1..] {
            regions.delete(name, &DeleteParams::default()).await.unwrap();
        }
        for name in &names {
            env.wait_for(&regions, name, |r: Option<&Region>| r.is_none()).await;
        }
    }

    async fn a_region_in_use_is_deleted_only_after_its_images(env: &Env) {
        let ns = env.namespace("inuse").await;
        let other = env.namespace("inuse-o").await;
        let name = format!("{ns}-r");
        let regions: Api<Region> = Api::all(env.client.clone());
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let theirs: Api<Image> = Api::namespaced(env.client.clone(), &other);
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("d.raw"), vec![3u8; 8192]).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        support::region(env, &name).await;
        env.start_operator();
        let image = |n: &str| json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": n},
            "spec": {"region": name, "type": "DataDisk", "visibility": "Marketplace", "marketplace": {"publisher": "Test", "productCode": "test", "pricing": {"plan": "Free"}}, "source": {"url": {"url": format!("http://{addr}/d.raw")}}}});
        support::apply(&images, image("kept")).await;
        env.wait_for(&images, "kept", reason_is("Active")).await;
        support::apply(&theirs, json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "ref"},
            "spec": {"region": name, "source": {"image": {"namespace": ns, "name": "kept"}}}})).await;
        env.wait_for(&theirs, "ref", reason_is("Active")).await;

        regions.delete(&name, &DeleteParams::default()).await.unwrap();
        let held = env.wait_for(&regions, &name, has_ready("False", "RegionInUse")).await.unwrap();
        let message = held.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
        assert!(message.contains("waits for the 2 images") && message.contains("1 owned, 1 references"), "{message}");
        // The images stay usable, and each owner is told.
        assert_eq!(images.get("kept").await.unwrap().status.unwrap().phase, Some(ImagePhase::Active));
        for namespace in [&ns, &other] {
            let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), namespace);
            let told = events.list(&Default::default()).await.unwrap().items.into_iter().any(|e| {
                e.reason.as_deref() == Some("RegionDeleting") && e.note.as_deref().is_some_and(|n| n.contains(&format!("Region {name} is being deleted")))
            });
            assert!(told, "the owner in {namespace} is told");
        }
        // Nothing new is stored there.
        support::apply(&images, image("late")).await;
        let late = env.wait_for(&images, "late", reason_is("RegionNotReady")).await.unwrap();
        assert!(late.status.unwrap().message.unwrap().contains("is being deleted"));

        for (api, n) in [(&images, "late"), (&images, "kept"), (&theirs, "ref")] {
            api.delete(n, &DeleteParams::default()).await.unwrap();
        }
        env.wait_for(&regions, &name, |r: Option<&Region>| r.is_none()).await;
        if env.server().is_some() {
            assert!(support::stored_files(&env.region_dir(&name)).is_empty(), "the images took their bytes along");
        }
    }
}
