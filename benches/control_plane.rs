//! The control-plane benchmark (not a timed test): the operator, run as `ims-operator run` with
//! exactly `deploy/`'s RBAC, against the real API server of `KUBECONFIG` (admin), at scale.
//!
//! ```sh
//! ../shared/kube/kube-up.sh --fresh && export KUBECONFIG=/tmp/ims-kube/kubeconfig
//! cargo bench --bench control_plane -- --references 500 --tenants 10 --owned 100 --room 30 --steady-secs 10
//! cargo bench --bench control_plane                     # full size: 10,000 references, 1,000 owned
//! ```
//!
//! Setup (not timed): the CRDs (`ims-operator crds | kubectl apply --server-side -f -`), and
//! `deploy/{namespace,serviceaccount,rbac,tenant-rbac,flowschema}.yaml`; a token of the ServiceAccount
//! `ims-system/ims-operator` in a kubeconfig of its own; the operator as a child process
//! (`--allow-file-imports`, a temporary `--file-store-root`, leader election on, JSON log to a
//! file); a Region with a `file://` store under that root, waited Ready.
//!
//! What is measured, each with the same client-side concurrency (`--concurrency`, 64):
//! - **floor**: a copy of the Image CRD under group `bench.ims.io` (same schema, status
//!   subresource, no controller); N creates plus one status write each. What a bare client needs
//!   for N objects: the operator cannot beat it.
//! - **references**: one Public DataDisk image (1 MiB raw, `file://`) in `ims-public`, then
//!   `--references` references spread over `--tenants` namespaces, all created at once; time
//!   from the first create to all Active (a watch), ratio to the floor, the operator's writes
//!   per reference (from `apiserver_request_total`, the bench's own creates subtracted), its
//!   RSS, and its writes during `--steady-secs` of steady state afterwards (should be 0).
//! - **owned**: `--owned` imports (1 MiB raw, `file://`) in a namespace whose ImageQuota has
//!   room for all: time to all Active. Then the same in a namespace with room for `--room`: time
//!   to settle (exactly `room` Active, the rest Queued/QuotaExceeded), whether the admitted ones
//!   are the oldest (by creationTimestamp, then name), 409s on imagequotas per admitted image,
//!   ledger writes, and whether the operator lost its Lease meanwhile (`spec.leaseTransitions`
//!   counts holder changes only: a lease lost and retaken by the same operator shows in its log,
//!   "leadership lost", which is counted too).
//!
//! Writes counted: POST/PUT/PATCH/APPLY/DELETE on group `ims.io` and on events (core and
//! `events.k8s.io`); leases are left out (the controller-manager renews its own too). Each
//! workload has a deadline (`--timeout-secs`); a timeout is reported with the counts reached.
//! Everything the bench made is deleted at the end, and the operator stopped, also on failure.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Namespace};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};

mod common;

const OPERATOR: &str = env!("CARGO_BIN_EXE_ims-operator");
const RUN_LABEL: &str = "ims-bench/run";

#[derive(Parser, Debug)]
#[command(about = "ims-operator against a real API server: floor, references, owned images")]
struct Args {
    /// References created in the references workload.
    #[arg(long, default_value_t = 10_000)]
    references: usize,
    /// Tenant namespaces the references are spread over.
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Owned images created in each owned run.
    #[arg(long, default_value_t = 1_000)]
    owned: usize,
    /// privateImagesPerRegion of the constrained owned run.
    #[arg(long, default_value_t = 300)]
    room: usize,
    /// Requests the bench has in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of steady state after the references are Active.
    #[arg(long, default_value_t = 60)]
    steady_secs: u64,
    /// Deadline of each workload, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Run one workload only.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    cargo: common::CargoBench,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Only {
    References,
    Owned,
}

type Res<T> = Result<T, String>;

trait Ctx<T> {
    fn ctx(self, what: &str) -> Res<T>;
}
impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[control_plane] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------------
// Report: rows of (section, key, value), printed as a table and written as JSON.

#[derive(Default)]
struct Report(Vec<(String, String, Value)>);

impl Report {
    fn add(&mut self, section: &str, key: &str, value: impl Into<Value>) {
        let value = value.into();
        log(format!("{section}: {key} = {value}"));
        self.0.push((section.into(), key.into(), value));
    }
    fn print(&self) {
        let mut last = "";
        println!("\n{:<58} value", "figure");
        for (section, key, value) in &self.0 {
            if section != last {
                println!("── {section} {}", "─".repeat(60usize.saturating_sub(section.len())));
                last = section;
            }
            let shown = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) if n.is_f64() => format!("{:.3}", n.as_f64().unwrap_or_default()),
                other => other.to_string(),
            };
            println!("  {key:<56} {shown}");
        }
    }
    fn json(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (section, key, value) in &self.0 {
            let entry = out.entry(section.clone()).or_insert_with(|| json!({}));
            entry[key.as_str()] = value.clone();
        }
        Value::Object(out)
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------------
// apiserver_request_total: writes by verb and resource, 409s and 429s.

type Counters = HashMap<BTreeMap<String, String>, f64>;

async fn scrape(client: &Client) -> Res<Counters> {
    let req = http::Request::get("/metrics").body(Vec::new()).ctx("request")?;
    let text = client.request_text(req).await.ctx("GET /metrics")?;
    let mut out = Counters::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line["apiserver_request_total{".len()..].rsplit_once("} ") else { continue };
        let labels = labels
            .split("\",")
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
            .collect();
        out.insert(labels, value.parse().unwrap_or(0.0));
    }
    Ok(out)
}

/// Writes between two scrapes on ims.io and events, as "VERB resource[/subresource]" -> count,
/// plus "409 resource" and "429 resource" for conflicts and throttling.
fn writes(before: &Counters, after: &Counters) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (labels, value) in after {
        let delta = (value - before.get(labels).copied().unwrap_or(0.0)).round() as u64;
        let l = |k: &str| labels.get(k).map(String::as_str).unwrap_or("");
        let (group, resource, verb) = (l("group"), l("resource"), l("verb"));
        let ours = group == "ims.io" || (resource == "events" && matches!(group, "" | "events.k8s.io"));
        if delta == 0 || !ours || !matches!(verb, "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION") {
            continue;
        }
        let res =
            if l("subresource").is_empty() { resource.to_string() } else { format!("{resource}/{}", l("subresource")) };
        *out.entry(format!("{verb} {res}")).or_insert(0) += delta;
        if matches!(l("code"), "409" | "429") {
            *out.entry(format!("{} {res}", l("code"))).or_insert(0) += delta;
        }
    }
    out
}

/// Adds the write figures of a workload, per object, the bench's own writes subtracted.
fn add_writes(rep: &mut Report, section: &str, mut w: BTreeMap<String, u64>, own: &[(&str, u64)], per: usize) {
    for (key, n) in own {
        if let Some(v) = w.get_mut(*key) {
            *v = v.saturating_sub(*n);
        }
    }
    let total: u64 = w.iter().filter(|(k, _)| !k.starts_with('4')).map(|(_, v)| v).sum();
    rep.add(section, "operator writes (total)", total);
    rep.add(section, "operator writes per object", round(total as f64 / per.max(1) as f64));
    for (key, n) in w.iter().filter(|(_, n)| **n > 0) {
        let what = if key.starts_with('4') { "responses" } else { "writes" };
        rep.add(section, &format!("{what} {key} (per object)"), format!("{n} ({:.3})", *n as f64 / per.max(1) as f64));
    }
}

// ---------------------------------------------------------------------------------------------
// Creating many objects at once, with retries on throttling and transient errors.

async fn retry<T, Fut: Future<Output = kube::Result<T>>>(
    attempts: &AtomicU64,
    mut f: impl FnMut() -> Fut,
) -> Res<Option<T>> {
    for i in 0..30u64 {
        attempts.fetch_add(1, Ordering::Relaxed);
        match f().await {
            Ok(v) => return Ok(Some(v)),
            // A retried create whose first attempt landed.
            Err(kube::Error::Api(s)) if s.code == 409 && i > 0 => return Ok(None),
            Err(kube::Error::Api(s)) if s.code != 429 && s.code < 500 => {
                return Err(format!("{} ({})", s.message, s.code));
            }
            Err(e) if i == 29 => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50 * (i + 1))).await,
        }
    }
    unreachable!()
}

/// Runs `f(0..n)` with `concurrency` in flight; the first error fails the whole.
async fn run_all<Fut: Future<Output = Res<()>>>(
    n: usize,
    concurrency: usize,
    f: impl FnMut(usize) -> Fut,
) -> Res<Duration> {
    let start = Instant::now();
    futures::stream::iter(0..n).map(f).buffer_unordered(concurrency.max(1)).try_collect::<Vec<()>>().await?;
    Ok(start.elapsed())
}

fn obj(api_version: &str, kind: &str, ns: Option<&str>, name: &str, labels: Value, rest: Value) -> DynamicObject {
    let mut v = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "labels": labels}});
    if let Some(ns) = ns {
        v["metadata"]["namespace"] = ns.into();
    }
    v.as_object_mut().unwrap().extend(rest.as_object().cloned().unwrap_or_default());
    serde_json::from_value(v).expect("a valid object")
}

fn images_ar(group: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: "v1alpha1".into(),
        api_version: format!("{group}/v1alpha1"),
        kind: "Image".into(),
        plural: "images".into(),
    }
}

/// Creates `items` (namespace, object) of `ar` with the bench's concurrency. Returns how long
/// the creates took and how many requests they made.
fn spawn_creates(
    client: &Client,
    ar: &ApiResource,
    items: Vec<(String, DynamicObject)>,
    conc: usize,
) -> tokio::task::JoinHandle<Res<(Duration, u64)>> {
    let (client, ar) = (client.clone(), ar.clone());
    tokio::spawn(async move {
        let attempts = AtomicU64::new(0);
        let items = Arc::new(items);
        let took = run_all(items.len(), conc, |i| {
            let (client, ar, items, attempts) = (client.clone(), ar.clone(), items.clone(), &attempts);
            async move {
                let (ns, o) = &items[i];
                let api: Api<DynamicObject> = Api::namespaced_with(client, ns, &ar);
                let pp = PostParams::default();
                retry(attempts, || api.create(&pp, o)).await.map(|_| ())
            }
        })
        .await?;
        Ok((took, attempts.load(Ordering::Relaxed)))
    })
}

// ---------------------------------------------------------------------------------------------
// Watching images: phase and Ready reason of each, from one watch.

#[derive(Clone, Debug)]
struct Obj {
    phase: String,
    reason: String,
    created: String,
    name: String,
}

struct Tracker {
    stream: BoxStream<'static, Result<watcher::Event<DynamicObject>, watcher::Error>>,
    objs: HashMap<String, Obj>,
    /// "phase/reason" (or "no status") -> how many: kept up to date on each event.
    counts: Counts,
}

impl Tracker {
    /// Starts a watch on the images of `selector` and returns once its initial list is in.
    async fn start(client: &Client, selector: &str) -> Res<Tracker> {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &images_ar("ims.io"));
        let stream = watcher(api, watcher::Config::default().labels(selector)).default_backoff().boxed();
        let mut t = Tracker { stream, objs: HashMap::new(), counts: Counts::default() };
        loop {
            match t.stream.next().await.ok_or("the watch ended")? {
                Ok(watcher::Event::InitDone) => return Ok(t),
                Ok(e) => t.apply(e),
                Err(e) => log(format!("watch: {e}")),
            }
        }
    }

    fn apply(&mut self, e: watcher::Event<DynamicObject>) {
        let key = |o: &DynamicObject| format!("{}/{}", o.metadata.namespace.as_deref().unwrap_or(""), o.name_any());
        match e {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                let status = &o.data["status"];
                let ready = status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
                let obj = Obj {
                    phase: status["phase"].as_str().unwrap_or("").into(),
                    reason: ready.and_then(|c| c["reason"].as_str()).unwrap_or("").into(),
                    created: o.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
                    name: o.name_any(),
                };
                self.counts.bump(&obj, 1);
                if let Some(old) = self.objs.insert(key(&o), obj) {
                    self.counts.bump(&old, -1);
                }
            }
            watcher::Event::Delete(o) => {
                if let Some(old) = self.objs.remove(&key(&o)) {
                    self.counts.bump(&old, -1);
                }
            }
            watcher::Event::Init => (self.objs, self.counts) = Default::default(),
            watcher::Event::InitDone => {}
        }
    }

    /// Waits until `done` holds or the deadline passes (false).
    async fn until(&mut self, deadline: Instant, done: impl Fn(&Counts) -> bool) -> bool {
        loop {
            if done(&self.counts) {
                return true;
            }
            match tokio::time::timeout_at(deadline.into(), self.stream.next()).await {
                Ok(Some(Ok(e))) => self.apply(e),
                Ok(Some(Err(e))) => log(format!("watch: {e}")),
                Ok(None) | Err(_) => return false,
            }
        }
    }
}

#[derive(Default, Debug)]
struct Counts(BTreeMap<String, usize>);

impl Counts {
    fn bump(&mut self, o: &Obj, by: isize) {
        let key = if o.phase.is_empty() { "no status".to_string() } else { format!("{}/{}", o.phase, o.reason) };
        let n = self.0.entry(key.clone()).or_insert(0);
        *n = n.saturating_add_signed(by);
        if *n == 0 {
            self.0.remove(&key);
        }
    }
    fn phase(&self, phase: &str) -> usize {
        self.0.iter().filter(|(k, _)| k.split('/').next() == Some(phase)).map(|(_, n)| n).sum()
    }
    fn get(&self, key: &str) -> usize {
        self.0.get(key).copied().unwrap_or(0)
    }
    fn show(&self) -> String {
        self.0.iter().map(|(k, n)| format!("{k}: {n}")).collect::<Vec<_>>().join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// The operator process, and everything the bench made: removed on every exit path.

struct Guard {
    admin: Client,
    run: String,
    child: Option<Child>,
}

impl Guard {
    /// Deletes everything labelled with the run (namespaces, the Region, the Public image) and
    /// the floor's CRD, then stops the operator (SIGTERM, SIGKILL after 40 s).
    async fn cleanup(&mut self) {
        log("cleanup: deleting what the bench made");
        let sel = format!("{RUN_LABEL}={}", self.run);
        let _ = kubectl(&["delete", "crd", "images.bench.ims.io", "--ignore-not-found", "--wait=false"], None);
        let _ = kubectl(&["delete", "images.ims.io", "-n", "ims-public", "-l", &sel, "--wait=false"], None);
        // The operator removes its finalizers while it runs; past the deadline, the bench does.
        let alive = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        let timeout = format!("--timeout={}s", if alive { 300 } else { 5 });
        if let Err(e) = kubectl(&["delete", "namespaces", "-l", &sel, &timeout], None) {
            log(format!("cleanup: {e}; removing the finalizers of the objects left"));
            self.strip_finalizers().await;
            let _ = kubectl(&["delete", "namespaces", "-l", &sel, "--timeout=120s"], None);
        }
        if kubectl(&["delete", "regions.ims.io", "-l", &sel, "--timeout=60s"], None).is_err() {
            let unblock = [
                "patch",
                "region",
                &format!("imsb-{}", self.run),
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ];
            let _ = kubectl(&unblock, None);
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            for _ in 0..40 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn strip_finalizers(&self) {
        let prefix = format!("imsb-{}-", self.run);
        for plural in ["images", "imagequotas"] {
            let ar = ApiResource { plural: plural.into(), ..images_ar("ims.io") };
            let Ok(list) = Api::<DynamicObject>::all_with(self.admin.clone(), &ar).list(&ListParams::default()).await
            else {
                continue;
            };
            let ours = |o: &DynamicObject| {
                o.metadata.namespace.as_deref().is_some_and(|ns| ns.starts_with(&prefix))
                    || o.metadata.labels.as_ref().and_then(|l| l.get(RUN_LABEL)) == Some(&self.run)
            };
            let stuck: Vec<_> = list.items.into_iter().filter(ours).collect();
            let patch = Patch::Merge(json!({"metadata": {"finalizers": null}}));
            let _ = run_all(stuck.len(), 32, |i| {
                let (o, patch) = (&stuck[i], &patch);
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.admin.clone(), o.metadata.namespace.as_deref().unwrap_or(""), &ar);
                async move {
                    let _ = api.patch(o.metadata.name.as_deref().unwrap_or(""), &PatchParams::default(), patch).await;
                    Ok(())
                }
            })
            .await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn region_ar() -> ApiResource {
    ApiResource { kind: "Region".into(), plural: "regions".into(), ..images_ar("ims.io") }
}

fn kubectl(args: &[&str], stdin: Option<&[u8]>) -> Res<String> {
    let state = std::env::var("IMS_KUBE_STATE").unwrap_or_else(|_| "/tmp/ims-kube".into());
    let bin = Path::new(&state).join("bin/kubectl");
    let bin = if bin.exists() { bin } else { PathBuf::from("kubectl") };
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx("running kubectl")?;
    if let Some(input) = stdin {
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).ctx("kubectl stdin")?;
    }
    let out = child.wait_with_output().ctx("kubectl")?;
    if !out.status.success() {
        return Err(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rss_mib(pid: u32) -> (f64, f64) {
    let mib = |key: &str| round(common::status_kib(&pid.to_string(), key) as f64 / 1024.0);
    (mib("VmRSS"), mib("VmHWM"))
}

fn count_in_log(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter(|l| l.contains(needle)).count()
}

async fn lease_transitions(admin: &Client) -> (i64, String) {
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "ims-system");
    match leases.get_opt("ims-operator").await {
        Ok(Some(l)) => {
            let spec = l.spec.unwrap_or_default();
            (i64::from(spec.lease_transitions.unwrap_or(0)), spec.holder_identity.unwrap_or_default())
        }
        _ => (-1, String::new()),
    }
}

// ---------------------------------------------------------------------------------------------
// Setup.

struct Env {
    admin: Client,
    args: Args,
    run: String,
    region: String,
    source_url: String,
    log_path: PathBuf,
    pid: u32,
}

impl Env {
    fn labels(&self, set: &str) -> Value {
        json!({RUN_LABEL: self.run, "ims-bench/set": set})
    }
    fn selector(&self, set: &str) -> String {
        format!("{RUN_LABEL}={},ims-bench/set={set}", self.run)
    }
    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs(self.args.timeout_secs)
    }
    async fn namespace(&self, name: &str) -> Res<()> {
        let nss: Api<Namespace> = Api::all(self.admin.clone());
        let ns = serde_json::from_value(json!({"metadata": {"name": name, "labels": {RUN_LABEL: self.run}}})).unwrap();
        nss.create(&PostParams::default(), &ns).await.ctx(&format!("creating namespace {name}"))?;
        Ok(())
    }
}

async fn setup(admin: Client, args: Args, run: String, log_path: PathBuf, dir: &Path, guard: &mut Guard) -> Res<Env> {
    log(format!("run {run}: installing CRDs and deploy/ RBAC"));
    let crds = Command::new(OPERATOR).arg("crds").output().ctx("ims-operator crds")?;
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", "-"], Some(&crds.stdout))?;
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for file in ["namespace.yaml", "serviceaccount.yaml", "rbac.yaml", "tenant-rbac.yaml", "flowschema.yaml"] {
        kubectl(
            &["apply", "--server-side", "--force-conflicts", "-f", &deploy.join(file).display().to_string()],
            None,
        )?;
    }
    let kinds = ["regions", "images", "imageshares", "imagecopies", "imagequotas"].map(|k| format!("crd/{k}.ims.io"));
    let mut wait = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    wait.extend(kinds.iter().map(String::as_str));
    kubectl(&wait, None)?;

    // The floor's CRD: the Image CRD under another group, without short names and categories.
    let yaml = String::from_utf8_lossy(&crds.stdout).into_owned();
    let image_crd = yaml
        .split("\n---\n")
        .find(|d| d.contains("name: images.ims.io"))
        .ok_or("no Image CRD in `ims-operator crds`")?;
    let mut crd: Value = serde_yaml_ng::from_str(image_crd).ctx("parsing the Image CRD")?;
    crd["metadata"]["name"] = "images.bench.ims.io".into();
    crd["spec"]["group"] = "bench.ims.io".into();
    crd["spec"]["names"].as_object_mut().unwrap().retain(|k, _| k != "shortNames" && k != "categories");
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", "-"], Some(crd.to_string().as_bytes()))?;
    kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd/images.bench.ims.io"], None)?;

    // The operator's kubeconfig: its ServiceAccount's token, the admin's server and CA.
    let token = kubectl(&["create", "token", "ims-operator", "-n", "ims-system", "--duration", "2h"], None)?;
    let admin_cfg: Value =
        serde_json::from_str(&kubectl(&["config", "view", "--raw", "--minify", "-o", "json"], None)?)
            .ctx("admin kubeconfig")?;
    let cluster = admin_cfg["clusters"][0]["cluster"].clone();
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "ims-operator", "user": {"token": token.trim()}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "ims-operator"}}],
    });
    let kubeconfig_path = dir.join("operator.kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig.to_string()).ctx("writing the operator's kubeconfig")?;

    // A 1 MiB raw source (pseudo-random bytes) and the store root.
    let stores = dir.join("stores");
    std::fs::create_dir_all(&stores).ctx("store root")?;
    let bytes: Vec<u8> = common::Xorshift64(0x9E37_79B9_7F4A_7C15).take(1 << 20).map(|x| x as u8).collect();
    let source = dir.join("data-1m.raw");
    std::fs::write(&source, bytes).ctx("source file")?;

    let admin_addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).ctx("a free port")?;
    let log_file = std::fs::File::create(&log_path).ctx("operator log")?;
    let child = Command::new(OPERATOR)
        .args(["--log-format", "json", "run", "--allow-file-imports", "--public-namespace", "ims-public"])
        .arg("--file-store-root")
        .arg(&stores)
        .args(["--admin-addr", &admin_addr.to_string(), "--leader-identity", &format!("bench-{run}")])
        .env("KUBECONFIG", &kubeconfig_path)
        .stdout(log_file.try_clone().ctx("log")?)
        .stderr(log_file)
        .spawn()
        .ctx("spawning ims-operator run")?;
    let pid = child.id();
    guard.child = Some(child);
    log(format!("operator pid {pid}, log {}", log_path.display()));

    let env = Env {
        admin: admin.clone(),
        region: format!("imsb-{run}"),
        source_url: format!("file://{}", source.display()),
        run,
        args,
        log_path,
        pid,
    };
    let regions: Api<DynamicObject> = Api::all_with(admin.clone(), &region_ar());
    let url = format!("file://{}/{}", stores.display(), env.region);
    let region = obj(
        "ims.io/v1alpha1",
        "Region",
        None,
        &env.region,
        env.labels("region"),
        json!({"spec": {"storage": {"url": url}}}),
    );
    regions.create(&PostParams::default(), &region).await.ctx("creating the Region")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = regions.get(&env.region).await.ctx("reading the Region")?;
        let ready = r.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready {
            break;
        }
        if let Some(Ok(Some(code))) = guard.child.as_mut().map(|c| c.try_wait().map(|s| s.map(|s| s.code()))) {
            return Err(format!("the operator exited ({code:?}); see {}", env.log_path.display()));
        }
        if Instant::now() > deadline {
            return Err(format!("Region {} not Ready after 120 s: {}", env.region, r.data["status"]));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    log(format!("Region {} Ready", env.region));
    Ok(env)
}

// ---------------------------------------------------------------------------------------------
// Workloads.

/// N creates plus one status write each on the bench.ims.io copy of the Image CRD.
async fn floor(env: &Env, n: usize, tag: &str, rep: &mut Report) -> Res<f64> {
    let ns = format!("imsb-{}-floor-{tag}", env.run);
    env.namespace(&ns).await?;
    let api: Api<DynamicObject> = Api::namespaced_with(env.admin.clone(), &ns, &images_ar("bench.ims.io"));
    let attempts = AtomicU64::new(0);
    let spec = json!({"spec": {"region": env.region, "type": "DataDisk", "source": {"url": {"url": env.source_url}}}});
    let took = run_all(n, env.args.concurrency, |i| {
        let (api, attempts, spec, ns) = (&api, &attempts, &spec, &ns);
        async move {
            let name = format!("f-{i:05}");
            let o = obj("bench.ims.io/v1alpha1", "Image", Some(ns), &name, json!({RUN_LABEL: env.run}), spec.clone());
            let (pp, patch_params) = (PostParams::default(), PatchParams::default());
            retry(attempts, || api.create(&pp, &o)).await?;
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = json!({"status": {"phase": "Active", "conditions": [{"type": "Ready", "status": "True",
                "reason": "Active", "message": "floor", "lastTransitionTime": now}]}});
            let patch = Patch::Merge(&status);
            retry(attempts, || api.patch_status(&name, &patch_params, &patch)).await?;
            Ok(())
        }
    })
    .await?
    .as_secs_f64();
    let section = format!("floor ({n} objects)");
    rep.add(&section, "create + status write, s", round(took));
    rep.add(&section, "objects/s", round(n as f64 / took));
    rep.add(&section, "requests (incl. retries)", attempts.load(Ordering::Relaxed));
    Ok(took)
}

async fn references(env: &Env, rep: &mut Report) -> Res<()> {
    let (r, t) = (env.args.references, env.args.tenants.max(1));
    let floor = floor(env, r, "refs", rep).await?;
    let sec = format!("references ({r} over {t} namespaces)");

    // The Public image.
    let name = format!("imsb-{}-data", env.run);
    let nss: Api<Namespace> = Api::all(env.admin.clone());
    if nss.get_opt("ims-public").await.ctx("ims-public")?.is_none() {
        env.namespace("ims-public").await?;
    }
    let mut tracker = Tracker::start(&env.admin, &env.selector("public")).await?;
    let spec = json!({"spec": {"region": env.region, "type": "DataDisk", "visibility": "Public", "source": {"url": {"url": env.source_url}}}});
    let public = obj("ims.io/v1alpha1", "Image", Some("ims-public"), &name, env.labels("public"), spec);
    let api: Api<DynamicObject> = Api::namespaced_with(env.admin.clone(), "ims-public", &images_ar("ims.io"));
    api.create(&PostParams::default(), &public).await.ctx("creating the Public image")?;
    if !tracker.until(Instant::now() + Duration::from_secs(120), |c| c.phase("Active") + c.phase("Failed") >= 1).await
        || tracker.counts.phase("Active") != 1
    {
        return Err(format!("the Public image is not Active after 120 s: {}", tracker.counts.show()));
    }

    let tenants: Vec<String> = (0..t).map(|i| format!("imsb-{}-t{i:03}", env.run)).collect();
    for ns in &tenants {
        env.namespace(ns).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // let the operator see the namespaces
    let items: Vec<(String, DynamicObject)> = (0..r)
        .map(|i| {
            let ns = &tenants[i % t];
            let spec =
                json!({"spec": {"region": env.region, "source": {"image": {"namespace": "ims-public", "name": name}}}});
            (ns.clone(), obj("ims.io/v1alpha1", "Image", Some(ns), &format!("r-{i:05}"), env.labels("refs"), spec))
        })
        .collect();
    let mut tracker = Tracker::start(&env.admin, &env.selector("refs")).await?;
    let (lease0, _) = lease_transitions(&env.admin).await;
    let lost0 = count_in_log(&env.log_path, "leadership lost");
    let before = scrape(&env.admin).await?;
    let start = Instant::now();
    let creates = spawn_creates(&env.admin, &images_ar("ims.io"), items, env.args.concurrency);
    let done = tracker.until(env.deadline(), |c| c.phase("Active") == r).await;
    let took = start.elapsed().as_secs_f64();
    let after = scrape(&env.admin).await?;
    let (create_took, attempts) = creates.await.ctx("create task")??;
    let (rss, hwm) = rss_mib(env.pid);
    rep.add(
        &sec,
        "result",
        if done { "all Active".to_string() } else { format!("TIMEOUT: {}", tracker.counts.show()) },
    );
    rep.add(&sec, "first create to all Active, s", round(took));
    rep.add(&sec, "bench's creates took, s", round(create_took.as_secs_f64()));
    rep.add(&sec, "ratio to floor", round(took / floor));
    add_writes(rep, &sec, writes(&before, &after), &[("POST images", attempts)], r);
    rep.add(&sec, "operator VmRSS / VmHWM MiB", format!("{rss} / {hwm}"));

    let steady = env.args.steady_secs;
    log(format!("steady state: {steady} s"));
    tokio::time::sleep(Duration::from_secs(steady)).await;
    let quiet = writes(&after, &scrape(&env.admin).await?);
    let total: u64 = quiet.iter().filter(|(k, _)| !k.starts_with('4')).map(|(_, v)| v).sum();
    rep.add(&sec, &format!("writes in {steady} s of steady state"), total);
    if total > 0 {
        rep.add(&sec, "steady writes by verb", json!(quiet));
    }
    rep.add(&sec, "lease transitions during", lease_transitions(&env.admin).await.0 - lease0);
    rep.add(&sec, "'leadership lost' in the log during", count_in_log(&env.log_path, "leadership lost") - lost0);
    Ok(())
}

async fn owned_run(env: &Env, room: usize, rep: &mut Report) -> Res<(f64, bool)> {
    let o = env.args.owned;
    let constrained = room < o;
    let tag = if constrained { "quota" } else { "free" };
    let sec = format!("owned ({o} images, room {room})");
    let ns = format!("imsb-{}-{tag}", env.run);
    env.namespace(&ns).await?;
    let quotas: Api<DynamicObject> = Api::namespaced_with(
        env.admin.clone(),
        &ns,
        &ApiResource { kind: "ImageQuota".into(), plural: "imagequotas".into(), ..images_ar("ims.io") },
    );
    let quota = obj(
        "ims.io/v1alpha1",
        "ImageQuota",
        Some(&ns),
        "default",
        json!({}),
        json!({"spec": {"privateImagesPerRegion": room}}),
    );
    let mut own_quota_writes = 0;
    if let Err(e) = quotas.create(&PostParams::default(), &quota).await {
        // The operator may have made `default` already: set the room on it.
        log(format!("ImageQuota create: {e}; patching it"));
        quotas
            .patch("default", &PatchParams::default(), &Patch::Merge(json!({"spec": {"privateImagesPerRegion": room}})))
            .await
            .ctx("patching the ImageQuota")?;
        own_quota_writes = 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let set = format!("owned-{tag}");
    let items: Vec<(String, DynamicObject)> = (0..o)
        .map(|i| {
            let spec =
                json!({"spec": {"region": env.region, "type": "DataDisk", "source": {"url": {"url": env.source_url}}}});
            (ns.clone(), obj("ims.io/v1alpha1", "Image", Some(&ns), &format!("o-{i:05}"), env.labels(&set), spec))
        })
        .collect();
    let mut tracker = Tracker::start(&env.admin, &env.selector(&set)).await?;
    let (lease0, holder0) = lease_transitions(&env.admin).await;
    let lost0 = count_in_log(&env.log_path, "leadership lost");
    let before = scrape(&env.admin).await?;
    let start = Instant::now();
    let creates = spawn_creates(&env.admin, &images_ar("ims.io"), items, env.args.concurrency);
    let done = tracker
        .until(env.deadline(), |c| {
            if constrained {
                c.phase("Active") == room && c.get("Queued/QuotaExceeded") == o - room
            } else {
                c.phase("Active") == o
            }
        })
        .await;
    let took = start.elapsed().as_secs_f64();
    let after = scrape(&env.admin).await?;
    let (create_took, attempts) = creates.await.ctx("create task")??;
    let what = if constrained { "settled" } else { "all Active" };
    rep.add(&sec, "result", if done { what.to_string() } else { format!("TIMEOUT: {}", tracker.counts.show()) });
    rep.add(&sec, &format!("first create to {what}, s"), round(took));
    rep.add(&sec, "bench's creates took, s", round(create_took.as_secs_f64()));
    let w = writes(&before, &after);
    let admitted = tracker.counts.phase("Active");
    let q409 = w.get("409 imagequotas").copied().unwrap_or(0) + w.get("409 imagequotas/status").copied().unwrap_or(0);
    let ledger: u64 = ["PUT imagequotas/status", "PATCH imagequotas/status", "APPLY imagequotas/status"]
        .iter()
        .map(|k| w.get(*k).copied().unwrap_or(0))
        .sum();
    rep.add(&sec, "409s on imagequotas", q409);
    let per_admitted =
        if admitted == 0 { json!("n/a (none admitted)") } else { json!(round(q409 as f64 / admitted as f64)) };
    rep.add(&sec, "409s on imagequotas per admitted image", per_admitted);
    rep.add(&sec, "ledger writes (PUT/PATCH imagequotas/status)", ledger);
    add_writes(rep, &sec, w, &[("POST images", attempts), ("PATCH imagequotas", own_quota_writes)], o);
    if constrained {
        let mut all: Vec<Obj> = tracker.objs.values().cloned().collect();
        all.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        let oldest: HashSet<&str> = all.iter().take(room).map(|o| o.name.as_str()).collect();
        let wrong = all.iter().filter(|o| o.phase == "Active" && !oldest.contains(o.name.as_str())).count();
        let admitted = all.iter().filter(|o| o.phase == "Active").count();
        let verdict = match (wrong, done) {
            (0, true) => "yes".to_string(),
            (0, false) => format!("so far ({admitted} admitted, all among the {room} oldest)"),
            _ => format!("NO: {wrong} of {admitted} admitted images are not among the {room} oldest"),
        };
        rep.add(&sec, "oldest first", verdict);
        tokio::time::sleep(Duration::from_secs(5)).await;
        tracker.until(Instant::now(), |_| false).await;
        rep.add(&sec, "counts 5 s later", tracker.counts.show());
    }
    let (lease1, holder1) = lease_transitions(&env.admin).await;
    rep.add(&sec, "lease transitions during", lease1 - lease0);
    rep.add(&sec, "lease holder before / after", format!("{holder0} / {holder1}"));
    rep.add(&sec, "'leadership lost' in the log during", count_in_log(&env.log_path, "leadership lost") - lost0);
    let (rss, hwm) = rss_mib(env.pid);
    rep.add(&sec, "operator VmRSS / VmHWM MiB", format!("{rss} / {hwm}"));
    Ok((took, done))
}

async fn owned(env: &Env, rep: &mut Report) -> Res<()> {
    let o = env.args.owned;
    let floor = floor(env, o, "owned", rep).await?;
    let (free, free_done) = owned_run(env, o.max(5000), rep).await?;
    let ratio = if free_done { json!(round(free / floor)) } else { json!("n/a (timed out)") };
    rep.add("owned: summary", "unconstrained / floor", ratio);
    let (quota, quota_done) = owned_run(env, env.args.room.min(o), rep).await?;
    let ratio = if free_done && quota_done { json!(round(quota / free)) } else { json!("n/a (a run timed out)") };
    rep.add("owned: summary", "constrained settle / unconstrained", ratio);
    Ok(())
}

/// Warnings and errors of the operator's JSON log, by message.
fn log_summary(path: &Path, rep: &mut Report) {
    let mut by: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let level = v["level"].as_str().unwrap_or("");
        if matches!(level, "WARN" | "ERROR") {
            let key = format!("{level} {}", v["fields"]["message"].as_str().unwrap_or("?"));
            let e = by.entry(key).or_insert((0, String::new()));
            e.0 += 1;
            if e.1.is_empty() {
                e.1 = v["fields"]["error"].as_str().map(|s| s.chars().take(160).collect()).unwrap_or_default();
            }
        }
    }
    rep.add("operator log", "file", path.display().to_string());
    if by.is_empty() {
        rep.add("operator log", "warnings and errors", 0);
    }
    for (key, (n, sample)) in by {
        rep.add("operator log", &key, if sample.is_empty() { n.to_string() } else { format!("{n} (e.g. {sample})") });
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!(
            "error: KUBECONFIG is not set. This bench drives a real API server as admin, e.g.\n  /work/shared/kube/kube-up.sh && KUBECONFIG=/tmp/ims-kube/kubeconfig cargo bench --bench control_plane"
        );
        return std::process::ExitCode::from(2);
    }
    let admin = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: no client for KUBECONFIG: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let dir = tempfile::Builder::new().prefix("ims-bench-").tempdir().expect("a temporary directory");
    let mut rep = Report::default();
    let json_path = args.json.clone();
    let run = format!(
        "{:x}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() & 0xffffff
    );
    let log_path = std::env::temp_dir().join(format!("ims-bench-{run}-operator.log"));
    let mut guard = Guard { admin: admin.clone(), run: run.clone(), child: None };
    let result = async {
        let only = args.only;
        let env = setup(admin, args, run, log_path.clone(), dir.path(), &mut guard).await?;
        rep.add("setup", "run", env.run.clone());
        rep.add("setup", "concurrency", env.args.concurrency);
        let mut result = Ok(());
        if only != Some(Only::Owned) {
            result = references(&env, &mut rep).await;
        }
        if result.is_ok() && only != Some(Only::References) {
            result = owned(&env, &mut rep).await;
        }
        result
    };
    let result = tokio::select! {
        r = result => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted (SIGINT)".to_string()),
    };
    guard.cleanup().await;
    log_summary(&log_path, &mut rep);
    rep.print();
    if let Some(path) = json_path {
        let _ = std::fs::write(&path, serde_json::to_string_pretty(&rep.json()).unwrap());
    }
    println!("\noperator log: {}", log_path.display());
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
