//! Tests for the fetch module. They talk only to servers on 127.0.0.1 (and try [::1]); every
//! other address used here must be refused before any connect.

use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use futures::TryStreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

// ------------------------------------------------------------------------------------------
// refusal and Cidr
// ------------------------------------------------------------------------------------------

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

#[test]
fn refusal_table() {
    let cases: &[(&str, Option<&str>)] = &[
        ("127.0.0.1", Some("loopback")),
        ("127.255.255.254", Some("loopback")),
        ("10.1.2.3", Some("private")),
        ("172.16.0.1", Some("private")),
        ("172.31.255.255", Some("private")),
        ("172.32.0.1", None),
        ("192.168.1.1", Some("private")),
        ("169.254.169.254", Some("link-local (cloud metadata)")),
        ("169.254.1.1", Some("link-local")),
        ("100.64.0.1", Some("carrier-grade NAT")),
        ("100.128.0.1", None),
        ("0.0.0.0", Some("unspecified")),
        ("0.1.2.3", Some("reserved")),
        ("224.0.0.1", Some("multicast")),
        ("255.255.255.255", Some("broadcast")),
        ("240.0.0.1", Some("reserved")),
        ("192.0.2.10", Some("documentation")),
        ("198.18.0.1", Some("benchmarking")),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("::", Some("unspecified")),
        ("::1", Some("loopback")),
        ("fe80::1", Some("link-local")),
        ("fc00::1", Some("private")),
        ("fd12:3456::1", Some("private")),
        ("ff02::1", Some("multicast")),
        ("::ffff:127.0.0.1", Some("loopback")),
        ("::ffff:169.254.169.254", Some("link-local (cloud metadata)")),
        ("::ffff:8.8.8.8", None),
        ("::127.0.0.1", Some("loopback")),
        ("64:ff9b::a9fe:a9fe", Some("link-local (cloud metadata)")),
        ("64:ff9b::808:808", None),
        ("2002:7f00:1::1", Some("loopback")),
        ("2002:a00:1::1", Some("private")),
        ("2002:808:808::1", None),
        ("2001:db8::1", Some("documentation")),
        ("2001::1", Some("reserved")),
        ("4000::1", Some("reserved")),
        ("2001:4860:4860::8888", None),
        ("2606:4700:4700::1111", None),
    ];
    for (addr, want) in cases {
        assert_eq!(refusal(ip(addr)), *want, "refusal({addr})");
    }
}

#[test]
fn cidr_parse_and_contains() {
    let c: Cidr = "10.0.0.0/8".parse().expect("v4 cidr");
    assert!(c.contains(ip("10.255.0.1")));
    assert!(!c.contains(ip("11.0.0.1")));
    assert!(!c.contains(ip("::1")));
    assert_eq!(c.to_string(), "10.0.0.0/8");
    assert_eq!(c.prefix_len(), 8);

    let c: Cidr = "127.0.0.0/8".parse().expect("v4 cidr");
    assert!(c.contains(ip("::ffff:127.0.0.1")), "IPv4-mapped form is the same destination");

    let c: Cidr = "192.168.1.5".parse().expect("bare v4");
    assert_eq!(c.to_string(), "192.168.1.5/32");
    assert!(c.contains(ip("192.168.1.5")));
    assert!(!c.contains(ip("192.168.1.6")));

    let c: Cidr = "10.1.2.3/8".parse().expect("host bits are cleared");
    assert_eq!(c.to_string(), "10.0.0.0/8");

    let c: Cidr = "::1/128".parse().expect("v6 cidr");
    assert!(c.contains(ip("::1")));
    assert!(!c.contains(ip("::2")));
    assert!(!c.contains(ip("127.0.0.1")));

    let c: Cidr = "fd00::/8".parse().expect("v6 cidr");
    assert!(c.contains(ip("fd12::1")));
    assert!(!c.contains(ip("fe80::1")));
    assert_eq!(c.to_string(), "fd00::/8");

    let c: Cidr = "::1".parse().expect("bare v6");
    assert_eq!(c.prefix_len(), 128);

    let all: Cidr = "0.0.0.0/0".parse().expect("everything v4");
    assert!(all.contains(ip("8.8.8.8")));
    let all6: Cidr = "::/0".parse().expect("everything v6");
    assert!(all6.contains(ip("2001:db8::1")));

    for bad in [
        "",
        " ",
        "10.0.0.0/33",
        "::1/129",
        "abc",
        "10.0.0.0/",
        "/8",
        "10.0.0.0/8/9",
        "10.0.0.0/-1",
        "10.0.0.0/+8",
        "10.0.0/8",
        "256.0.0.0/8",
        "010.0.0.1",
        "[::1]/128",
        "10.0.0.0/ 8",
        "10.0.0.0/0008",
    ] {
        let err = bad.parse::<Cidr>().expect_err(bad);
        assert!(err.to_string().contains("invalid CIDR"), "{bad}: {err}");
    }
}

#[test]
fn numeric_ipv4_hosts() {
    let lo = Ipv4Addr::new(127, 0, 0, 1);
    for host in ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "127.0.1", "0x7f000001", "127.0.0.1.", "0x7F.0.0.1"] {
        assert_eq!(addr::numeric_ipv4(host), Some(Ok(lo)), "{host}");
    }
    assert_eq!(addr::numeric_ipv4("8.8.8.8"), Some(Ok(Ipv4Addr::new(8, 8, 8, 8))));
    for host in ["1.2.3.4.5", "99999999999", "256.0.0.1", "abc.123", "0x100000000", "09.1.1.1"] {
        assert_eq!(addr::numeric_ipv4(host), Some(Err(())), "{host}");
    }
    for host in ["example.com", "images.example.com.", "1.2.3.com", "localhost", "0xgg"] {
        assert_eq!(addr::numeric_ipv4(host), None, "{host}");
    }
}

#[test]
fn refusal_messages_say_what_and_how() {
    let err = FetchError::Refused {
        url: "http://169.254.169.254/latest".into(),
        name: None,
        ip: ip("169.254.169.254"),
        reason: "link-local (cloud metadata)",
    };
    assert_eq!(
        err.to_string(),
        "refused to fetch http://169.254.169.254/latest: 169.254.169.254 is a link-local address (cloud \
         metadata); imports may only reach public addresses unless the operator allow-lists them with \
         --import-allow-cidrs"
    );
    let err = FetchError::Refused {
        url: "http://x/".into(),
        name: Some("x".into()),
        ip: ip("::ffff:0.0.0.0"),
        reason: "unspecified",
    };
    assert!(err.to_string().contains("x resolved to ::ffff:0.0.0.0, an unspecified address (it embeds 0.0.0.0)"));
}

// ------------------------------------------------------------------------------------------
// URL handling
// ------------------------------------------------------------------------------------------

fn target(url: &str) -> Target {
    parse_target(url).expect("test URL")
}

#[test]
fn parses_targets() {
    let t = target("HTTP://Images.Example.COM/a/b.qcow2?x=1#frag");
    assert!(!t.https);
    assert_eq!(t.host, "images.example.com");
    assert_eq!(t.port, 80);
    assert_eq!(t.host_header, "images.example.com");
    assert_eq!(t.path, "/a/b.qcow2?x=1");
    assert_eq!(t.url, "http://images.example.com/a/b.qcow2?x=1");
    assert_eq!(t.display(), "http://images.example.com/a/b.qcow2?…");

    let t = target("https://[::1]:8443");
    assert!(t.https);
    assert_eq!(t.literal, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    assert_eq!(t.host_header, "[::1]:8443");
    assert_eq!(t.path, "/");

    let t = target("http://0x7f.1:8080/x");
    assert_eq!(t.literal, Some(ip("127.0.0.1")));
    assert_eq!(t.host_header, "0x7f.1:8080");

    let t = target("https://h:443/");
    assert_eq!(t.host_header, "h");

    for bad in [
        "http://h:99999/",
        "http://h:0/",
        "http://user:secret@h/",
        "http:///x",
        "http://[::1/",
        "http://[fe80::1%25eth0]/",
        "http://1.2.3.4.5/",
        "http://h/a b",
    ] {
        match parse_target(bad) {
            Err(e @ FetchError::BadUrl { .. }) => {
                assert!(!e.to_string().contains("secret"), "credentials leak into {e}");
                assert!(!e.is_transient());
            }
            other => panic!("{bad}: expected BadUrl, got {other:?}"),
        }
    }
}

#[test]
fn resolves_locations() {
    let base = target("http://h:8080/dir/file.img?q=1");
    let cases = [
        ("/abs", "http://h:8080/abs"),
        ("rel", "http://h:8080/dir/rel"),
        ("../up/x", "http://h:8080/up/x"),
        ("../../../x", "http://h:8080/x"),
        ("./a/./b/../c", "http://h:8080/dir/a/c"),
        ("?z=2", "http://h:8080/dir/file.img?z=2"),
        ("#frag", "http://h:8080/dir/file.img?q=1"),
        ("//other.example/p", "http://other.example/p"),
        ("https://cdn.example/x?sig=abc", "https://cdn.example/x?sig=abc"),
        ("file:///etc/passwd", "file:///etc/passwd"),
        ("  /spaced  ", "http://h:8080/spaced"),
    ];
    for (loc, want) in cases {
        assert_eq!(resolve_location(&base, loc), want, "{loc}");
    }
    assert_eq!(remove_dot_segments("/a/b/.."), "/a/");
    assert_eq!(remove_dot_segments("/"), "/");
    assert_eq!(remove_dot_segments("/.."), "/");
}

#[tokio::test]
async fn unsupported_scheme_and_bad_urls() {
    let policy = FetchPolicy::default();
    let err = open("ftp://x", &policy).await.expect_err("ftp");
    assert!(matches!(err, FetchError::UnsupportedScheme { .. }), "{err:?}");
    assert!(err.to_string().starts_with("unsupported URL scheme ftp"), "{err}");
    assert!(!err.is_transient());

    for bad in ["not a url", "images.example.com/x", "http://", "http://exa mple.com/"] {
        let err = open(bad, &policy).await.expect_err(bad);
        assert!(matches!(err, FetchError::BadUrl { .. } | FetchError::UnsupportedScheme { .. }), "{bad}: {err:?}");
        assert!(!err.is_transient());
    }
}

// ------------------------------------------------------------------------------------------
// a tiny HTTP/1.1 server
// ------------------------------------------------------------------------------------------

/// What the test server does with a request.
enum Reply {
    /// Write these bytes, then close.
    Close(Vec<u8>),
    /// Write these bytes, then keep the connection open and silent.
    Stall(Vec<u8>),
}

type Handler = dyn Fn(&str) -> Reply + Send + Sync;

struct TestServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn last_request(&self) -> String {
        self.requests.lock().map(|r| r.last().cloned().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(handler: impl Fn(&str) -> Reply + Send + Sync + 'static) -> TestServer {
    serve_with(None, Arc::new(handler)).await
}

async fn serve_with(tls: Option<tokio_rustls::TlsAcceptor>, handler: Arc<Handler>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (conns, reqs) = (Arc::clone(&connections), Arc::clone(&requests));
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            let (handler, reqs, tls) = (Arc::clone(&handler), Arc::clone(&reqs), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            answer(stream, &*handler, &reqs).await;
                        }
                    }
                    None => answer(tcp, &*handler, &reqs).await,
                }
            });
        }
    });
    TestServer { addr, connections, requests, task }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, handler: &Handler, reqs: &Mutex<Vec<String>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    if let Ok(mut r) = reqs.lock() {
        r.push(head);
    }
    match handler(&path) {
        Reply::Close(bytes) => {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
        }
        Reply::Stall(bytes) => {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
}

fn with_length(status: &str, body: &[u8]) -> Vec<u8> {
    let mut out =
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

fn chunked(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for p in parts {
        out.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn redirect(code: u16, location: &str) -> Vec<u8> {
    format!("HTTP/1.1 {code} Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

fn loopback_policy() -> FetchPolicy {
    FetchPolicy {
        allow_cidrs: vec!["127.0.0.0/8".parse().expect("cidr")],
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        ..FetchPolicy::default()
    }
}

/// A policy with short timeouts, so that any attempt to reach a refused address would show up
/// as a timeout or connect error instead of the expected refusal.
fn strict_policy() -> FetchPolicy {
    FetchPolicy { connect_timeout: Duration::from_millis(1500), ..FetchPolicy::default() }
}

async fn collect(source: Source) -> Result<Vec<u8>, FetchError> {
    let chunks: Vec<Bytes> = source.stream.try_collect().await?;
    Ok(chunks.concat())
}

fn body_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

// ------------------------------------------------------------------------------------------
// open(): http
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn serves_content_length_body() {
    let body = body_bytes(100_000);
    let served = body.clone();
    let server = serve(move |_| Reply::Close(with_length("200 OK", &served))).await;
    let url = server.url("http", "/images/disk.qcow2?v=1");
    let source = open(&url, &loopback_policy()).await.expect("open");
    assert_eq!(source.content_length, Some(body.len() as u64));
    assert_eq!(source.final_url, url);
    assert_eq!(collect(source).await.expect("body"), body);

    let req = server.last_request();
    assert!(req.starts_with("GET /images/disk.qcow2?v=1 HTTP/1.1\r\n"), "{req}");
    let lower = req.to_ascii_lowercase();
    assert!(lower.contains(&format!("host: {}\r\n", server.addr)), "{req}");
    assert!(lower.contains("user-agent: ims-operator\r\n"), "{req}");
    assert!(lower.contains("accept: */*\r\n"), "{req}");
}

#[tokio::test]
async fn serves_chunked_body() {
    let server = serve(|_| Reply::Close(chunked(&[b"hello ", b"chunked ", b"world"]))).await;
    let source = open(&server.url("http", "/"), &loopback_policy()).await.expect("open");
    assert_eq!(source.content_length, None);
    assert_eq!(collect(source).await.expect("body"), b"hello chunked world");
}

#[tokio::test]
async fn empty_body() {
    let server = serve(|_| Reply::Close(with_length("200 OK", b""))).await;
    let source = open(&server.url("http", "/"), &loopback_policy()).await.expect("open");
    assert_eq!(source.content_length, Some(0));
    assert!(collect(source).await.expect("body").is_empty());
}

#[tokio::test]
async fn loopback_refused_unless_allow_listed() {
    let server = serve(|_| Reply::Close(with_length("200 OK", b"secret"))).await;
    let err = open(&server.url("http", "/"), &strict_policy()).await.expect_err("must be refused");
    assert!(matches!(err, FetchError::Refused { reason: "loopback", .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1 is a loopback address"), "{err}");
    assert!(err.to_string().contains("--import-allow-cidrs"), "{err}");
    assert!(!err.is_transient());
    assert_eq!(server.connections(), 0, "a refused address must never be connected to");

    // Allow-listing some other block does not help.
    let policy = FetchPolicy { allow_cidrs: vec!["10.0.0.0/8".parse().expect("cidr")], ..strict_policy() };
    let err = open(&server.url("http", "/"), &policy).await.expect_err("must be refused");
    assert!(matches!(err, FetchError::Refused { .. }), "{err:?}");
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn cloud_metadata_refused_without_connecting() {
    let started = Instant::now();
    let err = open("http://169.254.169.254/latest/meta-data/", &strict_policy()).await.expect_err("refused");
    assert!(matches!(err, FetchError::Refused { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "refused to fetch http://169.254.169.254/latest/meta-data/: 169.254.169.254 is a link-local address \
         (cloud metadata); imports may only reach public addresses unless the operator allow-lists them with \
         --import-allow-cidrs"
    );
    assert!(started.elapsed() < Duration::from_millis(500), "refusal must not wait on a connect");

    for url in [
        "http://[fd00:ec2::254]/latest",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "https://169.254.169.254/",
        "http://0xa9fea9fe/",
        "http://2852039166/",
    ] {
        let err = open(url, &strict_policy()).await.expect_err(url);
        assert!(matches!(err, FetchError::Refused { .. }), "{url}: {err:?}");
        assert!(err.to_string().contains("cloud metadata"), "{url}: {err}");
    }
}

#[tokio::test]
async fn ipv6_loopback_literal_refused() {
    let server = serve(|_| Reply::Close(with_length("200 OK", b"x"))).await;
    let port = server.addr.port();
    for url in
        [format!("http://[::1]:{port}/"), format!("http://[::ffff:127.0.0.1]:{port}/"), format!("http://[::]:{port}/")]
    {
        let err = open(&url, &strict_policy()).await.expect_err(&url);
        assert!(matches!(err, FetchError::Refused { .. }), "{url}: {err:?}");
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn name_resolving_to_loopback_refused() {
    let server = serve(|_| Reply::Close(with_length("200 OK", b"x"))).await;
    let url = format!("http://localhost:{}/", server.addr.port());
    let err = open(&url, &strict_policy()).await.expect_err("refused");
    assert!(matches!(err, FetchError::Refused { reason: "loopback", .. }), "{err:?}");
    assert!(err.to_string().contains("localhost resolved to"), "{err}");
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn numeric_ipv4_hosts_refused() {
    let server = serve(|_| Reply::Close(with_length("200 OK", b"x"))).await;
    let port = server.addr.port();
    for host in ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f000001", "127.0.0.1.", "0"] {
        let url = format!("http://{host}:{port}/");
        let err = open(&url, &strict_policy()).await.expect_err(&url);
        assert!(matches!(err, FetchError::Refused { .. }), "{url}: {err:?}");
    }
    assert_eq!(server.connections(), 0);

    // Allow-listed, the same spellings reach the server.
    let url = format!("http://2130706433:{port}/");
    let source = open(&url, &loopback_policy()).await.expect("allow-listed numeric host");
    assert_eq!(collect(source).await.expect("body"), b"x");
}

#[tokio::test]
async fn follows_redirects() {
    let server = serve(|path| match path {
        "/start" => Reply::Close(redirect(301, "/a/b")),
        "/a/b" => Reply::Close(redirect(302, "c?x=1")),
        "/a/c?x=1" => Reply::Close(redirect(307, "../final")),
        "/final" => Reply::Close(with_length("200 OK", b"redirected")),
        _ => Reply::Close(with_length("404 Not Found", b"")),
    })
    .await;
    let source = open(&server.url("http", "/start"), &loopback_policy()).await.expect("open");
    assert_eq!(source.final_url, server.url("http", "/final"));
    assert_eq!(collect(source).await.expect("body"), b"redirected");
    assert_eq!(server.connections(), 4);
}

#[tokio::test]
async fn redirect_to_refused_address_refused() {
    let server = serve(|_| Reply::Close(redirect(302, "http://10.0.0.1/x"))).await;
    let err = open(&server.url("http", "/"), &loopback_policy()).await.expect_err("refused");
    assert!(matches!(err, FetchError::Refused { reason: "private", .. }), "{err:?}");
    assert!(err.to_string().starts_with("refused to fetch http://10.0.0.1/x: 10.0.0.1 is a private address"), "{err}");
    assert!(!err.is_transient());
    assert_eq!(server.connections(), 1);

    let server = serve(|_| Reply::Close(redirect(308, "http://169.254.169.254/latest/meta-data"))).await;
    let err = open(&server.url("http", "/"), &loopback_policy()).await.expect_err("refused");
    assert!(err.to_string().contains("cloud metadata"), "{err}");
}

#[tokio::test]
async fn redirect_to_file_or_other_scheme_refused() {
    let server = serve(|path| match path {
        "/file" => Reply::Close(redirect(302, "file:///etc/passwd")),
        _ => Reply::Close(redirect(302, "gopher://127.0.0.1/")),
    })
    .await;
    let policy = FetchPolicy { allow_file: true, ..loopback_policy() };
    let err = open(&server.url("http", "/file"), &policy).await.expect_err("refused");
    assert!(matches!(err, FetchError::BadRedirect { .. }), "{err:?}");
    assert!(err.to_string().contains("file:// are never followed"), "{err}");
    let err = open(&server.url("http", "/other"), &policy).await.expect_err("refused");
    assert!(err.to_string().contains("unsupported URL scheme gopher"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn redirect_loop_is_too_many_redirects() {
    let server = serve(|_| Reply::Close(redirect(302, "/loop"))).await;
    let err = open(&server.url("http", "/loop"), &loopback_policy()).await.expect_err("loop");
    assert!(matches!(err, FetchError::TooManyRedirects { max: 5, .. }), "{err:?}");
    assert!(err.to_string().starts_with("too many redirects (more than 5)"), "{err}");
    assert!(!err.is_transient());
    assert_eq!(server.connections(), 6, "the first request plus 5 followed redirects");

    let policy = FetchPolicy { max_redirects: 0, ..loopback_policy() };
    let err = open(&server.url("http", "/loop"), &policy).await.expect_err("no redirects allowed");
    assert!(err.to_string().starts_with("too many redirects (more than 0)"), "{err}");
}

#[tokio::test]
async fn redirect_without_location() {
    let server = serve(|_| Reply::Close(b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n".to_vec())).await;
    let err = open(&server.url("http", "/"), &loopback_policy()).await.expect_err("no location");
    assert!(matches!(err, FetchError::MissingLocation { .. }), "{err:?}");
    assert!(err.to_string().contains("302 Found"), "{err}");
}

#[tokio::test]
async fn error_statuses() {
    let server = serve(|path| match path {
        "/missing" => Reply::Close(with_length("404 Not Found", b"no such image")),
        "/busy" => Reply::Close(with_length("503 Service Unavailable", b"")),
        "/slow-down" => Reply::Close(with_length("429 Too Many Requests", b"")),
        _ => Reply::Close(with_length("403 Forbidden", b"")),
    })
    .await;
    let policy = loopback_policy();

    let url = server.url("http", "/missing");
    let err = open(&url, &policy).await.expect_err("404");
    assert!(matches!(err, FetchError::Status { status: StatusCode::NOT_FOUND, .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("{url} answered 404 Not Found"));
    assert!(!err.is_transient());

    let err = open(&server.url("http", "/busy"), &policy).await.expect_err("503");
    assert!(err.to_string().ends_with("answered 503 Service Unavailable"), "{err}");
    assert!(err.is_transient());

    let err = open(&server.url("http", "/slow-down"), &policy).await.expect_err("429");
    assert!(err.is_transient());

    let err = open(&server.url("http", "/forbidden"), &policy).await.expect_err("403");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn stalled_body_ends_with_read_timeout() {
    let server = serve(|_| {
        let mut head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec();
        head.extend_from_slice(b"first bytes");
        Reply::Stall(head)
    })
    .await;
    let policy = FetchPolicy { read_timeout: Duration::from_millis(300), ..loopback_policy() };
    let mut source = open(&server.url("http", "/"), &policy).await.expect("headers arrive");
    assert_eq!(source.content_length, Some(1000));
    let started = Instant::now();
    let mut got = Vec::new();
    let err = loop {
        match source.stream.next().await {
            Some(Ok(chunk)) => got.extend_from_slice(&chunk),
            Some(Err(e)) => break e,
            None => panic!("a stalled body must end with an error"),
        }
    };
    assert_eq!(got, b"first bytes");
    assert!(matches!(err, FetchError::ReadTimeout { .. }), "{err:?}");
    assert!(err.to_string().starts_with("no data for 300ms from "), "{err}");
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(source.stream.next().await.is_none(), "the stream ends after its error");
}

#[tokio::test]
async fn stalled_headers_end_with_connect_timeout() {
    let server = serve(|_| Reply::Stall(Vec::new())).await;
    let policy = FetchPolicy { connect_timeout: Duration::from_millis(300), ..loopback_policy() };
    let started = Instant::now();
    let err = open(&server.url("http", "/"), &policy).await.expect_err("no headers");
    assert!(matches!(err, FetchError::ConnectTimeout { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn body_cut_short_is_an_error() {
    let server = serve(|path| {
        if path == "/chunked" {
            Reply::Close(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly half".to_vec())
        } else {
            let mut out = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec();
            out.extend_from_slice(&[b'x'; 10]);
            Reply::Close(out)
        }
    })
    .await;
    for path in ["/length", "/chunked"] {
        let source = open(&server.url("http", path), &loopback_policy()).await.expect("headers arrive");
        let err = collect(source).await.expect_err("short body must fail");
        assert!(matches!(err, FetchError::Body { .. }), "{path}: {err:?}");
        assert!(err.to_string().contains("broke off"), "{err}");
        assert!(err.is_transient());
    }
}

#[tokio::test]
async fn connection_refused_is_transient() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let err = open(&format!("http://127.0.0.1:{port}/"), &loopback_policy()).await.expect_err("nothing listens");
    assert!(matches!(err, FetchError::Connect { .. }), "{err:?}");
    assert!(err.is_transient());
}

#[test]
fn transient_classification() {
    // DNS is not exercised against a real resolver: that could leave the machine.
    let resolve = FetchError::Resolve {
        host: "images.example.com".into(),
        source: io::Error::other("Name or service not known"),
    };
    assert!(resolve.is_transient());
    assert!(resolve.to_string().starts_with("images.example.com did not resolve: Name or service not known"));
    assert!(FetchError::NoAddress { host: "h".into() }.is_transient());
    let timeout = FetchError::ConnectTimeout { url: "http://h/".into(), timeout: Duration::from_secs(10) };
    assert!(timeout.is_transient());
    assert!(timeout.to_string().starts_with("http://h/ did not answer within 10s"), "{timeout}");
    let read = FetchError::ReadTimeout { url: "http://h/x".into(), timeout: Duration::from_secs(60) };
    assert_eq!(read.to_string(), "no data for 60s from http://h/x; the server stalled mid-transfer");
    assert!(read.is_transient());
    let tls_io = FetchError::Tls {
        url: "https://h/".into(),
        host: "h".into(),
        source: io::Error::new(io::ErrorKind::ConnectionReset, "reset"),
    };
    assert!(tls_io.is_transient());
    let tls_cert = FetchError::Tls {
        url: "https://h/".into(),
        host: "h".into(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ),
    };
    assert!(!tls_cert.is_transient());
    assert!(!FetchError::FileDisabled.is_transient());
    assert!(!FetchError::TooManyRedirects { url: "http://h/".into(), max: 5 }.is_transient());
    let status = |code: u16| FetchError::Status {
        url: "http://h/".into(),
        status: StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    assert!(status(500).is_transient());
    assert!(status(502).is_transient());
    assert!(status(408).is_transient());
    assert!(!status(404).is_transient());
    assert!(!status(410).is_transient());
    assert_eq!(status(599).to_string(), "http://h/ answered 599");
}

// ------------------------------------------------------------------------------------------
// open(): https, with a test CA
// ------------------------------------------------------------------------------------------

const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBfjCCASSgAwIBAgICEAAwCgYIKoZIzj0EAwIwJTEjMCEGA1UEAwwaaW1zLW9w
ZXJhdG9yIGZldGNoIHRlc3QgQ0EwIBcNMDAwMTAxMDAwMDAwWhgPMjEyNTAxMDEw
MDAwMDBaMCUxIzAhBgNVBAMMGmltcy1vcGVyYXRvciBmZXRjaCB0ZXN0IENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEMOqCI1DcLIuysmo1ibdB01qXCtdMGX4o
HrScxcJamuS3kY2A5/VT2fgDTbndgPTgLO7gZ119BGw0k1YPiBVGQ6NCMEAwDwYD
VR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwHQYDVR0OBBYEFEOCY7Lg7i5A
ZSCGcOs7cyb+cErtMAoGCCqGSM49BAMCA0gAMEUCIQDmV7Bh3xFrgm6xEIBeXHA7
5JVAX4j7kNtMWdt879hccQIgESalckMkPkms9Fv5LiOC6oFg9Sa1NxCTfOh0Lhvp
V1Q=
-----END CERTIFICATE-----
";

/// Issued by TEST_CA for IP:127.0.0.1, IP:::1 and DNS:localhost, valid 2000-2125.
const TEST_LEAF: &str = "-----BEGIN CERTIFICATE-----
MIIB0DCCAXagAwIBAgICEAEwCgYIKoZIzj0EAwIwJTEjMCEGA1UEAwwaaW1zLW9w
ZXJhdG9yIGZldGNoIHRlc3QgQ0EwIBcNMDAwMTAxMDAwMDAwWhgPMjEyNTAxMDEw
MDAwMDBaMBQxEjAQBgNVBAMMCWxvY2FsaG9zdDBZMBMGByqGSM49AgEGCCqGSM49
AwEHA0IABH9G2DJQzFUi9rSjhKb5NUAPwRdNh+WKV2jI2dBKjUd7cKHlUe0DZyxr
gkyZ62EaK/CMMThnKp1B7gJGiG19l8GjgaQwgaEwDAYDVR0TAQH/BAIwADAOBgNV
HQ8BAf8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwLAYDVR0RBCUwI4cEfwAA
AYcQAAAAAAAAAAAAAAAAAAAAAYIJbG9jYWxob3N0MB0GA1UdDgQWBBSw2yh7iglE
bDnC4zw12w5UySBo+zAfBgNVHSMEGDAWgBRDgmOy4O4uQGUghnDrO3Mm/nBK7TAK
BggqhkjOPQQDAgNIADBFAiBK+KQs3X5GBrI662tRZPaMH4zBc5cdDcUwA2rxLawg
qAIhAKHCC/Na4uHadelkPUMPHoVCDVJFKrSG3eB2oz+40w4i
-----END CERTIFICATE-----
";

const TEST_LEAF_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgra0Xe3+0NTQLXoTH
eGQ+rXYljTtMqRvAl9hhdXs69DOhRANCAAR/RtgyUMxVIva0o4Sm+TVAD8EXTYfl
ildoyNnQSo1He3Ch5VHtA2csa4JMmethGivwjDE4ZyqdQe4CRohtfZfB
-----END PRIVATE KEY-----
";

fn test_client_tls() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(TEST_CA.as_bytes()).expect("CA pem")).expect("CA");
    tls_config(roots).expect("client config")
}

fn test_acceptor() -> tokio_rustls::TlsAcceptor {
    let chain = vec![CertificateDer::from_pem_slice(TEST_LEAF.as_bytes()).expect("leaf pem")];
    let key = PrivateKeyDer::from_pem_slice(TEST_LEAF_KEY.as_bytes()).expect("key pem");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test]
async fn https_with_ip_and_name_server_names() {
    let body = body_bytes(50_000);
    let served = body.clone();
    let server =
        serve_with(Some(test_acceptor()), Arc::new(move |_: &str| Reply::Close(with_length("200 OK", &served)))).await;
    let tls = test_client_tls();

    let source = open_with(&server.url("https", "/img"), &loopback_policy(), Some(&tls)).await.expect("https by IP");
    assert_eq!(collect(source).await.expect("body"), body);

    // By name: localhost may resolve to ::1 first; that address is allow-listed but nothing
    // listens there, so the connect falls through to 127.0.0.1. The certificate names localhost.
    let mut policy = loopback_policy();
    policy.allow_cidrs.push("::1/128".parse().expect("cidr"));
    let url = format!("https://localhost:{}/img", server.addr.port());
    let source = open_with(&url, &policy, Some(&tls)).await.expect("https by name");
    assert_eq!(collect(source).await.expect("body"), body);
}

#[tokio::test]
async fn https_untrusted_certificate_is_permanent() {
    let server = serve_with(Some(test_acceptor()), Arc::new(|_: &str| Reply::Close(with_length("200 OK", b"x")))).await;
    // System roots do not include the test CA.
    let err = open(&server.url("https", "/"), &loopback_policy()).await.expect_err("untrusted");
    assert!(matches!(err, FetchError::Tls { .. } | FetchError::TlsSetup { .. }), "{err:?}");
    assert!(!err.is_transient(), "{err}");
}

#[tokio::test]
async fn https_to_plain_http_server_fails() {
    // A plain HTTP server that answers without waiting for a request.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp.write_all(&with_length("200 OK", b"plain")).await;
        }
    });
    let tls = test_client_tls();
    let err = open_with(&format!("https://{addr}/"), &loopback_policy(), Some(&tls)).await.expect_err("not TLS");
    task.abort();
    assert!(matches!(err, FetchError::Tls { .. }), "{err:?}");
}

#[tokio::test]
async fn https_to_http_downgrade_refused() {
    let plain = serve(|_| Reply::Close(with_length("200 OK", b"plain"))).await;
    let target = plain.url("http", "/img");
    let secure = serve_with(Some(test_acceptor()), Arc::new(move |_: &str| Reply::Close(redirect(302, &target)))).await;
    let tls = test_client_tls();
    let err = open_with(&secure.url("https", "/"), &loopback_policy(), Some(&tls)).await.expect_err("downgrade");
    assert!(matches!(err, FetchError::BadRedirect { .. }), "{err:?}");
    assert!(err.to_string().contains("downgrades https to plain http"), "{err}");
    assert!(!err.is_transient());
    assert_eq!(plain.connections(), 0);

    // http -> https upgrades are fine.
    let secure_ok =
        serve_with(Some(test_acceptor()), Arc::new(|_: &str| Reply::Close(with_length("200 OK", b"tls")))).await;
    let target = secure_ok.url("https", "/img");
    let upgrade = serve(move |_| Reply::Close(redirect(301, &target))).await;
    let source = open_with(&upgrade.url("http", "/"), &loopback_policy(), Some(&tls)).await.expect("upgrade");
    assert_eq!(collect(source).await.expect("body"), b"tls");
}

// ------------------------------------------------------------------------------------------
// open(): file
// ------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "ims-fetch-test-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

#[tokio::test]
async fn file_disabled() {
    let err = open("file:///etc/hostname", &FetchPolicy::default()).await.expect_err("disabled");
    assert!(matches!(err, FetchError::FileDisabled), "{err:?}");
    assert_eq!(
        err.to_string(),
        "file:// sources are disabled; the operator allows them from the directories of --file-import-roots"
    );
    assert!(!err.is_transient());
    // Allowed, but with no directory to read from: nothing is read (not the whole filesystem).
    let no_roots = FetchPolicy { allow_file: true, ..FetchPolicy::default() };
    let err = open("file:///etc/hostname", &no_roots).await.expect_err("no roots");
    assert!(matches!(err, FetchError::FileDisabled), "{err:?}");
}

#[tokio::test]
async fn file_streams_in_chunks() {
    let dir = TempDir::new();
    let path = dir.0.join("disk image.raw");
    let data = body_bytes(3 * FILE_CHUNK_SIZE + 12345);
    std::fs::write(&path, &data).expect("write");
    let policy = FetchPolicy { allow_file: true, file_roots: vec![dir.0.clone()], ..FetchPolicy::default() };
    let url = format!("file://{}", dir.0.join("disk%20image.raw").display());
    let source = open(&url, &policy).await.expect("open file");
    assert_eq!(source.content_length, Some(data.len() as u64));
    let chunks: Vec<Bytes> = source.stream.try_collect().await.expect("read");
    assert_eq!(chunks.len(), 4);
    assert!(chunks[..3].iter().all(|c| c.len() == FILE_CHUNK_SIZE));
    assert_eq!(chunks.concat(), data);

    let exact = dir.0.join("exact.raw");
    std::fs::write(&exact, &data[..3 * FILE_CHUNK_SIZE]).expect("write");
    let source = open(&file_url(&exact), &policy).await.expect("open file");
    let chunks: Vec<Bytes> = source.stream.try_collect().await.expect("read");
    assert_eq!(chunks.len(), 3, "a 3 MiB file is three 1 MiB chunks");
    assert_eq!(chunks.concat(), &data[..3 * FILE_CHUNK_SIZE]);

    // file://localhost/ and file:/ forms.
    let source = open(&format!("file://localhost{}", exact.display()), &policy).await.expect("localhost form");
    assert_eq!(source.content_length, Some(3 * FILE_CHUNK_SIZE as u64));
    let source = open(&format!("file:{}", exact.display()), &policy).await.expect("short form");
    assert_eq!(source.content_length, Some(3 * FILE_CHUNK_SIZE as u64));
}

#[tokio::test]
async fn file_paths_checked() {
    let dir = TempDir::new();
    let root = dir.0.join("images");
    let outside = dir.0.join("outside");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(root.join("ok.img"), b"inside").expect("write");
    std::fs::write(outside.join("secret.img"), b"outside").expect("write");
    let policy = FetchPolicy { allow_file: true, file_roots: vec![root.clone()], ..FetchPolicy::default() };

    let source = open(&file_url(&root.join("ok.img")), &policy).await.expect("inside root");
    assert_eq!(collect(source).await.expect("read"), b"inside");

    let err = open(&file_url(&outside.join("secret.img")), &policy).await.expect_err("outside root");
    assert!(matches!(err, FetchError::FileRefused { .. }), "{err:?}");
    assert!(err.to_string().contains("not under any directory"), "{err}");

    let sneaky = format!("{}/../outside/secret.img", file_url(&root));
    let err = open(&sneaky, &policy).await.expect_err("dot-dot");
    assert!(err.to_string().contains("'..'"), "{err}");
    let encoded = format!("{}/%2e%2e/outside/secret.img", file_url(&root));
    let err = open(&encoded, &policy).await.expect_err("encoded dot-dot");
    assert!(matches!(err, FetchError::FileRefused { .. }), "{err:?}");

    #[cfg(unix)]
    {
        let link = root.join("link.img");
        std::os::unix::fs::symlink(outside.join("secret.img"), &link).expect("symlink");
        let err = open(&file_url(&link), &policy).await.expect_err("symlink out of root");
        assert!(matches!(err, FetchError::FileRefused { .. }), "{err:?}");
        assert!(!err.to_string().contains("secret.img"), "names where the link leads: {err}");
        assert!(err.to_string().contains("link.img"), "{err}");
    }

    // No filesystem oracle: outside the roots, a file that exists and one that does not get the
    // same answer, and neither is touched.
    let exists = open(&file_url(&outside.join("secret.img")), &policy).await.expect_err("outside");
    let missing = open(&file_url(&outside.join("nothing.img")), &policy).await.expect_err("outside");
    assert_eq!(exists.to_string().replace("secret.img", "X"), missing.to_string().replace("nothing.img", "X"));
    let denied = open("file:///etc/shadow", &policy).await.expect_err("outside");
    let absent = open("file:///etc/doesnotexist", &policy).await.expect_err("outside");
    assert_eq!(denied.to_string().replace("shadow", "X"), absent.to_string().replace("doesnotexist", "X"));
    assert!(matches!(absent, FetchError::FileRefused { .. }), "{absent:?}");

    let err = open(&file_url(&root), &policy).await.expect_err("directory");
    assert!(err.to_string().contains("not a regular file"), "{err}");

    let err = open(&file_url(&root.join("missing.img")), &policy).await.expect_err("missing");
    assert!(matches!(err, FetchError::FileOpen { .. }), "{err:?}");
    assert!(!err.is_transient());

    let err = open("file://otherhost/x", &policy).await.expect_err("remote host");
    assert!(matches!(err, FetchError::BadUrl { .. }), "{err:?}");
    let err = open("file:///a%zz", &policy).await.expect_err("bad escape");
    assert!(matches!(err, FetchError::BadUrl { .. }), "{err:?}");
    let err = open("file:///a%00b", &policy).await.expect_err("NUL");
    assert!(matches!(err, FetchError::BadUrl { .. }), "{err:?}");
}

/// Where file imports are allowed without a root (`run --allow-file-imports`), the kernel's
/// file systems and the denied directories (the region stores) are still never read, spelled
/// directly or reached through a link, and a refusal names the path given.
#[tokio::test]
async fn kernel_file_systems_and_the_stores_are_never_read() {
    let dir = TempDir::new();
    let stores = dir.0.join("stores");
    let images = dir.0.join("images");
    std::fs::create_dir_all(stores.join("r/t/i/uid")).expect("mkdir");
    std::fs::create_dir_all(&images).expect("mkdir");
    std::fs::write(stores.join("r/t/i/uid/disk"), b"another tenant's bytes").expect("write");
    std::fs::write(images.join("ok.img"), b"mine").expect("write");
    // The widest roots a fetch policy can have (`run` refuses `/`; a root may hold a store).
    let policy = FetchPolicy {
        allow_file: true,
        file_roots: vec!["/".into()],
        file_denied: vec![stores.clone()],
        ..FetchPolicy::default()
    };
    let source = open(&file_url(&images.join("ok.img")), &policy).await.expect("any other file");
    assert_eq!(collect(source).await.expect("read"), b"mine");
    for (url, says) in [
        ("file:///proc/self/environ".to_string(), "kernel file system"),
        ("file:///sys/kernel/missing".to_string(), "kernel file system"),
        ("file:///dev/zero".to_string(), "kernel file system"),
        (file_url(&stores.join("r/t/i/uid/disk")), "region stores"),
        (file_url(&stores.join("r/t/i/missing")), "region stores"),
    ] {
        let err = open(&url, &policy).await.expect_err(&url);
        assert!(matches!(err, FetchError::FileRefused { .. }) && err.to_string().contains(says), "{url}: {err}");
        assert!(!err.is_transient());
    }
    #[cfg(unix)]
    for (link, target) in
        [("environ.img", std::path::PathBuf::from("/proc/self/environ")), ("theirs.img", stores.join("r/t/i/uid/disk"))]
    {
        std::os::unix::fs::symlink(&target, images.join(link)).expect("symlink");
        let err = open(&file_url(&images.join(link)), &policy).await.expect_err(link);
        assert!(matches!(err, FetchError::FileRefused { .. }), "{link}: {err:?}");
        assert!(err.to_string().contains(link) && !err.to_string().contains(target.to_str().unwrap()), "{link}: {err}");
    }
}

/// One redaction for every text a user sees: credentials, query strings and fragments go.
#[test]
fn redaction_hides_credentials_tokens_and_fragments() {
    let cases = [
        ("https://user:pass@host/x.img", "https://***@host/x.img"),
        ("http://user:p%40ss@host:8080/a?sig=secret#frag", "http://***@host:8080/a?…"),
        ("https://host/x.img?X-Amz-Signature=abc", "https://host/x.img?…"),
        ("https://host/x.img#token", "https://host/x.img"),
        ("https://host/path@with-at", "https://host/path@with-at"),
        ("file:///srv/images/a.raw", "file:///srv/images/a.raw"),
        ("not a url", "not a url"),
    ];
    for (url, want) in cases {
        assert_eq!(redact(url), want, "{url}");
    }
}
