//! A corpus of bad inputs (issue 15), run through the real controllers on the embedded API and
//! (ignored, `IMS_E2E=1`) on a cluster: 225 cases, the same on both. Each case asserts what the
//! user sees (the API server's refusal, word for word, or the phase, the reason and the key part
//! of the message) and that nothing is left in any region store (`nothing_left`: every stored
//! file is an Active image's). A scenario runs the table of its class at once.
//!
//! | class | scenario | cases |
//! |---|---|---|
//! | malformed specs, refused by the API server in kube-apiserver's words | `malformed_specs` | 35 |
//! | lying and truncated qcow2 and vmdk (sparse, stream, text descriptor) files | `lying_qcow2_and_vmdk_files` | 30 |
//! | lying and truncated vhd, vhdx, vdi, iso and raw files; sources that lie about their length | `lying_vhd_vhdx_vdi_iso_and_raw_files` | 39 |
//! | SSRF spellings, userinfo tricks, redirects to refused addresses; `file://` where file imports are off (3) | `ssrf_spellings_and_redirects` | 46 |
//! | file-path escapes where file imports are allowed, under a root (16) and without one (5) | `file_path_escapes` | 21 |
//! | cross-tenant references, ImageCopies, copies and ImageShares, each against a missing image (no oracle) | `cross_tenant_attempts` | 21 |
//! | quota edge values: 0, 1, at the limit, i64::MAX, no slots; values the schema refuses (8) | `quota_edge_values` | 20 |
//! | deletions in every phase (a copy destination mid-copy is one waiting for its import slot) | `deletions_in_every_phase` | 13 |
//!
//! To add a case, add a row to its class's table (`cases` in the scenario): an image spec with
//! the phase, reason and message fragments it must show ([`case`], run by [`run_cases`]), or a
//! request the API server must refuse with its exact text ([`refused`], run by
//! [`run_refusals`]). A new class is a new scenario. Files a case imports are made in the
//! scenario's own directory (qemu-img and byte surgery) and served from 127.0.0.1.

mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use ims_operator::api::{CopyPhase, Image, ImageCopy, ImagePhase, ImageQuota, ImageShare, Region};
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    core::Status,
    runtime::conditions::is_deleted,
};
use serde_json::{Value, json};
use support::{Env, apply, reason_is, region, region_ready, stored_files};

// ---------------------------------------------------------------------------------------------
// What the user sees
// ---------------------------------------------------------------------------------------------

fn ready(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> (String, String) {
    conditions.iter().find(|c| c.type_ == "Ready").map(|c| (c.reason.clone(), c.message.clone())).unwrap_or_default()
}

/// An Image's phase, Ready reason and message.
fn seen(image: &Image) -> (Option<ImagePhase>, String, String) {
    let status = image.status.clone().unwrap_or_default();
    let (reason, _) = ready(&status.conditions);
    (status.phase, reason, status.message.unwrap_or_default())
}

fn stalled(image: &Image) -> bool {
    image.status.iter().flat_map(|s| s.conditions.iter()).any(|c| c.type_ == "Stalled" && c.status == "True")
}

/// An image case: the spec, and what the user must see.
struct Case {
    name: &'static str,
    spec: Value,
    phase: ImagePhase,
    reason: &'static str,
    says: Vec<String>,
}

fn case(name: &'static str, spec: Value, phase: ImagePhase, reason: &'static str, says: &[&str]) -> Case {
    Case { name, spec, phase, reason, says: says.iter().map(|s| s.to_string()).collect() }
}

fn manifest(name: &str, spec: &Value) -> Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image", "metadata": {"name": name}, "spec": spec})
}

/// The `os` of a system disk or server.
fn os() -> Value {
    json!({"type": "Linux", "distribution": "Debian", "version": "13", "architecture": "x86_64"})
}

/// A DataDisk importing `url`, with `extra` merged into `source.url` (checksum, format).
fn url_spec(region: &str, url: &str, extra: Value) -> Value {
    let mut source = json!({"url": url});
    for (k, v) in extra.as_object().unwrap() {
        source[k] = v.clone();
    }
    json!({"region": region, "type": "DataDisk", "source": {"url": source}})
}

/// Applies every case in `ns`, then checks each: phase, reason (and Stalled for a failure),
/// every fragment of the message, no location; and that no file of the case's image is in
/// `store` (a region's store directory).
async fn run_cases(env: &Env, ns: &str, store: &Path, cases: &[Case]) -> Vec<Image> {
    let images: Api<Image> = Api::namespaced(env.client.clone(), ns);
    for c in cases {
        apply(&images, manifest(c.name, &c.spec)).await;
    }
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for c in cases {
        let image = outcome(&images, c.name, c.reason).await;
        let (phase, reason, message) = seen(&image);
        if reason != c.reason {
            failures.push(format!("{}: {phase:?}/{reason}, want {:?}/{}: {message}", c.name, c.phase, c.reason));
            continue;
        }
        if phase != Some(c.phase) {
            failures.push(format!("{}: phase {phase:?}, want {:?}", c.name, c.phase));
        }
        if c.phase == ImagePhase::Failed && !stalled(&image) {
            failures.push(format!("{}: Failed but not Stalled", c.name));
        }
        for part in &c.says {
            if !message.contains(part.as_str()) {
                failures.push(format!("{}: the message does not say {part:?}: {message}", c.name));
            }
        }
        if image.status.as_ref().is_some_and(|s| s.location.is_some()) {
            failures.push(format!("{}: has a location", c.name));
        }
        let left = files_of(store, ns, c.name);
        if !left.is_empty() {
            failures.push(format!("{}: bytes left in the store: {left:?}", c.name));
        }
        out.push(image);
    }
    assert!(failures.is_empty(), "{} failures in {} cases:\n{}", failures.len(), cases.len(), failures.join("\n"));
    out
}

/// The image once its Ready reason is `reason`, or once it settled otherwise (Active, Failed,
/// Unavailable), or as it is after [`support::WAIT`]: a case that goes wrong says how.
async fn outcome(images: &Api<Image>, name: &str, reason: &'static str) -> Image {
    let settled = move |i: Option<&Image>| {
        i.is_some_and(|i| {
            let (phase, now, _) = seen(i);
            now == reason || matches!(phase, Some(ImagePhase::Active | ImagePhase::Failed | ImagePhase::Unavailable))
        })
    };
    let wait = kube::runtime::wait::await_condition(images.clone(), name, settled);
    match tokio::time::timeout(support::WAIT, wait).await {
        Ok(Ok(Some(image))) => image,
        _ => images.get(name).await.expect("the case's image"),
    }
}

/// Asserts that every file in the stores of `regions` is the bytes of an Active image: an
/// object `<namespace>/<name>/<uid>/disk` (or `disk-<n>`) of an image that exists with that uid
/// and is Active. Anything else (a staging file, a failed or deleted image's bytes) is left
/// behind.
async fn nothing_left(env: &Env, regions: &[&str]) {
    let mut left = Vec::new();
    for region in regions {
        let dir = env.region_dir(region);
        for file in stored_files(&dir) {
            let parts: Vec<String> = file
                .strip_prefix(&dir)
                .unwrap()
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let object = |o: &str| o == "disk" || o.strip_prefix("disk-").is_some_and(|n| n.parse::<u32>().is_ok());
            let owner = match parts.as_slice() {
                [ns, name, uid, o] if object(o) => Api::<Image>::namespaced(env.client.clone(), ns)
                    .get_opt(name)
                    .await
                    .unwrap()
                    .filter(|i| i.uid().as_deref() == Some(uid.as_str()) && seen(i).0 == Some(ImagePhase::Active)),
                _ => None,
            };
            if owner.is_none() {
                left.push(file);
            }
        }
    }
    assert!(left.is_empty(), "bytes left behind in the stores: {left:?}");
}

/// The files of image `name` of `namespace` in a region store (`<store>/<ns>/<name>/<uid>/...`).
fn files_of(store: &Path, namespace: &str, name: &str) -> Vec<std::path::PathBuf> {
    stored_files(&store.join(namespace).join(name))
}

fn refusal<T: std::fmt::Debug>(what: &str, result: kube::Result<T>) -> Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("{what}: expected a refusal by the API server, got {other:?}"),
    }
}

/// A purpose-built HTTP/1.1 answer: `status`, an optional `Location`, the `Content-Length` it
/// announces (the body's by default), and the body (sent, then the connection closes).
#[derive(Clone, Default)]
struct Reply {
    status: u16,
    location: Option<String>,
    announce: Option<u64>,
    body: Vec<u8>,
}

fn redirect(to: &str) -> Reply {
    Reply { status: 302, location: Some(to.to_string()), ..Default::default() }
}

fn body(bytes: Vec<u8>) -> Reply {
    Reply { status: 200, body: bytes, ..Default::default() }
}

/// Serves `routes` (path without the leading `/` -> reply) on `bind`; other paths answer 404.
/// Counts the connections it accepts.
async fn serve(bind: &str, routes: HashMap<String, Reply>) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let routes = Arc::new(routes);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let routes = routes.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let line = String::from_utf8_lossy(&request).lines().next().unwrap_or_default().to_string();
                let path = line.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
                let reply = routes.get(&path).cloned().unwrap_or(Reply { status: 404, ..Default::default() });
                let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", reply.status);
                if let Some(location) = &reply.location {
                    head.push_str(&format!("Location: {location}\r\n"));
                }
                head.push_str(&format!(
                    "Content-Length: {}\r\n\r\n",
                    reply.announce.unwrap_or(reply.body.len() as u64)
                ));
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&reply.body).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, hits)
}

/// A source that sends its headers and `half` bytes of a larger body, then holds the
/// connection open: an import that stays Saving.
async fn held_source(half: usize) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", half * 2);
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&vec![5u8; half]).await;
                // Held until the importer goes away.
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    addr
}

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img").current_dir(dir).args(args).output().expect("qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A directory holding `d.raw`, `size` bytes of `byte`, served from 127.0.0.1.
async fn serve_one(byte: u8, size: usize) -> (SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.raw"), vec![byte; size]).unwrap();
    (support::serve_files(dir.path().to_path_buf()).await, dir)
}

/// `bytes` with `value` written at `offset`.
fn patched(bytes: &[u8], offset: usize, value: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[offset..offset + value.len()].copy_from_slice(value);
    b
}

/// 3 MiB of non-zero data (every cluster of a converted image is allocated).
fn data() -> Vec<u8> {
    (0..3 << 20).map(|i: u32| ((i / 512) as u8).wrapping_mul(7) | 1).collect()
}

/// An Api of `kind` (an ims.io kind) for raw JSON: what kubectl sends, typed or not.
fn dynamic(env: &Env, kind: &str, ns: &str) -> Api<DynamicObject> {
    let resource = match kind {
        "Image" => ApiResource::erase::<Image>(&()),
        "ImageShare" => ApiResource::erase::<ImageShare>(&()),
        "ImageCopy" => ApiResource::erase::<ImageCopy>(&()),
        "ImageQuota" => ApiResource::erase::<ImageQuota>(&()),
        "Region" => return Api::all_with(env.client.clone(), &ApiResource::erase::<Region>(&())),
        other => panic!("no kind {other}"),
    };
    Api::namespaced_with(env.client.clone(), ns, &resource)
}

/// A request the API server must refuse: created as `object` (or, with `change`, `object`
/// created and then merge-patched with `change`), refused with exactly `says`.
struct Refused {
    what: &'static str,
    object: Value,
    change: Option<Value>,
    says: String,
}

fn refused(what: &'static str, object: Value, change: Option<Value>, says: &str) -> Refused {
    Refused { what, object, change, says: says.to_string() }
}

/// Sends every request and compares the refusal with the expected text (422 Invalid), and
/// checks that a refused create left no object behind.
async fn run_refusals(env: &Env, ns: &str, cases: &[Refused]) {
    let mut failures = Vec::new();
    for c in cases {
        let kind = c.object["kind"].as_str().unwrap();
        let name = c.object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let api = dynamic(env, kind, ns);
        let object: DynamicObject = serde_json::from_value(c.object.clone()).unwrap();
        let result = match &c.change {
            None => api.create(&PostParams::default(), &object).await,
            Some(change) => {
                api.create(&PostParams::default(), &object)
                    .await
                    .unwrap_or_else(|e| panic!("{}: the object before the change: {e}", c.what));
                api.patch(&name, &PatchParams::default(), &Patch::Merge(change)).await
            }
        };
        let status = refusal(c.what, result);
        if (status.code, status.reason.as_str(), status.message.as_str()) != (422, "Invalid", c.says.as_str()) {
            failures.push(format!(
                "{}:\n  got  {} {} {:?}\n  want 422 Invalid {:?}",
                c.what, status.code, status.reason, status.message, c.says
            ));
        }
        if c.change.is_none() && !name.is_empty() && api.get_opt(&name).await.unwrap().is_some() {
            failures.push(format!("{}: the refused object exists", c.what));
        }
    }
    assert!(failures.is_empty(), "{} of {} refusals differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

const NOT_CHECKED: &str = "<nil>: Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation";

fn object(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "ims.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec})
}

/// `base` with `changes` (dotted paths; `Value::Null` removes the key) applied.
fn with(base: &Value, changes: &[(&str, Value)]) -> Value {
    let mut obj = base.clone();
    for (path, value) in changes {
        let parts: Vec<&str> = path.split('.').collect();
        let mut cur = &mut obj;
        for p in &parts[..parts.len() - 1] {
            cur = cur.as_object_mut().unwrap().entry(p.to_string()).or_insert_with(|| json!({}));
        }
        let last = parts[parts.len() - 1].to_string();
        match value {
            Value::Null => {
                cur.as_object_mut().unwrap().remove(&last);
            }
            v => {
                cur[last] = v.clone();
            }
        }
    }
    obj
}

/// `Kind.ims.io "name" is invalid: ...` as kube-apiserver words it: one error as it is, more
/// in brackets.
fn invalid(kind: &str, name: &str, errors: &[&str]) -> String {
    match errors {
        [one] => format!("{kind}.ims.io \"{name}\" is invalid: {one}"),
        many => format!("{kind}.ims.io \"{name}\" is invalid: [{}]", many.join(", ")),
    }
}

scenarios! {
    async fn malformed_specs(env: &Env) {
        let ns = env.namespace("malformed").await;
        let r = format!("{ns}-r");
        region(env, &r).await;
        env.start_operator();
        let url = "https://images.example.com/disk.raw";
        let disk = object("Image", "x", json!({"region": r, "type": "DataDisk", "source": {"url": {"url": url}}}));
        let img = |name: &str, changes: &[(&str, Value)]| with(&with(&disk, &[("metadata.name", json!(name))]), changes);
        let os = os();
        let disks = |n: usize| -> Value { json!((0..n).map(|i| json!({"role": if i == 0 { "System" } else { "Data" }, "url": url})).collect::<Vec<_>>()) };
        let reference = |name: &str| object("Image", name, json!({"region": r, "source": {"image": {"namespace": "someone", "name": "base"}}}));
        let share = |name: &str, tenants: Value| object("ImageShare", name, json!({"image": "base", "tenants": tenants}));
        let copy = |name: &str| object("ImageCopy", name, json!({"source": "base", "destination": {"region": r, "name": "base-2"}}));
        let many: Vec<String> = (0..129).map(|i| format!("t{i}")).collect();
        let sha = format!("sha256:{}", "ab".repeat(32));
        let cases = vec![
            refused("unknown type", img("m-type", &[("spec.type", json!("Floppy"))]), None,
                &invalid("Image", "m-type", &[r#"spec.type: Unsupported value: "Floppy": supported values: "SystemDisk", "DataDisk", "FullServer", "ISO""#, NOT_CHECKED])),
            refused("unknown visibility", img("m-vis", &[("spec.visibility", json!("Secret"))]), None,
                &invalid("Image", "m-vis", &[r#"spec.visibility: Unsupported value: "Secret": supported values: "Private", "Public", "Marketplace""#, NOT_CHECKED])),
            refused("unknown format", img("m-format", &[("spec.source.url.format", json!("Iso9660"))]), None,
                &invalid("Image", "m-format", &[r#"spec.source.url.format: Unsupported value: "Iso9660": supported values: "Auto", "Raw", "Qcow2", "Vmdk", "Vhd", "Vhdx", "Vdi", "Iso""#, NOT_CHECKED])),
            refused("two sources", img("m-two", &[("spec.source.copy", json!({"name": "other"}))]), None,
                &invalid("Image", "m-two", &["spec.source: Invalid value: exactly one of source.url, source.disks, source.image, source.copy, source.volume, source.volumeSnapshot or source.virtualMachine must be set"])),
            refused("no source", img("m-none", &[("spec.source", json!({"url": null}))]), None,
                &invalid("Image", "m-none", &["spec.source: Invalid value: exactly one of source.url, source.disks, source.image, source.copy, source.volume, source.volumeSnapshot or source.virtualMachine must be set"])),
            refused("a system disk without os", img("m-os", &[("spec.type", json!("SystemDisk"))]), None,
                &invalid("Image", "m-os", &["spec.os: Invalid value: os is required for SystemDisk and FullServer images: set spec.os (type, distribution, version, architecture)"])),
            refused("disks on a data disk", img("m-disks", &[("spec.source", json!({"disks": disks(1)}))]), None,
                &invalid("Image", "m-disks", &["spec.source.disks: Invalid value: source.disks is only for FullServer images: use source.url for a single disk, or set type: FullServer"])),
            refused("two system disks", img("m-systems", &[("spec.type", json!("FullServer")), ("spec.os", os.clone()), ("spec.source", json!({"disks": [{"role": "System", "url": url}, {"role": "System", "url": url}]}))]), None,
                &invalid("Image", "m-systems", &["spec.source.disks: Invalid value: a FullServer image needs exactly one disk with role System"])),
            refused("25 disks", img("m-25", &[("spec.type", json!("FullServer")), ("spec.os", os.clone()), ("spec.source", json!({"disks": disks(25)}))]), None,
                &invalid("Image", "m-25", &["spec.source.disks: Too many: 25: must have at most 24 items", NOT_CHECKED])),
            refused("an md5 checksum", img("m-md5", &[("spec.source.url.checksum", json!("md5:d41d8cd98f00b204e9800998ecf8427e"))]), None,
                &invalid("Image", "m-md5", &[r#"spec.source.url.checksum: Invalid value: "md5:d41d8cd98f00b204e9800998ecf8427e": spec.source.url.checksum in body should match '^(sha256:[0-9a-fA-F]{64}|sha512:[0-9a-fA-F]{128})$'"#])),
            refused("a short sha256", img("m-sha", &[("spec.source.url.checksum", json!("sha256:abc"))]), None,
                &invalid("Image", "m-sha", &[r#"spec.source.url.checksum: Invalid value: "sha256:abc": spec.source.url.checksum in body should match '^(sha256:[0-9a-fA-F]{64}|sha512:[0-9a-fA-F]{128})$'"#])),
            refused("an ftp URL", img("m-ftp", &[("spec.source.url.url", json!("ftp://images.example.com/d.raw"))]), None,
                &invalid("Image", "m-ftp", &[r#"spec.source.url.url: Invalid value: "ftp://images.example.com/d.raw": spec.source.url.url in body should match '^(https?|file)://.+$'"#])),
            refused("a gopher URL", img("m-gopher", &[("spec.source.url.url", json!("gopher://127.0.0.1:6379/_FLUSHALL"))]), None,
                &invalid("Image", "m-gopher", &[r#"spec.source.url.url: Invalid value: "gopher://127.0.0.1:6379/_FLUSHALL": spec.source.url.url in body should match '^(https?|file)://.+$'"#])),
            refused("a URL without a scheme", img("m-noscheme", &[("spec.source.url.url", json!("images.example.com/d.raw"))]), None,
                &invalid("Image", "m-noscheme", &[r#"spec.source.url.url: Invalid value: "images.example.com/d.raw": spec.source.url.url in body should match '^(https?|file)://.+$'"#])),
            refused("a URL of 2049 characters", img("m-long", &[("spec.source.url.url", json!(format!("https://e.com/{}", "a".repeat(2035))))]), None,
                &invalid("Image", "m-long", &["spec.source.url.url: Too long: may not be more than 2048 bytes", NOT_CHECKED])),
            refused("a description of 1025 characters", img("m-desc", &[("spec.description", json!("d".repeat(1025)))]), None,
                &invalid("Image", "m-desc", &["spec.description: Too long: may not be more than 1024 bytes", NOT_CHECKED])),
            refused("11 tags", img("m-tags", &[("spec.tags", json!((0..11).map(|i| format!("t{i}")).collect::<Vec<_>>()))]), None,
                &invalid("Image", "m-tags", &["spec.tags: Too many: 11: must have at most 10 items", NOT_CHECKED])),
            refused("a duplicate tag", img("m-dup", &[("spec.tags", json!(["a", "b", "a"]))]), None,
                &invalid("Image", "m-dup", &[r#"spec.tags[2]: Duplicate value: "a""#])),
            refused("minDiskGiB 0", img("m-min", &[("spec.minDiskGiB", json!(0))]), None,
                &invalid("Image", "m-min", &["spec.minDiskGiB: Invalid value: 0: spec.minDiskGiB in body should be greater than or equal to 1"])),
            refused("minDiskGiB as a string", img("m-str", &[("spec.minDiskGiB", json!("10"))]), None,
                &invalid("Image", "m-str", &[r#"spec.minDiskGiB: Invalid value: "string": spec.minDiskGiB in body must be of type integer: "string""#, NOT_CHECKED])),
            refused("minDiskGiB as a fraction", img("m-frac", &[("spec.minDiskGiB", json!(1.5))]), None,
                &invalid("Image", "m-frac", &[r#"spec.minDiskGiB: Invalid value: "float64": spec.minDiskGiB in body must be of type int64: "float64""#,
                    r#"<nil>: Invalid value: "": Checked value must be of type integer with format int64 in spec.minDiskGiB"#, NOT_CHECKED])),
            refused("minMemoryMiB beyond int64", img("m-huge", &[("spec.minMemoryMiB", json!(1e19))]), None,
                &invalid("Image", "m-huge", &[r#"spec.minMemoryMiB: Invalid value: "float64": spec.minMemoryMiB in body must be of type int64: "float64""#,
                    r#"<nil>: Invalid value: "": Checked value must be of type integer with format int64 in spec.minMemoryMiB"#,
                    "spec.minMemoryMiB: Invalid value: 1e+19: spec.minMemoryMiB in body should be less than or equal to 1.6777216e+07", NOT_CHECKED])),
            refused("an empty region", img("m-region", &[("spec.region", json!(""))]), None,
                &invalid("Image", "m-region", &[r#"spec.region: Invalid value: "": spec.region in body should be at least 1 chars long"#])),
            refused("a name that is no DNS subdomain", img("M_Bad", &[]), None,
                &invalid("Image", "M_Bad", &[r#"metadata.name: Invalid value: "M_Bad": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"#])),
            refused("a reference to a bad namespace name", with(&reference("m-refns"), &[("spec.source.image.namespace", json!("Other_NS"))]), None,
                &invalid("Image", "m-refns", &[r#"spec.source.image.namespace: Invalid value: "Other_NS": spec.source.image.namespace in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"#])),
            refused("a good checksum on a bad URL", img("m-both", &[("spec.source.url.checksum", json!(sha)), ("spec.source.url.url", json!("ssh://h/d"))]), None,
                &invalid("Image", "m-both", &[r#"spec.source.url.url: Invalid value: "ssh://h/d": spec.source.url.url in body should match '^(https?|file)://.+$'"#])),
            refused("the region changed", img("m-move", &[]), Some(json!({"spec": {"region": format!("{r}-b")}})),
                &invalid("Image", "m-move", &[&format!(r#"spec.region: Invalid value: "{r}-b": region is immutable: use an ImageCopy to put the image in another region"#)])),
            refused("the type changed", img("m-retype", &[]), Some(json!({"spec": {"type": "ISO"}})),
                &invalid("Image", "m-retype", &[r#"spec.type: Invalid value: "ISO": type is immutable: create a new Image"#])),
            refused("the kind of source changed", img("m-resource", &[]), Some(json!({"spec": {"source": {"url": null, "copy": {"name": "other"}}}})),
                &invalid("Image", "m-resource", &["spec.source: Invalid value: the kind of source (url, disks, image, copy, volume, volumeSnapshot or virtualMachine) is immutable: create a new Image instead"])),
            refused("a reference retargeted", reference("m-retarget"), Some(json!({"spec": {"source": {"image": {"name": "other"}}}})),
                &invalid("Image", "m-retarget", &["spec.source.image: Invalid value: source.image is immutable: a reference stays bound to the image it names; create another reference for another image"])),
            refused("a share with no tenant", share("s-none", json!([])), None,
                &invalid("ImageShare", "s-none", &["spec.tenants: Invalid value: 0: spec.tenants in body should have at least 1 items"])),
            refused("a share with 129 tenants", share("s-many", json!(many)), None,
                &invalid("ImageShare", "s-many", &["spec.tenants: Too many: 129: must have at most 128 items", NOT_CHECKED])),
            refused("a share naming a tenant twice", share("s-dup", json!(["a", "b", "a"])), None,
                &invalid("ImageShare", "s-dup", &[r#"spec.tenants[2]: Duplicate value: "a""#])),
            refused("a share of another image", share("s-move", json!(["a"])), Some(json!({"spec": {"image": "other"}})),
                &invalid("ImageShare", "s-move", &[r#"spec.image: Invalid value: "other": image is immutable: create another ImageShare to share another image"#])),
            refused("a copy changed", copy("c-move"), Some(json!({"spec": {"destination": {"name": "elsewhere"}}})),
                &invalid("ImageCopy", "c-move", &["spec: Invalid value: an ImageCopy is immutable: delete it and create a new one"])),
        ];
        run_refusals(env, &ns, &cases).await;
        // The objects that were created before a refused change are still as they were, and
        // nothing moved bytes for a refused object.
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        assert_eq!(images.get("m-move").await.unwrap().spec.region, r);
        nothing_left(env, &[&r]).await;
    }

    async fn lying_qcow2_and_vmdk_files(env: &Env) {
        if !support::have_qemu_img() {
            return;
        }
        let ns = env.namespace("qcow-vmdk").await;
        let r = format!("{ns}-r");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("data.raw"), data()).unwrap();
        for args in [
            &["convert", "-f", "raw", "-O", "qcow2", "data.raw", "d.qcow2"][..],
            &["create", "-f", "qcow2", "-b", "d.qcow2", "-F", "qcow2", "child.qcow2"],
            &["convert", "-f", "raw", "-O", "vmdk", "data.raw", "d.vmdk"],
            &["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", "data.raw", "stream.vmdk"],
            &["create", "-f", "vmdk", "-b", "d.vmdk", "-F", "vmdk", "child.vmdk"],
            &["create", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "1M"],
            &["create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "split.vmdk", "1M"],
        ] {
            qemu_img(d, args);
        }
        let q = std::fs::read(d.join("d.qcow2")).unwrap();
        let v = std::fs::read(d.join("d.vmdk")).unwrap();
        let stream = std::fs::read(d.join("stream.vmdk")).unwrap();
        let incompatible = |bit: u64| patched(&q, 72, &(u64::from_be_bytes(q[72..80].try_into().unwrap()) | bit).to_be_bytes());
        let lies: Vec<(&str, Vec<u8>)> = vec![
            ("q-head.qcow2", q[..40].to_vec()),
            ("q-half.qcow2", q[..q.len() / 2].to_vec()),
            ("q-huge.qcow2", patched(&q, 24, &(1u64 << 60).to_be_bytes())),
            ("q-overflow.qcow2", patched(&q, 24, &u64::MAX.to_be_bytes())),
            ("q-v4.qcow2", patched(&q, 4, &4u32.to_be_bytes())),
            ("q-v1.qcow2", patched(&q, 4, &1u32.to_be_bytes())),
            ("q-aes.qcow2", patched(&q, 32, &1u32.to_be_bytes())),
            ("q-luks.qcow2", patched(&q, 32, &2u32.to_be_bytes())),
            ("q-datafile.qcow2", incompatible(1 << 2)),
            ("q-corrupt.qcow2", incompatible(1 << 1)),
            ("q-unknown.qcow2", incompatible(1 << 10)),
            ("q-cluster.qcow2", patched(&q, 20, &30u32.to_be_bytes())),
            ("q-magic.qcow2", [b"QFI\xfb".as_slice(), &[0u8; 8192]].concat()),
            ("q-l1.qcow2", patched(&q, 40, &((q.len() as u64 / 65536 + 16) * 65536).to_be_bytes())),
            ("v-head.vmdk", v[..50].to_vec()),
            ("v-4k.vmdk", v[..4096].to_vec()),
            ("v-capacity.vmdk", patched(&v, 12, &(1u64 << 60).to_le_bytes())),
            ("v-grain.vmdk", patched(&v, 20, &0u64.to_le_bytes())),
            ("v-gtes.vmdk", patched(&v, 44, &100_000u32.to_le_bytes())),
            ("v-version.vmdk", patched(&v, 4, &9u32.to_le_bytes())),
            ("v-stream-half.vmdk", stream[..stream.len() / 2].to_vec()),
            ("v-half.vmdk", v[..v.len() / 2].to_vec()),
            ("v-cowd.vmdk", [b"COWD".as_slice(), &[0u8; 4092]].concat()),
        ];
        for (name, bytes) in &lies {
            std::fs::write(d.join(name), bytes).unwrap();
        }
        let addr = support::serve_files(d.to_path_buf()).await;
        region(env, &r).await;
        env.start_operator();
        let u = |file: &str| format!("http://{addr}/{file}");
        let bad = |name: &'static str, file: &str, says: &[&str]| {
            case(name, url_spec(&r, &u(file), json!({})), ImagePhase::Failed, "UnsupportedFormat", says)
        };
        let declared = |name: &'static str, file: &str, format: &str, says: &[&str]| {
            case(name, url_spec(&r, &u(file), json!({"format": format})), ImagePhase::Failed, "UnsupportedFormat", says)
        };
        let cases = vec![
            bad("q-head", "q-head.qcow2", &["qcow2 header is truncated: the file is 40 bytes, the header needs 104", "upload the whole file again"]),
            bad("q-half", "q-half.qcow2", &["qcow2 image is truncated", "upload the whole file again"]),
            bad("q-huge", "q-huge.qcow2", &["qcow2 L1 table has", "entries, the virtual size 1152921504606846976 bytes", "the image is damaged"]),
            bad("q-overflow", "q-overflow.qcow2", &["qcow2 virtual size 18446744073709551615 is too large"]),
            bad("q-v4", "q-v4.qcow2", &["qcow2 version 4 is not supported"]),
            bad("q-v1", "q-v1.qcow2", &["qcow (version 1) image", "qemu-img convert -O qcow2"]),
            bad("q-aes", "q-aes.qcow2", &["encrypted qcow2 images (AES) are not supported"]),
            bad("q-luks", "q-luks.qcow2", &["encrypted qcow2 images (LUKS) are not supported"]),
            bad("q-backing", "child.qcow2", &["qcow2 images with a backing file are not self-contained (this one refers to \"d.qcow2\")"]),
            bad("q-datafile", "q-datafile.qcow2", &["qcow2 images with an external data file are not self-contained"]),
            bad("q-corrupt", "q-corrupt.qcow2", &["the qcow2 image is marked corrupt"]),
            bad("q-unknown", "q-unknown.qcow2", &["incompatible features this importer does not know (bits 0x400)"]),
            bad("q-cluster", "q-cluster.qcow2", &["qcow2 cluster_bits is 30, it must be between 9 and 21"]),
            bad("q-magic", "q-magic.qcow2", &["qcow2 version 0 is not supported"]),
            bad("q-l1", "q-l1.qcow2", &["qcow2 L1 table is truncated"]),
            declared("q-as-raw", "d.qcow2", "Raw", &["spec declares format Raw but the bytes are Qcow2: set format to Qcow2 (or Auto)"]),
            declared("q-as-vmdk", "d.qcow2", "Vmdk", &["spec declares format Vmdk but the bytes are Qcow2"]),
            bad("v-head", "v-head.vmdk", &["vmdk header is truncated: the file is 50 bytes, the header needs 79"]),
            bad("v-4k", "v-4k.vmdk", &["vmdk image is truncated: the file is 4096 bytes, its data starts at sector"]),
            bad("v-capacity", "v-capacity.vmdk", &["vmdk capacity of 1152921504606846976 sectors needs a grain directory larger than qemu accepts"]),
            bad("v-grain", "v-grain.vmdk", &["vmdk grain size or grain table size is zero"]),
            bad("v-gtes", "v-gtes.vmdk", &["vmdk grain tables have 100000 entries, at most 512 are valid"]),
            bad("v-version", "v-version.vmdk", &["vmdk sparse extent version 9 is not supported"]),
            bad("v-stream-half", "v-stream-half.vmdk", &["vmdk image is truncated", "upload the whole file again"]),
            bad("v-half", "v-half.vmdk", &["vmdk image is truncated", "upload the whole file again"]),
            bad("v-parent", "child.vmdk", &["vmdk images with a parent (backing) file are not self-contained (this one refers to \"d.vmdk\")"]),
            bad("v-flat", "flat.vmdk", &["this is a vmdk descriptor that refers to separate extent files (createType \"monolithicFlat\")"]),
            bad("v-split", "split.vmdk", &["(createType \"twoGbMaxExtentSparse\")"]),
            bad("v-cowd", "v-cowd.vmdk", &["VMware 3 / ESX (COWD) sparse vmdk"]),
            declared("v-as-qcow2", "d.vmdk", "Qcow2", &["spec declares format Qcow2 but the bytes are Vmdk"]),
        ];
        run_cases(env, &ns, &env.region_dir(&r), &cases).await;
        nothing_left(env, &[&r]).await;
    }

    async fn lying_vhd_vhdx_vdi_iso_and_raw_files(env: &Env) {
        if !support::have_qemu_img() {
            return;
        }
        let ns = env.namespace("vhd-iso").await;
        let (r, small) = (format!("{ns}-r"), format!("{ns}-small"));
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let raw = data();
        std::fs::write(d.join("data.raw"), &raw).unwrap();
        for args in [
            &["convert", "-f", "raw", "-O", "vpc", "data.raw", "d.vhd"][..],
            &["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", "data.raw", "fixed.vhd"],
            &["convert", "-f", "raw", "-O", "vhdx", "data.raw", "d.vhdx"],
            &["convert", "-f", "raw", "-O", "vdi", "data.raw", "d.vdi"],
            &["convert", "-f", "raw", "-O", "qcow2", "data.raw", "d.qcow2"],
            &["create", "-f", "qcow2", "-b", "d.qcow2", "-F", "qcow2", "child.qcow2"],
        ] {
            qemu_img(d, args);
        }
        let vhd = std::fs::read(d.join("d.vhd")).unwrap();
        let vhdx = std::fs::read(d.join("d.vhdx")).unwrap();
        let vdi = std::fs::read(d.join("d.vdi")).unwrap();
        let iso = ims_operator::format::sample::iso(64, true);
        std::fs::write(d.join("d.iso"), &iso).unwrap();
        // The footer copy at the start of a dynamic VHD, with `value` at `offset` and its
        // checksum made right again: a header that lies consistently.
        let vhd_lie = |offset: usize, value: &[u8]| {
            let mut b = patched(&vhd, offset, value);
            b[64..68].fill(0);
            let sum = b[..512].iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
            b[64..68].copy_from_slice(&(!sum).to_be_bytes());
            b
        };
        const K: usize = 1024;
        let pvd = 17 * 2048;
        let both32 = |v: u32| [v.to_le_bytes(), v.to_be_bytes()].concat();
        let both16 = |v: u16| [v.to_le_bytes(), v.to_be_bytes()].concat();
        let lies: Vec<(&str, Vec<u8>)> = vec![
            ("h-half.vhd", vhd[..vhd.len() / 2].to_vec()),
            ("h-sum.vhd", patched(&vhd, 40, &[0xff])),
            ("h-huge.vhd", vhd_lie(28, &[b"win ".as_slice(), &[0u8; 16], &(4u64 << 40).to_be_bytes()].concat())),
            ("h-diff.vhd", vhd_lie(60, &4u32.to_be_bytes())),
            ("h-type.vhd", vhd_lie(60, &9u32.to_be_bytes())),
            ("h-sparse.vhd", patched(&vhd, 512, b"xxsparse")),
            ("h-tail.vhd", [vec![0x11u8; 8192], vhd[..512].to_vec()].concat()),
            ("x-100k.vhdx", vhdx[..100 * K].to_vec()),
            ("x-heads.vhdx", patched(&patched(&vhdx, 64 * K, b"xxxx"), 128 * K, b"xxxx")),
            ("x-regions.vhdx", patched(&patched(&vhdx, 192 * K + 20, &[0xff]), 256 * K + 20, &[0xff])),
            ("x-half.vhdx", vhdx[..vhdx.len() / 2].to_vec()),
            ("i-head.vdi", vdi[..300].to_vec()),
            ("i-version.vdi", patched(&vdi, 68, &0x0002_0000u32.to_le_bytes())),
            ("i-huge.vdi", patched(&vdi, 368, &(1u64 << 50).to_le_bytes())),
            ("i-parent.vdi", patched(&vdi, 440, &[1u8; 16])),
            ("i-cut.vdi", vdi[..vdi.len() - (1 << 20)].to_vec()),
            ("i-block.vdi", patched(&vdi, 376, &4096u32.to_le_bytes())),
            ("i-undo.vdi", patched(&vdi, 76, &3u32.to_le_bytes())),
            ("o-cut.iso", iso[..40_000].to_vec()),
            ("o-huge.iso", patched(&iso, pvd + 80, &both32(0x7fff_ffff))),
            ("o-endian.iso", patched(&iso, pvd + 80, &65u32.to_le_bytes())),
            ("o-nopvd.iso", patched(&iso, pvd, &[2])),
            ("o-block.iso", patched(&iso, pvd + 128, &both16(100))),
            ("o-zero.iso", patched(&iso, pvd + 80, &both32(0))),
            ("empty.raw", Vec::new()),
            ("descriptor.raw", b"# Disk DescriptorFile\nversion=1\ncreateType=\"vmfs\"\n".to_vec()),
            ("qed.raw", [b"QEF\0".as_slice(), &[0u8; 4092]].concat()),
            ("luks.raw", [b"LUKS\xba\xbe".as_slice(), &[0u8; 4090]].concat()),
            ("parallels.raw", [b"WithoutFreeSpace".as_slice(), &[0u8; 4080]].concat()),
        ];
        for (name, bytes) in &lies {
            std::fs::write(d.join(name), bytes).unwrap();
        }
        let addr = support::serve_files(d.to_path_buf()).await;
        // Sources that lie about their length: 2 TiB and 2 GiB announced, a few bytes sent; and
        // one that announces 100000 bytes and breaks off after 50000.
        let routes = HashMap::from([
            ("tib.raw".to_string(), Reply { status: 200, announce: Some(2 << 40), body: vec![1; 10], ..Default::default() }),
            ("gib.raw".to_string(), Reply { status: 200, announce: Some(2 << 30), body: vec![1; 10], ..Default::default() }),
            ("short.raw".to_string(), Reply { status: 200, announce: Some(100_000), body: vec![1; 50_000], ..Default::default() }),
        ]);
        let (liar, _) = serve("127.0.0.1:0", routes).await;
        region(env, &r).await;
        let regions: Api<Region> = Api::all(env.client.clone());
        apply(&regions, json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": small},
            "spec": {"storage": {"url": format!("file:///var/lib/ims/{small}")}, "maxImageSizeGiB": 1}})).await;
        env.start_operator();
        let u = |file: &str| format!("http://{addr}/{file}");
        let bad = |name: &'static str, file: &str, says: &[&str]| {
            case(name, url_spec(&r, &u(file), json!({})), ImagePhase::Failed, "UnsupportedFormat", says)
        };
        let declared = |name: &'static str, file: &str, ty: &str, format: &str, says: &[&str]| {
            let mut spec = url_spec(&r, &u(file), json!({"format": format}));
            spec["type"] = json!(ty);
            case(name, spec, ImagePhase::Failed, "UnsupportedFormat", says)
        };
        let server = |name: &'static str, data_disk: &str, says: &[&str]| {
            let spec = json!({"region": r, "type": "FullServer", "backupID": "b1",
                "os": os(),
                "source": {"disks": [{"role": "System", "url": u("d.qcow2")}, {"role": "Data", "url": u(data_disk)}]}});
            case(name, spec, ImagePhase::Failed, "UnsupportedFormat", says)
        };
        let iso_system = json!({"region": r, "type": "FullServer", "backupID": "b1",
            "os": os(),
            "source": {"disks": [{"role": "System", "url": u("d.iso")}]}});
        let cases = vec![
            bad("h-half", "h-half.vhd", &["vhd image is truncated: the file is", "its allocated blocks reach byte"]),
            bad("h-sum", "h-sum.vhd", &["vhd footer checksum is"]),
            bad("h-huge", "h-huge.vhd", &["vhd images larger than 2040 GiB are not supported (this one is 4398046511104 bytes (4 TiB))"]),
            bad("h-diff", "h-diff.vhd", &["differencing vhd images refer to a parent file and are not self-contained"]),
            bad("h-type", "h-type.vhd", &["vhd disk type is 9"]),
            bad("h-sparse", "h-sparse.vhd", &["vhd dynamic disk header at offset 512 does not start with \"cxsparse\""]),
            bad("h-tail", "h-tail.vhd", &["the file ends in a dynamic vhd footer but does not start with its copy"]),
            declared("h-as-raw", "fixed.vhd", "DataDisk", "Raw", &["spec declares format Raw but the bytes are Vhd"]),
            bad("x-100k", "x-100k.vhdx", &["is truncated", "upload the whole file again"]),
            bad("x-heads", "x-heads.vhdx", &["vhdx has no valid header at 64 KiB or 128 KiB"]),
            bad("x-regions", "x-regions.vhdx", &["vhdx region table at 192 KiB is damaged"]),
            bad("x-half", "x-half.vhdx", &["vhdx image is truncated: the file is"]),
            declared("x-as-vhd", "d.vhdx", "DataDisk", "Vhd", &["spec declares format Vhd but the bytes are Vhdx"]),
            bad("i-head", "i-head.vdi", &["vdi header is truncated: the file is 300 bytes, the header needs 512"]),
            bad("i-version", "i-version.vdi", &["vdi header version 2.0 is not supported"]),
            bad("i-huge", "i-huge.vdi", &["vdi disk size 1125899906842624 bytes (1024 TiB) does not fit its"]),
            bad("i-parent", "i-parent.vdi", &["differencing vdi images refer to a parent image"]),
            bad("i-cut", "i-cut.vdi", &["vdi image is truncated: the file is"]),
            bad("i-block", "i-block.vdi", &["vdi block size 4096 is not supported"]),
            bad("i-undo", "i-undo.vdi", &["vdi image type 3 is not supported"]),
            bad("o-cut", "o-cut.iso", &["ISO 9660 volume is truncated: the file is 40000 bytes, the volume is 131072 bytes (128 KiB)"]),
            bad("o-huge", "o-huge.iso", &["ISO 9660 volume is truncated: the file is 131072 bytes"]),
            bad("o-endian", "o-endian.iso", &["ISO 9660 primary volume descriptor has different little- and big-endian sizes"]),
            bad("o-nopvd", "o-nopvd.iso", &["ISO 9660 image has no primary volume descriptor"]),
            bad("o-block", "o-block.iso", &["ISO 9660 logical block size 100 is invalid"]),
            bad("o-zero", "o-zero.iso", &["ISO 9660 volume space size is zero"]),
            declared("o-as-raw", "d.iso", "ISO", "Raw", &["spec declares format Raw but the bytes are Iso"]),
            declared("raw-as-iso", "data.raw", "ISO", "Auto", &["type ISO needs an ISO 9660 image, but the bytes are a Raw disk"]),
            case("o-system", iso_system, ImagePhase::Failed, "UnsupportedFormat", &["disk 0 (System): ", "type FullServer needs a disk image, but the bytes are an ISO 9660 image"]),
            server("data-backing", "child.qcow2", &["disk 1 (Data): ", "qcow2 images with a backing file are not self-contained"]),
            bad("empty", "empty.raw", &["the image is empty: the file is 0 bytes"]),
            declared("descriptor", "descriptor.raw", "DataDisk", "Raw", &["vmdk descriptor that refers to separate extent files (createType \"vmfs\")"]),
            bad("qed", "qed.raw", &["QED images are not supported"]),
            bad("luks", "luks.raw", &["LUKS-encrypted images are not supported"]),
            bad("parallels", "parallels.raw", &["Parallels images are not supported"]),
            case("sha512", url_spec(&r, &u("data.raw"), json!({"checksum": format!("sha512:{}", "0".repeat(128))})), ImagePhase::Failed, "ChecksumMismatch",
                &["checksum mismatch: the source's sha512 is"]),
            case("tib", url_spec(&r, &format!("http://{liar}/tib.raw"), json!({})), ImagePhase::Failed, "TooLarge",
                &["the image is larger than the limit of 1099511627776 bytes"]),
            case("gib", url_spec(&small, &format!("http://{liar}/gib.raw"), json!({})), ImagePhase::Failed, "TooLarge",
                &["the image is larger than the limit of 1073741824 bytes"]),
            // A transfer that breaks off is transient: the import is retried, nothing is kept.
            case("short", url_spec(&r, &format!("http://{liar}/short.raw"), json!({})), ImagePhase::Saving, "SourceUnreachable",
                &["broke off"]),
        ];
        run_cases(env, &ns, &env.region_dir(&r), &cases).await;
        nothing_left(env, &[&r, &small]).await;
    }

    async fn ssrf_spellings_and_redirects(env: &Env) {
        let ns = env.namespace("ssrf").await;
        let r = format!("{ns}-r");
        // Only 127.0.0.2 is allow-listed here: every other loopback address, however spelled
        // or reached, is refused. A canary listens on 127.0.0.1 and must never be reached.
        let (canary, canary_hits) = serve("127.0.0.1:0", HashMap::new()).await;
        let c = canary.port();
        let routes = HashMap::from([
            ("ok".to_string(), body(vec![3u8; 4096])),
            ("hop".to_string(), redirect("/ok")),
            ("to-canary".to_string(), redirect(&format!("http://127.0.0.1:{c}/x"))),
            ("to-localhost".to_string(), redirect(&format!("http://localhost:{c}/x"))),
            ("to-metadata".to_string(), redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/")),
            ("to-mapped".to_string(), redirect(&format!("http://[::ffff:127.0.0.1]:{c}/x"))),
            ("to-decimal".to_string(), redirect(&format!("http://2130706433:{c}/x"))),
            ("to-scheme-relative".to_string(), redirect(&format!("//127.0.0.1:{c}/x"))),
            ("to-file".to_string(), redirect("file:///etc/passwd")),
            ("to-gopher".to_string(), redirect("gopher://127.0.0.2:70/_x")),
            ("to-userinfo".to_string(), redirect(&format!("http://127.0.0.2@127.0.0.1:{c}/x"))),
            ("loop".to_string(), redirect("/loop")),
            ("no-location".to_string(), Reply { status: 302, ..Default::default() }),
        ]);
        let (allowed, _) = serve("127.0.0.2:0", routes).await;
        region(env, &r).await;
        let mut config = env.operator_config();
        config.fetch.allow_cidrs = vec!["127.0.0.2/32".parse().unwrap()];
        env.start_operator_with(config);
        let refused = |name: &'static str, url: &str, says: &[&str]| {
            case(name, url_spec(&r, url, json!({})), ImagePhase::Failed, "SourceUnreachable", says)
        };
        let at = |path: &str| format!("http://{allowed}/{path}");
        const FILES_OFF: &str = "file:// sources are disabled; the operator allows them from the directories of --file-import-roots";
        const GUARD: &str = "imports may only reach public addresses unless the operator allow-lists them with --import-allow-cidrs";
        let loopback = "127.0.0.1 is a loopback address";
        let metadata = "169.254.169.254 is a link-local address (cloud metadata)";
        let userinfo = "credentials in the URL (user:password@host) are not supported";
        let cases = vec![
            refused("lo-dotted", &format!("http://127.0.0.1:{c}/x"), &[loopback, GUARD]),
            refused("lo-decimal", &format!("http://2130706433:{c}/x"), &[loopback]),
            refused("lo-hex", &format!("http://0x7f000001:{c}/x"), &[loopback]),
            refused("lo-octal", &format!("http://0177.0.0.1:{c}/x"), &[loopback]),
            refused("lo-short", &format!("http://127.1:{c}/x"), &[loopback]),
            refused("lo-mixed", &format!("http://0x7f.1:{c}/x"), &[loopback]),
            refused("lo-v6", &format!("http://[::1]:{c}/x"), &["::1 is a loopback address"]),
            refused("lo-mapped", &format!("http://[::ffff:127.0.0.1]:{c}/x"), &["::ffff:127.0.0.1 is a loopback address (it embeds 127.0.0.1)"]),
            refused("lo-mapped-hex", &format!("http://[::ffff:7f00:1]:{c}/x"), &["::ffff:127.0.0.1 is a loopback address (it embeds 127.0.0.1)"]),
            refused("lo-compatible", &format!("http://[::127.0.0.1]:{c}/x"), &["(it embeds 127.0.0.1)", "loopback"]),
            refused("lo-name", &format!("http://localhost:{c}/x"), &["localhost resolved to 127.0.0.1, a loopback address"]),
            refused("lo-name-upper", &format!("http://LocalHost:{c}/x"), &["localhost resolved to 127.0.0.1, a loopback address"]),
            refused("md-decimal", "http://2852039166/latest/meta-data/", &[metadata]),
            refused("md-hex", "http://0xa9fea9fe/latest/meta-data/", &[metadata]),
            refused("md-octal", "http://0251.0376.0251.0376/latest/meta-data/", &[metadata]),
            refused("md-short", "http://169.254.43518/latest/meta-data/", &[metadata]),
            refused("md-mapped-hex", "http://[::ffff:a9fe:a9fe]/latest/meta-data/", &["(cloud metadata) (it embeds 169.254.169.254)"]),
            refused("md-nat64", "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", &["(it embeds 169.254.169.254)"]),
            refused("md-6to4", "http://[2002:a9fe:a9fe::1]/latest/meta-data/", &["(it embeds 169.254.169.254)"]),
            refused("md-aws-v6", "http://[fd00:ec2::254]/latest/meta-data/", &["fd00:ec2::254 is a private address (cloud metadata)"]),
            refused("md-alibaba", "http://100.100.100.200/latest/meta-data/", &["100.100.100.200 is a carrier-grade NAT address (cloud metadata)"]),
            refused("any-dotted", &format!("http://0.0.0.0:{c}/x"), &["0.0.0.0 is an unspecified address"]),
            refused("any-zero", &format!("http://0:{c}/x"), &["0.0.0.0 is an unspecified address"]),
            refused("private-10", "http://10.0.0.1/d.raw", &["10.0.0.1 is a private address"]),
            refused("private-192", "http://192.168.1.1/d.raw", &["192.168.1.1 is a private address"]),
            refused("private-172", "http://172.16.0.1/d.raw", &["172.16.0.1 is a private address"]),
            refused("link-local-v6", "http://[fe80::1]/d.raw", &["fe80::1 is a link-local address"]),
            refused("multicast", "http://224.0.0.1/d.raw", &["224.0.0.1 is a multicast address"]),
            refused("not-an-ip", "http://256.1.1.1/d.raw", &["the host looks like an IPv4 address but is not a valid one"]),
            refused("user-at-metadata", "http://127.0.0.2@169.254.169.254/latest/meta-data/", &[userinfo]),
            refused("metadata-at-allowed", &format!("http://169.254.169.254@{allowed}/ok"), &[userinfo]),
            refused("password", &format!("http://admin:hunter2@{allowed}/ok"), &[userinfo, "***@"]),
            refused("via-to-canary", &at("to-canary"), &[&format!("refused to fetch http://127.0.0.1:{c}/x"), loopback]),
            refused("via-to-localhost", &at("to-localhost"), &["localhost resolved to 127.0.0.1, a loopback address"]),
            refused("via-to-metadata", &at("to-metadata"), &[metadata]),
            refused("via-to-mapped", &at("to-mapped"), &["(it embeds 127.0.0.1)"]),
            refused("via-to-decimal", &at("to-decimal"), &[loopback]),
            refused("via-scheme-relative", &at("to-scheme-relative"), &[loopback]),
            refused("via-to-file", &at("to-file"), &["redirects to file:// are never followed"]),
            refused("via-to-gopher", &at("to-gopher"), &["unsupported URL scheme gopher"]),
            refused("via-to-userinfo", &at("to-userinfo"), &["the new URL is invalid: credentials in the URL"]),
            refused("via-loop", &at("loop"), &["too many redirects (more than 5)"]),
            refused("via-no-location", &at("no-location"), &["answered 302 Found without a usable Location header"]),
            refused("file-disabled", "file:///etc/passwd", &[FILES_OFF]),
            refused("file-disabled-dotdot", "file:///tmp/../etc/shadow", &[FILES_OFF]),
            refused("file-disabled-proc", "file:///proc/self/environ", &[FILES_OFF]),
        ];
        let images = run_cases(env, &ns, &env.region_dir(&r), &cases).await;
        for image in &images {
            let message = seen(image).2;
            assert!(!message.contains("hunter2"), "{}: a password in the message: {message}", image.name_any());
        }
        // The allow-listed server itself answers, directly and through a redirect: the refusals
        // above are the guard's, not a broken server's.
        let controls = [case("ok", url_spec(&r, &at("ok"), json!({})), ImagePhase::Active, "Active", &[]), case("hop", url_spec(&r, &at("hop"), json!({})), ImagePhase::Active, "Active", &[])];
        let images_api: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        for c in &controls {
            apply(&images_api, manifest(c.name, &c.spec)).await;
        }
        for c in &controls {
            env.wait_for(&images_api, c.name, reason_is("Active")).await;
        }
        // No Event carries the password either.
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &ns);
        for e in events.list(&Default::default()).await.unwrap() {
            let text = format!("{:?} {:?}", e.note, e.reason);
            assert!(!text.contains("hunter2"), "a password in an Event: {text}");
        }
        assert_eq!(canary_hits.load(Ordering::SeqCst), 0, "a refused address was connected to");
        nothing_left(env, &[&r]).await;
    }

    async fn file_path_escapes(env: &Env) {
        let ns = env.namespace("files").await;
        let r = format!("{ns}-r");
        let files = tempfile::tempdir().unwrap();
        let root = files.path().canonicalize().unwrap();
        let at = |rest: &str| format!("file://{}/{rest}", root.display());
        std::fs::write(root.join("ok.raw"), vec![9u8; 4096]).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        let links = [("link-in", "ok.raw"), ("link-out", "/etc/passwd"), ("link-proc", "/proc/self/environ"), ("link-dir", "/etc"), ("loop-a", "loop-b"), ("loop-b", "loop-a")];
        for (link, target) in links {
            std::os::unix::fs::symlink(target, root.join(link)).unwrap();
        }
        std::os::unix::fs::symlink(env.data_dir.path(), root.join("link-store")).unwrap();
        let fifo = Command::new("mkfifo").arg(root.join("fifo")).status().unwrap();
        assert!(fifo.success(), "mkfifo");
        region(env, &r).await;
        // Where file imports are allowed under one directory.
        let mut config = env.operator_config();
        config.fetch.allow_file = true;
        config.fetch.file_roots = vec![root.clone()];
        env.start_operator_with(config.clone());
        let refused = |name: &'static str, url: &str, says: &[&str]| {
            case(name, url_spec(&r, url, json!({})), ImagePhase::Failed, "SourceUnreachable", says)
        };
        let outside = format!("it is not under any directory the operator allows file imports from ({})", root.display());
        let leads = "it leads (through a symbolic link) outside any directory the operator allows file imports from";
        let dotdot = "the path contains a '..' component; use a plain absolute path";
        let cases = vec![
            refused("outside", "file:///etc/passwd", &["refused to read /etc/passwd: ", &outside]),
            refused("outside-missing", "file:///etc/no-such-file", &["refused to read /etc/no-such-file: ", &outside]),
            refused("outside-proc", "file:///proc/self/environ", &["refused to read /proc/self/environ: ", &outside]),
            refused("dotdot", &at("../../etc/passwd"), &[dotdot]),
            refused("dotdot-escaped", &at("%2e%2e/%2E%2E/etc/passwd"), &[dotdot]),
            refused("link-out", &at("link-out"), &[&format!("refused to read {}: {leads}", root.join("link-out").display())]),
            refused("link-proc", &at("link-proc"), &[&format!("refused to read {}: {leads}", root.join("link-proc").display())]),
            refused("link-dir", &at("link-dir/passwd"), &[&format!("refused to read {}: {leads}", root.join("link-dir/passwd").display())]),
            refused("directory", &at("sub"), &["it is not a regular file"]),
            refused("fifo", &at("fifo"), &["it is not a regular file"]),
            refused("missing-inside", &at("nope.raw"), &[&format!("cannot open {}: No such file or directory", root.join("nope.raw").display())]),
            refused("link-loop", &at("loop-a"), &["cannot open", "symbolic links"]),
            refused("other-host", &format!("file://files.example.com{}/ok.raw", root.display()), &["file:// URLs must not name a host"]),
            refused("nul", &at("ok.raw%00.iso"), &["the path contains a NUL byte"]),
            refused("query", &at("ok.raw?version=2"), &["'?' and '#' in a file path must be percent-encoded"]),
            refused("bad-escape", &at("ok%zz.raw"), &["it contains an invalid percent-escape"]),
        ];
        let images = run_cases(env, &ns, &env.region_dir(&r), &cases).await;
        let message = |name: &str| seen(images.iter().find(|i| i.name_any() == name).unwrap()).2;
        assert_eq!(message("outside").replace("/etc/passwd", "P"), message("outside-missing").replace("/etc/no-such-file", "P"), "an existing and a missing file outside the roots answer alike");
        for (name, target) in [("link-out", "passwd"), ("link-proc", "environ"), ("link-dir", "/etc")] {
            assert!(!message(name).contains(target), "{name} names where the link leads: {}", message(name));
        }
        // The files inside the root do import, by path and through a link inside the root.
        let images_api: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        apply(&images_api, manifest("ok-local", &url_spec(&r, &format!("file://localhost{}/ok.raw", root.display()), json!({})))).await;
        apply(&images_api, manifest("ok-link", &url_spec(&r, &at("link-in"), json!({})))).await;
        let stored = env.wait_for(&images_api, "ok-local", reason_is("Active")).await.unwrap();
        env.wait_for(&images_api, "ok-link", reason_is("Active")).await;

        // Under the widest root a fetch policy can have (`run` refuses `/` and a missing root;
        // `local`'s manifest directory may hold its stores): the kernel's file systems and the
        // operator's own region stores stay out of reach (another tenant's bytes are there),
        // spelled directly or through a link.
        env.stop_operator().await;
        config.fetch.file_roots = vec!["/".into()];
        env.start_operator_with(config);
        let in_store = env.stored_file(&stored, "disk").display().to_string();
        let through_link = in_store.replace(&env.data_dir.path().display().to_string(), &root.join("link-store").display().to_string());
        let kernel = "it is in a kernel file system (/proc, /sys or /dev), not an image file";
        let store = "it is inside the operator's region stores";
        let cases = vec![
            refused("proc", "file:///proc/self/environ", &["refused to read /proc/self/environ: ", kernel]),
            refused("proc-link", &at("link-proc"), &[&format!("refused to read {}: {kernel}", root.join("link-proc").display())]),
            refused("sys", "file:///sys/kernel/does-not-matter", &["refused to read /sys/kernel/does-not-matter: ", kernel]),
            refused("store", &format!("file://{in_store}"), &[&format!("refused to read {in_store}: {store}")]),
            refused("store-link", &format!("file://{through_link}"), &[&format!("refused to read {through_link}: {store}")]),
        ];
        let images = run_cases(env, &ns, &env.region_dir(&r), &cases).await;
        for image in &images {
            let message = seen(image).2;
            assert!(!message.contains("environ") || image.name_any() == "proc", "{}: names where the link leads: {message}", image.name_any());
        }
        nothing_left(env, &[&r]).await;
    }

    async fn cross_tenant_attempts(env: &Env) {
        let owner = env.namespace("owner").await;
        let stranger = env.namespace("stranger").await;
        let third = env.namespace("third").await;
        let (r, r2) = (format!("{owner}-r"), format!("{owner}-r2"));
        let (addr, _files) = serve_one(4, 8192).await;
        region(env, &r).await;
        region(env, &r2).await;
        env.start_operator();
        let url = format!("http://{addr}/d.raw");
        let theirs: Api<Image> = Api::namespaced(env.client.clone(), &owner);
        let thirds: Api<Image> = Api::namespaced(env.client.clone(), &third);
        // The owner's images, in every state a stranger might probe.
        apply(&theirs, manifest("real", &url_spec(&r, &url, json!({})))).await;
        apply(&theirs, manifest("far", &url_spec(&r2, &url, json!({})))).await;
        apply(&theirs, manifest("elsewhere", &url_spec(&r, &url, json!({})))).await;
        support::kms_keys(env, &[("k1", [1; 32])]).await;
        apply(&theirs, manifest("sealed", &with(&url_spec(&r, &url, json!({})), &[("encryption", json!({"kmsKeyID": "k1"}))]))).await;
        apply(&theirs, manifest("broken", &url_spec(&r, &url, json!({"checksum": format!("sha256:{}", "0".repeat(64))})))).await;
        apply(&theirs, manifest("waiting", &url_spec(&format!("{owner}-nowhere"), &url, json!({})))).await;
        apply(&thirds, manifest("base", &url_spec(&r, &url, json!({})))).await;
        apply(&Api::<ImageShare>::namespaced(env.client.clone(), &third), json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageShare",
            "metadata": {"name": "to-owner"}, "spec": {"image": "base", "tenants": [owner]}})).await;
        apply(&Api::<ImageShare>::namespaced(env.client.clone(), &owner), json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageShare",
            "metadata": {"name": "to-third"}, "spec": {"image": "elsewhere", "tenants": [third]}})).await;
        apply(&theirs, manifest("theirs-ref", &json!({"region": r, "source": {"image": {"namespace": third, "name": "base"}}}))).await;
        for (name, reason) in [("real", "Active"), ("far", "Active"), ("elsewhere", "Active"), ("sealed", "Active"), ("broken", "ChecksumMismatch"), ("waiting", "RegionNotFound"), ("theirs-ref", "Active")] {
            env.wait_for(&theirs, name, reason_is(reason)).await;
        }

        // References from the stranger: to each of them, to a missing image, and into a
        // namespace that does not exist. Every one answers as the missing image does.
        let mine: Api<Image> = Api::namespaced(env.client.clone(), &stranger);
        let nowhere = format!("{owner}-gone");
        let targets = [
            ("to-real", owner.as_str(), "real"),
            ("to-far", owner.as_str(), "far"),
            ("to-elsewhere", owner.as_str(), "elsewhere"),
            ("to-sealed", owner.as_str(), "sealed"),
            ("to-broken", owner.as_str(), "broken"),
            ("to-waiting", owner.as_str(), "waiting"),
            ("to-theirs-ref", owner.as_str(), "theirs-ref"),
            ("to-ghost", owner.as_str(), "ghost"),
            ("to-no-namespace", nowhere.as_str(), "real"),
        ];
        for (name, ns, target) in targets {
            apply(&mine, manifest(name, &json!({"region": r, "source": {"image": {"namespace": ns, "name": target}}}))).await;
        }
        let answer = |image: &Image, ns: &str, target: &str| {
            let status = image.status.clone().unwrap_or_default();
            let (reason, ready_message) = ready(&status.conditions);
            let hide = |m: &str| m.replace(&format!("{ns}/{target}"), "SOURCE");
            let leaked = (status.size_bytes, status.virtual_size_bytes, status.format.clone(), status.location.clone(), status.source.clone(), status.checksum.clone(), status.os.clone());
            (status.phase, reason, hide(&status.message.unwrap_or_default()), hide(&ready_message), format!("{leaked:?}"))
        };
        let mut answers = Vec::new();
        for (name, ns, target) in targets {
            let image = env.wait_for(&mine, name, reason_is("NotShared")).await.unwrap();
            answers.push((name, answer(&image, ns, target)));
        }
        let ghost = answers.iter().find(|(n, _)| *n == "to-ghost").unwrap().1.clone();
        assert_eq!(ghost.0, Some(ImagePhase::Unavailable));
        assert_eq!(ghost.4, format!("{:?}", (None::<i64>, None::<i64>, None::<String>, None::<()>, None::<()>, None::<()>, None::<()>)), "nothing about a source is shown");
        for (name, seen) in &answers {
            assert_eq!(seen, &ghost, "{name} answers otherwise than a reference to a missing image");
        }

        // Copies and shares the stranger writes name images of its own namespace: the owner's
        // names are as unknown there as a made-up one, and a reference it holds is no way in.
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &stranger);
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &stranger);
        let pairs = [("real", "ghost"), ("to-real", "to-ghost")];
        for (a, b) in pairs {
            for source in [a, b] {
                apply(&copies, json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageCopy", "metadata": {"name": format!("copy-{source}")},
                    "spec": {"source": source, "destination": {"region": r2, "name": format!("stolen-{source}")}}})).await;
                apply(&mine, manifest(&format!("hand-{source}"), &json!({"region": r, "type": "DataDisk", "source": {"copy": {"name": source}}}))).await;
                apply(&shares, json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageShare", "metadata": {"name": format!("share-{source}")},
                    "spec": {"image": source, "tenants": [third]}})).await;
            }
        }
        let copy_answer = |c: &ImageCopy, source: &str| {
            let status = c.status.clone().unwrap_or_default();
            let (reason, message) = ready(&status.conditions);
            (status.phase, reason, message.replace(source, "SOURCE"), status.destination_image)
        };
        let share_answer = |s: &ImageShare, source: &str| {
            let status = s.status.clone().unwrap_or_default();
            let (reason, message) = ready(&status.conditions);
            (reason, message.replace(source, "SOURCE"))
        };
        let copied = |c: Option<&ImageCopy>| c.and_then(|c| c.status.as_ref()).is_some_and(|s| s.phase.is_some());
        let answered = |s: Option<&ImageShare>| s.and_then(|s| s.status.as_ref()).is_some_and(|s| !s.conditions.is_empty());
        for (a, b) in pairs {
            let ca = env.wait_for(&copies, &format!("copy-{a}"), copied).await.unwrap();
            let cb = env.wait_for(&copies, &format!("copy-{b}"), copied).await.unwrap();
            let (seen_a, seen_b) = (copy_answer(&ca, a), copy_answer(&cb, b));
            assert_eq!(seen_a, seen_b, "an ImageCopy of {a} answers otherwise than one of {b}");
            assert_eq!(seen_a.0, Some(CopyPhase::Pending), "{seen_a:?}");
            let waits = |i: Option<&Image>| i.and_then(|i| i.status.as_ref()).is_some_and(|s| s.phase.is_some());
            let ha = env.wait_for(&mine, &format!("hand-{a}"), waits).await.unwrap();
            let hb = env.wait_for(&mine, &format!("hand-{b}"), waits).await.unwrap();
            let hide = |i: &Image, s: &str| { let (p, r, m) = seen(i); (p, r, m.replace(s, "SOURCE")) };
            assert_eq!(hide(&ha, a), hide(&hb, b), "an Image copying {a} answers otherwise than one copying {b}");
            assert_eq!(seen(&ha).1, "SourceNotActive");
            let sa = env.wait_for(&shares, &format!("share-{a}"), answered).await.unwrap();
            let sb = env.wait_for(&shares, &format!("share-{b}"), answered).await.unwrap();
            assert_eq!(share_answer(&sa, a), share_answer(&sb, b), "an ImageShare of {a} answers otherwise than one of {b}");
            assert!(sa.status.unwrap().members.iter().all(|m| m.state != ims_operator::api::MemberState::Accepted));
        }
        // No destination was made, and nothing of the stranger's is in any store.
        for source in ["real", "ghost", "to-real", "to-ghost"] {
            assert!(mine.get_opt(&format!("stolen-{source}")).await.unwrap().is_none(), "a copy of {source} made a destination");
        }
        for store in [&r, &r2] {
            let left = stored_files(&env.region_dir(store).join(&stranger));
            assert!(left.is_empty(), "the stranger has bytes in {store}: {left:?}");
        }
        nothing_left(env, &[&r, &r2]).await;
    }

    async fn quota_edge_values(env: &Env) {
        let tag = env.namespace("quota").await;
        let (r, r2) = (format!("{tag}-r"), format!("{tag}-r2"));
        let (addr, _files) = serve_one(6, 5000).await;
        region(env, &r).await;
        region(env, &r2).await;
        env.start_operator();
        region_ready(env, &r).await;
        region_ready(env, &r2).await;
        let quota = |spec: Value| json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageQuota", "metadata": {"name": "default"}, "spec": spec});
        let disk = |name: &str| manifest(name, &url_spec(&r, &format!("http://{addr}/d.raw"), json!({})));
        // A namespace of its own for each limit, its quota set before any image.
        let with_quota = |tag: &'static str, spec: Value| {
            let quota = quota(spec);
            async move {
                let ns = env.namespace(tag).await;
                apply(&Api::<ImageQuota>::namespaced(env.client.clone(), &ns), quota).await;
                ns
            }
        };
        let phase_reason = |i: Option<&Image>| i.map(|i| { let (p, r, _) = seen(i); (p, r) });
        let is = |phase: ImagePhase, reason: &'static str| move |i: Option<&Image>| phase_reason(i) == Some((Some(phase), reason.to_string()));
        let mut failures = Vec::new();
        let mut check = |what: &str, image: &Image, says: &[&str]| {
            let message = seen(image).2;
            for part in says {
                if !message.contains(part) {
                    failures.push(format!("{what}: the message does not say {part:?}: {message}"));
                }
            }
        };

        // 0 images: none is admitted, and the message says what would end the wait.
        let zero = with_quota("q-zero", json!({"privateImagesPerRegion": 0})).await;
        let images = Api::<Image>::namespaced(env.client.clone(), &zero);
        apply(&images, disk("a")).await;
        let a = env.wait_for(&images, "a", is(ImagePhase::Queued, "QuotaExceeded")).await.unwrap();
        check("privateImagesPerRegion 0", &a, &["privateImagesPerRegion is 0", "raise it in ImageQuota default"]);
        // 1 image: the first is admitted, the second waits.
        let one = with_quota("q-one", json!({"privateImagesPerRegion": 1})).await;
        let images = Api::<Image>::namespaced(env.client.clone(), &one);
        apply(&images, disk("a")).await;
        env.wait_for(&images, "a", is(ImagePhase::Active, "Active")).await;
        apply(&images, disk("b")).await;
        let b = env.wait_for(&images, "b", is(ImagePhase::Queued, "QuotaExceeded")).await.unwrap();
        check("privateImagesPerRegion 1, a second image", &b, &[&format!("has 1/1 images in region {r}")]);
        // Exactly at the limit: all three admitted; the fourth waits.
        let three = with_quota("q-three", json!({"privateImagesPerRegion": 3})).await;
        let images = Api::<Image>::namespaced(env.client.clone(), &three);
        for name in ["a", "b", "c"] {
            apply(&images, disk(name)).await;
        }
        for name in ["a", "b", "c"] {
            env.wait_for(&images, name, is(ImagePhase::Active, "Active")).await;
        }
        apply(&images, disk("d")).await;
        let d = env.wait_for(&images, "d", is(ImagePhase::Queued, "QuotaExceeded")).await.unwrap();
        check("privateImagesPerRegion 3, a fourth image", &d, &[&format!("has 3/3 images in region {r}")]);
        // Bytes: 0 and one byte short fail once the size is known, and the bytes go; exactly
        // the size is admitted.
        let mut byte_cases = Vec::new();
        for (tag, limit, outcome) in [("q-bytes-0", 0, "QuotaExceeded"), ("q-bytes-short", 4999, "QuotaExceeded"), ("q-bytes-exact", 5000, "Active")] {
            let ns = with_quota(tag, json!({"imageBytesPerRegion": limit})).await;
            apply(&Api::<Image>::namespaced(env.client.clone(), &ns), disk("a")).await;
            byte_cases.push((ns, limit, outcome));
        }
        for (ns, limit, outcome) in &byte_cases {
            let images = Api::<Image>::namespaced(env.client.clone(), ns);
            let phase = if *outcome == "Active" { ImagePhase::Active } else { ImagePhase::Failed };
            let a = env.wait_for(&images, "a", is(phase, outcome)).await.unwrap();
            if phase == ImagePhase::Failed {
                check(&format!("imageBytesPerRegion {limit}"), &a, &[&format!("more than imageBytesPerRegion {limit}")]);
                let left = files_of(&env.region_dir(&r), ns, "a");
                assert!(left.is_empty(), "imageBytesPerRegion {limit}: bytes left: {left:?}");
            }
        }
        // The largest values are limits like any other (no overflow).
        for (tag, field) in [("q-max-images", "privateImagesPerRegion"), ("q-max-bytes", "imageBytesPerRegion"), ("q-max-imports", "concurrentImports")] {
            let ns = with_quota(tag, json!({field: i64::MAX})).await;
            let images = Api::<Image>::namespaced(env.client.clone(), &ns);
            apply(&images, disk("a")).await;
            env.wait_for(&images, "a", is(ImagePhase::Active, "Active")).await;
        }
        // No import slot: the image waits, and is told that only a raised limit ends it.
        let slots = with_quota("q-slots", json!({"concurrentImports": 0})).await;
        let images = Api::<Image>::namespaced(env.client.clone(), &slots);
        apply(&images, disk("a")).await;
        let a = env.wait_for(&images, "a", is(ImagePhase::Queued, "Queued")).await.unwrap();
        check("concurrentImports 0", &a, &["concurrentImports is 0", "raise it in ImageQuota default"]);
        assert!(!seen(&a).2.contains("when one finishes"), "{}", seen(&a).2);
        // No cross-region copy slot: the ImageCopy waits, told the same.
        let copies_ns = with_quota("q-copies", json!({"concurrentCrossRegionCopies": 0})).await;
        let images = Api::<Image>::namespaced(env.client.clone(), &copies_ns);
        apply(&images, disk("src")).await;
        env.wait_for(&images, "src", is(ImagePhase::Active, "Active")).await;
        let copies = Api::<ImageCopy>::namespaced(env.client.clone(), &copies_ns);
        apply(&copies, json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageCopy", "metadata": {"name": "c"},
            "spec": {"source": "src", "destination": {"region": r2, "name": "dst"}}})).await;
        let waiting = env.wait_for(&copies, "c", |c: Option<&ImageCopy>| {
            c.and_then(|c| c.status.as_ref()).is_some_and(|s| ready(&s.conditions).0 == "ConcurrencyLimit")
        }).await.unwrap();
        let (_, message) = ready(&waiting.status.unwrap().conditions);
        if !(message.contains("concurrentCrossRegionCopies is 0") && message.contains("raise it") && !message.contains("when one finishes")) {
            failures.push(format!("concurrentCrossRegionCopies 0: {message}"));
        }
        assert!(images.get_opt("dst").await.unwrap().is_none(), "a copy without a slot made its destination");

        // Values the schema refuses, in a namespace of their own.
        let refused_ns = env.namespace("q-refused").await;
        let bad = |what: &'static str, spec: Value, errors: &[&str]| {
            let mut object = quota(spec);
            object["metadata"]["name"] = json!("default");
            refused(what, object, None, &invalid("ImageQuota", "default", errors))
        };
        let mut cases = Vec::new();
        for field in ["privateImagesPerRegion", "imageBytesPerRegion", "concurrentImports", "concurrentCrossRegionCopies"] {
            let error = format!("spec.{field}: Invalid value: -1: spec.{field} in body should be greater than or equal to 0");
            cases.push(bad("a negative limit", json!({field: -1}), &[&error]));
        }
        cases.push(bad("a limit beyond int64", json!({"imageBytesPerRegion": 10_000_000_000_000_000_000u64}), &[
            r#"spec.imageBytesPerRegion: Invalid value: "float64": spec.imageBytesPerRegion in body must be of type int64: "float64""#,
            r#"<nil>: Invalid value: "": Checked value must be of type integer with format int64 in spec.imageBytesPerRegion"#,
            NOT_CHECKED,
        ]));
        cases.push(bad("a fraction", json!({"concurrentImports": 1.5}), &[
            r#"spec.concurrentImports: Invalid value: "float64": spec.concurrentImports in body must be of type int64: "float64""#,
            r#"<nil>: Invalid value: "": Checked value must be of type integer with format int64 in spec.concurrentImports"#,
            NOT_CHECKED,
        ]));
        cases.push(bad("a string", json!({"privateImagesPerRegion": "5"}), &[
            r#"spec.privateImagesPerRegion: Invalid value: "string": spec.privateImagesPerRegion in body must be of type integer: "string""#,
            NOT_CHECKED,
        ]));
        let mut other = quota(json!({"concurrentImports": 1}));
        other["metadata"]["name"] = json!("mine");
        cases.push(refused("a quota not named default", other, None, &invalid("ImageQuota", "mine", &["<nil>: Invalid value: an ImageQuota must be named default (one per namespace)"])));
        run_refusals(env, &refused_ns, &cases).await;
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        nothing_left(env, &[&r, &r2]).await;
    }

    async fn deletions_in_every_phase(env: &Env) {
        let ns = env.namespace("del").await;
        let (a, b) = (format!("{ns}-a"), format!("{ns}-b"));
        let (addr, _files) = serve_one(8, 6000).await;
        let held = held_source(64 << 10).await;
        region(env, &a).await;
        region(env, &b).await;
        env.start_operator();
        region_ready(env, &a).await;
        region_ready(env, &b).await;
        let url = format!("http://{addr}/d.raw");
        let images: Api<Image> = Api::namespaced(env.client.clone(), &ns);
        let os = os();
        let is = |phase: ImagePhase, reason: &'static str| move |i: Option<&Image>| i.is_some_and(|i| { let (p, r, _) = seen(i); p == Some(phase) && r == reason });
        // Each image in the phase it is deleted in.
        apply(&images, manifest("queued-region", &url_spec(&format!("{ns}-nowhere"), &url, json!({})))).await;
        apply(&images, manifest("saving", &url_spec(&a, &format!("http://{held}/big.raw"), json!({})))).await;
        apply(&images, manifest("saving-server", &json!({"region": a, "type": "FullServer", "backupID": "b1", "os": os,
            "source": {"disks": [{"role": "System", "url": url}, {"role": "Data", "url": format!("http://{held}/big.raw")}]}}))).await;
        apply(&images, manifest("active", &url_spec(&a, &url, json!({})))).await;
        apply(&images, manifest("failed", &url_spec(&a, &url, json!({"checksum": format!("sha256:{}", "0".repeat(64))})))).await;
        apply(&images, manifest("protected", &with(&url_spec(&a, &url, json!({})), &[("protected", json!(true))]))).await;
        apply(&images, manifest("protected-failed", &with(&url_spec(&a, &url, json!({"format": "Qcow2"})), &[("protected", json!(true))]))).await;
        apply(&images, manifest("shared", &url_spec(&a, &url, json!({})))).await;
        let waits: [(&str, ImagePhase, &str); 8] = [
            ("queued-region", ImagePhase::Queued, "RegionNotFound"),
            ("saving", ImagePhase::Saving, "Importing"),
            ("saving-server", ImagePhase::Saving, "Importing"),
            ("active", ImagePhase::Active, "Active"),
            ("failed", ImagePhase::Failed, "ChecksumMismatch"),
            ("protected", ImagePhase::Active, "Active"),
            ("protected-failed", ImagePhase::Failed, "UnsupportedFormat"),
            ("shared", ImagePhase::Active, "Active"),
        ];
        for (name, phase, reason) in waits {
            env.wait_for(&images, name, is(phase, reason)).await;
        }
        // The FullServer is deleted with its first disk stored and the second on the way.
        env.wait_for(&images, "saving-server", |i: Option<&Image>| i.and_then(|i| i.status.as_ref()).is_some_and(|s| s.disks.len() == 1)).await;

        // Waiting for room and for a slot, in namespaces of their own.
        let full = env.namespace("del-full").await;
        let slotless = env.namespace("del-slots").await;
        let quota = |spec: Value| json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageQuota", "metadata": {"name": "default"}, "spec": spec});
        apply(&Api::<ImageQuota>::namespaced(env.client.clone(), &full), quota(json!({"privateImagesPerRegion": 1}))).await;
        apply(&Api::<ImageQuota>::namespaced(env.client.clone(), &slotless), quota(json!({"concurrentImports": 0}))).await;
        let full_images: Api<Image> = Api::namespaced(env.client.clone(), &full);
        let slot_images: Api<Image> = Api::namespaced(env.client.clone(), &slotless);
        apply(&full_images, manifest("first", &url_spec(&a, &url, json!({})))).await;
        env.wait_for(&full_images, "first", is(ImagePhase::Active, "Active")).await;
        apply(&full_images, manifest("over", &url_spec(&a, &url, json!({})))).await;
        env.wait_for(&full_images, "over", is(ImagePhase::Queued, "QuotaExceeded")).await;
        apply(&slot_images, manifest("slotless", &url_spec(&a, &url, json!({})))).await;
        env.wait_for(&slot_images, "slotless", is(ImagePhase::Queued, "Queued")).await;

        // References: one never granted (Unavailable), one Active.
        let tenant = env.namespace("del-tenant").await;
        let refs: Api<Image> = Api::namespaced(env.client.clone(), &tenant);
        let shares: Api<ImageShare> = Api::namespaced(env.client.clone(), &ns);
        apply(&shares, json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageShare", "metadata": {"name": "s"}, "spec": {"image": "shared", "tenants": [tenant]}})).await;
        apply(&refs, manifest("unshared", &json!({"region": a, "source": {"image": {"namespace": ns, "name": "active"}}}))).await;
        apply(&refs, manifest("bound", &json!({"region": a, "source": {"image": {"namespace": ns, "name": "shared"}}}))).await;
        env.wait_for(&refs, "unshared", is(ImagePhase::Unavailable, "NotShared")).await;
        env.wait_for(&refs, "bound", is(ImagePhase::Active, "Active")).await;
        let accepted = |s: Option<&ImageShare>| s.and_then(|s| s.status.as_ref()).is_some_and(|s| s.accepted_count == Some(1));
        env.wait_for(&shares, "s", accepted).await;

        // A copy destination mid-copy: it holds its cross-region slot and waits for an import
        // slot (none is free), then is deleted; another copy is cancelled by deleting it.
        let copier = env.namespace("del-copy").await;
        let copy_images: Api<Image> = Api::namespaced(env.client.clone(), &copier);
        let copies: Api<ImageCopy> = Api::namespaced(env.client.clone(), &copier);
        let quotas: Api<ImageQuota> = Api::namespaced(env.client.clone(), &copier);
        apply(&copy_images, manifest("src", &url_spec(&a, &url, json!({})))).await;
        env.wait_for(&copy_images, "src", is(ImagePhase::Active, "Active")).await;
        apply(&quotas, quota(json!({"concurrentImports": 0}))).await;
        for (copy, dest) in [("c-dest", "dest"), ("c-cancel", "cancelled")] {
            apply(&copies, json!({"apiVersion": "ims.io/v1alpha1", "kind": "ImageCopy", "metadata": {"name": copy},
                "spec": {"source": "src", "destination": {"region": b, "name": dest}}})).await;
        }
        let copying = |c: Option<&ImageCopy>| c.and_then(|c| c.status.as_ref()).is_some_and(|s| s.phase == Some(CopyPhase::Copying));
        for copy in ["c-dest", "c-cancel"] {
            env.wait_for(&copies, copy, copying).await;
        }

        // Delete them all, and see each go with everything it held.
        let ledger = |ns: String| {
            let quotas: Api<ImageQuota> = Api::namespaced(env.client.clone(), &ns);
            async move { quotas.get_opt("default").await.unwrap().and_then(|q| q.status).map(|s| s.reservations).unwrap_or_default() }
        };
        let gone = [
            (&images, "queued-region"), (&images, "saving"), (&images, "saving-server"), (&images, "active"), (&images, "failed"),
            (&full_images, "over"), (&slot_images, "slotless"), (&refs, "unshared"), (&refs, "bound"), (&copy_images, "dest"),
        ];
        let mut uids = Vec::new();
        for (api, name) in gone {
            let image = api.get(name).await.unwrap();
            uids.push(image.uid().unwrap());
            api.delete(name, &DeleteParams::default()).await.unwrap();
        }
        let cancelled = copy_images.get("cancelled").await.unwrap();
        copies.delete("c-cancel", &DeleteParams::default()).await.unwrap();
        for ((api, name), uid) in gone.iter().zip(&uids) {
            env.wait_for(api, name, is_deleted(uid)).await;
        }
        env.wait_for(&copy_images, "cancelled", is_deleted(&cancelled.uid().unwrap())).await;
        let failed = env.wait_for(&copies, "c-dest", |c: Option<&ImageCopy>| {
            c.and_then(|c| c.status.as_ref()).is_some_and(|s| s.phase == Some(CopyPhase::Failed))
        }).await.unwrap();
        let (reason, message) = ready(&failed.status.unwrap().conditions);
        assert_eq!(reason, "DestinationDeleted");
        assert!(message.contains("the destination Image dest was deleted before the copy finished"), "{message}");
        for (store, namespace, name) in [
            (&a, &ns, "saving"), (&a, &ns, "saving-server"), (&a, &ns, "active"), (&a, &ns, "failed"),
            (&a, &full, "over"), (&a, &slotless, "slotless"), (&b, &copier, "dest"), (&b, &copier, "cancelled"),
        ] {
            let left = files_of(&env.region_dir(store), namespace, name);
            assert!(left.is_empty(), "{namespace}/{name} left bytes: {left:?}");
        }
        for namespace in [&ns, &full, &slotless, &copier] {
            let held: Vec<String> = ledger(namespace.clone()).await.into_iter().filter(|r| uids.contains(&r.uid) || r.uid == cancelled.uid().unwrap()).map(|r| r.name).collect();
            assert!(held.is_empty(), "{namespace}: reservations of deleted images stay: {held:?}");
        }
        // The source of the bound reference is untouched, and its member is Pending again.
        assert_eq!(seen(&images.get("shared").await.unwrap()).0, Some(ImagePhase::Active));
        env.wait_for(&shares, "s", |s: Option<&ImageShare>| s.and_then(|s| s.status.as_ref()).is_some_and(|s| s.accepted_count == Some(0))).await;

        // Protected images, Active and Failed: the deletion is held (or, where deploy/'s
        // admission policy is installed, refused) and the bytes stay until it is lifted.
        for name in ["protected", "protected-failed"] {
            let uid = images.get(name).await.unwrap().uid().unwrap();
            match images.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    let held = env.wait_for(&images, name, reason_is("Protected")).await.unwrap();
                    let (phase, _, message) = seen(&held);
                    assert_eq!(phase, Some(ImagePhase::Deleting), "{name}");
                    assert!(message.contains("deletion is held: spec.protected is true; set it to false to delete the image"), "{name}: {message}");
                }
                Err(kube::Error::Api(s)) => assert!(env.server().is_none() && s.message.contains("spec.protected"), "{name}: {s:?}"),
                Err(e) => panic!("{name}: {e}"),
            }
            if name == "protected" {
                assert_eq!(files_of(&env.region_dir(&a), &ns, name).len(), 1, "a protected image keeps its bytes");
            }
            images.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"protected": false}}))).await.unwrap();
            let _ = images.delete(name, &DeleteParams::default()).await;
            env.wait_for(&images, name, is_deleted(&uid)).await;
            assert!(files_of(&env.region_dir(&a), &ns, name).is_empty(), "{name}: bytes left after the protection was lifted");
        }
        nothing_left(env, &[&a, &b]).await;
    }
}
