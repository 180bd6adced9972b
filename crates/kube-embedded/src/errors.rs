//! API errors as kube-apiserver writes them: a `Status` object with code, reason and details.

use serde_json::{Value, json};

use super::registry::Kind;
use crate::schema::{FieldError, invalid_message};

/// A failed request.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `Status.reason`.
    pub reason: &'static str,
    /// `Status.message`.
    pub message: String,
    /// `Status.details`.
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: None }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// 404 for an object.
    pub fn not_found(kind: &Kind, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", kind.qualified()))
            .with_details(json!({"name": name, "group": kind.group, "kind": kind.plural}))
    }

    /// 413 for a request body above [`crate::MAX_REQUEST_BODY_BYTES`], as kube-apiserver answers it.
    pub fn body_too_large() -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {}", crate::MAX_REQUEST_BODY_BYTES),
        )
        .with_details(json!({}))
    }

    /// 404 for a path that names nothing.
    pub fn no_route() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource").with_details(json!({}))
    }

    /// 409 on create of an existing name.
    pub fn already_exists(kind: &Kind, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", kind.qualified()))
            .with_details(json!({"name": name, "group": kind.group, "kind": kind.plural}))
    }

    /// 409 on a stale resourceVersion or a failed precondition.
    pub fn conflict(kind: &Kind, name: &str, why: &str) -> Self {
        Self::new(409, "Conflict", format!("Operation cannot be fulfilled on {} \"{name}\": {why}", kind.qualified()))
            .with_details(json!({"name": name, "group": kind.group, "kind": kind.plural}))
    }

    /// The stale-resourceVersion conflict.
    pub fn stale(kind: &Kind, name: &str) -> Self {
        Self::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 with field causes.
    pub fn invalid(kind: &Kind, name: &str, errors: &[FieldError]) -> Self {
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| {
                let text = e.to_string();
                let body = text.strip_prefix(&format!("{}: ", e.field)).unwrap_or(&text).to_string();
                json!({"reason": e.kind.reason(), "message": body, "field": e.field})
            })
            .collect();
        Self::new(422, "Invalid", invalid_message(&kind.kind, &kind.group, name, errors))
            .with_details(json!({"name": name, "group": kind.group, "kind": kind.kind, "causes": causes}))
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 403.
    pub fn forbidden(kind: &Kind, name: &str, why: &str) -> Self {
        Self::new(403, "Forbidden", format!("{} \"{name}\" is forbidden: {why}", kind.qualified()))
            .with_details(json!({"name": name, "group": kind.group, "kind": kind.plural}))
    }

    /// 405.
    pub fn method_not_allowed() -> Self {
        Self::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
    }

    /// 415, naming the media types this request accepts.
    pub fn unsupported_media_type(content_type: &str, accepted: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {accepted}; got {content_type:?}"
            ),
        )
    }

    /// 410 for a watch that resumes from a compacted resourceVersion.
    pub fn gone(rv: u64) -> Self {
        Self::new(410, "Expired", format!("too old resource version: {rv}"))
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}
