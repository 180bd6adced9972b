//! `x-kubernetes-validations`: compilation, evaluation (a port of apiextensions-apiserver
//! `pkg/apiserver/schema/cel/validation.go`) and the CRD-creation checks.

use std::collections::HashMap;
use std::sync::Arc;

use kube_cel::KubeCelExt;
use kube_cel::cel::common::ast::{EntryExpr, Expr};
use kube_cel::cel::objects::{Key, Map as CelMap, OptionalValue};
use kube_cel::cel::{Context, ExecutionError, IdedExpr, Program, Value as Cel};
use serde_json::Value;

use super::FPath;
use super::errors::{FieldError, FieldErrorKind, go_quote};
use super::node::{Additional, Node};
use super::ratchet;

/// `celconfig.MaxEvaluatedMessageExpressionSizeBytes`.
const MAX_MESSAGE_EXPRESSION_BYTES: usize = 5 * 1024;
/// Deepest value converted to CEL.
const MAX_VALUE_DEPTH: usize = 512;

/// One compiled `x-kubernetes-validations` rule.
#[derive(Debug)]
pub(crate) struct CelRule {
    pub rule: String,
    pub message: String,
    pub message_expression: String,
    pub reason: Option<String>,
    pub field_path: String,
    pub optional_old_self: bool,
    /// The rule's program, or its compilation error.
    pub program: Result<Program, String>,
    /// The messageExpression's program (when set), or its compilation error.
    pub message_program: Option<Result<Program, String>>,
    /// Whether the rule references `oldSelf` (a transition rule).
    pub uses_old_self: bool,
    /// Whether the rule definition itself was malformed (not an object, no `rule`).
    pub malformed: Option<String>,
}

impl CelRule {
    pub(crate) fn compile(v: &Value) -> CelRule {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        let rule = s("rule");
        let malformed = if !v.is_object() {
            Some("a validation rule must be an object".to_string())
        } else if rule.trim().is_empty() {
            Some("rule is not specified".to_string())
        } else {
            None
        };
        let program = compile_cel(&rule);
        let uses_old_self = program.as_ref().is_ok_and(|p| p.references().has_variable("oldSelf"));
        let message_expression = s("messageExpression");
        let message_program = (!message_expression.trim().is_empty()).then(|| compile_cel(&message_expression));
        CelRule {
            message: s("message"),
            reason: v.get("reason").and_then(Value::as_str).map(str::to_string),
            field_path: s("fieldPath"),
            optional_old_self: v.get("optionalOldSelf").and_then(Value::as_bool).unwrap_or(false),
            rule,
            program,
            message_program,
            uses_old_self,
            message_expression,
            malformed,
        }
    }

    /// `ruleErrorString`: the message if set, otherwise the rule.
    fn error_string(&self) -> &str {
        if self.message.is_empty() { self.rule.trim() } else { self.message.trim() }
    }

    /// `ruleMessageOrDefault`.
    fn message_or_default(&self) -> String {
        if self.message.is_empty() {
            format!("failed rule: {}", self.error_string())
        } else {
            self.message.trim().to_string()
        }
    }
}

fn compile_cel(src: &str) -> Result<Program, String> {
    // The parser is not trusted never to panic on arbitrary input.
    match std::panic::catch_unwind(|| Program::compile(src)) {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the CEL parser failed on this expression".to_string()),
    }
}

thread_local! {
    static BASE: Context<'static> = Context::default().with_all();
    static TIMESTAMP: Option<Program> = Program::compile("timestamp(v)").ok();
    static DURATION: Option<Program> = Program::compile("duration(v)").ok();
}

/// `cel.Escape`: how a property name is spelled in CEL; `None` when it cannot be accessed.
pub(crate) fn escape(ident: &str) -> Option<String> {
    const RESERVED: &[&str] = &[
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    ];
    let first = ident.chars().next()?;
    if first.is_ascii_digit() {
        return None;
    }
    if RESERVED.contains(&ident) {
        return Some(format!("__{ident}__"));
    }
    let mut out = String::with_capacity(ident.len());
    let b = ident.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'_' && b.get(i + 1) == Some(&b'_') {
            out.push_str("__underscores__");
            i += 2;
            continue;
        }
        match c {
            b'.' => out.push_str("__dot__"),
            b'-' => out.push_str("__dash__"),
            b'/' => out.push_str("__slash__"),
            c if c.is_ascii_alphanumeric() || c == b'_' => out.push(c as char),
            _ => return None,
        }
        i += 1;
    }
    Some(out)
}

fn convert_with(program: &'static std::thread::LocalKey<Option<Program>>, s: &str) -> Option<Cel> {
    program.with(|p| {
        let p = p.as_ref()?;
        BASE.with(|base| {
            let mut ctx = base.new_inner_scope();
            ctx.add_variable_from_value("v", Cel::String(Arc::new(s.to_string())));
            p.execute(&ctx).ok()
        })
    })
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn cel_map(m: HashMap<Key, Cel>) -> Cel {
    Cel::Map(CelMap { map: Arc::new(m) })
}

fn key(s: &str) -> Key {
    Key::String(Arc::new(s.to_string()))
}

/// `UnstructuredToVal`: a JSON value as CEL sees it under schema `s`.
pub(crate) fn to_cel(v: &Value, s: Option<&Node>, depth: usize) -> Cel {
    if depth > MAX_VALUE_DEPTH {
        return Cel::Null;
    }
    match v {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => {
            let is_number_schema = s.is_some_and(|s| s.ty == "number");
            if is_number_schema {
                Cel::Float(n.as_f64().unwrap_or(f64::NAN))
            } else if let Some(i) = n.as_i64() {
                Cel::Int(i)
            } else if let Some(u) = n.as_u64() {
                Cel::UInt(u)
            } else {
                Cel::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(st) => {
            let format = s.filter(|s| !s.int_or_string).map(|s| s.format.as_str()).unwrap_or("");
            let converted = match format {
                "date-time" => convert_with(&TIMESTAMP, st),
                "duration" => convert_with(&DURATION, st),
                "byte" => base64_decode(st).map(|b| Cel::Bytes(Arc::new(b))),
                _ => None,
            };
            converted.unwrap_or_else(|| Cel::String(Arc::new(st.clone())))
        }
        Value::Array(a) => {
            let items = s.and_then(|s| s.items.as_deref());
            Cel::List(Arc::new(a.iter().map(|x| to_cel(x, items, depth + 1)).collect()))
        }
        Value::Object(o) => {
            let mut m = HashMap::with_capacity(o.len());
            match s {
                Some(s) if !s.properties.is_empty() || (s.additional.is_none() && !s.preserve_unknown) => {
                    for (k, x) in o {
                        // An object with properties (not a map): a null-valued nullable field
                        // is absent, as an optional field left out (`has()` is false).
                        if x.is_null() && !s.properties.is_empty() {
                            continue;
                        }
                        let Some(name) = escape(k) else { continue };
                        m.insert(key(&name), to_cel(x, s.child_schema(k), depth + 1));
                    }
                }
                Some(s) => {
                    let child = match &s.additional {
                        Some(Additional::Schema(c)) => Some(&**c),
                        _ => None,
                    };
                    for (k, x) in o {
                        m.insert(key(k), to_cel(x, child, depth + 1));
                    }
                }
                None => {
                    for (k, x) in o {
                        m.insert(key(k), to_cel(x, None, depth + 1));
                    }
                }
            }
            if s.is_some_and(|s| s.embedded) {
                m.entry(key("apiVersion")).or_insert_with(|| Cel::String(Arc::new(String::new())));
                m.entry(key("kind")).or_insert_with(|| Cel::String(Arc::new(String::new())));
                m.entry(key("metadata")).or_insert_with(|| cel_map(HashMap::new()));
            }
            cel_map(m)
        }
    }
}

/// `self` of the resource root: the object with `apiVersion`, `kind` and only `metadata.name`
/// and `metadata.generateName` (`model.WithTypeAndObjectMeta`).
fn root_to_cel(v: &Value, s: &Node) -> Cel {
    let Value::Object(o) = v else { return to_cel(v, Some(s), 0) };
    let mut m = HashMap::new();
    for (k, x) in o {
        match k.as_str() {
            "apiVersion" | "kind" => {
                if let Some(st) = x.as_str() {
                    m.insert(key(k), Cel::String(Arc::new(st.to_string())));
                }
            }
            "metadata" => {
                let mut meta = HashMap::new();
                for f in ["name", "generateName"] {
                    if let Some(st) = x.get(f).and_then(Value::as_str) {
                        meta.insert(key(f), Cel::String(Arc::new(st.to_string())));
                    }
                }
                m.insert(key("metadata"), cel_map(meta));
            }
            _ if x.is_null() => {}
            _ => {
                if let (Some(child), Some(name)) = (s.properties.get(k), escape(k)) {
                    m.insert(key(&name), to_cel(x, Some(child), 1));
                }
            }
        }
    }
    cel_map(m)
}

/// The CEL error text closest to cel-go's for a runtime error.
fn cel_error_text(e: &ExecutionError) -> String {
    match e {
        ExecutionError::NoSuchKey(k) => format!("no such key: {k}"),
        ExecutionError::NoSuchOverload => "no such overload".to_string(),
        ExecutionError::DivisionByZero(_) => "division by zero".to_string(),
        ExecutionError::UndeclaredReference(r) => format!("undeclared reference to '{r}'"),
        other => {
            let s = other.to_string();
            let mut c = s.chars();
            match c.next() {
                Some(f) => f.to_lowercase().chain(c).collect(),
                None => s,
            }
        }
    }
}

/// `fieldErrorForReason` as kube-apiserver v1.36 calls it for a failed rule: the value is the
/// rule's `self` when it is a scalar (a string, number or boolean), and is left out of the text
/// for an object or a list (`spec.os: Invalid value: os is required ...`).
fn error_for_reason(path: String, value: &Value, detail: String, reason: Option<&str>) -> FieldError {
    let shown = matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)).then(|| value.clone());
    let kind = match reason {
        Some("FieldValueForbidden") => return FieldError::forbidden(path, detail),
        Some("FieldValueRequired") => return FieldError::required(path, detail),
        Some("FieldValueDuplicate") => FieldErrorKind::Duplicate,
        _ => FieldErrorKind::Invalid,
    };
    let detail = if kind == FieldErrorKind::Duplicate { String::new() } else { detail };
    FieldError { kind, field: path, bad_value: shown, detail }
}

/// Ratcheting state of `ratchetingOptions`: whether the current node is correlated (and if so,
/// unchanged), and whether the nearest correlated ancestor is unchanged.
#[derive(Clone, Copy, Default)]
pub(crate) struct Ratchet {
    current: Option<bool>,
    nearest_parent: Option<bool>,
}

impl Ratchet {
    fn should_ratchet(&self) -> bool {
        self.current.or(self.nearest_parent).unwrap_or(false)
    }

    fn child(&self, correlated: Option<bool>) -> Ratchet {
        if self.current.is_none() {
            return *self;
        }
        Ratchet { current: correlated, nearest_parent: self.current }
    }
}

/// Evaluates every rule under `node` against `obj` (with `old` on update), appending errors.
pub(crate) fn validate(node: &Node, obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    let ratchet = Ratchet { current: old.map(|o| o == obj), nearest_parent: None };
    BASE.with(|base| {
        let mut w = Walker { base, errs };
        w.validate(node, &FPath::root(), obj, old, ratchet, true, 0);
    });
}

struct Walker<'a, 'b> {
    base: &'a Context<'static>,
    errs: &'b mut Vec<FieldError>,
}

impl Walker<'_, '_> {
    #[allow(clippy::too_many_arguments)]
    fn validate(
        &mut self,
        node: &Node,
        path: &FPath,
        obj: &Value,
        old: Option<&Value>,
        ratchet: Ratchet,
        is_root: bool,
        depth: usize,
    ) {
        if !node.has_rules || obj.is_null() || depth > MAX_VALUE_DEPTH {
            return;
        }
        let old = old.filter(|o| !o.is_null());
        self.expressions(&node.rules, node, path, obj, old, ratchet, is_root || node.embedded);
        for branch in &node.all_of {
            if branch.has_rules {
                let r = Ratchet { current: None, nearest_parent: ratchet.nearest_parent };
                self.expressions(&branch.rules, node, path, obj, old, r, is_root || node.embedded);
            }
        }
        match obj {
            Value::Array(items) => {
                let Some(item_schema) = node.items.as_deref().filter(|i| i.has_rules) else { return };
                let old_items = old.and_then(Value::as_array);
                for (i, item) in items.iter().enumerate() {
                    let old_item = if node.list_type() == "map" {
                        old_items.and_then(|o| ratchet::map_list_get(&node.list_map_keys, o, item))
                    } else {
                        None
                    };
                    let r = ratchet.child(old_item.map(|o| o == item));
                    self.validate(item_schema, &path.index(i), item, old_item, r, false, depth + 1);
                }
            }
            Value::Object(map) => {
                let correlatable = node.map_type.as_deref() != Some("atomic");
                let old_map = old.and_then(Value::as_object).filter(|_| correlatable);
                if let Some(add) = node.additional_schema().filter(|a| a.has_rules) {
                    for (k, v) in map {
                        let old_v = old_map.and_then(|o| o.get(k));
                        let r = ratchet.child(old_v.map(|o| o == v));
                        self.validate(add, &path.key(k), v, old_v, r, false, depth + 1);
                    }
                }
                for (k, sub) in &node.properties {
                    let Some(v) = map.get(k) else { continue };
                    if !sub.has_rules {
                        continue;
                    }
                    let old_v = old_map.and_then(|o| o.get(k));
                    let r = ratchet.child(old_v.map(|o| o == v));
                    self.validate(sub, &path.child(k), v, old_v, r, false, depth + 1);
                }
            }
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn expressions(
        &mut self,
        rules: &[CelRule],
        node: &Node,
        path: &FPath,
        obj: &Value,
        old: Option<&Value>,
        ratchet: Ratchet,
        is_root: bool,
    ) {
        if rules.is_empty() {
            return;
        }
        let ty = node.ty.as_str();
        let convert = |v: &Value| if is_root { root_to_cel(v, node) } else { to_cel(v, Some(node), 0) };
        let self_val = convert(obj);
        let old_val = old.map(convert);
        for rule in rules {
            if let Some(m) = &rule.malformed {
                self.errs.push(FieldError::invalid(
                    path.to_string(),
                    Value::String(ty.to_string()),
                    format!("rule compile error: {m}"),
                ));
                continue;
            }
            let program = match &rule.program {
                Ok(p) => p,
                Err(e) => {
                    self.errs.push(FieldError::invalid(
                        path.to_string(),
                        Value::String(ty.to_string()),
                        format!("rule compile error: compilation failed: {e}"),
                    ));
                    continue;
                }
            };
            if rule.uses_old_self && old_val.is_none() && !rule.optional_old_self {
                // Transition rules only run when there is a correlated old value.
                continue;
            }
            let mut ctx = self.base.new_inner_scope();
            ctx.add_variable_from_value("self", self_val.clone());
            if rule.optional_old_self {
                let o = match &old_val {
                    Some(v) => OptionalValue::of(v.clone()),
                    None => OptionalValue::none(),
                };
                ctx.add_variable_from_value("oldSelf", Cel::Opaque(Arc::new(o)));
            } else if let Some(o) = &old_val {
                ctx.add_variable_from_value("oldSelf", o.clone());
            }
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.execute(&ctx)));
            let result = match result {
                Ok(r) => r,
                Err(_) => Err(ExecutionError::function_error("eval", "the CEL interpreter failed")),
            };
            match result {
                Ok(Cel::Bool(true)) => continue,
                Ok(_) => {}
                Err(e) => {
                    let text = cel_error_text(&e);
                    let detail = if text.starts_with("no such overload") {
                        format!(
                            "'{text}': call arguments did not match a supported operator, function or macro signature for rule: {}",
                            rule.error_string()
                        )
                    } else {
                        format!("{text} evaluating rule: {}", rule.error_string())
                    };
                    self.errs.push(FieldError::invalid(path.to_string(), Value::String(ty.to_string()), detail));
                    continue;
                }
            }
            let current = match normalized_field_path(&rule.field_path, node) {
                Some(fp) if !fp.is_empty() => path.child(&fp),
                _ => path.clone(),
            };
            let mut detail = None;
            if let Some(Ok(mp)) = &rule.message_program {
                // messageExpression sees `oldSelf` like the rule does when it is not optional.
                let mut mctx = self.base.new_inner_scope();
                mctx.add_variable_from_value("self", self_val.clone());
                if let Some(o) = &old_val {
                    mctx.add_variable_from_value("oldSelf", o.clone());
                }
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mp.execute(&mctx)));
                if let Ok(Ok(Cel::String(s))) = r {
                    let t = s.trim();
                    if !t.is_empty() && t.len() <= MAX_MESSAGE_EXPRESSION_BYTES && !t.contains('\n') {
                        detail = Some(t.to_string());
                    }
                }
            }
            let detail = detail.unwrap_or_else(|| rule.message_or_default());
            let e = error_for_reason(current.to_string(), obj, detail, rule.reason.as_deref());
            if !rule.uses_old_self && ratchet.should_ratchet() {
                // An unchanged value keeps its error as a warning only.
                continue;
            }
            self.errs.push(e);
        }
    }
}

/// The variables bound by the comprehensions of an expression.
fn bound_variables(e: &IdedExpr) -> Vec<String> {
    fn walk(e: &IdedExpr, out: &mut Vec<String>, depth: usize) {
        if depth > 256 {
            return;
        }
        match &e.expr {
            Expr::Comprehension(c) => {
                out.push(c.iter_var.clone());
                if let Some(v) = &c.iter_var2 {
                    out.push(v.clone());
                }
                out.push(c.accu_var.clone());
                for x in [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                    walk(x, out, depth + 1);
                }
            }
            Expr::Call(c) => {
                if let Some(t) = &c.target {
                    walk(t, out, depth + 1);
                }
                for a in &c.args {
                    walk(a, out, depth + 1);
                }
            }
            Expr::Select(s) => walk(&s.operand, out, depth + 1),
            Expr::List(l) => {
                for x in &l.elements {
                    walk(x, out, depth + 1);
                }
            }
            Expr::Map(m) => {
                for en in &m.entries {
                    if let EntryExpr::MapEntry(me) = &en.expr {
                        walk(&me.key, out, depth + 1);
                        walk(&me.value, out, depth + 1);
                    }
                }
            }
            Expr::Struct(st) => {
                for en in &st.entries {
                    if let EntryExpr::StructField(f) = &en.expr {
                        walk(&f.value, out, depth + 1);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(e, &mut out, 0);
    out
}

/// `ValidFieldPath(...).String()`: the rule's `fieldPath` relative to its node, or `None`
/// when it does not refer to a field of the schema.
pub(crate) fn normalized_field_path(json_path: &str, schema: &Node) -> Option<String> {
    if json_path.is_empty() {
        return Some(String::new());
    }
    valid_field_path(json_path, schema).ok()
}

/// A port of `ValidFieldPath`.
pub(crate) fn valid_field_path(json_path: &str, schema: &Node) -> Result<String, String> {
    let tokens = tokenize(json_path);
    let mut path = FPath::root();
    let mut s = schema;
    let mut it = tokens.into_iter();
    let append = |s: &mut &Node, path: &mut FPath, name: &str| -> Result<(), String> {
        if !s.properties.is_empty() {
            *path = path.child(name);
            *s = s.properties.get(name).ok_or("does not refer to a valid field")?;
        } else if let Some(a) = &s.additional {
            *path = path.key(name);
            match a {
                Additional::Schema(n) => *s = n,
                Additional::Bool(_) => return Err("does not refer to a valid field".into()),
            }
        } else {
            return Err("does not refer to a valid field".into());
        }
        Ok(())
    };
    while let Some(tok) = it.next() {
        match tok.as_str() {
            "[" => {
                let t = it.next().ok_or("unexpected end of JSON path")?;
                if t.len() < 2 || !t.starts_with('\'') || !t.ends_with('\'') {
                    return Err(format!("expected single quoted string but got {t}"));
                }
                let unescaped = unescape_single_quote(&t[1..t.len() - 1])?;
                append(&mut s, &mut path, &unescaped)?;
                let close = it.next().ok_or("unexpected end of JSON path")?;
                if close != "]" {
                    return Err(format!("expected ] but got {close}"));
                }
            }
            "." => {
                let t = it.next().ok_or("unexpected end of JSON path")?;
                append(&mut s, &mut path, &t)?;
            }
            other => return Err(format!("expected [ or . but got: {other}")),
        }
    }
    Ok(if path.is_root() { String::new() } else { path.to_string() })
}

fn tokenize(p: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < b.len() {
        if b[i] == '\'' {
            let mut j = i + 1;
            while j < b.len() && !(b[j] == '\'' && b[j - 1] != '\\') {
                j += 1;
            }
            let end = (j + 1).min(b.len());
            out.push(b[i..end].iter().collect());
            i = end;
        } else if matches!(b[i], '.' | '[' | ']') {
            out.push(b[i].to_string());
            i += 1;
        } else {
            let mut j = i;
            while j < b.len() && !matches!(b[j], '.' | '[' | ']') {
                j += 1;
            }
            out.push(b[i..j].iter().collect());
            i = j;
        }
    }
    out
}

fn unescape_single_quote(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('a') => out.push('\u{07}'),
            Some('b') => out.push('\u{08}'),
            Some('f') => out.push('\u{0C}'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('v') => out.push('\u{0B}'),
            Some('\'') => out.push('\''),
            Some('\\') => out.push('\\'),
            Some(o) => return Err(format!("invalid string literal: invalid escape char \\{o}")),
            None => out.push('\\'),
        }
    }
    Ok(out)
}

/// The checks kube-apiserver makes on the rules when the CRD is created or updated.
pub(crate) fn problems(node: &Node, path: &str, out: &mut Vec<String>) {
    let mut total = 0.0;
    problems_at(node, path, None, 1.0, &mut total, out);
    if total > STATIC_ESTIMATED_CRD_COST_LIMIT {
        out.push(format!(
            "{path}: Forbidden: x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema exceeds budget by factor of {}x (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)",
            super::errors::go_float_v(total / STATIC_ESTIMATED_CRD_COST_LIMIT)
        ));
    }
}

/// `celconfig.PerCallLimit`: the estimated cost one rule may have.
const PER_CALL_LIMIT: f64 = 1_000_000.0;
/// `StaticEstimatedCRDCostLimit`: the estimated cost of all rules of a CRD, each multiplied
/// by how many times it may run (the cardinality of its node).
const STATIC_ESTIMATED_CRD_COST_LIMIT: f64 = 100_000_000.0;
/// `MaxRequestSizeBytes`: bounds the size of lists and maps without maxItems/maxProperties.
const MAX_REQUEST_SIZE_BYTES: f64 = 3.0 * 1024.0 * 1024.0;

/// How many elements a list or map without a declared maximum can have in a request: the
/// request size over the smallest serialized element (`estimateMaxArrayItemsFromMinSize`).
fn unbounded_cardinality(element: &Node) -> f64 {
    let min_size = match element.ty.as_str() {
        "integer" | "number" => 2.0,
        "boolean" => 5.0,
        _ => 3.0,
    };
    (MAX_REQUEST_SIZE_BYTES / min_size).floor()
}

/// kube-cel's cost heuristic (`analysis::estimate_expr_cost`) as a number.
fn estimate_cost(e: &IdedExpr, schema: &kube_cel::CompiledSchema, depth: usize) -> f64 {
    const DEFAULT_MAX: f64 = 1000.0;
    if depth > 256 {
        return 1.0;
    }
    let max_items = || {
        schema.max_items.map(|m| m as f64).unwrap_or_else(|| {
            schema
                .properties
                .values()
                .find(|p| p.items.is_some())
                .map(|p| p.max_items.map(|m| m as f64).unwrap_or(DEFAULT_MAX))
                .unwrap_or(DEFAULT_MAX)
        })
    };
    let max_length = || {
        schema.max_length.map(|m| m as f64).unwrap_or_else(|| {
            schema.properties.values().find_map(|p| p.max_length).map(|m| m as f64).unwrap_or(DEFAULT_MAX)
        })
    };
    match &e.expr {
        Expr::Comprehension(c) => max_items() * estimate_cost(&c.loop_step, schema, depth + 1).max(1.0),
        Expr::Call(c) => {
            let target = c.target.as_ref().map_or(0.0, |t| estimate_cost(t, schema, depth + 1));
            let args: f64 = c.args.iter().map(|a| estimate_cost(a, schema, depth + 1)).sum();
            let traversal = matches!(
                c.func_name.as_str(),
                "contains"
                    | "startsWith"
                    | "endsWith"
                    | "matches"
                    | "find"
                    | "findAll"
                    | "replace"
                    | "split"
                    | "indexOf"
                    | "lastIndexOf"
            );
            1.0 + target + args + if traversal { (max_length() * 0.1).floor() } else { 0.0 }
        }
        Expr::Select(s) => 1.0 + estimate_cost(&s.operand, schema, depth + 1),
        Expr::List(l) => l.elements.iter().map(|x| estimate_cost(x, schema, depth + 1)).sum::<f64>().max(1.0),
        _ => 1.0,
    }
}

fn problems_at(
    node: &Node,
    path: &str,
    in_uncorrelatable: Option<&str>,
    cardinality: f64,
    total: &mut f64,
    out: &mut Vec<String>,
) {
    for (i, r) in node.rules.iter().enumerate() {
        let rp = format!("{path}.x-kubernetes-validations[{i}]");
        if let Some(m) = &r.malformed {
            out.push(format!("{rp}.rule: Required value: {m}"));
            continue;
        }
        if let Err(e) = &r.program {
            out.push(format!("{rp}.rule: Invalid value: {}: compilation failed: {e}", go_quote(&r.rule)));
            continue;
        }
        if let Some(Err(e)) = &r.message_program {
            out.push(format!(
                "{rp}.messageExpression: Invalid value: {}: messageExpression compilation failed: {e}",
                go_quote(&r.message_expression)
            ));
        }
        if r.message.trim().is_empty() && !r.message.is_empty() {
            out.push(format!(
                "{rp}.message: Invalid value: {}: message must be non-empty if specified",
                go_quote(&r.message)
            ));
        }
        if r.message.contains('\n') {
            out.push(format!(
                "{rp}.message: Invalid value: {}: message must not contain line breaks",
                go_quote(&r.message)
            ));
        }
        if let Some(reason) = &r.reason
            && !matches!(
                reason.as_str(),
                "FieldValueInvalid" | "FieldValueForbidden" | "FieldValueRequired" | "FieldValueDuplicate"
            )
        {
            out.push(format!(
                "{rp}.reason: Unsupported value: {}: supported values: \"FieldValueDuplicate\", \"FieldValueForbidden\", \"FieldValueInvalid\", \"FieldValueRequired\"",
                go_quote(reason)
            ));
        }
        if !r.field_path.is_empty()
            && let Err(e) = valid_field_path(&r.field_path, node)
        {
            out.push(format!("{rp}.fieldPath: Invalid value: {}: {e}", go_quote(&r.field_path)));
        }
        if r.optional_old_self && !r.uses_old_self {
            out.push(format!("{rp}.optionalOldSelf: Invalid value: true: may not be set if rule does not use oldSelf"));
        }
        if r.uses_old_self
            && let Some(at) = in_uncorrelatable
        {
            out.push(format!(
                "{rp}.rule: Invalid value: {}: oldSelf cannot be used on the uncorrelatable portion of the schema within {at}",
                go_quote(&r.rule)
            ));
        }
        let compiled_schema = kube_cel::compile_schema(&node.raw);
        if let Ok(p) = &r.program {
            let cost = estimate_cost(p.expression(), &compiled_schema, 0);
            *total += cost * cardinality;
            if cost > PER_CALL_LIMIT {
                out.push(format!(
                    "{rp}.rule: Forbidden: estimated rule cost exceeds budget by factor of {}x (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)",
                    super::errors::go_float_v(cost / PER_CALL_LIMIT)
                ));
                continue;
            }
        }
        // kube-cel's static analysis: scope and estimated cost. Its scope check counts the
        // variables of comprehensions (`all`, `filter`, ...) as free variables: ignore those.
        let bound = r.program.as_ref().map(|p| bound_variables(p.expression())).unwrap_or_default();
        for w in kube_cel::analyze_rule(&r.rule, &compiled_schema, kube_cel::ScopeContext::CrdValidation) {
            if w.kind == kube_cel::WarningKind::CostExceeded {
                // Reported above with the apiserver's wording.
                continue;
            }
            if w.kind == kube_cel::WarningKind::WrongScope
                && bound.iter().any(|v| w.message.starts_with(&format!("variable '{v}' ")))
            {
                continue;
            }
            out.push(format!("{rp}.rule: {}: {}", go_quote(&r.rule), w.message));
        }
    }
    for (k, p) in &node.properties {
        problems_at(p, &format!("{path}.properties[{k}]"), in_uncorrelatable, cardinality, total, out);
    }
    if let Some(a) = node.additional_schema() {
        let unc = if node.map_type.as_deref() == Some("atomic") { Some(path) } else { in_uncorrelatable };
        let card = cardinality * node.max_properties.map_or_else(|| unbounded_cardinality(a), |m| m.max(0) as f64);
        problems_at(a, &format!("{path}.additionalProperties"), unc, card, total, out);
    }
    if let Some(items) = &node.items {
        let unc = if node.list_type() != "map" { Some(path) } else { in_uncorrelatable };
        let card = cardinality * node.max_items.map_or_else(|| unbounded_cardinality(items), |m| m.max(0) as f64);
        problems_at(items, &format!("{path}.items"), unc.or(in_uncorrelatable), card, total, out);
    }
    for (i, a) in node.all_of.iter().enumerate() {
        problems_at(a, &format!("{path}.allOf[{i}]"), in_uncorrelatable, cardinality, total, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::errors::FieldErrorKind;

    #[test]
    fn escaping_like_the_apiserver() {
        assert_eq!(escape("namespace").as_deref(), Some("__namespace__"));
        assert_eq!(escape("a_b").as_deref(), Some("a_b"));
        assert_eq!(escape("a__b").as_deref(), Some("a__underscores__b"));
        assert_eq!(escape("x-y.z/w").as_deref(), Some("x__dash__y__dot__z__slash__w"));
        assert_eq!(escape("1abc"), None);
        assert_eq!(escape("a b"), None);
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert!(base64_decode("!!").is_none());
    }

    #[test]
    fn kinds() {
        let e = error_for_reason("x".into(), &Value::from("a"), "d".into(), Some("FieldValueDuplicate"));
        assert_eq!(e.kind, FieldErrorKind::Duplicate);
        assert_eq!(e.to_string(), "x: Duplicate value: \"a\"");
        // As kube-apiserver v1.36: a scalar is shown, an object or a list is not.
        let e = error_for_reason("x".into(), &Value::from("us-east"), "d".into(), None);
        assert_eq!(e.to_string(), "x: Invalid value: \"us-east\": d");
        let e = error_for_reason("x".into(), &Value::from(5), "d".into(), None);
        assert_eq!(e.to_string(), "x: Invalid value: 5: d");
        let e = error_for_reason("x".into(), &serde_json::json!({"a": 1}), "d".into(), None);
        assert_eq!(e.to_string(), "x: Invalid value: d");
        let e = error_for_reason("x".into(), &serde_json::json!([1]), "d".into(), None);
        assert_eq!(e.to_string(), "x: Invalid value: d");
    }
}
