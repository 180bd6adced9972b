//! What the API server does to an object before validating it: pruning unknown fields
//! (`pruning/algorithm.go`), dropping non-nullable nulls without default
//! (`defaulting/prunenulls.go`) and defaulting (`defaulting/algorithm.go`).

use serde_json::Value;

use super::node::{Additional, Node};

const META_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];
const MAX_DEPTH: usize = 512;

/// Removes the fields `s` does not know. At the root (`root`), `apiVersion`, `kind` and
/// `metadata` are kept, as in an embedded resource.
pub(crate) fn prune(obj: &mut Value, s: &Node, root: bool) {
    prune_inner(obj, Some(s), root, 0);
}

fn prune_inner(x: &mut Value, s: Option<&Node>, embedded: bool, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    if let Some(s) = s
        && s.preserve_unknown
    {
        skip_prune(x, s, embedded || s.embedded, depth);
        return;
    }
    match x {
        Value::Object(m) => {
            let Some(s) = s else {
                m.clear();
                return;
            };
            let embedded = embedded || s.embedded;
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                if embedded && META_FIELDS.contains(&k.as_str()) {
                    continue;
                }
                if let Some(p) = s.properties.get(&k) {
                    if let Some(v) = m.get_mut(&k) {
                        prune_inner(v, Some(p), p.embedded, depth + 1);
                    }
                } else if let Some(a) = &s.additional {
                    let child = match a {
                        Additional::Schema(c) => Some(&**c),
                        Additional::Bool(_) => None,
                    };
                    if let Some(v) = m.get_mut(&k) {
                        prune_inner(v, child, child.is_some_and(|c| c.embedded), depth + 1);
                    }
                } else {
                    m.remove(&k);
                }
            }
        }
        Value::Array(a) => {
            let items = s.and_then(|s| s.items.as_deref());
            for v in a {
                prune_inner(v, items, items.is_some_and(|i| i.embedded), depth + 1);
            }
        }
        _ => {}
    }
}

fn skip_prune(x: &mut Value, s: &Node, embedded: bool, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    match x {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                if embedded && META_FIELDS.contains(&k.as_str()) {
                    continue;
                }
                if let Some(p) = s.properties.get(k) {
                    prune_inner(v, Some(p), p.embedded, depth + 1);
                } else if let Some(a) = &s.additional {
                    let child = match a {
                        Additional::Schema(c) => Some(&**c),
                        Additional::Bool(_) => None,
                    };
                    prune_inner(v, child, child.is_some_and(|c| c.embedded), depth + 1);
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = s.items.as_deref() {
                for v in a {
                    skip_prune(v, items, items.embedded, depth + 1);
                }
            }
        }
        _ => {}
    }
}

fn non_nullable_without_default(s: Option<&Node>) -> bool {
    s.is_some_and(|s| !s.nullable && s.default.is_none())
}

/// `PruneNonNullableNullsWithoutDefaults`: drops `null` fields whose schema is not nullable
/// and has no default (list elements are left alone).
pub(crate) fn prune_nulls(x: &mut Value, s: Option<&Node>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    match x {
        Value::Object(m) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let child = s.and_then(|s| s.child_schema(&k));
                let drop = m.get(&k).is_some_and(Value::is_null) && non_nullable_without_default(child);
                if drop {
                    m.remove(&k);
                } else if let Some(v) = m.get_mut(&k) {
                    prune_nulls(v, child, depth + 1);
                }
            }
        }
        Value::Array(a) => {
            let items = s.and_then(|s| s.items.as_deref());
            for v in a {
                prune_nulls(v, items, depth + 1);
            }
        }
        _ => {}
    }
}

fn non_nullable_null(x: &Value, s: &Node) -> bool {
    x.is_null() && !s.nullable
}

/// `Default`: fills absent fields (and non-nullable nulls) of present objects with the
/// schema's defaults, then recurses (into the defaults too).
pub(crate) fn default(x: &mut Value, s: &Node, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    match x {
        Value::Object(m) => {
            for (k, p) in &s.properties {
                let Some(d) = &p.default else { continue };
                let missing = match m.get(k) {
                    None => true,
                    Some(v) => non_nullable_null(v, p),
                };
                if missing {
                    m.insert(k.clone(), d.clone());
                }
            }
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let Some(v) = m.get_mut(&k) else { continue };
                if let Some(p) = s.properties.get(&k) {
                    default(v, p, depth + 1);
                } else if let Some(a) = s.additional_schema() {
                    if non_nullable_null(v, a)
                        && let Some(d) = &a.default
                    {
                        *v = d.clone();
                    }
                    default(v, a, depth + 1);
                }
            }
        }
        Value::Array(a) => {
            let Some(items) = s.items.as_deref() else { return };
            for v in a {
                if non_nullable_null(v, items)
                    && let Some(d) = &items.default
                {
                    *v = d.clone();
                }
                default(v, items, depth + 1);
            }
        }
        _ => {}
    }
}
