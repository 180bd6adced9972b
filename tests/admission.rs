//! The ValidatingAdmissionPolicies of deploy/admission.yaml refuse what the API contract says
//! admission refuses, with messages that say what to change.
//!
//! Each policy is read from deploy/ and evaluated the way kube-apiserver does it: the policy
//! matches the request (resource and operation), its `variables` are bound as `variables.<name>`,
//! then every validation runs over `object`, `oldObject` and `request`; a false validation denies
//! with its `messageExpression` (or `message`), an evaluation error denies too (failurePolicy
//! Fail). The CEL is run by the `cel` crate with the Kubernetes functions of kube-cel. kube-cel's
//! own `VapEvaluator` cannot be used: it has no `variables`.

use std::{collections::HashMap, path::Path, sync::Arc};

use kube_cel::{
    KubeCelExt,
    cel::{
        Context, Program, Value as Cel,
        objects::{Key, Map as CelMap},
    },
};
use serde_json::{Value, json};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn admission_docs() -> Vec<Value> {
    yaml_docs(&std::fs::read_to_string(repo().join("deploy/admission.yaml")).expect("deploy/admission.yaml exists"))
}

/// An admission request as the `request` variable and the objects around it.
struct Request {
    operation: &'static str,
    namespace: &'static str,
    name: &'static str,
    object: Value,
    old_object: Value,
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Allowed,
    /// Denied by `policy` with the validation's `reason` and the message the user sees.
    Denied {
        policy: String,
        reason: String,
        message: String,
    },
}

fn to_cel(v: &Value) -> Cel {
    match v {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Cel::Int(i),
            None => Cel::Float(n.as_f64().unwrap()),
        },
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => Cel::Map(CelMap {
            map: Arc::new(map.iter().map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v))).collect()),
        }),
    }
}

fn request_value(r: &Request) -> Value {
    json!({
        "kind": {"group": "ims.io", "version": "v1alpha1", "kind": "Image"},
        "resource": {"group": "ims.io", "version": "v1alpha1", "resource": "images"},
        "requestKind": {"group": "ims.io", "version": "v1alpha1", "kind": "Image"},
        "requestResource": {"group": "ims.io", "version": "v1alpha1", "resource": "images"},
        "name": r.name,
        "namespace": r.namespace,
        "operation": r.operation,
        "userInfo": {"username": "alice", "uid": "u-1", "groups": ["system:authenticated"]},
        "dryRun": false,
    })
}

fn string_list(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// Does the policy's matchConstraints select this request on ims.io/v1alpha1 images?
fn matches(policy: &Value, operation: &str) -> bool {
    let rules = policy["spec"]["matchConstraints"]["resourceRules"].as_array().expect("resourceRules");
    rules.iter().any(|rule| {
        string_list(&rule["apiGroups"]).contains(&"ims.io")
            && string_list(&rule["apiVersions"]).contains(&"v1alpha1")
            && string_list(&rule["resources"]).contains(&"images")
            && string_list(&rule["operations"]).contains(&operation)
    })
}

fn run(ctx: &Context, expression: &str) -> Result<Cel, String> {
    let program = Program::compile(expression).map_err(|e| format!("does not compile: {e}"))?;
    program.execute(ctx).map_err(|e| format!("evaluation error: {e}"))
}

/// Evaluates every policy of deploy/admission.yaml against the request, as kube-apiserver does.
fn admit(request: &Request) -> Outcome {
    let docs = admission_docs();
    for policy in docs.iter().filter(|d| d["kind"] == "ValidatingAdmissionPolicy") {
        if !matches(policy, request.operation) {
            continue;
        }
        let name = policy["metadata"]["name"].as_str().unwrap().to_string();
        let mut ctx = Context::default().with_all();
        ctx.add_variable_from_value("object", to_cel(&request.object));
        ctx.add_variable_from_value("oldObject", to_cel(&request.old_object));
        ctx.add_variable_from_value("request", to_cel(&request_value(request)));
        // Variables are evaluated in order; each may use the ones before it.
        let mut variables: HashMap<Key, Cel> = HashMap::new();
        ctx.add_variable_from_value("variables", Cel::Map(CelMap { map: Arc::new(variables.clone()) }));
        for var in policy["spec"]["variables"].as_array().into_iter().flatten() {
            let var_name = var["name"].as_str().unwrap();
            let value = run(&ctx, var["expression"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{name}: variable {var_name}: {e}"));
            variables.insert(Key::String(Arc::new(var_name.to_string())), value);
            ctx.add_variable_from_value("variables", Cel::Map(CelMap { map: Arc::new(variables.clone()) }));
        }
        for validation in policy["spec"]["validations"].as_array().expect("validations") {
            let expression = validation["expression"].as_str().unwrap();
            let reason = validation["reason"].as_str().unwrap_or("Invalid").to_string();
            match run(&ctx, expression) {
                Ok(Cel::Bool(true)) => continue,
                Ok(Cel::Bool(false)) => {
                    // kube-apiserver uses messageExpression when it yields a non-empty single
                    // line, else `message`. Here a messageExpression that fails is a test failure:
                    // the user would get the less precise static message.
                    let message = match validation["messageExpression"].as_str() {
                        Some(me) => match run(&ctx, me) {
                            Ok(Cel::String(s)) if !s.trim().is_empty() && !s.contains('\n') => s.to_string(),
                            other => panic!("{name}: messageExpression gives {other:?}"),
                        },
                        None => validation["message"].as_str().expect("a message").to_string(),
                    };
                    return Outcome::Denied { policy: name, reason, message };
                }
                other => panic!("{name}: `{expression}` gives {other:?} (failurePolicy Fail would deny)"),
            }
        }
    }
    Outcome::Allowed
}

fn image(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "ims.io/v1alpha1",
        "kind": "Image",
        "metadata": {"name": name, "namespace": namespace, "uid": "0d9c7a52-2f0e-4a55-9a44-3b1f7c1b2a10"},
        "spec": spec,
    })
}

fn delete(namespace: &'static str, name: &'static str, spec: Value) -> Request {
    Request { operation: "DELETE", namespace, name, object: Value::Null, old_object: image(namespace, name, spec) }
}

fn create(namespace: &'static str, name: &'static str, spec: Value) -> Request {
    Request { operation: "CREATE", namespace, name, object: image(namespace, name, spec), old_object: Value::Null }
}

fn update(namespace: &'static str, name: &'static str, old: Value, new: Value) -> Request {
    Request {
        operation: "UPDATE",
        namespace,
        name,
        object: image(namespace, name, new),
        old_object: image(namespace, name, old),
    }
}

fn spec(visibility: &str, protected: bool) -> Value {
    json!({
        "region": "eu-west",
        "type": "SystemDisk",
        "visibility": visibility,
        "protected": protected,
        "os": {"type": "Linux", "distribution": "Ubuntu", "version": "24.04", "architecture": "x86_64"},
        "source": {"url": {"url": "https://images.example.com/noble.qcow2", "format": "Auto"}},
    })
}

fn denied(policy: &str, reason: &str, message: &str) -> Outcome {
    Outcome::Denied { policy: policy.into(), reason: reason.into(), message: message.into() }
}

#[test]
fn deleting_a_protected_image_is_refused_with_the_command_that_unprotects_it() {
    assert_eq!(
        admit(&delete("tenant-a", "golden", spec("Private", true))),
        denied(
            "ims-image-protected",
            "Forbidden",
            "Image tenant-a/golden has spec.protected: true, so it cannot be deleted; set spec.protected to false \
             first: kubectl patch image golden -n tenant-a --type merge -p '{\"spec\":{\"protected\":false}}'"
        )
    );
}

#[test]
fn deleting_an_unprotected_image_is_allowed() {
    assert_eq!(admit(&delete("tenant-a", "scratch", spec("Private", false))), Outcome::Allowed);
    // Written before `protected` had a default: absent means not protected.
    let mut no_flag = spec("Private", false);
    no_flag.as_object_mut().unwrap().remove("protected");
    assert_eq!(admit(&delete("tenant-a", "scratch", no_flag)), Outcome::Allowed);
}

/// DELETECOLLECTION (the namespace controller uses it) is admitted once for the whole collection,
/// with no name and no oldObject, before each item is admitted on its own: the collection-level
/// check must not fail, or no namespace with Images could ever be deleted.
#[test]
fn the_collection_level_check_of_a_deletecollection_passes() {
    let collection =
        Request { operation: "DELETE", namespace: "tenant-a", name: "", object: Value::Null, old_object: Value::Null };
    assert_eq!(admit(&collection), Outcome::Allowed);
    // The `cel` crate answers `has(null.spec.x)` with false where cel-go reports an error, so the
    // guard is also checked as written: a DELETE rule reading oldObject first lets null through.
    for policy in admission_docs().iter().filter(|d| d["kind"] == "ValidatingAdmissionPolicy") {
        if !matches(policy, "DELETE") {
            continue;
        }
        for v in policy["spec"]["validations"].as_array().unwrap() {
            let expression = v["expression"].as_str().unwrap();
            assert!(
                !expression.contains("oldObject") || expression.starts_with("oldObject == null ||"),
                "{}: `{expression}` must start with `oldObject == null ||`",
                policy["metadata"]["name"]
            );
        }
    }
}

#[test]
fn unprotecting_an_image_is_an_update_and_is_allowed() {
    assert_eq!(admit(&update("tenant-a", "golden", spec("Private", true), spec("Private", false))), Outcome::Allowed);
}

#[test]
fn a_public_image_in_a_tenant_namespace_is_refused_with_what_to_use_instead() {
    let want = denied(
        "ims-image-visibility",
        "Invalid",
        "spec.visibility: Public is only allowed in the platform namespace ims-public; in namespace tenant-a use \
         visibility Private (this namespace and the tenants it shares with) or Marketplace (every tenant), or \
         create the image in namespace ims-public",
    );
    assert_eq!(admit(&create("tenant-a", "ubuntu", spec("Public", false))), want);
    // Turning an existing Private image Public is refused the same way.
    assert_eq!(admit(&update("tenant-a", "ubuntu", spec("Private", false), spec("Public", false))), want);
}

#[test]
fn a_public_image_in_the_platform_namespace_is_allowed() {
    assert_eq!(admit(&create("ims-public", "ubuntu", spec("Public", false))), Outcome::Allowed);
    assert_eq!(admit(&update("ims-public", "ubuntu", spec("Private", false), spec("Public", false))), Outcome::Allowed);
}

#[test]
fn private_and_marketplace_images_are_allowed_in_any_namespace() {
    for visibility in ["Private", "Marketplace"] {
        assert_eq!(admit(&create("tenant-a", "ubuntu", spec(visibility, false))), Outcome::Allowed, "{visibility}");
        assert_eq!(admit(&create("ims-public", "ubuntu", spec(visibility, false))), Outcome::Allowed, "{visibility}");
    }
    // A reference has no visibility of its own.
    let reference = json!({"region": "eu-west", "source": {"image": {"namespace": "ims-public", "name": "ubuntu"}}});
    assert_eq!(admit(&create("tenant-a", "ubuntu-ref", reference)), Outcome::Allowed);
}

/// An image made Public in a tenant namespace before the policy existed can still be changed
/// and deleted (its finalizer removed by an UPDATE); the controller reports it VisibilityNotAllowed.
#[test]
fn updates_of_an_already_public_image_are_ratcheted() {
    let mut terminating = spec("Public", false);
    terminating["description"] = json!("finalizer removed");
    assert_eq!(admit(&update("tenant-a", "legacy", spec("Public", false), terminating)), Outcome::Allowed);
    assert_eq!(admit(&delete("tenant-a", "legacy", spec("Public", false))), Outcome::Allowed);
}

#[test]
fn every_policy_is_bound_to_deny_and_fails_closed() {
    let docs = admission_docs();
    let policies: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ValidatingAdmissionPolicy").collect();
    let bindings: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ValidatingAdmissionPolicyBinding").collect();
    assert_eq!(policies.len(), 2);
    for doc in &docs {
        assert_eq!(doc["apiVersion"], "admissionregistration.k8s.io/v1", "{}", doc["metadata"]["name"]);
    }
    for policy in &policies {
        let name = policy["metadata"]["name"].as_str().unwrap();
        assert_eq!(policy["spec"]["failurePolicy"], "Fail", "{name}");
        assert!(policy["spec"]["paramKind"].is_null(), "{name} needs no parameter object");
        for rule in policy["spec"]["matchConstraints"]["resourceRules"].as_array().unwrap() {
            for key in ["apiGroups", "apiVersions", "resources", "operations"] {
                assert!(!string_list(&rule[key]).contains(&"*"), "{name}: no wildcard in {key}");
            }
        }
        for validation in policy["spec"]["validations"].as_array().unwrap() {
            assert!(validation["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: a static fallback message");
        }
        let bound: Vec<&&Value> = bindings.iter().filter(|b| b["spec"]["policyName"] == name).collect();
        assert_eq!(bound.len(), 1, "{name} has one binding");
        assert_eq!(bound[0]["spec"]["validationActions"], json!(["Deny"]), "{name}");
        assert!(bound[0]["spec"]["paramRef"].is_null(), "{name}");
    }
}

/// The API server limits each expression's cost: the rules may only compare and join strings it
/// bounds itself, never loop (`all`, `exists`, `map`, `filter`) or match patterns.
#[test]
fn expressions_use_only_constant_cost_operations() {
    let allowed = ["_==_", "_!=_", "_&&_", "_||_", "!_", "_+_", "has"];
    for policy in admission_docs().iter().filter(|d| d["kind"] == "ValidatingAdmissionPolicy") {
        let name = policy["metadata"]["name"].as_str().unwrap();
        let mut expressions: Vec<&str> = Vec::new();
        for v in policy["spec"]["validations"].as_array().unwrap() {
            expressions.extend(v["expression"].as_str());
            expressions.extend(v["messageExpression"].as_str());
        }
        for v in policy["spec"]["variables"].as_array().into_iter().flatten() {
            expressions.extend(v["expression"].as_str());
        }
        for expression in expressions {
            let program = Program::compile(expression).unwrap_or_else(|e| panic!("{name}: {expression}: {e}"));
            for f in program.references().functions() {
                assert!(allowed.contains(&f), "{name}: `{f}` in `{expression}` is not a constant-cost operation");
            }
            let vars = program.references().variables().into_iter().map(str::to_string).collect::<Vec<_>>();
            for v in &vars {
                assert!(
                    ["object", "oldObject", "request", "variables"].contains(&v.as_str()),
                    "{name}: unknown variable {v} in `{expression}`"
                );
            }
        }
    }
}

/// The policy's platform namespace is the one the Deployment gives the operator.
#[test]
fn the_policy_and_the_operator_agree_on_the_platform_namespace() {
    let policy = admission_docs()
        .into_iter()
        .find(|d| d["metadata"]["name"] == "ims-image-visibility")
        .expect("the visibility policy");
    let var = policy["spec"]["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "publicNamespace")
        .expect("variable publicNamespace");
    let deployment = yaml_docs(&std::fs::read_to_string(repo().join("deploy/deployment.yaml")).unwrap()).remove(0);
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
    let flag = env.iter().find(|e| e["name"] == "IMS_PUBLIC_NAMESPACE").expect("IMS_PUBLIC_NAMESPACE");
    assert_eq!(var["expression"], format!("'{}'", flag["value"].as_str().unwrap()));
}
