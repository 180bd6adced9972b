//! The scenario harness: a scenario is written once and runs on the embedded API (default) and
//! on the real cluster of KUBECONFIG (`IMS_E2E=1 cargo test -- --ignored`).
//!
//! Each scenario gets its own namespaces (generateName `ims-e2e-`), and they are deleted after
//! it, also when it panics. On a cluster, scenarios run one at a time ([`CLUSTER_TURN`]): each
//! runs an operator in-process that acts on every namespace, and two at once would act on each
//! other's objects (cargo runs test binaries one after another, so a lock per process is enough).

#![allow(dead_code)]

use std::{sync::Mutex, time::Duration};

use ims_operator::{
    api,
    controllers::{self, Config},
    policy::Policy,
    store::StoreConfig,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::wait::{Condition, await_condition},
};
use kube_embedded::ApiServer;
use serde::de::DeserializeOwned;

/// Where a scenario runs.
pub enum Backend {
    /// The in-memory API server.
    Embedded(ApiServer),
    /// The cluster of KUBECONFIG.
    Cluster,
}

/// A scenario's environment.
pub struct Env {
    /// Client for the backend (the cluster's admin on a cluster): what the scenario itself uses.
    pub client: Client,
    /// The in-process operator's client: on a cluster, a token of deploy/'s ServiceAccount
    /// `ims-system/ims-operator`, so every call the operator makes needs exactly deploy/'s RBAC.
    pub operator_client: Client,
    /// Which backend.
    pub backend: Backend,
    namespaces: Mutex<Vec<String>>,
    operator: Mutex<Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
    /// Policy the in-process operator runs with.
    pub policy: Policy,
    /// Where the in-process operator's file:// region stores live.
    pub data_dir: tempfile::TempDir,
    /// The in-process operator's image server listener (one per scenario, so a restarted
    /// operator keeps its URLs), on 127.0.0.1.
    pub images: std::sync::Arc<tokio::net::TcpListener>,
    /// A cluster scenario's turn (see [`CLUSTER_TURN`]), held until it ends.
    _turn: Option<tokio::sync::MutexGuard<'static, ()>>,
}

async fn image_listener() -> std::sync::Arc<tokio::net::TcpListener> {
    std::sync::Arc::new(tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port for the image server"))
}

/// One cluster scenario at a time in a test binary.
pub static CLUSTER_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `IMS_TEST_LOG=<filter>` (a `RUST_LOG` filter, e.g. `ims_operator=debug`) logs the operator
/// of a scenario to stderr; run one scenario with `--nocapture` to read it.
fn log_if_asked() {
    if let Ok(filter) = std::env::var("IMS_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// How long a scenario waits for a condition before failing.
pub const WAIT: Duration = Duration::from_secs(30);

/// The CRDs of other projects that captures read (tests/fixtures/crds/): KubeVirt's
/// VirtualMachine.
pub fn third_party_crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crds");
    let mut files: Vec<_> = std::fs::read_dir(dir).expect("tests/fixtures/crds").map(|e| e.unwrap().path()).collect();
    files.sort();
    files.iter().map(|f| serde_yaml_ng::from_str(&std::fs::read_to_string(f).unwrap()).expect("a CRD")).collect()
}

impl Env {
    /// A fresh embedded API server.
    pub async fn embedded() -> Env {
        log_if_asked();
        let server = kube_embedded::ApiServer::new(api::crds().into_iter().chain(third_party_crds()));
        // The operator's namespace (its image key Secret lives there), as deploy/ makes it.
        let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": "ims-system"}})).expect("a Namespace");
        Api::<Namespace>::all(server.client()).create(&PostParams::default(), &ns).await.expect("ims-system");
        Env {
            images: image_listener().await,
            client: server.client(),
            operator_client: server.client(),
            backend: Backend::Embedded(server),
            namespaces: Mutex::new(Vec::new()),
            operator: Mutex::new(None),
            policy: Policy::default(),
            data_dir: tempfile::tempdir().expect("temp dir"),
            _turn: None,
        }
    }

    /// The cluster of KUBECONFIG, with the CRDs installed (server-side apply) and established.
    pub async fn cluster() -> Env {
        log_if_asked();
        assert_eq!(
            std::env::var("IMS_E2E").as_deref(),
            Ok("1"),
            "cluster scenarios need IMS_E2E=1 and KUBECONFIG pointing at a cluster"
        );
        let turn = CLUSTER_TURN.lock().await;
        let client = Client::try_default().await.expect("a cluster from KUBECONFIG");
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        for crd in api::crds().into_iter().chain(third_party_crds()) {
            let name = crd.metadata.name.clone().unwrap_or_default();
            crds.patch(&name, &PatchParams::apply("ims-e2e").force(), &Patch::Apply(&crd)).await.expect("install CRD");
            let established = await_condition(crds.clone(), &name, kube::runtime::conditions::is_crd_established());
            tokio::time::timeout(WAIT, established).await.expect("CRD established in time").expect("watch CRD");
        }
        let operator_client = operator_identity(&client).await;
        Env {
            images: image_listener().await,
            client,
            operator_client,
            backend: Backend::Cluster,
            namespaces: Mutex::new(Vec::new()),
            operator: Mutex::new(None),
            policy: Policy::default(),
            data_dir: tempfile::tempdir().expect("temp dir"),
            _turn: Some(turn),
        }
    }

    /// The directory of a region's file store (`file:///var/lib/ims/<region>`).
    pub fn region_dir(&self, region: &str) -> std::path::PathBuf {
        self.data_dir.path().join(region)
    }

    /// The file of one disk (`disk`, `disk-<index>`) of an image in its region's file store
    /// (`file:///var/lib/ims/<region>`; the in-process operator's stores are on this machine).
    pub fn stored_file(&self, image: &api::Image, disk: &str) -> std::path::PathBuf {
        let ns = image.metadata.namespace.as_deref().expect("a namespaced image");
        let name = image.metadata.name.as_deref().expect("a named image");
        let uid = image.metadata.uid.as_deref().expect("an image with a uid");
        self.region_dir(&image.spec.region).join(ns).join(name).join(uid).join(disk)
    }

    /// The embedded server, for scenarios that inspect it (None on a cluster).
    pub fn server(&self) -> Option<&ApiServer> {
        match &self.backend {
            Backend::Embedded(s) => Some(s),
            Backend::Cluster => None,
        }
    }

    /// A fresh namespace, deleted after the scenario.
    pub async fn namespace(&self, prefix: &str) -> String {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let mut ns = Namespace::default();
        ns.meta_mut().generate_name = Some(format!("ims-e2e-{prefix}-"));
        let created = api.create(&PostParams::default(), &ns).await.expect("create namespace");
        let name = created.meta().name.clone().expect("generated name");
        self.namespaces.lock().unwrap().push(name.clone());
        name
    }

    /// The configuration the in-process operator runs with.
    pub fn operator_config(&self) -> Config {
        Config {
            policy: self.policy.clone(),
            public_namespace: "ims-public".into(),
            operator_namespace: "ims-system".into(),
            stores: StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: self.data_dir.path().to_path_buf() },
            // Scenarios serve images from 127.0.0.1.
            fetch: ims_operator::fetch::FetchPolicy {
                allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
                ..Default::default()
            },
            progress_every: Duration::from_millis(200),
            readiness: Default::default(),
            metrics: Default::default(),
            delivery: Some(ims_operator::delivery::DeliveryConfig {
                listener: self.images.clone(),
                base_url: format!("http://{}", self.images.local_addr().expect("bound")),
                key_secret: ims_operator::delivery::key::DEFAULT_SECRET.into(),
                tls_secret: None,
                limits: Default::default(),
            }),
            // Scenarios' volumes are local files.
            capture_in_process: true,
            mover: None,
        }
    }

    /// Starts the operator's controllers in-process.
    pub fn start_operator(&self) {
        self.start_operator_with(self.operator_config());
    }

    /// Starts the operator's controllers in-process with `config` (e.g. [`Env::operator_config`]
    /// with another fetch policy).
    pub fn start_operator_with(&self, config: Config) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(controllers::run(self.operator_client.clone(), config, async move {
            let _ = rx.await;
        }));
        *self.operator.lock().unwrap() = Some((tx, handle));
    }

    /// Stops the in-process controllers (as a killed operator would stop).
    pub async fn stop_operator(&self) {
        let running = self.operator.lock().unwrap().take();
        if let Some((tx, handle)) = running {
            let _ = tx.send(());
            let _ = handle.await;
        }
    }

    /// Waits until `cond` holds for the named object.
    pub async fn wait_for<K>(&self, api: &Api<K>, name: &str, cond: impl Condition<K>) -> Option<K>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        match tokio::time::timeout(WAIT, await_condition(api.clone(), name, cond)).await {
            Ok(found) => found.expect("watch"),
            Err(_) => {
                let now = api.get_opt(name).await.ok().flatten();
                panic!("timed out after {WAIT:?} waiting for {name}; it is now: {now:#?}")
            }
        }
    }

    /// Deletes the scenario's namespaces and stops the operator.
    pub async fn cleanup(self) {
        self.stop_operator().await;
        let names = std::mem::take(&mut *self.namespaces.lock().unwrap());
        let api: Api<Namespace> = Api::all(self.client.clone());
        for name in names {
            let _ = api.delete(&name, &DeleteParams::default()).await;
        }
    }
}

/// deploy/'s Namespace, ServiceAccount and RBAC (the operator's and the tenants' aggregated
/// roles), applied as `kubectl apply --server-side` would (once per test binary), and a client
/// with a token of that ServiceAccount: the operator as it runs in a cluster, with nothing more
/// than deploy/ grants.
async fn operator_identity(admin: &Client) -> Client {
    static DEPLOYED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DEPLOYED
        .get_or_init(|| async {
            let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
            for file in ["namespace.yaml", "serviceaccount.yaml", "rbac.yaml", "tenant-rbac.yaml"] {
                let path = deploy.join(file);
                let out = std::process::Command::new("kubectl")
                    .args(["apply", "--server-side", "--force-conflicts", "--field-manager", "ims-e2e", "-f"])
                    .arg(&path)
                    .output()
                    .expect("kubectl runs");
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "kubectl apply -f {}: {stderr}", path.display());
            }
        })
        .await;
    token_client(admin, "ims-system", "ims-operator").await
}

/// A token of ServiceAccount `namespace/account` from the TokenRequest API (an hour).
pub async fn token(admin: &Client, namespace: &str, account: &str) -> String {
    use k8s_openapi::api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }),
        ..Default::default()
    };
    accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token of ServiceAccount {namespace}/{account}: {e}"))
        .status
        .and_then(|s| s.token)
        .expect("a TokenRequest status with a token")
}

/// A client of the cluster of KUBECONFIG acting as ServiceAccount `namespace/account`, with a
/// token from the TokenRequest API (an hour).
pub async fn token_client(admin: &Client, namespace: &str, account: &str) -> Client {
    let token = token(admin, namespace, account).await;
    let mut config = kube::Config::infer().await.expect("the cluster of KUBECONFIG");
    config.auth_info = kube::config::AuthInfo { token: Some(token.into()), ..Default::default() };
    Client::try_from(config).expect("a client with the token")
}

impl Drop for Env {
    /// A panicking cluster scenario still removes its namespaces.
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.namespaces.lock().unwrap());
        if names.is_empty() || matches!(self.backend, Backend::Embedded(_)) {
            return;
        }
        let client = self.client.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let api: Api<Namespace> = Api::all(client);
                for name in names {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                }
            });
        })
        .join();
    }
}

/// Declares scenarios: each runs on the embedded API, and (ignored by default) on a cluster.
#[macro_export]
macro_rules! scenarios {
    ($(async fn $name:ident($env:ident: &Env) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn scenario($env: &$crate::support::Env) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                let env = $crate::support::Env::embedded().await;
                scenario(&env).await;
                env.cleanup().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "needs a cluster: IMS_E2E=1 KUBECONFIG=... cargo test -- --ignored"]
            async fn cluster() {
                let env = $crate::support::Env::cluster().await;
                scenario(&env).await;
                env.cleanup().await;
            }
        }
    )*};
}

/// A tiny HTTP/1.1 file server on 127.0.0.1 for import scenarios: `GET /<name>` answers the
/// file's bytes; unknown names answer 404.
pub async fn serve_files(dir: std::path::PathBuf) -> std::net::SocketAddr {
    serve(move |name| {
        let bytes = std::fs::read(dir.join(name)).ok().filter(|_| !name.contains(".."))?;
        Some((std::sync::Arc::new(bytes), Duration::ZERO))
    })
    .await
}

/// A tiny HTTP/1.1 server on 127.0.0.1: `GET /<name>` answers the bytes `lookup` gives for the
/// name, 64 KiB at a time with the pause it gives after each (zero: at once); `None` answers 404.
pub async fn serve<F>(lookup: F) -> std::net::SocketAddr
where
    F: Fn(&str) -> Option<(std::sync::Arc<Vec<u8>>, Duration)> + Send + Sync + 'static,
{
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let lookup = std::sync::Arc::new(lookup);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let lookup = lookup.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let Ok(Some(request)) = lines.next_line().await else { return };
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.is_empty() {
                        break;
                    }
                }
                let name = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
                let Some((bytes, pause)) = lookup(&name) else {
                    let _ = write
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", bytes.len());
                if write.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for chunk in bytes.chunks(64 << 10) {
                    if write.write_all(chunk).await.is_err() {
                        return;
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            });
        }
    });
    addr
}

/// Every file below `dir` (a region's file store).
pub fn stored_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() { stack.push(e.path()) } else { out.push(e.path()) }
        }
    }
    out
}

/// An Image whose Ready condition has this reason.
pub fn reason_is(reason: &'static str) -> impl Condition<api::Image> {
    move |i: Option<&api::Image>| {
        i.and_then(|i| i.status.as_ref())
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.reason == reason)
    }
}

/// A Region with a `file://` store named after it (server-side apply).
pub async fn region(env: &Env, name: &str) {
    let regions: Api<api::Region> = Api::all(env.client.clone());
    let r = serde_json::json!({"apiVersion": "ims.io/v1alpha1", "kind": "Region", "metadata": {"name": name},
        "spec": {"storage": {"url": format!("file:///var/lib/ims/{name}")}}});
    regions.patch(name, &PatchParams::apply("test"), &Patch::Apply(r)).await.expect("apply Region");
}

/// Server-side applies a manifest (forcing ownership: the test is the only writer of spec).
pub async fn apply<K>(api: &Api<K>, manifest: serde_json::Value)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let name = manifest["metadata"]["name"].as_str().expect("metadata.name").to_string();
    api.patch(&name, &PatchParams::apply("test").force(), &Patch::Apply(manifest)).await.expect("apply");
}

/// Waits until the Region is Ready.
pub async fn region_ready(env: &Env, name: &str) {
    let regions: Api<api::Region> = Api::all(env.client.clone());
    env.wait_for(&regions, name, |r: Option<&api::Region>| {
        r.and_then(|r| r.status.as_ref())
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await;
}

/// What a GET of `url` answered: its status, headers, and body (read whole).
pub async fn http_get(url: &str, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, Vec<u8>) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut request = http::Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client.request(request.body(Default::default()).expect("a request")).await.expect("an answer");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the whole body").to_bytes().to_vec();
    (parts.status.as_u16(), parts.headers, body)
}

/// Whether a Warning Event with `reason` about the object `regarding` is in `namespace`, waiting
/// up to 10 s for it (Events are published after the status write that they announce).
pub async fn warned(env: &Env, namespace: &str, reason: &str, regarding: &str) -> bool {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), namespace);
    for _ in 0..100 {
        let list = events.list(&Default::default()).await.expect("list Events");
        if list.items.iter().any(|e| {
            e.reason.as_deref() == Some(reason)
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding)
        }) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The value of the sample `series` (name and labels exactly) in a metrics exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')?.trim().parse().ok()))
}

/// Whether `qemu-img` runs here; without it a scenario that needs it says so and skips, unless
/// `IMS_REQUIRE_QEMU_IMG` is set (`.ci/run` sets it), which makes it fail.
pub fn have_qemu_img() -> bool {
    let ok = std::process::Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("IMS_REQUIRE_QEMU_IMG").is_none(),
            "qemu-img is required (IMS_REQUIRE_QEMU_IMG is set) but was not found"
        );
        eprintln!("qemu-img is not installed: skipping this scenario");
    }
    ok
}

/// Where `stored` holds a run of `run` bytes of `source`, if it does: every aligned `run / 2`
/// block of the source is looked for at every offset of the stored bytes (a run of `run` bytes
/// holds a whole aligned block of half its length), with a rolling hash; a block found is grown
/// both ways as far as the bytes agree, and counts when that reaches `run` bytes.
pub fn shared_run(stored: &[u8], source: &[u8], run: usize) -> Option<usize> {
    let block = run / 2;
    const B: u64 = 1_000_003;
    let hash = |bytes: &[u8]| bytes.iter().fold(0u64, |h, b| h.wrapping_mul(B).wrapping_add(*b as u64));
    let blocks: std::collections::HashMap<u64, Vec<usize>> =
        source.chunks_exact(block).enumerate().fold(Default::default(), |mut m, (i, c)| {
            m.entry(hash(c)).or_default().push(i * block);
            m
        });
    if stored.len() < block {
        return None;
    }
    let top = (0..block - 1).fold(1u64, |p, _| p.wrapping_mul(B));
    let mut h = hash(&stored[..block]);
    for at in 0..=stored.len() - block {
        if at > 0 {
            h = h
                .wrapping_sub((stored[at - 1] as u64).wrapping_mul(top))
                .wrapping_mul(B)
                .wrapping_add(stored[at + block - 1] as u64);
        }
        // A matching block, grown both ways as far as the bytes agree: a run if that reaches `run`.
        let grown = |o: usize| {
            let back = (1..=at.min(o)).take_while(|k| stored[at - k] == source[o - k]).count();
            let ahead =
                (0..(stored.len() - at).min(source.len() - o)).take_while(|k| stored[at + k] == source[o + k]).count();
            back + ahead
        };
        if let Some(offsets) = blocks.get(&h)
            && offsets.iter().take(64).any(|o| source[*o..*o + block] == stored[at..at + block] && grown(*o) >= run)
        {
            return Some(at);
        }
    }
    None
}

/// The local KMS keys: the Secret `ims-system/ims-kms-keys` with these entries.
pub async fn kms_keys(env: &Env, keys: &[(&str, [u8; 32])]) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.client.clone(), "ims-system");
    let data: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .map(|(id, key)| {
            (id.to_string(), serde_json::json!(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key)))
        })
        .collect();
    let secret =
        serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ims-kms-keys"}, "data": data});
    secrets
        .patch("ims-kms-keys", &kube::api::PatchParams::apply("test").force(), &kube::api::Patch::Apply(secret))
        .await
        .expect("apply the KMS keys");
}

/// [`http_get`] of the URL of an image a scenario has just seen Active: the operator's own
/// watch cache can be a moment behind the scenario's, and the image server answers from it,
/// so a `404` is retried for a few seconds.
pub async fn http_get_active(url: &str, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, Vec<u8>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = http_get(url, headers).await;
        if answer.0 != 404 || std::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status code of `url` once the operator's cache has caught up with an image the scenario
/// has just seen go Unavailable: `503` (its key refused) may come first, then `404`.
pub async fn http_code_unavailable(url: &str) -> u16 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let code = http_get(url, &[]).await.0;
        if code != 503 || std::time::Instant::now() > deadline {
            return code;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A qcow2 with data in it (`mib` MiB of a pattern; a convert or a format check has something
/// to get right): writes `dir/src.raw` and `dir/disk.qcow2` and returns (qcow2 bytes, raw bytes).
pub fn qcow2_with_data(dir: &std::path::Path, mib: u32) -> (Vec<u8>, Vec<u8>) {
    let raw = dir.join("src.raw");
    let pattern: Vec<u8> = (0..mib << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&raw, &pattern).unwrap();
    let out = dir.join("disk.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&out)
        .status()
        .expect("qemu-img runs");
    assert!(made.success(), "qemu-img convert");
    (std::fs::read(&out).unwrap(), pattern)
}
