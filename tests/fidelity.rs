//! The kube-apiserver behaviours the operator relies on, asserted identically on the embedded
//! API and (with IMS_E2E=1, `--ignored`) on a real cluster.

mod support;

use futures::{StreamExt, TryStreamExt};
use ims_operator::api::{Image, ImageShare};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    core::Status,
};
use serde_json::json;

fn data_disk(name: &str, description: &str) -> Image {
    serde_json::from_value(json!({
        "apiVersion": "ims.io/v1alpha1",
        "kind": "Image",
        "metadata": {"name": name},
        "spec": {
            "region": "eu-west",
            "type": "DataDisk",
            "description": description,
            "source": {"url": {"url": "https://images.example.com/disk.raw"}}
        }
    }))
    .unwrap()
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

scenarios! {
    async fn stale_resource_version_conflicts(env: &Env) {
        let ns = env.namespace("stale").await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let created = images.create(&PostParams::default(), &data_disk("disk", "one")).await.unwrap();
        let mut first = created.clone();
        first.spec.description = Some("two".into());
        let updated = images.replace("disk", &PostParams::default(), &first).await.unwrap();
        assert_ne!(updated.resource_version(), created.resource_version());
        assert_eq!(updated.metadata.generation, Some(2), "a spec change bumps generation");
        let mut stale = created.clone();
        stale.spec.description = Some("three".into());
        let err = api_error(images.replace("disk", &PostParams::default(), &stale).await);
        assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
        assert_eq!(
            err.message,
            "Operation cannot be fulfilled on images.ims.io \"disk\": the object has been modified; please apply your changes to the latest version and try again"
        );
        assert_eq!(images.get("disk").await.unwrap().spec.description.as_deref(), Some("two"));
    }

    async fn finalizers_hold_deletion_until_removed(env: &Env) {
        let ns = env.namespace("fin").await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let mut image = data_disk("held", "x");
        image.metadata.finalizers = Some(vec!["ims.io/test".into()]);
        images.create(&PostParams::default(), &image).await.unwrap();
        images.delete("held", &DeleteParams::default()).await.unwrap();
        let marked = images.get("held").await.unwrap();
        assert!(marked.metadata.deletion_timestamp.is_some(), "kept with a deletionTimestamp");
        assert_eq!(marked.finalizers(), ["ims.io/test"]);
        let patch = json!([{"op": "test", "path": "/metadata/finalizers", "value": ["ims.io/test"]}, {"op": "remove", "path": "/metadata/finalizers"}]);
        let json_patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
        images.patch("held", &PatchParams::default(), &Patch::<()>::Json(json_patch)).await.unwrap();
        env.wait_for(&images, "held", kube::runtime::conditions::is_deleted(&marked.uid().unwrap())).await;
        assert_eq!(api_error(images.get("held").await).code, 404);
    }

    async fn watch_resumes_from_a_resource_version(env: &Env) {
        let ns = env.namespace("watch").await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        images.create(&PostParams::default(), &data_disk("a", "one")).await.unwrap();
        let rv = images.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
        images.create(&PostParams::default(), &data_disk("b", "one")).await.unwrap();
        images.patch("a", &PatchParams::default(), &Patch::Merge(json!({"spec": {"description": "two"}}))).await.unwrap();
        images.delete("b", &DeleteParams::default()).await.unwrap();
        let stream = images.watch(&WatchParams::default().timeout(10), &rv).await.unwrap();
        let events: Vec<String> = stream
            .take(3)
            .map_ok(|e| match e {
                WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
                WatchEvent::Modified(o) => format!("MODIFIED {} {}", o.name_any(), o.spec.description.unwrap_or_default()),
                WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
                other => format!("{other:?}"),
            })
            .try_collect()
            .await
            .unwrap();
        assert_eq!(events, ["ADDED b", "MODIFIED a two", "DELETED b"]);
    }

    async fn watch_from_a_compacted_resource_version_is_gone(env: &Env) {
        let ns = env.namespace("gone").await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let mut stream = images.watch(&WatchParams::default().timeout(10), "1").await.unwrap().boxed();
        match stream.next().await {
            Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
            Some(Err(kube::Error::Api(e))) => assert_eq!(e.code, 410),
            other => panic!("expected 410 Gone, got {other:?}"),
        }
    }

    async fn server_side_apply_conflicts_and_force(env: &Env) {
        let ns = env.namespace("ssa").await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let config = |description: &str| json!({
            "apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "shared"},
            "spec": {"region": "eu-west", "type": "DataDisk", "description": description,
                     "source": {"url": {"url": "https://images.example.com/disk.raw"}}}
        });
        images.patch("shared", &PatchParams::apply("alice"), &Patch::Apply(config("alice's"))).await.unwrap();
        let err = api_error(images.patch("shared", &PatchParams::apply("bob"), &Patch::Apply(config("bob's"))).await);
        assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
        assert!(err.message.contains("conflict with \"alice\""), "{}", err.message);
        assert!(err.message.contains(".spec.description"), "{}", err.message);
        let forced = images.patch("shared", &PatchParams::apply("bob").force(), &Patch::Apply(config("bob's"))).await.unwrap();
        assert_eq!(forced.spec.description.as_deref(), Some("bob's"));
        let owners: Vec<String> = forced
            .managed_fields()
            .iter()
            .filter(|m| m.fields_v1.as_ref().is_some_and(|f| f.0.pointer("/f:spec/f:description").is_some()))
            .filter_map(|m| m.manager.clone())
            .collect();
        assert_eq!(owners, ["bob"], "force moves ownership of the field");
    }

    async fn schema_and_cel_rules_reject_with_field_paths(env: &Env) {
        let ns = env.namespace("schema").await;
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &ns);
        let dup: ImageShare = serde_json::from_value(json!({
            "apiVersion": "ims.io/v1alpha1", "kind": "ImageShare", "metadata": {"name": "dup"},
            "spec": {"image": "ubuntu", "tenants": ["tenant-b", "tenant-c", "tenant-b"]}
        })).unwrap();
        let err = api_error(shares.create(&PostParams::default(), &dup).await);
        assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
        assert_eq!(err.message, "ImageShare.ims.io \"dup\" is invalid: spec.tenants[2]: Duplicate value: \"tenant-b\"");

        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        images.create(&PostParams::default(), &data_disk("moving", "x")).await.unwrap();
        let err = api_error(images.patch("moving", &PatchParams::default(), &Patch::Merge(json!({"spec": {"region": "us-east"}}))).await);
        assert_eq!(err.code, 422);
        assert_eq!(
            err.message,
            "Image.ims.io \"moving\" is invalid: spec.region: Invalid value: \"us-east\": region is immutable: use an ImageCopy to put the image in another region"
        );
    }

    async fn status_subresource_separates_spec_and_status(env: &Env) {
        let ns = env.namespace("status").await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let created = images.create(&PostParams::default(), &data_disk("img", "x")).await.unwrap();
        assert_eq!(created.metadata.generation, Some(1));
        let with_status = images
            .patch_status("img", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Queued"}, "spec": {"description": "ignored"}})))
            .await
            .unwrap();
        assert_eq!(with_status.status.as_ref().and_then(|s| s.phase), Some(ims_operator::api::ImagePhase::Queued));
        assert_eq!(with_status.spec.description.as_deref(), Some("x"), "status writes ignore spec");
        assert_eq!(with_status.metadata.generation, Some(1), "status writes do not bump generation");
        let spec_write = images
            .patch("img", &PatchParams::default(), &Patch::Merge(json!({"spec": {"description": "y"}, "status": {"phase": "Failed"}})))
            .await
            .unwrap();
        assert_eq!(spec_write.metadata.generation, Some(2));
        assert_eq!(spec_write.status.and_then(|s| s.phase), Some(ims_operator::api::ImagePhase::Queued), "spec writes ignore status");
    }

    async fn create_in_a_missing_namespace_is_not_found(env: &Env) {
        let images: Api<Image> = Api::namespaced(env.client.clone(), "ims-e2e-does-not-exist");
        let err = api_error(images.create(&PostParams::default(), &data_disk("x", "x")).await);
        assert_eq!((err.code, err.message.as_str()), (404, "namespaces \"ims-e2e-does-not-exist\" not found"));
    }

    async fn create_generates_names_and_refuses_duplicates(env: &Env) {
        let ns = env.namespace("names").await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let mut generated = data_disk("", "x");
        generated.metadata.name = None;
        generated.metadata.generate_name = Some("disk-".into());
        let created = images.create(&PostParams::default(), &generated).await.unwrap();
        let name = created.name_any();
        assert!(name.starts_with("disk-") && name.len() == "disk-".len() + 5, "{name}");
        assert!(created.uid().is_some() && created.metadata.creation_timestamp.is_some());
        let err = api_error(images.create(&PostParams::default(), &data_disk(&name, "x")).await);
        assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));
        assert_eq!(err.message, format!("images.ims.io \"{name}\" already exists"));
    }

    async fn selectors_filter_lists(env: &Env) {
        let ns = env.namespace("sel").await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        for (name, tier) in [("a", "gold"), ("b", "silver"), ("c", "bronze")] {
            let mut image = data_disk(name, "x");
            image.metadata.labels = Some([("tier".to_string(), tier.to_string())].into());
            images.create(&PostParams::default(), &image).await.unwrap();
        }
        let names = |list: kube::core::ObjectList<Image>| list.items.iter().map(|i| i.name_any()).collect::<Vec<_>>();
        assert_eq!(names(images.list(&ListParams::default().labels("tier=gold")).await.unwrap()), ["a"]);
        assert_eq!(names(images.list(&ListParams::default().labels("tier in (gold,bronze)")).await.unwrap()), ["a", "c"]);
        assert_eq!(names(images.list(&ListParams::default().labels("tier notin (gold),tier")).await.unwrap()), ["b", "c"]);
        assert_eq!(names(images.list(&ListParams::default().fields("metadata.name=b")).await.unwrap()), ["b"]);
        assert_eq!(names(images.list(&ListParams::default().fields(&format!("metadata.namespace={ns},metadata.name!=b"))).await.unwrap()), ["a", "c"]);
    }

    async fn deleting_a_namespace_deletes_its_objects(env: &Env) {
        let ns = env.namespace("nsdel").await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        images.create(&PostParams::default(), &data_disk("doomed", "x")).await.unwrap();
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
        let uid = namespaces.get(&ns).await.unwrap().uid().unwrap();
        namespaces.delete(&ns, &DeleteParams::default()).await.unwrap();
        env.wait_for(&namespaces, &ns, kube::runtime::conditions::is_deleted(&uid)).await;
        assert_eq!(api_error(images.get("doomed").await).code, 404);
    }
}
