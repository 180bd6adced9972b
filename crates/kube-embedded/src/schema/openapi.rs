//! OpenAPI value validation: a port of kube-openapi `pkg/validation/validate` (SchemaValidator
//! and its type, schema-props, string, format, number, slice, common and object validators),
//! with the error conversion of apiextensions-apiserver `kubeOpenAPIResultToFieldErrors` and
//! the ratcheting of `validation/ratcheting.go` on update.

use serde_json::Value;

use super::errors::{FieldError, go_float_v, go_json, go_quote};
use super::formats;
use super::node::Node;
use super::ratchet;

const IN: &str = "body";

/// The field of an error named `name` (`fldPath.Child(strings.TrimPrefix(name, "."))`).
fn field_of(name: &str) -> String {
    if name.is_empty() || name == "." {
        "<nil>".to_string()
    } else {
        name.strip_prefix('.').unwrap_or(name).to_string()
    }
}

/// The JSON kind of a decoded value, as kube-openapi sees it after Go's JSON decoding.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Null,
    Bool,
    Int(i64),
    Float(f64),
    String,
    Array,
    Object,
}

fn kind_of(v: &Value) -> Kind {
    match v {
        Value::Null => Kind::Null,
        Value::Bool(_) => Kind::Bool,
        Value::Number(n) => match n.as_i64() {
            Some(i) => Kind::Int(i),
            None => Kind::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(_) => Kind::String,
        Value::Array(_) => Kind::Array,
        Value::Object(_) => Kind::Object,
    }
}

/// `swag.IsFloat64AJSONInteger`.
fn is_json_integer(f: f64) -> bool {
    f.is_finite() && f.fract() == 0.0 && f.abs() <= 9007199254740992.0
}

/// A number value for error texts: integers plainly, floats as Go's `%v`.
fn number_value(k: Kind) -> Value {
    match k {
        Kind::Int(i) => Value::from(i),
        Kind::Float(f) => serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// `%q`-quoted path used in composite (allOf/anyOf/oneOf/not) messages.
fn composite(detail: String) -> FieldError {
    FieldError::invalid("<nil>", Value::String(String::new()), detail)
}

/// Validates `v` against `s` at kube-openapi path `path` ("" for the root). `old` is the
/// correlated old value on update: errors of an unchanged value are ratcheted away.
pub(crate) fn validate(s: &Node, v: &Value, path: &str, old: Option<&Value>, out: &mut Vec<FieldError>) {
    let mut errs = Vec::new();
    validate_node(s, v, path, old, &mut errs);
    if !errs.is_empty()
        && let Some(o) = old
        && ratchet::schema_equal(s, v, o, 0)
    {
        return;
    }
    out.extend(errs);
}

fn validate_node(s: &Node, v: &Value, path: &str, old: Option<&Value>, out: &mut Vec<FieldError>) {
    let kind = kind_of(v);
    if kind == Kind::Null {
        type_validator(s, v, kind, path, out);
        common_validator(s, v, path, out);
        return;
    }
    type_validator(s, v, kind, path, out);
    schema_props_validator(s, v, path, out);
    if let Value::String(st) = v {
        string_validator(s, st, path, out);
        format_validator(s, st, path, out);
    }
    if matches!(kind, Kind::Int(_) | Kind::Float(_)) {
        number_validator(s, kind, path, out);
    }
    if let Value::Array(a) = v {
        slice_validator(s, a, path, old.and_then(Value::as_array), out);
    }
    common_validator(s, v, path, out);
    if let Value::Object(m) = v {
        object_validator(s, m, path, old.and_then(Value::as_object), out);
    }
}

/// `schemaInfoForType`: the JSON type and format kube-openapi infers from a value.
fn schema_info(k: Kind) -> (&'static str, &'static str) {
    match k {
        Kind::Bool => ("boolean", ""),
        Kind::String => ("string", ""),
        Kind::Int(_) => ("integer", "int64"),
        Kind::Float(_) => ("number", "float64"),
        Kind::Array => ("array", ""),
        Kind::Object => ("object", ""),
        Kind::Null => ("null", ""),
    }
}

fn invalid_type(path: &str, type_name: &str, value: &str) -> FieldError {
    FieldError::type_invalid(
        field_of(path),
        Value::String(value.to_string()),
        format!("{path} in {IN} must be of type {type_name}: {}", go_quote(value)),
    )
}

fn type_validator(s: &Node, v: &Value, k: Kind, path: &str, out: &mut Vec<FieldError>) {
    if s.types.is_empty() && s.vformat.is_empty() {
        return;
    }
    let contains = |t: &str| s.types.iter().any(|x| x == t);
    let joined = s.types.join(",");
    if k == Kind::Null {
        if !s.types.is_empty() && !contains("null") && !s.nullable {
            out.push(invalid_type(path, &joined, "null"));
        }
        return;
    }
    let _ = v;
    let (sch_type, format) = schema_info(k);
    let is_float_int = matches!(k, Kind::Float(f) if is_json_integer(f)) && contains("integer");
    let is_int_float = sch_type == "integer" && contains("number");
    let is_string_or_slice = matches!(k, Kind::String | Kind::Array);
    let type_or_format_matches = contains(sch_type) || format == s.vformat || is_float_int || is_int_float;
    if !s.vformat.is_empty() {
        if !is_string_or_slice && !type_or_format_matches {
            out.push(invalid_type(path, &s.vformat, format));
            return;
        }
        let numeric = contains("number") || contains("integer");
        if is_string_or_slice && !numeric {
            return;
        }
    }
    if !(contains(sch_type) || is_float_int || is_int_float) {
        out.push(invalid_type(path, &joined, sch_type));
    }
}

/// Validates `v` against a branch; returns its errors.
fn branch_errors(b: &Node, v: &Value, path: &str) -> Vec<FieldError> {
    let mut e = Vec::new();
    validate_node(b, v, path, None, &mut e);
    e
}

fn schema_props_validator(s: &Node, v: &Value, path: &str, out: &mut Vec<FieldError>) {
    if !s.any_of.is_empty() {
        let mut best: Option<Vec<FieldError>> = None;
        let mut ok = false;
        for b in &s.any_of {
            let e = branch_errors(b, v, path);
            if e.is_empty() {
                ok = true;
                best = None;
                break;
            }
            if best.as_ref().is_none_or(|bf| e.len() < bf.len()) {
                best = Some(e);
            }
        }
        if !ok {
            out.push(composite(format!("{} must validate at least one schema (anyOf)", go_quote(path))));
        }
        if let Some(b) = best {
            out.extend(b);
        }
    }
    if !s.one_of.is_empty() {
        let mut best: Option<Vec<FieldError>> = None;
        let mut valid = 0;
        for b in &s.one_of {
            let e = branch_errors(b, v, path);
            if e.is_empty() {
                valid += 1;
                best = None;
                continue;
            }
            if valid == 0 && best.as_ref().is_none_or(|bf| e.len() < bf.len()) {
                best = Some(e);
            }
        }
        if valid != 1 {
            let more =
                if valid == 0 { "Found none valid".to_string() } else { format!("Found {valid} valid alternatives") };
            out.push(composite(format!("{} must validate one and only one schema (oneOf). {more}", go_quote(path))));
            if let Some(b) = best {
                out.extend(b);
            }
        }
    }
    if !s.all_of.is_empty() {
        let mut valid = 0;
        for b in &s.all_of {
            let e = branch_errors(b, v, path);
            if e.is_empty() {
                valid += 1;
            }
            out.extend(e);
        }
        if valid != s.all_of.len() {
            let more = if valid == 0 { ". None validated" } else { "" };
            out.push(composite(format!("{} must validate all the schemas (allOf){more}", go_quote(path))));
        }
    }
    if let Some(n) = &s.not
        && branch_errors(n, v, path).is_empty()
    {
        out.push(composite(format!("{} must not validate the schema (not)", go_quote(path))));
    }
}

fn string_validator(s: &Node, st: &str, path: &str, out: &mut Vec<FieldError>) {
    let len = st.chars().count() as i64;
    if let Some(max) = s.max_length
        && len > max
    {
        out.push(FieldError::too_long(field_of(path), max));
        return;
    }
    if let Some(min) = s.min_length
        && len < min
    {
        out.push(FieldError::invalid(
            field_of(path),
            Value::String(st.to_string()),
            format!("{path} in {IN} should be at least {min} chars long"),
        ));
        return;
    }
    if let Some(p) = &s.pattern {
        let failed = match &p.re {
            Ok(re) => (!re.is_match(st)).then(|| p.src.clone()),
            Err(e) => Some(format!("{}, but pattern is invalid: {e}", p.src)),
        };
        if let Some(shown) = failed {
            out.push(FieldError::invalid(
                field_of(path),
                Value::String(st.to_string()),
                format!("{path} in {IN} should match '{shown}'"),
            ));
        }
    }
}

fn format_validator(s: &Node, st: &str, path: &str, out: &mut Vec<FieldError>) {
    if s.vformat.is_empty() || matches!(s.vformat.as_str(), "int32" | "int64" | "float" | "double") {
        return;
    }
    if !formats::validates(&s.vformat, st) {
        out.push(invalid_type(path, &s.vformat, st));
    }
}

/// `IsValueValidAgainstRange(val, type, format, "Checked", path)`: whether the value, written
/// out as Go's `swag` does (`strconv.FormatFloat(f, 'f', -1, 64)` for a float), converts to the
/// schema's numeric type and format. A fraction or a number beyond int64 under `type: integer`
/// fails (besides the type error), as on kube-apiserver.
fn range_error(s: &Node, k: Kind, path: &str) -> Option<FieldError> {
    let text = match k {
        Kind::Int(i) => i.to_string(),
        // Rust's `{}` of an f64 is Go's 'f' with the shortest precision: no exponent.
        Kind::Float(f) => format!("{f}"),
        _ => return None,
    };
    let fits = match (s.ty.as_str(), s.vformat.as_str()) {
        ("integer", "int32") => text.parse::<i32>().is_ok(),
        ("integer", _) => text.parse::<i64>().is_ok(),
        ("number", "float") => text.parse::<f64>().is_ok_and(|f| !f.is_finite() || (f as f32).is_finite()),
        _ => true,
    };
    if fits {
        return None;
    }
    let of_format = if s.vformat.is_empty() { String::new() } else { format!(" with format {}", s.vformat) };
    Some(composite(format!("Checked value must be of type {}{of_format} in {path}", s.ty)))
}

fn number_validator(s: &Node, k: Kind, path: &str, out: &mut Vec<FieldError>) {
    out.extend(range_error(s, k, path));
    let bad = number_value(k);
    let field = field_of(path);
    let mut multiple = Vec::new();
    let mut minimum = Vec::new();
    let mut maximum = Vec::new();
    if let Some(factor) = s.multiple_of {
        match k {
            Kind::Int(i) if factor as i64 != 0 => {
                let f = factor as i64;
                if f < 0 {
                    multiple.push(FieldError::invalid(
                        field.clone(),
                        Value::from(f),
                        format!("factor MultipleOf declared for {path} must be positive: {f}"),
                    ));
                } else if i % f != 0 {
                    multiple.push(FieldError::invalid(
                        field.clone(),
                        bad.clone(),
                        format!("{path} in {IN} should be a multiple of {f}"),
                    ));
                }
            }
            _ => {
                let data = match k {
                    Kind::Int(i) => i as f64,
                    Kind::Float(f) => f,
                    _ => 0.0,
                };
                if factor < 0.0 {
                    multiple.push(FieldError::invalid(
                        field.clone(),
                        serde_json::Number::from_f64(factor).map(Value::Number).unwrap_or(Value::Null),
                        format!("factor MultipleOf declared for {path} must be positive: {}", go_float_v(factor)),
                    ));
                } else if factor > 0.0 {
                    let mult = if factor < 1.0 { 1.0 / factor * data } else { data / factor };
                    if !is_json_integer(mult) {
                        multiple.push(FieldError::invalid(
                            field.clone(),
                            bad.clone(),
                            format!("{path} in {IN} should be a multiple of {}", go_float_v(factor)),
                        ));
                    }
                }
            }
        }
    }
    if let Some(max) = s.maximum {
        let excl = s.exclusive_maximum;
        let (fails, shown) = match k {
            Kind::Int(i) => {
                let m = max as i64;
                ((!excl && i > m) || (excl && i >= m), m.to_string())
            }
            Kind::Float(f) => ((!excl && f > max) || (excl && f >= max), go_float_v(max)),
            _ => (false, String::new()),
        };
        if fails {
            let op = if excl { "less than" } else { "less than or equal to" };
            maximum.push(FieldError::invalid(
                field.clone(),
                bad.clone(),
                format!("{path} in {IN} should be {op} {shown}"),
            ));
        }
    }
    if let Some(min) = s.minimum {
        let excl = s.exclusive_minimum;
        let (fails, shown) = match k {
            Kind::Int(i) => {
                let m = min as i64;
                ((!excl && i < m) || (excl && i <= m), m.to_string())
            }
            Kind::Float(f) => ((!excl && f < min) || (excl && f <= min), go_float_v(min)),
            _ => (false, String::new()),
        };
        if fails {
            let op = if excl { "greater than" } else { "greater than or equal to" };
            minimum.push(FieldError::invalid(
                field.clone(),
                bad.clone(),
                format!("{path} in {IN} should be {op} {shown}"),
            ));
        }
    }
    out.extend(multiple);
    out.extend(minimum);
    out.extend(maximum);
}

fn slice_validator(s: &Node, a: &[Value], path: &str, old: Option<&Vec<Value>>, out: &mut Vec<FieldError>) {
    if let Some(items) = s.items.as_deref() {
        for (i, x) in a.iter().enumerate() {
            let old_item = old.and_then(|o| ratchet::correlate_index(s, a, o, i));
            validate(items, x, &format!("{path}[{i}]"), old_item, out);
        }
    }
    let size = a.len() as i64;
    if let Some(min) = s.min_items
        && size < min
    {
        out.push(FieldError::invalid(
            field_of(path),
            Value::from(size),
            format!("{path} in {IN} should have at least {min} items"),
        ));
    }
    if let Some(max) = s.max_items
        && size > max
    {
        out.push(FieldError::too_many(field_of(path), size, max));
    }
    if s.unique_items {
        let mut seen: Vec<&Value> = Vec::new();
        for x in a {
            if seen.contains(&x) {
                out.push(FieldError::invalid(
                    field_of(path),
                    Value::String(String::new()),
                    format!("{path} in {IN} shouldn't contain duplicates"),
                ));
                break;
            }
            seen.push(x);
        }
    }
}

/// Whether `data` equals `enum_value` after Go's `reflect` conversion to the enum value's type.
fn enum_matches(data: &Value, enum_value: &Value) -> bool {
    match (data, enum_value) {
        (Value::Null, _) | (_, Value::Null) => false,
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (a.as_f64(), b.as_f64(), b.as_i64()) {
                // float64 data converted to an int64 enum value truncates.
                (Some(x), _, Some(y)) if a.as_i64().is_none() => x as i64 == y,
                (Some(x), Some(y), _) => x == y,
                _ => false,
            },
        },
        // An int64 is convertible to string in Go: string(rune(i)).
        (Value::Number(a), Value::String(b)) => a
            .as_i64()
            .map(|i| u32::try_from(i).ok().and_then(char::from_u32).unwrap_or('\u{FFFD}').to_string())
            .is_some_and(|s| &s == b),
        (a, b) => a == b,
    }
}

fn common_validator(s: &Node, v: &Value, path: &str, out: &mut Vec<FieldError>) {
    let Some(values) = &s.enum_values else { return };
    if values.iter().any(|e| enum_matches(v, e)) {
        return;
    }
    let supported: Vec<String> = values
        .iter()
        .map(|e| match e {
            Value::String(s) => s.clone(),
            other => go_json(other),
        })
        .collect();
    out.push(FieldError::not_supported(field_of(path), v.clone(), &supported));
}

fn object_validator(
    s: &Node,
    m: &serde_json::Map<String, Value>,
    path: &str,
    old: Option<&serde_json::Map<String, Value>>,
    out: &mut Vec<FieldError>,
) {
    let num = m.len() as i64;
    if let Some(min) = s.min_properties
        && num < min
    {
        out.push(FieldError::invalid(
            field_of(path),
            Value::from(num),
            format!("{path} in {IN} should have at least {min} properties"),
        ));
        return;
    }
    if let Some(max) = s.max_properties
        && num > max
    {
        out.push(FieldError::too_many(field_of(path), num, max));
        return;
    }
    let child_path = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match &s.additional {
        Some(super::node::Additional::Bool(false)) => {
            for k in m.keys() {
                if !s.properties.contains_key(k) {
                    out.push(FieldError::invalid(
                        field_of(path),
                        Value::String(k.clone()),
                        format!("{path}.{k} in {IN} is a forbidden property"),
                    ));
                }
            }
        }
        Some(super::node::Additional::Schema(a)) => {
            for (k, x) in m {
                if !s.properties.contains_key(k) {
                    validate(a, x, &format!("{path}.{k}"), old.and_then(|o| o.get(k)), out);
                }
            }
        }
        _ => {}
    }
    for (k, p) in &s.properties {
        if let Some(x) = m.get(k) {
            validate(p, x, &child_path(k), old.and_then(|o| o.get(k)), out);
        }
    }
    for k in &s.required {
        if !m.contains_key(k) {
            out.push(FieldError::required(field_of(&format!("{path}.{k}")), ""));
        }
    }
}
