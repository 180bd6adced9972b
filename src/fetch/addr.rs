//! Address screening for the SSRF guard: CIDR blocks, the special-purpose address table, and
//! the legacy numeric IPv4 host forms (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 address block such as `10.0.0.0/8` or `fd00::/8`.
///
/// Host bits below the prefix are cleared when the block is built, so `10.1.2.3/8` is the same
/// block as `10.0.0.0/8`. A bare address is a single-address block (`/32` or `/128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a CIDR string could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid CIDR {input:?}: {reason}; expected an IPv4 or IPv6 address with an optional /prefix, \
     such as 10.0.0.0/8, 192.168.1.5 or fd00::/8"
)]
pub struct CidrError {
    input: String,
    reason: &'static str,
}

impl Cidr {
    /// Builds the block of `addr` with `prefix` leading bits (host bits are cleared).
    /// Fails when `prefix` is longer than the address (32 for IPv4, 128 for IPv6).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let network = match addr {
            IpAddr::V4(v4) if prefix <= 32 => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask_v4(prefix))),
            IpAddr::V6(v6) if prefix <= 128 => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask_v6(prefix))),
            _ => {
                return Err(CidrError {
                    input: format!("{addr}/{prefix}"),
                    reason: "the prefix length is longer than the address",
                });
            }
        };
        Ok(Cidr { network, prefix })
    }

    /// The first address of the block.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies inside the block. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is
    /// the same destination as its IPv4 address, so it matches IPv4 blocks too (and vice versa).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.contains_exact(ip)
            || match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| self.contains_exact(IpAddr::V4(v4))),
                IpAddr::V4(v4) => self.contains_exact(IpAddr::V6(v4.to_ipv6_mapped())),
            }
    }

    fn contains_exact(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => u32::from(a) & mask_v4(self.prefix) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(a)) => u128::from(a) & mask_v6(self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| CidrError { input: s.to_string(), reason };
        let t = s.trim();
        if t.is_empty() {
            return Err(err("it is empty"));
        }
        let (addr_s, prefix_s) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let addr: IpAddr = addr_s.parse().map_err(|_| err("the address part is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_s {
            None => max,
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err("the prefix length must be a number of bits"));
                }
                match p.parse::<u8>() {
                    Ok(n) if n <= max => n,
                    _ => return Err(err("the prefix length is longer than the address")),
                }
            }
        };
        Cidr::new(addr, prefix).map_err(|e| err(e.reason))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn mask_v4(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) }
}

fn mask_v6(prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) }
}

/// Special-purpose IPv4 blocks, most specific first.
const V4_TABLE: &[([u8; 4], u8, &str)] = &[
    ([0, 0, 0, 0], 32, "unspecified"),
    ([0, 0, 0, 0], 8, "reserved"),
    ([10, 0, 0, 0], 8, "private"),
    ([100, 100, 100, 200], 32, "carrier-grade NAT (cloud metadata)"),
    ([100, 64, 0, 0], 10, "carrier-grade NAT"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 169, 254], 32, "link-local (cloud metadata)"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private"),
    ([192, 0, 0, 0], 24, "reserved"),
    ([192, 0, 2, 0], 24, "documentation"),
    ([192, 88, 99, 0], 24, "reserved"),
    ([192, 168, 0, 0], 16, "private"),
    ([198, 18, 0, 0], 15, "benchmarking"),
    ([198, 51, 100, 0], 24, "documentation"),
    ([203, 0, 113, 0], 24, "documentation"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([255, 255, 255, 255], 32, "broadcast"),
    ([240, 0, 0, 0], 4, "reserved"),
];

/// Special-purpose IPv6 blocks that do not embed an IPv4 address, most specific first.
/// Anything outside 2000::/3 (global unicast) that is not listed is "reserved".
const V6_TABLE: &[(u128, u8, &str)] = &[
    (0x0064_ff9b_0001_0000_0000_0000_0000_0000, 48, "private"), // local-use NAT64
    (0x0100_0000_0000_0000_0000_0000_0000_0000, 64, "reserved"), // discard-only
    (0x2001_0002_0000_0000_0000_0000_0000_0000, 48, "benchmarking"),
    (0x2001_0000_0000_0000_0000_0000_0000_0000, 23, "reserved"), // IETF protocol assignments, Teredo
    (0x2001_0db8_0000_0000_0000_0000_0000_0000, 32, "documentation"),
    (0x3fff_0000_0000_0000_0000_0000_0000_0000, 20, "documentation"),
    (0xfd00_0ec2_0000_0000_0000_0000_0000_0254, 128, "private (cloud metadata)"),
    (0xfc00_0000_0000_0000_0000_0000_0000_0000, 7, "private"),
    (0xfe80_0000_0000_0000_0000_0000_0000_0000, 10, "link-local"),
    (0xfec0_0000_0000_0000_0000_0000_0000_0000, 10, "private"), // deprecated site-local
    (0xff00_0000_0000_0000_0000_0000_0000_0000, 8, "multicast"),
];

/// Why an import may not connect to `ip`, or `None` when it is a public address.
///
/// The reason is a short kind of address: "loopback", "private", "link-local",
/// "link-local (cloud metadata)" (169.254.169.254), "carrier-grade NAT", "unspecified",
/// "multicast", "broadcast", "documentation", "benchmarking" or "reserved". IPv6 forms that
/// carry an IPv4 address (IPv4-mapped `::ffff:0:0/96`, IPv4-compatible `::/96`, NAT64
/// `64:ff9b::/96` and 6to4 `2002::/16`) are judged by the embedded IPv4 address.
pub fn refusal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => refusal_v6(v6),
    }
}

fn refusal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let n = u32::from(ip);
    V4_TABLE.iter().find(|(net, p, _)| n & mask_v4(*p) == u32::from_be_bytes(*net)).map(|(_, _, why)| *why)
}

fn refusal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let n = u128::from(ip);
    if n == 0 {
        return Some("unspecified");
    }
    if n == 1 {
        return Some("loopback");
    }
    if let Some(v4) = embedded_v4(ip) {
        return refusal_v4(v4);
    }
    if let Some((_, _, why)) = V6_TABLE.iter().find(|(net, p, _)| n & mask_v6(*p) == *net) {
        return Some(why);
    }
    // Only 2000::/3 is allocated for global unicast.
    if n >> 125 != 0b001 {
        return Some("reserved");
    }
    None
}

/// The IPv4 address an IPv6 address carries: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, except `::` and `::1`), NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:AABB:CCDD::`).
pub(crate) fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let n = u128::from(ip);
    let low = Ipv4Addr::from((n & 0xffff_ffff) as u32);
    if n >> 32 == 0xffff || (n >> 32 == 0 && n > 1) || n >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        return Some(low);
    }
    if n >> 112 == 0x2002 {
        return Some(Ipv4Addr::from(((n >> 80) & 0xffff_ffff) as u32));
    }
    None
}

/// The embedded IPv4 address of an IPv6 address, for messages.
pub(crate) fn embedded_v4_of(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6),
        IpAddr::V4(_) => None,
    }
}

/// Interprets a URL host the way browsers and `inet_aton` do when it "ends in a number":
/// `2130706433`, `0x7f.1`, `0177.0.0.1` and `127.1` all mean 127.0.0.1.
///
/// `None` means the host is a name; `Some(Err(()))` means it looks numeric but is not a valid
/// IPv4 address (such a host must be rejected, not handed to a resolver).
pub(crate) fn numeric_ipv4(host: &str) -> Option<Result<Ipv4Addr, ()>> {
    let mut parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 1 && parts.last() == Some(&"") {
        parts.pop();
    }
    let last = *parts.last()?;
    let hex = last.strip_prefix("0x").or_else(|| last.strip_prefix("0X"));
    let ends_in_number = !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit()) || hex.is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())));
    if !ends_in_number {
        return None;
    }
    Some(ipv4_from_parts(&parts))
}

fn ipv4_from_parts(parts: &[&str]) -> Result<Ipv4Addr, ()> {
    if parts.is_empty() || parts.len() > 4 {
        return Err(());
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for p in parts {
        numbers.push(ipv4_number(p).ok_or(())?);
    }
    let (last, init) = numbers.split_last().ok_or(())?;
    if init.iter().any(|n| *n > 255) {
        return Err(());
    }
    let limit = 1u64 << (8 * (5 - numbers.len()));
    if *last >= limit {
        return Err(());
    }
    let mut value = *last;
    for (i, n) in init.iter().enumerate() {
        value += n << (8 * (3 - i));
    }
    u32::try_from(value).map(Ipv4Addr::from).map_err(|_| ())
}

/// One part of a numeric IPv4 host: decimal, octal (leading 0) or hexadecimal (0x).
fn ipv4_number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.is_ascii() {
        return None;
    }
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if let Some(octal) = s.strip_prefix('0').filter(|o| !o.is_empty()) {
        (octal, 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() {
        return Some(0);
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok().filter(|n| *n <= u64::from(u32::MAX))
}
