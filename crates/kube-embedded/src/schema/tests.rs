//! Tests of the schema module on schema fragments, asserting the exact kube-apiserver texts.
//! (The operator's CRDs are tested the same way in the workspace's `tests/schema.rs`.)

use serde_json::{Value, json};

use super::*;

fn strings(errs: &[FieldError]) -> Vec<String> {
    errs.iter().map(ToString::to_string).collect()
}

#[test]
fn pruning_and_defaulting_variants() {
    let s = CrdSchema::from_schema_json(&json!({
        "type": "object",
        "properties": {
            "p": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                  "properties": {"known": {"type": "object", "properties": {"a": {"type": "string"}}}}},
            "m": {"type": "object", "additionalProperties": {"type": "object",
                  "properties": {"v": {"type": "integer", "default": 1}}}},
            "l": {"type": "array", "items": {"type": "object", "properties": {
                  "k": {"type": "string"}, "d": {"type": "string", "default": "x"}}}},
            "o": {"type": "object", "default": {}, "properties": {"z": {"type": "boolean", "default": true}}},
            "n": {"type": "string", "nullable": true},
            "nd": {"type": "string", "default": "dflt"}
        }
    }))
    .unwrap();
    let got = s.prune_and_default(&json!({
        "metadata": {"name": "x"},
        "apiVersion": "v1",
        "kind": "K",
        "unknown": 1,
        "p": {"extra": {"deep": 1}, "known": {"a": "x", "b": 2}},
        "m": {"one": {"junk": 1}, "two": {"v": 5}},
        "l": [{"k": "a", "junk": true}, {"k": "b", "d": "y"}],
        "n": null,
        "nd": null
    }));
    assert_eq!(
        got,
        json!({
            "metadata": {"name": "x"},
            "apiVersion": "v1",
            "kind": "K",
            "p": {"extra": {"deep": 1}, "known": {"a": "x"}},
            "m": {"one": {"v": 1}, "two": {"v": 5}},
            "l": [{"k": "a", "d": "x"}, {"k": "b", "d": "y"}],
            "o": {"z": true},
            "n": null,
            "nd": "dflt"
        })
    );
}

#[test]
fn cel_cost_budgets() {
    // One cheap rule per element of an unbounded list of lists: fine per rule, too many runs.
    let s = CrdSchema::from_schema_json(&json!({
        "type": "object",
        "properties": {"l": {"type": "array", "items": {"type": "array", "items": {
            "type": "string", "x-kubernetes-validations": [{"rule": "self.startsWith('a')"}]}}}}
    }))
    .unwrap();
    let p = s.cel_problems();
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("openAPIV3Schema: Forbidden: x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema exceeds budget by factor of "), "{p:#?}");
    // Bounded, it is fine.
    let s = CrdSchema::from_schema_json(&json!({
        "type": "object",
        "properties": {"l": {"type": "array", "maxItems": 10, "items": {"type": "array", "maxItems": 10, "items": {
            "type": "string", "maxLength": 10, "x-kubernetes-validations": [{"rule": "self.startsWith('a')"}]}}}}
    }))
    .unwrap();
    assert_eq!(s.cel_problems(), Vec::<String>::new());
    // A nested comprehension over unbounded lists is too expensive for one call.
    let s = CrdSchema::from_schema_json(&json!({
        "type": "object",
        "properties": {"l": {"type": "array", "items": {"type": "string"},
            "x-kubernetes-validations": [{"rule": "self.all(a, self.all(b, self.all(c, a != b || b != c)))"}]}}
    }))
    .unwrap();
    let p = s.cel_problems();
    assert!(p.iter().any(|m| m.starts_with("openAPIV3Schema.properties[l].x-kubernetes-validations[0].rule: Forbidden: estimated rule cost exceeds budget by factor of ")), "{p:#?}");
}

#[test]
fn cel_problems_are_found() {
    let s = CrdSchema::from_schema_json(&json!({
        "type": "object",
        "properties": {
            "a": {"type": "string", "x-kubernetes-validations": [{"rule": "self >"}]},
            "b": {"type": "string", "x-kubernetes-validations": [{"rule": "self == 'x'", "reason": "Nope"}]},
            "c": {"type": "object", "properties": {"d": {"type": "string"}},
                  "x-kubernetes-validations": [{"rule": "true", "fieldPath": ".e"}]},
            "f": {"type": "array", "x-kubernetes-list-type": "set",
                  "items": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf"}]}},
            "g": {"type": "string", "x-kubernetes-validations": [{"rule": "request.x == 1"}]},
            "h": {"type": "string", "x-kubernetes-validations": [{"rule": "self == 'a'", "optionalOldSelf": true}]}
        }
    }))
    .unwrap();
    let p = s.cel_problems();
    assert_eq!(p.len(), 6, "{p:#?}");
    assert!(p[0].starts_with(
        "openAPIV3Schema.properties[a].x-kubernetes-validations[0].rule: Invalid value: \"self >\": compilation failed:"
    ));
    assert!(
        p[1].starts_with(
            "openAPIV3Schema.properties[b].x-kubernetes-validations[0].reason: Unsupported value: \"Nope\""
        )
    );
    assert_eq!(
        p[2],
        "openAPIV3Schema.properties[c].x-kubernetes-validations[0].fieldPath: Invalid value: \".e\": does not refer to a valid field"
    );
    assert!(p[3].contains(
        "oldSelf cannot be used on the uncorrelatable portion of the schema within openAPIV3Schema.properties[f]"
    ));
    assert!(p[4].contains("variable 'request' is not available"));
    assert!(p[5].ends_with("optionalOldSelf: Invalid value: true: may not be set if rule does not use oldSelf"));
}

/// Admits `obj` (with a name) against a schema fragment.
fn admit_fragment(schema: Value, obj: Value, old: Option<Value>) -> Vec<String> {
    let s = CrdSchema::from_schema_json(&schema).unwrap();
    let named = |mut o: Value| {
        o["metadata"] = json!({"name": "x"});
        o
    };
    match s.admit(&named(obj), old.map(named).as_ref()) {
        Ok(_) => vec![],
        Err(e) => strings(&e),
    }
}

fn object(props: Value) -> Value {
    json!({"type": "object", "properties": props})
}

#[test]
fn schema_fragments() {
    type Fragment = (&'static str, Value, Value, Option<Value>, Vec<&'static str>);
    let cases: Vec<Fragment> = vec![
        (
            "maxProperties",
            object(json!({"m": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 1}})),
            json!({"m": {"a": "1", "b": "2"}}),
            None,
            vec!["m: Too many: 2: must have at most 1 item"],
        ),
        (
            "minProperties",
            object(json!({"m": {"type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1}})),
            json!({"m": {}}),
            None,
            vec!["m: Invalid value: 0: m in body should have at least 1 properties"],
        ),
        (
            "map values",
            object(json!({"m": {"type": "object", "additionalProperties": {"type": "string", "pattern": "^a"}}})),
            json!({"m": {"x": "b", "y": 1}}),
            None,
            vec![
                r#"m.x: Invalid value: "b": m.x in body should match '^a'"#,
                r#"m.y: Invalid value: "integer": m.y in body must be of type string: "integer""#,
            ],
        ),
        (
            "exclusive maximum",
            object(json!({"n": {"type": "number", "maximum": 10, "exclusiveMaximum": true}})),
            json!({"n": 10}),
            None,
            vec!["n: Invalid value: 10: n in body should be less than 10"],
        ),
        (
            "float maximum",
            object(json!({"n": {"type": "number", "maximum": 1000000.0}})),
            json!({"n": 1000000.5}),
            None,
            vec!["n: Invalid value: 1.0000005e+06: n in body should be less than or equal to 1e+06"],
        ),
        (
            "a fraction and a number beyond int64 under type integer, as kube-apiserver",
            object(json!({"i": {"type": "integer", "format": "int64", "maximum": 100}, "j": {"type": "integer"},
                "k": {"type": "integer", "format": "int32"}, "f": {"type": "number", "format": "float"}})),
            json!({"i": 1e19, "j": 1.5, "k": 3_000_000_000i64, "f": 1e39}),
            None,
            vec![
                r#"<nil>: Invalid value: "": Checked value must be of type number with format float in f"#,
                r#"i: Invalid value: "float64": i in body must be of type int64: "float64""#,
                r#"<nil>: Invalid value: "": Checked value must be of type integer with format int64 in i"#,
                "i: Invalid value: 1e+19: i in body should be less than or equal to 100",
                r#"j: Invalid value: "number": j in body must be of type integer: "number""#,
                r#"<nil>: Invalid value: "": Checked value must be of type integer in j"#,
                r#"<nil>: Invalid value: "": Checked value must be of type integer with format int32 in k"#,
            ],
        ),
        (
            "multipleOf",
            object(json!({"k": {"type": "integer", "multipleOf": 5}})),
            json!({"k": 7}),
            None,
            vec!["k: Invalid value: 7: k in body should be a multiple of 5"],
        ),
        (
            "int-or-string",
            object(json!({"p": {"x-kubernetes-int-or-string": true}})),
            json!({"p": true}),
            None,
            vec![r#"p: Invalid value: "boolean": p in body must be of type integer,string: "boolean""#],
        ),
        (
            "int-or-string ok",
            object(json!({"p": {"x-kubernetes-int-or-string": true}})),
            json!({"p": "80%"}),
            None,
            vec![],
        ),
        (
            "uniqueItems",
            object(json!({"u": {"type": "array", "uniqueItems": true, "items": {"type": "integer"}}})),
            json!({"u": [1, 1]}),
            None,
            vec![r#"u: Invalid value: "": u in body shouldn't contain duplicates"#],
        ),
        (
            "nullable object keeps null",
            object(json!({"o": {"type": "object", "nullable": true}})),
            json!({"o": null}),
            None,
            vec![],
        ),
        (
            "null list element of a non-nullable item",
            object(json!({"l": {"type": "array", "items": {"type": "string"}}})),
            json!({"l": [null]}),
            None,
            vec![r#"l[0]: Invalid value: "null": l[0] in body must be of type string: "null""#],
        ),
        (
            "rule on map values",
            object(json!({"m": {"type": "object", "additionalProperties": {"type": "string",
                "x-kubernetes-validations": [{"rule": "self.startsWith('a')"}]}}})),
            json!({"m": {"x": "b"}}),
            None,
            vec![r#"m[x]: Invalid value: "b": failed rule: self.startsWith('a')"#],
        ),
        (
            "messageExpression",
            object(json!({"s": {"type": "string", "x-kubernetes-validations": [{
                "rule": "self.size() < 3", "message": "static", "messageExpression": "'too long: ' + string(self.size())"}]}})),
            json!({"s": "hello"}),
            None,
            vec![r#"s: Invalid value: "hello": too long: 5"#],
        ),
        (
            "reason Forbidden",
            object(json!({"s": {"type": "string", "x-kubernetes-validations": [{
                "rule": "self != 'x'", "message": "x is not allowed", "reason": "FieldValueForbidden"}]}})),
            json!({"s": "x"}),
            None,
            vec!["s: Forbidden: x is not allowed"],
        ),
        (
            "reason Required and Duplicate",
            object(
                json!({"o": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-validations": [
                {"rule": "has(self.a)", "message": "a please", "reason": "FieldValueRequired", "fieldPath": ".a"},
                {"rule": "false", "reason": "FieldValueDuplicate"}]}}),
            ),
            json!({"o": {}}),
            None,
            vec!["o.a: Required value: a please", r#"o: Duplicate value"#],
        ),
        (
            "a null nullable field is absent to CEL",
            object(
                json!({"o": {"type": "object", "properties": {"a": {"type": "string", "nullable": true}, "b": {"type": "string"}},
                "x-kubernetes-validations": [{"rule": "has(self.a) || has(self.b)", "message": "a or b please"}]}}),
            ),
            json!({"o": {"a": null}}),
            None,
            vec!["o: Invalid value: a or b please"],
        ),
        (
            "a null map value is there",
            object(json!({"m": {"type": "object", "additionalProperties": {"type": "string", "nullable": true},
                "x-kubernetes-validations": [{"rule": "has(self.k)", "message": "k please"}]}})),
            json!({"m": {"k": null}}),
            None,
            vec![],
        ),
        (
            "runtime error",
            object(json!({"o": {"type": "object", "properties": {"x": {"type": "integer"}},
                "x-kubernetes-validations": [{"rule": "self.x > 0"}]}})),
            json!({"o": {}}),
            None,
            vec![r#"o: Invalid value: "object": no such key: x evaluating rule: self.x > 0"#],
        ),
        (
            "optionalOldSelf on create",
            object(json!({"n": {"type": "integer", "x-kubernetes-validations": [{
                "rule": "!oldSelf.hasValue() || self >= oldSelf.value()", "message": "may not decrease", "optionalOldSelf": true}]}})),
            json!({"n": 1}),
            None,
            vec![],
        ),
        (
            "optionalOldSelf on update",
            object(json!({"n": {"type": "integer", "x-kubernetes-validations": [{
                "rule": "!oldSelf.hasValue() || self >= oldSelf.value()", "message": "may not decrease", "optionalOldSelf": true}]}})),
            json!({"n": 1}),
            Some(json!({"n": 2})),
            vec![r#"n: Invalid value: 1: may not decrease"#],
        ),
        (
            "transition rule on a newly added field does not run",
            object(json!({"n": {"type": "integer", "x-kubernetes-validations": [{"rule": "self == oldSelf"}]}})),
            json!({"n": 1}),
            Some(json!({})),
            vec![],
        ),
        (
            "transition rule in list-map items correlates by key",
            object(json!({"l": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["k"],
                "items": {"type": "object", "properties": {"k": {"type": "string"}, "v": {"type": "integer"}},
                    "x-kubernetes-validations": [{"rule": "self.v == oldSelf.v", "message": "v is immutable"}]}}})),
            json!({"l": [{"k": "b", "v": 2}, {"k": "a", "v": 9}]}),
            Some(json!({"l": [{"k": "a", "v": 1}, {"k": "b", "v": 2}]})),
            vec![r#"l[1]: Invalid value: v is immutable"#],
        ),
        (
            "allOf",
            object(json!({"a": {"type": "string", "allOf": [{"maxLength": 2}, {"pattern": "^x"}]}})),
            json!({"a": "yyy"}),
            None,
            vec![
                "a: Too long: may not be more than 2 bytes",
                r#"a: Invalid value: "yyy": a in body should match '^x'"#,
                r#"<nil>: Invalid value: "": "a" must validate all the schemas (allOf). None validated"#,
            ],
        ),
        (
            "root type",
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
            json!({}),
            None,
            vec!["a: Required value"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, schema, obj, old, want) in cases {
        let got = admit_fragment(schema, obj, old);
        if got != want {
            failures.push(format!("{name}:\n  got  {got:#?}\n  want {want:#?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_message_like_new_invalid() {
    let one = vec![FieldError::required("spec.region", "")];
    assert_eq!(
        invalid_message("Image", "ims.io", "x", &one),
        r#"Image.ims.io "x" is invalid: spec.region: Required value"#
    );
    let two = vec![
        FieldError::invalid("spec.region", json!("string"), "region is immutable"),
        FieldError::duplicate("spec.tenants[1]", json!("a")),
        FieldError::duplicate("spec.tenants[1]", json!("a")),
    ];
    assert_eq!(
        invalid_message("Image", "ims.io", "x", &two),
        r#"Image.ims.io "x" is invalid: [spec.region: Invalid value: "string": region is immutable, spec.tenants[1]: Duplicate value: "a"]"#
    );
    assert_eq!(invalid_message("Pod", "", "p", &[]), r#"Pod "p" is invalid"#);
    let status = invalid_status("Image", "ims.io", "x", &one);
    assert_eq!(status["code"], json!(422));
    assert_eq!(
        status["details"]["causes"],
        json!([{"reason": "FieldValueRequired", "message": "Required value", "field": "spec.region"}])
    );
}

#[test]
fn crd_schema_is_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CrdSchema>();
}
