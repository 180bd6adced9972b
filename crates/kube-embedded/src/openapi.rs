//! OpenAPI v3 documents (`/openapi/v3`), enough for kubectl: `kubectl apply` looks up the
//! `fieldValidation` parameter of each kind's PATCH operation, and `kubectl explain` reads the
//! schemas (the CRDs' openAPIV3Schema, with their field descriptions).

use serde_json::{Value, json};

use super::registry::Kind;

fn path_key(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

/// Schema name of a kind, as kube-apiserver names CRD schemas (`com.example.v1.Widget`).
fn schema_name(kind: &Kind) -> String {
    if kind.group.is_empty() {
        return format!("io.k8s.api.core.{}.{}", kind.version, kind.kind);
    }
    let reversed: Vec<&str> = kind.group.split('.').rev().collect();
    format!("{}.{}.{}", reversed.join("."), kind.version, kind.kind)
}

/// `/openapi/v3`: the group-versions served, with the URL of each document.
pub fn root(kinds: &[Kind]) -> Value {
    let mut paths = serde_json::Map::new();
    for kind in kinds {
        let key = path_key(&kind.group, &kind.version);
        paths.insert(key.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash=embedded")}));
    }
    json!({"paths": paths})
}

/// The document of one group-version (`/openapi/v3/apis/{group}/{version}`).
pub fn document(kinds: &[Kind], group: &str, version: &str) -> Option<Value> {
    let served: Vec<&Kind> = kinds.iter().filter(|k| k.group == group && k.version == version).collect();
    if served.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    schemas.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".into(),
        json!({
            "description": "Standard object's metadata.",
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "Name must be unique within a namespace."},
                "namespace": {"type": "string", "description": "Namespace defines the space within which each name must be unique."},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Map of string keys and values that can be used to organize and categorize objects."},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Annotations is an unstructured key value map stored with a resource."},
                "finalizers": {"type": "array", "items": {"type": "string"}, "description": "Must be empty before the object is deleted from the registry."},
                "generateName": {"type": "string", "description": "An optional prefix used by the server to generate a unique name."}
            }
        }),
    );
    for kind in served {
        let gvk = json!({"group": kind.group, "version": kind.version, "kind": kind.kind});
        let name = schema_name(kind);
        let reference = json!({"$ref": format!("#/components/schemas/{name}")});
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}});
        let query = |names: &[&str]| -> Vec<Value> {
            names
                .iter()
                .map(|n| json!({"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": true}}))
                .collect()
        };
        let op = |action: &str, params: Vec<Value>| json!({"x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": ok});
        let prefix = format!("/{}", path_key(&kind.group, &kind.version));
        let collection = if kind.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", kind.plural)
        } else {
            format!("{prefix}/{}", kind.plural)
        };
        let write_params = ["dryRun", "fieldManager", "fieldValidation"];
        paths.insert(
            collection.clone(),
            json!({
                "get": op("list", query(&["labelSelector", "fieldSelector", "limit", "continue", "watch", "resourceVersion"])),
                "post": op("post", query(&write_params)),
            }),
        );
        let item = json!({
            "get": op("get", vec![]),
            "put": op("put", query(&write_params)),
            "patch": op("patch", query(&["dryRun", "fieldManager", "fieldValidation", "force"])),
            "delete": op("delete", query(&["dryRun", "gracePeriodSeconds", "propagationPolicy"])),
        });
        paths.insert(format!("{collection}/{{name}}"), item.clone());
        if kind.has_status {
            paths.insert(format!("{collection}/{{name}}/status"), item);
        }
        let mut schema = kind.openapi.clone().unwrap_or_else(|| {
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true, "description": format!("{} (built-in kind).", kind.kind)})
        });
        if let Some(obj) = schema.as_object_mut() {
            obj.insert("x-kubernetes-group-version-kind".into(), json!([gvk]));
            let props = obj.entry("properties").or_insert_with(|| json!({}));
            props["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."});
            props["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."});
            props["metadata"] = json!({"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}], "description": "Standard object's metadata."});
        }
        schemas.insert(name, schema);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.36.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
