//! S3 regions through the real controllers, against a real S3 server: moto's (`moto_server`,
//! PyPI `moto[server]`), started here on 127.0.0.1 for each scenario.
//!
//! Without `moto_server` on PATH the scenarios that need it print why and return, unless
//! `IMS_REQUIRE_S3` is set (as `.ci/run` does), in which case they fail.

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ims_operator::{
    api::{Image, ImagePhase, Region, RegionStorage, SecretReference},
    store::{RegionStore, S3Credentials, StoreConfig},
};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{conditions::is_deleted, wait::Condition},
};
use object_store::ObjectStoreExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use support::Env;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The harness's operator namespace: Regions' secretRefs are resolved there.
const OPERATOR_NAMESPACE: &str = "ims-system";
const BUCKET: &str = "ims-images";
const ACCESS_KEY: &str = "ims-test-access";
const SECRET_KEY: &str = "ims-test-secret";

/// A `moto_server` child on 127.0.0.1, killed on drop.
struct Moto {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts moto, or says why not and returns None (fails instead when `IMS_REQUIRE_S3` is set).
    async fn start() -> Option<Moto> {
        let installed = Command::new("moto_server")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var_os("IMS_REQUIRE_S3").is_none(),
                "moto_server is required (IMS_REQUIRE_S3 is set) but was not found on PATH: pip install 'moto[server]'"
            );
            eprintln!("moto_server is not installed (pip install 'moto[server]'): skipping this S3 scenario");
            return None;
        }
        // A free port can be taken between the check and moto's bind: try a few.
        let mut last = String::new();
        for _ in 0..3 {
            let addr = free_addr();
            let child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn moto_server");
            let mut moto = Moto { child, addr };
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = moto.child.try_wait() {
                    last = format!("moto_server on {addr} exited with {status}");
                    break;
                }
                if http(addr, "GET", "/", b"").await.is_ok() {
                    return Some(moto);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if last.is_empty() {
                last = format!("moto_server on {addr} did not answer within 60s");
            }
        }
        panic!("could not start moto_server: {last}");
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(self.addr, "PUT", &format!("/{bucket}"), b"").await.expect("create bucket");
        assert_eq!(status, 200, "create bucket {bucket}: {}", String::from_utf8_lossy(&body));
    }

    /// Keys under `prefix`, listed by moto itself (ListObjects, path style).
    async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (status, body) =
            http(self.addr, "GET", &format!("/{bucket}?prefix={prefix}"), b"").await.expect("list objects");
        let body = String::from_utf8(body).expect("XML");
        assert_eq!(status, 200, "list {bucket}/{prefix}: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>"))
            .map(|(key, _)| key.to_string())
            .collect()
    }

    /// An object's bytes, read by a plain GET (not through object_store).
    async fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        let (status, body) = http(self.addr, "GET", &format!("/{bucket}/{key}"), b"").await.expect("get object");
        assert_eq!(status, 200, "get {bucket}/{key}: {}", String::from_utf8_lossy(&body));
        body
    }
}

/// One call of moto's KMS API (`TrentService.<target>`; moto checks no signature here): status
/// and JSON answer.
async fn kms(addr: SocketAddr, target: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let headers = format!(
        "X-Amz-Target: TrentService.{target}\r\nContent-Type: application/x-amz-json-1.1\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0\r\n"
    );
    let (status, answer) =
        http_with(addr, "POST", "/", &headers, body.to_string().as_bytes()).await.expect("a KMS answer");
    (status, serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null))
}

/// A port on 127.0.0.1 that nothing listens on (it was free a moment ago).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// One unauthenticated HTTP/1.0 exchange (no chunked answers; the server closes): (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    http_with(addr, method, path, "", body).await
}

/// [`http`] with more header lines (each ending in `\r\n`).
async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 30s"))??;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {:?}", String::from_utf8_lossy(&answer))))?;
    let status = std::str::from_utf8(&answer[..split])
        .ok()
        .and_then(|head| head.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status code"))?;
    Ok((status, answer[split + 4..].to_vec()))
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A Secret with S3 credentials in the operator's namespace (which is created if missing).
async fn credentials_secret(env: &Env, name: &str) {
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    if namespaces.get_opt(OPERATOR_NAMESPACE).await.unwrap().is_none() {
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(OPERATOR_NAMESPACE.into()), ..Default::default() },
            ..Default::default()
        };
        namespaces.create(&PostParams::default(), &ns).await.unwrap();
    }
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), OPERATOR_NAMESPACE);
    let data = BTreeMap::from([
        ("accessKeyID".to_string(), ByteString(ACCESS_KEY.into())),
        ("secretAccessKey".to_string(), ByteString(SECRET_KEY.into())),
    ]);
    let secret = Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(data),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &secret).await.unwrap();
}

async fn delete_secret(env: &Env, name: &str) {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), OPERATOR_NAMESPACE);
    let _ = secrets.delete(name, &DeleteParams::default()).await;
}

async fn s3_region(env: &Env, name: &str, url: &str, endpoint: &str, secret: &str) {
    let regions: Api<Region> = Api::all(env.client.clone());
    let region = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": name},
        "spec": {"storage": {"url": url, "endpoint": endpoint, "secretRef": {"name": secret}}}});
    regions.patch(name, &PatchParams::apply("test"), &Patch::Apply(region)).await.unwrap();
}

fn ready(region: Option<&Region>) -> Option<(String, String, String)> {
    let c = region?.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn has_ready(status: &'static str, reason: &'static str) -> impl Condition<Region> {
    move |r: Option<&Region>| ready(r).is_some_and(|(s, why, _)| s == status && why == reason)
}

fn image_reason(reason: &'static str) -> impl Condition<Image> {
    move |i: Option<&Image>| {
        i.and_then(|i| i.status.as_ref())
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.reason == reason)
    }
}

/// Non-zero pseudo-random bytes (xorshift64), so qemu-img keeps every cluster.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

scenarios! {
    async fn an_s3_region_is_ready_and_images_land_in_the_bucket_and_leave_it(env: &Env) {
        if !support::have_qemu_img() {
            return;
        }
        let Some(moto) = Moto::start().await else { return };
        moto.create_bucket(BUCKET).await;
        let ns = env.namespace("s3img").await;
        let region_name = format!("{ns}-s3");
        let secret_name = format!("{ns}-creds");
        credentials_secret(env, &secret_name).await;
        let url = format!("s3://{BUCKET}/regions/{region_name}");
        s3_region(env, &region_name, &url, &moto.endpoint(), &secret_name).await;

        // A qcow2 of 20 MiB of data: more than one 16 MiB multipart part.
        let files = tempfile::tempdir().unwrap();
        let raw = files.path().join("src.raw");
        std::fs::write(&raw, noise(20 * 1024 * 1024 + 7)).unwrap();
        let qcow2 = files.path().join("disk.qcow2");
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), qcow2.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let source = std::fs::read(&qcow2).unwrap();
        assert!(source.len() > 16 * 1024 * 1024, "the image spans two upload parts");
        let digest = hex_sha256(&source);
        let addr = support::serve_files(files.path().to_path_buf()).await;

        env.start_operator();
        let regions: Api<Region> = Api::all(env.client.clone());
        let r = env.wait_for(&regions, &region_name, has_ready("True", "StoreReady")).await.unwrap();
        assert_eq!(r.status.unwrap().images, Some(0));
        assert!(moto.keys(BUCKET, "").await.is_empty(), "the probe leaves nothing in the bucket");

        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let manifest = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": "disk"},
            "spec": {"region": region_name, "type": "DataDisk",
                     "source": {"url": {"url": format!("http://{addr}/disk.qcow2"), "checksum": format!("sha256:{digest}")}}}});
        images.patch("disk", &PatchParams::apply("test"), &Patch::Apply(manifest)).await.unwrap();
        let active = env.wait_for(&images, "disk", image_reason("Active")).await.unwrap();
        let uid = active.uid().unwrap();
        let status = active.status.unwrap();
        assert_eq!(status.phase, Some(ImagePhase::Active));
        assert_eq!(status.format.as_deref(), Some("Qcow2"));
        assert_eq!(status.size_bytes, Some(source.len() as i64));
        assert_eq!(status.checksum.unwrap().sha256, digest);
        let location = status.location.unwrap();
        let prefix = format!("regions/{region_name}/{ns}/disk/{uid}/");
        assert_eq!(location.checksum, format!("sha256:{digest}"));
        // The image server streams the object from the bucket, whole or a range (once the
        // operator's cache, which may lag this client's, has the image Active).
        let (code, _, served) = support::http_get_active(&location.url, &[]).await;
        assert_eq!(code, 200, "{}", location.url);
        assert!(served == source, "the image server serves the bucket's bytes");
        let (code, headers, part) = support::http_get(&location.url, &[("Range", "bytes=100-1099")]).await;
        assert_eq!((code, headers.get("content-range").and_then(|v| v.to_str().ok())), (206, Some(format!("bytes 100-1099/{}", source.len()).as_str())));
        assert!(part == source[100..1100]);

        // The bytes, as moto holds them.
        assert_eq!(moto.keys(BUCKET, &prefix).await, [format!("{prefix}disk")]);
        let stored = moto.object(BUCKET, &format!("{prefix}disk")).await;
        assert_eq!(stored.len(), source.len());
        assert_eq!(hex_sha256(&stored), digest, "the bucket holds the source's bytes");
        assert!(stored == source);

        // And through object_store, as the operator opens the store.
        let spec = RegionStorage {
            url: url.clone(),
            endpoint: Some(moto.endpoint()),
            secret_ref: Some(SecretReference { name: secret_name.clone() }),
            ..Default::default()
        };
        let creds = S3Credentials { access_key_id: ACCESS_KEY.into(), secret_access_key: SECRET_KEY.into() };
        let store = RegionStore::open(&spec, &StoreConfig::default(), Some(&creds)).unwrap();
        let listed = store.list(&store.image_prefix(&ns, "disk", &uid)).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1, source.len() as u64);
        assert_eq!(store.object_url(&listed[0].0), format!("s3://{BUCKET}/{prefix}disk"));
        let read = store.object_store().get(&listed[0].0).await.unwrap().bytes().await.unwrap();
        assert_eq!(hex_sha256(&read), digest);

        let counted = env
            .wait_for(&regions, &region_name, |r: Option<&Region>| {
                r.and_then(|r| r.status.as_ref()).is_some_and(|s| s.images == Some(1))
            })
            .await
            .unwrap();
        assert_eq!(counted.status.unwrap().bytes, Some(source.len() as i64));

        // Deleting the image removes its objects.
        images.delete("disk", &DeleteParams::default()).await.unwrap();
        env.wait_for(&images, "disk", is_deleted(&uid)).await;
        assert!(moto.keys(BUCKET, &prefix).await.is_empty(), "the deleted image's objects are gone");
        assert!(moto.keys(BUCKET, "").await.is_empty(), "nothing is left in the bucket");

        // A rotated Secret is used at once, not at the next periodic probe: one without the keys
        // makes the Ready region say so; putting them back makes it Ready again.
        let secrets: Api<Secret> = Api::namespaced(env.client.clone(), OPERATOR_NAMESPACE);
        let keys = |pairs: &[(&str, &str)]| Secret {
            metadata: ObjectMeta { name: Some(secret_name.clone()), ..Default::default() },
            data: Some(pairs.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()),
            ..Default::default()
        };
        let mut secret = secrets.get(&secret_name).await.unwrap();
        secret.data = keys(&[("accessKeyID", ACCESS_KEY)]).data;
        let secret = secrets.replace(&secret_name, &PostParams::default(), &secret).await.unwrap();
        let r = env.wait_for(&regions, &region_name, has_ready("False", "SecretNotFound")).await.unwrap();
        assert!(ready(Some(&r)).unwrap().2.contains("needs the keys accessKeyID and secretAccessKey"));
        let restored = Secret { data: keys(&[("accessKeyID", ACCESS_KEY), ("secretAccessKey", SECRET_KEY)]).data, ..secret };
        secrets.replace(&secret_name, &PostParams::default(), &restored).await.unwrap();
        env.wait_for(&regions, &region_name, has_ready("True", "StoreReady")).await;

        regions.delete(&region_name, &DeleteParams::default()).await.unwrap();
        delete_secret(env, &secret_name).await;
    }

    async fn an_s3_region_says_when_its_secret_or_endpoint_is_wrong(env: &Env) {
        // No moto needed: nothing answers on these endpoints.
        let ns = env.namespace("s3bad").await;
        let regions: Api<Region> = Api::all(env.client.clone());
        let closed = format!("http://{}", free_addr());
        let no_secret = format!("{ns}-nosecret");
        let unreachable = format!("{ns}-closed");
        let secret_name = format!("{ns}-creds");
        credentials_secret(env, &secret_name).await;
        // (Stores of their own: two Regions on one store are refused, StoreConflict.)
        s3_region(env, &no_secret, &format!("s3://images/{no_secret}"), &closed, &format!("{ns}-missing")).await;
        s3_region(env, &unreachable, &format!("s3://images/{unreachable}"), &closed, &secret_name).await;
        env.start_operator();

        let r = env.wait_for(&regions, &no_secret, has_ready("False", "SecretNotFound")).await.unwrap();
        let (_, _, message) = ready(Some(&r)).unwrap();
        assert_eq!(
            message,
            format!("Secret {OPERATOR_NAMESPACE}/{ns}-missing not found: create it with the keys accessKeyID and secretAccessKey")
        );
        assert!(r.status.unwrap().conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True"));

        let r = env.wait_for(&regions, &unreachable, has_ready("False", "StoreUnreachable")).await.unwrap();
        let (_, _, message) = ready(Some(&r)).unwrap();
        assert!(message.contains("the store failed a write/read/delete probe"), "{message}");
        assert!(r.status.unwrap().conditions.iter().all(|c| c.type_ != "Stalled"), "an unreachable store is retried, not stalled");

        // Creating the missing Secret is noticed: the region moves on to probing the store.
        credentials_secret(env, &format!("{ns}-missing")).await;
        env.wait_for(&regions, &no_secret, has_ready("False", "StoreUnreachable")).await;

        for name in [&no_secret, &unreachable] {
            regions.delete(name, &DeleteParams::default()).await.unwrap();
        }
        delete_secret(env, &secret_name).await;
        delete_secret(env, &format!("{ns}-missing")).await;
    }

    async fn an_aws_kms_region_stores_ciphertext_in_s3_and_a_removed_key_makes_its_image_unavailable(env: &Env) {
        let Some(moto) = Moto::start().await else { return };
        moto.create_bucket(BUCKET).await;
        let ns = env.namespace("kms").await;
        let (region_name, secret_name, alias) = (format!("{ns}-kms"), format!("{ns}-creds"), format!("alias/{ns}"));
        credentials_secret(env, &secret_name).await;
        let (code, created) = kms(moto.addr, "CreateKey", json!({"Description": "ims e2e"})).await;
        assert_eq!(code, 200, "{created}");
        let key_id = created["KeyMetadata"]["KeyId"].as_str().expect("a key id").to_string();
        let alias_to_key = json!({"AliasName": alias, "TargetKeyId": key_id});
        assert_eq!(kms(moto.addr, "CreateAlias", alias_to_key.clone()).await.0, 200);
        // The Region's KMS is moto's, with the S3 credentials.
        let regions: Api<Region> = Api::all(env.client.clone());
        let url = format!("s3://{BUCKET}/regions/{region_name}");
        let region = json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": region_name},
            "spec": {"storage": {"url": url, "endpoint": moto.endpoint(), "secretRef": {"name": secret_name}},
                "kms": {"provider": "AWS", "endpoint": moto.endpoint(), "secretRef": {"name": secret_name}}}});
        regions.patch(&region_name, &PatchParams::apply("test"), &Patch::Apply(region)).await.unwrap();
        let files = tempfile::tempdir().unwrap();
        let source = noise(3 * 1024 * 1024 + 5);
        std::fs::write(files.path().join("d.raw"), &source).unwrap();
        let addr = support::serve_files(files.path().to_path_buf()).await;
        env.start_operator();
        env.wait_for(&regions, &region_name, has_ready("True", "StoreReady")).await.unwrap();
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let image = |name: &str| json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
            "spec": {"region": region_name, "type": "DataDisk", "encryption": {"kmsKeyID": alias},
                "source": {"url": {"url": format!("http://{addr}/d.raw")}}}});
        images.patch("d", &PatchParams::apply("test"), &Patch::Apply(image("d"))).await.unwrap();
        let active = env.wait_for(&images, "d", image_reason("Active")).await.unwrap();
        assert_eq!(active.status.as_ref().unwrap().checksum.as_ref().unwrap().sha256, hex_sha256(&source));

        // The bucket holds ciphertext only, and the image server serves the plaintext.
        let keys = moto.keys(BUCKET, &format!("regions/{region_name}/{ns}/d/")).await;
        assert_eq!(keys.len(), 1, "{keys:?}");
        let stored = moto.object(BUCKET, &keys[0]).await;
        assert_eq!(stored.len() as u64, ims_operator::crypt::sealed_len(source.len() as u64));
        assert_eq!(support::shared_run(&stored, &source, 4096), None, "no 4 KiB run of the source in S3");
        let location = active.status.as_ref().unwrap().location.as_ref().unwrap().url.clone();
        let (code, _, body) = support::http_get_active(&location, &[]).await;
        assert!(code == 200 && body == source, "served decrypted from S3: {code}");
        let (code, _, part) = support::http_get(&location, &[("Range", "bytes=70000-1300000")]).await;
        assert!(code == 206 && part == source[70000..1300001]);

        // The key's alias deleted in the KMS: the image is Unavailable once checked (a touch
        // re-runs it; otherwise every 5 minutes), and a new import under it fails.
        let touch = |n: u32| json!({"metadata": {"annotations": {"test/touch": n.to_string()}}});
        assert_eq!(kms(moto.addr, "DeleteAlias", json!({"AliasName": alias})).await.0, 200);
        images.patch("d", &PatchParams::default(), &Patch::Merge(touch(1))).await.unwrap();
        let gone = env.wait_for(&images, "d", image_reason("KeyUnavailable")).await.unwrap();
        assert_eq!(gone.status.as_ref().unwrap().phase, Some(ImagePhase::Unavailable));
        assert_eq!(support::http_code_unavailable(&location).await, 404);
        images.patch("e", &PatchParams::apply("test"), &Patch::Apply(image("e"))).await.unwrap();
        let failed = env.wait_for(&images, "e", image_reason("KeyUnavailable")).await.unwrap();
        assert_eq!(failed.status.as_ref().unwrap().phase, Some(ImagePhase::Failed));
        assert!(moto.keys(BUCKET, &format!("regions/{region_name}/{ns}/e/")).await.is_empty(), "nothing stored");

        // The alias back: Active again, the same URL serving.
        assert_eq!(kms(moto.addr, "CreateAlias", alias_to_key).await.0, 200);
        images.patch("d", &PatchParams::default(), &Patch::Merge(touch(2))).await.unwrap();
        env.wait_for(&images, "d", image_reason("Active")).await.unwrap();
        assert!(support::http_get_active(&location, &[]).await.2 == source);
        for name in ["d", "e"] {
            images.delete(name, &DeleteParams::default()).await.unwrap();
        }
    }
}
