#![doc = include_str!("../README.md")]
//!
//! ## Modules
//!
//! - [`schema`]: validation of objects against a CRD's `openAPIV3Schema` (pruning, defaulting,
//!   OpenAPI validation, list types, CEL rules), usable without the server ([`schema::CrdSchema`]).
//! - [`managed`]: server-side apply field management (`metadata.managedFields`).
//! - [`patch`]: JSON Patch and JSON Merge Patch with kube-apiserver's errors.
//! - [`selector`]: label and field selectors.

mod errors;
// Entry points of the fuzz targets in the repository's fuzz/ (the `fuzzing` feature only).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
pub mod managed;
mod openapi;
pub mod patch;
mod registry;
pub mod schema;
pub mod selector;
mod store;
mod table;
mod verbs;
mod watch;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub use errors::ApiError;

/// The largest request body the server reads: kube-apiserver's 3 MiB (`MaxRequestBodyBytes`);
/// a larger one is answered 413 RequestEntityTooLarge.
pub const MAX_REQUEST_BODY_BYTES: usize = 3 * 1024 * 1024;
pub use registry::Kind;
use store::Store;
use verbs::{Query, Target};

/// Response body: a whole JSON document or a watch stream.
pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// The embedded API server. Cheap to clone; clones share the same objects.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    kinds: Vec<Kind>,
    store: Mutex<Store>,
    counter: AtomicU64,
    seed: u64,
    bookmark_every: Duration,
}

/// Options of an [`ApiServer`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Changes kept for watch resume; older resourceVersions get 410 Gone.
    pub history: usize,
    /// How often a watch with `allowWatchBookmarks` gets a BOOKMARK.
    pub bookmark_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { history: 100_000, bookmark_every: Duration::from_secs(5) }
    }
}

impl ApiServer {
    /// A server of `crds` (and the built-in kinds), with the default options.
    ///
    /// # Panics
    ///
    /// When a CRD cannot be served (no storage version, a schema that does not compile): see
    /// [`ApiServer::try_with_options`] to get the error instead.
    pub fn new(crds: impl IntoIterator<Item = CustomResourceDefinition>) -> Self {
        Self::with_options(crds, Options::default())
    }

    /// A server of `crds` (and the built-in kinds) with the given options.
    ///
    /// # Panics
    ///
    /// As [`ApiServer::new`].
    pub fn with_options(crds: impl IntoIterator<Item = CustomResourceDefinition>, options: Options) -> Self {
        Self::try_with_options(crds, options).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A server of `crds` (and the built-in kinds) with the given options, or why a CRD cannot
    /// be served.
    pub fn try_with_options(
        crds: impl IntoIterator<Item = CustomResourceDefinition>,
        options: Options,
    ) -> Result<Self, InvalidCrd> {
        let kinds = registry::kinds(crds).map_err(InvalidCrd)?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            ^ u64::from(std::process::id());
        Ok(ApiServer {
            inner: Arc::new(Inner {
                kinds,
                store: Mutex::new(Store::new(options.history)),
                counter: AtomicU64::new(1),
                seed,
                bookmark_every: options.bookmark_every,
            }),
        })
    }

    /// A kube client talking to this server in-process.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.service(), "default")
    }

    /// The server as a `tower::Service`, for `kube::Client::new`.
    pub fn service(&self) -> ApiService {
        ApiService { server: self.clone() }
    }

    /// Answers one request.
    pub async fn handle(&self, request: http::Request<Bytes>) -> http::Response<ResponseBody> {
        let (parts, body) = request.into_parts();
        if body.len() > MAX_REQUEST_BODY_BYTES {
            return json_response(413, &ApiError::body_too_large().to_status());
        }
        let header = |name: http::header::HeaderName| {
            parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
        };
        let req = Request {
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            query: form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes()).into_owned().collect(),
            content_type: header(http::header::CONTENT_TYPE),
            user_agent: header(http::header::USER_AGENT),
            accept: header(http::header::ACCEPT),
            body,
        };
        match self.inner.route(&req) {
            Ok(Reply::Json(code, value)) => json_response(code, &value),
            Ok(Reply::Watch(rx)) => {
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
                });
                let body = BodyExt::boxed_unsync(StreamBody::new(stream));
                http::Response::builder()
                    .status(200)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header(http::header::TRANSFER_ENCODING, "chunked")
                    .body(body)
                    .unwrap_or_else(|_| json_response(500, &json!({})))
            }
            Err(err) => json_response(err.code, &err.to_status()),
        }
    }

    /// Serves HTTP/1.1 on `listener` until the task is dropped (for kubectl: `--serve`).
    pub async fn serve(&self, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let server = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let server = server.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        // Read at most one byte more than the limit, so a huge body is refused
                        // without being held in memory.
                        let limited = http_body_util::Limited::new(body, MAX_REQUEST_BODY_BYTES);
                        let bytes = match limited.collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                                return Ok(json_response(413, &ApiError::body_too_large().to_status()));
                            }
                            Err(_) => Bytes::new(),
                        };
                        Ok::<_, Infallible>(server.handle(http::Request::from_parts(parts, bytes)).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    /// resourceVersion of the last change: it moves on every write.
    pub fn resource_version(&self) -> u64 {
        self.inner.store.lock().map(|s| s.rv()).unwrap_or(0)
    }

    /// The kinds served.
    pub fn kinds(&self) -> &[Kind] {
        &self.inner.kinds
    }
}

impl Default for ApiServer {
    /// A server of the built-in kinds only (no CRDs).
    fn default() -> Self {
        Self::new([])
    }
}

/// A CRD the server cannot serve (no storage version, a schema that does not compile).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCrd(pub String);

fn json_response(code: u16, value: &Value) -> http::Response<ResponseBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    http::Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed_unsync(Full::new(Bytes::from(body))))
        .unwrap_or_else(|_| http::Response::new(BodyExt::boxed_unsync(Full::new(Bytes::new()))))
}

/// [`ApiServer`] as a `tower::Service<Request<kube::client::Body>>`.
#[derive(Clone)]
pub struct ApiService {
    server: ApiServer,
}

impl tower_service::Service<http::Request<kube::client::Body>> for ApiService {
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let server = self.server.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            Ok(server.handle(http::Request::from_parts(parts, bytes)).await)
        })
    }
}

struct Request {
    method: http::Method,
    path: String,
    query: Query,
    content_type: String,
    user_agent: String,
    accept: String,
    body: Bytes,
}

enum Reply {
    Json(u16, Value),
    Watch(tokio::sync::mpsc::Receiver<Bytes>),
}

impl Inner {
    fn uid(&self) -> String {
        let n = self.next_random();
        let m = self.next_random();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            n >> 32,
            (n >> 16) & 0xffff,
            n & 0xfff,
            0x8000 | (m >> 48) & 0x3fff,
            m & 0xffff_ffff_ffff
        )
    }

    fn random_suffix(&self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut n = self.next_random();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
                n /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    /// splitmix64 over a counter: unique, unpredictable enough for uids and generateName.
    fn next_random(&self) -> u64 {
        let mut z =
            self.seed.wrapping_add(self.counter.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn route(self: &Arc<Self>, req: &Request) -> Result<Reply, ApiError> {
        let segments: Vec<&str> = req.path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
        let (group, version, rest) = match segments.as_slice() {
            ["version"] => return Ok(Reply::Json(200, version_info())),
            ["api"] => {
                return Ok(Reply::Json(
                    200,
                    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
                ));
            }
            ["apis"] => return Ok(Reply::Json(200, self.group_list())),
            ["openapi", "v3"] => return Ok(Reply::Json(200, openapi::root(&self.kinds))),
            ["openapi", "v3", "api", version] => {
                return openapi::document(&self.kinds, "", version)
                    .map(|d| Reply::Json(200, d))
                    .ok_or_else(ApiError::no_route);
            }
            ["openapi", "v3", "apis", group, version] => {
                return openapi::document(&self.kinds, group, version)
                    .map(|d| Reply::Json(200, d))
                    .ok_or_else(ApiError::no_route);
            }
            ["apis", group] => return self.group(group).map(|g| Reply::Json(200, g)).ok_or_else(ApiError::no_route),
            ["api", "v1", rest @ ..] => ("", "v1", rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return Err(ApiError::no_route()),
        };
        if rest.is_empty() {
            return self.resource_list(group, version).map(|l| Reply::Json(200, l)).ok_or_else(ApiError::no_route);
        }
        let target = self.target(group, version, rest)?;
        let watch = req.query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let media = req.content_type.split(';').next().unwrap_or_default().trim();
        if matches!(req.method, http::Method::POST | http::Method::PUT)
            && !media.is_empty()
            && media != "application/json"
        {
            return Err(ApiError::unsupported_media_type(
                media,
                "application/json (the embedded API does not speak protobuf: use kubectl apply)",
            ));
        }
        let body = req.body.as_ref();
        match (&req.method, &target.name) {
            (&http::Method::GET, None) if watch => Ok(Reply::Watch(self.watch(&target, &req.query)?)),
            (&http::Method::GET, None) => {
                let list = self.list(&target, &req.query)?;
                if table::wants_table(&req.accept) {
                    let items = list["items"].as_array().cloned().unwrap_or_default();
                    let rv = list["metadata"]["resourceVersion"].as_str().unwrap_or_default();
                    return Ok(Reply::Json(200, table::table(&self.kinds[target.kind], &items, rv)));
                }
                Ok(Reply::Json(200, list))
            }
            (&http::Method::GET, Some(name)) => {
                let obj = self.get(&target, name)?;
                if table::wants_table(&req.accept) {
                    let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
                    return Ok(Reply::Json(200, table::table(&self.kinds[target.kind], &[obj], &rv)));
                }
                Ok(Reply::Json(200, obj))
            }
            (&http::Method::POST, None) => {
                self.create(&target, &req.query, &req.user_agent, body).map(|(c, v)| Reply::Json(c, v))
            }
            (&http::Method::PUT, Some(name)) => {
                self.update(&target, name, &req.query, &req.user_agent, body).map(|v| Reply::Json(200, v))
            }
            (&http::Method::PATCH, Some(name)) => self
                .patch(&target, name, &req.query, &req.user_agent, &req.content_type, body)
                .map(|(c, v)| Reply::Json(c, v)),
            (&http::Method::DELETE, Some(name)) if target.sub.is_none() => {
                self.delete(&target, name, &req.query, body).map(|v| Reply::Json(200, v))
            }
            (&http::Method::DELETE, None) => self.delete_collection(&target, &req.query).map(|v| Reply::Json(200, v)),
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    /// Resolves `[namespaces/{ns}/]{plural}[/{name}[/{sub}]]` in a group/version.
    fn target(&self, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
        let find = |plural: &str| {
            self.kinds.iter().position(|k| k.group == group && k.version == version && k.plural == plural)
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(|k| self.kinds[k].namespaced) => {
                (Some(ns.to_string()), {
                    let mut v = vec![*plural];
                    v.extend_from_slice(tail);
                    v
                })
            }
            _ => (None, rest.to_vec()),
        };
        let (plural, name, sub) = match rest.as_slice() {
            [plural] => (*plural, None, None),
            [plural, name] => (*plural, Some(name.to_string()), None),
            [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
            _ => return Err(ApiError::no_route()),
        };
        let kind = find(plural).ok_or_else(ApiError::no_route)?;
        if sub.as_deref().is_some_and(|s| s != "status" || !self.kinds[kind].has_status) {
            return Err(ApiError::no_route());
        }
        if name.is_some() && self.kinds[kind].namespaced && namespace.is_none() {
            return Err(ApiError::no_route());
        }
        Ok(Target { kind, namespace, name, sub })
    }

    fn delete_collection(&self, target: &Target, query: &Query) -> Result<Value, ApiError> {
        let list = self.list(target, query)?;
        let mut store = self.store.lock().map_err(|_| ApiError::bad_request("store poisoned"))?;
        let mut deleted = Vec::new();
        for item in list["items"].as_array().into_iter().flatten() {
            let ns = item["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
            let name = item["metadata"]["name"].as_str().unwrap_or_default().to_string();
            deleted.push(self.delete_key(&mut store, &(target.kind, ns, name)));
        }
        let mut out = list;
        out["items"] = Value::Array(deleted);
        Ok(out)
    }

    fn group_versions(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for k in self.kinds.iter().filter(|k| !k.group.is_empty()) {
            if !out.iter().any(|(g, v)| *g == k.group && *v == k.version) {
                out.push((k.group.clone(), k.version.clone()));
            }
        }
        out
    }

    fn group(&self, name: &str) -> Option<Value> {
        let versions: Vec<Value> = self
            .group_versions()
            .into_iter()
            .filter(|(g, _)| g == name)
            .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
            .collect();
        let preferred = versions.first()?.clone();
        Some(
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": versions, "preferredVersion": preferred}),
        )
    }

    fn group_list(&self) -> Value {
        let mut names: Vec<String> = self.group_versions().into_iter().map(|(g, _)| g).collect();
        names.dedup();
        let groups: Vec<Value> = names.iter().filter_map(|g| self.group(g)).collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let resources: Vec<Value> =
            self.kinds.iter().filter(|k| k.group == group && k.version == version).flat_map(Kind::discovery).collect();
        if resources.is_empty() {
            return None;
        }
        let group_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
        Some(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
        )
    }
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "36",
        "gitVersion": "v1.36.0-kube-embedded",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": "linux/amd64"
    })
}
