//! The quota ledger through the real controllers: race-free admission, oldest first.

mod support;

use ims_operator::api::{Image, ImagePhase, ImageQuota, Region};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

fn phase_reason(i: &Image) -> (Option<ImagePhase>, String) {
    let s = i.status.clone().unwrap_or_default();
    let reason = s.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.reason.clone()).unwrap_or_default();
    (s.phase, reason)
}

async fn settle(images: &Api<Image>, want_active: usize, want_queued: usize) -> Vec<Image> {
    for _ in 0..300 {
        let list = images.list(&ListParams::default()).await.unwrap().items;
        let active = list.iter().filter(|i| phase_reason(i) == (Some(ImagePhase::Active), "Active".into())).count();
        let queued =
            list.iter().filter(|i| phase_reason(i) == (Some(ImagePhase::Queued), "QuotaExceeded".into())).count();
        if active == want_active && queued == want_queued {
            return list;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let list = images.list(&ListParams::default()).await.unwrap().items;
    panic!(
        "did not settle at {want_active} Active / {want_queued} queued: {:?}",
        list.iter().map(|i| (i.name_any(), phase_reason(i))).collect::<Vec<_>>()
    );
}

/// A fresh namespace and Region, and a local server whose `/d.raw` is `size` bytes of `byte`.
async fn setup(
    env: &support::Env,
    tag: &str,
    byte: u8,
    size: usize,
) -> (String, String, std::net::SocketAddr, tempfile::TempDir) {
    let ns = env.namespace(tag).await;
    let region_name = format!("{ns}-r");
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("d.raw"), vec![byte; size]).unwrap();
    let addr = support::serve_files(files.path().to_path_buf()).await;
    let regions: Api<Region> = Api::all(env.client.clone());
    let region = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": region_name},
        "spec": {"storage": {"url": format!("file:///var/lib/ims/{region_name}")}}});
    regions.patch(&region_name, &PatchParams::apply("test"), &Patch::Apply(region)).await.unwrap();
    (ns, region_name, addr, files)
}

/// The `default` ImageQuota with this spec.
fn quota(spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageQuota", "metadata": {"name": "default"}, "spec": spec})
}

/// A DataDisk image importing `http://addr/d.raw`.
fn data_disk(name: &str, region: &str, addr: std::net::SocketAddr) -> Image {
    serde_json::from_value(json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
        "spec": {"region": region, "type": "DataDisk", "source": {"url": {"url": format!("http://{addr}/d.raw")}}}}))
    .unwrap()
}

scenarios! {
    async fn thirty_concurrent_creates_at_limit_five_admit_exactly_five_then_the_oldest(env: &Env) {
        let (ns, region_name, addr, _files) = setup(env, "quota", 3, 10_000).await;
        let quotas: Api<ImageQuota> = Api::namespaced(env.client.clone(), &ns);
        quotas.patch("default", &PatchParams::apply("test"), &Patch::Apply(quota(json!({"privateImagesPerRegion": 5})))).await.unwrap();
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let creates = (0..30).map(|n| {
            let images = images.clone();
            let image = data_disk(&format!("img-{n:02}"), &region_name, addr);
            async move { images.create(&PostParams::default(), &image).await.unwrap() }
        });
        futures::future::join_all(creates).await;
        // Kill and restart the operator while admissions are in flight.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        env.stop_operator().await;
        env.start_operator();

        let list = settle(&images, 5, 25).await;
        let ledger = quotas.get("default").await.unwrap().status.unwrap();
        let mut reserved: Vec<String> = ledger.reservations.iter().map(|r| r.name.clone()).collect();
        reserved.sort();
        let mut active: Vec<String> = list.iter().filter(|i| phase_reason(i).0 == Some(ImagePhase::Active)).map(|i| i.name_any()).collect();
        active.sort();
        assert_eq!(reserved, active, "the ledger is exactly the admitted images");
        assert_eq!(ledger.used.len(), 1);
        assert_eq!((ledger.used[0].images, ledger.used[0].bytes), (5, 50_000), "usage recounts to the ledger");
        assert_eq!(ledger.hard.unwrap().private_images_per_region, 5);
        let message = list.iter().find(|i| phase_reason(i).0 == Some(ImagePhase::Queued)).unwrap().status.clone().unwrap().message.unwrap();
        assert!(message.contains("/5 images in region") && message.contains("oldest first"), "{message}");

        // Room appears: the two oldest waiting images are admitted, no others.
        let mut queued: Vec<&Image> = list.iter().filter(|i| phase_reason(i).0 == Some(ImagePhase::Queued)).collect();
        queued.sort_by_key(|i| (i.metadata.creation_timestamp.clone().map(|t| t.0), i.name_any()));
        let mut expected: Vec<String> = queued[..2].iter().map(|i| i.name_any()).collect();
        for name in &active[..2] {
            images.delete(name, &DeleteParams::default()).await.unwrap();
        }
        let after = settle(&images, 5, 23).await;
        let mut newly: Vec<String> = after
            .iter()
            .filter(|i| phase_reason(i).0 == Some(ImagePhase::Active) && !active.contains(&i.name_any()))
            .map(|i| i.name_any())
            .collect();
        newly.sort();
        expected.sort();
        assert_eq!(newly, expected, "the oldest queued images are admitted first");
        assert_eq!(quotas.get("default").await.unwrap().status.unwrap().reservations.len(), 5);
    }

    async fn concurrent_imports_gate_byte_moves_and_a_raised_limit_releases_them(env: &Env) {
        let (ns, region_name, addr, _files) = setup(env, "slots", 4, 5_000).await;
        let quotas: Api<ImageQuota> = Api::namespaced(env.client.clone(), &ns);
        let set_slots = |n: i64| quota(json!({"concurrentImports": n}));
        quotas.patch("default", &PatchParams::apply("test"), &Patch::Apply(set_slots(0))).await.unwrap();
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        for n in 0..3 {
            let image = data_disk(&format!("s-{n}"), &region_name, addr);
            images.create(&PostParams::default(), &image).await.unwrap();
        }
        for n in 0..3 {
            let queued = env.wait_for(&images, &format!("s-{n}"), |i: Option<&Image>| i.is_some_and(|i| phase_reason(i) == (Some(ImagePhase::Queued), "Queued".into()))).await.unwrap();
            assert!(queued.status.unwrap().message.unwrap().contains("concurrentImports"));
        }
        let ledger = quotas.get("default").await.unwrap().status.unwrap();
        assert_eq!(ledger.reservations.len(), 3, "admitted to the region, waiting for a slot");
        assert!(ledger.reservations.iter().all(|r| !r.importing));
        quotas.patch("default", &PatchParams::apply("test"), &Patch::Apply(set_slots(2))).await.unwrap();
        settle(&images, 3, 0).await;
        let ledger = quotas.get("default").await.unwrap().status.unwrap();
        assert!(ledger.reservations.iter().all(|r| !r.importing && r.bytes == 5_000), "slots are freed and bytes recorded: {ledger:?}");
    }

    async fn bytes_over_image_bytes_per_region_fail_the_image_and_are_removed(env: &Env) {
        let (ns, region_name, addr, _files) = setup(env, "bytes", 6, 5_000).await;
        let quotas: Api<ImageQuota> = Api::namespaced(env.client.clone(), &ns);
        quotas.patch("default", &PatchParams::apply("test"), &Patch::Apply(quota(json!({"imageBytesPerRegion": 8_000, "concurrentImports": 1})))).await.unwrap();
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        for n in 0..2 {
            let image = data_disk(&format!("b-{n}"), &region_name, addr);
            images.create(&PostParams::default(), &image).await.unwrap();
        }
        let mut outcomes = Vec::new();
        for n in 0..2 {
            let done = env.wait_for(&images, &format!("b-{n}"), |i: Option<&Image>| {
                i.is_some_and(|i| matches!(phase_reason(i).0, Some(ImagePhase::Active) | Some(ImagePhase::Failed)))
            }).await.unwrap();
            outcomes.push(phase_reason(&done));
        }
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(outcomes, [(Some(ImagePhase::Active), "Active".to_string()), (Some(ImagePhase::Failed), "QuotaExceeded".to_string())]);
        let ledger = quotas.get("default").await.unwrap().status.unwrap();
        assert_eq!(ledger.used[0].bytes, 5_000, "only the admitted bytes count");
        if env.server().is_some() {
            let mut stored = 0;
            let mut stack = vec![env.region_dir(&region_name)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.path().is_dir() { stack.push(e.path()) } else { stored += 1 }
                }
            }
            assert_eq!(stored, 1, "the refused image's bytes are removed");
        }
    }

    async fn the_ledger_shows_the_limits_in_force_when_the_spec_changes(env: &Env) {
        let ns = env.namespace("hard").await;
        env.start_operator();
        let quotas: Api<ImageQuota> = Api::namespaced(env.client.clone(), &ns);
        for limit in [7, 9] {
            let q = quota(json!({"privateImagesPerRegion": limit}));
            quotas.patch("default", &PatchParams::apply("gitops"), &Patch::Apply(q)).await.unwrap();
            let refreshed = env
                .wait_for(&quotas, "default", move |q: Option<&ImageQuota>| {
                    q.and_then(|q| q.status.as_ref()).and_then(|s| s.hard.as_ref()).is_some_and(|h| h.private_images_per_region == limit)
                })
                .await
                .unwrap();
            let status = refreshed.status.unwrap();
            assert_eq!(status.summary, Some(format!("0/{limit} images per region")));
            assert_eq!(status.observed_generation, refreshed.metadata.generation);
            assert_eq!(status.hard.unwrap().concurrent_imports, 40, "unset keys come from the policy");
        }
    }

    async fn a_reservation_of_an_image_that_vanished_is_released(env: &Env) {
        let (ns, region_name, addr, _files) = setup(env, "gc", 8, 2_000).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let quotas: Api<ImageQuota> = Api::namespaced(env.client.clone(), &ns);
        for name in ["kept", "lost"] {
            images.create(&PostParams::default(), &data_disk(name, &region_name, addr)).await.unwrap();
        }
        settle(&images, 2, 0).await;
        // The operator is down and someone force-removes an image (finalizer stripped by hand).
        env.stop_operator().await;
        let patch = json!({"metadata": {"finalizers": null}});
        images.patch("lost", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        images.delete("lost", &DeleteParams::default()).await.unwrap();
        assert_eq!(quotas.get("default").await.unwrap().status.unwrap().reservations.len(), 2);
        env.start_operator();
        let cleaned = env
            .wait_for(&quotas, "default", |q: Option<&ImageQuota>| {
                q.and_then(|q| q.status.as_ref()).is_some_and(|s| s.reservations.len() == 1)
            })
            .await
            .unwrap();
        let status = cleaned.status.unwrap();
        assert_eq!(status.reservations[0].name, "kept");
        assert_eq!((status.used[0].images, status.used[0].bytes), (1, 2_000), "usage recounts without the lost image");
    }
}
