//! The image server: answers `GET`/`HEAD` of a capability path with exactly the stored bytes of
//! that disk (`Content-Length`, `ETag` of its sha256, `Accept-Ranges: bytes`, `206` for one
//! range, `416` past the end), after checking, on every request, that the Image the path names
//! still exists with that uid, is Active and, for a reference, still holds its grant to a
//! source with the uid it is bound to. Every refusal is the same `404`, whether or not the
//! image exists.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use futures::TryStreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use kube::{ResourceExt, runtime::reflector::ObjectRef};
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use tokio::net::TcpListener;

use super::{Capability, Key, Ranged, ranged};
use crate::{
    api::{Image, ImagePhase},
    controllers::{Context, image::reference},
    policy::reference::{Outcome, decide},
};

/// The one answer to every path that is not a readable disk.
pub const NOT_FOUND: &str = "404 page not found\n";

/// A response body: a stored object's stream, or a short text.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The stored object a capability reads.
#[derive(Clone, Debug)]
pub struct Readable {
    /// The store that holds it (its region's).
    pub store: crate::store::RegionStore,
    /// The object's path in that store.
    pub object: object_store::path::Path,
    /// Its sha256 (lower-case hex), from status.
    pub sha256: String,
}

/// What `capability` may read now, from the caches of `ctx`; `None` for anything not readable.
pub fn resolve(ctx: &Context, capability: &Capability) -> Option<Readable> {
    let image = ctx.images.get(&ObjectRef::<Image>::new(&capability.name).within(&capability.namespace))?;
    let active = |i: &Image| {
        i.metadata.deletion_timestamp.is_none() && i.status.as_ref().and_then(|s| s.phase) == Some(ImagePhase::Active)
    };
    if image.uid().as_deref() != Some(capability.uid.as_str()) || !active(&image) {
        return None;
    }
    // Whose bytes: the image's own, or a reference's source, bound and granted right now.
    let owner = match &image.spec.source.image {
        None => image.clone(),
        Some(target) => {
            let (source, granted) = reference::source_and_grant(ctx, &capability.namespace, target);
            let source = source?;
            let bound = image.status.as_ref()?.source.as_ref()?.uid.clone();
            match decide(&image, target, Some(&source), granted) {
                Outcome::Active(s) if s.uid().as_deref() == Some(bound.as_str()) && active(s) => source.clone(),
                _ => return None,
            }
        }
    };
    let status = owner.status.as_ref()?;
    let sha256 = match (status.disks.as_slice(), capability.disk.as_str()) {
        ([], "disk") => status.checksum.as_ref()?.sha256.clone(),
        (disks, name) => {
            let index: i32 = name.strip_prefix("disk-")?.parse().ok()?;
            disks.iter().find(|d| d.index == index)?.sha256.clone()?
        }
    };
    let store = ctx.store(&owner.spec.region)?;
    let prefix = store.image_prefix(&owner.namespace()?, &owner.name_any(), &owner.uid()?);
    let object = prefix.join(capability.disk.as_str());
    Some(Readable { store, object, sha256 })
}

/// Serves capability paths on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, key: tokio::sync::watch::Receiver<Option<Key>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (ctx, key) = (ctx.clone(), key.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (ctx, key) = (ctx.clone(), key.borrow().clone());
                async move { Ok::<_, Infallible>(answer(&ctx, key.as_ref(), req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response =
        Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|e| match e {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The answer to one request.
pub async fn answer<B>(ctx: &Context, key: Option<&Key>, req: Request<B>) -> Response<Body> {
    let not_found = || text(StatusCode::NOT_FOUND, NOT_FOUND);
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let Some(capability) = key.and_then(|key| Capability::verify(req.uri().path(), key)) else { return not_found() };
    let Some(readable) = resolve(ctx, &capability) else { return not_found() };
    let store = readable.store.object_store().clone();
    let Ok(meta) = store.head(&readable.object).await else { return not_found() };
    let len = meta.size;
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, bytes) = match ranged(range, len) {
        Ranged::Full => (StatusCode::OK, 0..len),
        Ranged::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start..end + 1),
        Ranged::Unsatisfiable => {
            let mut response = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return response;
        }
    };
    let body: Body = if req.method() == Method::HEAD || bytes.is_empty() {
        Full::new(Bytes::new()).map_err(|e| match e {}).boxed_unsync()
    } else {
        let options = GetOptions { range: Some(GetRange::Bounded(bytes.clone())), ..Default::default() };
        match store.get_opts(&readable.object, options).await {
            Ok(got) => {
                let frames = got.into_stream().map_ok(Frame::data).map_err(std::io::Error::other);
                BodyExt::boxed_unsync(StreamBody::new(frames))
            }
            Err(_) => return not_found(),
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    let mut set = |name, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    set(header::CONTENT_LENGTH, (bytes.end - bytes.start).to_string());
    set(header::ETAG, format!("\"{}\"", readable.sha256));
    if status == StatusCode::PARTIAL_CONTENT {
        set(header::CONTENT_RANGE, format!("bytes {}-{}/{len}", bytes.start, bytes.end - 1));
    }
    response
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher;
    use serde_json::json;

    use super::*;
    use crate::store::{RegionStore, StoreConfig};

    fn image(namespace: &str, name: &str, uid: &str, spec: serde_json::Value, status: serde_json::Value) -> Image {
        serde_json::from_value(json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image",
            "metadata": {"name": name, "namespace": namespace, "uid": uid}, "spec": spec, "status": status}))
        .unwrap()
    }

    async fn get(
        ctx: &Context,
        key: &Key,
        path: &str,
        range: Option<&str>,
        method: Method,
    ) -> (StatusCode, Vec<(String, String)>, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(range) = range {
            req = req.header(header::RANGE, range);
        }
        let response = answer(ctx, Some(key), req.body(()).unwrap()).await;
        let status = response.status();
        let headers =
            response.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string())).collect();
        let body = response.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, headers, body)
    }

    fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Exactly the stored bytes, whole, in a range, or as headers only; and one and the same
    /// 404 for a tampered token, a replaced image, one not Active, and a reference without a
    /// grant, while a granted reference reads its source's bytes.
    #[tokio::test]
    async fn serves_the_stored_bytes_only_to_a_valid_capability() {
        let (client, _) = crate::controllers::test_api(&[]).await;
        let (ctx, mut caches) = Context::for_test(client);
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: dir.path().into() };
        let spec = crate::api::RegionStorage { url: "file:///var/lib/ims/r".into(), ..Default::default() };
        let store = RegionStore::open(&spec, &config, None).unwrap();
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let object = store.image_prefix("owner", "img", "u1").join("disk");
        store.object_store().put(&object, bytes.clone().into()).await.unwrap();
        ctx.stores.lock().unwrap().insert("r".into(), store);
        let active = json!({"phase": "Active", "checksum": {"sha256": "abc"}});
        let owned = json!({"region": "r", "type": "DataDisk", "visibility": "Marketplace", "source": {"url": {"url": "https://x/y"}}});
        let reference = json!({"region": "r", "source": {"image": {"namespace": "owner", "name": "img"}}});
        let bound = json!({"phase": "Active", "source": {"uid": "u1"}});
        for i in [
            image("owner", "img", "u1", owned.clone(), active.clone()),
            image("owner", "saving", "u2", owned.clone(), json!({"phase": "Saving"})),
            image("tenant", "ref", "u3", reference.clone(), bound.clone()),
        ] {
            caches.images.apply_watcher_event(&watcher::Event::Apply(i));
        }
        let key = Key::from_bytes(&[7u8; 32]).unwrap();
        let path = |ns: &str, name: &str, uid: &str| {
            Capability { namespace: ns.into(), name: name.into(), uid: uid.into(), disk: "disk".into() }.path(&key)
        };

        let (status, headers, body) = get(&ctx, &key, &path("owner", "img", "u1"), None, Method::GET).await;
        assert_eq!((status, body.len()), (StatusCode::OK, bytes.len()));
        assert!(body == bytes, "exactly the stored bytes");
        assert_eq!(header_of(&headers, "content-length"), Some("100000"));
        assert_eq!(header_of(&headers, "etag"), Some("\"abc\""));
        assert_eq!(header_of(&headers, "accept-ranges"), Some("bytes"));
        let (status, headers, body) = get(&ctx, &key, &path("owner", "img", "u1"), None, Method::HEAD).await;
        assert_eq!((status, body.len(), header_of(&headers, "content-length")), (StatusCode::OK, 0, Some("100000")));
        let (status, headers, body) =
            get(&ctx, &key, &path("owner", "img", "u1"), Some("bytes=1000-1999"), Method::GET).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert!(body == bytes[1000..2000]);
        assert_eq!(header_of(&headers, "content-range"), Some("bytes 1000-1999/100000"));
        let (status, headers, _) =
            get(&ctx, &key, &path("owner", "img", "u1"), Some("bytes=100000-"), Method::GET).await;
        assert_eq!(
            (status, header_of(&headers, "content-range")),
            (StatusCode::RANGE_NOT_SATISFIABLE, Some("bytes */100000"))
        );

        // A granted reference (the source is Marketplace) reads the source's bytes.
        let (status, _, body) = get(&ctx, &key, &path("tenant", "ref", "u3"), None, Method::GET).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body == bytes);

        let good = path("owner", "img", "u1");
        let refused = [
            good.replace("/u1/", "/u9/"),
            format!("{}A", &good[..good.len() - 1]),
            path("owner", "img", "u9"),
            path("owner", "saving", "u2"),
            path("owner", "missing", "u4"),
            "/v1/images/owner/img/u1/disk/".into(),
            "/".into(),
        ];
        for bad in &refused {
            let (status, _, body) = get(&ctx, &key, bad, None, Method::GET).await;
            assert_eq!((status, body.as_slice()), (StatusCode::NOT_FOUND, NOT_FOUND.as_bytes()), "{bad}");
        }
        // The source made Private (no ImageShare): the reference's URL stops at once.
        caches.images.apply_watcher_event(&watcher::Event::Apply(image(
            "owner",
            "img",
            "u1",
            json!({"region": "r", "type": "DataDisk", "source": {"url": {"url": "https://x/y"}}}),
            active,
        )));
        let (status, _, body) = get(&ctx, &key, &path("tenant", "ref", "u3"), None, Method::GET).await;
        assert_eq!((status, body.as_slice()), (StatusCode::NOT_FOUND, NOT_FOUND.as_bytes()));
        let (status, _, _) = get(&ctx, &key, &path("owner", "img", "u1"), None, Method::POST).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }
}
