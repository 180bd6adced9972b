//! The resources the embedded API serves: the custom resources of the CRDs it is given and the
//! built-in kinds controllers and kubectl commonly use.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition,
};
use serde_json::{Value, json};

use super::managed::MergeSchema;
use crate::schema::CrdSchema;

/// One served resource.
pub struct Kind {
    /// API group ("" for core).
    pub group: String,
    /// Version.
    pub version: String,
    /// Kind, e.g. `Image`.
    pub kind: String,
    /// Plural resource name, e.g. `images`.
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether `/status` is a subresource (spec writes ignore status and vice versa).
    pub has_status: bool,
    /// Short names for discovery.
    pub short_names: Vec<String>,
    /// Categories for discovery (`kubectl get <category>`).
    pub categories: Vec<String>,
    /// Structural schema and CEL rules (custom resources only).
    pub schema: Option<CrdSchema>,
    /// How server-side apply merges lists and maps.
    pub merge: MergeSchema,
    /// Printer columns for `kubectl get` tables.
    pub columns: Vec<CustomResourceColumnDefinition>,
    /// Custom resources count `metadata.generation`.
    pub custom: bool,
    /// The openAPIV3Schema (custom resources), for `/openapi/v3`.
    pub openapi: Option<Value>,
}

impl Kind {
    /// Fields a field selector may name besides `metadata.name` and `metadata.namespace`, as the
    /// apiserver allows them for built-in kinds (custom resources: none).
    pub fn selectable_fields(&self) -> &'static [&'static str] {
        match (self.group.as_str(), self.kind.as_str(), self.schema.is_none()) {
            ("", "Pod", true) => &["status.phase"],
            _ => &[],
        }
    }

    /// `apiVersion` of the kind's objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// `plural.group` (or `plural` for core), as Status messages name the resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// Builds a served kind from a CRD (its storage version).
    pub fn from_crd(crd: &CustomResourceDefinition) -> Result<Self, String> {
        let version = crd
            .spec
            .versions
            .iter()
            .find(|v| v.storage)
            .ok_or_else(|| format!("CRD {:?} has no storage version", crd.metadata.name))?;
        let openapi = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).map(|s| json!(s));
        let schema = CrdSchema::from_crd(crd)?;
        let merge = MergeSchema::of(Some(&schema));
        Ok(Kind {
            group: crd.spec.group.clone(),
            version: version.name.clone(),
            kind: crd.spec.names.kind.clone(),
            plural: crd.spec.names.plural.clone(),
            singular: crd.spec.names.singular.clone().unwrap_or_else(|| crd.spec.names.kind.to_lowercase()),
            namespaced: crd.spec.scope == "Namespaced",
            has_status: version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            short_names: crd.spec.names.short_names.clone().unwrap_or_default(),
            categories: crd.spec.names.categories.clone().unwrap_or_default(),
            schema: Some(schema),
            merge,
            columns: version.additional_printer_columns.clone().unwrap_or_default(),
            custom: true,
            openapi,
        })
    }

    fn builtin(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool, has_status: bool) -> Self {
        Kind {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            namespaced,
            has_status,
            short_names: Vec::new(),
            categories: Vec::new(),
            schema: None,
            merge: MergeSchema::of(None),
            columns: Vec::new(),
            custom: false,
            openapi: None,
        }
    }

    /// The discovery entry (`APIResource`) of this kind and its status subresource.
    pub fn discovery(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": self.short_names,
            "categories": self.categories,
        })];
        if self.short_names.is_empty() {
            out[0].as_object_mut().map(|o| o.remove("shortNames"));
        }
        if self.categories.is_empty() {
            out[0].as_object_mut().map(|o| o.remove("categories"));
        }
        if self.has_status {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

/// Every kind the embedded API serves: the built-in ones, then those of `crds`.
pub fn kinds(crds: impl IntoIterator<Item = CustomResourceDefinition>) -> Result<Vec<Kind>, String> {
    let mut kinds = vec![
        Kind::builtin("", "v1", "Namespace", "namespaces", false, true),
        Kind::builtin("", "v1", "Secret", "secrets", true, false),
        Kind::builtin("events.k8s.io", "v1", "Event", "events", true, false),
        Kind::builtin("coordination.k8s.io", "v1", "Lease", "leases", true, false),
        // What a capture reads (`source.volume`): claims, the volumes they bind, and the pods
        // that mount them. Stored and served as they are: no binder, no kubelet.
        Kind::builtin("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", true, true),
        Kind::builtin("", "v1", "PersistentVolume", "persistentvolumes", false, true),
        Kind::builtin("", "v1", "Pod", "pods", true, true),
        // A capture's mover Job (stored; nothing runs it).
        Kind::builtin("batch", "v1", "Job", "jobs", true, true),
    ];
    kinds[0].short_names = vec!["ns".into()];
    kinds[2].short_names = vec!["ev".into()];
    kinds[4].short_names = vec!["pvc".into()];
    kinds[5].short_names = vec!["pv".into()];
    kinds[6].short_names = vec!["po".into()];
    for crd in crds {
        kinds.push(Kind::from_crd(&crd)?);
    }
    Ok(kinds)
}
