//! Validation of custom objects against a CustomResourceDefinition's `openAPIV3Schema`, the
//! way kube-apiserver (apiextensions-apiserver) does it, so that an in-memory API and tests
//! answer like the real server: `422 Invalid` with the same field causes and texts.
//!
//! [`CrdSchema::admit`] reproduces, for create and update:
//! 1. pruning of unknown fields (`pruning/algorithm.go`) and of non-nullable `null`s without
//!    default (`defaulting/prunenulls.go`),
//! 2. defaulting (`defaulting/algorithm.go`),
//! 3. validation, in the server's order: type meta, object meta (`metadata.name` …), the
//!    OpenAPI schema (kube-openapi's validators, with update ratcheting), list-type set/map
//!    uniqueness, then the `x-kubernetes-validations` CEL rules (skipped, with the server's
//!    notice, when a blocking error was found).
//!
//! Errors are in the server's order; where the server iterates Go maps (properties of an
//! object) the order here is the property names' order.

mod cel;
mod errors;
mod formats;
mod listtype;
mod meta;
pub(crate) mod node;
mod openapi;
mod ratchet;
mod structural;

#[cfg(test)]
mod tests;

use std::{fmt, sync::Arc};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

pub use errors::{FieldError, FieldErrorKind, go_json, go_quote, go_value};

use node::Node;

/// A `field.Path` under construction: `None` is the nil path (printed `<nil>`).
#[derive(Clone, Debug, Default)]
pub(crate) struct FPath(Option<String>);

impl FPath {
    pub(crate) fn root() -> FPath {
        FPath(None)
    }

    pub(crate) fn is_root(&self) -> bool {
        self.0.is_none()
    }

    pub(crate) fn child(&self, name: &str) -> FPath {
        FPath(Some(match &self.0 {
            None => name.to_string(),
            Some(p) => format!("{p}.{name}"),
        }))
    }

    pub(crate) fn key(&self, k: &str) -> FPath {
        FPath(Some(format!("{}[{k}]", self.0.as_deref().unwrap_or(""))))
    }

    pub(crate) fn index(&self, i: usize) -> FPath {
        FPath(Some(format!("{}[{i}]", self.0.as_deref().unwrap_or(""))))
    }
}

impl fmt::Display for FPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("<nil>"))
    }
}

/// The detail of the error kube-apiserver adds when it skips the CEL rules.
pub const CEL_SKIPPED_DETAIL: &str = "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation";

/// A CRD's structural schema (storage version), compiled once (regexes, CEL programs).
pub struct CrdSchema {
    /// Shared with the kind's merge rules (`managed::MergeSchema`): compiled once.
    root: Arc<Node>,
    group: String,
    version: String,
    kind: String,
    namespaced: bool,
    status_subresource: bool,
}

impl fmt::Debug for CrdSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrdSchema")
            .field("group", &self.group)
            .field("version", &self.version)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl CrdSchema {
    /// From a CRD: uses the storage version's `schema.openAPIV3Schema` (or the only served
    /// version when none is marked storage).
    pub fn from_crd(crd: &CustomResourceDefinition) -> Result<Self, String> {
        let versions = &crd.spec.versions;
        let v = versions
            .iter()
            .find(|v| v.storage)
            .or_else(|| (versions.len() == 1).then(|| &versions[0]))
            .ok_or_else(|| format!("CRD {}: no storage version", crd.spec.names.kind))?;
        let schema = v
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| format!("CRD {}: version {} has no openAPIV3Schema", crd.spec.names.kind, v.name))?;
        let json = serde_json::to_value(schema).map_err(|e| format!("CRD {}: {e}", crd.spec.names.kind))?;
        let mut s = Self::from_schema_json(&json)?;
        s.group = crd.spec.group.clone();
        s.version = v.name.clone();
        s.kind = crd.spec.names.kind.clone();
        s.namespaced = crd.spec.scope == "Namespaced";
        s.status_subresource = v.subresources.as_ref().is_some_and(|r| r.status.is_some());
        Ok(s)
    }

    /// From an `openAPIV3Schema` as JSON (no kind/apiVersion checks, cluster-scoped, no
    /// status subresource): for tests of schema fragments.
    pub fn from_schema_json(schema: &Value) -> Result<Self, String> {
        Ok(CrdSchema {
            root: Arc::new(Node::compile(schema)?),
            group: String::new(),
            version: String::new(),
            kind: String::new(),
            namespaced: false,
            status_subresource: false,
        })
    }

    /// The compiled schema.
    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.root
    }

    /// The CRD's group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The (storage) version the schema is from.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The CRD's kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Whether objects live in namespaces.
    pub fn namespaced(&self) -> bool {
        self.namespaced
    }

    /// Whether the version has the `/status` subresource (then the main resource ignores
    /// `status` on create and update, which is up to the caller of [`CrdSchema::admit`]).
    pub fn status_subresource(&self) -> bool {
        self.status_subresource
    }

    /// Prunes unknown fields and non-nullable nulls without default, then applies the
    /// defaults: what the API server does when it decodes a request or a stored object.
    pub fn prune_and_default(&self, obj: &Value) -> Value {
        let mut o = obj.clone();
        structural::prune(&mut o, &self.root, true);
        structural::prune_nulls(&mut o, Some(&self.root), 0);
        structural::default(&mut o, &self.root, 0);
        o
    }

    /// What kube-apiserver does to an object on create (`old = None`) or update
    /// (`old = Some(previous stored object)`): prune, default, validate. Returns the object
    /// as it would be stored, or all field errors (in the server's order).
    ///
    /// Not done here: status wiping of the status subresource, metadata bookkeeping
    /// (generation, resourceVersion, managedFields), name generation.
    pub fn admit(&self, obj: &Value, old: Option<&Value>) -> Result<Value, Vec<FieldError>> {
        if !obj.is_object() {
            return Err(vec![FieldError::invalid(
                "<nil>",
                Value::String(String::new()),
                "the object must be a JSON object",
            )]);
        }
        let obj = self.prune_and_default(obj);
        let old = old.filter(|o| o.is_object()).map(|o| self.prune_and_default(o));
        let old = old.as_ref();

        if !self.kind.is_empty() {
            let api_version =
                if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) };
            let errs = meta::validate_type_meta(&obj, &self.kind, &api_version);
            if !errs.is_empty() {
                return Err(errs);
            }
        }

        let mut errs = match old {
            None => meta::validate_create(&obj, self.namespaced),
            Some(o) => meta::validate_update(&obj, o),
        };
        openapi::validate(&self.root, &obj, "", old, &mut errs);
        match old {
            // Ratcheting of list-type uniqueness: not checked when the old object broke it.
            Some(o) if !listtype::validate(&self.root, o).is_empty() => {}
            _ => errs.extend(listtype::validate(&self.root, &obj)),
        }
        if self.root.has_rules {
            let blocking = errs.iter().any(|e| {
                matches!(
                    e.kind,
                    FieldErrorKind::NotSupported
                        | FieldErrorKind::Required
                        | FieldErrorKind::TooLong
                        | FieldErrorKind::TooMany
                        | FieldErrorKind::TypeInvalid
                )
            });
            if blocking {
                errs.push(FieldError::invalid("<nil>", Value::Null, CEL_SKIPPED_DETAIL));
            } else {
                cel::validate(&self.root, &obj, old, &mut errs);
            }
        }
        if errs.is_empty() { Ok(obj) } else { Err(errs) }
    }

    /// The checks the API server makes on the `x-kubernetes-validations` rules when the CRD
    /// is created: every rule (and messageExpression) compiles, `reason`, `fieldPath` and
    /// `optionalOldSelf` are valid, transition rules are on correlatable nodes, kube-cel's
    /// static analysis (variable scope, missing bounds) finds nothing, and the estimated cost
    /// (kube-cel's heuristic) is within the per-rule budget and, multiplied by how many times
    /// each rule may run, within the per-CRD budget. Returns one description per problem
    /// (empty = fine).
    pub fn cel_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        cel::problems(&self.root, "openAPIV3Schema", &mut out);
        out
    }
}

/// The message of the 422 Status, as `apierrors.NewInvalid` writes it:
/// `Widget.example.com "x" is invalid: [spec.size: Invalid value: ..., spec.tags[1]: ...]`
/// (one error: no brackets; repeated messages once).
pub fn invalid_message(kind: &str, group: &str, name: &str, errors: &[FieldError]) -> String {
    let qualified = if group.is_empty() { kind.to_string() } else { format!("{kind}.{group}") };
    let mut msgs: Vec<String> = Vec::new();
    for e in errors {
        let m = e.to_string();
        if !msgs.contains(&m) {
            msgs.push(m);
        }
    }
    match msgs.len() {
        0 => format!("{qualified} {} is invalid", go_quote(name)),
        1 => format!("{qualified} {} is invalid: {}", go_quote(name), msgs[0]),
        _ => format!("{qualified} {} is invalid: [{}]", go_quote(name), msgs.join(", ")),
    }
}

/// The `details.causes` of the 422 Status: `{reason, message, field}` per error.
pub fn status_causes(errors: &[FieldError]) -> Vec<Value> {
    errors
        .iter()
        .map(|e| {
            serde_json::json!({
                "reason": e.kind.reason(),
                "message": e.body(),
                "field": e.field,
            })
        })
        .collect()
}

/// The whole 422 `Status` object kube-apiserver returns for invalid objects.
pub fn invalid_status(kind: &str, group: &str, name: &str, errors: &[FieldError]) -> Value {
    let mut details = serde_json::Map::new();
    for (k, v) in [("name", name), ("group", group), ("kind", kind)] {
        if !v.is_empty() {
            details.insert(k.to_string(), Value::String(v.to_string()));
        }
    }
    if !errors.is_empty() {
        details.insert("causes".to_string(), Value::Array(status_causes(errors)));
    }
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": invalid_message(kind, group, name, errors),
        "reason": "Invalid",
        "details": details,
        "code": 422,
    })
}
