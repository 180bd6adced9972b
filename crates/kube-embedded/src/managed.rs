//! Server-side apply field management, with the semantics of `sigs.k8s.io/structured-merge-diff`
//! and kube-apiserver's field manager (`k8s.io/apimachinery/pkg/util/managedfields`).
//!
//! Ownership is kept in `metadata.managedFields` (the `FieldsV1` format: `{"f:spec":{"f:region":{}}}`,
//! `"k:{\"type\":\"Ready\"}"` for list-map items, `"v:\"x\""` for set items, `"."` when a node is
//! owned itself and has owned children). Entries are keyed like the real server: `(manager,
//! "Apply", subresource)` for appliers and `(manager, "Update", apiVersion, subresource)` for
//! updaters.
//!
//! - [`apply`] is a server-side apply (`PATCH` with `application/apply-patch+yaml`): the applied
//!   configuration is merged into the live object (maps per key, list-maps per key, sets per value,
//!   atomic lists and scalars replaced), the applier owns exactly what it sent, what it owned before
//!   and no longer sends is removed unless someone else owns it, and changing a field owned by
//!   someone else is a conflict unless forced.
//! - [`record_update`] records the owner of a create/update/patch: the writer takes every field it
//!   changed, from whoever owned it.
//! - [`conflict_message`] / [`conflict_status`] build kube-apiserver's 409 answer.
//!
//! How lists and maps merge comes from the CRD's `openAPIV3Schema` ([`MergeSchema`]), read from
//! the schema the validation compiled (`schema::node`): there is one schema compiler.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{Arc, LazyLock},
};

use super::patch::json_equal;
use crate::schema::{
    CrdSchema, go_quote,
    node::{Additional, Node},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};
use serde_json::{Map, Value, json};

const OP_APPLY: &str = "Apply";
const OP_UPDATE: &str = "Update";
/// kube-apiserver keeps at most this many `Update` entries, merging the oldest (`DefaultMaxUpdateManagers`).
const MAX_UPDATE_MANAGERS: usize = 10;
const ANCIENT_CHANGES: &str = "ancient-changes";
/// Metadata of an applied configuration that never reaches the object (the live values stay).
const IGNORED_APPLIED_METADATA: &[&str] =
    &["resourceVersion", "uid", "creationTimestamp", "generation", "managedFields", "selfLink"];

// ---------------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------------

/// What is known of a node with no schema: objects are granular maps (their members are map
/// items), lists are atomic.
static ANY: LazyLock<Node> = LazyLock::new(Node::default);

/// The root fields every object has, typed as kube-apiserver types them: `apiVersion`, `kind`
/// and `ObjectMeta` (labels/annotations granular maps, finalizers a set, ownerReferences a map
/// keyed by uid, managedFields atomic).
static OBJECT_ROOT: LazyLock<Node> = LazyLock::new(|| {
    let string = json!({"type": "string"});
    let string_map = json!({"type": "object", "additionalProperties": string});
    let mut meta: Map<String, Value> = [
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "deletionTimestamp",
    ]
    .iter()
    .map(|n| ((*n).to_owned(), string.clone()))
    .collect();
    for n in ["generation", "deletionGracePeriodSeconds"] {
        meta.insert(n.to_owned(), json!({"type": "integer"}));
    }
    meta.insert("labels".to_owned(), string_map.clone());
    meta.insert("annotations".to_owned(), string_map);
    meta.insert("finalizers".to_owned(), json!({"type": "array", "x-kubernetes-list-type": "set", "items": string}));
    meta.insert(
        "ownerReferences".to_owned(),
        json!({
            "type": "array",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["uid"],
            "items": {"type": "object", "properties": {
                "apiVersion": string, "kind": string, "name": string, "uid": string,
                "controller": {"type": "boolean"}, "blockOwnerDeletion": {"type": "boolean"}
            }}
        }),
    );
    meta.insert("managedFields".to_owned(), json!({"type": "array", "items": {}}));
    let root = json!({
        "type": "object",
        "properties": {"apiVersion": string, "kind": string, "metadata": {"type": "object", "properties": meta}}
    });
    Node::compile(&root).expect("the built-in root schema compiles")
});

/// A place in the schema of an object, as the field manager walks it.
#[derive(Clone, Copy)]
enum At<'a> {
    /// The object itself: [`OBJECT_ROOT`]'s fields, then those of the kind's schema (if any),
    /// never atomic.
    Root(Option<&'a Node>),
    /// A node of a schema ([`ANY`] where nothing is known).
    Node(&'a Node),
}

/// A granular (associative) list: items are identified by value or by their keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListKind<'a> {
    Set,
    Map(&'a [String]),
}

/// How structured-merge-diff reads a schema node (`schemaconv`): a scalar, an object (map) or a
/// list; anything else (no type, no properties) is "any": merged like schemaless data.
fn is_scalar(n: &Node) -> bool {
    n.int_or_string || matches!(n.ty.as_str(), "string" | "integer" | "number" | "boolean")
}

fn is_object(n: &Node) -> bool {
    let objectish = n.has_properties || matches!(n.additional, Some(Additional::Schema(_) | Additional::Bool(true)));
    !n.int_or_string && (n.ty == "object" || (n.ty.is_empty() && objectish))
}

fn is_list(n: &Node) -> bool {
    !n.int_or_string && n.ty == "array"
}

impl<'a> At<'a> {
    fn any() -> At<'a> {
        At::Node(&ANY)
    }

    /// The schema of member `k`, and whether it is a named field (not a map item).
    fn field(self, k: &str) -> (At<'a>, bool) {
        match self {
            At::Root(schema) => match OBJECT_ROOT.properties.get(k) {
                Some(n) => (At::Node(n), true),
                None => match schema {
                    Some(n) => At::Node(n).field(k),
                    None => (At::any(), false),
                },
            },
            At::Node(n) if is_object(n) => match n.properties.get(k) {
                Some(c) => (At::Node(c), true),
                // additionalProperties, or unknown members (preserved or not): any.
                None => (n.additional_schema().map_or(At::any(), At::Node), false),
            },
            At::Node(_) => (At::any(), false),
        }
    }

    fn items(self) -> At<'a> {
        match self {
            At::Node(n) if is_list(n) => n.items.as_deref().map_or(At::any(), At::Node),
            _ => At::any(),
        }
    }

    /// `x-kubernetes-list-type: set`, or `map` with `x-kubernetes-list-map-keys`; lists are
    /// atomic otherwise (as for CRDs, also without `x-kubernetes-list-type`).
    fn granular_list(self) -> Option<ListKind<'a>> {
        match self {
            At::Node(n) if is_list(n) => match n.list_type.as_deref() {
                Some("set") => Some(ListKind::Set),
                Some("map") if !n.list_map_keys.is_empty() => Some(ListKind::Map(&n.list_map_keys)),
                _ => None,
            },
            _ => None,
        }
    }

    /// `x-kubernetes-map-type: atomic` (objects are granular otherwise).
    fn is_atomic_object(self) -> bool {
        matches!(self, At::Node(n) if is_object(n) && n.map_type.as_deref() == Some("atomic"))
    }

    /// Whether a `null` here sets nothing: maps and granular lists (and unknown nodes) are
    /// containers, scalars, atomic maps and atomic lists are leaves.
    fn is_granular(self) -> bool {
        match self {
            At::Root(_) => true,
            At::Node(n) if is_scalar(n) => false,
            At::Node(n) if is_object(n) => !self.is_atomic_object(),
            At::Node(n) if is_list(n) => self.granular_list().is_some(),
            At::Node(_) => true,
        }
    }
}

/// How lists and maps merge, read from the kind's compiled `openAPIV3Schema`
/// (`x-kubernetes-list-type: atomic|set|map` with `x-kubernetes-list-map-keys`,
/// `x-kubernetes-map-type: atomic|granular`), with built-in knowledge for metadata (labels and
/// annotations granular maps, finalizers a set, ownerReferences a map keyed by uid, managedFields
/// never owned) and for kinds without a schema (`None`: lists atomic, maps granular).
///
/// As for CRDs, a list without `x-kubernetes-list-type` is atomic and an object without
/// `x-kubernetes-map-type` is granular.
#[derive(Clone, Debug, Default)]
pub struct MergeSchema {
    root: Option<Arc<Node>>,
}

impl PartialEq for MergeSchema {
    /// The same schema (the same compiled one, or none).
    fn eq(&self, other: &Self) -> bool {
        match (&self.root, &other.root) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl MergeSchema {
    /// The merge rules of a kind validated by `schema` (sharing its compiled schema), or of a
    /// kind without one (`None`).
    pub fn of(schema: Option<&CrdSchema>) -> Self {
        Self { root: schema.map(|s| Arc::clone(s.node())) }
    }

    /// Compiles the merge rules from a CRD version's `openAPIV3Schema` (or `None`).
    ///
    /// Never fails: a schema that does not compile merges like schemaless data.
    pub fn from_openapi(schema: Option<&Value>) -> Self {
        Self { root: schema.and_then(|s| Node::compile(s).ok()).map(Arc::new) }
    }

    fn root(&self) -> At<'_> {
        At::Root(self.root.as_deref())
    }
}

// ---------------------------------------------------------------------------------------------
// Field sets
// ---------------------------------------------------------------------------------------------

/// One step of a field path. Values are kept as canonical JSON text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PathElement {
    /// `f:name`, `.name`
    Field(String),
    /// `k:{"type":"Ready"}`, `[type="Ready"]` (sorted by key name)
    Key(Vec<(String, String)>),
    /// `v:"x"`, `[="x"]`
    Val(String),
    /// `i:0`, `[0]`
    Index(i64),
}

impl PathElement {
    fn serialize(&self) -> String {
        match self {
            Self::Field(n) => format!("f:{n}"),
            Self::Key(kvs) => {
                let inner: Vec<String> = kvs.iter().map(|(k, v)| format!("{}:{v}", json_string(k))).collect();
                format!("k:{{{}}}", inner.join(","))
            }
            Self::Val(v) => format!("v:{v}"),
            Self::Index(i) => format!("i:{i}"),
        }
    }

    fn deserialize(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.get(1) != Some(&b':') {
            return None;
        }
        let rest = s.get(2..)?;
        match b.first()? {
            b'f' => Some(Self::Field(rest.to_owned())),
            b'v' => serde_json::from_str::<Value>(rest).ok().map(|v| Self::Val(canonical(&v))),
            b'k' => {
                let v: Value = serde_json::from_str(rest).ok()?;
                let mut kvs: Vec<(String, String)> =
                    v.as_object()?.iter().map(|(k, v)| (k.clone(), canonical(v))).collect();
                kvs.sort();
                Some(Self::Key(kvs))
            }
            b'i' => rest.parse().ok().map(Self::Index),
            _ => None,
        }
    }

    /// The text kube-apiserver prints in conflicts (`fieldpath.PathElement.String()`).
    fn text(&self) -> String {
        match self {
            Self::Field(n) => format!(".{n}"),
            Self::Key(kvs) => {
                let inner: Vec<String> = kvs.iter().map(|(k, v)| format!("{k}={}", value_text(v))).collect();
                format!("[{}]", inner.join(","))
            }
            Self::Val(v) => format!("[={}]", value_text(v)),
            Self::Index(i) => format!("[{i}]"),
        }
    }
}

fn path_text(path: &[PathElement]) -> String {
    path.iter().map(PathElement::text).collect()
}

/// A set of field paths (`fieldpath.Set`): members are owned paths, children hold deeper ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FieldSet {
    members: BTreeSet<PathElement>,
    children: BTreeMap<PathElement, FieldSet>,
}

impl FieldSet {
    fn is_empty(&self) -> bool {
        self.members.is_empty() && self.children.values().all(FieldSet::is_empty)
    }

    fn insert(&mut self, path: &[PathElement]) {
        match path {
            [] => {}
            [pe] => {
                self.members.insert(pe.clone());
            }
            [pe, rest @ ..] => self.children.entry(pe.clone()).or_default().insert(rest),
        }
    }

    fn put_child(&mut self, pe: &PathElement, child: FieldSet) {
        if !child.is_empty() {
            self.children.insert(pe.clone(), child);
        }
    }

    fn union(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        out.members.extend(other.members.iter().cloned());
        for (pe, c) in &other.children {
            let merged = match self.children.get(pe) {
                Some(mine) => mine.union(c),
                None => c.clone(),
            };
            out.put_child(pe, merged);
        }
        out
    }

    fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out =
            FieldSet { members: self.members.difference(&other.members).cloned().collect(), ..Default::default() };
        for (pe, c) in &self.children {
            match other.children.get(pe) {
                Some(oc) => out.put_child(pe, c.difference(oc)),
                None => out.put_child(pe, c.clone()),
            }
        }
        out
    }

    fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out =
            FieldSet { members: self.members.intersection(&other.members).cloned().collect(), ..Default::default() };
        for (pe, c) in &self.children {
            if let Some(oc) = other.children.get(pe) {
                out.put_child(pe, c.intersection(oc));
            }
        }
        out
    }

    /// Only the part of the set at or below the top-level field `name`.
    fn only_field(&self, name: &str) -> FieldSet {
        let pe = PathElement::Field(name.to_owned());
        let mut out = FieldSet::default();
        if self.members.contains(&pe) {
            out.members.insert(pe.clone());
        }
        if let Some(c) = self.children.get(&pe) {
            out.put_child(&pe, c.clone());
        }
        out
    }

    /// Every path, members before deeper paths at each level (`fieldpath.Set.Iterate`).
    fn paths(&self) -> Vec<Vec<PathElement>> {
        let mut out = Vec::new();
        self.collect_paths(&mut Vec::new(), &mut out);
        out
    }

    fn collect_paths(&self, prefix: &mut Vec<PathElement>, out: &mut Vec<Vec<PathElement>>) {
        for m in &self.members {
            let mut p = prefix.clone();
            p.push(m.clone());
            out.push(p);
        }
        for (pe, c) in &self.children {
            prefix.push(pe.clone());
            c.collect_paths(prefix, out);
            prefix.pop();
        }
    }

    /// The `FieldsV1` JSON form.
    fn to_json(&self) -> Value {
        Value::Object(self.emit())
    }

    fn emit(&self) -> Map<String, Value> {
        let mut out = Map::new();
        let keys: BTreeSet<&PathElement> = self.members.iter().chain(self.children.keys()).collect();
        for pe in keys {
            let member = self.members.contains(pe);
            let mut obj = Map::new();
            match self.children.get(pe).filter(|c| !c.is_empty()) {
                Some(child) => {
                    if member {
                        obj.insert(".".to_owned(), Value::Object(Map::new()));
                    }
                    obj.extend(child.emit());
                }
                None if !member => continue,
                None => {}
            }
            out.insert(pe.serialize(), Value::Object(obj));
        }
        out
    }

    /// Reads the `FieldsV1` JSON form; unknown or malformed keys are dropped.
    fn from_json(v: &Value) -> FieldSet {
        Self::read(v).0.unwrap_or_default()
    }

    fn read(v: &Value) -> (Option<FieldSet>, bool) {
        let Some(m) = v.as_object() else {
            return (None, true);
        };
        let mut children: Option<FieldSet> = None;
        let mut member = false;
        for (k, cv) in m {
            if k == "." {
                member = true;
                continue;
            }
            let Some(pe) = PathElement::deserialize(k) else {
                continue;
            };
            let (grandchildren, child_member) = Self::read(cv);
            if child_member {
                children.get_or_insert_with(FieldSet::default).members.insert(pe.clone());
            }
            if let Some(gc) = grandchildren {
                children.get_or_insert_with(FieldSet::default).put_child(&pe, gc);
            }
        }
        if children.is_none() {
            member = true;
        }
        (children, member)
    }
}

fn field(name: &str) -> PathElement {
    PathElement::Field(name.to_owned())
}

/// Fields never recorded as owned (`stripMetaManager`).
fn strip_set() -> FieldSet {
    let mut s = FieldSet::default();
    for top in ["apiVersion", "kind", "metadata"] {
        s.insert(&[field(top)]);
    }
    for name in [
        "name",
        "namespace",
        "creationTimestamp",
        "selfLink",
        "uid",
        "clusterName",
        "generation",
        "managedFields",
        "resourceVersion",
    ] {
        s.insert(&[field("metadata"), field(name)]);
    }
    s
}

/// What a real applied configuration always carries (its identity), so pruning never removes it.
fn identity_set() -> FieldSet {
    let mut s = FieldSet::default();
    s.insert(&[field("apiVersion")]);
    s.insert(&[field("kind")]);
    s.insert(&[field("metadata"), field("name")]);
    s.insert(&[field("metadata"), field("namespace")]);
    s
}

// ---------------------------------------------------------------------------------------------
// Typed walks over JSON values
// ---------------------------------------------------------------------------------------------

enum Shape<'a> {
    Map(&'a Map<String, Value>),
    List(&'a [Value], ListKind<'a>),
    Leaf,
}

fn shape<'a>(node: At<'a>, v: &'a Value) -> Shape<'a> {
    match v {
        Value::Object(m) if !node.is_atomic_object() => Shape::Map(m),
        Value::Array(items) => match node.granular_list() {
            Some(kind) => Shape::List(items, kind),
            None => Shape::Leaf,
        },
        _ => Shape::Leaf,
    }
}

fn item_pe(kind: ListKind<'_>, item: &Value) -> PathElement {
    match (kind, item) {
        (ListKind::Map(keys), Value::Object(m)) => {
            let mut kvs: Vec<(String, String)> =
                keys.iter().map(|k| (k.clone(), canonical(m.get(k).unwrap_or(&Value::Null)))).collect();
            kvs.sort();
            kvs.dedup_by(|a, b| a.0 == b.0);
            PathElement::Key(kvs)
        }
        _ => PathElement::Val(canonical(item)),
    }
}

/// The set of fields a value sets (`TypedValue.ToFieldSet`): leaves, list items and map items.
fn to_field_set(node: At<'_>, v: &Value) -> FieldSet {
    let mut out = FieldSet::default();
    walk_field_set(node, v, &mut Vec::new(), &mut out);
    out
}

fn walk_field_set(node: At<'_>, v: &Value, path: &mut Vec<PathElement>, out: &mut FieldSet) {
    match shape(node, v) {
        Shape::Map(m) => {
            for (k, cv) in m {
                let (child, named) = node.field(k);
                path.push(PathElement::Field(k.clone()));
                walk_field_set(child, cv, path, out);
                if !named {
                    out.insert(path);
                }
                path.pop();
            }
        }
        Shape::List(items, kind) => {
            for item in items {
                path.push(item_pe(kind, item));
                walk_field_set(node.items(), item, path, out);
                out.insert(path);
                path.pop();
            }
        }
        Shape::Leaf => {
            if !(v.is_null() && node.is_granular()) {
                out.insert(path);
            }
        }
    }
}

/// Merges the applied configuration `rhs` into `lhs`; `None` when the result is absent.
fn merge(node: At<'_>, lhs: &Value, rhs: &Value) -> Option<Value> {
    if rhs.is_null() {
        return match shape(node, lhs) {
            Shape::Map(_) | Shape::List(..) => Some(lhs.clone()),
            Shape::Leaf => None,
        };
    }
    match (shape(node, lhs), shape(node, rhs)) {
        (Shape::Map(l), Shape::Map(r)) => {
            let mut out = l.clone();
            for (k, rv) in r {
                let (child, _) = node.field(k);
                let merged = match out.get(k) {
                    Some(lv) => merge(child, lv, rv),
                    None => fresh(child, rv),
                };
                match merged {
                    Some(v) => {
                        out.insert(k.clone(), v);
                    }
                    None => {
                        out.remove(k);
                    }
                }
            }
            Some(Value::Object(out))
        }
        (Shape::List(l, kind), Shape::List(r, _)) => Some(Value::Array(merge_lists(node.items(), kind, l, r))),
        _ => fresh(node, rhs),
    }
}

/// An applied value where live has none: `null` members dropped.
fn fresh(node: At<'_>, rhs: &Value) -> Option<Value> {
    match rhs {
        Value::Null => None,
        Value::Object(m) => Some(Value::Object(
            m.iter().filter_map(|(k, v)| fresh(node.field(k).0, v).map(|v| (k.clone(), v))).collect(),
        )),
        other => Some(other.clone()),
    }
}

fn merge_item(node: At<'_>, lhs: Option<&Value>, rhs: &Value) -> Option<Value> {
    match lhs {
        Some(l) => merge(node, l, rhs),
        None => fresh(node, rhs),
    }
}

/// Merges associative lists the way structured-merge-diff orders them: items only in `l` keep
/// their place, items of `r` come in `r`'s order.
fn merge_lists(items_node: At<'_>, kind: ListKind<'_>, l: &[Value], r: &[Value]) -> Vec<Value> {
    let lpes: Vec<PathElement> = l.iter().map(|v| item_pe(kind, v)).collect();
    let mut observed_l: BTreeMap<&PathElement, usize> = BTreeMap::new();
    for (i, pe) in lpes.iter().enumerate() {
        observed_l.entry(pe).or_insert(i);
    }
    let mut rpes: Vec<PathElement> = Vec::new();
    let mut ritems: Vec<&Value> = Vec::new();
    let mut observed_r: BTreeSet<PathElement> = BTreeSet::new();
    for v in r {
        let pe = item_pe(kind, v);
        if observed_r.insert(pe.clone()) {
            rpes.push(pe);
            ritems.push(v);
        }
    }
    let mut shared: VecDeque<&PathElement> = rpes.iter().filter(|pe| observed_l.contains_key(pe)).collect();
    let mut next_shared = shared.pop_front();
    let mut merged_r: BTreeSet<&PathElement> = BTreeSet::new();
    let mut out = Vec::with_capacity(l.len().max(rpes.len()));
    let (mut li, mut ri) = (0, 0);
    let mut budget = 2 * (l.len() + rpes.len()) + 2;
    while li < l.len() || ri < rpes.len() {
        if budget == 0 {
            break;
        }
        budget -= 1;
        if let (Some(lpe), Some(rpe), Some(rv)) = (lpes.get(li), rpes.get(ri), ritems.get(ri)) {
            if lpe == rpe {
                merged_r.insert(rpe);
                let lv = observed_l.get(lpe).and_then(|&i| l.get(i));
                out.extend(merge_item(items_node, lv, rv));
                li += 1;
                ri += 1;
                next_shared = shared.pop_front();
                continue;
            }
            if observed_r.contains(lpe) && next_shared.is_some_and(|n| n != lpe) {
                li += 1;
                continue;
            }
        }
        if let (Some(lpe), Some(lv)) = (lpes.get(li), l.get(li)) {
            if !observed_r.contains(lpe) {
                out.push(lv.clone());
                li += 1;
                continue;
            }
            if merged_r.contains(lpe) {
                li += 1;
                continue;
            }
        }
        if let (Some(rpe), Some(rv)) = (rpes.get(ri), ritems.get(ri)) {
            merged_r.insert(rpe);
            let lv = observed_l.get(rpe).and_then(|&i| l.get(i));
            out.extend(merge_item(items_node, lv, rv));
            ri += 1;
            if next_shared.is_some_and(|n| n == rpe) {
                next_shared = shared.pop_front();
            }
        }
    }
    out
}

/// `typed.Comparison`: what changed between two values.
#[derive(Debug, Default)]
struct Comparison {
    added: FieldSet,
    modified: FieldSet,
    removed: FieldSet,
}

fn compare(node: At<'_>, old: &Value, new: &Value) -> Comparison {
    let mut c = Comparison::default();
    walk_compare(node, Some(old), Some(new), &mut Vec::new(), &mut c);
    c
}

fn walk_compare(
    node: At<'_>,
    old: Option<&Value>,
    new: Option<&Value>,
    path: &mut Vec<PathElement>,
    c: &mut Comparison,
) {
    match (old, new) {
        (None, None) => {}
        (Some(o), None) => mark(node, o, path, &mut c.removed),
        (None, Some(n)) => mark(node, n, path, &mut c.added),
        (Some(o), Some(n)) => match (shape(node, o), shape(node, n)) {
            (Shape::Map(om), Shape::Map(nm)) => {
                let keys: BTreeSet<&String> = om.keys().chain(nm.keys()).collect();
                for k in keys {
                    let (child, _) = node.field(k);
                    path.push(PathElement::Field(k.clone()));
                    walk_compare(child, om.get(k), nm.get(k), path, c);
                    path.pop();
                }
            }
            (Shape::List(ol, kind), Shape::List(nl, _)) => {
                let oi = index_items(kind, ol);
                let ni = index_items(kind, nl);
                let pes: BTreeSet<&PathElement> = oi.keys().chain(ni.keys()).collect();
                for pe in pes {
                    path.push(pe.clone());
                    walk_compare(node.items(), oi.get(pe).copied(), ni.get(pe).copied(), path, c);
                    path.pop();
                }
            }
            (Shape::Leaf, Shape::Leaf) => {
                if !json_equal(o, n) {
                    c.modified.insert(path);
                }
            }
            _ => {
                c.modified.insert(path);
                mark_children(node, o, path, &mut c.removed);
                mark_children(node, n, path, &mut c.added);
            }
        },
    }
}

fn index_items<'a>(kind: ListKind<'_>, items: &'a [Value]) -> BTreeMap<PathElement, &'a Value> {
    let mut out = BTreeMap::new();
    for item in items {
        out.entry(item_pe(kind, item)).or_insert(item);
    }
    out
}

fn mark(node: At<'_>, v: &Value, path: &mut Vec<PathElement>, set: &mut FieldSet) {
    set.insert(path);
    mark_children(node, v, path, set);
}

fn mark_children(node: At<'_>, v: &Value, path: &mut Vec<PathElement>, set: &mut FieldSet) {
    match shape(node, v) {
        Shape::Map(m) => {
            for (k, cv) in m {
                path.push(PathElement::Field(k.clone()));
                mark(node.field(k).0, cv, path, set);
                path.pop();
            }
        }
        Shape::List(items, kind) => {
            for item in items {
                path.push(item_pe(kind, item));
                mark(node.items(), item, path, set);
                path.pop();
            }
        }
        Shape::Leaf => {}
    }
}

/// Removes every member of `set` from `v` (`TypedValue.RemoveItems`); containers left empty
/// disappear.
fn remove_items(node: At<'_>, v: &Value, set: &FieldSet) -> Option<Value> {
    match shape(node, v) {
        Shape::Map(m) => {
            let mut out = Map::new();
            for (k, cv) in m {
                let pe = PathElement::Field(k.clone());
                if set.members.contains(&pe) {
                    continue;
                }
                match set.children.get(&pe) {
                    Some(sub) => {
                        if let Some(kept) = remove_items(node.field(k).0, cv, sub) {
                            out.insert(k.clone(), kept);
                        }
                    }
                    None => {
                        out.insert(k.clone(), cv.clone());
                    }
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        Shape::List(items, kind) => {
            let mut out = Vec::new();
            for item in items {
                let pe = item_pe(kind, item);
                if set.members.contains(&pe) {
                    continue;
                }
                match set.children.get(&pe) {
                    Some(sub) => out.extend(remove_items(node.items(), item, sub)),
                    None => out.push(item.clone()),
                }
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
        Shape::Leaf => Some(v.clone()),
    }
}

fn remove_from_object(node: At<'_>, v: &Value, set: &FieldSet) -> Value {
    remove_items(node, v, set).unwrap_or_else(|| Value::Object(Map::new()))
}

/// `Set.EnsureNamedFieldsAreMembers`: named (struct) fields on the way to a path become members.
fn with_named_fields(node: At<'_>, set: &FieldSet) -> FieldSet {
    let mut out = FieldSet { members: set.members.clone(), children: BTreeMap::new() };
    for (pe, c) in &set.children {
        let child = match pe {
            PathElement::Field(k) => {
                let (n, named) = node.field(k);
                if named {
                    out.members.insert(pe.clone());
                }
                n
            }
            _ => node.items(),
        };
        out.put_child(pe, with_named_fields(child, c));
    }
    out
}

/// `Updater.prune`: removes what the applier owned last time and no longer applies, unless some
/// manager (the applier's new configuration included) still owns it.
fn prune(root: At<'_>, merged: Value, managers: &Managers, last: Option<&FieldSet>) -> Value {
    let Some(last) = last.filter(|s| !s.is_empty()) else {
        return merged;
    };
    let last = with_named_fields(root, last);
    let pruned = remove_from_object(root, &merged, &last);
    let managed = managers.values().fold(FieldSet::default(), |acc, e| acc.union(&e.set));
    let merged_set = with_named_fields(root, &to_field_set(root, &merged));
    let pruned_set = with_named_fields(root, &to_field_set(root, &pruned));
    let managed = with_named_fields(root, &managed);
    let pruned = remove_from_object(root, &merged, &merged_set.difference(&pruned_set.union(&managed)));
    let pruned_set = with_named_fields(root, &to_field_set(root, &pruned));
    remove_from_object(root, &merged, &merged_set.difference(&pruned_set).intersection(&last))
}

// ---------------------------------------------------------------------------------------------
// Managers
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    subresource: String,
    time: Option<Time>,
    set: FieldSet,
}

impl Entry {
    fn id(&self) -> String {
        identifier(&self.manager, &self.operation, &self.api_version, &self.subresource)
    }

    fn seconds(&self) -> i64 {
        self.time.as_ref().map_or(0, |t| t.0.as_second())
    }
}

/// Entries by manager identifier.
type Managers = BTreeMap<String, Entry>;

/// The manager identifier kube-apiserver builds (`BuildManagerIdentifier`): the entry without
/// fields and time, and without apiVersion for appliers.
fn identifier(manager: &str, operation: &str, api_version: &str, subresource: &str) -> String {
    let mut s = format!("{{\"manager\":{},\"operation\":{}", json_string(manager), json_string(operation));
    if operation != OP_APPLY && !api_version.is_empty() {
        s.push_str(&format!(",\"apiVersion\":{}", json_string(api_version)));
    }
    if !subresource.is_empty() {
        s.push_str(&format!(",\"subresource\":{}", json_string(subresource)));
    }
    s.push('}');
    s
}

fn decode_entry(v: &Value) -> Option<Entry> {
    let m = v.as_object()?;
    let operation = m.get("operation")?.as_str()?;
    if operation != OP_APPLY && operation != OP_UPDATE {
        return None;
    }
    if m.get("fieldsType")?.as_str()? != "FieldsV1" {
        return None;
    }
    let text = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    Some(Entry {
        manager: text("manager"),
        operation: operation.to_owned(),
        api_version: text("apiVersion"),
        subresource: text("subresource"),
        time: m.get("time").and_then(|t| serde_json::from_value::<Time>(t.clone()).ok()),
        set: m.get("fieldsV1").map(FieldSet::from_json).unwrap_or_default(),
    })
}

/// Decodes `metadata.managedFields`; with `strict`, `None` when an entry is invalid (as
/// `DecodeManagedFields` fails), otherwise invalid entries are dropped.
fn decode_managers(list: Option<&Value>, strict: bool) -> Option<Managers> {
    let mut out = Managers::new();
    let items = match list {
        None | Some(Value::Null) => return Some(out),
        Some(Value::Array(items)) => items,
        Some(_) => return if strict { None } else { Some(out) },
    };
    for item in items {
        match decode_entry(item) {
            Some(e) => {
                out.insert(e.id(), e);
            }
            None if strict => return None,
            None => {}
        }
    }
    Some(out)
}

fn encode_managers(managers: &Managers) -> Vec<Value> {
    let mut entries: Vec<&Entry> = managers.values().filter(|e| !e.set.is_empty()).collect();
    entries.sort_by(|a, b| {
        a.operation
            .cmp(&b.operation)
            .then(a.seconds().cmp(&b.seconds()))
            .then(a.manager.cmp(&b.manager))
            .then(a.api_version.cmp(&b.api_version))
            .then(a.subresource.cmp(&b.subresource))
    });
    entries
        .into_iter()
        .map(|e| {
            let mut m = Map::new();
            m.insert("manager".to_owned(), Value::String(e.manager.clone()));
            m.insert("operation".to_owned(), Value::String(e.operation.clone()));
            m.insert("apiVersion".to_owned(), Value::String(e.api_version.clone()));
            if let Some(t) = e.time.as_ref().and_then(|t| serde_json::to_value(t).ok()) {
                m.insert("time".to_owned(), t);
            }
            m.insert("fieldsType".to_owned(), Value::String("FieldsV1".to_owned()));
            m.insert("fieldsV1".to_owned(), e.set.to_json());
            if !e.subresource.is_empty() {
                m.insert("subresource".to_owned(), Value::String(e.subresource.clone()));
            }
            Value::Object(m)
        })
        .collect()
}

fn take_managed_fields(obj: &mut Map<String, Value>) -> Option<Value> {
    obj.get_mut("metadata").and_then(Value::as_object_mut).and_then(|m| m.remove("managedFields"))
}

fn set_managed_fields(obj: &mut Map<String, Value>, entries: Vec<Value>) {
    if entries.is_empty() {
        if let Some(md) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            md.remove("managedFields");
        }
        return;
    }
    let md = obj.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    if !md.is_object() {
        *md = Value::Object(Map::new());
    }
    if let Some(md) = md.as_object_mut() {
        md.insert("managedFields".to_owned(), Value::Array(entries));
    }
}

/// `capManagersManager`: at most [`MAX_UPDATE_MANAGERS`] `Update` entries; the oldest are merged
/// into `ancient-changes` entries, one per apiVersion.
fn cap_update_managers(managers: &mut Managers) {
    let mut updaters: Vec<(i64, String)> =
        managers.iter().filter(|(_, e)| e.operation == OP_UPDATE).map(|(k, e)| (e.seconds(), k.clone())).collect();
    if updaters.len() <= MAX_UPDATE_MANAGERS {
        return;
    }
    updaters.sort();
    let mut length = updaters.len();
    let mut first_for_version: BTreeMap<String, String> = BTreeMap::new();
    for (_, key) in updaters {
        if length <= MAX_UPDATE_MANAGERS {
            break;
        }
        let Some(entry) = managers.get(&key).cloned() else {
            continue;
        };
        let version = entry.api_version.clone();
        let bucket = identifier(ANCIENT_CHANGES, OP_UPDATE, &version, "");
        if key == bucket {
            first_for_version.entry(version).or_insert(key);
            continue;
        }
        let Some(first) = first_for_version.get(&version).cloned() else {
            first_for_version.insert(version, key);
            continue;
        };
        if !managers.contains_key(&bucket)
            && let Some(mut moved) = managers.remove(&first)
        {
            moved.manager = ANCIENT_CHANGES.to_owned();
            moved.operation = OP_UPDATE.to_owned();
            moved.subresource = String::new();
            moved.api_version = version.clone();
            managers.insert(bucket.clone(), moved);
        }
        if let Some(b) = managers.get_mut(&bucket) {
            b.set = entry.set.union(&b.set);
            b.time = entry.time.clone();
        }
        managers.remove(&key);
        length -= 1;
    }
}

fn strip(set: &FieldSet) -> FieldSet {
    set.difference(&strip_set())
}

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// A field whose value an apply would change while another manager owns it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyConflict {
    /// The name of the manager owning the field (e.g. `kubectl`).
    pub manager: String,
    /// The field in kube-apiserver's text form, e.g. `.spec.region` or
    /// `.status.conditions[type="Ready"].status`.
    pub field: String,
    /// The owner's operation: `Apply` or `Update`.
    pub operation: String,
    /// The apiVersion of the owner's entry.
    pub api_version: String,
    /// The owner's subresource (`""` or `status`).
    pub subresource: String,
}

impl ApplyConflict {
    /// The owner as kube-apiserver describes it: `"kubectl"`, `"kubectl" using example.com/v1`
    /// for updaters, `"ctl" with subresource "status"` for subresource entries.
    pub fn manager_description(&self) -> String {
        let mut out = go_quote(&self.manager);
        if !self.subresource.is_empty() {
            out.push_str(&format!(" with subresource {}", go_quote(&self.subresource)));
        }
        if self.operation == OP_UPDATE {
            out.push_str(&format!(" using {}", self.api_version));
        }
        out
    }

    /// The `message` of this conflict's `StatusCause`: `conflict with "kubectl"`.
    pub fn cause_message(&self) -> String {
        format!("conflict with {}", self.manager_description())
    }

    fn identifier(&self) -> String {
        identifier(&self.manager, &self.operation, &self.api_version, &self.subresource)
    }
}

/// The 409 Conflict message kube-apiserver writes, e.g.
/// `Apply failed with 1 conflict: conflict with "kubectl" using example.com/v1: .spec.region`;
/// several conflicts are grouped by owner (`Apply failed with 2 conflicts: conflicts with "a":\n- .spec.x\n...`).
pub fn conflict_message(conflicts: &[ApplyConflict]) -> String {
    if let [one] = conflicts {
        return format!("Apply failed with 1 conflict: conflict with {}: {}", one.manager_description(), one.field);
    }
    let mut groups: BTreeMap<String, (String, Vec<&str>)> = BTreeMap::new();
    for c in conflicts {
        groups.entry(c.identifier()).or_insert_with(|| (c.manager_description(), Vec::new())).1.push(&c.field);
    }
    let mut messages = Vec::new();
    for (description, fields) in groups.into_values() {
        messages.push(format!("conflicts with {description}:"));
        messages.extend(fields.into_iter().map(|f| format!("- {f}")));
    }
    format!("Apply failed with {} conflicts: {}", conflicts.len(), messages.join("\n"))
}

/// The whole `v1.Status` body of kube-apiserver's 409 answer to a conflicting apply (reason
/// `Conflict`, one `FieldManagerConflict` cause per field).
pub fn conflict_status(conflicts: &[ApplyConflict]) -> Value {
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| json!({"reason": "FieldManagerConflict", "message": c.cause_message(), "field": c.field}))
        .collect();
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": conflict_message(conflicts),
        "reason": "Conflict",
        "details": {"causes": causes},
        "code": 409,
    })
}

/// The `metadata.managedFields` entries of an object (entries that do not parse are skipped).
pub fn managed_fields_of(obj: &Value) -> Vec<ManagedFieldsEntry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(|i| serde_json::from_value(i.clone()).ok()).collect())
        .unwrap_or_default()
}

/// Server-side apply of `applied` (the partial object the manager sent) by `manager` onto `live`
/// (`None` = create).
///
/// Returns the new object (with `metadata.managedFields` updated) or, when `!force` and another
/// manager owns a field the applied configuration sets to a different value, every conflict.
///
/// - Fields set by `applied` become owned by `manager`; with `force` they are taken away from the
///   other managers. Setting a field to the value it already has is no conflict: ownership is
///   shared.
/// - Fields the manager applied before and no longer applies are removed from the object unless
///   another manager still owns them.
/// - Maps merge per key, list-maps per key, sets per value; atomic lists, atomic maps and scalars
///   are replaced. A `null` in `applied` removes the field.
/// - `metadata.resourceVersion`, `uid`, `creationTimestamp`, `generation`, `selfLink` and
///   `managedFields` of `applied` are ignored (the live values stay); `apiVersion`, `kind`,
///   `metadata.name` and `metadata.namespace` are never owned.
/// - `subresource == Some("status")`: only `.status` of `applied` is applied (entry with
///   subresource `status`); for the main resource, `.status` of `applied` is ignored when
///   `has_status_subresource`.
/// - The entry's time becomes `now` when the object changed (as kube-apiserver, a no-op apply
///   keeps the previous time).
#[allow(clippy::too_many_arguments)]
pub fn apply(
    schema: &MergeSchema,
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    subresource: Option<&str>,
    has_status_subresource: bool,
    force: bool,
    now: &Time,
) -> Result<Value, Vec<ApplyConflict>> {
    let root = schema.root();
    let manager = if manager.is_empty() { "unknown" } else { manager };
    let subresource = subresource.unwrap_or_default();

    let mut live_obj = live.and_then(Value::as_object).cloned().unwrap_or_default();
    let live_managed = take_managed_fields(&mut live_obj);
    let mut managers = decode_managers(live_managed.as_ref(), false).unwrap_or_default();
    let live = Value::Object(live_obj);

    let mut config = applied.as_object().cloned().unwrap_or_default();
    if let Some(md) = config.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in IGNORED_APPLIED_METADATA {
            md.remove(*k);
        }
    }
    if subresource == "status" {
        config.retain(|k, _| k == "status");
    } else if has_status_subresource {
        config.remove("status");
    }
    let api_version = [applied, &live]
        .iter()
        .find_map(|o| o.get("apiVersion").and_then(Value::as_str).filter(|s| !s.is_empty()))
        .unwrap_or_default()
        .to_owned();
    let config = Value::Object(config);

    let merged = merge(root, &live, &config).unwrap_or_else(|| live.clone());
    let id = identifier(manager, OP_APPLY, &api_version, subresource);
    let previous = managers.get(&id).cloned();
    let config_set = to_field_set(root, &config);
    managers.insert(
        id.clone(),
        Entry {
            manager: manager.to_owned(),
            operation: OP_APPLY.to_owned(),
            api_version,
            subresource: subresource.to_owned(),
            time: previous.as_ref().and_then(|p| p.time.clone()),
            set: config_set.union(&identity_set()),
        },
    );
    let new_obj = prune(root, merged, &managers, previous.as_ref().map(|p| &p.set));

    let cmp = compare(root, &live, &new_obj);
    let changed = cmp.modified.union(&cmp.added);
    let conflicts: Vec<(String, FieldSet)> = managers
        .iter()
        .filter(|(k, _)| **k != id)
        .map(|(k, e)| (k.clone(), e.set.intersection(&changed)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    if !force && !conflicts.is_empty() {
        let mut out = Vec::new();
        for (k, set) in &conflicts {
            let Some(owner) = managers.get(k) else {
                continue;
            };
            out.extend(set.paths().iter().map(|p| ApplyConflict {
                manager: owner.manager.clone(),
                field: path_text(p),
                operation: owner.operation.clone(),
                api_version: owner.api_version.clone(),
                subresource: owner.subresource.clone(),
            }));
        }
        return Err(out);
    }
    for (k, set) in &conflicts {
        if let Some(e) = managers.get_mut(k) {
            e.set = e.set.difference(set);
        }
    }
    for (k, e) in managers.iter_mut() {
        if *k != id {
            e.set = e.set.difference(&cmp.removed);
        }
    }
    if let Some(e) = managers.get_mut(&id) {
        e.set = strip(&config_set);
        if !json_equal(&new_obj, &live) {
            e.time = Some(now.clone());
        }
    }
    managers.retain(|_, e| !e.set.is_empty());

    let mut out = match new_obj {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    set_managed_fields(&mut out, encode_managers(&managers));
    Ok(Value::Object(out))
}

/// After a non-apply write (create/update/patch), records that `manager` (operation `Update`)
/// owns every field it changed between `old` (`None` = create: every field set) and `new`, taking
/// them from other managers (as the real server does). Returns `new` with managedFields updated.
///
/// As kube-apiserver: the entry is keyed by manager, apiVersion and subresource, and its time
/// becomes `now` only when the write changed something; fields removed by the write leave every
/// entry; the managedFields of `new` are kept as the starting point when the client sent valid
/// ones (`[{}]` resets them), otherwise those of `old` are used (always for subresources); at most
/// 10 `Update` entries are kept, the oldest merged into `ancient-changes`. With
/// `subresource == Some("status")` only changes under `.status` are recorded.
pub fn record_update(
    schema: &MergeSchema,
    old: Option<&Value>,
    new: &Value,
    manager: &str,
    subresource: Option<&str>,
    now: &Time,
) -> Value {
    let root = schema.root();
    let Some(new_map) = new.as_object() else {
        return new.clone();
    };
    let manager = if manager.is_empty() { "unknown" } else { manager };
    let subresource = subresource.unwrap_or_default();

    let mut new_obj = new_map.clone();
    let new_managed = take_managed_fields(&mut new_obj);
    let mut old_obj = match old.and_then(Value::as_object) {
        Some(o) => o.clone(),
        None => new_map
            .iter()
            .filter(|(k, _)| *k == "apiVersion" || *k == "kind")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let old_managed = take_managed_fields(&mut old_obj);
    let reset = matches!(&new_managed, Some(Value::Array(items)) if matches!(items.as_slice(), [Value::Object(e)] if e.is_empty()));
    let mut managers = if !subresource.is_empty() {
        decode_managers(old_managed.as_ref(), false)
    } else if reset {
        Some(Managers::new())
    } else {
        match decode_managers(new_managed.as_ref(), true) {
            Some(m) if !m.is_empty() => Some(m),
            _ => decode_managers(old_managed.as_ref(), false),
        }
    }
    .unwrap_or_default();
    let old = Value::Object(old_obj);
    let new = Value::Object(new_obj);

    let mut cmp = compare(root, &old, &new);
    if subresource == "status" {
        cmp.added = cmp.added.only_field("status");
        cmp.modified = cmp.modified.only_field("status");
        cmp.removed = cmp.removed.only_field("status");
    }
    let changed = cmp.modified.union(&cmp.added);
    for e in managers.values_mut() {
        e.set = e.set.difference(&changed).difference(&cmp.removed);
    }
    managers.retain(|_, e| !e.set.is_empty());

    let own = strip(&changed.difference(&cmp.removed));
    if !own.is_empty() {
        let api_version = [&new, &old]
            .iter()
            .find_map(|o| o.get("apiVersion").and_then(Value::as_str).filter(|s| !s.is_empty()))
            .unwrap_or_default()
            .to_owned();
        let id = identifier(manager, OP_UPDATE, &api_version, subresource);
        let previous = managers.get(&id).map(|e| e.set.clone()).unwrap_or_default();
        managers.insert(
            id,
            Entry {
                manager: manager.to_owned(),
                operation: OP_UPDATE.to_owned(),
                api_version,
                subresource: subresource.to_owned(),
                time: Some(now.clone()),
                set: own.union(&previous),
            },
        );
    }
    cap_update_managers(&mut managers);

    let mut out = match new {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    set_managed_fields(&mut out, encode_managers(&managers));
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// JSON text with object members sorted, so equal values have equal text.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", json_string(k), m.get(k).map(canonical).unwrap_or_default()))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// structured-merge-diff's `value.ToString` of a canonical JSON text.
fn value_text(canonical_json: &str) -> String {
    match serde_json::from_str::<Value>(canonical_json) {
        Ok(v) => go_value_text(&v),
        Err(_) => canonical_json.to_owned(),
    }
}

fn go_value_text(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => go_quote(s),
        Value::Array(items) => format!("[{}]", items.iter().map(go_value_text).collect::<Vec<_>>().join(",")),
        Value::Object(m) => m.iter().map(|(k, v)| format!("{k}={}", go_value_text(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    const API: &str = "ims.io/v1alpha1";

    fn at(second: i64) -> Time {
        match Timestamp::from_second(second) {
            Ok(t) => Time(t),
            Err(e) => panic!("bad test time: {e}"),
        }
    }

    fn t1() -> Time {
        at(1_700_000_000)
    }

    fn image_schema() -> MergeSchema {
        MergeSchema::from_openapi(Some(&json!({
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "properties": {
                        "region": {"type": "string"},
                        "size": {"type": "integer"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "tenants": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                        "source": {
                            "type": "object",
                            "x-kubernetes-map-type": "atomic",
                            "properties": {"url": {"type": "string"}, "checksum": {"type": "string"}}
                        },
                        "params": {"type": "object", "additionalProperties": {"type": "string"}},
                        "replicas": {
                            "type": "array",
                            "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["region", "zone"],
                            "items": {"type": "object", "properties": {
                                "region": {"type": "string"}, "zone": {"type": "string"}, "count": {"type": "integer"}
                            }}
                        }
                    }
                },
                "status": {
                    "type": "object",
                    "properties": {
                        "phase": {"type": "string"},
                        "conditions": {
                            "type": "array",
                            "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["type"],
                            "items": {"type": "object", "properties": {
                                "type": {"type": "string"}, "status": {"type": "string"},
                                "reason": {"type": "string"}, "message": {"type": "string"}
                            }}
                        }
                    }
                }
            }
        })))
    }

    fn image(spec: Value) -> Value {
        json!({"apiVersion": API, "kind": "Image", "metadata": {"name": "img", "namespace": "tenant-a"}, "spec": spec})
    }

    fn with(mut obj: Value, key: &str, value: Value) -> Value {
        if let Some(m) = obj.as_object_mut() {
            m.insert(key.to_owned(), value);
        }
        obj
    }

    fn ok(r: Result<Value, Vec<ApplyConflict>>) -> Value {
        match r {
            Ok(v) => v,
            Err(c) => panic!("unexpected conflicts: {}", conflict_message(&c)),
        }
    }

    fn conflicts(r: Result<Value, Vec<ApplyConflict>>) -> Vec<ApplyConflict> {
        match r {
            Ok(v) => panic!("expected conflicts, got {v}"),
            Err(c) => c,
        }
    }

    fn ssa(live: Option<&Value>, applied: &Value, manager: &str) -> Result<Value, Vec<ApplyConflict>> {
        apply(&image_schema(), live, applied, manager, None, true, false, &t1())
    }

    /// `(manager, operation, subresource) -> fieldsV1`
    fn owners(obj: &Value) -> BTreeMap<(String, String, String), Value> {
        managed_fields_of(obj)
            .into_iter()
            .map(|e| {
                (
                    (e.manager.unwrap_or_default(), e.operation.unwrap_or_default(), e.subresource.unwrap_or_default()),
                    e.fields_v1.map(|f| f.0).unwrap_or(Value::Null),
                )
            })
            .collect()
    }

    fn owned(obj: &Value, manager: &str, operation: &str) -> Value {
        owners(obj).get(&(manager.to_owned(), operation.to_owned(), String::new())).cloned().unwrap_or(Value::Null)
    }

    fn without_managed(obj: &Value) -> Value {
        let mut obj = obj.clone();
        if let Some(md) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            md.remove("managedFields");
        }
        obj
    }

    #[test]
    fn create_by_apply_records_the_applied_fields() {
        let applied = json!({
            "apiVersion": API, "kind": "Image",
            "metadata": {"name": "img", "namespace": "tenant-a", "labels": {"app": "web"}},
            "spec": {"region": "eu", "tenants": ["tenant-a"]}
        });
        let obj = ok(ssa(None, &applied, "kubectl"));
        assert_eq!(without_managed(&obj), applied);
        let entries = managed_fields_of(&obj);
        assert_eq!(entries.len(), 1);
        let e = &entries[0];
        assert_eq!(e.manager.as_deref(), Some("kubectl"));
        assert_eq!(e.operation.as_deref(), Some("Apply"));
        assert_eq!(e.api_version.as_deref(), Some(API));
        assert_eq!(e.fields_type.as_deref(), Some("FieldsV1"));
        assert_eq!(e.subresource, None);
        assert_eq!(e.time, Some(t1()));
        assert_eq!(
            e.fields_v1.as_ref().map(|f| f.0.clone()),
            Some(json!({
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {"f:region": {}, "f:tenants": {"v:\"tenant-a\"": {}}}
            }))
        );
    }

    #[test]
    fn two_managers_applying_disjoint_fields() {
        let obj = ok(ssa(None, &image(json!({"region": "eu"})), "a"));
        let obj = ok(ssa(Some(&obj), &image(json!({"size": 10})), "b"));
        assert_eq!(obj["spec"], json!({"region": "eu", "size": 10}));
        assert_eq!(owned(&obj, "a", "Apply"), json!({"f:spec": {"f:region": {}}}));
        assert_eq!(owned(&obj, "b", "Apply"), json!({"f:spec": {"f:size": {}}}));
        // re-applying the same configuration is a no-op
        let again = ok(ssa(Some(&obj), &image(json!({"size": 10})), "b"));
        assert_eq!(again, obj);
    }

    #[test]
    fn conflict_without_force_has_the_exact_message() {
        let obj = ok(ssa(None, &image(json!({"region": "eu", "size": 1})), "kubectl"));
        let c = conflicts(ssa(Some(&obj), &image(json!({"region": "us"})), "ims-operator"));
        assert_eq!(
            c,
            vec![ApplyConflict {
                manager: "kubectl".into(),
                field: ".spec.region".into(),
                operation: "Apply".into(),
                api_version: API.into(),
                subresource: String::new(),
            }]
        );
        assert_eq!(conflict_message(&c), "Apply failed with 1 conflict: conflict with \"kubectl\": .spec.region");
        let status = conflict_status(&c);
        assert_eq!(status["code"], 409);
        assert_eq!(status["reason"], "Conflict");
        assert_eq!(
            status["details"]["causes"],
            json!([{"reason": "FieldManagerConflict", "message": "conflict with \"kubectl\"", "field": ".spec.region"}])
        );
        // the same value is no conflict: ownership is shared
        let shared = ok(ssa(Some(&obj), &image(json!({"region": "eu"})), "ims-operator"));
        assert_eq!(owned(&shared, "kubectl", "Apply"), json!({"f:spec": {"f:region": {}, "f:size": {}}}));
        assert_eq!(owned(&shared, "ims-operator", "Apply"), json!({"f:spec": {"f:region": {}}}));
    }

    #[test]
    fn several_conflicts_are_grouped_by_manager() {
        let obj = ok(ssa(None, &image(json!({"region": "eu", "size": 1})), "b"));
        let obj =
            ok(ssa(Some(&obj), &with(image(json!({})), "metadata", json!({"name": "img", "labels": {"x": "1"}})), "a"));
        let obj = record_update(
            &image_schema(),
            Some(&obj),
            &with(obj.clone(), "spec", json!({"region": "eu", "size": 1, "tags": ["t"]})),
            "kubectl",
            None,
            &t1(),
        );
        let applied = json!({
            "apiVersion": API, "kind": "Image",
            "metadata": {"name": "img", "labels": {"x": "2"}},
            "spec": {"region": "us", "size": 2, "tags": ["u"]}
        });
        let c = conflicts(ssa(Some(&obj), &applied, "c"));
        assert_eq!(
            conflict_message(&c),
            "Apply failed with 4 conflicts: conflicts with \"a\":\n- .metadata.labels.x\nconflicts with \"b\":\n- .spec.region\n- .spec.size\nconflicts with \"kubectl\" using ims.io/v1alpha1:\n- .spec.tags"
        );
    }

    #[test]
    fn force_takes_ownership() {
        let obj = ok(ssa(None, &image(json!({"region": "eu"})), "kubectl"));
        let obj = ok(apply(
            &image_schema(),
            Some(&obj),
            &image(json!({"region": "us"})),
            "ims",
            None,
            true,
            true,
            &at(1_700_000_100),
        ));
        assert_eq!(obj["spec"]["region"], "us");
        let o = owners(&obj);
        assert_eq!(o.len(), 1, "kubectl lost its only field: {o:?}");
        assert_eq!(owned(&obj, "ims", "Apply"), json!({"f:spec": {"f:region": {}}}));
        // kubectl applying again now conflicts with ims
        let c = conflicts(ssa(Some(&obj), &image(json!({"region": "eu"})), "kubectl"));
        assert_eq!(conflict_message(&c), "Apply failed with 1 conflict: conflict with \"ims\": .spec.region");
    }

    #[test]
    fn fields_dropped_from_the_configuration_are_removed() {
        let obj = ok(ssa(None, &image(json!({"region": "eu", "size": 10, "params": {"a": "1", "b": "2"}})), "a"));
        let obj = ok(ssa(Some(&obj), &image(json!({"region": "eu", "params": {"a": "1"}})), "a"));
        assert_eq!(obj["spec"], json!({"region": "eu", "params": {"a": "1"}}));
        assert_eq!(owned(&obj, "a", "Apply"), json!({"f:spec": {"f:params": {"f:a": {}}, "f:region": {}}}));
        // unless someone else still owns them
        let obj = ok(ssa(Some(&obj), &image(json!({"size": 3})), "b"));
        let obj = ok(ssa(Some(&obj), &image(json!({"size": 3, "region": "eu"})), "b"));
        let obj = ok(ssa(Some(&obj), &image(json!({"params": {"a": "1"}})), "a"));
        assert_eq!(obj["spec"], json!({"region": "eu", "size": 3, "params": {"a": "1"}}));
        // dropping everything under spec keeps fields nobody owns (e.g. defaults) only if someone
        // owns something there; here b still does
        let obj = ok(ssa(Some(&obj), &image(json!({})), "a"));
        assert_eq!(obj["spec"], json!({"region": "eu", "size": 3}));
        assert!(owners(&obj).keys().all(|(m, _, _)| m != "a"));
    }

    #[test]
    fn fields_set_by_updaters_survive_pruning() {
        let obj = ok(ssa(None, &image(json!({"region": "eu", "size": 1})), "a"));
        let edited = with(obj.clone(), "spec", json!({"region": "eu", "size": 1, "tags": ["x"]}));
        let obj = record_update(&image_schema(), Some(&obj), &edited, "kubectl-edit", None, &t1());
        let obj = ok(ssa(Some(&obj), &image(json!({"region": "eu"})), "a"));
        assert_eq!(obj["spec"], json!({"region": "eu", "tags": ["x"]}));
    }

    #[test]
    fn conditions_list_map_applied_by_two_managers() {
        let schema = image_schema();
        let status = |conds: Value| with(image(json!({})), "status", json!({"conditions": conds}));
        let obj = ok(ssa(None, &image(json!({"region": "eu"})), "creator"));
        let obj = ok(apply(
            &schema,
            Some(&obj),
            &status(json!([{"type": "Ready", "status": "True"}])),
            "ready-ctl",
            Some("status"),
            true,
            false,
            &t1(),
        ));
        let obj = ok(apply(
            &schema,
            Some(&obj),
            &status(json!([{"type": "Synced", "status": "False", "reason": "Wait"}])),
            "sync-ctl",
            Some("status"),
            true,
            false,
            &t1(),
        ));
        assert_eq!(
            obj["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "Synced", "status": "False", "reason": "Wait"}])
        );
        let o = owners(&obj);
        assert_eq!(
            o.get(&("ready-ctl".to_owned(), "Apply".to_owned(), "status".to_owned())),
            Some(
                &json!({"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}, "f:type": {}}}}})
            )
        );
        // a status change of another manager's condition conflicts, with the k8s path text
        let c = conflicts(apply(
            &schema,
            Some(&obj),
            &status(json!([{"type": "Ready", "status": "False"}])),
            "sync-ctl",
            Some("status"),
            true,
            false,
            &t1(),
        ));
        assert_eq!(
            conflict_message(&c),
            "Apply failed with 1 conflict: conflict with \"ready-ctl\" with subresource \"status\": .status.conditions[type=\"Ready\"].status"
        );
        // ready-ctl updates its condition in place and the other one stays
        let obj = ok(apply(
            &schema,
            Some(&obj),
            &status(json!([{"type": "Ready", "status": "False", "message": "m"}])),
            "ready-ctl",
            Some("status"),
            true,
            false,
            &t1(),
        ));
        assert_eq!(
            obj["status"]["conditions"],
            json!([{"type": "Ready", "status": "False", "message": "m"}, {"type": "Synced", "status": "False", "reason": "Wait"}])
        );
        // dropping its condition removes it; sync-ctl's stays
        let obj = ok(apply(&schema, Some(&obj), &status(json!([])), "ready-ctl", Some("status"), true, false, &t1()));
        assert_eq!(obj["status"]["conditions"], json!([{"type": "Synced", "status": "False", "reason": "Wait"}]));
        assert!(!owners(&obj).contains_key(&("ready-ctl".to_owned(), "Apply".to_owned(), "status".to_owned())));
    }

    #[test]
    fn list_map_with_composite_keys_keeps_order() {
        let schema = image_schema();
        let obj = ok(ssa(
            None,
            &image(
                json!({"replicas": [{"region": "eu", "zone": "a", "count": 1}, {"region": "us", "zone": "b", "count": 2}]}),
            ),
            "a",
        ));
        let obj = ok(apply(
            &schema,
            Some(&obj),
            &image(json!({"replicas": [{"region": "ap", "zone": "c", "count": 3}]})),
            "b",
            None,
            true,
            false,
            &t1(),
        ));
        assert_eq!(obj["spec"]["replicas"].as_array().map(Vec::len), Some(3));
        assert_eq!(
            owned(&obj, "b", "Apply"),
            json!({"f:spec": {"f:replicas": {"k:{\"region\":\"ap\",\"zone\":\"c\"}": {".": {}, "f:count": {}, "f:region": {}, "f:zone": {}}}}})
        );
        let c = conflicts(apply(
            &schema,
            Some(&obj),
            &image(json!({"replicas": [{"region": "eu", "zone": "a", "count": 5}]})),
            "b",
            None,
            true,
            false,
            &t1(),
        ));
        assert_eq!(c[0].field, ".spec.replicas[region=\"eu\",zone=\"a\"].count");
    }

    #[test]
    fn finalizers_are_a_set() {
        let meta =
            |fins: Value| json!({"apiVersion": API, "kind": "Image", "metadata": {"name": "img", "finalizers": fins}});
        let obj = ok(ssa(None, &image(json!({"region": "eu"})), "creator"));
        let obj = ok(ssa(Some(&obj), &meta(json!(["ims.io/cleanup"])), "a"));
        let obj = ok(ssa(Some(&obj), &meta(json!(["ims.io/quota"])), "b"));
        assert_eq!(obj["metadata"]["finalizers"], json!(["ims.io/cleanup", "ims.io/quota"]));
        assert_eq!(owned(&obj, "a", "Apply"), json!({"f:metadata": {"f:finalizers": {"v:\"ims.io/cleanup\"": {}}}}));
        // both may claim the same value without conflict (shared items take the applier's order)
        let obj = ok(ssa(Some(&obj), &meta(json!(["ims.io/quota", "ims.io/cleanup"])), "b"));
        assert_eq!(obj["metadata"]["finalizers"], json!(["ims.io/quota", "ims.io/cleanup"]));
        let obj = ok(ssa(Some(&obj), &meta(json!([])), "a"));
        assert_eq!(obj["metadata"]["finalizers"], json!(["ims.io/quota", "ims.io/cleanup"]));
        let obj = ok(ssa(Some(&obj), &meta(json!(["ims.io/quota"])), "b"));
        assert_eq!(obj["metadata"]["finalizers"], json!(["ims.io/quota"]));
        assert_eq!(obj["metadata"]["name"], "img");
        assert_eq!(obj["spec"]["region"], "eu");
    }

    #[test]
    fn labels_merge_per_key() {
        let meta =
            |labels: Value| json!({"apiVersion": API, "kind": "Image", "metadata": {"name": "img", "labels": labels}});
        let obj = ok(ssa(None, &meta(json!({"app": "web"})), "a"));
        let obj = ok(ssa(Some(&obj), &meta(json!({"tier": "front"})), "b"));
        assert_eq!(obj["metadata"]["labels"], json!({"app": "web", "tier": "front"}));
        let obj = ok(ssa(Some(&obj), &meta(json!({})), "a"));
        assert_eq!(obj["metadata"]["labels"], json!({"tier": "front"}));
        let obj = ok(ssa(Some(&obj), &json!({"apiVersion": API, "kind": "Image", "metadata": {"name": "img"}}), "b"));
        assert!(obj["metadata"].get("labels").is_none());
        assert_eq!(obj["metadata"]["name"], "img");
        assert!(managed_fields_of(&obj).is_empty());
    }

    #[test]
    fn owner_references_are_keyed_by_uid() {
        let refs =
            |r: Value| json!({"apiVersion": API, "kind": "Image", "metadata": {"name": "img", "ownerReferences": r}});
        let r1 = json!({"apiVersion": "v1", "kind": "Pool", "name": "p1", "uid": "u1", "controller": true});
        let r2 = json!({"apiVersion": "v1", "kind": "Pool", "name": "p2", "uid": "u2"});
        let obj = ok(ssa(None, &refs(json!([r1])), "a"));
        let obj = ok(ssa(Some(&obj), &refs(json!([r2])), "b"));
        assert_eq!(obj["metadata"]["ownerReferences"], json!([r1, r2]));
        let fields = owned(&obj, "b", "Apply");
        assert!(fields["f:metadata"]["f:ownerReferences"].get("k:{\"uid\":\"u2\"}").is_some(), "{fields}");
    }

    #[test]
    fn status_subresource_apply_leaves_spec_alone() {
        let schema = image_schema();
        let obj = ok(ssa(None, &image(json!({"region": "eu"})), "kubectl"));
        let applied = with(image(json!({"region": "us", "size": 99})), "status", json!({"phase": "Ready"}));
        let obj = ok(apply(&schema, Some(&obj), &applied, "ims", Some("status"), true, false, &t1()));
        assert_eq!(obj["spec"], json!({"region": "eu"}));
        assert_eq!(obj["status"], json!({"phase": "Ready"}));
        assert_eq!(
            owners(&obj).get(&("ims".to_owned(), "Apply".to_owned(), "status".to_owned())),
            Some(&json!({"f:status": {"f:phase": {}}}))
        );
        // and the main resource ignores status when the kind has a status subresource
        let obj2 = ok(apply(
            &schema,
            Some(&obj),
            &with(image(json!({"region": "eu"})), "status", json!({"phase": "Lost"})),
            "kubectl",
            None,
            true,
            false,
            &t1(),
        ));
        assert_eq!(obj2["status"], json!({"phase": "Ready"}));
        // without a status subresource, status is an ordinary field (and conflicts)
        let c = conflicts(apply(
            &schema,
            Some(&obj),
            &with(image(json!({"region": "eu"})), "status", json!({"phase": "Lost"})),
            "kubectl",
            None,
            false,
            false,
            &t1(),
        ));
        assert_eq!(
            conflict_message(&c),
            "Apply failed with 1 conflict: conflict with \"ims\" with subresource \"status\": .status.phase"
        );
    }

    #[test]
    fn record_update_then_apply_by_another_manager_conflicts() {
        let schema = image_schema();
        let created = record_update(&schema, None, &image(json!({"region": "eu", "size": 1})), "kubectl", None, &t1());
        assert_eq!(
            owners(&created).get(&("kubectl".to_owned(), "Update".to_owned(), String::new())),
            Some(&json!({"f:spec": {".": {}, "f:region": {}, "f:size": {}}}))
        );
        let c = conflicts(ssa(Some(&created), &image(json!({"region": "us"})), "ims-operator"));
        assert_eq!(
            conflict_message(&c),
            "Apply failed with 1 conflict: conflict with \"kubectl\" using ims.io/v1alpha1: .spec.region"
        );
        assert_eq!(c[0].cause_message(), "conflict with \"kubectl\" using ims.io/v1alpha1");
        // forced, the operator takes the field; kubectl keeps the rest
        let obj = ok(apply(
            &schema,
            Some(&created),
            &image(json!({"region": "us"})),
            "ims-operator",
            None,
            true,
            true,
            &t1(),
        ));
        assert_eq!(owned(&obj, "kubectl", "Update"), json!({"f:spec": {".": {}, "f:size": {}}}));
        assert_eq!(owned(&obj, "ims-operator", "Apply"), json!({"f:spec": {"f:region": {}}}));
    }

    #[test]
    fn record_update_takes_fields_from_appliers() {
        let schema = image_schema();
        let obj = ok(ssa(None, &image(json!({"region": "eu", "size": 1})), "ims"));
        let edited = with(obj.clone(), "spec", json!({"region": "us", "size": 1}));
        let obj = record_update(&schema, Some(&obj), &edited, "kubectl-edit", None, &at(1_700_000_500));
        assert_eq!(owned(&obj, "ims", "Apply"), json!({"f:spec": {"f:size": {}}}));
        assert_eq!(owned(&obj, "kubectl-edit", "Update"), json!({"f:spec": {"f:region": {}}}));
        let entries = managed_fields_of(&obj);
        assert_eq!(
            entries.iter().map(|e| e.operation.clone().unwrap_or_default()).collect::<Vec<_>>(),
            ["Apply", "Update"]
        );
        assert_eq!(entries[1].time, Some(at(1_700_000_500)));
        // removing a field removes it from every owner
        let trimmed = with(obj.clone(), "spec", json!({"region": "us"}));
        let obj = record_update(&schema, Some(&obj), &trimmed, "kubectl-edit", None, &at(1_700_000_600));
        assert!(owners(&obj).keys().all(|(m, _, _)| m != "ims"));
        // the applier re-applying the old value now conflicts with the updater
        let c = conflicts(ssa(Some(&obj), &image(json!({"region": "eu", "size": 1})), "ims"));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].field, ".spec.region");
        assert_eq!(c[0].operation, "Update");
    }

    #[test]
    fn record_update_create_and_noop() {
        let schema = image_schema();
        let new = json!({
            "apiVersion": API, "kind": "Image",
            "metadata": {"name": "img", "namespace": "tenant-a", "labels": {"app": "web"}, "uid": "u", "resourceVersion": "1", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"region": "eu", "tags": ["a"]}
        });
        let created = record_update(&schema, None, &new, "", None, &t1());
        assert_eq!(without_managed(&created), new);
        assert_eq!(
            owned(&created, "unknown", "Update"),
            json!({"f:metadata": {"f:labels": {".": {}, "f:app": {}}}, "f:spec": {".": {}, "f:region": {}, "f:tags": {}}})
        );
        // an update that changes nothing keeps entries (and times) as they are
        let same = record_update(&schema, Some(&created), &created, "other", None, &at(1_800_000_000));
        assert_eq!(same, created);
        // status writes are a separate entry
        let with_status = with(created.clone(), "status", json!({"phase": "Ready"}));
        let obj = record_update(&schema, Some(&created), &with_status, "ims", Some("status"), &t1());
        assert_eq!(
            owners(&obj).get(&("ims".to_owned(), "Update".to_owned(), "status".to_owned())),
            Some(&json!({"f:status": {".": {}, "f:phase": {}}}))
        );
    }

    #[test]
    fn record_update_honours_managed_fields_sent_by_the_client() {
        let schema = image_schema();
        let obj = ok(ssa(None, &image(json!({"region": "eu"})), "a"));
        // [{}] resets them: only the writer's own changes are tracked afterwards
        let mut reset = with(obj.clone(), "spec", json!({"region": "eu", "size": 2}));
        if let Some(md) = reset.get_mut("metadata").and_then(Value::as_object_mut) {
            md.insert("managedFields".into(), json!([{}]));
        }
        let out = record_update(&schema, Some(&obj), &reset, "w", None, &t1());
        assert_eq!(owners(&out).len(), 1);
        assert_eq!(owned(&out, "w", "Update"), json!({"f:spec": {"f:size": {}}}));
        // garbage sent by the client falls back to the stored entries
        let mut garbage = reset.clone();
        if let Some(md) = garbage.get_mut("metadata").and_then(Value::as_object_mut) {
            md.insert("managedFields".into(), json!([{"manager": "x", "operation": "Bogus"}]));
        }
        let out = record_update(&schema, Some(&obj), &garbage, "w", None, &t1());
        assert_eq!(owned(&out, "a", "Apply"), json!({"f:spec": {"f:region": {}}}));
    }

    #[test]
    fn applied_system_metadata_is_ignored() {
        let live = with(
            image(json!({"region": "eu"})),
            "metadata",
            json!({
                "name": "img", "namespace": "tenant-a", "uid": "live-uid", "resourceVersion": "7", "generation": 3,
                "creationTimestamp": "2024-01-01T00:00:00Z"
            }),
        );
        let applied = with(
            image(json!({"region": "eu", "size": 1})),
            "metadata",
            json!({
                "name": "img", "namespace": "tenant-a", "uid": "other", "resourceVersion": "1", "generation": 9,
                "creationTimestamp": "2020-01-01T00:00:00Z", "managedFields": [{"manager": "evil", "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
            }),
        );
        let obj = ok(ssa(Some(&live), &applied, "a"));
        assert_eq!(obj["metadata"]["uid"], "live-uid");
        assert_eq!(obj["metadata"]["resourceVersion"], "7");
        assert_eq!(obj["metadata"]["generation"], 3);
        assert_eq!(obj["metadata"]["creationTimestamp"], "2024-01-01T00:00:00Z");
        assert_eq!(owners(&obj).len(), 1);
        assert_eq!(owned(&obj, "a", "Apply"), json!({"f:spec": {"f:region": {}, "f:size": {}}}));
    }

    #[test]
    fn atomic_lists_and_maps_are_replaced_whole() {
        let obj = ok(ssa(None, &image(json!({"tags": ["a", "b"], "source": {"url": "u", "checksum": "c"}})), "a"));
        assert_eq!(owned(&obj, "a", "Apply"), json!({"f:spec": {"f:source": {}, "f:tags": {}}}));
        let c = conflicts(ssa(Some(&obj), &image(json!({"tags": ["a"], "source": {"url": "u"}})), "b"));
        assert_eq!(c.iter().map(|c| c.field.as_str()).collect::<Vec<_>>(), [".spec.source", ".spec.tags"]);
        let obj = ok(ssa(Some(&obj), &image(json!({"tags": ["z"], "source": {"url": "v"}})), "a"));
        assert_eq!(obj["spec"], json!({"tags": ["z"], "source": {"url": "v"}}));
    }

    #[test]
    fn null_in_the_configuration_removes_the_field() {
        let obj = ok(ssa(None, &image(json!({"region": "eu", "size": 1})), "a"));
        let obj = ok(ssa(Some(&obj), &image(json!({"region": "eu", "size": null})), "a"));
        assert_eq!(obj["spec"], json!({"region": "eu"}));
    }

    #[test]
    fn schemaless_kinds_merge_maps_and_replace_lists() {
        let schema = MergeSchema::from_openapi(None);
        let cm =
            |data: Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data});
        let obj = ok(apply(&schema, None, &cm(json!({"a": "1", "list": [1, 2]})), "x", None, false, false, &t1()));
        let obj = ok(apply(&schema, Some(&obj), &cm(json!({"b": "2"})), "y", None, false, false, &t1()));
        assert_eq!(obj["data"], json!({"a": "1", "b": "2", "list": [1, 2]}));
        // map items are members of the set: "." on nested maps
        assert_eq!(owned(&obj, "y", "Apply"), json!({"f:data": {".": {}, "f:b": {}}}));
        let c = conflicts(apply(&schema, Some(&obj), &cm(json!({"list": [3]})), "y", None, false, false, &t1()));
        assert_eq!(c[0].field, ".data.list");
        assert_eq!(MergeSchema::default(), schema);
    }

    #[test]
    fn update_entries_are_capped_at_ten() {
        let schema = image_schema();
        let mut obj = record_update(&schema, None, &image(json!({"size": 0})), "m0", None, &at(1_000));
        let mut spec = json!({"size": 0});
        for i in 1..=12 {
            if let Some(m) = spec.as_object_mut() {
                m.insert(format!("f{i}"), json!(i));
            }
            let new = with(obj.clone(), "spec", spec.clone());
            obj = record_update(&schema, Some(&obj), &new, &format!("m{i}"), None, &at(1_000 + i));
        }
        let entries = managed_fields_of(&obj);
        assert_eq!(entries.len(), 10);
        let ancient: Vec<_> = entries.iter().filter(|e| e.manager.as_deref() == Some("ancient-changes")).collect();
        assert_eq!(ancient.len(), 1);
        let fields = ancient[0].fields_v1.as_ref().map(|f| f.0.clone()).unwrap_or_default();
        for f in ["f:size", "f:f1", "f:f2", "f:f3"] {
            assert!(fields["f:spec"].get(f).is_some(), "{f} in {fields}");
        }
        assert_eq!(ancient[0].time, Some(at(1_003)));
    }

    #[test]
    fn entries_are_sorted_like_the_apiserver() {
        let schema = image_schema();
        let obj = record_update(&schema, None, &image(json!({"size": 1})), "zeta", None, &at(5));
        let obj = ok(apply(&schema, Some(&obj), &image(json!({"region": "eu"})), "beta", None, true, false, &at(9)));
        let obj = ok(apply(&schema, Some(&obj), &image(json!({"tags": ["x"]})), "alpha", None, true, false, &at(9)));
        let obj = record_update(
            &schema,
            Some(&obj),
            &with(obj.clone(), "spec", json!({"size": 1, "region": "eu", "tags": ["x"], "params": {"k": "v"}})),
            "aaa",
            None,
            &at(7),
        );
        let order: Vec<String> = managed_fields_of(&obj).into_iter().map(|e| e.manager.unwrap_or_default()).collect();
        assert_eq!(order, ["alpha", "beta", "zeta", "aaa"]);
        // a no-op apply keeps the previous time
        let again = ok(apply(&schema, Some(&obj), &image(json!({"tags": ["x"]})), "alpha", None, true, false, &at(99)));
        assert_eq!(again, obj);
    }

    #[test]
    fn fields_v1_round_trip() {
        let raw = json!({
            "f:metadata": {"f:labels": {".": {}, "f:app": {}}, "f:finalizers": {"v:\"a\"": {}, ".": {}}},
            "f:spec": {"f:replicas": {"k:{\"zone\":\"a\",\"region\":\"eu\"}": {".": {}, "f:count": {}}}, "f:list": {"i:0": {}}},
            "x:unknown": {}, "bad": {}
        });
        let set = FieldSet::from_json(&raw);
        assert_eq!(
            set.to_json(),
            json!({
                "f:metadata": {"f:finalizers": {".": {}, "v:\"a\"": {}}, "f:labels": {".": {}, "f:app": {}}},
                "f:spec": {"f:list": {"i:0": {}}, "f:replicas": {"k:{\"region\":\"eu\",\"zone\":\"a\"}": {".": {}, "f:count": {}}}}
            })
        );
        let texts: Vec<String> = set.paths().iter().map(|p| path_text(p)).collect();
        assert!(texts.contains(&".spec.replicas[region=\"eu\",zone=\"a\"].count".to_owned()), "{texts:?}");
        assert!(texts.contains(&".metadata.finalizers[=\"a\"]".to_owned()), "{texts:?}");
        assert!(texts.contains(&".spec.list[0]".to_owned()), "{texts:?}");
        assert_eq!(FieldSet::from_json(&json!("garbage")), FieldSet::default());
    }

    #[test]
    fn conflict_message_formats() {
        let c = |m: &str, op: &str, sub: &str, f: &str| ApplyConflict {
            manager: m.into(),
            field: f.into(),
            operation: op.into(),
            api_version: API.into(),
            subresource: sub.into(),
        };
        assert_eq!(
            conflict_message(&[c("kubectl", "Update", "", ".spec.region")]),
            "Apply failed with 1 conflict: conflict with \"kubectl\" using ims.io/v1alpha1: .spec.region"
        );
        assert_eq!(
            conflict_message(&[c("foo", "Update", "scale", ".spec.replicas")]),
            "Apply failed with 1 conflict: conflict with \"foo\" with subresource \"scale\" using ims.io/v1alpha1: .spec.replicas"
        );
        assert_eq!(
            conflict_message(&[
                c("foo", "Update", "", ".spec.replicas"),
                c("bar", "Apply", "", ".metadata.labels.app")
            ]),
            "Apply failed with 2 conflicts: conflicts with \"bar\":\n- .metadata.labels.app\nconflicts with \"foo\" using ims.io/v1alpha1:\n- .spec.replicas"
        );
    }

    #[test]
    fn schema_extensions_are_read() {
        let s = MergeSchema::from_openapi(Some(&json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {
                    "ios": {"x-kubernetes-int-or-string": true},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "badmap": {"type": "array", "x-kubernetes-list-type": "map", "items": {"type": "object"}}
                }}
            }
        })));
        let (spec, named) = s.root().field("spec");
        assert!(named && matches!(spec, At::Node(n) if is_object(n)), "spec must be an object");
        assert!(matches!(spec.field("ios").0, At::Node(n) if is_scalar(n)));
        let (free, _) = spec.field("free");
        assert!(matches!(free, At::Node(n) if is_object(n) && n.preserve_unknown));
        assert!(
            matches!(free.field("anything"), (At::Node(n), false) if !is_scalar(n) && !is_object(n) && !is_list(n))
        );
        let (badmap, _) = spec.field("badmap");
        assert!(matches!(badmap, At::Node(n) if is_list(n)) && badmap.granular_list().is_none());
        let (metadata, named) = s.root().field("metadata");
        assert!(named && matches!(metadata, At::Node(n) if is_object(n)));
    }

    #[test]
    fn never_panics_on_odd_input() {
        let schemas = [
            MergeSchema::from_openapi(None),
            image_schema(),
            MergeSchema::from_openapi(Some(&json!("nonsense"))),
            MergeSchema::from_openapi(Some(&json!({"type": "array", "items": 3}))),
            MergeSchema::from_openapi(Some(
                &json!({"type": "object", "properties": {"spec": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [1, "k"]}}}),
            )),
        ];
        let values = [
            Value::Null,
            json!(3),
            json!("s"),
            json!([1, 2]),
            json!({}),
            json!({"metadata": "x"}),
            json!({"metadata": {"managedFields": "x"}}),
            json!({"metadata": {"managedFields": [1, {"operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"k:{bad": {}, "v:": {}, "i:x": {}, "f:a": 3}}}]}}),
            json!({"spec": [1, {"k": null}, [2]], "status": {"conditions": [1, {"type": null}, {"type": "A"}, {"type": "A"}]}}),
            json!({"spec": {"region": {"deep": [null]}, "tags": "x", "replicas": [{"region": "eu"}, "x", null]}, "metadata": {"finalizers": [{"a": 1}, null], "labels": [1]}}),
            image(json!({"region": "eu"})),
        ];
        for schema in &schemas {
            for live in &values {
                for applied in &values {
                    for sub in [None, Some("status"), Some("scale")] {
                        let _ = apply(schema, Some(live), applied, "m", sub, true, false, &t1());
                        let _ = apply(schema, Some(live), applied, "", sub, false, true, &t1());
                        let _ = record_update(schema, Some(live), applied, "u", sub, &t1());
                    }
                }
                let _ = apply(schema, None, live, "m", None, false, false, &t1());
                let _ = record_update(schema, None, live, "u", None, &t1());
            }
        }
    }
}
