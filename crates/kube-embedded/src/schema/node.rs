//! The structural schema, compiled once from a CRD's `openAPIV3Schema` (JSON form).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::cel::CelRule;

/// Deepest schema nesting accepted: a guard against stack exhaustion on absurd schemas, the one
/// limit of every walk over a compiled schema (validation, pruning, defaulting, CEL and the field
/// manager's merges, which reads this same [`Node`]). kube-apiserver has no nesting limit of its
/// own for `openAPIV3Schema` (only the size limits of a request body and of a stored object bound
/// it), so this is set well above any real CRD; the field manager once had its own limit of 64
/// (below which it merged like schemaless data) and now follows the schema to this depth.
pub(crate) const MAX_SCHEMA_DEPTH: usize = 200;

/// `additionalProperties`: a boolean or a schema.
#[derive(Debug)]
pub(crate) enum Additional {
    Bool(bool),
    Schema(Box<Node>),
}

/// A compiled `pattern`.
#[derive(Debug)]
pub(crate) struct Pattern {
    /// The pattern as written in the schema (what the error message prints).
    pub src: String,
    /// The compiled regex, or Go's compile error text.
    pub re: Result<regex::Regex, String>,
}

/// One node of the schema: what validation, pruning, defaulting, CEL and the field manager
/// (`x-kubernetes-list-type`, `x-kubernetes-list-map-keys`, `x-kubernetes-map-type`) read.
#[derive(Debug, Default)]
pub(crate) struct Node {
    /// `type` as written ("" when absent).
    pub ty: String,
    /// The types the value validator accepts (`["integer", "string"]` for int-or-string).
    pub types: Vec<String>,
    /// `format` as written.
    pub format: String,
    /// `format` after kube-apiserver strips the formats it does not validate.
    pub vformat: String,
    pub nullable: bool,
    pub properties: BTreeMap<String, Node>,
    /// Whether `properties` is present (also when empty): with no `type`, such a node is an
    /// object to the field manager.
    pub has_properties: bool,
    pub additional: Option<Additional>,
    pub items: Option<Box<Node>>,
    pub required: Vec<String>,
    pub enum_values: Option<Vec<Value>>,
    pub pattern: Option<Pattern>,
    pub max_length: Option<i64>,
    pub min_length: Option<i64>,
    pub max_items: Option<i64>,
    pub min_items: Option<i64>,
    pub max_properties: Option<i64>,
    pub min_properties: Option<i64>,
    pub maximum: Option<f64>,
    pub minimum: Option<f64>,
    pub exclusive_maximum: bool,
    pub exclusive_minimum: bool,
    pub multiple_of: Option<f64>,
    pub unique_items: bool,
    pub default: Option<Value>,
    pub all_of: Vec<Node>,
    pub any_of: Vec<Node>,
    pub one_of: Vec<Node>,
    pub not: Option<Box<Node>>,
    pub preserve_unknown: bool,
    pub embedded: bool,
    pub int_or_string: bool,
    pub list_type: Option<String>,
    pub list_map_keys: Vec<String>,
    pub map_type: Option<String>,
    /// `x-kubernetes-validations`.
    pub rules: Vec<CelRule>,
    /// Whether this node or one below it has `x-kubernetes-validations`.
    pub has_rules: bool,
    /// The node as JSON (without children), for kube-cel's static analysis.
    pub raw: Value,
}

impl Node {
    /// Compiles a schema node (and its children).
    pub(crate) fn compile(v: &Value) -> Result<Node, String> {
        compile(v, 0, "openAPIV3Schema")
    }

    /// The schema of the property or map value `key`, as kube-apiserver looks it up.
    pub(crate) fn child_schema(&self, key: &str) -> Option<&Node> {
        if let Some(p) = self.properties.get(key) {
            return Some(p);
        }
        match &self.additional {
            Some(Additional::Schema(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether `additionalProperties` is present (schema or `true`/`false`).
    pub(crate) fn additional_schema(&self) -> Option<&Node> {
        match &self.additional {
            Some(Additional::Schema(s)) => Some(s),
            _ => None,
        }
    }

    /// `x-kubernetes-list-type`, defaulting to atomic.
    pub(crate) fn list_type(&self) -> &str {
        self.list_type.as_deref().unwrap_or("atomic")
    }
}

fn get_i64(m: &Map<String, Value>, k: &str) -> Option<i64> {
    let v = m.get(k)?;
    v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))
}

fn get_f64(m: &Map<String, Value>, k: &str) -> Option<f64> {
    m.get(k)?.as_f64()
}

fn get_bool(m: &Map<String, Value>, k: &str) -> bool {
    m.get(k).and_then(Value::as_bool).unwrap_or(false)
}

fn get_str(m: &Map<String, Value>, k: &str) -> String {
    m.get(k).and_then(Value::as_str).unwrap_or_default().to_string()
}

/// The string formats CRD validation checks (`supportedVersionedFormats`, normalized).
const STRING_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "quantity",
    "k8sshortname",
    "k8slongname",
];

/// `StripUnsupportedFormatsPostProcess`: formats kube-apiserver does not know are ignored.
fn validation_format(ty: &str, format: &str) -> String {
    if format.is_empty() {
        return String::new();
    }
    let keep = match ty {
        "" | "string" => STRING_FORMATS.contains(&format.replace('-', "").as_str()),
        "integer" => format == "int32" || format == "int64",
        "number" => format == "float" || format == "double",
        _ => false,
    };
    if keep { format.to_string() } else { String::new() }
}

fn compile(v: &Value, depth: usize, path: &str) -> Result<Node, String> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err(format!("{path}: schema nesting deeper than {MAX_SCHEMA_DEPTH}"));
    }
    let m = match v {
        Value::Object(m) => m,
        Value::Bool(true) | Value::Null => return Ok(Node::default()),
        _ => return Err(format!("{path}: a schema must be an object")),
    };
    let mut n = Node { ty: get_str(m, "type"), format: get_str(m, "format"), ..Node::default() };
    n.int_or_string = get_bool(m, "x-kubernetes-int-or-string");
    n.types = if n.int_or_string {
        vec!["integer".into(), "string".into()]
    } else if n.ty.is_empty() {
        vec![]
    } else {
        vec![n.ty.clone()]
    };
    n.vformat = validation_format(&n.ty, &n.format);
    n.nullable = get_bool(m, "nullable");
    n.max_length = get_i64(m, "maxLength");
    n.min_length = get_i64(m, "minLength");
    n.max_items = get_i64(m, "maxItems");
    n.min_items = get_i64(m, "minItems");
    n.max_properties = get_i64(m, "maxProperties");
    n.min_properties = get_i64(m, "minProperties");
    n.maximum = get_f64(m, "maximum");
    n.minimum = get_f64(m, "minimum");
    n.exclusive_maximum = get_bool(m, "exclusiveMaximum");
    n.exclusive_minimum = get_bool(m, "exclusiveMinimum");
    n.multiple_of = get_f64(m, "multipleOf");
    n.unique_items = get_bool(m, "uniqueItems");
    n.default = m.get("default").cloned();
    n.preserve_unknown = get_bool(m, "x-kubernetes-preserve-unknown-fields");
    n.embedded = get_bool(m, "x-kubernetes-embedded-resource");
    n.list_type = m.get("x-kubernetes-list-type").and_then(Value::as_str).map(str::to_string);
    n.map_type = m.get("x-kubernetes-map-type").and_then(Value::as_str).map(str::to_string);
    n.list_map_keys = m
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    n.required = m
        .get("required")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    n.enum_values = m.get("enum").and_then(Value::as_array).filter(|a| !a.is_empty()).cloned();
    if let Some(p) = m.get("pattern").and_then(Value::as_str).filter(|p| !p.is_empty()) {
        n.pattern = Some(Pattern { src: p.to_string(), re: compile_go_regex(p) });
    }

    if let Some(props) = m.get("properties").and_then(Value::as_object) {
        n.has_properties = true;
        for (k, pv) in props {
            let child = compile(pv, depth + 1, &format!("{path}.properties[{k}]"))?;
            n.properties.insert(k.clone(), child);
        }
    }
    match m.get("additionalProperties") {
        Some(Value::Bool(b)) => n.additional = Some(Additional::Bool(*b)),
        Some(a @ Value::Object(_)) => {
            n.additional =
                Some(Additional::Schema(Box::new(compile(a, depth + 1, &format!("{path}.additionalProperties"))?)))
        }
        _ => {}
    }
    match m.get("items") {
        Some(i @ Value::Object(_)) => n.items = Some(Box::new(compile(i, depth + 1, &format!("{path}.items"))?)),
        Some(Value::Array(a)) => {
            // JSONSchemas form (not structural): use the first schema.
            if let Some(i) = a.first() {
                n.items = Some(Box::new(compile(i, depth + 1, &format!("{path}.items"))?));
            }
        }
        _ => {}
    }
    for (key, dst) in [("allOf", &mut n.all_of), ("anyOf", &mut n.any_of), ("oneOf", &mut n.one_of)] {
        if let Some(a) = m.get(key).and_then(Value::as_array) {
            for (i, s) in a.iter().enumerate() {
                dst.push(compile(s, depth + 1, &format!("{path}.{key}[{i}]"))?);
            }
        }
    }
    if let Some(s) = m.get("not").filter(|s| s.is_object()) {
        n.not = Some(Box::new(compile(s, depth + 1, &format!("{path}.not"))?));
    }

    // The node without its children, for kube-cel's cost analysis.
    let mut raw = m.clone();
    for k in ["description", "allOf", "anyOf", "oneOf", "not"] {
        raw.remove(k);
    }
    n.raw = Value::Object(raw);

    if let Some(rules) = m.get("x-kubernetes-validations").and_then(Value::as_array) {
        for r in rules {
            n.rules.push(CelRule::compile(r));
        }
    }
    n.has_rules = !n.rules.is_empty()
        || n.properties.values().any(|p| p.has_rules)
        || n.items.as_ref().is_some_and(|i| i.has_rules)
        || n.additional_schema().is_some_and(|a| a.has_rules)
        || n.all_of.iter().any(|a| a.has_rules);
    Ok(n)
}

/// Compiles a pattern with Go RE2 semantics: the Perl classes `\d`, `\w`, `\s` and `\b` are
/// ASCII-only in Go, Unicode-aware in Rust, so they are rewritten to their ASCII forms.
pub(crate) fn compile_go_regex(p: &str) -> Result<regex::Regex, String> {
    let translated = translate_go_regex(p);
    regex::RegexBuilder::new(&translated)
        .size_limit(1 << 24)
        .build()
        .map_err(|e| format!("error parsing regexp: {}", e.to_string().lines().last().unwrap_or("invalid")))
}

fn translate_go_regex(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 16);
    let mut chars = p.chars().peekable();
    let mut in_class = false;
    let mut class_start = false;
    while let Some(c) = chars.next() {
        if c == '\\' {
            let Some(&n) = chars.peek() else {
                out.push(c);
                break;
            };
            chars.next();
            class_start = false;
            let replacement = if in_class {
                match n {
                    'd' => Some("[:digit:]"),
                    'D' => Some("[:^digit:]"),
                    'w' => Some("[:word:]"),
                    'W' => Some("[:^word:]"),
                    's' => Some("\\t\\n\\f\\r "),
                    _ => None,
                }
            } else {
                match n {
                    'd' => Some("[0-9]"),
                    'D' => Some("[^0-9]"),
                    'w' => Some("[0-9A-Za-z_]"),
                    'W' => Some("[^0-9A-Za-z_]"),
                    's' => Some("[\\t\\n\\f\\r ]"),
                    'S' => Some("[^\\t\\n\\f\\r ]"),
                    'b' => Some("(?-u:\\b)"),
                    'B' => Some("(?-u:\\B)"),
                    _ => None,
                }
            };
            match replacement {
                Some(r) => out.push_str(r),
                None => {
                    out.push('\\');
                    out.push(n);
                }
            }
            continue;
        }
        if in_class {
            if c == ']' && !class_start {
                in_class = false;
            }
            class_start = c == '^' && class_start;
            if c == '[' && chars.peek() == Some(&':') {
                // A POSIX class like [:alpha:]: copy through to the closing ":]".
                out.push(c);
                let mut prev = '\0';
                for d in chars.by_ref() {
                    out.push(d);
                    if prev == ':' && d == ']' {
                        break;
                    }
                    prev = d;
                }
                continue;
            }
        } else if c == '[' {
            in_class = true;
            class_start = true;
            out.push(c);
            if chars.peek() == Some(&'^') {
                out.push('^');
                chars.next();
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_regex_classes_are_ascii() {
        let re = compile_go_regex(r"^\d+$").unwrap();
        assert!(re.is_match("123"));
        assert!(!re.is_match("١٢٣"));
        let re = compile_go_regex(r"^[\d\s]+$").unwrap();
        assert!(re.is_match("1 2"));
        assert!(!re.is_match("١"));
        let re = compile_go_regex(r"^[]a]+$").unwrap();
        assert!(re.is_match("]a"));
        assert!(compile_go_regex("(").is_err());
        let re = compile_go_regex(r"\bfoo\b").unwrap();
        assert!(re.is_match("a foo b"));
        assert!(!re.is_match("afoo"));
        let re = compile_go_regex(r"^\w+$").unwrap();
        assert!(re.is_match("a_1"));
        assert!(!re.is_match("é"));
        let re = compile_go_regex(r"^(sha256:[0-9a-fA-F]{64}|sha512:[0-9a-fA-F]{128})$").unwrap();
        assert!(re.is_match(&format!("sha256:{}", "a".repeat(64))));
    }

    #[test]
    fn formats_are_stripped_like_the_apiserver() {
        assert_eq!(validation_format("string", "date-time"), "date-time");
        assert_eq!(validation_format("string", "int64"), "");
        assert_eq!(validation_format("integer", "int64"), "int64");
        assert_eq!(validation_format("integer", "uint8"), "");
        assert_eq!(validation_format("object", "date-time"), "");
    }
}
