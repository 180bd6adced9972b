//! `/metrics` after a scenario: the families exist and carry what happened.

mod support;

use std::time::Duration;

use ims_operator::{
    admin::{self, Readiness},
    api::{Image, ImagePhase, Region},
    controllers,
};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use support::sample;

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

scenarios! {
    async fn metrics_show_reconciles_bytes_phases_and_quota(env: &Env) {
        let ns = env.namespace("metrics").await;
        let region_name = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("d.raw"), vec![3u8; 12_345]).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        let config = env.operator_config();
        let metrics = config.metrics.clone();
        let readiness = Readiness::default();
        let config = controllers::Config { readiness: readiness.clone(), ..config };
        let listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let admin_addr = listener.local_addr().unwrap();
        tokio::spawn(admin::serve(listener, readiness.clone(), metrics));
        assert!(get(admin_addr, "/readyz").await.starts_with("HTTP/1.1 503"), "not ready before the caches sync");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let operator = tokio::spawn(controllers::run(env.operator_client.clone(), config, async move {
            let _ = stopped.await;
        }));

        let regions: Api<Region> = Api::all(env.client.clone());
        let r = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": region_name}, "spec": {"storage": {"url": format!("file:///var/lib/ims/{region_name}")}}});
        regions.patch(&region_name, &PatchParams::apply("test"), &Patch::Apply(r)).await.unwrap();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        for (name, file) in [("good", "d.raw"), ("bad", "missing.raw")] {
            let img = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
                "spec": {"region": region_name, "type": "DataDisk", "source": {"url": {"url": format!("http://{addr}/{file}")}}}});
            images.patch(name, &PatchParams::apply("test"), &Patch::Apply(img)).await.unwrap();
        }
        // This scenario's own images settle first: on a shared cluster, other namespaces' images
        // count in the gauges too, so the gauges alone do not say that these moved.
        let phase_is = |phase: ImagePhase| move |i: Option<&Image>| i.and_then(|i| i.status.as_ref()).and_then(|s| s.phase) == Some(phase);
        env.wait_for(&images, "good", phase_is(ImagePhase::Active)).await;
        env.wait_for(&images, "bad", phase_is(ImagePhase::Failed)).await;
        let mut text = String::new();
        for _ in 0..100 {
            text = get(admin_addr, "/metrics").await;
            let done = sample(&text, "ims_images{phase=\"Active\"}").unwrap_or(0.0) >= 1.0
                && sample(&text, "ims_images{phase=\"Failed\"}").unwrap_or(0.0) >= 1.0
                && sample(&text, "ims_bytes_moved_total{kind=\"import\"}").unwrap_or(0.0) >= 12_345.0;
            if done { break }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(text.starts_with("HTTP/1.1 200") && text.contains("application/openmetrics-text"), "{text}");
        assert!(get(admin_addr, "/readyz").await.starts_with("HTTP/1.1 200"), "ready once the caches synced");
        assert!(sample(&text, "ims_bytes_moved_total{kind=\"import\"}").unwrap_or(0.0) >= 12_345.0, "{text}");
        assert!(sample(&text, "ims_reconciles_total{controller=\"image\"}").unwrap_or(0.0) >= 2.0, "{text}");
        assert!(sample(&text, "ims_reconcile_duration_seconds_count{controller=\"region\"}").unwrap_or(0.0) >= 1.0, "{text}");
        let quota = format!("{{namespace=\"{ns}\",region=\"{region_name}\"}}");
        assert_eq!(sample(&text, &format!("ims_quota_used_images{quota}")), Some(2.0), "both images hold a reservation: {text}");
        assert_eq!(sample(&text, &format!("ims_quota_hard_images{quota}")), Some(50.0), "{text}");
        for family in ["ims_reconciles_in_flight{controller=\"image\"}", "ims_queue_depth{queue=\"quota\"}", "ims_queue_depth{queue=\"copies\"}"] {
            assert!(sample(&text, family).is_some(), "{family}: {text}");
        }
        let _ = stop.send(());
        let _ = operator.await;
    }
}
