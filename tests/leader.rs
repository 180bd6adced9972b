//! HA: two operator instances elect a leader on a Lease; killing the leader mid-import hands
//! the work to the standby, which finishes it with one set of bytes in the store.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use ims_operator::{
    api::{Image, ImagePhase, Region},
    leader::{self, LeaseConfig},
};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Namespace};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Serves `size` bytes; the first response pauses half-way for `pause` (the leader dies then).
/// Counts the requests it has answered the first half of.
async fn slow_server(size: usize, pause: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut stream, _)) = listener.accept().await {
            let pause = if std::mem::take(&mut first) { pause } else { Duration::ZERO };
            let count = count.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let body: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body[..size / 2]).await;
                count.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(pause).await;
                let _ = stream.write_all(&body[size / 2..]).await;
            });
        }
    });
    (addr, answered)
}

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok().flatten().and_then(|l| l.spec).and_then(|s| s.holder_identity)
}

scenarios! {
    async fn the_standby_finishes_an_import_when_the_leader_dies(env: &Env) {
        let ns = env.namespace("ha").await;
        let region_name = format!("{ns}-r");
        let config = env.operator_config();
        let namespaces: Api<Namespace> = Api::all(env.client.clone());
        let system: Namespace = serde_json::from_value(json!({"metadata": {"name": config.operator_namespace}})).unwrap();
        let _ = namespaces.create(&PostParams::default(), &system).await;
        let lease_name = format!("lease-{ns}");
        let candidate = |identity: &str| {
            let lease = LeaseConfig {
                name: lease_name.clone(),
                namespace: config.operator_namespace.clone(),
                identity: identity.into(),
                duration: Duration::from_secs(2),
            };
            let lease_client = { let c = env.operator_client.clone(); move || c };
            tokio::spawn(leader::run(env.operator_client.clone(), lease_client, lease, config.clone(), futures::future::pending::<()>()))
        };
        let a = candidate("a");
        let leases: Api<Lease> = Api::namespaced(env.client.clone(), &config.operator_namespace);
        for _ in 0..100 {
            if holder(&leases, &lease_name).await.as_deref() == Some("a") { break }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(holder(&leases, &lease_name).await.as_deref(), Some("a"), "the first candidate leads");
        let b = candidate("b");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(holder(&leases, &lease_name).await.as_deref(), Some("a"), "the second stands by");

        let size = 6 << 20;
        let (addr, answered) = slow_server(size, Duration::from_secs(30)).await;
        let regions: Api<Region> = Api::all(env.client.clone());
        let r = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": region_name}, "spec": {"storage": {"url": format!("file:///var/lib/ims/{region_name}")}}});
        regions.patch(&region_name, &PatchParams::apply("test"), &Patch::Apply(r)).await.unwrap();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let img = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "ha"},
            "spec": {"region": region_name, "type": "DataDisk", "source": {"url": {"url": format!("http://{addr}/d.raw")}}}});
        images.patch("ha", &PatchParams::apply("test"), &Patch::Apply(img)).await.unwrap();
        env.wait_for(&images, "ha", |i: Option<&Image>| {
            i.and_then(|i| i.status.as_ref()).is_some_and(|s| s.phase == Some(ImagePhase::Saving))
        })
        .await;
        // The leader has the paused first response (else the standby would get it, and wait).
        for _ in 0..200 {
            if answered.load(Ordering::SeqCst) > 0 { break }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(answered.load(Ordering::SeqCst), 1, "the leader is mid-import");
        // The leader dies mid-import (no graceful shutdown, no lease release).
        a.abort();
        let _ = a.await;
        let active = env
            .wait_for(&images, "ha", |i: Option<&Image>| {
                i.and_then(|i| i.status.as_ref()).is_some_and(|s| s.phase == Some(ImagePhase::Active))
            })
            .await
            .unwrap();
        assert_eq!(holder(&leases, &lease_name).await.as_deref(), Some("b"), "the standby took over");
        let lease = leases.get(&lease_name).await.unwrap().spec.unwrap();
        assert!(lease.lease_transitions.unwrap_or(0) >= 1);
        let body: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let digest: String = Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(active.status.unwrap().checksum.unwrap().sha256, digest);
        if env.server().is_some() {
            let mut files = Vec::new();
            let mut stack = vec![env.region_dir(&region_name)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.path().is_dir() { stack.push(e.path()) } else { files.push(e.path()) }
                }
            }
            assert_eq!(files.len(), 1, "one set of bytes: {files:?}");
        }
        b.abort();
        let _ = b.await;
    }
}
