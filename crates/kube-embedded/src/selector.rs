//! Label and field selectors, parsed and matched the way kube-apiserver does it.
//!
//! - [`LabelSelector`] follows `k8s.io/apimachinery/pkg/labels` (`labels.Parse`): the same lexer
//!   (whitespace tolerant, `in`/`notin` keywords, `!` for "does not exist", `>`/`<` for the
//!   integer comparisons), the same validation of keys and values, and the same error texts
//!   (`unable to parse requirement: ...`, `found 'x', expected: ...`).
//! - [`FieldSelector`] follows `k8s.io/apimachinery/pkg/fields` (`fields.ParseSelector`):
//!   comma separated `field=value`, `field==value` and `field!=value` terms, with `\,`, `\=` and
//!   `\\` escapes in values, and no trimming of whitespace (as the real parser).
//!
//! Query strings are expected already URL-decoded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::schema::go_quote;

use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Label selectors
// ---------------------------------------------------------------------------------------------

/// The operator of one label requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelOperator {
    /// `key=value`
    Equals,
    /// `key==value`
    DoubleEquals,
    /// `key!=value` (also matches objects without the label)
    NotEquals,
    /// `key in (a,b)`
    In,
    /// `key notin (a,b)` (also matches objects without the label)
    NotIn,
    /// `key`
    Exists,
    /// `!key`
    DoesNotExist,
    /// `key>1` (both sides integers)
    GreaterThan,
    /// `key<1` (both sides integers)
    LessThan,
}

/// One requirement of a label selector: a key, an operator and (sorted, deduplicated) values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelRequirement {
    key: String,
    operator: LabelOperator,
    values: Vec<String>,
}

impl LabelRequirement {
    /// The label key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operator.
    pub fn operator(&self) -> LabelOperator {
        self.operator
    }

    /// The values (sorted and deduplicated, as `sets.String.List()` gives them).
    pub fn values(&self) -> &[String] {
        &self.values
    }

    /// Whether `labels` satisfy this requirement (same rules as `labels.Requirement.Matches`).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let has_value = |v: &str| self.values.iter().any(|x| x == v);
        match self.operator {
            LabelOperator::Equals | LabelOperator::DoubleEquals | LabelOperator::In => {
                labels.get(&self.key).is_some_and(|v| has_value(v))
            }
            LabelOperator::NotEquals | LabelOperator::NotIn => labels.get(&self.key).is_none_or(|v| !has_value(v)),
            LabelOperator::Exists => labels.contains_key(&self.key),
            LabelOperator::DoesNotExist => !labels.contains_key(&self.key),
            LabelOperator::GreaterThan | LabelOperator::LessThan => {
                let Some(actual) = labels.get(&self.key).and_then(|v| v.parse::<i64>().ok()) else {
                    return false;
                };
                let [wanted] = self.values.as_slice() else {
                    return false;
                };
                let Ok(wanted) = wanted.parse::<i64>() else {
                    return false;
                };
                if self.operator == LabelOperator::GreaterThan { actual > wanted } else { actual < wanted }
            }
        }
    }
}

impl fmt::Display for LabelRequirement {
    /// The canonical text of the requirement, as `labels.Requirement.String()` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.operator == LabelOperator::DoesNotExist {
            f.write_str("!")?;
        }
        f.write_str(&self.key)?;
        let op = match self.operator {
            LabelOperator::Exists | LabelOperator::DoesNotExist => return Ok(()),
            LabelOperator::Equals => "=",
            LabelOperator::DoubleEquals => "==",
            LabelOperator::NotEquals => "!=",
            LabelOperator::In => " in ",
            LabelOperator::NotIn => " notin ",
            LabelOperator::GreaterThan => ">",
            LabelOperator::LessThan => "<",
        };
        f.write_str(op)?;
        let set = matches!(self.operator, LabelOperator::In | LabelOperator::NotIn);
        if set {
            f.write_str("(")?;
        }
        f.write_str(&self.values.join(","))?;
        if set {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// A parsed label selector (`?labelSelector=`): the AND of its requirements.
///
/// The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

impl LabelSelector {
    /// Parses a selector as `labels.Parse` does.
    ///
    /// Accepts `""`, `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`, `a>1`, `a<1`,
    /// comma separated, with blanks anywhere between tokens. Keys and values are validated like
    /// kube-apiserver validates them; errors carry the apiserver's text, for example
    /// `unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parser = Parser::new(s);
        let mut requirements = parser.parse()?;
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Self { requirements })
    }

    /// Whether the labels satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether the labels found at `metadata.labels` of a JSON object satisfy the selector
    /// (non-string label values are ignored).
    pub fn matches_object(&self, obj: &Value) -> bool {
        let labels: BTreeMap<String, String> = obj
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))).collect())
            .unwrap_or_default();
        self.matches(&labels)
    }

    /// Whether the selector has no requirement (matches everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, sorted by key.
    pub fn requirements(&self) -> &[LabelRequirement] {
        &self.requirements
    }
}

impl fmt::Display for LabelSelector {
    /// The canonical text, as `labels.Selector.String()` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Error,
    EndOfString,
    ClosedPar,
    Comma,
    DoesNotExist,
    DoubleEquals,
    Equals,
    GreaterThan,
    Identifier,
    In,
    LessThan,
    NotEquals,
    NotIn,
    OpenPar,
}

fn literal_token(s: &[u8]) -> Option<Token> {
    Some(match s {
        b")" => Token::ClosedPar,
        b"," => Token::Comma,
        b"!" => Token::DoesNotExist,
        b"==" => Token::DoubleEquals,
        b"=" => Token::Equals,
        b">" => Token::GreaterThan,
        b"in" => Token::In,
        b"<" => Token::LessThan,
        b"!=" => Token::NotEquals,
        b"notin" => Token::NotIn,
        b"(" => Token::OpenPar,
        _ => return None,
    })
}

fn is_whitespace(ch: u8) -> bool {
    matches!(ch, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_special_symbol(ch: u8) -> bool {
    matches!(ch, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// The byte lexer of `labels.Lexer` (a NUL byte ends the input, as there).
struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Lexer<'_> {
    fn read(&mut self) -> u8 {
        match self.s.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                b
            }
            None => 0,
        }
    }

    fn unread(&mut self) {
        self.pos = self.pos.saturating_sub(1);
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn scan_id_or_keyword(&mut self) -> (Token, String) {
        let start = self.pos;
        let mut end = start;
        loop {
            let ch = self.read();
            if ch == 0 {
                break;
            }
            if is_special_symbol(ch) || is_whitespace(ch) {
                self.unread();
                break;
            }
            end = self.pos;
        }
        let bytes = self.s.get(start..end).unwrap_or_default();
        match literal_token(bytes) {
            Some(tok) => (tok, Self::text(bytes)),
            None => (Token::Identifier, Self::text(bytes)),
        }
    }

    fn scan_special_symbol(&mut self) -> (Token, String) {
        let mut buffer: Vec<u8> = Vec::new();
        let mut last: Option<(Token, String)> = None;
        loop {
            let ch = self.read();
            if ch == 0 {
                break;
            }
            if is_special_symbol(ch) {
                buffer.push(ch);
                if let Some(tok) = literal_token(&buffer) {
                    last = Some((tok, Self::text(&buffer)));
                } else if last.is_some() {
                    self.unread();
                    break;
                }
            } else {
                self.unread();
                break;
            }
        }
        match last {
            Some(item) => item,
            None => (Token::Error, format!("error expected: keyword found '{}'", Self::text(&buffer))),
        }
    }

    fn lex(&mut self) -> (Token, String) {
        let mut ch = self.read();
        while is_whitespace(ch) {
            ch = self.read();
        }
        if ch == 0 {
            return (Token::EndOfString, String::new());
        }
        self.unread();
        if is_special_symbol(ch) { self.scan_special_symbol() } else { self.scan_id_or_keyword() }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    KeyAndOperator,
    Values,
}

/// The recursive-descent parser of `labels.Parser`.
struct Parser {
    items: Vec<(Token, String)>,
    position: usize,
}

impl Parser {
    fn new(s: &str) -> Self {
        let mut lexer = Lexer { s: s.as_bytes(), pos: 0 };
        let mut items = Vec::new();
        loop {
            let (tok, lit) = lexer.lex();
            items.push((tok, lit));
            if tok == Token::EndOfString {
                break;
            }
        }
        Self { items, position: 0 }
    }

    fn item(&self, context: Context) -> (Token, String) {
        let (tok, lit) = self.items.get(self.position).cloned().unwrap_or((Token::EndOfString, String::new()));
        let tok = match (context, tok) {
            (Context::Values, Token::In | Token::NotIn) => Token::Identifier,
            _ => tok,
        };
        (tok, lit)
    }

    fn lookahead(&self, context: Context) -> (Token, String) {
        self.item(context)
    }

    fn consume(&mut self, context: Context) -> (Token, String) {
        let item = self.item(context);
        if self.position < self.items.len() {
            self.position += 1;
        }
        item
    }

    fn parse(&mut self) -> Result<Vec<LabelRequirement>, String> {
        let mut requirements = Vec::new();
        loop {
            let (tok, lit) = self.lookahead(Context::Values);
            match tok {
                Token::Identifier | Token::DoesNotExist => {
                    let r = self.parse_requirement().map_err(|e| format!("unable to parse requirement: {e}"))?;
                    requirements.push(r);
                    let (t, l) = self.consume(Context::Values);
                    match t {
                        Token::EndOfString => return Ok(requirements),
                        Token::Comma => {
                            let (t2, l2) = self.lookahead(Context::Values);
                            if t2 != Token::Identifier && t2 != Token::DoesNotExist {
                                return Err(format!("found '{l2}', expected: identifier after ','"));
                            }
                        }
                        _ => return Err(format!("found '{l}', expected: ',' or 'end of string'")),
                    }
                }
                Token::EndOfString => return Ok(requirements),
                _ => return Err(format!("found '{lit}', expected: !, identifier, or 'end of string'")),
            }
        }
    }

    fn parse_requirement(&mut self) -> Result<LabelRequirement, String> {
        let (key, inferred) = self.parse_key_and_infer_operator()?;
        if let Some(op) = inferred {
            return new_requirement(key, op, Vec::new());
        }
        let op = self.parse_operator()?;
        let values = match op {
            LabelOperator::In | LabelOperator::NotIn => self.parse_values()?,
            _ => self.parse_exact_value()?,
        };
        new_requirement(key, op, values.into_iter().collect())
    }

    fn parse_key_and_infer_operator(&mut self) -> Result<(String, Option<LabelOperator>), String> {
        let mut operator = None;
        let (mut tok, mut literal) = self.consume(Context::Values);
        if tok == Token::DoesNotExist {
            operator = Some(LabelOperator::DoesNotExist);
            (tok, literal) = self.consume(Context::Values);
        }
        if tok != Token::Identifier {
            return Err(format!("found '{literal}', expected: identifier"));
        }
        let errs = label_key_errors(&literal);
        if !errs.is_empty() {
            return Err(invalid_value("<nil>", &literal, &errs.join("; ")));
        }
        let (t, _) = self.lookahead(Context::Values);
        if (t == Token::EndOfString || t == Token::Comma) && operator != Some(LabelOperator::DoesNotExist) {
            operator = Some(LabelOperator::Exists);
        }
        Ok((literal, operator))
    }

    fn parse_operator(&mut self) -> Result<LabelOperator, String> {
        let (tok, lit) = self.consume(Context::KeyAndOperator);
        Ok(match tok {
            Token::In => LabelOperator::In,
            Token::Equals => LabelOperator::Equals,
            Token::DoubleEquals => LabelOperator::DoubleEquals,
            Token::GreaterThan => LabelOperator::GreaterThan,
            Token::LessThan => LabelOperator::LessThan,
            Token::NotIn => LabelOperator::NotIn,
            Token::NotEquals => LabelOperator::NotEquals,
            _ => return Err(format!("found '{lit}', expected: in, notin, =, ==, !=, gt, lt")),
        })
    }

    fn parse_values(&mut self) -> Result<BTreeSet<String>, String> {
        let (tok, lit) = self.consume(Context::Values);
        if tok != Token::OpenPar {
            return Err(format!("found '{lit}' expected: '('"));
        }
        let (tok, lit) = self.lookahead(Context::Values);
        match tok {
            Token::Identifier | Token::Comma => {
                let s = self.parse_identifiers_list()?;
                let (tok, _) = self.consume(Context::Values);
                if tok != Token::ClosedPar {
                    return Err(format!("found '{lit}', expected: ')'"));
                }
                Ok(s)
            }
            Token::ClosedPar => {
                self.consume(Context::Values);
                Ok(BTreeSet::from([String::new()]))
            }
            _ => Err(format!("found '{lit}', expected: ',', ')' or identifier")),
        }
    }

    fn parse_identifiers_list(&mut self) -> Result<BTreeSet<String>, String> {
        let mut s = BTreeSet::new();
        loop {
            let (tok, lit) = self.consume(Context::Values);
            match tok {
                Token::Identifier => {
                    s.insert(lit);
                    let (tok2, lit2) = self.lookahead(Context::Values);
                    match tok2 {
                        Token::Comma => continue,
                        Token::ClosedPar => return Ok(s),
                        _ => return Err(format!("found '{lit2}', expected: ',' or ')'")),
                    }
                }
                Token::Comma => {
                    if s.is_empty() {
                        s.insert(String::new());
                    }
                    let (tok2, _) = self.lookahead(Context::Values);
                    if tok2 == Token::ClosedPar {
                        s.insert(String::new());
                        return Ok(s);
                    }
                    if tok2 == Token::Comma {
                        s.insert(String::new());
                    }
                }
                _ => return Err(format!("found '{lit}', expected: ',', or identifier")),
            }
        }
    }

    fn parse_exact_value(&mut self) -> Result<BTreeSet<String>, String> {
        let (tok, _) = self.lookahead(Context::Values);
        if tok == Token::EndOfString || tok == Token::Comma {
            return Ok(BTreeSet::from([String::new()]));
        }
        let (tok, lit) = self.consume(Context::Values);
        if tok == Token::Identifier {
            Ok(BTreeSet::from([lit]))
        } else {
            Err(format!("found '{lit}', expected: identifier"))
        }
    }
}

/// `labels.NewRequirement` for what the parser can produce: values are validated (integers for
/// `>`/`<`, label-value syntax for all), errors aggregated like `field.ErrorList.ToAggregate()`.
fn new_requirement(key: String, operator: LabelOperator, values: Vec<String>) -> Result<LabelRequirement, String> {
    let mut errs: Vec<String> = Vec::new();
    let key_errs = label_key_errors(&key);
    if !key_errs.is_empty() {
        errs.push(invalid_value("key", &key, &key_errs.join("; ")));
    }
    if matches!(operator, LabelOperator::GreaterThan | LabelOperator::LessThan) {
        if values.len() != 1 {
            errs.push(format!(
                "values: Invalid value: {values:?}: for 'Gt', 'Lt' operators, exactly one value is required"
            ));
        }
        for (i, v) in values.iter().enumerate() {
            if v.parse::<i64>().is_err() {
                errs.push(invalid_value(
                    &format!("values[{i}]"),
                    v,
                    "for 'Gt', 'Lt' operators, the value must be an integer",
                ));
            }
        }
    }
    for (i, v) in values.iter().enumerate() {
        let value_errs = label_value_errors(v);
        if !value_errs.is_empty() {
            errs.push(invalid_value(&format!("values[{i}][{key}]"), v, &value_errs.join("; ")));
        }
    }
    if errs.is_empty() { Ok(LabelRequirement { key, operator, values }) } else { Err(aggregate(errs)) }
}

fn invalid_value(field: &str, value: &str, detail: &str) -> String {
    format!("{field}: Invalid value: {}: {detail}", go_quote(value))
}

/// `utilerrors.NewAggregate(...).Error()`: one message as is, several deduplicated in brackets.
fn aggregate(errs: Vec<String>) -> String {
    let mut seen = BTreeSet::new();
    let unique: Vec<String> = errs.into_iter().filter(|e| seen.insert(e.clone())).collect();
    match unique.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    }
}

const LABEL_KEY_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const LABEL_KEY_ERR: &str =
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_ERR: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_ERR: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";

/// `content.RegexError`.
fn regex_error(msg: &str, re: &str, examples: &[&str]) -> String {
    let mut out = msg.to_owned();
    if examples.is_empty() {
        out.push_str(&format!(" (regex used for validation is '{re}')"));
        return out;
    }
    out.push_str(" (e.g. ");
    for (i, ex) in examples.iter().enumerate() {
        if i > 0 {
            out.push_str(" or ");
        }
        out.push_str(&format!("'{ex}', "));
    }
    out.push_str(&format!("regex used for validation is '{re}')"));
    out
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`
fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`
fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            match (b.first(), b.last()) {
                (Some(first), Some(last)) => {
                    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
                    alnum(first) && alnum(last) && b.iter().all(|c| alnum(c) || *c == b'-')
                }
                _ => false,
            }
        })
}

/// `content.IsLabelKey` (a qualified name with an optional DNS subdomain prefix).
fn label_key_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_owned());
            } else {
                if prefix.len() > 253 {
                    errs.push("prefix part must be no more than 253 bytes".to_owned());
                }
                if !is_dns1123_subdomain(prefix) {
                    errs.push(format!(
                        "prefix part {}",
                        regex_error(DNS1123_SUBDOMAIN_ERR, DNS1123_SUBDOMAIN_FMT, &["example.com"])
                    ));
                }
            }
            *name
        }
        _ => {
            return vec![format!(
                "a valid label key {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(LABEL_KEY_ERR, LABEL_KEY_FMT, &["MyName", "my.name", "123-abc"])
            )];
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        errs.push("name part must be no more than 63 bytes".to_owned());
    }
    if !is_label_name(name) {
        errs.push(format!(
            "name part {}",
            regex_error(LABEL_KEY_ERR, LABEL_KEY_FMT, &["MyName", "my.name", "123-abc"])
        ));
    }
    errs
}

/// `content.IsLabelValue`.
fn label_value_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > 63 {
        errs.push("must be no more than 63 bytes".to_owned());
    }
    if !value.is_empty() && !is_label_name(value) {
        errs.push(regex_error(LABEL_VALUE_ERR, LABEL_VALUE_FMT, &["MyValue", "my_value", "12345"]));
    }
    errs
}

// ---------------------------------------------------------------------------------------------
// Field selectors
// ---------------------------------------------------------------------------------------------

/// One term of a field selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldRequirement {
    field: String,
    value: String,
    negated: bool,
}

impl FieldRequirement {
    /// The field path, e.g. `metadata.name`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The (unescaped) value.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// `true` for `!=`, `false` for `=` and `==`.
    pub fn is_negated(&self) -> bool {
        self.negated
    }
}

/// A parsed field selector (`?fieldSelector=`): the AND of its terms.
///
/// The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// Parses a selector as `fields.ParseSelector` does: comma separated `f=v`, `f==v`, `f!=v`
    /// terms (sorted; empty terms skipped), values unescaped (`\\`, `\,`, `\=`).
    ///
    /// Errors carry the apiserver's text, e.g. `invalid selector: 'x'; can't understand 'x'`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = split_terms(s);
        parts.sort();
        let mut terms = Vec::new();
        for part in parts {
            if part.is_empty() {
                continue;
            }
            let Some((lhs, op, rhs)) = split_term(part) else {
                return Err(format!("invalid selector: '{s}'; can't understand '{part}'"));
            };
            let value = unescape_value(rhs)?;
            terms.push(FieldRequirement { field: lhs.to_owned(), value, negated: op == "!=" });
        }
        Ok(Self { terms })
    }

    /// Whether a JSON object satisfies every term.
    ///
    /// The field is looked up as a dotted path (`metadata.name`, `spec.region`); strings compare as
    /// is, numbers and booleans by their JSON text, and a missing field (or `null`, object, list)
    /// reads as the empty string, as `fields.Set.Get` gives `""` for absent fields.
    pub fn matches(&self, obj: &Value) -> bool {
        self.terms.iter().all(|t| {
            let actual = field_value(obj, &t.field);
            if t.negated { actual != t.value } else { actual == t.value }
        })
    }

    /// Refuses fields other than `supported`, with the apiserver's text for custom resources:
    /// `field label not supported: spec.foo` (the first offending term in sorted order).
    pub fn check_supported(&self, supported: &[&str]) -> Result<(), String> {
        match self.terms.iter().find(|t| !supported.contains(&t.field.as_str())) {
            Some(t) => Err(format!("field label not supported: {}", t.field)),
            None => Ok(()),
        }
    }

    /// The value an `=`/`==` term requires for `field`, if any (`fields.Selector.RequiresExactMatch`).
    pub fn requires_exact_match(&self, field: &str) -> Option<&str> {
        self.terms.iter().find(|t| !t.negated && t.field == field).map(|t| t.value.as_str())
    }

    /// Whether the selector has no term (matches everything).
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The terms, in sorted order.
    pub fn requirements(&self) -> &[FieldRequirement] {
        &self.terms
    }
}

impl fmt::Display for FieldSelector {
    /// The canonical text, as `fields.Selector.String()` prints it (values unescaped).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}{}{}", t.field, if t.negated { "!=" } else { "=" }, t.value)?;
        }
        Ok(())
    }
}

fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(next) => cur = next,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

/// `fields.splitTerms`: splits on commas that are not backslash-escaped.
fn split_terms(s: &str) -> Vec<&str> {
    if s.is_empty() {
        return Vec::new();
    }
    let mut terms = Vec::new();
    let mut start = 0;
    let mut in_slash = false;
    for (i, c) in s.char_indices() {
        if in_slash {
            in_slash = false;
        } else if c == '\\' {
            in_slash = true;
        } else if c == ',' {
            terms.push(s.get(start..i).unwrap_or_default());
            start = i + 1;
        }
    }
    terms.push(s.get(start..).unwrap_or_default());
    terms
}

/// `fields.splitTerm`: the first `!=`, `==` or `=` splits the term.
fn split_term(term: &str) -> Option<(&str, &'static str, &str)> {
    for (i, _) in term.char_indices() {
        let rest = term.get(i..).unwrap_or_default();
        for op in ["!=", "==", "="] {
            if rest.starts_with(op) {
                return Some((term.get(..i).unwrap_or_default(), op, rest.get(op.len()..).unwrap_or_default()));
            }
        }
    }
    None
}

/// `fields.UnescapeValue`.
fn unescape_value(s: &str) -> Result<String, String> {
    if !s.contains(['\\', ',', '=']) {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut in_slash = false;
    for c in s.chars() {
        if in_slash {
            match c {
                '\\' | ',' | '=' => out.push(c),
                _ => return Err(format!("invalid field selector: invalid escape sequence: \\{c}")),
            }
            in_slash = false;
            continue;
        }
        match c {
            '\\' => in_slash = true,
            ',' | '=' => return Err(format!("invalid field selector: unescaped character in value: {}", c as u32)),
            _ => out.push(c),
        }
    }
    if in_slash {
        return Err("invalid field selector: invalid escape sequence: \\".to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn sel(s: &str) -> LabelSelector {
        match LabelSelector::parse(s) {
            Ok(sel) => sel,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn err(s: &str) -> String {
        match LabelSelector::parse(s) {
            Ok(sel) => panic!("{s:?} should not parse, got {sel:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = sel("");
        assert!(s.is_empty());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
        assert!(sel("   ").is_empty());
    }

    #[test]
    fn equality_operators() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(sel("app=web").matches(&l));
        assert!(sel("app==web").matches(&l));
        assert!(!sel("app=db").matches(&l));
        assert!(sel("app!=db").matches(&l));
        assert!(!sel("app!=web").matches(&l));
        // != matches objects without the label
        assert!(sel("missing!=x").matches(&l));
        assert!(!sel("missing=x").matches(&l));
        assert!(sel("app=web,tier=front").matches(&l));
        assert!(!sel("app=web,tier=back").matches(&l));
    }

    #[test]
    fn set_operators() {
        let l = labels(&[("env", "prod")]);
        assert!(sel("env in (prod,staging)").matches(&l));
        assert!(sel("env in (staging, prod)").matches(&l));
        assert!(!sel("env in (dev)").matches(&l));
        assert!(sel("env notin (dev)").matches(&l));
        assert!(!sel("env notin (prod)").matches(&l));
        assert!(sel("other notin (prod)").matches(&l));
        assert!(!sel("other in (prod)").matches(&l));
        // empty value sets
        assert!(sel("env notin ()").matches(&l));
        assert!(sel("x in (,a)").matches(&labels(&[("x", "")])));
        assert_eq!(sel("x in (b,a,,a)").requirements()[0].values(), ["", "a", "b"]);
    }

    #[test]
    fn existence_operators() {
        let l = labels(&[("app", "web")]);
        assert!(sel("app").matches(&l));
        assert!(!sel("db").matches(&l));
        assert!(sel("!db").matches(&l));
        assert!(!sel("!app").matches(&l));
        assert!(sel("app,!db").matches(&l));
        assert!(sel(" app , ! db ").matches(&l));
    }

    #[test]
    fn integer_comparisons() {
        let l = labels(&[("n", "5")]);
        assert!(sel("n>3").matches(&l));
        assert!(!sel("n>5").matches(&l));
        assert!(sel("n<6").matches(&l));
        assert!(!sel("m<6").matches(&l));
        assert!(!sel("n>3").matches(&labels(&[("n", "x")])));
        assert_eq!(
            err("n>x"),
            "unable to parse requirement: values[0]: Invalid value: \"x\": for 'Gt', 'Lt' operators, the value must be an integer"
        );
    }

    #[test]
    fn whitespace_and_keywords_as_values() {
        let l = labels(&[("in", "notin")]);
        assert!(sel("in = notin").matches(&l));
        assert!(sel("in in (in, notin)").matches(&l));
        assert!(sel("\tin\n==\rnotin").matches(&l));
        let p = labels(&[("example.com/app", "a.b-c_d")]);
        assert!(sel("example.com/app=a.b-c_d").matches(&p));
    }

    #[test]
    fn empty_exact_value() {
        assert!(sel("a=").matches(&labels(&[("a", "")])));
        assert!(!sel("a=").matches(&labels(&[])));
        assert!(sel("a=,b").matches(&labels(&[("a", ""), ("b", "x")])));
    }

    #[test]
    fn syntax_errors_have_apiserver_text() {
        assert_eq!(err("a b"), "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt");
        assert_eq!(err("a=b c"), "found 'c', expected: ',' or 'end of string'");
        assert_eq!(err("a=b,"), "found '', expected: identifier after ','");
        assert_eq!(err(",a"), "found ',', expected: !, identifier, or 'end of string'");
        assert_eq!(err("=a"), "found '=', expected: !, identifier, or 'end of string'");
        assert_eq!(err("!"), "unable to parse requirement: found '', expected: identifier");
        assert_eq!(err("a in"), "unable to parse requirement: found '' expected: '('");
        assert_eq!(err("a in (b"), "unable to parse requirement: found '', expected: ',' or ')'");
        assert_eq!(err("a in (="), "unable to parse requirement: found '=', expected: ',', ')' or identifier");
        assert_eq!(err("a in (b,="), "unable to parse requirement: found '=', expected: ',', or identifier");
        assert!(sel("a==").matches(&labels(&[("a", "")])));
        assert_eq!(err("a=(b)"), "unable to parse requirement: found '(', expected: identifier");
        assert_eq!(err("!a=b"), "found '=', expected: ',' or 'end of string'");
    }

    #[test]
    fn invalid_keys_and_values() {
        let name_re = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
        assert_eq!(err("-a=b"), format!("unable to parse requirement: <nil>: Invalid value: \"-a\": {name_re}"));
        assert_eq!(
            err("a/=b"),
            format!(
                "unable to parse requirement: <nil>: Invalid value: \"a/\": name part must be non-empty; {name_re}"
            )
        );
        assert_eq!(
            err("a/b/c"),
            "unable to parse requirement: <nil>: Invalid value: \"a/b/c\": a valid label key must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        );
        assert!(err("Example.com/a").starts_with(
            "unable to parse requirement: <nil>: Invalid value: \"Example.com/a\": prefix part a lowercase RFC 1123 subdomain"
        ));
        assert!(err(&format!("{}=b", "a".repeat(64))).contains("name part must be no more than 63 bytes"));
        assert_eq!(
            err("a=-b"),
            "unable to parse requirement: values[0][a]: Invalid value: \"-b\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        );
        assert!(err(&format!("a={}", "b".repeat(64))).contains("must be no more than 63 bytes"));
        // several invalid values aggregate in brackets, in sorted value order
        let e = err("a in (-x,-y)");
        assert!(e.starts_with("unable to parse requirement: [values[0][a]: Invalid value: \"-x\""), "{e}");
        assert!(e.contains(", values[1][a]: Invalid value: \"-y\""), "{e}");
    }

    #[test]
    fn never_panics_on_garbage() {
        let inputs = [
            "(((",
            ")))",
            "!!!",
            "a!!=b",
            "a in ((b))",
            "a notin",
            "\u{0}",
            "a=\u{0}b",
            "é=ü",
            "a=b,,c",
            "a<>b",
            "a>=1",
            ",",
            "in",
            "notin",
            "!in",
            "a in (b c)",
            "a in (,,)",
            "a = = b",
            "🙂",
            "a=🙂",
            "\\",
            "a\u{0}=b",
        ];
        for input in inputs {
            let _ = LabelSelector::parse(input);
        }
        assert!(sel("in").matches(&labels(&[("in", "x")])));
        assert!(sel("a in (,,)").matches(&labels(&[("a", "")])));
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(sel("b in (y,x), a!=1, !c, d").to_string(), "a!=1,b in (x,y),!c,d");
    }

    #[test]
    fn matches_object_reads_metadata_labels() {
        let obj = json!({"metadata": {"labels": {"app": "web", "n": 3}}});
        assert!(sel("app=web").matches_object(&obj));
        assert!(!sel("n").matches_object(&obj));
        assert!(sel("!app").matches_object(&json!({})));
    }

    fn fsel(s: &str) -> FieldSelector {
        match FieldSelector::parse(s) {
            Ok(sel) => sel,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    #[test]
    fn field_selector_matching() {
        let obj = json!({"metadata": {"name": "img-1", "namespace": "tenant-a"}, "spec": {"size": 10, "ok": true}});
        assert!(fsel("").matches(&obj));
        assert!(fsel("metadata.name=img-1").matches(&obj));
        assert!(fsel("metadata.name==img-1").matches(&obj));
        assert!(!fsel("metadata.name=img-2").matches(&obj));
        assert!(fsel("metadata.namespace!=tenant-b").matches(&obj));
        assert!(!fsel("metadata.namespace!=tenant-a").matches(&obj));
        assert!(fsel("metadata.name=img-1,metadata.namespace=tenant-a").matches(&obj));
        assert!(!fsel("metadata.name=img-1,metadata.namespace=tenant-b").matches(&obj));
        assert!(fsel("spec.size=10,spec.ok=true").matches(&obj));
        // absent fields read as ""
        assert!(fsel("metadata.namespace=").matches(&json!({"metadata": {"name": "x"}})));
        assert!(fsel("metadata.namespace!=x").matches(&json!({})));
        assert!(fsel(",metadata.name=img-1,").matches(&obj));
    }

    #[test]
    fn field_selector_escapes_and_errors() {
        let obj = json!({"metadata": {"name": "a,b=c\\d"}});
        assert!(fsel("metadata.name=a\\,b\\=c\\\\d").matches(&obj));
        assert_eq!(
            FieldSelector::parse("metadata.name").unwrap_err(),
            "invalid selector: 'metadata.name'; can't understand 'metadata.name'"
        );
        assert_eq!(FieldSelector::parse("a=b,c").unwrap_err(), "invalid selector: 'a=b,c'; can't understand 'c'");
        assert_eq!(FieldSelector::parse("a=b\\x").unwrap_err(), "invalid field selector: invalid escape sequence: \\x");
        assert_eq!(FieldSelector::parse("a=b\\").unwrap_err(), "invalid field selector: invalid escape sequence: \\");
        assert_eq!(
            FieldSelector::parse("a=b=c").unwrap_err(),
            "invalid field selector: unescaped character in value: 61"
        );
        // `==` wins over `=`, `!=` over both
        assert_eq!(fsel("a==b").requirements()[0].value(), "b");
        assert!(fsel("a!=b").requirements()[0].is_negated());
        assert_eq!(
            FieldSelector::parse("a!==b").unwrap_err(),
            "invalid field selector: unescaped character in value: 61"
        );
    }

    #[test]
    fn field_selector_supported_fields() {
        let supported = ["metadata.name", "metadata.namespace"];
        assert!(fsel("metadata.name=a,metadata.namespace!=b").check_supported(&supported).is_ok());
        assert_eq!(
            fsel("metadata.name=a,spec.foo=b").check_supported(&supported).unwrap_err(),
            "field label not supported: spec.foo"
        );
        // no whitespace trimming, as the real parser
        assert_eq!(
            fsel("metadata.name = a").check_supported(&supported).unwrap_err(),
            "field label not supported: metadata.name "
        );
        assert_eq!(fsel("metadata.name=a").requires_exact_match("metadata.name"), Some("a"));
        assert_eq!(fsel("metadata.name!=a").requires_exact_match("metadata.name"), None);
        assert_eq!(fsel("b=1,a!=2").to_string(), "a!=2,b=1");
    }

    #[test]
    fn field_selector_never_panics() {
        for input in ["=", "!=", "==", ",,,", "\\", "é=ü", "a=\u{0}", "🙂=🙂", "a\\,b=c", "=\\="] {
            if let Ok(s) = FieldSelector::parse(input) {
                let _ = s.matches(&json!({"a": [1]}));
                let _ = s.check_supported(&[]);
            }
        }
    }
}
