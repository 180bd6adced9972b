//! Marketplace images through the real controllers: a free and a paid image with their terms
//! (`kubectl get img -o wide`), tenants using each through references, metered on `/metrics`;
//! copies bound by the terms of the bytes (lineage, no sharing, never Public, no resale), and
//! a Paid image copied only by its publisher, through chains of copies too.

mod support;

use std::time::Duration;

use ims_operator::{
    admin::{self, Readiness},
    api::{CopyPhase, Image, ImageCopy, ImagePhase, ImageShare},
    controllers,
};
use kube::{Api, api::DeleteParams, runtime::wait::Condition};
use serde_json::{Value, json};
use support::{Env, apply, reason_is, region};

fn image(name: &str, region: &str, url: &str, extra: Value) -> Value {
    let mut spec = json!({"region": region, "type": "DataDisk", "source": {"url": {"url": url}}});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name}, "spec": spec})
}

/// `visibility: Marketplace` with terms: `Free`, or `Paid` at 0.05 USD an hour.
fn terms(publisher: &str, product: &str, plan: &str) -> Value {
    let pricing = match plan {
        "Paid" => json!({"plan": "Paid", "hourlyPrice": "0.05", "currency": "USD"}),
        _ => json!({"plan": plan}),
    };
    json!({"visibility": "Marketplace", "marketplace": {"publisher": publisher, "productCode": product, "pricing": pricing}})
}

fn reference(name: &str, region: &str, namespace: &str, source: &str) -> Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
        "spec": {"region": region, "source": {"image": {"namespace": namespace, "name": source}}}})
}

/// An Image written by hand that copies `source` of its namespace.
fn hand_copy(name: &str, region: &str, source: &str, extra: Value) -> Value {
    let mut manifest = image(name, region, "http://unused/x", extra);
    manifest["spec"]["source"] = json!({"copy": {"name": source}});
    manifest
}

fn image_copy(name: &str, source: &str, region: &str, dest: &str) -> Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageCopy", "metadata": {"name": name},
        "spec": {"source": source, "destination": {"region": region, "name": dest}}})
}

fn share(name: &str, image: &str, tenants: &[&str]) -> Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageShare", "metadata": {"name": name},
        "spec": {"image": image, "tenants": tenants}})
}

fn copy_is(phase: CopyPhase, reason: &'static str) -> impl Condition<ImageCopy> {
    move |c: Option<&ImageCopy>| {
        c.and_then(|c| c.status.as_ref()).is_some_and(|s| {
            s.phase == Some(phase) && s.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == reason)
        })
    }
}

fn share_reason_is(reason: &'static str) -> impl Condition<ImageShare> {
    move |s: Option<&ImageShare>| {
        s.and_then(|s| s.status.as_ref())
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.reason == reason)
    }
}

/// An Active image whose `Stalled` condition says its visibility was refused.
fn visibility_refused(i: Option<&Image>) -> bool {
    i.and_then(|i| i.status.as_ref()).is_some_and(|s| {
        s.phase == Some(ImagePhase::Active)
            && s.conditions.iter().any(|c| c.type_ == "Stalled" && c.reason == "VisibilityNotAllowed")
    })
}

fn ready_message(i: &Image) -> String {
    let conditions = i.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    conditions.into_iter().find(|c| c.type_ == "Ready").map(|c| c.message).unwrap_or_default()
}

/// `status.lineage.marketplace` as `(namespace, name, plan)`, and the lineage's own image.
fn lineage(i: &Image) -> (Option<(String, String, String)>, String) {
    let lineage = i.status.as_ref().and_then(|s| s.lineage.clone()).expect("a copy has a lineage");
    let origin = lineage.marketplace.map(|m| (m.namespace, m.name, m.plan.as_str().to_string()));
    (origin, format!("{}/{}", lineage.namespace, lineage.name))
}

/// Serves `d.raw` from 127.0.0.1.
async fn files() -> (std::net::SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.raw"), vec![5u8; 16_384]).unwrap();
    (support::serve_files(dir.path().to_path_buf()).await, dir)
}

/// `/metrics` of the admin endpoint at `addr` once every `(series, value)` of `want` holds
/// (`None`: the series is absent), or as it is after 20 s; asserts each.
async fn metered(addr: std::net::SocketAddr, want: &[(String, Option<f64>)]) -> String {
    let url = format!("http://{addr}/metrics");
    let mut text = String::new();
    for _ in 0..100 {
        text = String::from_utf8(support::http_get(&url, &[]).await.2).unwrap();
        if want.iter().all(|(s, n)| support::sample(&text, s) == *n) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (s, n) in want {
        assert_eq!(support::sample(&text, s), *n, "{s} in:\n{text}");
    }
    text
}

/// A fresh publisher namespace and regions `<ns>-a`, `<ns>-b`, the operator running, and the
/// publisher's Active Marketplace image `name` on `plan` in region a: (namespace, a, b, the
/// directory its bytes are served from).
async fn publish(env: &Env, name: &str, publisher: &str, plan: &str) -> (String, String, String, tempfile::TempDir) {
    let namespace = env.namespace("pub").await;
    let (a, b) = (format!("{namespace}-a"), format!("{namespace}-b"));
    let (addr, dir) = files().await;
    region(env, &a).await;
    region(env, &b).await;
    env.start_operator();
    let published: Api<Image> = Api::namespaced(env.client.clone(), &namespace);
    apply(&published, image(name, &a, &format!("http://{addr}/d.raw"), terms(publisher, name, plan))).await;
    env.wait_for(&published, name, reason_is("Active")).await;
    (namespace, a, b, dir)
}

/// What `kubectl get img -n <namespace> -o wide` shows: per image name, the named columns
/// (an empty cell for a field the image does not have, as kubectl prints it).
async fn wide(env: &Env, namespace: &str, columns: &[&str]) -> Vec<(String, Vec<String>)> {
    let request = http::Request::get(format!("/apis/ims.io/v1alpha1/namespaces/{namespace}/images"))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
    let table: Value = env.client.request(request).await.expect("a Table");
    let names: Vec<&str> =
        table["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    let at: Vec<usize> = columns
        .iter()
        .map(|c| names.iter().position(|n| n == c).unwrap_or_else(|| panic!("no column {c}: {names:?}")))
        .collect();
    let cell = |v: &Value| v.as_str().map(String::from).unwrap_or_default();
    let mut rows: Vec<(String, Vec<String>)> = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (cell(&r["cells"][0]), at.iter().map(|i| cell(&r["cells"][*i])).collect()))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

scenarios! {
    async fn free_and_paid_images_are_used_through_references_and_metered(env: &Env) {
        let publisher = env.namespace("pub").await;
        let (a, b) = (env.namespace("a").await, env.namespace("b").await);
        let r = format!("{publisher}-r");
        let (addr, _dir) = files().await;
        region(env, &r).await;
        let config = env.operator_config();
        let metrics = config.metrics.clone();
        let listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let admin_addr = listener.local_addr().unwrap();
        tokio::spawn(admin::serve(listener, Readiness::default(), metrics));
        env.start_operator_with(config);

        let published: Api<Image> = Api::namespaced(env.client.clone(), &publisher);
        let url = format!("http://{addr}/d.raw");
        apply(&published, image("rescue", &r, &url, terms("Rescue Tools", "rescue", "Free"))).await;
        apply(&published, image("hardened", &r, &url, terms("Acme Security", "hardened", "Paid"))).await;
        apply(&published, image("plain", &r, &url, json!({}))).await;
        for name in ["rescue", "hardened", "plain"] {
            env.wait_for(&published, name, reason_is("Active")).await;
        }
        // `kubectl get img -o wide` shows who sells each and on which plan.
        let rows = wide(env, &publisher, &["Visibility", "Publisher", "Product", "Plan"]).await;
        let row = |name: &str, cells: [&str; 4]| (name.to_string(), cells.map(String::from).to_vec());
        assert_eq!(
            rows,
            [
                row("hardened", ["Marketplace", "Acme Security", "hardened", "Paid"]),
                row("plain", ["Private", "", "", ""]),
                row("rescue", ["Marketplace", "Rescue Tools", "rescue", "Free"]),
            ]
        );

        // Tenant a uses each (the paid one twice), tenant b the paid one: no ImageShare needed.
        let a_images: Api<Image> = Api::namespaced(env.client.clone(), &a);
        let b_images: Api<Image> = Api::namespaced(env.client.clone(), &b);
        apply(&a_images, reference("rescue", &r, &publisher, "rescue")).await;
        apply(&a_images, reference("hardened", &r, &publisher, "hardened")).await;
        apply(&a_images, reference("hardened-2", &r, &publisher, "hardened")).await;
        apply(&b_images, reference("hardened", &r, &publisher, "hardened")).await;
        for (api, name) in [(&a_images, "rescue"), (&a_images, "hardened"), (&a_images, "hardened-2"), (&b_images, "hardened")] {
            env.wait_for(api, name, reason_is("Active")).await;
        }
        // The tenant sees the terms it uses the image under.
        let used = a_images.get("hardened").await.unwrap().status.unwrap().marketplace.expect("the source's terms");
        assert_eq!((used.publisher.as_str(), used.product_code.as_str()), ("Acme Security", "hardened"));
        assert_eq!((used.pricing.hourly_price.as_deref(), used.pricing.currency.as_deref()), (Some("0.05"), Some("USD")));

        // /metrics: usable references per tenant and Marketplace image, with its terms.
        let series = |tenant: &str, image: &str, publisher_name: &str, plan: &str| {
            format!("ims_marketplace_references{{image_namespace=\"{publisher}\",image=\"{image}\",tenant=\"{tenant}\",publisher=\"{publisher_name}\",product=\"{image}\",plan=\"{plan}\"}}")
        };
        let text = metered(admin_addr, &[
            (series(&a, "rescue", "Rescue Tools", "Free"), Some(1.0)),
            (series(&a, "hardened", "Acme Security", "Paid"), Some(2.0)),
            (series(&b, "hardened", "Acme Security", "Paid"), Some(1.0)),
        ]).await;
        assert!(text.contains("# TYPE ims_marketplace_references gauge"), "{text}");
        assert!(!text.contains(&format!("image_namespace=\"{publisher}\",image=\"plain\"")), "a Private image is not metered: {text}");

        // A reference deleted, or no longer usable, is no longer metered.
        b_images.delete("hardened", &DeleteParams::default()).await.unwrap();
        a_images.delete("hardened-2", &DeleteParams::default()).await.unwrap();
        metered(admin_addr, &[
            (series(&a, "rescue", "Rescue Tools", "Free"), Some(1.0)),
            (series(&a, "hardened", "Acme Security", "Paid"), Some(1.0)),
            (series(&b, "hardened", "Acme Security", "Paid"), None),
        ]).await;
        // An operator that stops leading reports no usage: only the leader's figures count.
        env.stop_operator().await;
        let gone = [series(&a, "rescue", "Rescue Tools", "Free"), series(&a, "hardened", "Acme Security", "Paid")];
        let text = metered(admin_addr, &gone.map(|s| (s, None))).await;
        assert!(!text.contains("ims_marketplace_references{"), "{text}");
    }

    async fn copies_of_a_marketplace_image_stay_bound_by_its_terms(env: &Env) {
        let (publisher, r1, r2, _dir) = publish(env, "rescue", "Rescue Tools", "Free").await;
        let (t, u) = (env.namespace("t").await, env.namespace("u").await);

        // Tenant t copies the free image it references, then copies the copy to another region.
        let images: Api<Image> = Api::namespaced(env.client.clone(), &t);
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &t);
        apply(&images, reference("rescue", &r1, &publisher, "rescue")).await;
        env.wait_for(&images, "rescue", reason_is("Active")).await;
        apply(&copies, image_copy("mine", "rescue", &r1, "mine")).await;
        env.wait_for(&copies, "mine", copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        apply(&copies, image_copy("far", "mine", &r2, "far")).await;
        env.wait_for(&copies, "far", copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        // Both record the Marketplace image their bytes come from.
        let origin = Some((publisher.clone(), "rescue".to_string(), "Free".to_string()));
        assert_eq!(lineage(&images.get("mine").await.unwrap()), (origin.clone(), format!("{publisher}/rescue")));
        assert_eq!(lineage(&images.get("far").await.unwrap()), (origin, format!("{t}/mine")), "through a chain of copies");

        // Neither can be shared: nothing is granted, u's reference is not shared.
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &t);
        apply(&shares, share("mine", "mine", &[&u])).await;
        apply(&shares, share("far", "far", &[&u])).await;
        for name in ["mine", "far"] {
            let refused = env.wait_for(&shares, name, share_reason_is("MarketplaceImage")).await.unwrap();
            let ready = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
            assert!(ready.message.contains(&format!("copy of Marketplace image {publisher}/rescue")), "{}", ready.message);
            assert!(ready.message.contains("nothing is granted"), "{}", ready.message);
        }
        let u_images: Api<Image> = Api::namespaced(env.client.clone(), &u);
        apply(&u_images, reference("mine", &r1, &t, "mine")).await;
        env.wait_for(&u_images, "mine", reason_is("NotShared")).await;

        // Nor resold on the Marketplace by t: it stays Private, and says why.
        apply(&images, hand_copy("far", &r2, "mine", terms("Not Rescue Tools", "resold", "Paid"))).await;
        let refused = env.wait_for(&images, "far", visibility_refused).await.unwrap();
        assert!(reason_is("Active").matches_object(Some(&refused)), "the bytes stay usable, Ready");
        let message = refused.status.unwrap().message.unwrap();
        assert!(message.contains(&format!("only the publisher's tenant {publisher}")) && message.contains("stays Private"), "{message}");
        apply(&u_images, reference("far", &r2, &t, "far")).await;
        env.wait_for(&u_images, "far", reason_is("NotShared")).await;
        // An Image written by hand that would publish the bytes fails before any moves.
        apply(&images, hand_copy("resale", &r1, "mine", terms("Not Rescue Tools", "resold", "Free"))).await;
        let failed = env.wait_for(&images, "resale", reason_is("VisibilityNotAllowed")).await.unwrap();
        assert_eq!(failed.status.as_ref().unwrap().phase, Some(ImagePhase::Failed));
        assert!(ready_message(&failed).contains("set spec.visibility to Private"), "{}", ready_message(&failed));
        assert!(failed.status.unwrap().checksum.is_none(), "no bytes moved");
    }

    async fn a_copy_of_a_marketplace_image_is_never_public(env: &Env) {
        let publisher = env.namespace("pub").await;
        // The platform namespace of this scenario's operator.
        let platform = env.namespace("plat").await;
        let tenant = env.namespace("t").await;
        let r = format!("{publisher}-r");
        let (addr, _dir) = files().await;
        region(env, &r).await;
        env.start_operator_with(controllers::Config { public_namespace: platform.clone(), ..env.operator_config() });
        let url = format!("http://{addr}/d.raw");
        let published: Api<Image> = Api::namespaced(env.client.clone(), &publisher);
        apply(&published, image("rescue", &r, &url, terms("Rescue Tools", "rescue", "Free"))).await;
        env.wait_for(&published, "rescue", reason_is("Active")).await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &platform);
        let theirs: Api<Image> = Api::namespaced(env.client.clone(), &tenant);
        // The platform publishes a Public image of its own: every tenant uses it.
        let base = image("base", &r, &url, json!({"visibility": "Public"}));
        match images.patch("base", &kube::api::PatchParams::apply("test").force(), &kube::api::Patch::Apply(base)).await {
            Ok(_) => {}
            // deploy/'s ValidatingAdmissionPolicy, where installed, knows only ims-public as the
            // platform namespace: it refuses every Public image of this scenario up front.
            Err(kube::Error::Api(s)) if env.server().is_none() && s.message.contains("Private or Marketplace") => return,
            Err(e) => panic!("{e}"),
        }
        env.wait_for(&images, "base", reason_is("Active")).await;
        apply(&theirs, reference("base", &r, &platform, "base")).await;
        env.wait_for(&theirs, "base", reason_is("Active")).await;

        // A copy of the Marketplace image is not made Public, not even by the platform.
        apply(&images, reference("rescue", &r, &publisher, "rescue")).await;
        env.wait_for(&images, "rescue", reason_is("Active")).await;
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &platform);
        apply(&copies, image_copy("mine", "rescue", &r, "mine")).await;
        env.wait_for(&copies, "mine", copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        apply(&images, hand_copy("mine", &r, "rescue", json!({"visibility": "Public"}))).await;
        let refused = env.wait_for(&images, "mine", visibility_refused).await.unwrap();
        let message = refused.status.unwrap().message.unwrap();
        assert!(message.contains("cannot be made Public") && message.contains("stays Private"), "{message}");
        apply(&theirs, reference("mine", &r, &platform, "mine")).await;
        env.wait_for(&theirs, "mine", reason_is("NotShared")).await;
        // An Image written by hand that copies it Public fails before any bytes move.
        apply(&images, hand_copy("again", &r, "mine", json!({"visibility": "Public"}))).await;
        let failed = env.wait_for(&images, "again", reason_is("VisibilityNotAllowed")).await.unwrap();
        assert_eq!(failed.status.as_ref().unwrap().phase, Some(ImagePhase::Failed));
        assert!(ready_message(&failed).contains(&format!("Marketplace image {publisher}/rescue")), "{}", ready_message(&failed));
    }

    async fn a_paid_image_is_copied_only_by_its_publisher(env: &Env) {
        let (publisher, r1, r2, _dir) = publish(env, "hardened", "Acme Security", "Paid").await;
        let t = env.namespace("t").await;
        let published: Api<Image> = Api::namespaced(env.client.clone(), &publisher);

        // Tenant t uses it, but copying it is refused, by an ImageCopy and by hand.
        let images: Api<Image> = Api::namespaced(env.client.clone(), &t);
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &t);
        apply(&images, reference("hardened", &r1, &publisher, "hardened")).await;
        env.wait_for(&images, "hardened", reason_is("Active")).await;
        apply(&copies, image_copy("take", "hardened", &r1, "taken")).await;
        apply(&copies, image_copy("take-far", "hardened", &r2, "taken-far")).await;
        for name in ["take", "take-far"] {
            let refused = env.wait_for(&copies, name, copy_is(CopyPhase::Failed, "MarketplaceImage")).await.unwrap();
            let ready = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
            assert!(ready.message.contains(&format!("only by its publisher's tenant {publisher}")) && ready.message.contains("reference"), "{}", ready.message);
        }
        assert!(images.get_opt("taken").await.unwrap().is_none(), "a refused copy creates nothing");
        apply(&images, hand_copy("by-hand", &r1, "hardened", json!({}))).await;
        let failed = env.wait_for(&images, "by-hand", reason_is("InvalidSpec")).await.unwrap();
        assert_eq!(failed.status.as_ref().unwrap().phase, Some(ImagePhase::Failed));
        assert!(ready_message(&failed).contains("MarketplaceImage"), "{}", ready_message(&failed));
        assert!(support::warned(env, &t, "MarketplaceImage", "take").await, "a Warning Event on the refused ImageCopy");

        // The publisher copies its own, and copies the copy: bound by the terms all the same.
        let own: Api<ImageCopy> = Api::namespaced(env.client.clone(), &publisher);
        apply(&own, image_copy("to-b", "hardened", &r2, "hardened-b")).await;
        env.wait_for(&own, "to-b", copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        apply(&own, image_copy("again", "hardened-b", &r2, "hardened-b2")).await;
        env.wait_for(&own, "again", copy_is(CopyPhase::Succeeded, "Succeeded")).await;
        let copied = published.get("hardened-b2").await.unwrap();
        assert_eq!(lineage(&copied).0, Some((publisher.clone(), "hardened".into(), "Paid".into())));
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &publisher);
        apply(&shares, share("give", "hardened-b2", &[&t])).await;
        env.wait_for(&shares, "give", share_reason_is("MarketplaceImage")).await;
        // It offers it in the second region too: tenants use that one, and copy it no more.
        apply(&published, hand_copy("hardened-b", &r2, "hardened", terms("Acme Security", "hardened", "Paid"))).await;
        let offered = env.wait_for(&published, "hardened-b", |i: Option<&Image>| {
            i.and_then(|i| i.status.as_ref()).is_some_and(|s| s.observed_generation == i.and_then(|i| i.metadata.generation))
        }).await.unwrap();
        assert!(!visibility_refused(Some(&offered)), "the publisher may offer its own bytes: {:?}", offered.status);
        apply(&images, reference("hardened-b", &r2, &publisher, "hardened-b")).await;
        env.wait_for(&images, "hardened-b", reason_is("Active")).await;
        apply(&copies, image_copy("take-b", "hardened-b", &r2, "taken-b")).await;
        env.wait_for(&copies, "take-b", copy_is(CopyPhase::Failed, "MarketplaceImage")).await;
    }
}
