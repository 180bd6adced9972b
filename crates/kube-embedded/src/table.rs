//! Server-side printing: `kubectl get` asks for a `meta.k8s.io/v1` Table, and custom resources'
//! `additionalPrinterColumns` fill it, as kube-apiserver does.

use serde_json::{Value, json};

use super::registry::Kind;

/// Whether the Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=Table"))
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0].b`,
/// `.a[?(@.k=="v")].b`. Missing values give None.
pub fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = obj;
    let mut rest = path.trim().trim_start_matches('{').trim_end_matches('}');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            current = current.get(&r[..end])?;
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let selector = &r[..end];
            rest = &r[end + 1..];
            let items = current.as_array()?;
            if let Some(filter) = selector.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (field, want) = filter.split_once("==")?;
                let want = want.trim().trim_matches('"').trim_matches('\'');
                current = items.iter().find(|i| i.get(field.trim()).and_then(Value::as_str) == Some(want))?;
            } else {
                current = items.get(selector.trim().parse::<usize>().ok()?)?;
            }
        } else {
            return None;
        }
    }
    Some(current)
}

/// Age as kubectl prints it: `45s`, `12m`, `5h`, `3d`.
pub fn age(timestamp: &str, now: jiff::Timestamp) -> String {
    let Ok(then) = timestamp.parse::<jiff::Timestamp>() else { return "<unknown>".into() };
    let secs = (now.as_second() - then.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 2 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn cell(value: Option<&Value>, typ: &str, now: jiff::Timestamp) -> Value {
    match (value, typ) {
        (None, _) | (Some(Value::Null), _) => Value::Null,
        (Some(Value::String(s)), "date") => json!(age(s, now)),
        (Some(v), _) => v.clone(),
    }
}

/// The Table of some objects of a kind.
pub fn table(kind: &Kind, objects: &[Value], resource_version: &str) -> Value {
    let now = jiff::Timestamp::now();
    let mut columns = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name of the object", "priority": 0}),
    ];
    let mut paths: Vec<(String, String)> = Vec::new();
    let mut specs: Vec<(String, String, String, i32)> = kind
        .columns
        .iter()
        .map(|c| (c.name.clone(), c.type_.clone(), c.json_path.clone(), c.priority.unwrap_or(0)))
        .collect();
    if specs.is_empty() {
        if kind.kind == "Namespace" {
            specs.push(("Status".into(), "string".into(), ".status.phase".into(), 0));
        }
        specs.push(("Age".into(), "date".into(), ".metadata.creationTimestamp".into(), 0));
    }
    for (name, typ, path, priority) in specs {
        columns.push(json!({"name": name, "type": typ, "format": "", "description": "", "priority": priority}));
        paths.push((path, typ));
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let mut cells = vec![obj.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            cells.extend(paths.iter().map(|(path, typ)| cell(json_path(obj, path), typ, now)));
            json!({
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))}
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_subset() {
        let obj = json!({"status": {"conditions": [{"type": "Reconciling", "status": "True"}, {"type": "Ready", "status": "False"}], "phase": "Queued"}, "spec": {"tags": ["a", "b"]}});
        assert_eq!(json_path(&obj, ".status.phase"), Some(&json!("Queued")));
        assert_eq!(json_path(&obj, ".status.conditions[?(@.type==\"Ready\")].status"), Some(&json!("False")));
        assert_eq!(json_path(&obj, ".spec.tags[1]"), Some(&json!("b")));
        assert_eq!(json_path(&obj, ".status.missing"), None);
        assert_eq!(json_path(&obj, ".spec.tags[9]"), None);
        assert_eq!(json_path(&obj, "garbage"), None);
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now: jiff::Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        assert_eq!(age("2026-01-01T23:59:15Z", now), "45s");
        assert_eq!(age("2026-01-01T23:00:00Z", now), "60m");
        assert_eq!(age("2026-01-01T00:00:00Z", now), "24h");
        assert_eq!(age("2025-12-01T00:00:00Z", now), "32d");
    }
}
