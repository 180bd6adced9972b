//! Opening an image source URL as a byte stream, behind an SSRF guard.
//!
//! [`open`] accepts `http://`, `https://` and (when the operator allows it) `file://` URLs and
//! returns a [`Source`]: the body as a stream of chunks plus what the server said about its
//! length. The body is never buffered whole and its announced length is only informational; the
//! caller enforces size limits while it streams.
//!
//! The SSRF guard works on addresses, not names: the host is resolved here, every resolved
//! address is screened with [`refusal`] (unless it is inside one of the operator's
//! [`FetchPolicy::allow_cidrs`]), and the TCP socket is connected to one of the screened
//! addresses, so a name cannot resolve differently between the check and the connect (no DNS
//! rebinding). Every redirect hop is parsed and screened the same way; https never redirects to
//! plain http, and redirects never lead to `file://`.

mod addr;
#[cfg(test)]
mod tests;

// Entry points of the fuzz targets in fuzz/ (tests and the `fuzzing` feature only).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

pub use addr::{Cidr, CidrError, refusal};

/// Default for [`FetchPolicy::max_redirects`].
pub const DEFAULT_MAX_REDIRECTS: usize = 5;
/// Default for [`FetchPolicy::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`FetchPolicy::read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Size of the chunks a `file://` source is streamed in (when it is streamed: into a `file://`
/// store the import copies the file in the kernel instead). 256 KiB chunks stay in the CPU
/// caches while an import hashes and stores them; 1 MiB chunks were slower (docs/PERFORMANCE.md).
pub const FILE_CHUNK_SIZE: usize = 256 * 1024;

const USER_AGENT: &str = "ims-operator";

/// What imports may reach.
///
/// `FetchPolicy::default()` allows public http(s) addresses only, follows up to 5 redirects, and
/// uses a 10 s connect timeout and a 60 s read timeout.
#[derive(Clone, Debug)]
pub struct FetchPolicy {
    /// Whether `file://` sources are allowed (operator flags `--file-import-roots`,
    /// `--allow-file-imports`).
    pub allow_file: bool,
    /// `file://` paths must (after resolving symlinks) lie under one of these; with none, no
    /// `file://` source is read even when `allow_file` is set.
    pub file_roots: Vec<PathBuf>,
    /// Directories no `file://` import reads from, whatever `file_roots` say: the operator's
    /// own `file://` region stores (other tenants' bytes are there; the controllers add them).
    /// The kernel's file systems ([`KERNEL_FILE_SYSTEMS`]) are never read either.
    pub file_denied: Vec<PathBuf>,
    /// Addresses inside these blocks are allowed even if private, loopback, etc.
    /// (operator flag `--import-allow-cidrs`).
    pub allow_cidrs: Vec<Cidr>,
    /// How many redirects are followed; 0 follows none.
    pub max_redirects: usize,
    /// Budget for each hop's DNS resolution, TCP connect, TLS handshake and response headers.
    /// Zero means [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Longest wait for the next body chunk before the transfer is abandoned.
    /// Zero means [`DEFAULT_READ_TIMEOUT`].
    pub read_timeout: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            allow_file: false,
            file_roots: Vec::new(),
            file_denied: Vec::new(),
            allow_cidrs: Vec::new(),
            max_redirects: DEFAULT_MAX_REDIRECTS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }
}

impl FetchPolicy {
    fn effective_connect_timeout(&self) -> Duration {
        if self.connect_timeout.is_zero() { DEFAULT_CONNECT_TIMEOUT } else { self.connect_timeout }
    }

    fn effective_read_timeout(&self) -> Duration {
        if self.read_timeout.is_zero() { DEFAULT_READ_TIMEOUT } else { self.read_timeout }
    }

    fn allow_listed(&self, ip: IpAddr) -> bool {
        self.allow_cidrs.iter().any(|c| c.contains(ip))
    }
}

/// An open source: the response body as a stream, with what the server said about length.
pub struct Source {
    /// The length the server announced (or the file size). Informational only: the stream may
    /// turn out shorter (that ends in an error) or the caller's limits may be smaller.
    pub content_length: Option<u64>,
    /// The URL the data comes from, after redirects.
    pub final_url: String,
    /// The body, chunk by chunk. It ends with `None` after the last chunk, or with one `Err`
    /// when the transfer fails (stall, broken connection, truncated body, read error).
    pub stream: BoxStream<'static, Result<Bytes, FetchError>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("content_length", &self.content_length)
            .field("final_url", &self.final_url)
            .finish_non_exhaustive()
    }
}

/// Why a source could not be opened or read. The `Display` text says what is wrong and what to
/// change; URLs in it have their query string elided (`?…`), as it may carry credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The URL is malformed or uses a form that is not supported.
    #[error("invalid image URL {url}: {reason}")]
    BadUrl {
        /// The offending URL (query elided).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL scheme is not http, https or file.
    #[error(
        "unsupported URL scheme {scheme} in {url}; image sources must be http:// or https:// URLs \
         (or file:// when the operator allows file imports)"
    )]
    UnsupportedScheme {
        /// The URL (query elided).
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// The SSRF guard refused every address the host stands for.
    #[error(
        "refused to fetch {url}: {}; imports may only reach public addresses unless the operator \
         allow-lists them with --import-allow-cidrs",
        describe_refusal(.name.as_deref(), *.ip, .reason)
    )]
    Refused {
        /// The URL (query elided).
        url: String,
        /// The host name that resolved to `ip`; `None` when the host was an IP literal.
        name: Option<String>,
        /// The (first) refused address.
        ip: IpAddr,
        /// The reason from [`refusal`].
        reason: &'static str,
    },
    /// A redirect was not followed.
    #[error("refused to follow the redirect from {from} to {to}: {reason}")]
    BadRedirect {
        /// The URL that answered with the redirect (query elided).
        from: String,
        /// Where it pointed (query elided).
        to: String,
        /// Why it was not followed.
        reason: String,
    },
    /// A redirect response without a usable `Location` header.
    #[error("{url} answered {} without a usable Location header", status_text(*.status))]
    MissingLocation {
        /// The URL that answered (query elided).
        url: String,
        /// The redirect status.
        status: StatusCode,
    },
    /// More redirects than [`FetchPolicy::max_redirects`].
    #[error("too many redirects (more than {max}) starting at {url}; point the import at the final URL")]
    TooManyRedirects {
        /// The URL the import started at (query elided).
        url: String,
        /// The limit.
        max: usize,
    },
    /// DNS resolution failed.
    #[error("{host} did not resolve: {source}; check the host name and the cluster's DNS")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver error.
        source: io::Error,
    },
    /// DNS resolution returned no address.
    #[error("{host} did not resolve to any address; check the host name and the cluster's DNS")]
    NoAddress {
        /// The host name.
        host: String,
    },
    /// No screened address accepted a TCP connection.
    #[error("could not connect to {addr} for {url}: {source}")]
    Connect {
        /// The URL (query elided).
        url: String,
        /// The last address tried.
        addr: SocketAddr,
        /// The connect error.
        source: io::Error,
    },
    /// Resolution, connect, TLS handshake and response headers together took longer than
    /// [`FetchPolicy::connect_timeout`].
    #[error(
        "{url} did not answer within {} (DNS, connect, TLS and response headers); the server may be \
         down, unreachable or overloaded",
        secs(*.timeout)
    )]
    ConnectTimeout {
        /// The URL (query elided).
        url: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The TLS handshake failed (for example, an untrusted or mismatched certificate).
    #[error("TLS handshake with {host} for {url} failed: {source}")]
    Tls {
        /// The URL (query elided).
        url: String,
        /// The host name (or address) the certificate was checked against.
        host: String,
        /// The handshake error.
        source: io::Error,
    },
    /// The TLS client could not be set up (no trusted root certificates).
    #[error("cannot set up TLS: {reason}")]
    TlsSetup {
        /// Why.
        reason: String,
    },
    /// The HTTP exchange failed before response headers arrived.
    #[error("HTTP request to {url} failed: {source}")]
    Http {
        /// The URL (query elided).
        url: String,
        /// The HTTP error.
        source: hyper::Error,
    },
    /// The final response was not a success.
    #[error("{url} answered {}", status_text(*.status))]
    Status {
        /// The URL (query elided).
        url: String,
        /// The status.
        status: StatusCode,
    },
    /// No body data arrived for [`FetchPolicy::read_timeout`].
    #[error("no data for {} from {url}; the server stalled mid-transfer", secs(*.timeout))]
    ReadTimeout {
        /// The URL (query elided).
        url: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The body broke off (connection closed or reset, or shorter than announced).
    #[error("the transfer from {url} broke off: {source}")]
    Body {
        /// The URL (query elided).
        url: String,
        /// The HTTP error.
        source: hyper::Error,
    },
    /// A `file://` source while file imports are disabled.
    #[error("file:// sources are disabled; the operator allows them from the directories of --file-import-roots")]
    FileDisabled,
    /// A `file://` path that is not allowed.
    #[error("refused to read {}: {reason}", .path.display())]
    FileRefused {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A `file://` path that cannot be opened.
    #[error("cannot open {}: {source}", .path.display())]
    FileOpen {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Reading a `file://` source failed midway.
    #[error("reading {} failed: {source}", .path.display())]
    FileRead {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl FetchError {
    /// Whether retrying later may succeed: DNS failures, connect failures and timeouts, broken or
    /// stalled transfers, 5xx (and 408/429) answers and file read errors are transient; refusals,
    /// bad URLs, 4xx answers, certificate problems and disabled file imports are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Resolve { .. }
            | FetchError::NoAddress { .. }
            | FetchError::Connect { .. }
            | FetchError::ConnectTimeout { .. }
            | FetchError::Http { .. }
            | FetchError::ReadTimeout { .. }
            | FetchError::Body { .. }
            | FetchError::FileRead { .. } => true,
            FetchError::Tls { source, .. } => {
                // rustls errors (certificate, protocol) are permanent; I/O during the handshake is not.
                source.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_none()
            }
            FetchError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            FetchError::BadUrl { .. }
            | FetchError::UnsupportedScheme { .. }
            | FetchError::Refused { .. }
            | FetchError::BadRedirect { .. }
            | FetchError::MissingLocation { .. }
            | FetchError::TooManyRedirects { .. }
            | FetchError::TlsSetup { .. }
            | FetchError::FileDisabled
            | FetchError::FileRefused { .. }
            | FetchError::FileOpen { .. } => false,
        }
    }
}

fn describe_refusal(name: Option<&str>, ip: IpAddr, reason: &str) -> String {
    let (kind, note) = match reason.split_once(" (") {
        Some((k, n)) => (k, format!(" ({n}")),
        None => (reason, String::new()),
    };
    let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    let embedded = addr::embedded_v4_of(ip).map(|v4| format!(" (it embeds {v4})")).unwrap_or_default();
    match name {
        Some(name) => format!("{name} resolved to {ip}, {article} {kind} address{note}{embedded}"),
        None => format!("{ip} is {article} {kind} address{note}{embedded}"),
    }
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// The URL for every text a user sees (status, Events, logs): `user:password@` becomes `***@`,
/// and the query string (which may hold signatures or tokens) and the fragment are elided.
pub fn redact(url: &str) -> String {
    let url = url.split('#').next().unwrap_or(url);
    let url = match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (auth, tail) = rest.split_at(end);
            match auth.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}{tail}"),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    };
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url,
    }
}

/// Opens `url` as a byte stream under `policy`.
///
/// `http://` and `https://` URLs are fetched with a GET over HTTP/1.1, following redirects
/// (301, 302, 303, 307, 308) up to [`FetchPolicy::max_redirects`]; every hop is resolved,
/// screened with [`refusal`] and connected by address. `file://` URLs (only with
/// [`FetchPolicy::allow_file`]) are streamed in [`FILE_CHUNK_SIZE`] chunks. Must be called
/// inside a Tokio runtime.
pub async fn open(url: &str, policy: &FetchPolicy) -> Result<Source, FetchError> {
    open_with(url, policy, None).await
}

/// [`open`] with an optional TLS client configuration in place of the system roots.
async fn open_with(
    url: &str,
    policy: &FetchPolicy,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Source, FetchError> {
    let url = url.trim();
    match scheme_of(url) {
        Some(s) if s.eq_ignore_ascii_case("file") => open_file(url, policy).await,
        Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {
            open_http(url, policy, tls).await
        }
        Some(s) => Err(FetchError::UnsupportedScheme { url: redact(url), scheme: s.to_ascii_lowercase() }),
        None => Err(FetchError::BadUrl {
            url: redact(url),
            reason: "it has no scheme; use an absolute http:// or https:// URL".into(),
        }),
    }
}

/// The scheme of an absolute URL (`scheme ":" ...`), if it has one.
fn scheme_of(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once(':')?;
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    (first.is_ascii_alphabetic() && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
        .then_some(scheme)
}

// ---------------------------------------------------------------------------------------------
// http and https
// ---------------------------------------------------------------------------------------------

/// One parsed and validated http(s) URL.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    https: bool,
    /// Lower-cased host without brackets.
    host: String,
    /// The address the host spells, when it is an IP literal (including numeric IPv4 forms).
    literal: Option<IpAddr>,
    port: u16,
    /// `Host` header value: host (bracketed for IPv6) plus a non-default port.
    host_header: String,
    /// Request target: path and query, starting with `/`.
    path: String,
    /// Normalized URL.
    url: String,
}

impl Target {
    fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    fn display(&self) -> String {
        redact(&self.url)
    }
}

fn parse_target(url: &str) -> Result<Target, FetchError> {
    let bad = |reason: &str| FetchError::BadUrl { url: redact(url), reason: reason.to_string() };
    let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(&format!("{e}")))?;
    let https = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => true,
        Some(s) if s.eq_ignore_ascii_case("http") => false,
        Some(s) => return Err(FetchError::UnsupportedScheme { url: redact(url), scheme: s.to_ascii_lowercase() }),
        None => return Err(bad("it has no scheme; use an absolute http:// or https:// URL")),
    };
    let authority = uri.authority().ok_or_else(|| bad("it has no host"))?;
    let auth = authority.as_str();
    if auth.contains('@') {
        return Err(bad("credentials in the URL (user:password@host) are not supported"));
    }
    let raw_host = authority.host();
    if raw_host.is_empty() {
        return Err(bad("it has no host"));
    }
    let port_part = auth.get(raw_host.len()..).unwrap_or("");
    let default_port = if https { 443 } else { 80 };
    let port = match port_part.strip_prefix(':') {
        None | Some("") => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("the port must be a number from 1 to 65535")),
            Ok(n) => n,
        },
    };
    let (host, literal) = if let Some(inner) = raw_host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| bad("unterminated IPv6 address"))?;
        let v6: Ipv6Addr = inner.parse().map_err(|_| bad("the bracketed host is not an IPv6 address"))?;
        (v6.to_string(), Some(IpAddr::V6(v6)))
    } else {
        let host = raw_host.to_ascii_lowercase();
        if !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) {
            return Err(bad("the host name may only contain letters, digits, '-', '_' and '.'"));
        }
        match addr::numeric_ipv4(&host) {
            Some(Ok(v4)) => (host, Some(IpAddr::V4(v4))),
            Some(Err(())) => return Err(bad("the host looks like an IPv4 address but is not a valid one")),
            None => (host, None),
        }
    };
    let mut host_header = match literal {
        Some(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => host.clone(),
    };
    if port != default_port {
        host_header.push_str(&format!(":{port}"));
    }
    let mut path = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/").to_string();
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    let scheme = if https { "https" } else { "http" };
    let url = format!("{scheme}://{host_header}{path}");
    Ok(Target { https, host, literal, port, host_header, path, url })
}

/// Resolves a redirect `Location` against the URL that answered (RFC 3986 section 5.2).
fn resolve_location(base: &Target, location: &str) -> String {
    let loc = location.trim();
    let loc = loc.split('#').next().unwrap_or(loc);
    if loc.is_empty() {
        return base.url.clone();
    }
    if scheme_of(loc).is_some() {
        return loc.to_string();
    }
    if loc.starts_with("//") {
        return format!("{}:{loc}", base.scheme());
    }
    let (ref_path, query) = match loc.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (loc, None),
    };
    let (base_path, base_query) = match base.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (base.path.as_str(), None),
    };
    let (path, query) = if ref_path.is_empty() {
        (base_path.to_string(), query.or(base_query))
    } else if ref_path.starts_with('/') {
        (remove_dot_segments(ref_path), query)
    } else {
        let dir = base_path.rfind('/').and_then(|i| base_path.get(..=i)).unwrap_or("/");
        (remove_dot_segments(&format!("{dir}{ref_path}")), query)
    };
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{}://{}{path}{query}", base.scheme(), base.host_header)
}

/// RFC 3986 `remove_dot_segments` for an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

async fn open_http(
    url: &str,
    policy: &FetchPolicy,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Source, FetchError> {
    let mut target = parse_target(url)?;
    let start = target.display();
    let mut redirects = 0usize;
    loop {
        let timeout = policy.effective_connect_timeout();
        let (response, conn) = tokio::time::timeout(timeout, hop(&target, policy, tls))
            .await
            .map_err(|_| FetchError::ConnectTimeout { url: target.display(), timeout })??;
        let status = response.status();
        if status.is_success() {
            tracing::debug!(url = %target.display(), %status, "image source opened");
            return Ok(body_source(response, conn, target, policy.effective_read_timeout()));
        }
        if !is_redirect(status) {
            return Err(FetchError::Status { url: target.display(), status });
        }
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| FetchError::MissingLocation { url: target.display(), status })?;
        drop(response);
        drop(conn);
        if redirects >= policy.max_redirects {
            return Err(FetchError::TooManyRedirects { url: start, max: policy.max_redirects });
        }
        redirects += 1;
        let next = redirect_target(&target, &location)?;
        tracing::debug!(from = %target.display(), to = %next.display(), %status, "following redirect");
        target = next;
    }
}

/// Where a redirect from `target` with this `Location` leads, parsed and checked before any
/// connection: http(s) only (never `file://`), and never from https down to plain http.
fn redirect_target(target: &Target, location: &str) -> Result<Target, FetchError> {
    let next_url = resolve_location(target, location);
    let refuse = |reason: String| FetchError::BadRedirect { from: target.display(), to: redact(&next_url), reason };
    let next = match scheme_of(&next_url) {
        Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => parse_target(&next_url)
            .map_err(|e| match e {
                FetchError::BadUrl { reason, .. } => refuse(format!("the new URL is invalid: {reason}")),
                other => other,
            })?,
        Some(s) if s.eq_ignore_ascii_case("file") => {
            return Err(refuse("redirects to file:// are never followed".into()));
        }
        Some(s) => return Err(refuse(format!("unsupported URL scheme {}", s.to_ascii_lowercase()))),
        None => return Err(refuse("the Location is not a valid URL".into())),
    };
    if target.https && !next.https {
        return Err(refuse("it downgrades https to plain http; use a source whose redirects stay on https".into()));
    }
    Ok(next)
}

/// Aborts the task driving an HTTP connection when the response (or its body stream) is dropped.
struct ConnGuard(tokio::task::AbortHandle);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One request: resolve, screen, connect, TLS, send, and wait for the response headers.
async fn hop(
    target: &Target,
    policy: &FetchPolicy,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(Response<Incoming>, ConnGuard), FetchError> {
    let candidates = screen(target, resolve(target).await?, policy)?;
    let tcp = connect(target, &candidates).await?;
    if target.https {
        let config = match tls {
            Some(c) => Arc::clone(c),
            None => system_tls()?,
        };
        let name = match target.literal {
            Some(ip) => ServerName::IpAddress(ip.into()),
            None => ServerName::try_from(target.host.clone()).map_err(|_| FetchError::BadUrl {
                url: target.display(),
                reason: "the host is not a valid TLS server name".into(),
            })?,
        };
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| FetchError::Tls { url: target.display(), host: target.host.clone(), source })?;
        request(stream, target).await
    } else {
        request(tcp, target).await
    }
}

async fn resolve(target: &Target) -> Result<Vec<IpAddr>, FetchError> {
    if let Some(ip) = target.literal {
        return Ok(vec![ip]);
    }
    let resolved = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|source| FetchError::Resolve { host: target.host.clone(), source })?;
    let mut ips: Vec<IpAddr> = Vec::new();
    for sa in resolved {
        if !ips.contains(&sa.ip()) {
            ips.push(sa.ip());
        }
    }
    if ips.is_empty() {
        return Err(FetchError::NoAddress { host: target.host.clone() });
    }
    Ok(ips)
}

/// Keeps the addresses the policy allows; refuses with the first reason when none is left.
fn screen(target: &Target, ips: Vec<IpAddr>, policy: &FetchPolicy) -> Result<Vec<IpAddr>, FetchError> {
    let mut allowed = Vec::with_capacity(ips.len());
    let mut first_refusal = None;
    for ip in ips {
        if policy.allow_listed(ip) {
            allowed.push(ip);
        } else if let Some(reason) = refusal(ip) {
            tracing::debug!(url = %target.display(), %ip, reason, "address refused");
            first_refusal.get_or_insert((ip, reason));
        } else {
            allowed.push(ip);
        }
    }
    if !allowed.is_empty() {
        if let Some((ip, reason)) = first_refusal {
            tracing::warn!(url = %target.display(), %ip, reason, "skipping refused addresses of the host");
        }
        return Ok(allowed);
    }
    match first_refusal {
        Some((ip, reason)) => Err(FetchError::Refused {
            url: target.display(),
            name: target.literal.is_none().then(|| target.host.clone()),
            ip,
            reason,
        }),
        None => Err(FetchError::NoAddress { host: target.host.clone() }),
    }
}

/// Connects to the first screened address that accepts.
async fn connect(target: &Target, candidates: &[IpAddr]) -> Result<TcpStream, FetchError> {
    let mut last = None;
    for ip in candidates {
        let addr = SocketAddr::new(*ip, target.port);
        tracing::debug!(url = %target.display(), %addr, "connecting");
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%addr, error = %e, "could not set TCP_NODELAY");
                }
                return Ok(stream);
            }
            Err(source) => last = Some(FetchError::Connect { url: target.display(), addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| FetchError::NoAddress { host: target.host.clone() }))
}

async fn request<S>(io: S, target: &Target) -> Result<(Response<Incoming>, ConnGuard), FetchError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let http_err = |source| FetchError::Http { url: target.display(), source };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(http_err)?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "image source connection ended with an error");
        }
    });
    let guard = ConnGuard(task.abort_handle());
    let req = Request::builder()
        .method(Method::GET)
        .uri(target.path.as_str())
        .header(header::HOST, target.host_header.as_str())
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::ACCEPT, "*/*")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::BadUrl { url: target.display(), reason: e.to_string() })?;
    let response = sender.send_request(req).await.map_err(http_err)?;
    Ok((response, guard))
}

struct BodyState {
    body: Incoming,
    url: String,
    read_timeout: Duration,
    _conn: ConnGuard,
}

fn body_source(response: Response<Incoming>, conn: ConnGuard, target: Target, read_timeout: Duration) -> Source {
    let body = response.into_body();
    let content_length = body.size_hint().exact();
    let state = BodyState { body, url: target.display(), read_timeout, _conn: conn };
    let stream = futures::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        loop {
            match tokio::time::timeout(st.read_timeout, st.body.frame()).await {
                Err(_) => {
                    let err = FetchError::ReadTimeout { url: st.url, timeout: st.read_timeout };
                    return Some((Err(err), None));
                }
                Ok(None) => return None,
                Ok(Some(Err(source))) => return Some((Err(FetchError::Body { url: st.url, source }), None)),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => return Some((Ok(data), Some(st))),
                    _ => continue, // empty data or trailers
                },
            }
        }
    });
    Source { content_length, final_url: target.url, stream: stream.boxed() }
}

/// The TLS client configuration with the system's trusted roots, loaded once.
fn system_tls() -> Result<Arc<rustls::ClientConfig>, FetchError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG.get_or_init(load_system_tls).clone().map_err(|reason| FetchError::TlsSetup { reason })
}

fn load_system_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        tracing::warn!(error = %e, "problem loading system root certificates");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "ignored unparsable system root certificates");
    }
    if added == 0 {
        return Err("no trusted root certificates were found on the system; install CA certificates \
                    (for example the ca-certificates package) in the operator image, or point \
                    SSL_CERT_FILE at a bundle"
            .into());
    }
    tls_config(roots)
}

/// A TLS 1.2/1.3 client configuration (ring provider, HTTP/1.1 ALPN) trusting `roots`.
fn tls_config(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// file
// ---------------------------------------------------------------------------------------------

/// File systems of the kernel, never an image file: `/proc` holds the operator's environment
/// and memory, `/sys` and `/dev` its devices. `file://` imports never read them.
pub const KERNEL_FILE_SYSTEMS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Why `path` may never be read by a file import, whatever the roots: it is in a kernel file
/// system, or in one of `denied` (the operator's region stores).
fn never_read(path: &Path, denied: &[PathBuf]) -> Option<&'static str> {
    if KERNEL_FILE_SYSTEMS.iter().any(|k| path.starts_with(k)) {
        return Some("it is in a kernel file system (/proc, /sys or /dev), not an image file");
    }
    if denied.iter().any(|d| path.starts_with(d)) {
        return Some(
            "it is inside the operator's region stores, which file imports never read; copy an image of your namespace with an ImageCopy",
        );
    }
    None
}

/// A `file://` source, checked and opened: what [`open_local_file`] returns.
#[derive(Debug)]
pub struct LocalFile {
    /// The open file, positioned at its start.
    pub file: std::fs::File,
    /// Its path, symlinks resolved.
    pub path: PathBuf,
    /// Its size when opened. Informational, as [`Source::content_length`]: the file may change.
    pub len: u64,
}

/// The `file://` URL of an absolute `path`, percent-encoding all but unreserved characters and
/// `/` (what [`open_local_file`] decodes back to `path`).
pub fn file_url(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut url = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// Whether `url` is a `file:` URL (which [`open`] reads only with [`FetchPolicy::allow_file`]).
pub fn is_file_url(url: &str) -> bool {
    scheme_of(url.trim()).is_some_and(|s| s.eq_ignore_ascii_case("file"))
}

/// Checks a `file://` URL as [`open`] does (file imports allowed, an absolute path without
/// `..`, under an allowed root after resolving symlinks, a regular file) and opens the file, for
/// callers that copy it themselves.
pub async fn open_local_file(url: &str, policy: &FetchPolicy) -> Result<LocalFile, FetchError> {
    let url = url.trim();
    // Only under named roots: never the whole filesystem, which holds the operator's credentials.
    if !policy.allow_file || policy.file_roots.is_empty() {
        return Err(FetchError::FileDisabled);
    }
    let path = local_path(url)?;
    let refuse =
        |path: &Path, reason: &str| FetchError::FileRefused { path: path.to_path_buf(), reason: reason.into() };
    let open_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::FileOpen { path, source }
    };
    // The roots as configured and as resolved (a root may itself be a symbolic link).
    let mut roots = Vec::with_capacity(policy.file_roots.len() * 2);
    for root in &policy.file_roots {
        roots.push(root.clone());
        if let Ok(resolved) = tokio::fs::canonicalize(root).await {
            roots.push(resolved);
        }
    }
    let outside = |reason: &str| {
        let allowed: Vec<String> = policy.file_roots.iter().map(|r| r.display().to_string()).collect();
        refuse(
            &path,
            &format!(
                "{reason} any directory the operator allows file imports from ({}); place the image there or ask the operator to allow its directory",
                allowed.join(", ")
            ),
        )
    };
    // A path outside every root is refused before anything touches it: whether it exists, and
    // what it is, are nobody's business.
    if !roots.iter().any(|r| path.starts_with(r)) {
        return Err(outside("it is not under"));
    }
    // The denied directories as configured and as resolved, like the roots.
    let mut denied = Vec::with_capacity(policy.file_denied.len() * 2);
    for dir in &policy.file_denied {
        denied.push(dir.clone());
        if let Ok(resolved) = tokio::fs::canonicalize(dir).await {
            denied.push(resolved);
        }
    }
    if let Some(reason) = never_read(&path, &denied) {
        return Err(refuse(&path, reason));
    }
    let canonical = tokio::fs::canonicalize(&path).await.map_err(open_err(&path))?;
    // A symbolic link that leads out of the roots, or to what is never read: refused, naming
    // the path given, not where the link leads.
    if !roots.iter().any(|r| canonical.starts_with(r)) {
        return Err(outside("it leads (through a symbolic link) outside"));
    }
    if let Some(reason) = never_read(&canonical, &denied) {
        return Err(refuse(&path, reason));
    }
    // Checked before opening, so a FIFO or device is never opened (opening a FIFO blocks).
    let meta = tokio::fs::metadata(&canonical).await.map_err(open_err(&canonical))?;
    if !meta.is_file() {
        return Err(refuse(&canonical, "it is not a regular file"));
    }
    let file = tokio::fs::File::open(&canonical).await.map_err(open_err(&canonical))?;
    let meta = file.metadata().await.map_err(open_err(&canonical))?;
    if !meta.is_file() {
        return Err(refuse(&canonical, "it is not a regular file"));
    }
    Ok(LocalFile { file: file.into_std().await, path: canonical, len: meta.len() })
}

async fn open_file(url: &str, policy: &FetchPolicy) -> Result<Source, FetchError> {
    let LocalFile { file, path, len } = open_local_file(url, policy).await?;
    let file = tokio::fs::File::from_std(file);
    let stream = futures::stream::unfold(Some((file, path)), |state| async move {
        let (mut file, path) = state?;
        match read_chunk(&mut file).await {
            Ok(chunk) if chunk.is_empty() => None,
            Ok(chunk) => Some((Ok(chunk), Some((file, path)))),
            Err(source) => Some((Err(FetchError::FileRead { path, source }), None)),
        }
    });
    Ok(Source { content_length: Some(len), final_url: url.to_string(), stream: stream.boxed() })
}

/// Reads up to [`FILE_CHUNK_SIZE`] bytes; shorter only at end of file.
async fn read_chunk(file: &mut tokio::fs::File) -> io::Result<Bytes> {
    read_chunk_of(file, FILE_CHUNK_SIZE).await
}

/// The next `size` bytes of `file` (fewer only at its end; empty there).
pub(crate) async fn read_chunk_of(file: &mut tokio::fs::File, size: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(size);
    while buf.len() < size {
        let mut limited = (&mut *file).take((size - buf.len()) as u64);
        if limited.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

/// The path of a `file:` URL as [`open_local_file`] checks it before touching the filesystem:
/// absolute, without a `..` component.
fn local_path(url: &str) -> Result<PathBuf, FetchError> {
    let path = file_url_path(url)?;
    let refuse = |reason: &str| FetchError::FileRefused { path: path.clone(), reason: reason.into() };
    if !path.is_absolute() {
        return Err(refuse("the path must be absolute (file:///path/to/image)"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("the path contains a '..' component; use a plain absolute path"));
    }
    Ok(path)
}

/// The local path of a `file:` URL (`file:///p`, `file://localhost/p` or `file:/p`), percent-decoded.
fn file_url_path(url: &str) -> Result<PathBuf, FetchError> {
    let bad = |reason: &str| FetchError::BadUrl { url: redact(url), reason: reason.to_string() };
    let rest = url.get(5..).ok_or_else(|| bad("it has no path"))?; // after "file:"
    let path = if let Some(after) = rest.strip_prefix("//") {
        let slash = after.find('/').unwrap_or(after.len());
        let (host, path) = after.split_at(slash);
        if !(host.is_empty() || host.eq_ignore_ascii_case("localhost")) {
            return Err(bad("file:// URLs must not name a host; use file:///path/to/image"));
        }
        path
    } else {
        rest
    };
    if path.is_empty() || !path.starts_with('/') {
        return Err(bad("it has no absolute path; use file:///path/to/image"));
    }
    if path.contains(['?', '#']) {
        return Err(bad("'?' and '#' in a file path must be percent-encoded (%3F, %23)"));
    }
    let bytes = percent_decode(path).ok_or_else(|| bad("it contains an invalid percent-escape"))?;
    if bytes.contains(&0) {
        return Err(bad("the path contains a NUL byte"));
    }
    bytes_to_path(bytes).ok_or_else(|| bad("the path is not valid UTF-8"))
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let [hi, lo, tail @ ..] = tail else { return None };
            let hi = char::from(*hi).to_digit(16)?;
            let lo = char::from(*lo).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
            rest = tail;
        } else {
            out.push(b);
            rest = tail;
        }
    }
    Some(out)
}

#[cfg(unix)]
fn bytes_to_path(bytes: Vec<u8>) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    Some(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

#[cfg(not(unix))]
fn bytes_to_path(bytes: Vec<u8>) -> Option<PathBuf> {
    String::from_utf8(bytes).ok().map(PathBuf::from)
}
