//! Type and object metadata checks of the custom resource validator
//! (`registry/customresource/validator.go`, apimachinery `api/validation/objectmeta.go`).

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use super::errors::FieldError;

const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_LABEL_ERR: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_ERR: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";

static LABEL: LazyLock<Regex> = LazyLock::new(|| Regex::new(&format!("^{DNS1123_LABEL_FMT}$")).expect("static regex"));
static SUBDOMAIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{DNS1123_LABEL_FMT}(\\.{DNS1123_LABEL_FMT})*$")).expect("static regex"));

/// `validation.RegexError`.
fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    if examples.is_empty() {
        return format!("{msg} (regex used for validation is '{fmt}')");
    }
    let mut out = format!("{msg} (e.g. ");
    for (i, e) in examples.iter().enumerate() {
        if i > 0 {
            out.push_str(" or ");
        }
        out.push_str(&format!("'{e}', "));
    }
    out.push_str(&format!("regex used for validation is '{fmt}')"));
    out
}

/// `validation.IsDNS1123Subdomain`.
pub(crate) fn is_dns1123_subdomain(v: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if v.len() > 253 {
        errs.push("must be no more than 253 characters".to_string());
    }
    if !SUBDOMAIN.is_match(v) {
        let fmt = format!("{DNS1123_LABEL_FMT}(\\.{DNS1123_LABEL_FMT})*");
        errs.push(regex_error(DNS1123_SUBDOMAIN_ERR, &fmt, &["example.com"]));
    }
    errs
}

/// `validation.IsDNS1123Label`.
pub(crate) fn is_dns1123_label(v: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if v.len() > 63 {
        errs.push("must be no more than 63 characters".to_string());
    }
    if !LABEL.is_match(v) {
        if SUBDOMAIN.is_match(v) {
            errs.push("must not contain dots".to_string());
        } else {
            errs.push(regex_error(DNS1123_LABEL_ERR, DNS1123_LABEL_FMT, &["my-name", "123-abc"]));
        }
    }
    errs
}

const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_ERR: &str =
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const LABEL_VALUE_ERR: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

static QUALIFIED_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{QUALIFIED_NAME_FMT}$")).expect("static regex"));
static LABEL_VALUE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^({QUALIFIED_NAME_FMT})?$")).expect("static regex"));

/// `validation.IsQualifiedName`: label keys, annotation keys, finalizers.
pub(crate) fn is_qualified_name(v: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let parts: Vec<&str> = v.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_string());
            } else {
                errs.extend(is_dns1123_subdomain(prefix).into_iter().map(|m| format!("prefix part {m}")));
            }
            *name
        }
        _ => {
            errs.push(format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(QUALIFIED_NAME_ERR, QUALIFIED_NAME_FMT, &["MyName", "my.name", "123-abc"])
            ));
            return errs;
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".to_string());
    } else if name.len() > 63 {
        errs.push("name part must be no more than 63 characters".to_string());
    }
    if !QUALIFIED_NAME.is_match(name) {
        errs.push(format!(
            "name part {}",
            regex_error(QUALIFIED_NAME_ERR, QUALIFIED_NAME_FMT, &["MyName", "my.name", "123-abc"])
        ));
    }
    errs
}

/// `validation.IsValidLabelValue`.
pub(crate) fn is_valid_label_value(v: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if v.len() > 63 {
        errs.push("must be no more than 63 characters".to_string());
    }
    if !LABEL_VALUE.is_match(v) {
        errs.push(regex_error(LABEL_VALUE_ERR, &format!("({QUALIFIED_NAME_FMT})?"), &["MyValue", "my_value", "12345"]));
    }
    errs
}

/// `ValidateLabels`, `ValidateAnnotations` and the finalizer names (`ValidateFinalizerName`).
fn validate_labels_annotations_finalizers(meta: &Value, errs: &mut Vec<FieldError>) {
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            for msg in is_qualified_name(k) {
                errs.push(FieldError::invalid("metadata.labels", Value::String(k.clone()), msg));
            }
            let v = v.as_str().unwrap_or_default();
            for msg in is_valid_label_value(v) {
                errs.push(FieldError::invalid("metadata.labels", Value::String(v.to_string()), msg));
            }
        }
    }
    if let Some(annotations) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0usize;
        for (k, v) in annotations {
            for msg in is_qualified_name(&k.to_lowercase()) {
                errs.push(FieldError::invalid("metadata.annotations", Value::String(k.clone()), msg));
            }
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;
        if total > TOTAL_ANNOTATION_SIZE_LIMIT {
            errs.push(FieldError::too_long("metadata.annotations", TOTAL_ANNOTATION_SIZE_LIMIT as i64));
        }
    }
    if let Some(finalizers) = meta.get("finalizers").and_then(Value::as_array) {
        for f in finalizers.iter().filter_map(Value::as_str) {
            for msg in is_qualified_name(f) {
                errs.push(FieldError::invalid("metadata.finalizers", Value::String(f.to_string()), msg));
            }
        }
    }
}

/// `maskTrailingDash`: a generateName may end with a dash.
fn mask_trailing_dash(name: &str) -> String {
    if name.len() > 1 && name.ends_with('-') {
        // Go cuts bytes; a cut inside a character fails the regex either way.
        match name.get(..name.len() - 2) {
            Some(p) => format!("{p}a"),
            None => name.to_string(),
        }
    } else {
        name.to_string()
    }
}

fn str_field<'a>(meta: &'a Value, f: &str) -> &'a str {
    meta.get(f).and_then(Value::as_str).unwrap_or_default()
}

/// `ValidateTypeMeta`: `kind` and `apiVersion` must be the CRD's (checked when present).
pub(crate) fn validate_type_meta(obj: &Value, kind: &str, api_version: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(k) = obj.get("kind").and_then(Value::as_str)
        && k != kind
    {
        errs.push(FieldError::invalid("kind", Value::String(k.into()), format!("must be {kind}")));
    }
    if let Some(v) = obj.get("apiVersion").and_then(Value::as_str)
        && v != api_version
    {
        errs.push(FieldError::invalid("apiVersion", Value::String(v.into()), format!("must be {api_version}")));
    }
    errs
}

/// `ValidateObjectMetaAccessor` with `NameIsDNSSubdomain`: generateName, name, namespace,
/// labels, annotations, finalizer names.
pub(crate) fn validate_create(obj: &Value, namespaced: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let meta = obj.get("metadata").cloned().unwrap_or(Value::Null);
    if !meta.is_null() && !meta.is_object() {
        errs.push(FieldError::invalid("metadata", meta, "must be an object"));
        return errs;
    }
    let generate_name = str_field(&meta, "generateName");
    if !generate_name.is_empty() {
        for msg in is_dns1123_subdomain(&mask_trailing_dash(generate_name)) {
            errs.push(FieldError::invalid("metadata.generateName", Value::String(generate_name.into()), msg));
        }
    }
    let name = str_field(&meta, "name");
    if name.is_empty() {
        errs.push(FieldError::required("metadata.name", "name or generateName is required"));
    } else {
        for msg in is_dns1123_subdomain(name) {
            errs.push(FieldError::invalid("metadata.name", Value::String(name.into()), msg));
        }
    }
    let namespace = str_field(&meta, "namespace");
    if namespaced {
        if namespace.is_empty() {
            errs.push(FieldError::required("metadata.namespace", ""));
        } else {
            for msg in is_dns1123_label(namespace) {
                errs.push(FieldError::invalid("metadata.namespace", Value::String(namespace.into()), msg));
            }
        }
    } else if !namespace.is_empty() {
        errs.push(FieldError::forbidden("metadata.namespace", "not allowed on this type"));
    }
    validate_labels_annotations_finalizers(&meta, &mut errs);
    errs
}

/// The immutable-field checks of `ValidateObjectMetaAccessorUpdate` (name, namespace, uid;
/// an absent value counts as unchanged).
pub(crate) fn validate_update(obj: &Value, old: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let meta = obj.get("metadata").cloned().unwrap_or(Value::Null);
    let old_meta = old.get("metadata").cloned().unwrap_or(Value::Null);
    for f in ["name", "namespace", "uid"] {
        let new = str_field(&meta, f);
        let was = str_field(&old_meta, f);
        // An empty value is filled from the old object (`rest.BeforeUpdate`, request path).
        if !new.is_empty() && new != was {
            errs.push(FieldError::invalid(
                format!("metadata.{f}"),
                Value::String(new.to_string()),
                "field is immutable",
            ));
        }
    }
    validate_labels_annotations_finalizers(&meta, &mut errs);
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_messages() {
        assert_eq!(
            is_dns1123_subdomain("Bad_Name"),
            vec!["a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".to_string()]
        );
        assert_eq!(is_dns1123_label("a.b"), vec!["must not contain dots".to_string()]);
        assert!(is_dns1123_label("my-ns").is_empty());
        assert_eq!(
            is_dns1123_label("A"),
            vec!["a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".to_string()]
        );
        assert_eq!(mask_trailing_dash("abc-"), "aba");
        assert_eq!(mask_trailing_dash("é-"), "é-");
        assert!(is_qualified_name("ims.io/cleanup").is_empty());
        assert_eq!(
            is_qualified_name("a/b/c"),
            vec!["a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')".to_string()]
        );
        assert_eq!(
            is_valid_label_value("bad value"),
            vec!["a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".to_string()]
        );
    }
}
