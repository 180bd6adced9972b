//! Images end to end through the real controllers: real bytes from a local HTTP server, real
//! formats made with qemu-img, verified in the region store.

mod support;

use std::process::Command;

use ims_operator::api::{Image, ImagePhase, Region};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::conditions::is_deleted,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::{reason_is, region, stored_files};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn qemu_info(path: &std::path::Path) -> (String, u64) {
    let out = Command::new("qemu-img").args(["info", "--output=json", path.to_str().unwrap()]).output().unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    (info["format"].as_str().unwrap().to_string(), info["virtual-size"].as_u64().unwrap())
}

fn image(name: &str, region: &str, url: &str, extra: Value) -> Value {
    let mut spec = json!({"region": region, "type": "DataDisk", "source": {"url": {"url": url}}});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name}, "spec": spec})
}

scenarios! {
    async fn qemu_images_import_active_with_format_size_and_checksum(env: &Env) {
        let ns = env.namespace("img").await;
        let region_name = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        let raw = files.path().join("src.raw");
        std::fs::write(&raw, (0..5 * 1024 * 1024 + 3).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
        let formats = [("qcow2", "qcow2", "Qcow2", vec![]), ("vmdk", "vmdk", "Vmdk", vec!["-o", "subformat=streamOptimized"]), ("vhd", "vpc", "Vhd", vec![]), ("vhdx", "vhdx", "Vhdx", vec![]), ("vdi", "vdi", "Vdi", vec![]), ("raw", "raw", "Raw", vec![])];
        for (ext, qemu, _, opts) in &formats {
            let out = files.path().join(format!("disk.{ext}"));
            let mut args = vec!["convert", "-f", "raw", "-O", qemu];
            args.extend(opts.iter().copied());
            args.extend([raw.to_str().unwrap(), out.to_str().unwrap()]);
            qemu_img(&args);
        }
        let addr = support::serve_files(files.path().to_path_buf()).await;
        region(env, &region_name).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        for (ext, _, _, _) in &formats {
            let file = files.path().join(format!("disk.{ext}"));
            let digest: String = Sha256::digest(std::fs::read(&file).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
            let extra = json!({"description": ext});
            let mut manifest = image(&format!("disk-{ext}"), &region_name, &format!("http://{addr}/disk.{ext}"), extra);
            manifest["spec"]["source"]["url"]["checksum"] = json!(format!("sha256:{digest}"));
            images.patch(&format!("disk-{ext}"), &PatchParams::apply("test"), &Patch::Apply(manifest)).await.unwrap();
        }
        for (ext, _, api_format, _) in &formats {
            let name = format!("disk-{ext}");
            let active = env.wait_for(&images, &name, reason_is("Active")).await.unwrap();
            let status = active.status.clone().unwrap();
            let file = files.path().join(format!("disk.{ext}"));
            let (_, virtual_size) = qemu_info(&file);
            let digest: String = Sha256::digest(std::fs::read(&file).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(status.phase, Some(ImagePhase::Active), "{name}");
            assert_eq!(status.format.as_deref(), Some(*api_format), "{name}");
            assert_eq!(status.virtual_size_bytes, Some(virtual_size as i64), "{name}: virtual size as qemu-img info says");
            assert_eq!(status.size_bytes, Some(std::fs::metadata(&file).unwrap().len() as i64));
            assert_eq!(status.checksum.unwrap().sha256, digest);
            let location = status.location.unwrap();
            assert_eq!(location.checksum, format!("sha256:{digest}"));
            assert_eq!(status.progress.unwrap().percent, Some(100));
            assert!(active.finalizers().contains(&"ims.io/cleanup".to_string()));
            let stored = std::fs::read(env.stored_file(&active, "disk")).unwrap();
            let stored_digest: String = Sha256::digest(&stored).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(stored_digest, digest, "{name}: the bytes in the store are the source's");
            // And the image server serves exactly them at status.location.url.
            let (code, _, served) = support::http_get_active(&location.url, &[]).await;
            assert_eq!(code, 200, "{name}: {}", location.url);
            assert!(served == stored, "{name}: the bytes served are the stored ones");
        }
        // Deleting removes the bytes.
        let gone = images.get("disk-qcow2").await.unwrap();
        images.delete("disk-qcow2", &DeleteParams::default()).await.unwrap();
        env.wait_for(&images, "disk-qcow2", is_deleted(&gone.uid().unwrap())).await;
        if env.server().is_some() {
            let left: Vec<_> = stored_files(&env.region_dir(&region_name)).into_iter().filter(|p| p.to_string_lossy().contains("/disk-qcow2/")).collect();
            assert!(left.is_empty(), "deleted image's bytes are gone: {left:?}");
        }
    }

    async fn bad_imports_fail_with_reasons_and_leave_no_bytes(env: &Env) {
        let ns = env.namespace("bad").await;
        let region_name = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("data.raw"), vec![7u8; 70_000]).unwrap();
        let qcow2 = files.path().join("full.qcow2");
        qemu_img(&["create", "-f", "qcow2", qcow2.to_str().unwrap(), "64M"]);
        let bytes = std::fs::read(&qcow2).unwrap();
        std::fs::write(files.path().join("truncated.qcow2"), &bytes[..40]).unwrap();
        std::fs::write(files.path().join("installer.iso"), ims_operator::format::sample::iso(64, true)).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        region(env, &region_name).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let cases = [
            // The type must fit the bytes: an ISO holds an ISO 9660 medium, a disk type a disk.
            ("iso-of-qcow2", format!("http://{addr}/full.qcow2"), json!({"type": "ISO"}), "UnsupportedFormat"),
            ("disk-of-iso", format!("http://{addr}/installer.iso"), json!({"type": "DataDisk"}), "UnsupportedFormat"),
            ("mismatch", format!("http://{addr}/data.raw"), json!({"checksum": format!("sha256:{}", "0".repeat(64))}), "ChecksumMismatch"),
            ("truncated", format!("http://{addr}/truncated.qcow2"), json!({}), "UnsupportedFormat"),
            ("declared", format!("http://{addr}/data.raw"), json!({"format": "Qcow2"}), "UnsupportedFormat"),
            ("metadata", "http://169.254.169.254/latest/meta-data".to_string(), json!({}), "SourceUnreachable"),
            ("missing", format!("http://{addr}/nope.raw"), json!({}), "SourceUnreachable"),
            // Only 127.0.0.0/8 is allow-listed for the tests: IPv6 loopback and the IPv4-mapped
            // form of the metadata address stay refused.
            ("loopback6", format!("http://[::1]:{}/data.raw", addr.port()), json!({}), "SourceUnreachable"),
            ("mapped", "http://[::ffff:169.254.169.254]/latest".to_string(), json!({}), "SourceUnreachable"),
        ];
        for (name, url, extra, _) in &cases {
            let mut manifest = image(name, &region_name, url, json!({}));
            for (k, v) in extra.as_object().unwrap() {
                match k.as_str() {
                    "type" => manifest["spec"][k] = v.clone(),
                    _ => manifest["spec"]["source"]["url"][k] = v.clone(),
                }
            }
            images.patch(name, &PatchParams::apply("test"), &Patch::Apply(manifest)).await.unwrap();
        }
        for (name, _, _, reason) in &cases {
            let failed = env.wait_for(&images, name, reason_is(reason)).await.unwrap();
            let status = failed.status.unwrap();
            assert_eq!(status.phase, Some(ImagePhase::Failed), "{name}");
            assert!(status.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True"), "{name} is Stalled");
            assert!(status.location.is_none());
        }
        let message = |name: &'static str| {
            let images = images.clone();
            async move { images.get(name).await.unwrap().status.unwrap().message.unwrap() }
        };
        let iso = message("iso-of-qcow2").await;
        assert!(iso.contains("type ISO needs an ISO 9660 image") && iso.contains("Qcow2"), "{iso}");
        let disk = message("disk-of-iso").await;
        assert!(disk.contains("type DataDisk needs a disk image") && disk.contains("set type to ISO"), "{disk}");
        let metadata = images.get("metadata").await.unwrap().status.unwrap().message.unwrap();
        assert!(metadata.contains("link-local") && metadata.contains("--import-allow-cidrs"), "{metadata}");
        for name in ["loopback6", "mapped"] {
            let message = images.get(name).await.unwrap().status.unwrap().message.unwrap();
            assert!(message.contains("refused") && message.contains("--import-allow-cidrs"), "{name}: {message}");
        }
        if env.server().is_some() {
            let left = stored_files(&env.region_dir(&region_name));
            assert!(left.is_empty(), "no failed import left bytes: {left:?}");
        }
    }

    async fn public_needs_the_platform_namespace_and_protected_holds_deletion(env: &Env) {
        let ns = env.namespace("vis").await;
        let region_name = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("d.raw"), vec![1u8; 4096]).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        region(env, &region_name).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let url = format!("http://{addr}/d.raw");
        // With deploy/'s ValidatingAdmissionPolicy (a real cluster) the API server refuses it;
        // without it (the embedded API) the controller does.
        match images.patch("pub", &PatchParams::apply("test"), &Patch::Apply(image("pub", &region_name, &url, json!({"visibility": "Public"})))).await {
            Ok(_) => {
                let refused = env.wait_for(&images, "pub", reason_is("VisibilityNotAllowed")).await.unwrap();
                assert_eq!(refused.status.unwrap().phase, Some(ImagePhase::Failed));
            }
            Err(kube::Error::Api(s)) => assert!(env.server().is_none() && s.message.contains("Private or Marketplace"), "{s:?}"),
            Err(e) => panic!("{e}"),
        }

        images.patch("keep", &PatchParams::apply("test"), &Patch::Apply(image("keep", &region_name, &url, json!({"protected": true})))).await.unwrap();
        env.wait_for(&images, "keep", reason_is("Active")).await;
        let uid = images.get("keep").await.unwrap().metadata.uid.unwrap();
        match images.delete("keep", &DeleteParams::default()).await {
            Ok(_) => {
                let held = env.wait_for(&images, "keep", reason_is("Protected")).await.unwrap();
                assert_eq!(held.status.unwrap().phase, Some(ImagePhase::Deleting));
                assert!(held.metadata.deletion_timestamp.is_some());
                images.patch("keep", &PatchParams::apply("test"), &Patch::Apply(image("keep", &region_name, &url, json!({"protected": false})))).await.unwrap();
            }
            // deploy/'s admission policy refuses the delete up front on a real cluster.
            Err(kube::Error::Api(s)) => {
                assert!(env.server().is_none() && s.message.contains("spec.protected"), "{s:?}");
                images.patch("keep", &PatchParams::apply("test"), &Patch::Apply(image("keep", &region_name, &url, json!({"protected": false})))).await.unwrap();
                images.delete("keep", &DeleteParams::default()).await.unwrap();
            }
            Err(e) => panic!("{e}"),
        }
        env.wait_for(&images, "keep", is_deleted(&uid)).await;
    }

    async fn an_image_in_a_missing_region_waits_and_starts_when_it_appears(env: &Env) {
        let ns = env.namespace("late").await;
        let region_name = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("d.raw"), vec![2u8; 8192]).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        images.patch("early", &PatchParams::apply("test"), &Patch::Apply(image("early", &region_name, &format!("http://{addr}/d.raw"), json!({})))).await.unwrap();
        let waiting = env.wait_for(&images, "early", reason_is("RegionNotFound")).await.unwrap();
        assert_eq!(waiting.status.unwrap().phase, Some(ImagePhase::Queued));
        region(env, &region_name).await;
        let active = env.wait_for(&images, "early", reason_is("Active")).await.unwrap();
        assert_eq!(active.status.unwrap().size_bytes, Some(8192));
    }

    async fn an_unreachable_source_is_retried_without_status_churn(env: &Env) {
        let ns = env.namespace("retry").await;
        let region_name = format!("{ns}-r");
        // A server that is there but keeps answering 503 (a transient failure). It holds its
        // port, so no other test's server can take it over.
        let busy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = busy.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = busy.accept().await {
                // Read the whole request first, so every attempt fails the same way.
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let _ = stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
            }
        });
        region(env, &region_name).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        images.patch("later", &PatchParams::apply("test"), &Patch::Apply(image("later", &region_name, &format!("http://{closed}/d.raw"), json!({})))).await.unwrap();
        let waiting = env.wait_for(&images, "later", reason_is("SourceUnreachable")).await.unwrap();
        let status = waiting.status.clone().unwrap();
        assert_eq!(status.phase, Some(ImagePhase::Saving), "a transient failure keeps the image Saving and retries");
        assert!(status.conditions.iter().any(|c| c.type_ == "Reconciling" && c.status == "True"));
        let before = images.get("later").await.unwrap().resource_version();
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert_eq!(images.get("later").await.unwrap().resource_version(), before, "retries write nothing while the outcome is the same");
    }

    async fn the_source_of_an_active_image_cannot_change_and_a_change_mid_import_starts_again(env: &Env) {
        let ns = env.namespace("src").await;
        let region_name = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        let new_bytes = vec![2u8; 30_000];
        std::fs::write(files.path().join("new.raw"), &new_bytes).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        // A source that sends half its bytes, then holds the rest until told.
        let held = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let held_addr = held.local_addr().unwrap();
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let go = release.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = held.accept().await {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\nConnection: close\r\n\r\n").await;
                let _ = stream.write_all(&[1u8; 32768]).await;
                go.notified().await;
                let _ = stream.write_all(&[1u8; 32768]).await;
            }
        });
        region(env, &region_name).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let apply = |url: String, extra: Value| {
            let images = images.clone();
            let region_name = region_name.clone();
            async move { images.patch("img", &PatchParams::apply("test"), &Patch::Apply(image("img", &region_name, &url, extra))).await }
        };
        apply(format!("http://{held_addr}/old.raw"), json!({})).await.unwrap();
        env.wait_for(&images, "img", reason_is("Importing")).await;
        // While it is Saving the source may change (a URL fixed); the old bytes never become Active.
        apply(format!("http://{addr}/new.raw"), json!({})).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await; // the operator's cache sees the edit
        release.notify_one();
        let active = env.wait_for(&images, "img", reason_is("Active")).await.unwrap();
        let status = active.status.unwrap();
        assert_eq!(status.checksum.unwrap().sha256, hex(&Sha256::digest(&new_bytes)), "the bytes of the source in the spec");
        assert_eq!((status.size_bytes, status.observed_generation), (Some(30_000), active.metadata.generation));
        if env.server().is_some() {
            assert_eq!(stored_files(&env.region_dir(&region_name)).len(), 1, "the old bytes are gone");
        }
        // Once Active, the API server refuses a new source and says what to do; other edits pass.
        match apply(format!("http://{addr}/other.raw"), json!({})).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{s:?}");
                assert!(s.message.contains("spec.source cannot change once the image is Active") && s.message.contains("create a new Image"), "{}", s.message);
            }
            other => panic!("a new source of an Active image was accepted: {other:?}"),
        }
        apply(format!("http://{addr}/new.raw"), json!({"description": "still fine"})).await.unwrap();
    }

    async fn transitions_are_announced_once_as_events(env: &Env) {
        let ns = env.namespace("events").await;
        let region_name = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("d.raw"), vec![5u8; 4096]).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        region(env, &region_name).await;
        env.start_operator();
        let regions: Api<Region> = Api::all(env.client.clone());
        env.wait_for(&regions, &region_name, |r: Option<&Region>| {
            r.and_then(|r| r.status.as_ref()).is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .await;
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        images.patch("ok", &PatchParams::apply("test"), &Patch::Apply(image("ok", &region_name, &format!("http://{addr}/d.raw"), json!({})))).await.unwrap();
        let mut bad = image("bad", &region_name, &format!("http://{addr}/d.raw"), json!({}));
        bad["spec"]["source"]["url"]["checksum"] = json!(format!("sha256:{}", "1".repeat(64)));
        images.patch("bad", &PatchParams::apply("test"), &Patch::Apply(bad)).await.unwrap();
        env.wait_for(&images, "ok", reason_is("Active")).await;
        env.wait_for(&images, "bad", reason_is("ChecksumMismatch")).await;
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &ns);
        let mut seen = Vec::new();
        for _ in 0..50 {
            seen = events
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|e| (e.regarding.and_then(|r| r.name).unwrap_or_default(), e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
                .collect::<Vec<_>>();
            if seen.iter().filter(|(_, _, r)| !r.starts_with("Region")).count() >= 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // Waiting for the region may be announced too, depending on how fast its probe ran.
        seen.retain(|(_, _, reason)| !reason.starts_with("Region"));
        seen.sort();
        assert_eq!(seen, [
            ("bad".to_string(), "Normal".to_string(), "Importing".to_string()),
            ("bad".to_string(), "Warning".to_string(), "ChecksumMismatch".to_string()),
            ("ok".to_string(), "Normal".to_string(), "Active".to_string()),
            ("ok".to_string(), "Normal".to_string(), "Importing".to_string()),
        ]);
    }

    async fn a_full_server_is_active_when_every_disk_is_and_a_failed_disk_leaves_nothing(env: &Env) {
        let ns = env.namespace("full").await;
        let region_name = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        let raw = files.path().join("data.raw");
        std::fs::write(&raw, (0..3 * 1024 * 1024).map(|i| (i % 241) as u8).collect::<Vec<u8>>()).unwrap();
        let system = files.path().join("system.qcow2");
        qemu_img(&["create", "-f", "qcow2", system.to_str().unwrap(), "128M"]);
        let data2 = files.path().join("data2.vhdx");
        qemu_img(&["convert", "-f", "raw", "-O", "vhdx", raw.to_str().unwrap(), data2.to_str().unwrap()]);
        let addr = support::serve_files(files.path().to_path_buf()).await;
        region(env, &region_name).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let server = |name: &str, disks: Value| {
            json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name}, "spec": {
                "region": region_name, "type": "FullServer", "backupID": "backup-1",
                "os": {"type": "Linux", "distribution": "Ubuntu", "version": "24.04", "architecture": "x86_64"},
                "source": {"disks": disks}}})
        };
        let disks = json!([
            {"role": "System", "url": format!("http://{addr}/system.qcow2")},
            {"role": "Data", "url": format!("http://{addr}/data.raw")},
            {"role": "Data", "url": format!("http://{addr}/data2.vhdx"), "format": "Vhdx"},
        ]);
        images.patch("whole", &PatchParams::apply("test"), &Patch::Apply(server("whole", disks))).await.unwrap();
        let broken = json!([
            {"role": "System", "url": format!("http://{addr}/system.qcow2")},
            {"role": "Data", "url": format!("http://{addr}/gone.raw")},
        ]);
        images.patch("broken", &PatchParams::apply("test"), &Patch::Apply(server("broken", broken))).await.unwrap();

        let active = env.wait_for(&images, "whole", reason_is("Active")).await.unwrap();
        let status = active.status.clone().unwrap();
        let sha = |p: &std::path::Path| -> String { Sha256::digest(std::fs::read(p).unwrap()).iter().map(|b| format!("{b:02x}")).collect() };
        let expected = [(&system, "System", "Qcow2"), (&raw, "Data", "Raw"), (&data2, "Data", "Vhdx")];
        assert_eq!(status.disks.len(), 3, "status lists every disk");
        let mut total = 0;
        for (disk, (file, role, format)) in status.disks.iter().zip(expected) {
            let (_, virtual_size) = qemu_info(file);
            let size = std::fs::metadata(file).unwrap().len() as i64;
            total += size;
            assert_eq!((disk.role.as_str(), disk.format.as_deref()), (role, Some(format)));
            assert_eq!(disk.virtual_size_bytes, Some(virtual_size as i64), "{role} {format}: as qemu-img info says");
            assert_eq!(disk.size_bytes, Some(size));
            assert_eq!(disk.sha256.as_deref(), Some(sha(file).as_str()));
            let location = disk.location.clone().unwrap();
            let stored = env.stored_file(&active, &format!("disk-{}", disk.index));
            assert_eq!(sha(&stored), sha(file), "the stored bytes of disk {} are the source's", disk.index);
            let (code, _, served) = support::http_get_active(&location.url, &[]).await;
            assert_eq!(code, 200);
            assert!(served == std::fs::read(&stored).unwrap(), "disk {} is served as stored", disk.index);
        }
        assert_eq!(status.size_bytes, Some(total), "sizeBytes counts every disk");
        assert_eq!(status.format.as_deref(), Some("Qcow2"), "the image's own format is its system disk's");
        assert_eq!(status.location.unwrap().checksum, format!("sha256:{}", sha(&system)));

        let failed = env.wait_for(&images, "broken", reason_is("SourceUnreachable")).await.unwrap();
        let status = failed.status.unwrap();
        assert_eq!(status.phase, Some(ImagePhase::Failed));
        assert!(status.message.as_deref().unwrap_or_default().starts_with("disk 1 (Data): "), "{:?}", status.message);
        assert!(status.disks.is_empty() && status.location.is_none());
        if env.server().is_some() {
            let left: Vec<_> = stored_files(&env.region_dir(&region_name)).into_iter().filter(|p| p.to_string_lossy().contains("/broken/")).collect();
            assert!(left.is_empty(), "the system disk stored before the failure is gone too: {left:?}");
        }
    }
}
