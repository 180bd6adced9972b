//! The uniqueness of `x-kubernetes-list-type: set` elements and `map` keys
//! (apiextensions-apiserver `pkg/apiserver/schema/listtype/validation.go`).

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::FPath;
use super::errors::{FieldError, go_json};
use super::node::Node;

const MAX_DEPTH: usize = 512;

/// `ValidateListSetsAndMaps` on the whole object.
pub(crate) fn validate(s: &Node, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Value::Object(m) = obj {
        validate_map(&FPath::root(), s, m, &mut errs, 0);
    }
    errs
}

fn validate_map(path: &FPath, s: &Node, obj: &Map<String, Value>, errs: &mut Vec<FieldError>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    if let Some(a) = s.additional_schema() {
        for (k, v) in obj {
            validate_value(&path.key(k), a, v, errs, depth + 1);
        }
    }
    if !s.properties.is_empty() {
        for (k, v) in obj {
            if let Some(p) = s.properties.get(k) {
                validate_value(&path.child(k), p, v, errs, depth + 1);
            }
        }
    }
}

fn validate_value(path: &FPath, s: &Node, v: &Value, errs: &mut Vec<FieldError>, depth: usize) {
    match v {
        Value::Array(a) => validate_array(path, s, a, errs, depth),
        Value::Object(m) => validate_map(path, s, m, errs, depth),
        _ => {}
    }
}

/// A value as Go compares it in `validateListSet`: scalars by type and value, compound
/// values by their JSON encoding; `None` is an unspecified map key.
fn set_key(v: Option<&Value>) -> String {
    match v {
        None => "u".to_string(),
        Some(v @ (Value::Object(_) | Value::Array(_))) => format!("c{}", go_json(v)),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => format!("i{i}"),
            None => format!("f{}", n.as_f64().unwrap_or(f64::NAN)),
        },
        Some(Value::String(s)) => format!("s{s}"),
        Some(Value::Bool(b)) => format!("b{b}"),
        Some(Value::Null) => "n".to_string(),
    }
}

/// The indices of the second appearance of each repeated element.
fn non_unique(keys: &[String]) -> Vec<usize> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let times = seen.entry(k.as_str()).or_insert(0);
        *times += 1;
        if *times == 2 {
            out.push(i);
        }
    }
    out
}

fn validate_array(path: &FPath, s: &Node, a: &[Value], errs: &mut Vec<FieldError>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    match s.list_type.as_deref() {
        Some("set") if a.len() > 1 => {
            let keys: Vec<String> = a.iter().map(|x| set_key(Some(x))).collect();
            for i in non_unique(&keys) {
                errs.push(FieldError::duplicate(path.index(i).to_string(), a[i].clone()));
            }
        }
        Some("map") => validate_list_map(path, s, a, errs),
        _ => {}
    }
    if let Some(items) = s.items.as_deref() {
        for (i, x) in a.iter().enumerate() {
            validate_value(&path.index(i), items, x, errs, depth + 1);
        }
    }
}

fn validate_list_map(path: &FPath, s: &Node, a: &[Value], errs: &mut Vec<FieldError>) {
    for (i, x) in a.iter().enumerate() {
        if !x.is_null() && !x.is_object() {
            errs.push(FieldError::invalid(
                path.index(i).to_string(),
                x.clone(),
                "must be an object for an array of list-type map",
            ));
            return;
        }
    }
    if a.len() <= 1 {
        return;
    }
    if s.list_map_keys.len() == 1 {
        let field = &s.list_map_keys[0];
        let keys: Vec<String> = a.iter().map(|x| set_key(x.get(field))).collect();
        for i in non_unique(&keys) {
            let bad = match a[i].get(field) {
                Some(k) => {
                    let mut m = Map::new();
                    m.insert(field.clone(), k.clone());
                    Value::Object(m)
                }
                None => Value::Object(Map::new()),
            };
            errs.push(FieldError::duplicate(path.index(i).to_string(), bad));
        }
        return;
    }
    let key_maps: Vec<Value> = a
        .iter()
        .map(|x| {
            let mut m = Map::new();
            for f in &s.list_map_keys {
                if let Some(k) = x.get(f) {
                    m.insert(f.clone(), k.clone());
                }
            }
            Value::Object(m)
        })
        .collect();
    let keys: Vec<String> = key_maps.iter().map(|x| set_key(Some(x))).collect();
    for i in non_unique(&keys) {
        errs.push(FieldError::duplicate(path.index(i).to_string(), key_maps[i].clone()));
    }
}
