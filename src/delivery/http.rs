//! The image server's HTTP/1.1 (RFC 9112): `GET` and `HEAD` of capability paths, keep-alive and
//! pipelining, over plain TCP or TLS, with limits a hostile client cannot get round: the request
//! head must arrive whole within [`Limits::header_timeout`] and fit in [`Limits::max_head`], an
//! idle connection closes after [`Limits::idle_timeout`], a reader that stops reading is dropped
//! after [`Limits::write_timeout`], and at most [`Limits::max_connections`] are served at once.
//!
//! Requests are parsed by `httparse` (hyper's parser). The server around it is written here,
//! rather than with hyper, for the body: from a file store over plain TCP it goes with
//! sendfile(2), page cache to socket with no copy through this process (hyper only writes
//! buffers); over TLS or from S3 it is copied in 1 MiB chunks. Between chunks the capability is
//! checked again, so a revoked grant or a rotated key cuts a transfer in flight.

use std::{io, sync::Arc, time::Duration};

use bytes::Bytes;
use http::StatusCode;
use object_store::{GetOptions, GetRange};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
};

use super::{
    Key,
    server::{self, Asked, Readable, Reply},
};
use crate::controllers::Context;

/// What a client may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The whole request head must arrive within this once its first byte has (slowloris).
    pub header_timeout: Duration,
    /// A connection with no request in progress closes after this.
    pub idle_timeout: Duration,
    /// A chunk of the body must be taken by the client within this.
    pub write_timeout: Duration,
    /// The longest request head (request line and headers): 431 above it.
    pub max_head: usize,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            max_head: 16 * 1024,
            max_connections: 1024,
        }
    }
}

/// Bytes a body is sent in, between two checks of its capability.
const CHUNK: u64 = 1 << 20;

/// The TLS configuration, when the server speaks HTTPS (kept current from its Secret).
pub type Tls = watch::Receiver<Option<Arc<rustls::ServerConfig>>>;

/// A connection: plain TCP, which can take sendfile, or TLS.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {
    /// The socket, when bytes written to it reach the client as they are.
    fn plain(&self) -> Option<&TcpStream>;
}

impl Conn for TcpStream {
    fn plain(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Conn for tokio_rustls::server::TlsStream<TcpStream> {
    fn plain(&self) -> Option<&TcpStream> {
        None
    }
}

/// Serves on `listener` until dropped: dropping it ends every connection too (they read the
/// caches of `ctx`, which stop being current when the controllers stop).
pub async fn serve(
    listener: Arc<TcpListener>,
    ctx: Arc<Context>,
    keys: watch::Receiver<Option<Key>>,
    tls: Option<Tls>,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok((stream, _)) = accepted else {
            // Out of file descriptors, most likely: let some connections end.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (ctx, keys, tls) = (ctx.clone(), keys.clone(), tls.clone());
        let slot = slots.clone().try_acquire_owned();
        connections.spawn(async move {
            let Ok(_slot) = slot else {
                let mut stream = stream;
                let _ = tokio::time::timeout(limits.write_timeout, busy(&mut stream)).await;
                return;
            };
            let Some(tls) = tls else { return connection(stream, &ctx, &keys, &limits).await };
            // HTTPS only: no certificate loaded yet, no connection.
            let Some(config) = tls.borrow().clone() else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            if let Ok(Ok(stream)) = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                connection(stream, &ctx, &keys, &limits).await;
            }
        });
    }
}

/// 503 for a connection over the limit.
async fn busy(stream: &mut TcpStream) -> io::Result<()> {
    let body = "too many connections: try again shortly\n";
    let head = head_text(StatusCode::SERVICE_UNAVAILABLE, &text_headers(body, &[]), true);
    stream.write_all(format!("{head}{body}").as_bytes()).await?;
    stream.shutdown().await
}

/// One parsed request head.
#[derive(Debug, Default)]
struct Head {
    method: String,
    target: String,
    /// HTTP/1.0 (no keep-alive unless asked).
    http10: bool,
    range: Option<String>,
    if_range: Option<String>,
    connection: Option<String>,
    host: bool,
    /// It announces a body (which this server reads only for uploads).
    body: bool,
    /// `Content-Length`, when given and a number.
    content_length: Option<u64>,
    /// `Transfer-Encoding` was given.
    chunked: bool,
    /// `Authorization: Bearer <token>`: the token.
    bearer: Option<String>,
}

impl Head {
    /// Whether the connection stays open after the answer.
    fn keep_alive(&self) -> bool {
        let says = |token: &str| {
            self.connection.as_deref().is_some_and(|c| c.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        };
        if self.http10 { says("keep-alive") } else { !says("close") }
    }

    /// The path of the target, without its query; an absolute-form target's path.
    fn path(&self) -> Option<&str> {
        let target = self.target.as_str();
        let target = match target.find("://") {
            Some(at) if !target.starts_with('/') => {
                let rest = &target[at + 3..];
                &rest[rest.find('/')?..]
            }
            _ => target,
        };
        target.starts_with('/').then(|| target.split(['?', '#']).next().unwrap_or(target))
    }
}

/// What reading a request head came to.
enum Read {
    /// A whole head.
    Head(Head),
    /// The client is gone, or idle too long: close without a word.
    Closed,
    /// A malformed or oversized head: answer this and close.
    Refuse(StatusCode, &'static str),
}

fn parse(buf: &[u8]) -> Result<Option<(Head, usize)>, (StatusCode, &'static str)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let size = match req.parse(buf) {
        Ok(httparse::Status::Complete(size)) => size,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::Version) => {
            return Err((StatusCode::HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.1 and HTTP/1.0 are served\n"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err((StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "too many request headers\n"));
        }
        Err(_) => return Err((StatusCode::BAD_REQUEST, "malformed request\n")),
    };
    let mut head = Head {
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        http10: req.version == Some(0),
        ..Head::default()
    };
    for h in req.headers.iter() {
        let value = || std::str::from_utf8(h.value).ok().map(str::to_string);
        match h.name.to_ascii_lowercase().as_str() {
            "host" => head.host = true,
            "range" => head.range = value(),
            "if-range" => head.if_range = value(),
            "connection" => head.connection = value(),
            "content-length" => {
                head.body |= value().is_none_or(|v| v.trim() != "0");
                head.content_length = value().and_then(|v| v.trim().parse().ok());
            }
            "transfer-encoding" => {
                head.body = true;
                head.chunked = true;
            }
            "authorization" => {
                head.bearer = value().and_then(|v| {
                    let (scheme, token) = v.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
                })
            }
            _ => {}
        }
    }
    Ok(Some((head, size)))
}

/// Reads the next request head into `buf` (which may hold pipelined bytes already).
async fn read_head<C: Conn>(conn: &mut C, buf: &mut Vec<u8>, limits: &Limits) -> Read {
    let mut deadline = None;
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Ok(Some((head, size))) => {
                    buf.drain(..size);
                    return Read::Head(head);
                }
                Ok(None) if buf.len() >= limits.max_head => {
                    return Read::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large\n");
                }
                Ok(None) => {}
                Err((status, why)) => return Read::Refuse(status, why),
            }
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + limits.header_timeout);
        }
        let wait = match deadline {
            Some(deadline) => deadline.saturating_duration_since(tokio::time::Instant::now()),
            None => limits.idle_timeout,
        };
        let mut chunk = [0u8; 4096];
        let room = (limits.max_head + 1).saturating_sub(buf.len()).min(chunk.len());
        match tokio::time::timeout(wait, conn.read(&mut chunk[..room])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Read::Closed,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            // A head begun and not finished in time: 408, as nginx and Apache answer.
            Err(_) if deadline.is_some() => {
                return Read::Refuse(StatusCode::REQUEST_TIMEOUT, "request head too slow\n");
            }
            Err(_) => return Read::Closed,
        }
    }
}

/// Serves the requests of one connection, one after the other.
async fn connection<C: Conn>(mut conn: C, ctx: &Context, keys: &watch::Receiver<Option<Key>>, limits: &Limits) {
    let mut buf = Vec::new();
    loop {
        let head = match read_head(&mut conn, &mut buf, limits).await {
            Read::Head(head) => head,
            Read::Closed => return,
            Read::Refuse(status, why) => {
                let _ = write_text(&mut conn, status, why, &[], true, false, limits).await;
                return;
            }
        };
        let keep_alive = head.keep_alive();
        if head.method == "PUT" && head.path().is_some_and(|p| p.starts_with(super::upload::PREFIX)) {
            // An upload is the connection's last request.
            let _ = upload(&mut conn, buf, ctx, &head, limits).await;
            let _ = tokio::time::timeout(limits.write_timeout, conn.shutdown()).await;
            return;
        }
        let refusal = match head.path() {
            _ if !head.http10 && !head.host => Some("a Host header is required\n"),
            // A body would have to be read past; none is expected.
            _ if head.body => Some("a request body is not accepted\n"),
            None => Some("malformed request target\n"),
            Some(_) => None,
        };
        if let Some(why) = refusal {
            let _ = write_text(&mut conn, StatusCode::BAD_REQUEST, why, &[], true, false, limits).await;
            return;
        }
        let path = head.path().unwrap_or_default().to_string();
        let asked = Asked {
            method: &head.method,
            path: &path,
            range: head.range.as_deref(),
            if_range: head.if_range.as_deref(),
        };
        let key = keys.borrow().clone();
        let reply = server::answer(ctx, key.as_ref(), &asked).await;
        let head_only = head.method == "HEAD";
        let sent = match reply {
            Reply::Text { status, body, headers } => {
                write_text(&mut conn, status, body, &headers, !keep_alive, head_only, limits).await
            }
            Reply::Object { status, readable, range, total, opener } => {
                let still = || still_readable(ctx, keys, &path, &readable);
                let object = Object { status, readable: &readable, range, total, opener };
                write_object(&mut conn, object, !keep_alive, head_only, limits, still).await
            }
        };
        if sent.is_err() || !keep_alive {
            let _ = tokio::time::timeout(limits.write_timeout, conn.shutdown()).await;
            return;
        }
    }
}

/// Receives an upload (see [`super::upload`]): hands its body to the capture that waits for it,
/// chunk by chunk, and answers with what came of it. What the mover still sends after a refusal
/// is read and dropped (up to [`DRAIN`]), so that it reads the answer rather than a reset.
async fn upload<C: Conn>(conn: &mut C, buf: Vec<u8>, ctx: &Context, head: &Head, limits: &Limits) -> io::Result<()> {
    let (status, body, unread) = receive_upload(conn, buf, ctx, head, limits).await;
    let head = head_text(status, &text_headers(&body, &[]), true);
    write_timed(conn, format!("{head}{body}").as_bytes(), limits).await?;
    let mut left = unread.min(DRAIN);
    let mut chunk = vec![0u8; 64 * 1024];
    while left > 0 {
        let room = left.min(chunk.len() as u64) as usize;
        match tokio::time::timeout(Duration::from_secs(2), conn.read(&mut chunk[..room])).await {
            Ok(Ok(n)) if n > 0 => left -= n as u64,
            _ => break,
        }
    }
    Ok(())
}

/// The most of a refused upload's body read and dropped before the connection closes.
const DRAIN: u64 = 64 << 20;

/// An upload's answer (status and text) and how many bytes of its body were not read.
async fn receive_upload<C: Conn>(
    conn: &mut C,
    mut buf: Vec<u8>,
    ctx: &Context,
    head: &Head,
    limits: &Limits,
) -> (StatusCode, String, u64) {
    let announced = head.content_length.unwrap_or(0);
    let not_found = (StatusCode::NOT_FOUND, server::NOT_FOUND.to_string(), announced);
    let path = head.path().unwrap_or_default();
    let Some(sender) = ctx.uploads.take(path, head.bearer.as_deref()) else { return not_found };
    let Some(length) = head.content_length.filter(|_| !head.chunked) else {
        let why = "an upload needs a Content-Length (and no Transfer-Encoding)\n";
        return (StatusCode::LENGTH_REQUIRED, why.into(), 0);
    };
    let (chunks, body) = tokio::sync::mpsc::channel(4);
    let (told, outcome) = tokio::sync::oneshot::channel();
    if sender.send(super::upload::Upload { length, body, answer: told }).is_err() {
        return not_found;
    }
    let mut received: u64 = 0;
    buf.truncate(length.min(buf.len() as u64) as usize);
    if !buf.is_empty() {
        received = buf.len() as u64;
        let _ = chunks.send(Ok(Bytes::from(buf))).await;
    }
    let mut chunk = vec![0u8; CHUNK as usize];
    while received < length {
        let room = (length - received).min(CHUNK) as usize;
        let broke = |why: &str| format!("the upload broke off after {received} of {length} bytes ({why})");
        let item = match tokio::time::timeout(limits.idle_timeout, conn.read(&mut chunk[..room])).await {
            Ok(Ok(0)) => Err(broke("the mover closed the connection")),
            Ok(Ok(n)) => {
                received += n as u64;
                Ok(Bytes::copy_from_slice(&chunk[..n]))
            }
            Ok(Err(e)) => Err(broke(&e.to_string())),
            Err(_) => Err(broke(&format!("nothing for {}s", limits.idle_timeout.as_secs()))),
        };
        let failed = item.is_err();
        // The capture stops reading when it has failed (too large, say): its answer says why.
        if chunks.send(item).await.is_err() || failed {
            break;
        }
    }
    drop(chunks);
    let unread = length - received;
    match outcome.await {
        Ok(Ok(())) => (StatusCode::CREATED, "stored\n".into(), unread),
        Ok(Err(why)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{why}\n"), unread),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the capture ended before the upload did\n".into(), unread),
    }
}

fn still_readable(ctx: &Context, keys: &watch::Receiver<Option<Key>>, path: &str, readable: &Readable) -> bool {
    server::still_readable(ctx, keys.borrow().as_ref(), path, &readable.object)
}

fn text_headers(body: &str, extra: &[(http::HeaderName, String)]) -> Vec<(String, String)> {
    let mut headers = vec![
        ("Content-Type".to_string(), "text/plain; charset=utf-8".to_string()),
        ("Content-Length".to_string(), body.len().to_string()),
    ];
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    headers
}

/// The status line and headers of an answer.
fn head_text(status: StatusCode, headers: &[(String, String)], close: bool) -> String {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nDate: {}\r\nCache-Control: no-store\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(if close { "Connection: close\r\n\r\n" } else { "\r\n" });
    out
}

async fn write_timed<C: Conn>(conn: &mut C, bytes: &[u8], limits: &Limits) -> io::Result<()> {
    match tokio::time::timeout(limits.write_timeout, conn.write_all(bytes)).await {
        Ok(done) => done,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_text<C: Conn>(
    conn: &mut C,
    status: StatusCode,
    body: &'static str,
    extra: &[(http::HeaderName, String)],
    close: bool,
    head_only: bool,
    limits: &Limits,
) -> io::Result<()> {
    let head = head_text(status, &text_headers(body, extra), close);
    let body = if head_only { "" } else { body };
    write_timed(conn, format!("{head}{body}").as_bytes(), limits).await?;
    conn.flush().await
}

/// What one answer sends: bytes `range` of a stored object of `total` bytes.
struct Object<'a> {
    status: StatusCode,
    readable: &'a Readable,
    range: std::ops::Range<u64>,
    total: u64,
    /// Set for an encrypted object: its plaintext is sent.
    opener: Option<std::sync::Arc<crate::crypt::Opener>>,
}

/// Headers, then bytes `range` of the object, checking `still` before each chunk: when it
/// fails, the connection is cut (the client sees fewer bytes than Content-Length said).
async fn write_object<C: Conn>(
    conn: &mut C,
    object: Object<'_>,
    close: bool,
    head_only: bool,
    limits: &Limits,
    still: impl Fn() -> bool,
) -> io::Result<()> {
    if object.opener.is_some() {
        return write_sealed(conn, object, close, head_only, limits, still).await;
    }
    let Object { status, readable, range, total, .. } = object;
    write_timed(conn, head_text(status, &object_headers(status, readable, &range, total), close).as_bytes(), limits)
        .await?;
    conn.flush().await?;
    if head_only || range.is_empty() {
        return Ok(());
    }
    let cut = || io::Error::new(io::ErrorKind::PermissionDenied, "the capability no longer reads this object");
    match readable.store.local_file(&readable.object) {
        Some(path) => {
            let file = std::fs::File::open(path)?;
            if let Some(socket) = conn.plain() {
                return sendfile(socket, &file, range, limits, &still).await;
            }
            let mut file = tokio::fs::File::from_std(file);
            let mut buf = vec![0u8; CHUNK as usize];
            let mut at = range.start;
            tokio::io::AsyncSeekExt::seek(&mut file, io::SeekFrom::Start(at)).await?;
            while at < range.end {
                if !still() {
                    return Err(cut());
                }
                let want = (range.end - at).min(CHUNK) as usize;
                file.read_exact(&mut buf[..want]).await?;
                write_timed(conn, &buf[..want], limits).await?;
                at += want as u64;
            }
            conn.flush().await
        }
        None => {
            let options = GetOptions { range: Some(GetRange::Bounded(range)), ..Default::default() };
            let got =
                readable.store.object_store().get_opts(&readable.object, options).await.map_err(io::Error::other)?;
            let mut stream = got.into_stream();
            while let Some(bytes) = futures::StreamExt::next(&mut stream).await {
                if !still() {
                    return Err(cut());
                }
                write_timed(conn, &bytes.map_err(io::Error::other)?, limits).await?;
            }
            conn.flush().await
        }
    }
}

/// The headers of an object's answer.
fn object_headers(
    status: StatusCode,
    readable: &Readable,
    range: &std::ops::Range<u64>,
    total: u64,
) -> Vec<(String, String)> {
    let mut headers = vec![
        ("Content-Type".to_string(), "application/octet-stream".to_string()),
        ("Content-Length".to_string(), (range.end - range.start).to_string()),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
        ("ETag".to_string(), server::etag(readable)),
    ];
    if status == StatusCode::PARTIAL_CONTENT {
        headers.push(("Content-Range".to_string(), format!("bytes {}-{}/{total}", range.start, range.end - 1)));
    }
    headers
}

/// An encrypted object's answer: its plaintext, opened segment by segment. The first batch is
/// opened before the headers go, so a range whose bytes fail authentication gets a clean 500;
/// a failure further on cuts the connection (never a wrong byte).
async fn write_sealed<C: Conn>(
    conn: &mut C,
    object: Object<'_>,
    close: bool,
    head_only: bool,
    limits: &Limits,
    still: impl Fn() -> bool,
) -> io::Result<()> {
    let Object { status, readable, range, total, opener } = object;
    let Some(opener) = opener else { return Err(io::Error::other("write_sealed needs an encrypted object")) };
    let store = readable.store.object_store().clone();
    let mut stream = crate::crypt::plain_stream(store, readable.object.clone(), opener, range.clone());
    let first = if head_only || range.is_empty() {
        None
    } else {
        match futures::StreamExt::next(&mut stream).await {
            Some(Ok(bytes)) => Some(bytes),
            Some(Err(e)) => {
                tracing::warn!(object = %readable.object, error = %e, "an encrypted image does not open: not served");
                let (status, body) = match e {
                    crate::crypt::CryptError::Envelope(_) => (StatusCode::INTERNAL_SERVER_ERROR, server::CORRUPT),
                    _ => (StatusCode::SERVICE_UNAVAILABLE, server::UNREADABLE),
                };
                return write_text(conn, status, body, &[], true, false, limits).await;
            }
            None => None,
        }
    };
    write_timed(conn, head_text(status, &object_headers(status, readable, &range, total), close).as_bytes(), limits)
        .await?;
    let Some(first) = first else { return conn.flush().await };
    if !still() {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the capability no longer reads this object"));
    }
    write_timed(conn, &first, limits).await?;
    while let Some(bytes) = futures::StreamExt::next(&mut stream).await {
        if !still() {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the capability no longer reads this object"));
        }
        write_timed(conn, &bytes.map_err(io::Error::other)?, limits).await?;
    }
    conn.flush().await
}

/// Bytes `range` of `file` to `socket` with sendfile(2), a chunk at a time.
async fn sendfile(
    socket: &TcpStream,
    file: &std::fs::File,
    range: std::ops::Range<u64>,
    limits: &Limits,
    still: &impl Fn() -> bool,
) -> io::Result<()> {
    let mut offset = i64::try_from(range.start).map_err(io::Error::other)?;
    let end = i64::try_from(range.end).map_err(io::Error::other)?;
    while offset < end {
        if !still() {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the capability no longer reads this object"));
        }
        let chunk_end = (offset + CHUNK as i64).min(end);
        while offset < chunk_end {
            match tokio::time::timeout(limits.write_timeout, socket.writable()).await {
                Ok(ready) => ready?,
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            }
            // Checked again after every wait for the client: nothing more goes once it fails.
            if !still() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the capability no longer reads this object",
                ));
            }
            let count = (chunk_end - offset) as usize;
            match socket.try_io(tokio::io::Interest::WRITABLE, || {
                nix::sys::sendfile::sendfile(socket, file, Some(&mut offset), count).map_err(io::Error::from)
            }) {
                // The file is shorter than it was: stop rather than send something else.
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher;
    use object_store::ObjectStoreExt;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        api::Image,
        delivery::{Capability, server::NOT_FOUND},
        store::{RegionStore, StoreConfig},
    };

    fn image(namespace: &str, name: &str, uid: &str, spec: serde_json::Value, status: serde_json::Value) -> Image {
        serde_json::from_value(json!({"apiVersion": "ims.io/v1alpha1", "kind": "Image",
            "metadata": {"name": name, "namespace": namespace, "uid": uid}, "spec": spec, "status": status}))
        .unwrap()
    }

    /// An answer as a client reads it.
    struct Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Answer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    /// Splits what a connection answered (up to its end) into its first answer.
    fn parse_answer(raw: &[u8]) -> Answer {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a whole head") + 4;
        let head = String::from_utf8_lossy(&raw[..end]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        Answer { status, headers, body: raw[end..].to_vec() }
    }

    /// Sends `request` as it is and reads until the server closes.
    async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out)).await;
        out
    }

    async fn get(addr: std::net::SocketAddr, method: &str, path: &str, extra: &str) -> Answer {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n");
        parse_answer(&raw(addr, request.as_bytes()).await)
    }

    struct Served {
        addr: std::net::SocketAddr,
        key: Key,
        keys: watch::Sender<Option<Key>>,
        caches: crate::controllers::context::TestCaches,
        bytes: Vec<u8>,
        _task: crate::controllers::AbortOnDrop<()>,
        _dir: tempfile::TempDir,
    }

    impl Served {
        fn path(&self, ns: &str, name: &str, uid: &str) -> String {
            Capability { namespace: ns.into(), name: name.into(), uid: uid.into(), disk: "disk".into() }.path(&self.key)
        }

        fn make_private(&mut self) {
            let spec = json!({"region": "r", "type": "DataDisk", "source": {"url": {"url": "https://x/y"}}});
            let active = json!({"phase": "Active", "checksum": {"sha256": "abc"}});
            self.caches.images.apply_watcher_event(&watcher::Event::Apply(image("owner", "img", "u1", spec, active)));
        }
    }

    /// An image server over a file store holding `size` bytes as `owner/img` (Marketplace, so
    /// `tenant/ref` may read it), `owner/saving` not Active, with `limits`.
    async fn served(size: usize, limits: Limits) -> Served {
        let (client, _) = crate::controllers::test_api(&[]).await;
        let (ctx, mut caches) = Context::for_test(client);
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: dir.path().into() };
        let spec = crate::api::RegionStorage { url: "file:///var/lib/ims/r".into(), ..Default::default() };
        let store = RegionStore::open(&spec, &config, None).unwrap();
        let bytes: Vec<u8> = (0..size as u32).map(|i| (i % 251) as u8).collect();
        let object = store.image_prefix("owner", "img", "u1").join("disk");
        store.object_store().put(&object, bytes.clone().into()).await.unwrap();
        ctx.stores.lock().unwrap().insert("r".into(), store);
        let active = json!({"phase": "Active", "checksum": {"sha256": "abc"}});
        let owned = json!({"region": "r", "type": "DataDisk", "visibility": "Marketplace", "source": {"url": {"url": "https://x/y"}}});
        let reference = json!({"region": "r", "source": {"image": {"namespace": "owner", "name": "img"}}});
        for i in [
            image("owner", "img", "u1", owned.clone(), active.clone()),
            image("owner", "saving", "u2", owned, json!({"phase": "Saving"})),
            image("tenant", "ref", "u3", reference, json!({"phase": "Active", "source": {"uid": "u1"}})),
        ] {
            caches.images.apply_watcher_event(&watcher::Event::Apply(i));
        }
        let key = Key::from_bytes(&[7u8; 32]).unwrap();
        let (tx, keys) = watch::channel(Some(key.clone()));
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = listener.local_addr().unwrap();
        let task = crate::controllers::AbortOnDrop(tokio::spawn(serve(listener, Arc::new(ctx), keys, None, limits)));
        Served { addr, key, keys: tx, caches, bytes, _task: task, _dir: dir }
    }

    /// Exactly the stored bytes, whole, in a range, or as headers only; and one and the same
    /// 404 for a tampered token, a replaced image, one not Active, and a reference without a
    /// grant, while a granted reference reads its source's bytes.
    #[tokio::test]
    async fn serves_the_stored_bytes_only_to_a_valid_capability() {
        let mut s = served(100_000, Limits::default()).await;
        let good = s.path("owner", "img", "u1");
        let a = get(s.addr, "GET", &good, "").await;
        assert_eq!((a.status, a.body.len()), (200, s.bytes.len()));
        assert!(a.body == s.bytes, "exactly the stored bytes");
        assert_eq!(a.header("content-length"), Some("100000"));
        assert_eq!(a.header("etag"), Some("\"abc\""));
        assert_eq!(a.header("accept-ranges"), Some("bytes"));
        let a = get(s.addr, "HEAD", &good, "").await;
        assert_eq!((a.status, a.body.len(), a.header("content-length")), (200, 0, Some("100000")));
        let a = get(s.addr, "GET", &good, "Range: bytes=1000-1999\r\n").await;
        assert_eq!((a.status, a.header("content-range")), (206, Some("bytes 1000-1999/100000")));
        assert!(a.body == s.bytes[1000..2000]);
        let a = get(s.addr, "GET", &good, "Range: bytes=100000-\r\n").await;
        assert_eq!((a.status, a.header("content-range")), (416, Some("bytes */100000")));
        // If-Range with another ETag: the whole object.
        let a = get(s.addr, "GET", &good, "Range: bytes=0-9\r\nIf-Range: \"other\"\r\n").await;
        assert_eq!((a.status, a.body.len()), (200, 100_000));
        // A granted reference (the source is Marketplace) reads the source's bytes.
        let a = get(s.addr, "GET", &s.path("tenant", "ref", "u3"), "").await;
        assert_eq!(a.status, 200);
        assert!(a.body == s.bytes);

        let refused = [
            good.replace("/u1/", "/u9/"),
            format!("{}A", &good[..good.len() - 1]),
            s.path("owner", "img", "u9"),
            s.path("owner", "saving", "u2"),
            s.path("owner", "missing", "u4"),
            "/v1/images/owner/img/u1/disk/".into(),
            "/".into(),
            good.replace("/owner/", "/owner/../owner/"),
            good.replace("/owner/img/", "/owner%2Fimg/"),
            format!("{good}?x=1").replace("/disk/", "/disk%2F"),
        ];
        for bad in &refused {
            let a = get(s.addr, "GET", bad, "").await;
            assert_eq!((a.status, a.body.as_slice()), (404, NOT_FOUND.as_bytes()), "{bad}");
        }
        // A query string is not part of the capability.
        assert_eq!(get(s.addr, "GET", &format!("{good}?download=1"), "").await.status, 200);
        // The source made Private (no ImageShare): the reference's URL stops at once.
        s.make_private();
        let a = get(s.addr, "GET", &s.path("tenant", "ref", "u3"), "").await;
        assert_eq!((a.status, a.body.as_slice()), (404, NOT_FOUND.as_bytes()));
        let a = get(s.addr, "POST", &good, "").await;
        assert_eq!((a.status, a.header("allow")), (405, Some("GET, HEAD")));
        // A rotated key: the old URL is unknown.
        s.keys.send_replace(Key::from_bytes(&[8u8; 32]));
        assert_eq!(get(s.addr, "GET", &good, "").await.status, 404);
    }

    /// Malformed requests get their 4xx (or 505), none reaches the store, and the server goes
    /// on serving; HTTP/1.0 is served and closed; keep-alive serves pipelined requests in order.
    #[tokio::test]
    async fn bad_requests_get_their_4xx_and_the_server_keeps_serving() {
        let limits = Limits { header_timeout: Duration::from_millis(300), ..Limits::default() };
        let s = served(1000, limits).await;
        let good = s.path("owner", "img", "u1");
        let status = |raw: Vec<u8>| parse_answer(&raw).status;
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (b"GARBAGE\r\n\r\n".to_vec(), 400),
            (format!("GET {good} HTTP/2.0\r\nHost: x\r\n\r\n").into_bytes(), 505),
            (format!("GET {good} HTTP/1.1\r\n\r\n").into_bytes(), 400),
            (format!("GET {good} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").into_bytes(), 400),
            (
                format!("GET {good} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes(),
                400,
            ),
            (format!("GET {good} HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(20_000)).into_bytes(), 431),
            (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
            (format!("GET {good} HTTP/1.0\r\n\r\n").into_bytes(), 200),
            (format!("GET http://x{good} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes(), 200),
        ];
        for (request, want) in cases {
            assert_eq!(
                status(raw(s.addr, &request).await),
                want,
                "{}",
                String::from_utf8_lossy(&request[..60.min(request.len())])
            );
        }
        // Ranges: malformed ones are ignored (the whole object, RFC 9110), one past the end is
        // 416, a huge end is cut to the object's end.
        for (range, want, len) in [
            ("bytes=abc", 200, 1000),
            ("bytes=5-1", 416, 22),
            ("bytes=0-99999999999999999", 206, 1000),
            ("bytes=990-99999999999", 206, 10),
            ("bytes=-99999999999999999999", 200, 1000),
        ] {
            let a = get(s.addr, "GET", &good, &format!("Range: {range}\r\n")).await;
            assert_eq!((a.status, a.body.len()), (want, len), "{range}");
        }
        // Slowloris: a head that does not finish in time gets 408; one never begun just closes.
        let mut slow = TcpStream::connect(s.addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut out)).await.expect("closed").unwrap();
        assert_eq!(parse_answer(&out).status, 408);
        // Keep-alive: two pipelined requests on one connection, answered in order.
        let request = format!(
            "HEAD {good} HTTP/1.1\r\nHost: x\r\n\r\nGET {good} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\nConnection: close\r\n\r\n"
        );
        let out = raw(s.addr, request.as_bytes()).await;
        let first = parse_answer(&out);
        assert_eq!(first.status, 200);
        let second = parse_answer(&first.body);
        assert_eq!((second.status, second.body.as_slice()), (206, &s.bytes[..4]));
        // And the server still serves.
        assert_eq!(get(s.addr, "GET", &good, "").await.body, s.bytes);
    }

    /// A transfer in flight stops when the grant goes: the reader that paused gets no more than
    /// what was already on its way, the connection closes short of Content-Length, and the
    /// next request is a 404.
    #[tokio::test]
    async fn a_revoked_grant_cuts_a_transfer_in_flight() {
        let size = 64 << 20;
        let mut s = served(size, Limits::default()).await;
        let path = s.path("tenant", "ref", "u3");
        let mut stream = TcpStream::connect(s.addr).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut first = vec![0u8; 64 * 1024];
        stream.read_exact(&mut first).await.unwrap();
        // Let the server fill the socket buffers, then revoke while the reader pauses.
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.make_private();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
        let got = first.len() + rest.len();
        assert!(got < size / 2, "{got} bytes of {size} arrived: the transfer was not cut");
        assert_eq!(get(s.addr, "GET", &path, "").await.status, 404);
    }
}
