//! `ims-operator local`: the whole operator on the embedded API, no cluster needed.
//!
//! Applies a directory of manifests (Namespaces and Regions first) with server-side apply, runs
//! every controller until the objects settle, and prints what a user would see with
//! `kubectl get ims -A`. `--check` turns it into a GitOps pre-merge check; `--serve` keeps the
//! API up for kubectl.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
    core::ApiResource,
};
use kube_embedded::ApiServer;
use serde_json::Value;

use crate::{
    api::conditions::ConditionType,
    controllers::{self, Config},
    policy::Policy,
    store::StoreConfig,
};

/// Field manager of the objects `local` applies (as `kubectl apply --server-side` would).
pub const FIELD_MANAGER: &str = "ims-local";

/// One manifest document, with where it came from.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// File and document number, for messages.
    pub origin: String,
    /// The object.
    pub object: Value,
}

/// `file://./path` image URLs, and `./path` paths of PersistentVolumes (`hostPath`, `local`: the
/// disks a capture reads), are relative to the manifest's directory: `local` makes them absolute
/// before applying (a local convenience, like kustomize's relative paths).
pub fn resolve_relative_files(object: &mut Value, dir: &Path) {
    if object.get("kind").and_then(Value::as_str) == Some("PersistentVolume") {
        for pointer in ["/spec/hostPath/path", "/spec/local/path"] {
            if let Some(path) = object.pointer_mut(pointer)
                && let Some(rest) = path.as_str().and_then(|p| p.strip_prefix("./"))
            {
                let joined = dir.join(rest);
                let joined = std::fs::canonicalize(&joined).unwrap_or(joined);
                *path = Value::String(joined.display().to_string());
            }
        }
        return;
    }
    let absolute = |url: &mut Value| {
        if let Some(rest) = url.as_str().and_then(|u| u.strip_prefix("file://./")) {
            let path = dir.join(rest);
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            *url = Value::String(format!("file://{}", path.display()));
        }
    };
    if let Some(url) = object.pointer_mut("/spec/source/url/url") {
        absolute(url);
    }
    if let Some(disks) = object.pointer_mut("/spec/source/disks").and_then(Value::as_array_mut) {
        for disk in disks {
            if let Some(url) = disk.get_mut("url") {
                absolute(url);
            }
        }
    }
}

/// Why `local` could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The manifest directory or a file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// Path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A document is not YAML, or not a Kubernetes object.
    #[error("{origin}: {reason}")]
    Manifest {
        /// File and document.
        origin: String,
        /// What to change.
        reason: String,
    },
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file of `dir` (sorted by name; not recursive), one
/// manifest per YAML document; empty documents are skipped. A single file works too.
pub fn read_manifests(dir: &Path) -> Result<Vec<Manifest>, LocalError> {
    let read_err = |path: &Path, e: &dyn std::fmt::Display| LocalError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut files: Vec<PathBuf> = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        std::fs::read_dir(dir)
            .map_err(|e| read_err(dir, &e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
            .collect()
    };
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| read_err(&file, &e))?;
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let origin = format!("{} (document {})", file.display(), i + 1);
            let value: Value = serde::Deserialize::deserialize(doc)
                .map_err(|e| LocalError::Manifest { origin: origin.clone(), reason: format!("not valid YAML: {e}") })?;
            if value.is_null() {
                continue;
            }
            for field in ["apiVersion", "kind"] {
                if value.get(field).and_then(Value::as_str).is_none_or(str::is_empty) {
                    return Err(LocalError::Manifest { origin, reason: format!("`{field}` is missing") });
                }
            }
            if value.pointer("/metadata/name").and_then(Value::as_str).is_none_or(str::is_empty) {
                return Err(LocalError::Manifest { origin, reason: "`metadata.name` is missing".into() });
            }
            let mut value = value;
            resolve_relative_files(&mut value, file.parent().unwrap_or(Path::new(".")));
            out.push(Manifest { origin, object: value });
        }
    }
    Ok(out)
}

/// Apply order: Namespaces, then Regions, then the rest in file order (as `kubectl apply`
/// users expect, and so references resolve on the first pass).
pub fn apply_order(manifests: &mut [Manifest]) {
    manifests.sort_by_key(|m| match m.object.get("kind").and_then(Value::as_str) {
        Some("Namespace") => 0,
        Some("Region") => 1,
        _ => 2,
    });
}

/// The outcome of applying one manifest.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Kind.
    pub kind: String,
    /// Namespace ("" when cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The API server's refusal, if any.
    pub error: Option<String>,
}

/// Applies manifests with server-side apply, creating namespaces that objects name but no
/// manifest declares (as Argo CD's `CreateNamespace=true` does).
pub async fn apply_all(server: &ApiServer, client: &kube::Client, manifests: &[Manifest]) -> Vec<Applied> {
    let mut out = Vec::new();
    let mut known_namespaces: Vec<String> = Vec::new();
    for manifest in manifests {
        let obj = &manifest.object;
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let kind_name = obj["kind"].as_str().unwrap_or_default();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let mut applied =
            Applied { kind: kind_name.to_string(), namespace: String::new(), name: name.clone(), error: None };
        let Some(kind) = server.kinds().iter().find(|k| k.api_version() == api_version && k.kind == kind_name) else {
            applied.error =
                Some(format!("{api_version} {kind_name} is not served by the embedded API (from {})", manifest.origin));
            out.push(applied);
            continue;
        };
        let resource = ApiResource {
            group: kind.group.clone(),
            version: kind.version.clone(),
            api_version: kind.api_version(),
            kind: kind.kind.clone(),
            plural: kind.plural.clone(),
        };
        let api: Api<DynamicObject> = if kind.namespaced {
            let ns = obj["metadata"]["namespace"].as_str().filter(|n| !n.is_empty()).unwrap_or("default").to_string();
            if !known_namespaces.contains(&ns) {
                ensure_namespace(client, &ns).await;
                known_namespaces.push(ns.clone());
            }
            applied.namespace = ns.clone();
            Api::namespaced_with(client.clone(), &ns, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        if let Err(e) = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await {
            applied.error = Some(match e {
                kube::Error::Api(status) => status.message,
                other => other.to_string(),
            });
        }
        out.push(applied);
    }
    out
}

/// The local KMS keys the manifests name (`spec.encryption.kmsKeyID` of Images,
/// `spec.destination.encryption.kmsKeyID` of ImageCopies): the Secret `ims-kms-keys` of
/// `ims-system` with 32 random bytes for each, unless the manifests declare that Secret.
async fn ensure_kms_keys(client: &kube::Client, manifests: &[Manifest]) -> Result<(), Box<dyn std::error::Error>> {
    use crate::crypt::kms::DEFAULT_SECRET;
    let declared = manifests.iter().any(|m| {
        m.object.get("kind").and_then(Value::as_str) == Some("Secret")
            && m.object.pointer("/metadata/name").and_then(Value::as_str) == Some(DEFAULT_SECRET)
    });
    let ids: std::collections::BTreeSet<&str> = manifests
        .iter()
        .flat_map(|m| {
            ["/spec/encryption/kmsKeyID", "/spec/destination/encryption/kmsKeyID"].map(|p| m.object.pointer(p))
        })
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if declared || ids.is_empty() {
        return Ok(());
    }
    let random = ring::rand::SystemRandom::new();
    let mut data = serde_json::Map::new();
    for id in &ids {
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&random, &mut key).map_err(|_| "the system's random source failed")?;
        data.insert(
            id.to_string(),
            Value::String(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key)),
        );
    }
    let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": DEFAULT_SECRET, "namespace": "ims-system"}, "data": data});
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "ims-system");
    api.patch(DEFAULT_SECRET, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&secret)).await?;
    let names: Vec<&str> = ids.into_iter().collect();
    eprintln!(
        "ims-operator local: KMS keys {} (random, provider Local) in Secret ims-system/{DEFAULT_SECRET}",
        names.join(", ")
    );
    Ok(())
}

async fn ensure_namespace(client: &kube::Client, name: &str) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    if api.get_opt(name).await.ok().flatten().is_none() {
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        let _ = api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&ns)).await;
    }
}

/// One row of the settled table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Kind.
    pub kind: String,
    /// Namespace ("" for cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `status.phase`, or Ready/NotReady for kinds without phases, or Rejected.
    pub phase: String,
    /// Reason of the Ready condition (or of the rejection).
    pub reason: String,
    /// Human message.
    pub message: String,
    /// Whether the object has settled (kstatus "Current" or failed): it has a status for its
    /// latest spec and no work in progress.
    pub settled: bool,
    /// An image's `status.location.url` ("" when it has none).
    pub url: String,
}

impl Row {
    /// Whether the row is a failure `--check` reports.
    pub fn failed(&self) -> bool {
        matches!(self.phase.as_str(), "Failed" | "Rejected" | "Stalled")
    }
}

/// Whether an object has settled: it has a status, for its latest generation, with no
/// `Reconciling` condition and no phase of work in progress.
fn settled(obj: &Value) -> bool {
    let Some(status) = obj.get("status").filter(|s| s.as_object().is_some_and(|s| !s.is_empty())) else {
        return false;
    };
    let observed = status.get("observedGeneration").and_then(Value::as_i64);
    let generation = obj.pointer("/metadata/generation").and_then(Value::as_i64);
    let reconciling = condition(obj, ConditionType::Reconciling).is_some_and(|c| c["status"] == "True");
    let working = matches!(
        status.get("phase").and_then(Value::as_str),
        Some("Queued" | "Saving" | "Pending" | "Copying" | "Deleting")
    );
    (observed.is_none() || observed == generation) && !reconciling && !working
}

fn condition(obj: &Value, typ: ConditionType) -> Option<&Value> {
    obj.pointer("/status/conditions")?.as_array()?.iter().find(|c| c["type"] == typ.as_str())
}

/// What `kubectl get ims -A` would show of one object.
pub fn row(kind: &str, obj: &Value) -> Row {
    let ready = condition(obj, ConditionType::Ready);
    let stalled = condition(obj, ConditionType::Stalled).is_some_and(|c| c["status"] == "True");
    let phase = match obj.pointer("/status/phase").and_then(Value::as_str) {
        Some(p) => p.to_string(),
        None if stalled => "Stalled".into(),
        None => match ready.and_then(|c| c["status"].as_str()) {
            Some("True") => "Ready".into(),
            Some(_) => "NotReady".into(),
            None => "-".into(),
        },
    };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    Row {
        kind: kind.to_string(),
        namespace: text(obj.pointer("/metadata/namespace")),
        name: text(obj.pointer("/metadata/name")),
        phase,
        reason: text(ready.and_then(|c| c.get("reason"))),
        // An ImageQuota has no conditions: its summary line is what a person wants to see.
        message: match obj.pointer("/status/summary") {
            Some(summary) if ready.is_none() => text(Some(summary)),
            _ => text(ready.and_then(|c| c.get("message"))),
        },
        settled: settled(obj),
        url: text(obj.pointer("/status/location/url")),
    }
}

/// Every ims object, as rows ordered by kind, namespace and name.
pub async fn rows(server: &ApiServer, client: &kube::Client) -> Vec<Row> {
    let mut out = Vec::new();
    for kind in server.kinds().iter().filter(|k| k.group == crate::api::GROUP) {
        let resource = ApiResource {
            group: kind.group.clone(),
            version: kind.version.clone(),
            api_version: kind.api_version(),
            kind: kind.kind.clone(),
            plural: kind.plural.clone(),
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        if let Ok(list) = api.list(&Default::default()).await {
            for item in list.items {
                let value = serde_json::to_value(&item).unwrap_or_default();
                out.push(row(&kind.kind, &value));
            }
        }
    }
    out
}

/// Formats rows as a `kubectl get`-style table; `wide` adds each image's URL.
pub fn table(rows: &[Row], wide: bool) -> String {
    let mut header = vec!["KIND", "NAMESPACE", "NAME", "PHASE", "REASON", "MESSAGE"];
    if wide {
        header.push("URL");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let ns = if r.namespace.is_empty() { "-".to_string() } else { r.namespace.clone() };
            let mut message = r.message.clone();
            if message.chars().count() > 80 {
                message = message.chars().take(77).collect::<String>() + "...";
            }
            let mut row = vec![r.kind.clone(), ns, r.name.clone(), r.phase.clone(), r.reason.clone(), message];
            if wide {
                row.push(if r.url.is_empty() { "-".into() } else { r.url.clone() });
            }
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut push = |cols: Vec<&str>| {
        let line: Vec<String> = cols.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    };
    push(header.clone());
    for row in &cells {
        push(row.iter().map(String::as_str).collect());
    }
    out
}

/// Waits until the API has seen no change for `quiet`, or `timeout` passes. Returns whether it
/// settled.
pub async fn settle(server: &ApiServer, quiet: Duration, timeout: Duration) -> bool {
    let start = Instant::now();
    let mut last = server.resource_version();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = server.resource_version();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
    }
}

/// Flags of `local`.
#[derive(clap::Args, Debug, Clone)]
pub struct LocalArgs {
    /// Directory (or file) of manifests to apply.
    #[arg(short = 'f', long = "filename", env = "IMS_LOCAL_MANIFESTS", default_value = "examples", value_name = "DIR")]
    pub manifests: PathBuf,
    /// Where region stores and local state live: a Region's `file:///var/lib/ims/<region>` is
    /// `<data-dir>/stores/<region>`.
    #[arg(long, env = "IMS_DATA_DIR", default_value = ".ims", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Exit non-zero when any object ends Failed or Stalled, is rejected, or has not settled
    /// by `--timeout` (for GitOps CI); the objects and why are listed.
    #[arg(long, env = "IMS_LOCAL_CHECK")]
    pub check: bool,
    /// Keep running and serve the API on this address for kubectl (a kubeconfig is written
    /// into the data directory).
    #[arg(long, env = "IMS_LOCAL_SERVE", value_name = "ADDR")]
    pub serve: Option<std::net::SocketAddr>,
    /// Give up waiting for objects to settle after this many seconds.
    #[arg(long, env = "IMS_LOCAL_TIMEOUT", default_value_t = 300, value_name = "SECONDS")]
    pub timeout: u64,
    /// The platform namespace: the only one whose images may be `visibility: Public`.
    #[arg(long, env = "IMS_PUBLIC_NAMESPACE", default_value = "ims-public")]
    pub public_namespace: String,
    /// Policy file (YAML) overriding the default limits.
    #[arg(long, env = "IMS_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Serve image bytes here while `local` runs (every Active image's URL points at it); when
    /// the port is taken, another free one on the same address is used.
    #[arg(long, env = "IMS_IMAGE_SERVER_ADDR", default_value = "127.0.0.1:8081", value_name = "ADDR")]
    pub image_server_addr: std::net::SocketAddr,
    /// Output format: `wide` adds each image's URL (`status.location.url`), like `kubectl get -o wide`.
    #[arg(short = 'o', long = "output", env = "IMS_LOCAL_OUTPUT", value_enum, value_name = "FORMAT")]
    pub output: Option<Output>,
}

/// `local -o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// The table with a URL column.
    Wide,
}

/// The image server's listener: `addr`, or a free port of the same address when it is taken.
async fn bind_images(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
            tokio::net::TcpListener::bind(std::net::SocketAddr::new(addr.ip(), 0)).await
        }
        Err(e) => Err(e),
    }
}

/// Writes a kubeconfig for the served API.
pub fn write_kubeconfig(path: &Path, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ims-local\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: ims-local\n  context:\n    cluster: ims-local\n    user: ims-local\n    namespace: default\ncurrent-context: ims-local\nusers:\n- name: ims-local\n  user: {{}}\n"
    );
    std::fs::write(path, text)
}

/// Runs `local`; returns the process exit code.
pub async fn run(args: LocalArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let policy = match &args.policy {
        Some(path) => Policy::from_file(path)?,
        None => Policy::default(),
    };
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| LocalError::Read { path: args.data_dir.display().to_string(), reason: e.to_string() })?;
    let mut manifests = read_manifests(&args.manifests)?;
    apply_order(&mut manifests);
    eprintln!("ims-operator local: {} manifests from {}", manifests.len(), args.manifests.display());

    let server = crate::api::embedded();
    let client = server.client();
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let images = bind_images(args.image_server_addr).await.map_err(|e| {
        format!(
            "cannot listen on {} for the image server: {e}; choose another --image-server-addr",
            args.image_server_addr
        )
    })?;
    let images_at = images.local_addr()?;
    // The operator's namespace holds the image key Secret.
    ensure_namespace(&client, "ims-system").await;
    ensure_kms_keys(&client, &manifests).await?;
    let config = Config {
        policy,
        public_namespace: args.public_namespace.clone(),
        operator_namespace: "ims-system".into(),
        stores: StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: data_dir.join("stores") },
        // Locally, images may come from files next to the manifests.
        fetch: crate::fetch::FetchPolicy {
            allow_file: true,
            file_roots: vec![std::fs::canonicalize(if args.manifests.is_file() {
                args.manifests.parent().unwrap_or(std::path::Path::new("."))
            } else {
                &args.manifests
            })?],
            ..Default::default()
        },
        progress_every: Duration::from_secs(2),
        readiness: Default::default(),
        metrics: Default::default(),
        delivery: Some(crate::delivery::DeliveryConfig {
            listener: std::sync::Arc::new(images),
            base_url: format!("http://{images_at}"),
            key_secret: crate::delivery::key::DEFAULT_SECRET.into(),
            tls_secret: None,
            limits: Default::default(),
        }),
        // Claims bound to hostPath or local volumes are read here, where those paths are.
        capture_in_process: true,
        mover: None,
    };
    eprintln!("serving images on http://{images_at} while this runs");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controllers = tokio::spawn(controllers::run(client.clone(), config, async move {
        let _ = stop_rx.await;
    }));

    let applied = apply_all(&server, &client, &manifests).await;
    let rejected: Vec<&Applied> = applied.iter().filter(|a| a.error.is_some()).collect();
    eprintln!(
        "applied {} objects, {} rejected; waiting for them to settle...",
        applied.len() - rejected.len(),
        rejected.len()
    );
    // Settled: nothing changed for a while and every object is settled (a retry with a long
    // backoff changes nothing for a while too), or the timeout passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(args.timeout);
    let current = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let quiet = settle(&server, Duration::from_secs(2), left).await;
        let current = rows(&server, &client).await;
        if (quiet && current.iter().all(|r| r.settled)) || left.is_zero() {
            break current;
        }
        tokio::time::sleep(Duration::from_millis(500).min(left)).await;
    };
    let unsettled: Vec<&Row> = current.iter().filter(|r| !r.settled && !r.failed()).collect();
    if !unsettled.is_empty() {
        eprintln!(
            "warning: {} object(s) not settled after {}s; showing the current state",
            unsettled.len(),
            args.timeout
        );
    }
    let mut table_rows: Vec<Row> = rejected
        .iter()
        .map(|a| Row {
            kind: a.kind.clone(),
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            phase: "Rejected".into(),
            reason: "Invalid".into(),
            message: a.error.clone().unwrap_or_default(),
            settled: true,
            url: String::new(),
        })
        .collect();
    table_rows.extend(current.iter().cloned());
    print!("{}", table(&table_rows, args.output == Some(Output::Wide)));
    if args.output != Some(Output::Wide) && args.serve.is_some() {
        eprintln!("(-o wide shows each image's URL)");
    }
    for a in &rejected {
        eprintln!("rejected {} {}/{}: {}", a.kind, a.namespace, a.name, a.error.as_deref().unwrap_or_default());
    }

    if let Some(addr) = args.serve {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let kubeconfig = args.data_dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, bound)?;
        eprintln!(
            "serving the API on http://{bound}; try:\n  export KUBECONFIG={}\n  kubectl get ims -A\n(Ctrl-C to stop)",
            kubeconfig.display()
        );
        let serving = server.clone();
        tokio::select! {
            _ = serving.serve(listener) => {},
            _ = crate::signal::shutdown_signal() => {},
        }
    }
    let _ = stop_tx.send(());
    let _ = controllers.await;
    let failed: Vec<&Row> = table_rows.iter().filter(|r| r.failed()).collect();
    let unsettled: Vec<&Row> = table_rows.iter().filter(|r| !r.settled && !r.failed()).collect();
    if args.check && !(failed.is_empty() && unsettled.is_empty()) {
        eprintln!(
            "check failed: {} object(s) Failed, Stalled or Rejected, {} not settled after {}s:",
            failed.len(),
            unsettled.len(),
            args.timeout
        );
        for r in failed.iter().chain(&unsettled) {
            let name = if r.namespace.is_empty() { r.name.clone() } else { format!("{}/{}", r.namespace, r.name) };
            eprintln!("  {} {name}: {} {}: {}", r.kind, r.phase, r.reason, r.message);
        }
        return Ok(1);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_file_urls_resolve_against_the_manifest_directory() {
        let mut obj = serde_json::json!({"spec": {"source": {"url": {"url": "file://./images/a.raw"}}}});
        resolve_relative_files(&mut obj, Path::new("/srv/manifests"));
        assert_eq!(obj["spec"]["source"]["url"]["url"], "file:///srv/manifests/images/a.raw");
        let mut disks =
            serde_json::json!({"spec": {"source": {"disks": [{"url": "file://./d.qcow2"}, {"url": "https://x/y"}]}}});
        resolve_relative_files(&mut disks, Path::new("/m"));
        assert_eq!(disks["spec"]["source"]["disks"][0]["url"], "file:///m/d.qcow2");
        assert_eq!(disks["spec"]["source"]["disks"][1]["url"], "https://x/y", "other URLs are left alone");
    }

    #[test]
    fn table_aligns_columns_like_kubectl() {
        let rows = vec![
            Row {
                kind: "Region".into(),
                namespace: "".into(),
                name: "eu-west".into(),
                phase: "Ready".into(),
                reason: "StoreReady".into(),
                message: "".into(),
                settled: true,
                url: "".into(),
            },
            Row {
                kind: "Image".into(),
                namespace: "tenant-a".into(),
                name: "ubuntu".into(),
                phase: "Active".into(),
                reason: "Active".into(),
                message: "ok".into(),
                settled: true,
                url: "http://127.0.0.1:8081/v1/images/t/u".into(),
            },
        ];
        let text = table(&rows, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "KIND     NAMESPACE   NAME      PHASE    REASON       MESSAGE");
        assert_eq!(lines[1], "Region   -           eu-west   Ready    StoreReady");
        assert_eq!(lines[2], "Image    tenant-a    ubuntu    Active   Active       ok");
        let wide = table(&rows, true);
        let lines: Vec<&str> = wide.lines().collect();
        assert_eq!(lines[0], "KIND     NAMESPACE   NAME      PHASE    REASON       MESSAGE   URL");
        assert_eq!(lines[1], "Region   -           eu-west   Ready    StoreReady             -");
        assert_eq!(
            lines[2],
            "Image    tenant-a    ubuntu    Active   Active       ok        http://127.0.0.1:8081/v1/images/t/u"
        );
    }

    /// Settled: a status for the latest generation, nothing in progress.
    #[test]
    fn an_object_is_settled_when_its_status_is_current_and_nothing_is_in_progress() {
        let obj = |status: Value| serde_json::json!({"metadata": {"generation": 2}, "status": status});
        let reconciling = serde_json::json!([{"type": "Reconciling", "status": "True"}]);
        let cases = [
            (serde_json::json!({"phase": "Active", "observedGeneration": 2}), true),
            (serde_json::json!({"phase": "Failed", "observedGeneration": 2}), true),
            (serde_json::json!({"phase": "Active", "observedGeneration": 1}), false),
            (serde_json::json!({"phase": "Saving", "observedGeneration": 2}), false),
            (serde_json::json!({"phase": "Pending"}), false),
            (serde_json::json!({"observedGeneration": 2, "conditions": reconciling}), false),
            (serde_json::json!({"summary": "eu-west: 1/50 images"}), true),
            (serde_json::json!({}), false),
        ];
        for (status, want) in cases {
            assert_eq!(settled(&obj(status.clone())), want, "{status}");
        }
        assert!(!settled(&serde_json::json!({"metadata": {"generation": 1}})), "no status yet");
    }

    #[test]
    fn namespaces_and_regions_are_applied_first() {
        let m = |kind: &str| Manifest { origin: kind.into(), object: serde_json::json!({"kind": kind}) };
        let mut list = vec![m("Image"), m("Region"), m("ImageShare"), m("Namespace")];
        apply_order(&mut list);
        let kinds: Vec<&str> = list.iter().map(|m| m.object["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["Namespace", "Region", "Image", "ImageShare"]);
    }

    #[test]
    fn rows_take_phase_or_ready_condition() {
        let img = serde_json::json!({"metadata": {"name": "a", "namespace": "t"}, "status": {"phase": "Failed", "conditions": [{"type": "Ready", "status": "False", "reason": "ChecksumMismatch", "message": "m"}]}});
        let r = row("Image", &img);
        assert_eq!((r.phase.as_str(), r.reason.as_str(), r.failed()), ("Failed", "ChecksumMismatch", true));
        let region = serde_json::json!({"metadata": {"name": "r"}, "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "StoreReady"}]}});
        assert_eq!(row("Region", &region).phase, "Ready");
        assert_eq!(row("Region", &serde_json::json!({"metadata": {"name": "r"}})).phase, "-");
    }

    #[test]
    fn bad_manifests_name_the_file_and_the_problem() {
        let dir = std::env::temp_dir().join(format!("ims-local-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\nkind: Image\n")
            .unwrap();
        let err = read_manifests(&dir).unwrap_err().to_string();
        assert!(err.ends_with("a.yaml (document 2): `apiVersion` is missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
