//! The image server: answers `GET`/`HEAD` of a capability path with exactly the stored bytes of
//! that disk (`Content-Length`, `ETag` of its sha256, `Accept-Ranges: bytes`, `206` for one
//! range, `416` past the end), after checking, on every request, that the Image the path names
//! still exists with that uid, is Active and, for a reference, still holds its grant to a
//! source with the uid it is bound to. Every refusal is the same `404`, whether or not the
//! image exists.

use http::{StatusCode, header};
use kube::{ResourceExt, runtime::reflector::ObjectRef};
use object_store::ObjectStoreExt;

use super::{Capability, Key, Ranged, ranged};
use crate::{
    api::{Image, ImagePhase},
    controllers::{Context, image::reference},
    policy::reference::{Outcome, decide},
};

/// The one answer to every path that is not a readable disk.
pub const NOT_FOUND: &str = "404 page not found\n";
/// The answer for an encrypted image whose KMS key is missing, disabled or refused (503).
pub const KEY_UNAVAILABLE: &str = "the image's KMS key is unavailable: its status says why\n";
/// The answer for an encrypted image that cannot be opened for another reason (503).
pub const UNREADABLE: &str = "the stored image cannot be read now\n";
/// The answer when the stored bytes of an encrypted image fail authentication (500).
pub const CORRUPT: &str = "the stored image failed authentication: it is not served\n";

/// The stored object a capability reads.
#[derive(Clone, Debug)]
pub struct Readable {
    /// The store that holds it (its region's).
    pub store: crate::store::RegionStore,
    /// The object's path in that store.
    pub object: object_store::path::Path,
    /// Its sha256 (lower-case hex), from status.
    pub sha256: String,
    /// Whether it is encrypted (its image has `encryption`): served decrypted.
    pub sealed: bool,
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
    Some(Readable { store, object, sha256, sealed: owner.spec.encryption.is_some() })
}

/// What a request gets: a short text, or bytes of a stored object.
#[derive(Debug)]
pub enum Reply {
    /// A short text answer: a refusal, or 416 for a range past the end.
    Text {
        /// The status.
        status: StatusCode,
        /// The body.
        body: &'static str,
        /// Headers besides Content-Type and Content-Length (Allow, Content-Range).
        headers: Vec<(header::HeaderName, String)>,
    },
    /// Bytes `range` of a stored object of `total` bytes: 200 (all of it) or 206.
    Object {
        /// 200 or 206.
        status: StatusCode,
        /// The object.
        readable: Box<Readable>,
        /// The bytes to send.
        range: std::ops::Range<u64>,
        /// The object's size (its plaintext's, when encrypted).
        total: u64,
        /// An encrypted object, opened: its bytes are served decrypted.
        opener: Option<std::sync::Arc<crate::crypt::Opener>>,
    },
}

impl Reply {
    /// The one 404.
    pub fn not_found() -> Reply {
        Reply::Text { status: StatusCode::NOT_FOUND, body: NOT_FOUND, headers: Vec::new() }
    }
}

/// What one request asks: its method, path (no query), and Range and If-Range headers.
#[derive(Clone, Debug, Default)]
pub struct Asked<'a> {
    /// `GET`, `HEAD`, ...
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The `Range` header.
    pub range: Option<&'a str>,
    /// The `If-Range` header: a range is honoured only when it names the current ETag.
    pub if_range: Option<&'a str>,
}

/// The size of the stored object, if it is there.
async fn size_of(readable: &Readable) -> Option<u64> {
    match readable.store.local_file(&readable.object) {
        Some(file) => tokio::fs::metadata(file).await.ok().filter(|m| m.is_file()).map(|m| m.len()),
        None => readable.store.object_store().head(&readable.object).await.ok().map(|m| m.size),
    }
}

/// The `ETag` of a disk: its sha256, quoted.
pub fn etag(readable: &Readable) -> String {
    format!("\"{}\"", readable.sha256)
}

/// The answer to one request: authorized against the caches of `ctx` under `key` (none yet:
/// every path is unknown), then sized from the store.
pub async fn answer(ctx: &Context, key: Option<&Key>, asked: &Asked<'_>) -> Reply {
    if asked.method != "GET" && asked.method != "HEAD" {
        let headers = vec![(header::ALLOW, "GET, HEAD".to_string())];
        return Reply::Text { status: StatusCode::METHOD_NOT_ALLOWED, body: "method not allowed\n", headers };
    }
    let Some(capability) = key.and_then(|key| Capability::verify(asked.path, key)) else { return Reply::not_found() };
    let Some(readable) = resolve(ctx, &capability) else { return Reply::not_found() };
    let (total, opener) = if readable.sealed {
        match crate::crypt::open(&readable.store, &readable.object).await {
            Ok(opener) => (opener.plain_len(), Some(std::sync::Arc::new(opener))),
            Err(crate::crypt::CryptError::Store(object_store::Error::NotFound { .. })) => return Reply::not_found(),
            Err(e) => {
                // The caller holds a capability of this image: it may learn that its key is out.
                tracing::warn!(object = %readable.object, error = %e, "cannot open an encrypted image to serve it");
                let headers = vec![(header::RETRY_AFTER, "30".to_string())];
                let body = if e.key_unavailable() { KEY_UNAVAILABLE } else { UNREADABLE };
                return Reply::Text { status: StatusCode::SERVICE_UNAVAILABLE, body, headers };
            }
        }
    } else {
        let Some(total) = size_of(&readable).await else { return Reply::not_found() };
        (total, None)
    };
    let range = match asked.if_range {
        Some(tag) if tag.trim() != etag(&readable) => None,
        _ => asked.range,
    };
    let (status, range) = match ranged(range, total) {
        Ranged::Full => (StatusCode::OK, 0..total),
        Ranged::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start..end + 1),
        Ranged::Unsatisfiable => {
            let headers = vec![(header::CONTENT_RANGE, format!("bytes */{total}"))];
            return Reply::Text { status: StatusCode::RANGE_NOT_SATISFIABLE, body: "range not satisfiable\n", headers };
        }
    };
    Reply::Object { status, readable: Box::new(readable), range, total, opener }
}

/// Whether `capability` still reads `object` now (the grant held, the key unchanged): checked
/// between the chunks of a body, so a revocation cuts a transfer in flight.
pub fn still_readable(ctx: &Context, key: Option<&Key>, path: &str, object: &object_store::path::Path) -> bool {
    key.and_then(|key| Capability::verify(path, key))
        .and_then(|capability| resolve(ctx, &capability))
        .is_some_and(|now| &now.object == object)
}
