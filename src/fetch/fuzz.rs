//! Fuzzing entry points of the SSRF guard: what the cargo-fuzz targets `fetch_url` and
//! `fetch_addr` in `fuzz/` run, and what the regression test replays for every input that ever
//! failed (`tests/fixtures/fuzz/`). Nothing here resolves a name or connects: it is the part of
//! [`open`](super::open) that decides before any network I/O.
//!
//! Built for tests and with the `fuzzing` feature only; not part of the API.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Component;

use super::*;

/// `fetch_url`: the input is a source URL, optionally followed by a newline and the `Location`
/// of a redirect from it. Checks the scheme dispatch of [`open`](super::open), the http(s)
/// target (its normalized URL parses to itself, its host is what the WHATWG URL parser makes
/// of it, a literal address is screened as [`refusal`] says), the redirect (a relative
/// `Location` never leaves the host, https never goes down to http, never to `file://`), the
/// `file://` path (absolute, no `..`, survives re-encoding) and the redaction of every text
/// (no user:password, no query, idempotent).
pub fn url(input: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(input) else { return "not UTF-8".into() };
    let (url, location) = match text.split_once('\n') {
        Some((u, l)) => (u, Some(l)),
        None => (text, None),
    };
    let url = url.trim();
    check_redact(url);
    let secret = userinfo(url);
    let outcome = match scheme_of(url) {
        Some(s) if s.eq_ignore_ascii_case("file") => {
            assert!(is_file_url(url));
            file(url)
        }
        Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => http(url, location),
        Some(s) => format!("unsupported scheme {s}"),
        None => "no scheme".into(),
    };
    if let Some(secret) = secret {
        assert!(!outcome.contains(secret), "{outcome:?} shows the credentials {secret:?}");
    }
    outcome
}

/// The user:password of an absolute URL as the http crate reads it, when it is long enough to
/// look for and appears nowhere else in the URL.
fn userinfo(url: &str) -> Option<&str> {
    let uri: Uri = url.parse().ok()?;
    // Without a scheme the http crate reads `a:b@c` as an authority; a URL has none there.
    uri.scheme()?;
    let auth = uri.authority()?.as_str();
    let (user, _) = auth.rsplit_once('@')?;
    let at = url.find(user)?;
    let user = &url[at..at + user.len()];
    (user.len() >= 4 && url.matches(user).count() == 1).then_some(user)
}

fn check_redact(url: &str) {
    let r = redact(url);
    assert_eq!(redact(&r), r, "redact is not idempotent on {url:?}");
    assert!(!r.contains('#'), "{r:?} keeps a fragment");
    if let Some(at) = r.find('?') {
        assert_eq!(&r[at..], "?…", "{r:?} keeps a query");
    }
    if let Some(secret) = userinfo(url) {
        assert!(!r.contains(secret), "redact({url:?}) = {r:?} shows the credentials");
    }
}

fn http(url: &str, location: Option<&str>) -> String {
    let t = match parse_target(url) {
        Ok(t) => t,
        Err(e) => {
            assert!(matches!(e, FetchError::BadUrl { .. } | FetchError::UnsupportedScheme { .. }), "{e:?}");
            return format!("refused: {e}");
        }
    };
    check_target(&t);
    let again = parse_target(&t.url).unwrap_or_else(|e| panic!("{:?} does not parse again: {e}", t.url));
    assert_eq!(again, t, "the normalized URL parses to another target");
    whatwg(&t);
    let screened = t.literal.map(|ip| {
        let r = screen(&t, vec![ip], &FetchPolicy::default());
        assert_eq!(r.is_err(), refusal(ip).is_some(), "{ip}: screen and refusal disagree");
        match r {
            Ok(_) => "allowed".to_string(),
            Err(e) => format!("refused: {e}"),
        }
    });
    let mut out = format!("target {} ({})", t.url, screened.unwrap_or_else(|| "name".into()));
    if let Some(location) = location {
        out.push_str(&format!("; redirect: {}", redirect(&t, location)));
    }
    out
}

fn check_target(t: &Target) {
    assert!(t.port != 0, "{t:?}: port 0");
    assert!(t.path.starts_with('/'), "{t:?}: path");
    assert_eq!(t.url, format!("{}://{}{}", t.scheme(), t.host_header, t.path));
    match t.literal {
        Some(IpAddr::V6(v6)) => assert_eq!(t.host, v6.to_string()),
        _ => {
            assert!(!t.host.is_empty());
            assert!(
                t.host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)),
                "{t:?}: host"
            );
        }
    }
    // A host the standard library reads as an address is never left to a resolver.
    if let Ok(ip) = t.host.parse::<IpAddr>() {
        assert_eq!(t.literal, Some(ip), "{t:?}: an address host without its literal");
    }
}

/// The WHATWG URL parser (browsers, and the `url` crate) reads the host the same way: the same
/// address for an IP literal or a numeric IPv4 form, a name otherwise.
fn whatwg(t: &Target) {
    let Ok(u) = ::url::Url::parse(&t.url) else { return };
    match (u.host(), t.literal) {
        (Some(::url::Host::Ipv4(a)), literal) => {
            assert_eq!(literal, Some(IpAddr::V4(a)), "{t:?}: WHATWG reads the host as {a}")
        }
        (Some(::url::Host::Ipv6(a)), literal) => {
            assert_eq!(literal, Some(IpAddr::V6(a)), "{t:?}: WHATWG reads the host as {a}")
        }
        (Some(::url::Host::Domain(d)), literal) => assert!(literal.is_none(), "{t:?}: WHATWG reads a name {d:?}"),
        (None, _) => panic!("{t:?}: WHATWG finds no host"),
    }
    assert_eq!(u.port_or_known_default(), Some(t.port), "{t:?}: port");
}

fn redirect(t: &Target, location: &str) -> String {
    let loc = location.trim();
    let loc = loc.split('#').next().unwrap_or(loc);
    let relative = scheme_of(loc).is_none() && !loc.starts_with("//");
    match redirect_target(t, location) {
        Ok(n) => {
            check_target(&n);
            assert!(!t.https || n.https, "{t:?} -> {n:?}: https down to http");
            if relative {
                assert_eq!((&n.host, n.port, n.https), (&t.host, t.port, t.https), "{location:?} left the host");
            }
            format!("to {}", n.url)
        }
        Err(e) => {
            assert!(!relative || matches!(e, FetchError::BadRedirect { .. }), "{e:?}");
            format!("refused: {e}")
        }
    }
}

fn file(url: &str) -> String {
    match local_path(url) {
        Ok(p) => {
            assert!(p.is_absolute(), "{p:?}");
            assert!(!p.components().any(|c| c == Component::ParentDir), "{p:?}");
            let bytes = p.as_os_str().as_encoded_bytes();
            assert!(!bytes.contains(&0), "{p:?}: NUL");
            // The path, percent-encoded into a URL again, is the same path.
            let mut again = String::from("file://");
            for &b in bytes {
                if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
                    again.push(char::from(b));
                } else {
                    again.push_str(&format!("%{b:02X}"));
                }
            }
            assert_eq!(local_path(&again).ok().as_ref(), Some(&p), "{again:?}");
            format!("file {}", p.display())
        }
        Err(e) => {
            assert!(matches!(e, FetchError::BadUrl { .. } | FetchError::FileRefused { .. }), "{e:?}");
            format!("refused: {e}")
        }
    }
}

/// `fetch_addr`: byte 0 a prefix length, bytes 1..17 an IPv6 address (its first four bytes also
/// an IPv4 one), the rest a host or CIDR text. Checks [`refusal`] against the standard
/// library's address classes and the addresses IPv6 forms embed, [`Cidr`] (contains its
/// address, in both IPv4 spellings; parses its own text), and the numeric IPv4 host forms
/// against the WHATWG URL parser.
pub fn addr(input: &[u8]) -> String {
    if input.len() < 17 {
        return "short input".into();
    }
    let prefix = input[0];
    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(&input[1..17]).unwrap_or_default());
    let v4 = Ipv4Addr::new(input[1], input[2], input[3], input[4]);
    check_v4(v4);
    check_v6(v6);
    for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
        check_cidr(ip, prefix);
    }
    let text = String::from_utf8_lossy(&input[17..]);
    if let Ok(c) = text.parse::<Cidr>() {
        assert_eq!(c.to_string().parse::<Cidr>().as_ref(), Ok(&c), "{text:?}");
        assert!(c.contains(c.network()));
    }
    let host = text.to_ascii_lowercase();
    let numeric = addr::numeric_ipv4(&host);
    whatwg_host(&host, numeric);
    format!("{v4}: {:?}; {v6}: {:?}; {host:?}: {numeric:?}", refusal(IpAddr::V4(v4)), refusal(IpAddr::V6(v6)))
}

fn check_v4(v4: Ipv4Addr) {
    let r = refusal(IpAddr::V4(v4));
    let [a, b, ..] = v4.octets();
    let special = v4.is_private()
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_broadcast()
        || v4.is_documentation()
        || v4.is_unspecified()
        || v4.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (18..20).contains(&b))
        || a >= 240;
    if special {
        assert!(r.is_some(), "{v4} is special but allowed");
    }
    // Every IPv6 spelling of it is judged as it is.
    let n = u32::from(v4);
    let nat64 = Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u128::from(n));
    let six_to_four = Ipv6Addr::from((0x2002_u128 << 112) | (u128::from(n) << 80));
    for v6 in [v4.to_ipv6_mapped(), nat64, six_to_four] {
        assert_eq!(refusal(IpAddr::V6(v6)), r, "{v6} and {v4}");
    }
    if n > 1 {
        assert_eq!(refusal(IpAddr::V6(v4.to_ipv6_compatible())), r, "::{v4} and {v4}");
    }
}

fn check_v6(v6: Ipv6Addr) {
    let r = refusal(IpAddr::V6(v6));
    if v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        || v6.is_unique_local()
        || v6.is_unicast_link_local()
    {
        assert!(r.is_some(), "{v6} is special but allowed");
    }
    if let Some(v4) = v6.to_ipv4_mapped() {
        assert_eq!(r, refusal(IpAddr::V4(v4)), "{v6} and {v4}");
    }
    // Outside 2000::/3 only the forms that carry an IPv4 address may be allowed (judged by it).
    if r.is_none() && addr::embedded_v4(v6).is_none() {
        assert_eq!(u128::from(v6) >> 125, 0b001, "{v6} is allowed outside 2000::/3");
    }
}

fn check_cidr(ip: IpAddr, prefix: u8) {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let Ok(c) = Cidr::new(ip, prefix) else {
        assert!(prefix > max, "{ip}/{prefix} refused");
        return;
    };
    assert!(prefix <= max);
    assert!(c.contains(ip), "{c} does not contain {ip}");
    assert_eq!(c.to_string().parse::<Cidr>().as_ref(), Ok(&c), "{c}");
    assert_eq!(Cidr::new(c.network(), prefix).as_ref(), Ok(&c));
    match ip {
        IpAddr::V4(v4) => assert!(c.contains(IpAddr::V6(v4.to_ipv6_mapped())), "{c} and ::ffff:{v4}"),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                assert!(c.contains(IpAddr::V4(v4)), "{c} and {v4}");
            }
        }
    }
}

/// A host made of the characters a URL host may have here: the WHATWG parser reads the same
/// IPv4 address from it, or refuses it as an invalid address, or reads a name, as
/// `numeric_ipv4` says.
fn whatwg_host(host: &str, numeric: Option<Result<Ipv4Addr, ()>>) {
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
        return;
    }
    match (::url::Url::parse(&format!("http://{host}/")), numeric) {
        (Ok(u), Some(Ok(a))) => assert_eq!(u.host(), Some(::url::Host::Ipv4(a)), "{host:?}"),
        (Ok(u), Some(Err(()))) => panic!("{host:?}: WHATWG reads {:?}, numeric_ipv4 refuses it", u.host()),
        (Ok(u), None) => {
            assert!(!matches!(u.host(), Some(::url::Host::Ipv4(_))), "{host:?}: WHATWG reads {:?}", u.host())
        }
        (Err(::url::ParseError::InvalidIpv4Address), numeric) => {
            assert_eq!(numeric, Some(Err(())), "{host:?}: WHATWG refuses it as an IPv4 address")
        }
        (Err(_), Some(Ok(a))) => panic!("{host:?}: WHATWG refuses what numeric_ipv4 reads as {a}"),
        (Err(_), _) => {}
    }
}
