//! Delivery through the real controllers: every Active image's `status.location.url` is a
//! capability URL on the operator's image server, read by real consumers (an HTTP client, curl,
//! `qemu-img info` and `qemu-img convert` through qemu's curl driver), stopped by revocation and
//! deletion, and issued again when the key rotates.

mod support;

use std::process::Command;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use ims_operator::api::{Image, ImageShare};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, WatchEvent, WatchParams},
    runtime::conditions::is_deleted,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::{apply, reason_is, region};

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn owned(name: &str, region: &str, url: &str) -> serde_json::Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
        "spec": {"region": region, "type": "DataDisk", "source": {"url": {"url": url}}}})
}

fn reference(name: &str, region: &str, namespace: &str, source: &str) -> serde_json::Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
        "spec": {"region": region, "source": {"image": {"namespace": namespace, "name": source}}}})
}

fn share(image: &str, tenants: &[&str]) -> serde_json::Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageShare", "metadata": {"name": image},
        "spec": {"image": image, "tenants": tenants}})
}

fn url_of(image: &Image) -> String {
    image.status.as_ref().and_then(|s| s.location.as_ref()).map(|l| l.url.clone()).expect("a location")
}

/// What a URL that never existed answers: the reference every refusal must equal.
async fn unknown(url: &str) -> (u16, Vec<u8>) {
    let (base, _) = url.split_once("/v1/images/").expect("a capability URL");
    let (code, _, body) = support::http_get(&format!("{base}/v1/images/no/such/image/disk/AAAA"), &[]).await;
    (code, body)
}

/// Whether qemu-img reads http:// URLs here (its curl driver, Debian's qemu-block-extra).
fn have_qemu_curl(url: &str) -> bool {
    let out = Command::new("qemu-img").args(["info", url]).output().expect("qemu-img runs");
    let missing = String::from_utf8_lossy(&out.stderr).contains("Unable to load module curl");
    if missing {
        assert!(
            std::env::var_os("IMS_REQUIRE_QEMU_IMG").is_none(),
            "qemu-img cannot read http:// URLs (install qemu-block-extra), and IMS_REQUIRE_QEMU_IMG is set"
        );
        eprintln!("qemu-img has no curl driver (qemu-block-extra): skipping its part of this scenario");
    }
    !missing
}

scenarios! {
    async fn an_active_image_is_served_to_http_clients_curl_and_qemu_img(env: &Env) {
        if !support::have_qemu_img() {
            return;
        }
        let ns = env.namespace("serve").await;
        let r = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        let (source, pattern) = support::qcow2_with_data(files.path(), 8);
        let raw = files.path().join("src.raw");
        let addr = support::serve_files(files.path().to_path_buf()).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, owned("vm", &r, &format!("http://{addr}/disk.qcow2"))).await;
        let active = env.wait_for(&images, "vm", reason_is("Active")).await.unwrap();
        let location = active.status.clone().unwrap().location.unwrap();
        assert!(location.url.contains(&format!("/v1/images/{ns}/vm/{}/disk/", active.uid().unwrap())), "{}", location.url);
        assert_eq!((location.checksum.clone(), location.format.as_str()), (format!("sha256:{}", sha256(&source)), "qcow2"));

        // An HTTP client: exactly the bytes, with their length and ETag; a range.
        let (code, headers, body) = support::http_get_active(&location.url, &[]).await;
        assert_eq!(code, 200);
        assert!(body == source, "the served bytes are the imported ones");
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(header("content-length"), Some(source.len().to_string()));
        assert_eq!(header("etag"), Some(format!("\"{}\"", sha256(&source))));
        assert_eq!(header("accept-ranges").as_deref(), Some("bytes"));
        let (code, _, part) = support::http_get(&location.url, &[("Range", "bytes=65536-131071")]).await;
        assert_eq!(code, 206);
        assert!(part == source[65536..131072]);

        // curl, as a person would use it.
        let out = tempfile::tempdir().unwrap();
        let fetched = out.path().join("fetched.qcow2");
        let curl = Command::new("curl").args(["-sS", "-f", "-o"]).arg(&fetched).arg(&location.url).output().expect("curl runs");
        assert!(curl.status.success(), "curl: {}", String::from_utf8_lossy(&curl.stderr));
        assert_eq!(sha256(&std::fs::read(&fetched).unwrap()), sha256(&source), "curl gets the checksum in status");
        let head = Command::new("curl").args(["-sS", "-I"]).arg(&location.url).output().unwrap();
        let head = String::from_utf8_lossy(&head.stdout).to_lowercase();
        assert!(head.starts_with("http/1.1 200") && head.contains(&format!("content-length: {}", source.len())), "{head}");

        // qemu-img through its curl driver (ranges): info, then a convert compared with the source.
        if have_qemu_curl(&location.url) {
            let info = Command::new("qemu-img").args(["info", "--output=json", &location.url]).output().unwrap();
            assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
            let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
            assert_eq!((info["format"].as_str(), info["virtual-size"].as_u64()), (Some("qcow2"), Some(pattern.len() as u64)));
            let converted = out.path().join("converted.raw");
            let convert = Command::new("qemu-img").args(["convert", "-O", "raw", &location.url]).arg(&converted).output().unwrap();
            assert!(convert.status.success(), "{}", String::from_utf8_lossy(&convert.stderr));
            let compare = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&raw).arg(&converted).output().unwrap();
            assert!(compare.status.success(), "the converted image equals the source: {}", String::from_utf8_lossy(&compare.stdout));
        }

        // 100 range readers at once, each getting its own bytes.
        let readers = (0..100usize).map(|i| {
            let (url, source) = (location.url.clone(), &source);
            async move {
                let start = (i * 7919) % (source.len() - 4096);
                let end = start + 1 + (i * 131) % 4096;
                let (code, _, body) = support::http_get(&url, &[("Range", &format!("bytes={start}-{}", end - 1))]).await;
                (code == 206 && body == source[start..end]).then_some(()).ok_or(format!("reader {i}: {code}, {} bytes", body.len()))
            }
        });
        let failed: Vec<String> = futures::future::join_all(readers).await.into_iter().filter_map(Result::err).collect();
        assert!(failed.is_empty(), "{failed:?}");

        // Deleted: the URL answers what a URL that never existed answers.
        let uid = active.uid().unwrap();
        images.delete("vm", &DeleteParams::default()).await.unwrap();
        env.wait_for(&images, "vm", is_deleted(&uid)).await;
        let (code, _, body) = support::http_get(&location.url, &[]).await;
        assert_eq!((code, body), unknown(&location.url).await);
    }

    async fn revoking_a_share_or_deleting_a_reference_stops_its_url_at_once(env: &Env) {
        let owner = env.namespace("owner").await;
        let (a, b) = (env.namespace("a").await, env.namespace("b").await);
        let r = format!("{owner}-r");
        let files = tempfile::tempdir().unwrap();
        let bytes = vec![9u8; 300_000];
        std::fs::write(files.path().join("d.raw"), &bytes).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        region(env, &r).await;
        env.start_operator();
        let owner_images: Api<Image> = Api::namespaced(env.client.clone(), &owner);
        apply(&owner_images, owned("base", &r, &format!("http://{addr}/d.raw"))).await;
        let source = env.wait_for(&owner_images, "base", reason_is("Active")).await.unwrap();
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &owner);
        apply(&shares, share("base", &[&a, &b])).await;
        let mut urls = Vec::new();
        for tenant in [&a, &b] {
            let images: Api<Image> = Api::namespaced(env.client.clone(), tenant);
            apply(&images, reference("mine", &r, &owner, "base")).await;
            let active = env.wait_for(&images, "mine", reason_is("Active")).await.unwrap();
            let url = url_of(&active);
            assert_ne!(url, url_of(&source), "a reference has a URL of its own");
            assert_eq!(support::http_get_active(&url, &[]).await.2, bytes);
            urls.push(url);
        }
        let never = unknown(&urls[0]).await;
        assert_eq!(never.0, 404);

        // b is no longer a member: its URL stops as its status says so; a's still works.
        apply(&shares, share("base", &[&a])).await;
        let b_images: Api<Image> = Api::namespaced(env.client.clone(), &b);
        env.wait_for(&b_images, "mine", reason_is("ShareRevoked")).await;
        let (code, _, body) = support::http_get(&urls[1], &[]).await;
        assert_eq!((code, body), never, "a revoked URL answers as one that never existed");
        assert_eq!(support::http_get(&urls[0], &[]).await.0, 200);

        // a deletes its reference: its URL stops; the owner's own URL still serves.
        let a_images: Api<Image> = Api::namespaced(env.client.clone(), &a);
        let mine = a_images.get("mine").await.unwrap();
        a_images.delete("mine", &DeleteParams::default()).await.unwrap();
        env.wait_for(&a_images, "mine", is_deleted(&mine.uid().unwrap())).await;
        let (code, _, body) = support::http_get(&urls[0], &[]).await;
        assert_eq!((code, body), never);
        assert_eq!(support::http_get(&url_of(&source), &[]).await.2, bytes);
        // A tampered token is unknown too.
        let tampered = format!("{}x", url_of(&source));
        let (code, _, body) = support::http_get(&tampered, &[]).await;
        assert_eq!((code, body), never);
    }

    async fn rotating_the_key_issues_every_location_again_with_one_write_each(env: &Env) {
        let owner = env.namespace("rot").await;
        let tenant = env.namespace("rot-t").await;
        let r = format!("{owner}-r");
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("d.raw"), vec![5u8; 50_000]).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        region(env, &r).await;
        env.start_operator();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &owner);
        for name in ["one", "two", "three"] {
            apply(&images, owned(name, &r, &format!("http://{addr}/d.raw"))).await;
        }
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &owner);
        apply(&shares, share("one", &[&tenant])).await;
        let theirs: Api<Image> = Api::namespaced(env.client.clone(), &tenant);
        apply(&theirs, reference("mine", &r, &owner, "one")).await;
        let mut before = Vec::new();
        for name in ["one", "two", "three"] {
            before.push((images.clone(), name, url_of(&env.wait_for(&images, name, reason_is("Active")).await.unwrap())));
        }
        before.push((theirs.clone(), "mine", url_of(&env.wait_for(&theirs, "mine", reason_is("Active")).await.unwrap())));
        let rv = images.list_metadata(&Default::default()).await.unwrap().metadata.resource_version.unwrap();
        let their_rv = theirs.list_metadata(&Default::default()).await.unwrap().metadata.resource_version.unwrap();

        // The key Secret is deleted (a rotation): the operator makes a new one...
        let secrets: Api<Secret> = Api::namespaced(env.client.clone(), "ims-system");
        let old = secrets.get("ims-image-key").await.expect("the operator made its key Secret");
        secrets.delete("ims-image-key", &DeleteParams::default()).await.unwrap();
        // ...and every Active image gets a new URL.
        for (api, name, url) in &before {
            env.wait_for(api, name, |i: Option<&Image>| i.and_then(|i| i.status.as_ref()?.location.as_ref()).is_some_and(|l| &l.url != url)).await;
        }
        let new = secrets.get("ims-image-key").await.unwrap();
        assert_ne!(new.uid(), old.uid());
        for (api, name, old_url) in &before {
            let now = url_of(&api.get(name).await.unwrap());
            assert_eq!(support::http_get_active(&now, &[]).await.0, 200, "{name}: the new URL serves");
            let (code, _, body) = support::http_get(old_url, &[]).await;
            assert_eq!((code, body), unknown(old_url).await, "{name}: the old URL is unknown");
        }
        // One status write per image: the writes since the rotation, counted from a watch.
        let count = |api: Api<Image>, rv: String| async move {
            let mut events = std::pin::pin!(api.watch(&WatchParams::default().timeout(2), &rv).await.unwrap());
            let mut modified = 0;
            while let Some(Ok(event)) = futures::StreamExt::next(&mut events).await {
                if let WatchEvent::Modified(_) = event {
                    modified += 1;
                }
            }
            modified
        };
        assert_eq!(count(images.clone(), rv).await, 3, "one write for each owned image");
        assert_eq!(count(theirs.clone(), their_rv).await, 1, "one write for the reference");
    }

    async fn https_serves_with_the_secrets_certificate_and_picks_up_a_renewal(env: &Env) {
        let ns = env.namespace("tls").await;
        let r = format!("{ns}-r");
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
        let pem = |name: &str| std::fs::read(fixtures.join(name)).unwrap();
        // A kubernetes.io/tls Secret, as cert-manager writes it.
        let secrets: Api<Secret> = Api::namespaced(env.client.clone(), "ims-system");
        let tls = |cert: &str, key: &str| {
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ims-images-tls"}, "type": "kubernetes.io/tls",
                "data": {"tls.crt": BASE64.encode(pem(cert)), "tls.key": BASE64.encode(pem(key))}})
        };
        apply(&secrets, tls("first.crt", "first.key")).await;
        let files = tempfile::tempdir().unwrap();
        let source: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 16) as u8).collect();
        std::fs::write(files.path().join("d.raw"), &source).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        region(env, &r).await;
        let mut config = env.operator_config();
        let delivery = config.delivery.as_mut().unwrap();
        delivery.tls_secret = Some("ims-images-tls".into());
        delivery.base_url = format!("https://{}", env.images.local_addr().unwrap());
        env.start_operator_with(config);
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        apply(&images, owned("web", &r, &format!("http://{addr}/d.raw"))).await;
        let url = url_of(&env.wait_for(&images, "web", reason_is("Active")).await.unwrap());
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");

        let out = tempfile::tempdir().unwrap();
        let fetched = out.path().join("fetched");
        // curl trusting `ca`, with `args` (e.g. a range): its exit code and what it wrote.
        let curl = |ca: &str, args: &[&str]| {
            let _ = std::fs::remove_file(&fetched);
            let run = Command::new("curl").args(["-sS", "-f", "--cacert"]).arg(fixtures.join(ca)).args(args).arg("-o").arg(&fetched).arg(&url).output().expect("curl runs");
            (run.status.code(), std::fs::read(&fetched).unwrap_or_default(), String::from_utf8_lossy(&run.stderr).to_string())
        };
        let (code, body, said) = curl("first.crt", &[]);
        assert_eq!(code, Some(0), "curl over https: {said}");
        assert!(body == source, "the served bytes are the imported ones");
        let (code, body, said) = curl("first.crt", &["-r", "1000-1999"]);
        assert_eq!(code, Some(0), "a range over https: {said}");
        assert!(body == source[1000..2000]);
        // The certificate is the Secret's: another one is not trusted.
        let (code, _, _) = curl("renewed.crt", &[]);
        assert_eq!(code, Some(60), "curl refuses a certificate it does not trust (exit 60)");
        // No plaintext is served on the TLS port.
        let plain = url.replacen("https://", "http://", 1);
        let run = Command::new("curl").args(["-sS", "-f", "-m", "10", "-o", "/dev/null", &plain]).output().unwrap();
        assert!(!run.status.success(), "plain HTTP on the TLS port must not be served");

        // An unusable Secret keeps the certificate that works...
        let mut broken = tls("first.crt", "first.key");
        broken["data"]["tls.key"] = json!(BASE64.encode(b"not a key"));
        apply(&secrets, broken).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(curl("first.crt", &[]).0, Some(0), "a broken Secret leaves the previous certificate");
        // ...and a renewal (cert-manager rewriting the Secret) serves new connections.
        apply(&secrets, tls("renewed.crt", "renewed.key")).await;
        let deadline = std::time::Instant::now() + support::WAIT;
        while curl("renewed.crt", &[]).0 != Some(0) {
            assert!(std::time::Instant::now() < deadline, "the renewed certificate is never served");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let (code, body, _) = curl("renewed.crt", &[]);
        assert!(code == Some(0) && body == source);
        assert_eq!(curl("first.crt", &[]).0, Some(60), "the old certificate is no longer served");
        secrets.delete("ims-images-tls", &DeleteParams::default()).await.unwrap();
    }
}
