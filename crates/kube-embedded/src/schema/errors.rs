//! Field errors as `k8s.io/apimachinery/pkg/util/validation/field` prints them, and the Go
//! formatting helpers (`%q`, `%v` of a float, `json.Marshal`) the texts depend on.

use std::fmt;

use serde_json::Value;

/// The kind of a field error, like `field.ErrorType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldErrorKind {
    /// `FieldValueRequired`: "Required value".
    Required,
    /// `FieldValueInvalid`: "Invalid value".
    Invalid,
    /// `FieldValueNotSupported`: "Unsupported value" (enums).
    NotSupported,
    /// `FieldValueDuplicate`: "Duplicate value" (list-type set and map).
    Duplicate,
    /// `FieldValueTooMany`: "Too many" (maxItems, maxProperties).
    TooMany,
    /// `FieldValueTooLong`: "Too long" (maxLength).
    TooLong,
    /// `FieldValueForbidden`: "Forbidden".
    Forbidden,
    /// `FieldValueTypeInvalid`: printed "Invalid value" too (wrong JSON type, bad format).
    TypeInvalid,
}

impl FieldErrorKind {
    /// The `StatusCause.reason` of this kind, e.g. `FieldValueInvalid`.
    pub fn reason(&self) -> &'static str {
        match self {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::NotSupported => "FieldValueNotSupported",
            FieldErrorKind::Duplicate => "FieldValueDuplicate",
            FieldErrorKind::TooMany => "FieldValueTooMany",
            FieldErrorKind::TooLong => "FieldValueTooLong",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
            FieldErrorKind::TypeInvalid => "FieldValueTypeInvalid",
        }
    }

    /// The kind of a `StatusCause.reason` (inverse of [`FieldErrorKind::reason`]).
    pub fn from_reason(reason: &str) -> Option<FieldErrorKind> {
        Some(match reason {
            "FieldValueRequired" => FieldErrorKind::Required,
            "FieldValueInvalid" => FieldErrorKind::Invalid,
            "FieldValueNotSupported" => FieldErrorKind::NotSupported,
            "FieldValueDuplicate" => FieldErrorKind::Duplicate,
            "FieldValueTooMany" => FieldErrorKind::TooMany,
            "FieldValueTooLong" => FieldErrorKind::TooLong,
            "FieldValueForbidden" => FieldErrorKind::Forbidden,
            "FieldValueTypeInvalid" => FieldErrorKind::TypeInvalid,
            _ => return None,
        })
    }

    /// The canonical text of the kind (`ErrorType.String()`), e.g. "Invalid value".
    pub fn text(&self) -> &'static str {
        match self {
            FieldErrorKind::Required => "Required value",
            FieldErrorKind::Invalid | FieldErrorKind::TypeInvalid => "Invalid value",
            FieldErrorKind::NotSupported => "Unsupported value",
            FieldErrorKind::Duplicate => "Duplicate value",
            FieldErrorKind::TooMany => "Too many",
            FieldErrorKind::TooLong => "Too long",
            FieldErrorKind::Forbidden => "Forbidden",
        }
    }
}

/// One field error, like `k8s.io/apimachinery/pkg/util/validation/field.Error`.
///
/// `Display` prints exactly what kube-apiserver prints (`Error()`), e.g.
/// `spec.tenants[1]: Duplicate value: "a"`; [`FieldError::body`] is the `StatusCause.message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The error type.
    pub kind: FieldErrorKind,
    /// The field path, e.g. `spec.tenants[3]`; `<nil>` for errors about no field.
    pub field: String,
    /// What the real server prints after "Invalid value:" (or "Unsupported value:", ...).
    /// `None` when nothing is printed (Required, Forbidden, TooLong, or an omitted value).
    pub bad_value: Option<Value>,
    /// The detail after the value.
    pub detail: String,
}

impl FieldError {
    /// A `FieldValueRequired` error.
    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> Self {
        FieldError { kind: FieldErrorKind::Required, field: field.into(), bad_value: None, detail: detail.into() }
    }

    /// A `FieldValueInvalid` error.
    pub fn invalid(field: impl Into<String>, value: Value, detail: impl Into<String>) -> Self {
        FieldError { kind: FieldErrorKind::Invalid, field: field.into(), bad_value: Some(value), detail: detail.into() }
    }

    /// A `FieldValueTypeInvalid` error.
    pub fn type_invalid(field: impl Into<String>, value: Value, detail: impl Into<String>) -> Self {
        FieldError {
            kind: FieldErrorKind::TypeInvalid,
            field: field.into(),
            bad_value: Some(value),
            detail: detail.into(),
        }
    }

    /// A `FieldValueForbidden` error.
    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        FieldError { kind: FieldErrorKind::Forbidden, field: field.into(), bad_value: None, detail: detail.into() }
    }

    /// A `FieldValueDuplicate` error.
    pub fn duplicate(field: impl Into<String>, value: Value) -> Self {
        FieldError {
            kind: FieldErrorKind::Duplicate,
            field: field.into(),
            bad_value: Some(value),
            detail: String::new(),
        }
    }

    /// A `FieldValueNotSupported` error, like `field.NotSupported`.
    pub fn not_supported(field: impl Into<String>, value: Value, valid: &[String]) -> Self {
        let detail = if valid.is_empty() {
            String::new()
        } else {
            let quoted: Vec<String> = valid.iter().map(|v| go_quote(v)).collect();
            format!("supported values: {}", quoted.join(", "))
        };
        FieldError { kind: FieldErrorKind::NotSupported, field: field.into(), bad_value: Some(value), detail }
    }

    /// A `FieldValueTooLong` error, like `field.TooLong` (`maxLength < 0`: no limit in the text).
    pub fn too_long(field: impl Into<String>, max_length: i64) -> Self {
        let detail = if max_length >= 0 {
            format!("may not be more than {max_length} {}", if max_length == 1 { "byte" } else { "bytes" })
        } else {
            "value is too long".to_string()
        };
        FieldError { kind: FieldErrorKind::TooLong, field: field.into(), bad_value: None, detail }
    }

    /// A `FieldValueTooMany` error, like `field.TooMany` (negative numbers are left out).
    pub fn too_many(field: impl Into<String>, actual: i64, max: i64) -> Self {
        let detail = if max >= 0 {
            format!("must have at most {max} {}", if max == 1 { "item" } else { "items" })
        } else {
            "has too many items".to_string()
        };
        let bad_value = (actual >= 0).then(|| Value::from(actual));
        FieldError { kind: FieldErrorKind::TooMany, field: field.into(), bad_value, detail }
    }

    /// The error without the field: the `StatusCause.message` (`ErrorBody()`).
    pub fn body(&self) -> String {
        let mut s = self.kind.text().to_string();
        let prints_value =
            !matches!(self.kind, FieldErrorKind::Required | FieldErrorKind::Forbidden | FieldErrorKind::TooLong);
        if prints_value && let Some(v) = &self.bad_value {
            s.push_str(": ");
            s.push_str(&go_value(v));
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

impl std::error::Error for FieldError {}

/// How a bad value is printed by `ErrorBody()`: strings with `%q`, numbers and booleans
/// with `%v`, anything else as JSON.
pub fn go_value(v: &Value) -> String {
    match v {
        Value::String(s) => go_quote(s),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.to_string()
            } else {
                go_float_v(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        _ => go_json(v),
    }
}

/// Go's `strconv.Quote` (`%q`).
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0B}' => out.push_str("\\v"),
            c if go_is_print(c) => out.push(c),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// An approximation of Go's `unicode.IsPrint`: letters, marks, numbers, punctuation, symbols
/// and the ASCII space; not control, format, separator (other than ' ') or private-use runes.
fn go_is_print(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    let u = c as u32;
    !matches!(u,
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x180E | 0x200B..=0x200F |
        0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB |
        0xE000..=0xF8FF | 0xF0000..=0x10FFFF | 0xFFFE | 0xFFFF)
}

/// Go's `%v` of a `float64` (`strconv.FormatFloat(f, 'g', -1, 64)` with the exponent
/// threshold of `%v`): `65536`, `0.5`, `1e+06`, `1.6777216e+07`.
pub fn go_float_v(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    let (neg, digits, exp) = shortest_digits(f);
    let sign = if neg { "-" } else { "" };
    if !(-4..6).contains(&exp) {
        let mut m = String::new();
        m.push_str(&digits[..1]);
        if digits.len() > 1 {
            m.push('.');
            m.push_str(&digits[1..]);
        }
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    } else {
        format!("{sign}{}", fixed_from_digits(&digits, exp))
    }
}

/// The shortest round-trip digits of `f` (no leading/trailing zeros) and its decimal exponent
/// (`d.ddd × 10^exp`).
fn shortest_digits(f: f64) -> (bool, String, i32) {
    let s = format!("{:e}", f.abs());
    let (mant, exp) = s.split_once('e').unwrap_or((s.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0".to_string() } else { digits.to_string() };
    (f.is_sign_negative(), digits, exp)
}

/// Fixed notation of `d.ddd × 10^exp`.
fn fixed_from_digits(digits: &str, exp: i32) -> String {
    let n = digits.len() as i32;
    if exp < 0 {
        format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
    } else if exp + 1 >= n {
        format!("{}{}", digits, "0".repeat((exp + 1 - n) as usize))
    } else {
        let (a, b) = digits.split_at((exp + 1) as usize);
        format!("{a}.{b}")
    }
}

/// A float as Go's `encoding/json` writes it.
fn go_json_float(f: f64) -> String {
    if !f.is_finite() {
        return "null".into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    let abs = f.abs();
    let (neg, digits, exp) = shortest_digits(f);
    let sign = if neg { "-" } else { "" };
    if !(1e-6..1e21).contains(&abs) {
        let mut m = String::new();
        m.push_str(&digits[..1]);
        if digits.len() > 1 {
            m.push('.');
            m.push_str(&digits[1..]);
        }
        let es = if exp < 0 { '-' } else { '+' };
        let e = exp.abs();
        if exp < 0 && e < 10 { format!("{sign}{m}e{es}{e}") } else { format!("{sign}{m}e{es}{e:02}") }
    } else {
        format!("{sign}{}", fixed_from_digits(&digits, exp))
    }
}

/// Go's `json.Marshal` of an unstructured value: sorted keys, HTML-safe escaping.
pub fn go_json(v: &Value) -> String {
    let mut out = String::new();
    write_go_json(v, &mut out, 0);
    out
}

fn write_go_json(v: &Value, out: &mut String, depth: usize) {
    if depth > 1000 {
        out.push_str("null");
        return;
    }
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                // Go decodes integers beyond int64 as float64.
                out.push_str(&go_json_float(u as f64));
            } else {
                out.push_str(&go_json_float(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_go_json_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_go_json(x, out, depth + 1);
            }
            out.push(']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_go_json_string(k, out);
                out.push(':');
                write_go_json(&m[k], out, depth + 1);
            }
            out.push('}');
        }
    }
}

fn write_go_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn go_float_formatting() {
        let cases = [
            (65536.0, "65536"),
            (0.5, "0.5"),
            (1e6, "1e+06"),
            (16777216.0, "1.6777216e+07"),
            (123456.0, "123456"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5, "-2.5"),
            (1.0, "1"),
        ];
        for (f, want) in cases {
            assert_eq!(go_float_v(f), want, "{f}");
        }
        assert_eq!(go_json_float(1e21), "1e+21");
        assert_eq!(go_json_float(1e-7), "1e-7");
        assert_eq!(go_json_float(1e20), "100000000000000000000");
        assert_eq!(go_json_float(0.5), "0.5");
    }

    #[test]
    fn go_quoting_and_json() {
        assert_eq!(go_quote("a\"b\\c\nd\u{1}é"), "\"a\\\"b\\\\c\\nd\\x01é\"");
        assert_eq!(go_quote("\u{200b}"), "\"\\u200b\"");
        assert_eq!(go_json(&json!({"b": 1, "a": "<x>"})), r#"{"a":"\u003cx\u003e","b":1}"#);
        assert_eq!(go_value(&json!(null)), "null");
        assert_eq!(go_value(&json!(1.5)), "1.5");
    }

    #[test]
    fn error_texts() {
        let cases = [
            (FieldError::duplicate("spec.tenants[1]", json!("a")), r#"spec.tenants[1]: Duplicate value: "a""#),
            (FieldError::required("spec.region", ""), "spec.region: Required value"),
            (
                FieldError::not_supported("spec.type", json!("Foo"), &["A".into(), "B".into()]),
                r#"spec.type: Unsupported value: "Foo": supported values: "A", "B""#,
            ),
            (
                FieldError::too_many("spec.tenants", 129, 128),
                "spec.tenants: Too many: 129: must have at most 128 items",
            ),
            (FieldError::too_many("spec.x", -1, 1), "spec.x: Too many: must have at most 1 item"),
            (
                FieldError::too_long("spec.description", 1024),
                "spec.description: Too long: may not be more than 1024 bytes",
            ),
            (FieldError::forbidden("spec.x", "nope"), "spec.x: Forbidden: nope"),
            (FieldError::invalid("<nil>", Value::Null, "some detail"), "<nil>: Invalid value: null: some detail"),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
        assert_eq!(FieldErrorKind::TypeInvalid.reason(), "FieldValueTypeInvalid");
        assert_eq!(FieldErrorKind::from_reason("FieldValueDuplicate"), Some(FieldErrorKind::Duplicate));
    }
}
