//! The verbs: create, get, list, update, patch, delete, with kube-apiserver's semantics.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Map, Value, json};

use super::{
    Inner,
    errors::ApiError,
    managed, patch,
    registry::Kind,
    selector::{FieldSelector, LabelSelector},
    store::{Key, Store},
};

/// Patch media types custom resources accept.
const PATCH_TYPES: &str = "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml";

/// What a request addresses.
#[derive(Debug, Clone)]
pub struct Target {
    /// Kind index.
    pub kind: usize,
    /// Namespace of the path (namespaced kinds).
    pub namespace: Option<String>,
    /// Object name.
    pub name: Option<String>,
    /// Subresource (`status`).
    pub sub: Option<String>,
}

/// Query parameters of a request.
pub type Query = BTreeMap<String, String>;

fn now() -> Time {
    Time(jiff::Timestamp::now().round(jiff::Unit::Second).unwrap_or_else(|_| jiff::Timestamp::now()))
}

fn time_string(t: &Time) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

fn meta(obj: &Value) -> &Value {
    &obj["metadata"]
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata is an object")
}

fn labels(obj: &Value) -> BTreeMap<String, String> {
    meta(obj)
        .get("labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj)
        .get("finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Everything but metadata and status: what bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Value {
    let mut out = obj.clone();
    if let Some(o) = out.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
        o.remove("apiVersion");
        o.remove("kind");
    }
    out
}

/// The object without the fields the server maintains, to tell a no-op write.
fn content(obj: &Value) -> Value {
    let mut out = obj.clone();
    if let Some(m) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    out
}

/// Parses a request body: JSON, or YAML for apply patches.
pub fn parse_body(body: &[u8], yaml: bool) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let parsed: Result<Value, String> = if yaml {
        serde_yaml_ng::from_slice(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    };
    match parsed {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(ApiError::bad_request("the request body must be an object")),
        Err(e) => Err(ApiError::bad_request(format!("the body of the request could not be decoded: {e}"))),
    }
}

fn field_manager(query: &Query, user_agent: &str) -> String {
    query.get("fieldManager").cloned().unwrap_or_else(|| {
        let agent = user_agent.split('/').next().unwrap_or_default();
        if agent.is_empty() { "unknown".into() } else { agent.to_string() }
    })
}

fn dry_run(query: &Query) -> bool {
    query.get("dryRun").is_some_and(|v| v == "All")
}

impl Inner {
    fn kind(&self, target: &Target) -> &Kind {
        &self.kinds[target.kind]
    }

    fn key(&self, target: &Target, name: &str) -> Key {
        (target.kind, target.namespace.clone().unwrap_or_default(), name.to_string())
    }

    fn namespace_kind(&self) -> usize {
        self.kinds.iter().position(|k| k.group.is_empty() && k.plural == "namespaces").unwrap_or(0)
    }

    /// Refuses writes into a missing or terminating namespace.
    fn check_namespace(&self, store: &Store, target: &Target, name: &str) -> Result<(), ApiError> {
        let Some(ns) = &target.namespace else { return Ok(()) };
        let ns_kind = self.namespace_kind();
        match store.get(&(ns_kind, String::new(), ns.clone())) {
            None => Err(ApiError::not_found(&self.kinds[ns_kind], ns)),
            Some(obj) if meta(&obj).get("deletionTimestamp").is_some() => Err(ApiError::forbidden(
                self.kind(target),
                name,
                &format!("unable to create new content in namespace {ns} because it is being terminated"),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Defaulting, pruning and validation (custom resources), as the API server does on writes.
    fn admit(&self, kind: &Kind, name: &str, obj: Value, old: Option<&Value>) -> Result<Value, ApiError> {
        let mut obj = obj;
        if let Some(schema) = &kind.schema {
            obj = schema.admit(&obj, old).map_err(|errors| ApiError::invalid(kind, name, &errors))?;
        }
        Ok(obj)
    }

    /// POST: create.
    pub fn create(
        &self,
        target: &Target,
        query: &Query,
        user_agent: &str,
        body: &[u8],
    ) -> Result<(u16, Value), ApiError> {
        let obj = parse_body(body, false)?;
        self.create_object(target, query, &field_manager(query, user_agent), obj, None)
    }

    /// Creates `obj`; `applied_fields` are the managedFields of an apply-create (else the
    /// manager is recorded as an Update of every field).
    fn create_object(
        &self,
        target: &Target,
        query: &Query,
        manager: &str,
        mut obj: Value,
        applied_fields: Option<Value>,
    ) -> Result<(u16, Value), ApiError> {
        let kind = self.kind(target);
        if kind.namespaced && target.namespace.is_none() {
            return Err(ApiError::method_not_allowed());
        }
        self.check_type(kind, &obj)?;
        let mut store = self.store.lock().map_err(|_| ApiError::bad_request("store poisoned"))?;
        let generate = meta_str(&obj, "generateName").map(str::to_string);
        let name = match (meta_str(&obj, "name").filter(|n| !n.is_empty()), generate) {
            (Some(n), _) => n.to_string(),
            (None, Some(prefix)) => format!("{prefix}{}", self.random_suffix()),
            (None, None) => {
                return Err(ApiError::invalid(
                    kind,
                    "",
                    &[crate::schema::FieldError::required("metadata.name", "name or generateName is required")],
                ));
            }
        };
        match (kind.namespaced, &target.namespace, meta_str(&obj, "namespace")) {
            (true, Some(path_ns), Some(body_ns)) if !body_ns.is_empty() && body_ns != path_ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (true, None, _) => return Err(ApiError::method_not_allowed()),
            _ => {}
        }
        self.check_namespace(&store, target, &name)?;
        let key = self.key(target, &name);
        if store.get(&key).is_some() {
            return Err(ApiError::already_exists(kind, &name));
        }
        {
            let m = meta_mut(&mut obj);
            m.insert("name".into(), json!(name));
            if let Some(ns) = &target.namespace {
                m.insert("namespace".into(), json!(ns));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(self.uid()));
            m.insert("creationTimestamp".into(), time_string(&now()));
            for field in
                ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"]
            {
                m.remove(field);
            }
            if kind.custom {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        if kind.has_status && kind.custom {
            obj.as_object_mut().map(|o| o.remove("status"));
        }
        if kind.group.is_empty() && kind.plural == "namespaces" {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        let mut obj = self.admit(kind, &name, obj, None)?;
        match applied_fields {
            Some(fields) => {
                meta_mut(&mut obj).insert("managedFields".into(), fields);
            }
            None => obj = managed::record_update(&kind.merge, None, &obj, manager, None, &now()),
        }
        if dry_run(query) {
            return Ok((201, obj));
        }
        let rv = store.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let stored = store.put(key, obj, rv);
        Ok((201, (*stored).clone()))
    }

    fn check_type(&self, kind: &Kind, obj: &Value) -> Result<(), ApiError> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let obj_kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        if (!api_version.is_empty() && api_version != kind.api_version())
            || (!obj_kind.is_empty() && obj_kind != kind.kind)
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({})",
                kind.api_version()
            )));
        }
        Ok(())
    }

    /// GET one object.
    pub fn get(&self, target: &Target, name: &str) -> Result<Value, ApiError> {
        let store = self.store.lock().map_err(|_| ApiError::bad_request("store poisoned"))?;
        let obj = store.get(&self.key(target, name)).ok_or_else(|| ApiError::not_found(self.kind(target), name))?;
        Ok(self.subresource_view(target, &obj))
    }

    fn subresource_view(&self, _target: &Target, obj: &Value) -> Value {
        obj.clone()
    }

    /// Parses label and field selectors of a list or watch of `kind`.
    pub fn selectors(&self, kind: &Kind, query: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
        let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let mut supported = vec!["metadata.name", "metadata.namespace"];
        supported.extend_from_slice(kind.selectable_fields());
        fields.check_supported(&supported).map_err(ApiError::bad_request)?;
        Ok((labels, fields))
    }

    /// Whether an object passes a list/watch's selectors.
    pub fn selected(obj: &Value, labels_sel: &LabelSelector, fields: &FieldSelector) -> bool {
        labels_sel.matches(&labels(obj)) && fields.matches(obj)
    }

    /// GET a collection, with selectors and limit/continue paging.
    pub fn list(&self, target: &Target, query: &Query) -> Result<Value, ApiError> {
        let kind = self.kind(target);
        let (label_sel, field_sel) = self.selectors(kind, query)?;
        let store = self.store.lock().map_err(|_| ApiError::bad_request("store poisoned"))?;
        let after = query.get("continue").filter(|c| !c.is_empty()).cloned();
        let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
        let mut items = Vec::new();
        let mut next = None;
        for obj in store.list(target.kind, target.namespace.as_deref()) {
            let position = format!(
                "{}/{}",
                meta_str(&obj, "namespace").unwrap_or_default(),
                meta_str(&obj, "name").unwrap_or_default()
            );
            if after.as_ref().is_some_and(|a| position.as_str() <= a.as_str()) {
                continue;
            }
            if !Self::selected(&obj, &label_sel, &field_sel) {
                continue;
            }
            if limit.is_some_and(|l| items.len() == l) {
                next = items.last().map(|last: &Value| {
                    format!(
                        "{}/{}",
                        meta_str(last, "namespace").unwrap_or_default(),
                        meta_str(last, "name").unwrap_or_default()
                    )
                });
                break;
            }
            items.push((*obj).clone());
        }
        let mut metadata = json!({"resourceVersion": store.rv().to_string()});
        if let Some(next) = next {
            metadata["continue"] = json!(next);
        }
        Ok(json!({
            "kind": format!("{}List", kind.kind),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }

    /// PUT: replace an object (or its status), guarded by resourceVersion.
    pub fn update(
        &self,
        target: &Target,
        name: &str,
        query: &Query,
        user_agent: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        let kind = self.kind(target);
        let obj = parse_body(body, false)?;
        self.check_type(kind, &obj)?;
        if meta_str(&obj, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&obj, "name").unwrap_or_default()
            )));
        }
        let mut store = self.store.lock().map_err(|_| ApiError::bad_request("store poisoned"))?;
        let key = self.key(target, name);
        let current = store.get(&key).ok_or_else(|| ApiError::not_found(kind, name))?;
        match meta_str(&obj, "resourceVersion") {
            None | Some("") => {
                return Err(ApiError::invalid(
                    kind,
                    name,
                    &[crate::schema::FieldError::invalid(
                        "metadata.resourceVersion",
                        json!("0x0"),
                        "must be specified for an update",
                    )],
                ));
            }
            Some(rv) if rv != meta_str(&current, "resourceVersion").unwrap_or_default() => {
                return Err(ApiError::stale(kind, name));
            }
            _ => {}
        }
        let manager = field_manager(query, user_agent);
        self.write(&mut store, target, kind, key, &current, obj, Some(&manager), dry_run(query))
    }

    /// PATCH: JSON patch, merge patch or server-side apply (which may create).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        target: &Target,
        name: &str,
        query: &Query,
        user_agent: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<(u16, Value), ApiError> {
        let kind = self.kind(target);
        let media = content_type.split(';').next().unwrap_or_default().trim();
        let mut store = self.store.lock().map_err(|_| ApiError::bad_request("store poisoned"))?;
        let key = self.key(target, name);
        let current = store.get(&key);
        match media {
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) else {
                    return Err(ApiError::invalid_options("fieldManager: Required value: is required for apply patch"));
                };
                let applied = parse_body(body, true)?;
                self.check_type(kind, &applied)?;
                if meta_str(&applied, "name").is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({}) does not match the name on the URL ({name})",
                        meta_str(&applied, "name").unwrap_or_default()
                    )));
                }
                let force = query.get("force").is_some_and(|f| f == "true");
                let sub = target.sub.as_deref();
                let merged = managed::apply(
                    &kind.merge,
                    current.as_deref(),
                    &applied,
                    manager,
                    sub,
                    kind.has_status,
                    force,
                    &now(),
                )
                .map_err(|conflicts| ApiError::from_status(managed::conflict_status(&conflicts)))?;
                match current {
                    None => {
                        if sub.is_some() {
                            return Err(ApiError::not_found(kind, name));
                        }
                        drop(store);
                        let fields = meta(&merged).get("managedFields").cloned();
                        self.create_object(target, query, manager, merged, fields)
                    }
                    Some(current) => {
                        let updated =
                            self.write(&mut store, target, kind, key, &current, merged, None, dry_run(query))?;
                        Ok((200, updated))
                    }
                }
            }
            "application/json-patch+json"
            | "application/merge-patch+json"
            | "application/strategic-merge-patch+json" => {
                if media == "application/strategic-merge-patch+json" && kind.custom {
                    return Err(ApiError::unsupported_media_type(media, PATCH_TYPES));
                }
                let current = current.ok_or_else(|| ApiError::not_found(kind, name))?;
                let patch_doc: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("the body of the request could not be decoded: {e}")))?;
                let patched = if media == "application/json-patch+json" {
                    patch::json_patch(&current, &patch_doc).map_err(|e| e.to_api_error())?
                } else {
                    patch::merge_patch_checked(&current, &patch_doc).map_err(|e| e.to_api_error())?
                };
                if let Some(rv) = meta_str(&patched, "resourceVersion")
                    && rv != meta_str(&current, "resourceVersion").unwrap_or_default()
                {
                    return Err(ApiError::stale(kind, name));
                }
                let manager = field_manager(query, user_agent);
                let updated =
                    self.write(&mut store, target, kind, key, &current, patched, Some(&manager), dry_run(query))?;
                Ok((200, updated))
            }
            other => Err(ApiError::unsupported_media_type(other, PATCH_TYPES)),
        }
    }

    /// The common tail of update and patch: subresource rules, immutable metadata,
    /// validation, generation, no-op detection, finalizer completion.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        store: &mut Store,
        target: &Target,
        kind: &Kind,
        key: Key,
        current: &Arc<Value>,
        mut new: Value,
        manager: Option<&str>,
        dry: bool,
    ) -> Result<Value, ApiError> {
        let name = key.2.clone();
        let status_write = target.sub.as_deref() == Some("status");
        if status_write {
            let status = new.get("status").cloned();
            let mut base = (**current).clone();
            match status {
                Some(s) => base["status"] = s,
                None => {
                    base.as_object_mut().map(|o| o.remove("status"));
                }
            }
            if let Some(fields) = meta(&new).get("managedFields").cloned() {
                meta_mut(&mut base).insert("managedFields".into(), fields);
            }
            new = base;
        } else if kind.has_status {
            match current.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    new.as_object_mut().map(|o| o.remove("status"));
                }
            }
        }
        {
            let cur_meta = meta(current).clone();
            let m = meta_mut(&mut new);
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match cur_meta.get(field) {
                    Some(v) => m.insert(field.into(), v.clone()),
                    None => m.remove(field),
                };
            }
            m.insert("resourceVersion".into(), cur_meta.get("resourceVersion").cloned().unwrap_or(Value::Null));
            if !m.contains_key("managedFields")
                && let Some(v) = cur_meta.get("managedFields")
            {
                m.insert("managedFields".into(), v.clone());
            }
            if m.get("finalizers").is_some_and(|f| f.as_array().is_some_and(Vec::is_empty)) {
                m.remove("finalizers");
            }
        }
        if let Some(obj) = new.as_object_mut() {
            obj.insert("apiVersion".into(), json!(kind.api_version()));
            obj.insert("kind".into(), json!(kind.kind));
        }
        if kind.group.is_empty() && kind.plural == "namespaces" {
            new["spec"] = current.get("spec").cloned().unwrap_or(json!({"finalizers": ["kubernetes"]}));
            if !status_write {
                new["status"] = current.get("status").cloned().unwrap_or(json!({"phase": "Active"}));
            }
        }
        let mut new = self.admit(kind, &name, new, Some(current))?;
        if kind.custom && spec_part(&new) != spec_part(current) {
            let generation = meta(current).get("generation").and_then(Value::as_i64).unwrap_or(1);
            meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
        }
        if let Some(manager) = manager {
            new = managed::record_update(&kind.merge, Some(current), &new, manager, target.sub.as_deref(), &now());
        }
        if content(&new) == content(current) {
            return Ok((**current).clone());
        }
        if dry {
            return Ok(new);
        }
        let rv = store.next_rv();
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        if meta(&new).get("deletionTimestamp").is_some() && finalizers(&new).is_empty() {
            let removed = store.remove(&key, new, rv);
            self.after_removal(store, &key);
            return Ok((*removed).clone());
        }
        Ok((*store.put(key, new, rv)).clone())
    }

    /// DELETE: remove, or mark for deletion while finalizers remain.
    pub fn delete(&self, target: &Target, name: &str, query: &Query, body: &[u8]) -> Result<Value, ApiError> {
        let kind = self.kind(target);
        let options: Value =
            if body.is_empty() { json!({}) } else { serde_json::from_slice(body).unwrap_or(json!({})) };
        let mut store = self.store.lock().map_err(|_| ApiError::bad_request("store poisoned"))?;
        let key = self.key(target, name);
        let current = store.get(&key).ok_or_else(|| ApiError::not_found(kind, name))?;
        if let Some(uid) = options.pointer("/preconditions/uid").and_then(Value::as_str)
            && Some(uid) != meta_str(&current, "uid")
        {
            return Err(ApiError::conflict(
                kind,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&current, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = options.pointer("/preconditions/resourceVersion").and_then(Value::as_str)
            && Some(rv) != meta_str(&current, "resourceVersion")
        {
            return Err(ApiError::conflict(
                kind,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&current, "resourceVersion").unwrap_or_default()
                ),
            ));
        }
        if dry_run(query) || options.get("dryRun").and_then(Value::as_array).is_some_and(|d| !d.is_empty()) {
            return Ok((*current).clone());
        }
        Ok(self.delete_key(&mut store, &key))
    }

    /// Deletes one object by key (finalizers respected); returns what the client sees.
    pub(super) fn delete_key(&self, store: &mut Store, key: &Key) -> Value {
        let Some(current) = store.get(key) else { return json!({}) };
        let is_namespace = key.0 == self.namespace_kind();
        if !finalizers(&current).is_empty() || is_namespace {
            if meta(&current).get("deletionTimestamp").is_some() {
                return (*current).clone();
            }
            let mut marked = (*current).clone();
            {
                let m = meta_mut(&mut marked);
                m.insert("deletionTimestamp".into(), time_string(&now()));
                m.insert("deletionGracePeriodSeconds".into(), json!(0));
                if self.kinds[key.0].custom {
                    let generation = m.get("generation").and_then(Value::as_i64).unwrap_or(1);
                    m.insert("generation".into(), json!(generation + 1));
                }
            }
            if is_namespace {
                marked["status"] = json!({"phase": "Terminating"});
            }
            let rv = store.next_rv();
            meta_mut(&mut marked).insert("resourceVersion".into(), json!(rv.to_string()));
            let stored = store.put(key.clone(), marked, rv);
            if is_namespace {
                self.terminate_namespace(store, &key.2);
                return store.get(key).map(|o| (*o).clone()).unwrap_or_else(|| (*stored).clone());
            }
            return (*stored).clone();
        }
        let rv = store.next_rv();
        let mut last = (*current).clone();
        meta_mut(&mut last).insert("resourceVersion".into(), json!(rv.to_string()));
        let removed = store.remove(key, last, rv);
        self.after_removal(store, key);
        (*removed).clone()
    }

    /// The namespace controller: delete everything in a terminating namespace, then the namespace.
    fn terminate_namespace(&self, store: &mut Store, namespace: &str) {
        for key in store.keys_in_namespace(namespace) {
            self.delete_key(store, &key);
        }
        self.finish_namespace(store, namespace);
    }

    fn finish_namespace(&self, store: &mut Store, namespace: &str) {
        let ns_key = (self.namespace_kind(), String::new(), namespace.to_string());
        let Some(ns) = store.get(&ns_key) else { return };
        if meta(&ns).get("deletionTimestamp").is_none() || !store.keys_in_namespace(namespace).is_empty() {
            return;
        }
        let rv = store.next_rv();
        let mut last = (*ns).clone();
        meta_mut(&mut last).insert("resourceVersion".into(), json!(rv.to_string()));
        store.remove(&ns_key, last, rv);
    }

    fn after_removal(&self, store: &mut Store, key: &Key) {
        if !key.1.is_empty() {
            self.finish_namespace(store, &key.1.clone());
        }
    }
}

impl ApiError {
    /// 422 for bad options (e.g. an apply without fieldManager).
    pub fn invalid_options(detail: &str) -> Self {
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("PatchOptions.meta.k8s.io \"\" is invalid: {detail}"),
            details: Some(json!({"group": "meta.k8s.io", "kind": "PatchOptions"})),
        }
    }

    /// An error whose `Status` was built elsewhere (patch and apply engines).
    pub fn from_status(status: Value) -> Self {
        ApiError {
            code: status["code"].as_u64().and_then(|c| u16::try_from(c).ok()).unwrap_or(500),
            reason: match status["reason"].as_str() {
                Some("Conflict") => "Conflict",
                Some("BadRequest") => "BadRequest",
                Some("RequestEntityTooLarge") => "RequestEntityTooLarge",
                Some("Invalid") => "Invalid",
                _ => "InternalError",
            },
            message: status["message"].as_str().unwrap_or_default().to_string(),
            details: status.get("details").cloned(),
        }
    }
}
