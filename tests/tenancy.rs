//! Tenants as users meet RBAC, on a real cluster only (the embedded API has no RBAC): each tenant
//! is a ServiceAccount bound to the aggregated `edit` ClusterRole in its own namespace (deploy/'s
//! tenant roles add the ims kinds to it), and the operator runs with deploy/'s ServiceAccount.
//! A tenant cannot read another tenant's images, cannot learn whether one exists by referencing
//! it, cannot copy it, and never writes status; a share opens exactly what it names.

mod support;

use ims_operator::api::{CopyPhase, Image, ImageCopy, ImagePhase, ImageShare};
use k8s_openapi::api::{core::v1::ServiceAccount, rbac::v1::RoleBinding};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::{Env, apply, reason_is, region};

/// A client acting as ServiceAccount `tenant` of `namespace`, bound to ClusterRole `edit` there.
async fn tenant(env: &Env, namespace: &str) -> Client {
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), namespace);
    let sa = serde_json::from_value(json!({"metadata": {"name": "tenant"}})).unwrap();
    accounts.create(&PostParams::default(), &sa).await.expect("create the tenant's ServiceAccount");
    let bindings: Api<RoleBinding> = Api::namespaced(env.client.clone(), namespace);
    let binding = serde_json::from_value(json!({"metadata": {"name": "tenant-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}]}))
    .unwrap();
    bindings.create(&PostParams::default(), &binding).await.expect("bind edit");
    support::token_client(&env.client, namespace, "tenant").await
}

fn forbidden<T: std::fmt::Debug>(result: kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.code == 403)
}

fn reference(name: &str, region: &str, namespace: &str, source: &str) -> serde_json::Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
        "spec": {"region": region, "source": {"image": {"namespace": namespace, "name": source}}}})
}

fn message(image: &Option<Image>) -> String {
    image.as_ref().and_then(|i| i.status.as_ref()).and_then(|s| s.message.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: IMS_E2E=1 KUBECONFIG=... cargo test -- --ignored"]
async fn a_tenant_cannot_read_reference_or_copy_another_tenants_images() {
    let env = Env::cluster().await;
    let (a, b) = (env.namespace("alice").await, env.namespace("bob").await);
    let r = format!("{a}-r");
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("d.raw"), vec![7u8; 10_000]).unwrap();
    let addr = support::serve_files(files.path().to_path_buf()).await;
    region(&env, &r).await;
    env.start_operator();
    let (alice, bob) = (tenant(&env, &a).await, tenant(&env, &b).await);

    // Bob imports an image into his namespace, as a tenant may.
    let bob_images: Api<Image> = Api::namespaced(bob.clone(), &b);
    let owned = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "secret"},
        "spec": {"region": r, "type": "DataDisk", "source": {"url": {"url": format!("http://{addr}/d.raw")}}}});
    apply(&bob_images, owned).await;
    env.wait_for(&bob_images, "secret", reason_is("Active")).await;

    // Alice cannot read, list or change it through the API.
    let alice_in_b: Api<Image> = Api::namespaced(alice.clone(), &b);
    assert!(forbidden(alice_in_b.get("secret").await), "alice reads bob's image");
    assert!(forbidden(alice_in_b.list(&ListParams::default()).await), "alice lists bob's images");
    let change = Patch::Merge(json!({"spec": {"description": "mine now"}}));
    assert!(forbidden(alice_in_b.patch("secret", &PatchParams::default(), &change).await), "alice edits bob's image");

    // A reference to it tells her no more than one to an image that does not exist.
    let alice_images: Api<Image> = Api::namespaced(alice.clone(), &a);
    apply(&alice_images, reference("to-secret", &r, &b, "secret")).await;
    apply(&alice_images, reference("to-ghost", &r, &b, "ghost")).await;
    let real = env.wait_for(&alice_images, "to-secret", reason_is("NotShared")).await;
    let ghost = env.wait_for(&alice_images, "to-ghost", reason_is("NotShared")).await;
    assert_eq!(message(&real).replace("secret", "X"), message(&ghost).replace("ghost", "X"), "an existence oracle");
    assert_eq!(real.and_then(|i| i.status).and_then(|s| s.phase), Some(ImagePhase::Unavailable));

    // A copy names an image of her own namespace: bob's is not found there.
    let copies: Api<ImageCopy> = Api::namespaced(alice.clone(), &a);
    let copy = json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageCopy", "metadata": {"name": "steal"},
        "spec": {"source": "secret", "destination": {"region": r, "name": "stolen"}}});
    apply(&copies, copy).await;
    let pending = env
        .wait_for(&copies, "steal", |c: Option<&ImageCopy>| {
            c.and_then(|c| c.status.as_ref()).and_then(|s| s.phase) == Some(CopyPhase::Pending)
        })
        .await
        .and_then(|c| c.status)
        .unwrap();
    assert_eq!(
        pending.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.reason.as_str()),
        Some("SourceNotFound")
    );
    assert!(alice_images.get_opt("stolen").await.unwrap().is_none(), "no destination was made");

    // Tenants never write status, not even of their own objects.
    let forged = Patch::Merge(json!({"status": {"phase": "Active"}}));
    assert!(forbidden(alice_images.patch_status("to-secret", &PatchParams::default(), &forged).await));

    // Bob shares it with alice's namespace: her reference becomes Active by itself.
    let shares: Api<ImageShare> = Api::namespaced(bob.clone(), &b);
    let share = json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageShare", "metadata": {"name": "to-alice"},
        "spec": {"image": "secret", "tenants": [a]}});
    apply(&shares, share).await;
    env.wait_for(&alice_images, "to-secret", reason_is("Active")).await;
    // The share opens what it names and nothing more: alice still cannot read bob's namespace.
    assert!(forbidden(alice_in_b.get("secret").await));
    env.cleanup().await;
}
