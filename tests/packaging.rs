//! The two ways to install, kustomize (`deploy/`) and Helm (`charts/ims-operator/`), install the
//! same objects; the chart's CRDs are the generated ones; nothing rendered holds an RBAC or
//! admission wildcard; the operator's RBAC covers what its code calls; the image runs as non-root.
//!
//! The chart is rendered by Helm: `helm template` of a `helm` binary (`$HELM`, else `helm` on
//! PATH), else Helm's Go SDK as a library (PyPI `helm-python-sdk`, through
//! `tests/support/helm_template.py` and `python3` on PATH). Without either, the tests that render
//! the chart say so on stderr and skip (what they check of kustomize still runs);
//! `IMS_REQUIRE_HELM=1`, which `.ci/run` sets, makes that a failure.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser;
use serde_json::{Value, json};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("charts/ims-operator")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("invalid YAML: {e}\n{text}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn yaml_value(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("invalid YAML: {e}"))
}

/// The release namespace both renderings are compared in: kustomize's hard-coded namespace.
const NAMESPACE: &str = "ims-system";

// ---------------------------------------------------------------------------------------------
// The chart, rendered by Helm.

/// A Helm engine: a `helm` binary, or Helm's Go SDK as a library through PyPI's
/// `helm-python-sdk` (`tests/support/helm_template.py`, run by `python3` on PATH).
enum Helm {
    Binary(PathBuf),
    Python,
}

/// The Helm engine to render the chart with: `$HELM`, else `helm` on PATH, else `python3` on
/// PATH with `helm_python` importable. None (said on stderr) when there is none, so the test
/// that needs one skips; `IMS_REQUIRE_HELM=1` (set by `.ci/run`) makes that a failure.
fn helm(test: &str) -> Option<Helm> {
    if let Some(path) = std::env::var_os("HELM") {
        return Some(Helm::Binary(PathBuf::from(path)));
    }
    if Command::new("helm").arg("version").output().is_ok_and(|o| o.status.success()) {
        return Some(Helm::Binary(PathBuf::from("helm")));
    }
    if Command::new("python3").args(["-c", "import helm_python"]).output().is_ok_and(|o| o.status.success()) {
        return Some(Helm::Python);
    }
    let why = "no Helm engine: no $HELM, no helm on PATH, and no python3 on PATH that imports helm_python \
               (pip install helm-python-sdk; see docs/DEVELOPMENT.md)";
    assert!(std::env::var_os("IMS_REQUIRE_HELM").is_none(), "IMS_REQUIRE_HELM is set but there is {why}");
    eprintln!("skipped {test}: {why}");
    None
}

/// `helm template ims-operator charts/ims-operator --namespace ims-system --include-crds -f values`:
/// the objects, CRDs first.
fn render_chart(helm: &Helm, overrides: &Value) -> Vec<Value> {
    try_render_chart(helm, overrides).unwrap_or_else(|e| panic!("{e}"))
}

/// The same, or what Helm said when it refused the values or the chart.
fn try_render_chart(helm: &Helm, overrides: &Value) -> Result<Vec<Value>, String> {
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(values.path(), serde_json::to_string(overrides).unwrap()).unwrap();
    let mut cmd = match helm {
        Helm::Binary(bin) => {
            let mut cmd = Command::new(bin);
            cmd.args(["template", "ims-operator"])
                .arg(chart_dir())
                .args(["--namespace", NAMESPACE, "--include-crds", "--values"])
                .arg(values.path());
            cmd
        }
        Helm::Python => {
            let mut cmd = Command::new("python3");
            cmd.arg(repo().join("tests/support/helm_template.py"))
                .arg(chart_dir())
                .args(["ims-operator", NAMESPACE])
                .arg(values.path());
            cmd
        }
    };
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(yaml_docs(&String::from_utf8(out.stdout).unwrap()))
}

/// The files of a directory ending in `ext`, sorted by name.
fn dir_files(dir: &Path, ext: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(ext))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), read(&p)))
        .collect();
    files.sort();
    files
}

fn kustomize() -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", "deploy"])
        .current_dir(repo())
        .output()
        .expect("kubectl is needed to render deploy/ (.ci/run installs it)");
    assert!(out.status.success(), "kubectl kustomize deploy failed: {}", String::from_utf8_lossy(&out.stderr));
    yaml_docs(&String::from_utf8(out.stdout).unwrap())
}

type ObjectKey = (String, String, String);

/// JSON equivalence: `0.0` (as crds/ spells a schema's `minimum`) and `0` (as kustomize re-emits
/// it) are the same number to the API server.
fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => json!(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, normalize(v))).collect()),
        other => other,
    }
}

/// Objects by (kind, namespace, name); a duplicate is an error.
fn by_key(docs: Vec<Value>) -> BTreeMap<ObjectKey, Value> {
    let mut map = BTreeMap::new();
    for doc in docs.into_iter().map(normalize) {
        let key = (
            doc["kind"].as_str().unwrap_or_default().to_string(),
            doc["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
            doc["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        );
        assert!(map.insert(key.clone(), doc).is_none(), "{key:?} rendered twice");
    }
    map
}

/// Values that take every branch of the templates the defaults do not.
fn every_branch_values() -> Value {
    json!({
        "policy": {"shareMembersPerImage": 256, "imageBytesPerRegion": null},
        "importAllowCidrs": ["10.20.0.0/16", "fd00::/8"],
        "logFormat": "text",
        "publicNamespace": "platform",
        "admissionPolicies": false,
        "storesClaimName": "ims-stores",
        "image": {"repository": "registry.example.com/ims-operator", "tag": "0.2.0"},
        "imageServer": {"port": 9443, "baseURL": "https://images.example.com", "tlsSecretName": "ims-images-tls", "keySecretName": "ims-key", "serviceType": "LoadBalancer"},
    })
}

// ---------------------------------------------------------------------------------------------
// kustomize and Helm install the same objects.

/// Objects only one of the two installs, on purpose, and why.
const ONLY_IN_KUSTOMIZE: &[(&str, &str, &str, &str)] = &[(
    "Namespace",
    "",
    "ims-system",
    "Helm installs into the release namespace (`helm install -n ims-system --create-namespace`); a chart \
     that also created it would conflict with --create-namespace",
)];

#[test]
fn kustomize_and_the_chart_with_default_values_render_the_same_objects() {
    let Some(helm) = helm("kustomize_and_the_chart_with_default_values_render_the_same_objects") else { return };
    let kustomized = by_key(kustomize());
    let charted = by_key(render_chart(&helm, &json!({})));
    let intended: BTreeSet<ObjectKey> =
        ONLY_IN_KUSTOMIZE.iter().map(|(k, ns, n, _)| (k.to_string(), ns.to_string(), n.to_string())).collect();
    for key in &intended {
        assert!(kustomized.contains_key(key), "{key:?} is listed as kustomize-only but kustomize does not render it");
        assert!(!charted.contains_key(key), "{key:?} is listed as kustomize-only but the chart renders it");
    }
    let kustomize_keys: BTreeSet<&ObjectKey> = kustomized.keys().filter(|k| !intended.contains(*k)).collect();
    let chart_keys: BTreeSet<&ObjectKey> = charted.keys().collect();
    assert_eq!(kustomize_keys, chart_keys, "kustomize and the chart render different objects");
    for (key, chart_obj) in &charted {
        let kustomize_obj = &kustomized[key];
        assert!(
            kustomize_obj == chart_obj,
            "{key:?} differs:\n--- kustomize\n{}\n--- chart\n{}",
            serde_yaml_ng::to_string(kustomize_obj).unwrap(),
            serde_yaml_ng::to_string(chart_obj).unwrap()
        );
    }
}

/// values.schema.json is enforced where it matters: Helm refuses a mistyped value.
#[test]
fn helm_refuses_values_the_schema_does_not_describe() {
    let Some(helm) = helm("helm_refuses_values_the_schema_does_not_describe") else { return };
    for bad in [json!({"replica": 3}), json!({"image": {"tags": "0.2.0"}}), json!({"publicNamespace": "ims'public"})] {
        let err = try_render_chart(&helm, &bad).expect_err(&format!("values {bad} are refused"));
        assert!(err.contains("schema"), "values {bad} are refused by the schema: {err}");
    }
}

#[test]
fn the_chart_crds_are_the_generated_ones() {
    let generated: Vec<(String, String)> =
        dir_files(&repo().join("crds"), ".yaml").into_iter().filter(|(n, _)| n != "kustomization.yaml").collect();
    let copied = dir_files(&chart_dir().join("crds"), ".yaml");
    assert_eq!(
        generated.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        copied.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "charts/ims-operator/crds/ holds one copy of each crds/*.ims.io.yaml"
    );
    for ((name, want), (_, have)) in generated.iter().zip(&copied) {
        assert!(
            want == have,
            "charts/ims-operator/crds/{name} differs from crds/{name}: cp crds/*.ims.io.yaml charts/ims-operator/crds/"
        );
    }
}

#[test]
fn every_branch_of_the_chart_renders_what_the_operator_accepts() {
    let Some(helm) = helm("every_branch_of_the_chart_renders_what_the_operator_accepts") else { return };
    let objects = by_key(render_chart(&helm, &every_branch_values()));
    let find = |kind: &str, name: &str| {
        objects.get(&(kind.into(), NAMESPACE.into(), name.into())).unwrap_or_else(|| panic!("{kind} {name} rendered"))
    };
    assert!(
        !objects.keys().any(|(kind, _, _)| kind.starts_with("ValidatingAdmissionPolicy")),
        "admissionPolicies: false leaves the policies out"
    );
    let deployment = find("Deployment", "ims-operator");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "registry.example.com/ims-operator:0.2.0");
    assert_eq!(container["imagePullPolicy"], "IfNotPresent", "a partial `image` keeps the other defaults");

    // The arguments parse with the operator's own command line.
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let cli = ims_operator::cli::Cli::try_parse_from(std::iter::once("ims-operator").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("the chart's args {args:?} do not parse: {e}"));
    let ims_operator::cli::Command::Run(run) = cli.command else { panic!("args {args:?} are not `run`") };
    let policy_path = run.policy.expect("--policy is passed when `policy` is set");
    let cidrs: Vec<String> = run.import_allow_cidrs.iter().map(ToString::to_string).collect();
    assert_eq!(cidrs, ["10.20.0.0/16", "fd00::/8"]);

    // The policy file is where the ConfigMap is mounted, and the operator reads it.
    let mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "policy").unwrap();
    assert_eq!(Path::new(mount["mountPath"].as_str().unwrap()).join("policy.yaml"), policy_path);
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "policy").unwrap();
    assert_eq!(volume["configMap"]["name"], "ims-operator-policy");
    let configmap = find("ConfigMap", "ims-operator-policy");
    let policy = ims_operator::policy::Policy::from_yaml(configmap["data"]["policy.yaml"].as_str().unwrap(), "chart")
        .expect("the rendered policy is a valid policy file");
    assert_eq!(policy.share_members_per_image, 256);
    assert_eq!(policy.image_bytes_per_region, None);

    let env =
        |name: &str| container["env"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap()["value"].clone();
    assert_eq!(env("IMS_PUBLIC_NAMESPACE"), "platform");
    assert_eq!(env("IMS_LOG_FORMAT"), "text");
    let stores = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "stores").unwrap();
    assert_eq!(stores, &json!({"name": "stores", "persistentVolumeClaim": {"claimName": "ims-stores"}}));
}

#[test]
fn the_chart_sets_the_admission_policys_platform_namespace() {
    let Some(helm) = helm("the_chart_sets_the_admission_policys_platform_namespace") else { return };
    let objects = render_chart(&helm, &json!({"publicNamespace": "platform"}));
    let policy = objects.iter().find(|o| o["metadata"]["name"] == "ims-image-visibility").unwrap();
    assert_eq!(policy["spec"]["variables"], json!([{"name": "publicNamespace", "expression": "'platform'"}]));
}

// ---------------------------------------------------------------------------------------------
// RBAC.

fn roles(docs: &[Value]) -> Vec<&Value> {
    docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role").collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

fn allows(role: &Value, group: &str, resource: &str, verb: &str) -> bool {
    role["rules"].as_array().into_iter().flatten().any(|r| {
        strings(&r["apiGroups"]).contains(&group)
            && strings(&r["resources"]).contains(&resource)
            && strings(&r["verbs"]).contains(&verb)
    })
}

#[test]
fn nothing_rendered_has_a_wildcard() {
    let mut rendered = vec![("kustomize", kustomize())];
    if let Some(helm) = helm("nothing_rendered_has_a_wildcard (the chart's part)") {
        rendered.push(("chart", render_chart(&helm, &json!({}))));
    }
    for (what, docs) in rendered {
        for role in roles(&docs) {
            assert!(
                role["aggregationRule"].is_null(),
                "{what}: {} aggregates (it could grow)",
                role["metadata"]["name"]
            );
            for rule in role["rules"].as_array().unwrap() {
                for key in ["apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"] {
                    assert!(
                        !strings(&rule[key]).contains(&"*"),
                        "{what}: wildcard in {key} of {}",
                        role["metadata"]["name"]
                    );
                }
            }
        }
        for policy in docs.iter().filter(|d| d["kind"] == "ValidatingAdmissionPolicy") {
            for rule in policy["spec"]["matchConstraints"]["resourceRules"].as_array().unwrap() {
                for key in ["apiGroups", "apiVersions", "resources", "operations"] {
                    assert!(
                        !strings(&rule[key]).contains(&"*"),
                        "{what}: wildcard in {key} of {}",
                        policy["metadata"]["name"]
                    );
                }
            }
        }
    }
}

/// Every RBAC rule, in deploy/ and in the chart, says why it exists in a comment right above it.
#[test]
fn every_rbac_rule_has_a_comment() {
    let files = dir_files(&repo().join("deploy"), ".yaml").into_iter().map(|(n, t)| (format!("deploy/{n}"), t)).chain(
        dir_files(&chart_dir().join("templates"), ".yaml").into_iter().map(|(n, t)| (format!("templates/{n}"), t)),
    );
    let mut rules = 0;
    for (name, text) in files {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            // RBAC rules start at column 0; admission resourceRules are indented.
            if line.starts_with("- apiGroups:") {
                rules += 1;
                assert!(i > 0 && lines[i - 1].trim_start().starts_with('#'), "rule at {name}:{} has no comment", i + 1);
            }
        }
    }
    assert!(rules >= 20, "found only {rules} rules: is the check still looking at the RBAC files?");
}

/// What the operator's code calls, and the permission each call needs on a real API server.
/// (grep: `Api::<...>`, `patch_status`, `replace_status`, `finalizer`, `Recorder`, `get_opt`.)
#[test]
fn the_operator_may_do_what_its_code_does() {
    let docs = kustomize();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name}"))
    };
    let cluster = find("ClusterRole", "ims-operator");
    let needs = [
        // Controllers and reflectors watch every kind in all namespaces.
        ("ims.io", "regions", &["get", "list", "watch"][..]),
        ("ims.io", "images", &["get", "list", "watch", "patch"]), // get_opt; finalizer JSON patches
        ("ims.io", "imageshares", &["get", "list", "watch"]),
        ("ims.io", "imagecopies", &["get", "list", "watch"]),
        ("ims.io", "imagequotas", &["get", "list", "watch", "create"]), // creates `default`
        ("ims.io", "images/status", &["patch"]),                        // server-side apply
        ("ims.io", "regions/status", &["patch"]),
        ("ims.io", "imagequotas/status", &["update"]), // the ledger's compare-and-swap
        ("events.k8s.io", "events", &["create", "patch"]), // kube's Recorder
    ];
    for (group, resource, verbs) in needs {
        for verb in verbs {
            assert!(
                allows(cluster, group, resource, verb),
                "the operator's ClusterRole lacks {verb} {resource}.{group}"
            );
        }
    }
    let role = find("Role", "ims-operator");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert!(allows(role, "", "secrets", "get"), "Regions' S3 Secrets are read in the operator's namespace");
    assert!(!allows(cluster, "", "secrets", "get"), "Secrets are readable only in the operator's namespace");
    for binding in ["ClusterRoleBinding", "RoleBinding"] {
        let b = find(binding, "ims-operator");
        assert_eq!(b["subjects"], json!([{"kind": "ServiceAccount", "name": "ims-operator", "namespace": NAMESPACE}]));
    }
}

#[test]
fn tenant_roles_aggregate_into_view_edit_admin_and_never_write_status() {
    let docs = kustomize();
    let find = |name: &str| {
        docs.iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    let kinds = ["regions", "images", "imageshares", "imagecopies", "imagequotas"];
    let writes = ["create", "update", "patch", "delete", "deletecollection"];
    for (name, builtin) in [("ims-view", "view"), ("ims-edit", "edit"), ("ims-admin", "admin")] {
        let role = find(name);
        assert_eq!(
            role["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{builtin}")],
            "true",
            "{name} aggregates into {builtin}"
        );
        for kind in kinds {
            for verb in ["get", "list", "watch"] {
                assert!(allows(role, "ims.io", kind, verb), "{name} can {verb} {kind}");
            }
            for verb in writes {
                assert!(
                    !allows(role, "ims.io", &format!("{kind}/status"), verb),
                    "{name} must not {verb} {kind}/status"
                );
            }
        }
        for verb in writes {
            // Quota limits are the platform's (like ResourceQuota); regions are cluster-wide.
            assert!(!allows(role, "ims.io", "imagequotas", verb), "{name} must not {verb} imagequotas");
            assert!(!allows(role, "ims.io", "regions", verb), "{name} must not {verb} regions");
            let can = name != "ims-view";
            for kind in ["images", "imageshares", "imagecopies"] {
                assert_eq!(allows(role, "ims.io", kind, verb), can, "{name} {verb} {kind}");
            }
        }
        for rule in role["rules"].as_array().unwrap() {
            assert_eq!(strings(&rule["apiGroups"]), ["ims.io"], "{name} grants only ims.io");
        }
    }
    let regions = find("ims-region-viewer");
    assert!(regions["metadata"]["labels"].as_object().unwrap().keys().all(|k| !k.contains("aggregate-to")));
    assert_eq!(
        regions["rules"],
        json!([{"apiGroups": ["ims.io"], "resources": ["regions"], "verbs": ["get", "list", "watch"]}])
    );
}

// ---------------------------------------------------------------------------------------------
// Versions, values and the image.

#[test]
fn versions_and_the_image_agree_everywhere() {
    let version = env!("CARGO_PKG_VERSION");
    let chart = yaml_value(&read(&chart_dir().join("Chart.yaml")));
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["version"], version);
    assert_eq!(chart["appVersion"], version);
    let values = yaml_value(&read(&chart_dir().join("values.yaml")));
    assert_eq!(values["image"]["tag"], version);
    let kustomization = yaml_value(&read(&repo().join("deploy/kustomization.yaml")));
    assert_eq!(kustomization["images"], json!([{"name": "ims-operator", "newTag": version}]));
    let deployment = kustomize().into_iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("{}:{}", values["image"]["repository"].as_str().unwrap(), version),
        "the Deployment runs the chart's default image"
    );
    // Two replicas electing a leader; a rollout never has both old pods down at once.
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(values["replicas"], 2);
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
}

#[test]
fn the_values_schema_describes_exactly_the_values() {
    let values = yaml_value(&read(&chart_dir().join("values.yaml")));
    let schema: Value = serde_json::from_str(&read(&chart_dir().join("values.schema.json"))).expect("valid JSON");
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<BTreeSet<String>>();
    assert_eq!(keys(&values), keys(&schema["properties"]), "values.yaml and values.schema.json list the same values");
    assert_eq!(keys(&values), strings(&schema["required"]).into_iter().map(String::from).collect());
    assert_eq!(schema["additionalProperties"], false, "a mistyped value is an error, not ignored");
    let policy_keys: BTreeSet<String> = keys(&schema["properties"]["policy"]["properties"]);
    let known: BTreeSet<String> = ims_operator::policy::POLICY_KEYS.iter().map(|k| k.to_string()).collect();
    assert_eq!(policy_keys, known, "the schema's policy keys are the operator's");
    // publicNamespace is written into a CEL string literal: the schema only lets a DNS label in.
    let pattern = regex::Regex::new(schema["properties"]["publicNamespace"]["pattern"].as_str().unwrap()).unwrap();
    assert!(pattern.is_match(values["publicNamespace"].as_str().unwrap()));
    for bad in ["ims'public", "Ims-Public", "a b", ""] {
        assert!(!pattern.is_match(bad), "{bad:?}");
    }
}

#[test]
fn the_image_is_multi_stage_and_runs_as_non_root() {
    let dockerfile = read(&repo().join("Dockerfile"));
    let stages: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    assert!(dockerfile.contains("cargo build --release --locked"));
    let runtime = dockerfile.split("\nFROM ").last().unwrap();
    let user =
        runtime.lines().filter_map(|l| l.strip_prefix("USER ")).next_back().expect("the runtime stage sets USER");
    let deployment = kustomize().into_iter().find(|d| d["kind"] == "Deployment").unwrap();
    let security = &deployment["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(user.trim(), format!("{}:{}", security["runAsUser"], security["runAsGroup"]));
    assert_ne!(security["runAsUser"], 0);
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/ims-operator\"]"));
    let ignored: BTreeSet<&str> = include_str!("../.dockerignore").lines().filter(|l| !l.starts_with('#')).collect();
    for path in ["target", ".ims", ".git"] {
        assert!(ignored.contains(path), ".dockerignore leaves out {path}");
    }
}

/// Every rendered object survives a round trip through the Kubernetes API types: a misspelt or
/// misplaced field (which the API server would drop or refuse) shows up as a difference.
#[test]
fn every_rendered_object_is_made_of_real_kubernetes_fields() {
    use k8s_openapi::{
        api::{
            admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
            apps::v1::Deployment,
            core::v1::{ConfigMap, Namespace, ServiceAccount},
            flowcontrol::v1::FlowSchema,
            rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
        },
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Value {
        let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
        normalize(serde_json::to_value(typed).unwrap())
    }
    let mut docs = kustomize();
    if let Some(helm) = helm("every_rendered_object_is_made_of_real_kubernetes_fields (the chart's part)") {
        docs.extend(render_chart(&helm, &every_branch_values()));
    }
    for doc in docs.into_iter().map(normalize) {
        let again = match doc["kind"].as_str().unwrap() {
            "ValidatingAdmissionPolicy" => round_trip::<ValidatingAdmissionPolicy>(&doc),
            "ValidatingAdmissionPolicyBinding" => round_trip::<ValidatingAdmissionPolicyBinding>(&doc),
            "Deployment" => round_trip::<Deployment>(&doc),
            "ConfigMap" => round_trip::<ConfigMap>(&doc),
            "Namespace" => round_trip::<Namespace>(&doc),
            "ServiceAccount" => round_trip::<ServiceAccount>(&doc),
            "Service" => round_trip::<k8s_openapi::api::core::v1::Service>(&doc),
            "ClusterRole" => round_trip::<ClusterRole>(&doc),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(&doc),
            "Role" => round_trip::<Role>(&doc),
            "RoleBinding" => round_trip::<RoleBinding>(&doc),
            "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(&doc),
            "FlowSchema" => round_trip::<FlowSchema>(&doc),
            other => panic!("no Kubernetes type known for {other}: add it here"),
        };
        assert!(
            again == doc,
            "{} {} has fields the API does not know:\n--- rendered\n{}\n--- as the API reads it\n{}",
            doc["kind"],
            doc["metadata"]["name"],
            serde_yaml_ng::to_string(&doc).unwrap(),
            serde_yaml_ng::to_string(&again).unwrap()
        );
    }
}
