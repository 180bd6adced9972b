//! Fuzzing entry points: what the cargo-fuzz targets `embedded_selector`, `embedded_patch`
//! and `embedded_request` (in the `fuzz/` crate of the repository) run, and what the
//! regression test replays for every input that ever failed (`tests/fixtures/fuzz/`). No
//! socket: requests go to [`ApiServer::handle`].
//!
//! Built for tests and with the `fuzzing` feature only; not part of the API.

use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::BodyExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

use crate::ApiServer;
use crate::patch::{self, PatchError};
use crate::selector::{FieldSelector, LabelSelector};

/// `embedded_selector`: the input as a `labelSelector` and as a `fieldSelector`. A label
/// selector that parses prints as text that parses to the same selector; matching never panics.
pub fn selector(input: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(input) else { return "not UTF-8".into() };
    let labels = match LabelSelector::parse(text) {
        Ok(sel) => {
            let canonical = sel.to_string();
            let again = LabelSelector::parse(&canonical)
                .unwrap_or_else(|e| panic!("{text:?} prints as {canonical:?}, which does not parse: {e}"));
            assert_eq!(again, sel, "{text:?} prints as {canonical:?}, which parses to another selector");
            // Labels made of the selector's own keys and values.
            let own = sel
                .requirements()
                .iter()
                .map(|r| (r.key().to_owned(), r.values().first().cloned().unwrap_or_default()))
                .collect();
            let _ = sel.matches(&own);
            format!("labels {canonical:?}")
        }
        Err(e) => {
            assert!(!e.is_empty());
            format!("labels refused: {e}")
        }
    };
    let fields = match FieldSelector::parse(text) {
        Ok(sel) => {
            let obj = serde_json::json!({"metadata": {"name": text, "namespace": "default"}, "spec": {"size": 1}});
            let _ = sel.matches(&obj);
            let _ = sel.check_supported(&["metadata.name", "metadata.namespace"]);
            format!("fields {sel}")
        }
        Err(e) => {
            assert!(!e.is_empty());
            format!("fields refused: {e}")
        }
    };
    format!("{labels}; {fields}")
}

/// `embedded_patch`: a JSON document, a NUL byte and a patch (without the NUL: the patch, on
/// an empty object). Applies it as a JSON Patch and as a merge patch: the errors are the
/// statuses kube-apiserver answers, a merge patch is idempotent.
pub fn patch(input: &[u8]) -> String {
    let (doc, body) = match input.iter().position(|&b| b == 0) {
        Some(at) => (&input[..at], &input[at + 1..]),
        None => (&b"{}"[..], input),
    };
    let (Ok(doc), Ok(p)) = (serde_json::from_slice::<Value>(doc), serde_json::from_slice::<Value>(body)) else {
        return "not JSON".into();
    };
    let json = match patch::json_patch(&doc, &p) {
        Ok(v) => {
            assert!(v.is_object() || v.is_array(), "a JSON patch made {v}");
            format!("json patch: {} bytes", v.to_string().len())
        }
        Err(e) => {
            let status = e.to_status();
            assert_eq!(status["code"], e.code(), "{status}");
            assert!(matches!(e.code(), 400 | 413 | 422), "{e:?}");
            if matches!(e, PatchError::TooManyOperations { .. }) {
                assert!(p.as_array().is_some_and(|a| a.len() > patch::MAX_JSON_PATCH_OPERATIONS));
            }
            format!("json patch refused: {e}")
        }
    };
    let merged = patch::merge_patch(&doc, &p);
    assert_eq!(patch::merge_patch(&merged, &p), merged, "a merge patch applied twice differs");
    match patch::merge_patch_checked(&doc, &p) {
        Ok(v) => assert_eq!(v, merged),
        Err(e) => assert!(!(p.is_object() || p.is_array()), "{e:?}"),
    }
    json
}

fn crd() -> &'static CustomResourceDefinition {
    static CRD: OnceLock<CustomResourceDefinition> = OnceLock::new();
    CRD.get_or_init(|| {
        serde_yaml_ng::from_str(include_str!("../tests/fixtures/widgets.yaml")).expect("the fixture CRD parses")
    })
}

/// The most requests one input makes.
const MAX_REQUESTS: usize = 8;

/// `embedded_request`: up to eight requests, separated by a line `%%`, to a fresh server of the
/// fixture CRD (Widgets of example.com/v1) and the built-in kinds. Each request is a line
/// `METHOD PATH?QUERY`, header lines (`Content-Type: ...`), an empty line and the body.
/// Every answer is JSON; an error is a `Status` with the answer's code; the resourceVersion
/// never goes back; a watch's first lines are watch events.
pub fn request(input: &[u8]) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
    let server = ApiServer::new([crd().clone()]);
    let mut out = Vec::new();
    let mut rv = server.resource_version();
    for raw in split_requests(input).into_iter().take(MAX_REQUESTS) {
        let Some(request) = parse_request(raw) else {
            out.push("-".to_string());
            continue;
        };
        let watch = request.uri().query().is_some_and(|q| q.contains("watch"));
        let response = runtime.block_on(server.handle(request));
        let code = response.status().as_u16();
        assert!(
            matches!(code, 200 | 201 | 202 | 400 | 403 | 404 | 405 | 409 | 410 | 413 | 415 | 422),
            "answered {code}"
        );
        let is_stream = response.headers().get(http::header::TRANSFER_ENCODING).is_some();
        let body = response.into_body();
        if is_stream {
            assert!(watch && code == 200, "a stream answered {code}");
            // The lines sent at once (the initial events); the rest waits for changes.
            let lines = runtime.block_on(async {
                let mut body = body;
                let mut lines = Vec::new();
                while let Ok(Some(Ok(frame))) =
                    tokio::time::timeout(std::time::Duration::from_millis(1), body.frame()).await
                {
                    if let Ok(data) = frame.into_data() {
                        lines.push(data);
                    }
                }
                lines
            });
            for line in &lines {
                let event: Value = serde_json::from_slice(line).expect("a watch line is JSON");
                let typ = event["type"].as_str().unwrap_or_default();
                assert!(matches!(typ, "ADDED" | "MODIFIED" | "DELETED" | "BOOKMARK" | "ERROR"), "{event}");
                assert!(event["object"].is_object(), "{event}");
            }
            out.push(format!("{code} watch {}", lines.len()));
        } else {
            let bytes = runtime.block_on(body.collect()).map(|b| b.to_bytes()).unwrap_or_default();
            let value: Value = serde_json::from_slice(&bytes).expect("an answer is JSON");
            assert!(value.is_object(), "{value}");
            if code >= 400 {
                assert_eq!(value["kind"], "Status", "{value}");
                assert_eq!(value["code"], code, "{value}");
            }
            out.push(format!("{code} {}", value["reason"].as_str().unwrap_or("")));
        }
        let now = server.resource_version();
        assert!(now >= rv, "the resourceVersion went back from {rv} to {now}");
        rv = now;
    }
    out.join(", ")
}

fn split_requests(input: &[u8]) -> Vec<&[u8]> {
    let sep = b"\n%%\n";
    let mut parts = Vec::new();
    let mut rest = input;
    while let Some(at) = rest.windows(sep.len()).position(|w| w == sep) {
        parts.push(&rest[..at]);
        rest = &rest[at + sep.len()..];
    }
    parts.push(rest);
    parts
}

fn parse_request(raw: &[u8]) -> Option<http::Request<Bytes>> {
    let (head, body) = match raw.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&raw[..at], &raw[at + 2..]),
        None => (raw, &b""[..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, uri) = lines.next()?.split_once(' ')?;
    let mut builder = http::Request::builder().method(method).uri(uri);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        builder = builder.header(name.trim(), value.trim());
    }
    builder.body(Bytes::copy_from_slice(body)).ok()
}
