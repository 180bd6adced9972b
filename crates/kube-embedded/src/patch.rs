//! JSON Patch (RFC 6902) and JSON Merge Patch (RFC 7386) as kube-apiserver applies them.
//!
//! kube-apiserver uses `gopkg.in/evanphx/json-patch.v4`; this module follows that library's
//! behaviour and error texts rather than the letter of the RFCs where the two differ:
//!
//! - `replace` of a missing *object member* adds it (only array indexes and missing parents fail);
//! - negative array indexes count from the end (`/list/-1`), `-` appends for `add` (and `move`/`copy`
//!   destinations);
//! - `add` with path `""` (the whole document) fails, `replace` with path `""` swaps the whole
//!   document when the value is an object or array;
//! - `copy`/`move` of a missing object member copy `null` / fail on the removal;
//! - operations without `value` use `null`.
//!
//! A patch is atomic: on any error the input document is left untouched (the functions work on a
//! copy). [`PatchError`] tells what kube-apiserver answers: 400 for a body that is not a JSON
//! Patch, 413 above 10000 operations, 422 (`the server rejected our request due to an error in
//! our request`) when an operation does not apply.

use serde_json::{Map, Value, json};

use super::errors::ApiError;
use crate::schema::go_quote;

/// The largest number of operations kube-apiserver accepts in one JSON Patch.
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// The most bytes (of the copied values' JSON) the `copy` operations of one JSON Patch may add:
/// kube-apiserver sets json-patch's `AccumulatedCopySizeLimit` to its 3 MiB request body limit, so
/// that a few operations copying a document into itself cannot grow it exponentially.
pub const MAX_JSON_PATCH_COPY_BYTES: usize = 3 * 1024 * 1024;

/// Why a patch could not be applied, with the status kube-apiserver answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The body is not a JSON Patch (or a merge patch is not an object): 400 BadRequest, and the
    /// text is the Status message (for example `json: cannot unmarshal object into Go value of type
    /// jsonpatch.Patch`, or `Invalid JSON Patch` for a merge patch).
    #[error("{0}")]
    BadRequest(String),
    /// More than [`MAX_JSON_PATCH_OPERATIONS`] operations: 413 RequestEntityTooLarge.
    #[error("The allowed maximum operations in a JSON patch is {max}, got {got}", max = MAX_JSON_PATCH_OPERATIONS)]
    TooManyOperations {
        /// How many operations the patch had.
        got: usize,
    },
    /// An operation does not apply, with json-patch's text (for example
    /// `replace operation does not apply: doc is missing path: /spec/x: missing value` or
    /// `testing value /spec/size failed: test failed`). kube-apiserver answers 422 Invalid with the
    /// generic message `the server rejected our request due to an error in our request`.
    #[error("{0}")]
    Unprocessable(String),
}

impl PatchError {
    /// The HTTP status code kube-apiserver answers (400, 413 or 422).
    pub fn code(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::TooManyOperations { .. } => 413,
            Self::Unprocessable(_) => 422,
        }
    }

    /// The `reason` of the Status kube-apiserver answers.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "BadRequest",
            Self::TooManyOperations { .. } => "RequestEntityTooLarge",
            Self::Unprocessable(_) => "Invalid",
        }
    }

    /// The `message` of the Status kube-apiserver answers (for 422 the generic text: the server
    /// drops json-patch's explanation).
    pub fn status_message(&self) -> String {
        match self {
            Self::BadRequest(msg) => msg.clone(),
            Self::TooManyOperations { .. } => format!("Request entity too large: {self}"),
            Self::Unprocessable(_) => "the server rejected our request due to an error in our request".to_owned(),
        }
    }

    /// The whole `v1.Status` body kube-apiserver writes for this error.
    pub fn to_status(&self) -> Value {
        self.to_api_error().to_status()
    }

    /// The error as the embedded API answers it.
    pub fn to_api_error(&self) -> ApiError {
        let details = matches!(self, Self::Unprocessable(_)).then(|| json!({}));
        ApiError { code: self.code(), reason: self.reason(), message: self.status_message(), details }
    }
}

/// Applies an RFC 6902 JSON Patch (`application/json-patch+json`) to `doc`, as kube-apiserver does.
///
/// Supports `add`, `remove`, `replace`, `move`, `copy` and `test`, JSON pointer escapes (`~0`,
/// `~1`) and `-` for appending. All or nothing: returns a new document or an error.
pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops: Vec<Option<&Map<String, Value>>> = match patch {
        Value::Null => Vec::new(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::Object(op) => Ok(Some(op)),
                Value::Null => Ok(None),
                other => Err(PatchError::BadRequest(format!(
                    "json: cannot unmarshal {} into Go value of type jsonpatch.Operation",
                    go_json_type(other)
                ))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(PatchError::BadRequest(format!(
                "json: cannot unmarshal {} into Go value of type jsonpatch.Patch",
                go_json_type(other)
            )));
        }
    };
    if ops.len() > MAX_JSON_PATCH_OPERATIONS {
        return Err(PatchError::TooManyOperations { got: ops.len() });
    }
    let mut work = match doc {
        Value::Object(_) | Value::Array(_) => doc.clone(),
        Value::Null => Value::Object(Map::new()),
        other => {
            return Err(PatchError::Unprocessable(format!(
                "json: cannot unmarshal {} into Go value of type jsonpatch.partialDoc",
                go_json_type(other)
            )));
        }
    };
    let mut copied = 0usize;
    for op in ops {
        apply_operation(&mut work, op, &mut copied).map_err(PatchError::Unprocessable)?;
    }
    Ok(work)
}

/// Applies an RFC 7386 JSON Merge Patch (`application/merge-patch+json`): objects merge
/// recursively, `null` deletes a member, anything else replaces.
///
/// Follows json-patch v4 (what kube-apiserver runs) in one corner the RFC leaves alone: `null`
/// members are also dropped from objects nested in arrays that the patch inserts.
pub fn merge_patch(doc: &Value, patch: &Value) -> Value {
    match patch {
        Value::Object(p) => {
            let mut out = match doc {
                Value::Object(d) => d.clone(),
                _ => Map::new(),
            };
            merge_docs(&mut out, p);
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut items = items.clone();
            prune_array_nulls(&mut items);
            Value::Array(items)
        }
        other => other.clone(),
    }
}

/// [`merge_patch`] with kube-apiserver's check of the patch body: a merge patch that is `null` or
/// a scalar is refused with 400 `Invalid JSON Patch`.
pub fn merge_patch_checked(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    match patch {
        Value::Object(_) | Value::Array(_) => Ok(merge_patch(doc, patch)),
        _ => Err(PatchError::BadRequest("Invalid JSON Patch".to_owned())),
    }
}

fn merge_docs(doc: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        if v.is_null() {
            doc.remove(k);
            continue;
        }
        match doc.get_mut(k) {
            Some(cur) if !cur.is_null() => merge_value(cur, v),
            _ => {
                let mut v = v.clone();
                prune_nulls(&mut v);
                doc.insert(k.clone(), v);
            }
        }
    }
}

fn merge_value(cur: &mut Value, patch: &Value) {
    match (cur.as_object_mut(), patch) {
        (Some(cur_doc), Value::Object(p)) => merge_docs(cur_doc, p),
        (Some(_), other) => *cur = other.clone(),
        (None, other) => {
            let mut v = other.clone();
            prune_nulls(&mut v);
            *cur = v;
        }
    }
}

fn prune_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(prune_nulls);
        }
        Value::Array(items) => prune_array_nulls(items),
        _ => {}
    }
}

fn prune_array_nulls(items: &mut [Value]) {
    items.iter_mut().filter(|v| !v.is_null()).for_each(prune_nulls);
}

fn go_json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Go's `strconv.Atoi`, with its error text.
fn atoi(s: &str) -> Result<i64, String> {
    s.parse::<i64>().map_err(|e| {
        let why = match e.kind() {
            std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => "value out of range",
            _ => "invalid syntax",
        };
        format!("strconv.Atoi: parsing {}: {why}", go_quote(s))
    })
}

fn invalid_index(idx: i64) -> String {
    format!("Unable to access invalid index: {idx}: invalid index referenced")
}

/// RFC 6901 unescaping (`~1` then `~0`, left to right as Go's `strings.Replacer`).
fn decode_key(k: &str) -> String {
    let mut out = String::with_capacity(k.len());
    let mut chars = k.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.peek() {
                Some('1') => {
                    chars.next();
                    out.push('/');
                    continue;
                }
                Some('0') => {
                    chars.next();
                    out.push('~');
                    continue;
                }
                _ => {}
            }
        }
        out.push(c);
    }
    out
}

/// An index into an array of `len` items, counting negative indexes from the end.
fn resolve_index(idx: i64, len: usize) -> Option<usize> {
    let len = i64::try_from(len).ok()?;
    let idx = if idx < 0 { idx.checked_add(len)? } else { idx };
    if (0..len).contains(&idx) { usize::try_from(idx).ok() } else { None }
}

/// json-patch's `findObject`: the container holding the last path segment, and that segment.
fn find_container<'a>(doc: &'a mut Value, path: &str) -> Option<(&'a mut Value, String)> {
    let split: Vec<&str> = path.split('/').collect();
    if split.len() < 2 {
        return None;
    }
    let key = decode_key(split.last()?);
    let mut cur = doc;
    for part in split.get(1..split.len() - 1)? {
        let part = decode_key(part);
        let next = match cur {
            Value::Object(m) => m.get_mut(&part)?,
            Value::Array(items) => {
                let idx = atoi(&part).ok()?;
                let idx = resolve_index(idx, items.len())?;
                items.get_mut(idx)?
            }
            _ => return None,
        };
        if !(next.is_object() || next.is_array()) {
            return None;
        }
        cur = next;
    }
    Some((cur, key))
}

/// Container `get`: `Ok(None)` for a missing (or null) object member.
fn container_get(c: &Value, key: &str) -> Result<Option<Value>, String> {
    match c {
        Value::Object(m) => Ok(m.get(key).filter(|v| !v.is_null()).cloned()),
        Value::Array(items) => {
            let idx = atoi(key)?;
            if idx < 0 && idx < -i64::try_from(items.len()).unwrap_or(i64::MAX) {
                return Err(invalid_index(idx));
            }
            let i = resolve_index(idx, items.len()).ok_or_else(|| invalid_index(idx))?;
            Ok(items.get(i).filter(|v| !v.is_null()).cloned())
        }
        _ => Err("invalid state detected".to_owned()),
    }
}

fn container_add(c: &mut Value, key: &str, val: Value) -> Result<(), String> {
    match c {
        Value::Object(m) => {
            m.insert(key.to_owned(), val);
            Ok(())
        }
        Value::Array(items) => {
            if key == "-" {
                items.push(val);
                return Ok(());
            }
            let idx = atoi(key).map_err(|e| format!("value was not a proper array index: '{key}': {e}"))?;
            let size = i64::try_from(items.len()).unwrap_or(i64::MAX).saturating_add(1);
            if idx >= size || idx < -size {
                return Err(invalid_index(idx));
            }
            let at = if idx < 0 { idx + size } else { idx };
            let at = usize::try_from(at).map_err(|_| invalid_index(idx))?;
            if at > items.len() {
                return Err(invalid_index(idx));
            }
            items.insert(at, val);
            Ok(())
        }
        _ => Err("invalid state detected".to_owned()),
    }
}

fn container_set(c: &mut Value, key: &str, val: Value) -> Result<(), String> {
    match c {
        Value::Object(m) => {
            m.insert(key.to_owned(), val);
            Ok(())
        }
        Value::Array(items) => {
            let idx = atoi(key)?;
            let i = resolve_index(idx, items.len()).ok_or_else(|| invalid_index(idx))?;
            match items.get_mut(i) {
                Some(slot) => {
                    *slot = val;
                    Ok(())
                }
                None => Err(invalid_index(idx)),
            }
        }
        _ => Err("invalid state detected".to_owned()),
    }
}

fn container_remove(c: &mut Value, key: &str) -> Result<(), String> {
    match c {
        Value::Object(m) => match m.remove(key) {
            Some(_) => Ok(()),
            None => Err(format!("Unable to remove nonexistent key: {key}: missing value")),
        },
        Value::Array(items) => {
            let idx = atoi(key)?;
            let i = resolve_index(idx, items.len()).ok_or_else(|| invalid_index(idx))?;
            items.remove(i);
            Ok(())
        }
        _ => Err("invalid state detected".to_owned()),
    }
}

/// A string member of an operation (`path`, `from`), with json-patch's errors.
fn op_string(op: Option<&Map<String, Value>>, field: &str, missing: &str) -> Result<String, String> {
    match op.and_then(|o| o.get(field)) {
        None | Some(Value::Null) => Err(format!("{missing}: missing value")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("json: cannot unmarshal {} into Go value of type string", go_json_type(other))),
    }
}

fn apply_operation(doc: &mut Value, op: Option<&Map<String, Value>>, copied: &mut usize) -> Result<(), String> {
    let kind = op.and_then(|o| o.get("op")).and_then(Value::as_str).unwrap_or("unknown");
    let value = || op.and_then(|o| o.get("value")).cloned().unwrap_or(Value::Null);
    let path = || op_string(op, "path", "operation missing path field");
    let from = || op_string(op, "from", "operation, missing from field");
    match kind {
        "add" => {
            let path = path().map_err(|_| "add operation failed to decode path: missing value".to_owned())?;
            let (c, key) = find_container(doc, &path).ok_or_else(|| {
                format!("add operation does not apply: doc is missing path: \"{path}\": missing value")
            })?;
            container_add(c, &key, value()).map_err(|e| format!("error in add for path: '{path}': {e}"))
        }
        "remove" => {
            let path = path().map_err(|_| "remove operation failed to decode path: missing value".to_owned())?;
            let (c, key) = find_container(doc, &path).ok_or_else(|| {
                format!("remove operation does not apply: doc is missing path: \"{path}\": missing value")
            })?;
            container_remove(c, &key).map_err(|e| format!("error in remove for path: '{path}': {e}"))
        }
        "replace" => {
            let path = path().map_err(|e| format!("replace operation failed to decode path: {e}"))?;
            if path.is_empty() {
                // json-patch v4 swaps the whole document for an object or array value and
                // silently ignores anything else.
                let v = value();
                if v.is_object() || v.is_array() {
                    *doc = v;
                }
                return Ok(());
            }
            let (c, key) = find_container(doc, &path).ok_or_else(|| {
                format!("replace operation does not apply: doc is missing path: {path}: missing value")
            })?;
            container_get(c, &key)
                .map_err(|_| format!("replace operation does not apply: doc is missing key: {path}: missing value"))?;
            container_set(c, &key, value()).map_err(|e| format!("error in remove for path: '{path}': {e}"))
        }
        "move" => {
            let from = from().map_err(|e| format!("move operation failed to decode from: {e}"))?;
            let (c, key) = find_container(doc, &from).ok_or_else(|| {
                format!("move operation does not apply: doc is missing from path: {from}: missing value")
            })?;
            let val = container_get(c, &key).map_err(|e| format!("error in move for path: '{key}': {e}"))?;
            container_remove(c, &key).map_err(|e| format!("error in move for path: '{key}': {e}"))?;
            let path = path().map_err(|e| format!("move operation failed to decode path: {e}"))?;
            let (c, key) = find_container(doc, &path).ok_or_else(|| {
                format!("move operation does not apply: doc is missing destination path: {path}: missing value")
            })?;
            container_add(c, &key, val.unwrap_or(Value::Null))
                .map_err(|e| format!("error in move for path: '{path}': {e}"))
        }
        "copy" => {
            let from = from().map_err(|e| format!("copy operation failed to decode from: {e}"))?;
            let (c, key) = find_container(doc, &from).ok_or_else(|| {
                format!("copy operation does not apply: doc is missing from path: {from}: missing value")
            })?;
            let val = container_get(c, &key).map_err(|e| format!("error in copy for from: '{from}': {e}"))?;
            // json-patch counts the copied value's JSON; a value too big to count is over the limit.
            let size = val.as_ref().map_or(4, |v| serde_json::to_vec(v).map_or(usize::MAX, |b| b.len()));
            *copied = copied.saturating_add(size);
            if *copied > MAX_JSON_PATCH_COPY_BYTES {
                return Err(format!(
                    "Unable to complete the copy, the accumulated size increase of copy is {copied}, exceeding the limit {MAX_JSON_PATCH_COPY_BYTES}"
                ));
            }
            let path = path().map_err(|_| "copy operation failed to decode path: missing value".to_owned())?;
            let (c, key) = find_container(doc, &path).ok_or_else(|| {
                format!("copy operation does not apply: doc is missing destination path: {path}: missing value")
            })?;
            container_add(c, &key, val.unwrap_or(Value::Null))
                .map_err(|e| format!("error while adding value during copy: {e}"))
        }
        "test" => {
            let path = path().map_err(|e| format!("test operation failed to decode path: {e}"))?;
            let expected = value();
            let failed = || format!("testing value {path} failed: test failed");
            if path.is_empty() {
                return if json_equal(doc, &expected) { Ok(()) } else { Err(failed()) };
            }
            let (c, key) = find_container(doc, &path)
                .ok_or_else(|| format!("test operation does not apply: is missing path: {path}: missing value"))?;
            let actual = container_get(c, &key).map_err(|e| format!("error in test for path: '{path}': {e}"))?;
            let ok = match actual {
                None => expected.is_null(),
                Some(actual) => json_equal(&actual, &expected),
            };
            if ok { Ok(()) } else { Err(failed()) }
        }
        other => Err(format!("Unexpected kind: {other}")),
    }
}

/// Structural equality; numbers compare by value when one of them is not an integer.
pub(crate) fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                x.as_f64() == y.as_f64()
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equal(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Value {
        json!({
            "apiVersion": "ims.io/v1alpha1",
            "kind": "Image",
            "metadata": {"name": "img", "labels": {"app": "web", "a/b": "x", "t~n": "y"}, "finalizers": ["ims.io/cleanup"]},
            "spec": {"region": "eu", "size": 10, "tags": ["a", "b", "c"], "nested": {"k": null}},
        })
    }

    /// A few `copy` operations that each double the document would grow it to gigabytes; like
    /// kube-apiserver, the copies stop at 3 MiB in all with a 422, and the document is untouched.
    #[test]
    fn copies_stop_at_the_accumulated_size_limit() {
        let doc = json!({"a": ["x".repeat(1024)]});
        // Each copy appends the array to itself, doubling it: 2^40 KiB without a limit.
        let ops = vec![json!({"op": "copy", "from": "/a", "path": "/a/-"}); 40];
        let err = json_patch(&doc, &Value::Array(ops)).expect_err("the copies exceed 3 MiB");
        assert_eq!(err.code(), 422);
        let PatchError::Unprocessable(text) = &err else { panic!("{err:?}") };
        assert!(text.starts_with("Unable to complete the copy, the accumulated size increase of copy is "), "{text}");
        assert!(text.ends_with(&format!("exceeding the limit {MAX_JSON_PATCH_COPY_BYTES}")), "{text}");
        // Copies below the limit still apply.
        let small = json_patch(&doc, &json!([{"op": "copy", "from": "/a/0", "path": "/b"}])).expect("one small copy");
        assert_eq!(small["b"], doc["a"][0]);
    }

    fn patched(doc: &Value, patch: Value) -> Value {
        match json_patch(doc, &patch) {
            Ok(v) => v,
            Err(e) => panic!("patch {patch} should apply: {e}"),
        }
    }

    fn failed(doc: &Value, patch: Value) -> PatchError {
        match json_patch(doc, &patch) {
            Ok(v) => panic!("patch {patch} should fail, got {v}"),
            Err(e) => e,
        }
    }

    #[test]
    fn add_remove_replace() {
        let doc = image();
        let out = patched(
            &doc,
            json!([
                {"op": "add", "path": "/metadata/labels/tier", "value": "front"},
                {"op": "remove", "path": "/metadata/labels/app"},
                {"op": "replace", "path": "/spec/region", "value": "us"},
                {"op": "add", "path": "/spec/tags/1", "value": "z"},
                {"op": "add", "path": "/spec/tags/-", "value": "end"},
                {"op": "remove", "path": "/spec/tags/0"},
            ]),
        );
        assert_eq!(out["metadata"]["labels"], json!({"tier": "front", "a/b": "x", "t~n": "y"}));
        assert_eq!(out["spec"]["region"], "us");
        assert_eq!(out["spec"]["tags"], json!(["z", "b", "c", "end"]));
        // the input is untouched
        assert_eq!(doc, image());
    }

    #[test]
    fn pointer_escapes() {
        let out = patched(
            &image(),
            json!([
                {"op": "replace", "path": "/metadata/labels/a~1b", "value": "1"},
                {"op": "remove", "path": "/metadata/labels/t~0n"},
                {"op": "add", "path": "/metadata/annotations", "value": {}},
                {"op": "add", "path": "/metadata/annotations/ims.io~1note", "value": "n"},
            ]),
        );
        assert_eq!(out["metadata"]["labels"], json!({"app": "web", "a/b": "1"}));
        assert_eq!(out["metadata"]["annotations"], json!({"ims.io/note": "n"}));
        // "~01" decodes to "~1", not "/"
        let out = patched(&json!({}), json!([{"op": "add", "path": "/~01", "value": 1}]));
        assert_eq!(out, json!({"~1": 1}));
    }

    #[test]
    fn move_copy_test() {
        let out = patched(
            &image(),
            json!([
                {"op": "test", "path": "/spec/size", "value": 10},
                {"op": "copy", "from": "/spec/region", "path": "/spec/previousRegion"},
                {"op": "move", "from": "/spec/tags/0", "path": "/spec/tags/-"},
                {"op": "move", "from": "/metadata/labels/app", "path": "/metadata/labels/application"},
                {"op": "test", "path": "/spec/nested/k", "value": null},
                {"op": "test", "path": "/spec/nested/missing", "value": null},
                {"op": "test", "path": "/spec/tags", "value": ["b", "c", "a"]},
            ]),
        );
        assert_eq!(out["spec"]["previousRegion"], "eu");
        assert_eq!(out["spec"]["tags"], json!(["b", "c", "a"]));
        assert_eq!(out["metadata"]["labels"]["application"], "web");
        assert!(out["metadata"]["labels"].get("app").is_none());
    }

    #[test]
    fn atomic_on_failure() {
        let doc = image();
        let err = failed(
            &doc,
            json!([
                {"op": "replace", "path": "/spec/region", "value": "us"},
                {"op": "test", "path": "/spec/size", "value": 11},
            ]),
        );
        assert_eq!(err, PatchError::Unprocessable("testing value /spec/size failed: test failed".to_owned()));
        assert_eq!(err.code(), 422);
        assert_eq!(err.status_message(), "the server rejected our request due to an error in our request");
        assert_eq!(doc["spec"]["region"], "eu");
    }

    #[test]
    fn json_patch_v4_error_texts() {
        let doc = image();
        let msg = |p: Value| failed(&doc, p).to_string();
        assert_eq!(
            msg(json!([{"op": "add", "path": "/spec/missing/x", "value": 1}])),
            "add operation does not apply: doc is missing path: \"/spec/missing/x\": missing value"
        );
        assert_eq!(
            msg(json!([{"op": "remove", "path": "/spec/missing"}])),
            "error in remove for path: '/spec/missing': Unable to remove nonexistent key: missing: missing value"
        );
        assert_eq!(
            msg(json!([{"op": "remove", "path": "/nope/missing"}])),
            "remove operation does not apply: doc is missing path: \"/nope/missing\": missing value"
        );
        assert_eq!(
            msg(json!([{"op": "replace", "path": "/nope/x", "value": 1}])),
            "replace operation does not apply: doc is missing path: /nope/x: missing value"
        );
        assert_eq!(
            msg(json!([{"op": "replace", "path": "/spec/tags/7", "value": 1}])),
            "replace operation does not apply: doc is missing key: /spec/tags/7: missing value"
        );
        assert_eq!(
            msg(json!([{"op": "add", "path": "/spec/tags/9", "value": 1}])),
            "error in add for path: '/spec/tags/9': Unable to access invalid index: 9: invalid index referenced"
        );
        assert_eq!(
            msg(json!([{"op": "add", "path": "/spec/tags/x", "value": 1}])),
            "error in add for path: '/spec/tags/x': value was not a proper array index: 'x': strconv.Atoi: parsing \"x\": invalid syntax"
        );
        assert_eq!(
            msg(json!([{"op": "remove", "path": "/spec/tags/3"}])),
            "error in remove for path: '/spec/tags/3': Unable to access invalid index: 3: invalid index referenced"
        );
        assert_eq!(
            msg(json!([{"op": "test", "path": "/spec/region", "value": "us"}])),
            "testing value /spec/region failed: test failed"
        );
        assert_eq!(
            msg(json!([{"op": "move", "from": "/spec/nope", "path": "/spec/x"}])),
            "error in move for path: 'nope': Unable to remove nonexistent key: nope: missing value"
        );
        assert_eq!(
            msg(json!([{"op": "copy", "from": "/nope/a", "path": "/spec/x"}])),
            "copy operation does not apply: doc is missing from path: /nope/a: missing value"
        );
        assert_eq!(msg(json!([{"op": "frobnicate", "path": "/a"}])), "Unexpected kind: frobnicate");
        assert_eq!(msg(json!([{"path": "/a"}])), "Unexpected kind: unknown");
        assert_eq!(msg(json!([null])), "Unexpected kind: unknown");
        assert_eq!(msg(json!([{"op": "add", "value": 1}])), "add operation failed to decode path: missing value");
        assert_eq!(
            msg(json!([{"op": "replace", "value": 1}])),
            "replace operation failed to decode path: operation missing path field: missing value"
        );
        assert_eq!(
            msg(json!([{"op": "replace", "path": 3, "value": 1}])),
            "replace operation failed to decode path: json: cannot unmarshal number into Go value of type string"
        );
        assert_eq!(
            msg(json!([{"op": "add", "path": "", "value": {}}])),
            "add operation does not apply: doc is missing path: \"\": missing value"
        );
    }

    #[test]
    fn json_patch_v4_leniencies() {
        let doc = image();
        // replace of a missing member adds it (json-patch v4, what kube-apiserver runs)
        let out = patched(&doc, json!([{"op": "replace", "path": "/spec/newField", "value": 1}]));
        assert_eq!(out["spec"]["newField"], 1);
        // negative indexes count from the end
        let out = patched(
            &doc,
            json!([{"op": "remove", "path": "/spec/tags/-1"}, {"op": "add", "path": "/spec/tags/-1", "value": "x"}]),
        );
        assert_eq!(out["spec"]["tags"], json!(["a", "b", "x"]));
        // whole-document replace and test
        let out = patched(
            &doc,
            json!([{"op": "replace", "path": "", "value": {"a": 1}}, {"op": "test", "path": "", "value": {"a": 1}}]),
        );
        assert_eq!(out, json!({"a": 1}));
        // missing value means null
        let out = patched(&doc, json!([{"op": "add", "path": "/spec/z"}]));
        assert_eq!(out["spec"]["z"], Value::Null);
        // null patch is no patch
        assert_eq!(patched(&doc, Value::Null), doc);
        // copy then the copies are independent
        let out = patched(
            &doc,
            json!([{"op": "copy", "from": "/spec/tags", "path": "/spec/t2"}, {"op": "add", "path": "/spec/t2/-", "value": "d"}]),
        );
        assert_eq!(out["spec"]["tags"], json!(["a", "b", "c"]));
        assert_eq!(out["spec"]["t2"], json!(["a", "b", "c", "d"]));
    }

    #[test]
    fn bad_bodies_are_bad_requests() {
        let doc = image();
        let e = failed(&doc, json!({"op": "add"}));
        assert_eq!(
            e,
            PatchError::BadRequest("json: cannot unmarshal object into Go value of type jsonpatch.Patch".to_owned())
        );
        assert_eq!(e.code(), 400);
        assert_eq!(e.to_status()["reason"], "BadRequest");
        assert_eq!(
            failed(&doc, json!(["add"])).to_string(),
            "json: cannot unmarshal string into Go value of type jsonpatch.Operation"
        );
        let many: Vec<Value> = (0..10_001).map(|_| json!({"op": "test", "path": "/spec/size", "value": 10})).collect();
        let e = failed(&doc, Value::Array(many));
        assert_eq!(e.code(), 413);
        assert_eq!(
            e.status_message(),
            "Request entity too large: The allowed maximum operations in a JSON patch is 10000, got 10001"
        );
        let status = failed(&doc, json!([{"op": "test", "path": "/spec/size", "value": 1}])).to_status();
        assert_eq!(
            status,
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server rejected our request due to an error in our request","reason":"Invalid","details":{},"code":422})
        );
    }

    #[test]
    fn never_panics() {
        let docs = [json!({}), json!([]), json!([1, [2, {"a": [3]}]]), json!("s"), Value::Null, image()];
        let paths = [
            "",
            "/",
            "//",
            "/a",
            "/0",
            "/-",
            "/-1",
            "/-99",
            "/99999999999999999999999",
            "/1/1/a/0",
            "a",
            "/~",
            "/~2",
            "/a/b/c/d",
        ];
        for doc in &docs {
            for op in ["add", "remove", "replace", "move", "copy", "test", "x"] {
                for path in paths {
                    for from in paths {
                        let _ = json_patch(doc, &json!([{"op": op, "path": path, "from": from, "value": [1]}]));
                    }
                }
            }
        }
    }

    #[test]
    fn merge_patch_rfc7386() {
        let doc = image();
        let out = merge_patch(
            &doc,
            &json!({"metadata": {"labels": {"app": null, "tier": "front"}}, "spec": {"region": "us", "tags": ["x"], "nested": {"k": 1, "n": {"deep": null, "keep": 2}}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"a/b": "x", "t~n": "y", "tier": "front"}));
        assert_eq!(out["spec"]["tags"], json!(["x"]));
        assert_eq!(out["spec"]["nested"], json!({"k": 1, "n": {"keep": 2}}));
        assert_eq!(out["spec"]["size"], 10);
        // RFC 7386 appendix examples
        assert_eq!(merge_patch(&json!({"a": "b"}), &json!({"a": "c"})), json!({"a": "c"}));
        assert_eq!(merge_patch(&json!({"a": "b"}), &json!({"b": "c"})), json!({"a": "b", "b": "c"}));
        assert_eq!(merge_patch(&json!({"a": "b"}), &json!({"a": null})), json!({}));
        assert_eq!(merge_patch(&json!({"a": [{"b": "c"}]}), &json!({"a": [1]})), json!({"a": [1]}));
        assert_eq!(merge_patch(&json!(["a", "b"]), &json!(["c", "d"])), json!(["c", "d"]));
        assert_eq!(merge_patch(&json!({"a": "b"}), &json!(["c"])), json!(["c"]));
        assert_eq!(merge_patch(&json!({"e": null}), &json!({"a": 1})), json!({"e": null, "a": 1}));
        assert_eq!(merge_patch(&json!([1, 2]), &json!({"a": "b", "c": null})), json!({"a": "b"}));
        assert_eq!(merge_patch(&json!({}), &json!({"a": {"bb": {"ccc": null}}})), json!({"a": {"bb": {}}}));
        assert_eq!(merge_patch(&json!({"a": "foo"}), &json!("bar")), json!("bar"));
        // the v4 corner: nulls in objects inside inserted arrays are dropped
        assert_eq!(merge_patch(&json!({}), &json!({"a": [{"b": null, "c": 1}, null]})), json!({"a": [{"c": 1}, null]}));
    }

    #[test]
    fn merge_patch_checked_refuses_scalars() {
        assert_eq!(
            merge_patch_checked(&image(), &json!(null)),
            Err(PatchError::BadRequest("Invalid JSON Patch".to_owned()))
        );
        assert!(merge_patch_checked(&image(), &json!(3)).is_err());
        assert_eq!(merge_patch_checked(&json!({"a": 1}), &json!({"b": 2})), Ok(json!({"a": 1, "b": 2})));
    }
}
