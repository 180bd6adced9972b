//! The generated CRDs, crds/ and deploy/ agree, and deploy/ renders.

use std::{collections::BTreeSet, path::Path, process::Command};

use ims_operator::{api, cli};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn crds_directory_matches_the_rust_types() {
    let dir = repo().join("crds");
    let mut expected = BTreeSet::new();
    for crd in api::crds() {
        let name = cli::crd_file_name(&crd);
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            on_disk == cli::crd_yaml(&crd),
            "crds/{name} differs from the Rust types: run `cargo run -- crds --output-dir crds` and commit"
        );
        expected.insert(name);
    }
    assert_eq!(std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap_or_default(), cli::crds_kustomization());
    expected.insert("kustomization.yaml".into());
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(present, expected, "crds/ holds exactly the generated files");
}

#[test]
fn crds_command_prints_what_crds_holds() {
    let out = Command::new(env!("CARGO_BIN_EXE_ims-operator")).arg("crds").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<&str> = stdout.split("---\n").collect();
    assert_eq!(docs.len(), 5);
    for (doc, crd) in docs.iter().zip(api::crds()) {
        let file = std::fs::read_to_string(repo().join("crds").join(cli::crd_file_name(&crd))).unwrap();
        assert_eq!(*doc, file);
    }
}

#[test]
fn names_scope_and_printer_columns_follow_the_api_contract() {
    let want = [
        ("regions.ims.io", "Region", "Cluster", "rgn", vec!["Store", "Ready"]),
        ("images.ims.io", "Image", "Namespaced", "img", vec!["Region", "Type", "Visibility", "Phase", "Size", "Age"]),
        ("imageshares.ims.io", "ImageShare", "Namespaced", "imgshare", vec!["Image", "Members", "Accepted", "Ready"]),
        (
            "imagecopies.ims.io",
            "ImageCopy",
            "Namespaced",
            "imgcopy",
            vec!["Source", "Destination", "Phase", "Progress"],
        ),
        ("imagequotas.ims.io", "ImageQuota", "Namespaced", "imgquota", vec!["Used"]),
    ];
    let crds = api::crds();
    for ((name, kind, scope, short, columns), crd) in want.into_iter().zip(&crds) {
        assert_eq!(crd.metadata.name.as_deref(), Some(name));
        assert_eq!(crd.spec.group, "ims.io");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.scope, scope);
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&[short.to_string()][..]));
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["ims".to_string()][..]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{kind} has a status subresource"
        );
        let have: Vec<String> = version.additional_printer_columns.iter().flatten().map(|c| c.name.clone()).collect();
        for column in columns {
            assert!(have.iter().any(|h| h == column), "{kind} lacks printer column {column}: {have:?}");
        }
        let schema = serde_json::to_value(&version.schema).unwrap();
        let conditions = if kind == "ImageQuota" {
            None
        } else {
            Some(&schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"])
        };
        if let Some(conditions) = conditions {
            assert_eq!(conditions["x-kubernetes-list-type"], "map", "{kind} conditions are a list-map");
            assert_eq!(conditions["x-kubernetes-list-map-keys"], serde_json::json!(["type"]));
        }
        assert!(
            schema["openAPIV3Schema"]["properties"]["status"]["properties"]["observedGeneration"].is_object(),
            "{kind} has status.observedGeneration"
        );
    }
}

/// Every field a user can set has a description, so `kubectl explain` always says something.
#[test]
fn every_spec_field_is_documented() {
    fn walk(path: &str, node: &serde_json::Value, missing: &mut Vec<String>) {
        if node.get("description").and_then(|d| d.as_str()).is_none_or(str::is_empty) {
            missing.push(path.to_string());
        }
        if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
            for (name, child) in props {
                walk(&format!("{path}.{name}"), child, missing);
            }
        }
        if let Some(items) = node.get("items").filter(|i| i.get("properties").is_some()) {
            for (name, child) in items["properties"].as_object().unwrap() {
                walk(&format!("{path}[].{name}"), child, missing);
            }
        }
    }
    let mut missing = Vec::new();
    for crd in api::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        walk(&crd.spec.names.kind, &schema["openAPIV3Schema"]["properties"]["spec"], &mut missing);
    }
    assert!(missing.is_empty(), "fields without a description: {missing:?}");
}

fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(repo())
        .output()
        .expect("kubectl is needed to render deploy/ (.ci/run installs it)");
    assert!(out.status.success(), "kubectl kustomize {dir} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn deploy_renders_with_the_crds_and_least_privilege_rbac() {
    let rendered = kustomize("deploy");
    let docs: Vec<serde_json::Value> =
        serde_yaml_ng::Deserializer::from_str(&rendered).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let kinds: Vec<(&str, &str)> =
        docs.iter().map(|d| (d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap())).collect();
    for crd in api::crds() {
        let name = crd.metadata.name.unwrap();
        assert!(kinds.contains(&("CustomResourceDefinition", name.as_str())), "deploy/ installs {name}");
    }
    for want in [
        ("Namespace", "ims-system"),
        ("ServiceAccount", "ims-operator"),
        ("ClusterRole", "ims-operator"),
        ("Deployment", "ims-operator"),
    ] {
        assert!(kinds.contains(&want), "deploy/ renders {want:?}: {kinds:?}");
    }
    for doc in docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role") {
        for rule in doc["rules"].as_array().unwrap() {
            for key in ["apiGroups", "resources", "verbs"] {
                for v in rule[key].as_array().unwrap() {
                    assert_ne!(v, "*", "no wildcard in {key} of {}", doc["metadata"]["name"]);
                }
            }
        }
    }
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(container["resources"]["requests"].is_object() && container["resources"]["limits"].is_object());
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
}

/// Every RBAC rule in deploy/ says why it exists, in a comment right above it.
#[test]
fn every_rbac_rule_has_a_comment() {
    let text = std::fs::read_to_string(repo().join("deploy/rbac.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("- apiGroups:") {
            assert!(
                i > 0 && lines[i - 1].trim_start().starts_with('#'),
                "rule at deploy/rbac.yaml:{} has no comment",
                i + 1
            );
        }
    }
}
