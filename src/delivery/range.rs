//! Which bytes a GET asks for (RFC 9110 section 14): the whole object, one range (206), or a
//! range past the end (416). Parsing is `http-range-header`'s.

/// What to send of an object of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ranged {
    /// All of it: no Range, one we ignore (malformed, or several ranges), or a suffix longer
    /// than the object (RFC 9110: the whole representation).
    Full,
    /// Bytes `start..=end`.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// Nothing of it is in the range: 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// What a `Range` header asks of an object of `len` bytes.
pub fn ranged(header: Option<&str>, len: u64) -> Ranged {
    use http_range_header::RangeUnsatisfiableError as E;
    let Some(header) = header else { return Ranged::Full };
    let Ok(parsed) = http_range_header::parse_range_header(header.trim()) else { return Ranged::Full };
    if parsed.ranges.len() != 1 {
        return Ranged::Full;
    }
    match parsed.validate(len) {
        Ok(ranges) => match ranges.first() {
            Some(r) if *r.start() < len && r.start() <= r.end() => Ranged::Partial { start: *r.start(), end: *r.end() },
            _ => Ranged::Unsatisfiable,
        },
        Err(E::FileSuffixOutOfBounds) => Ranged::Full,
        Err(_) => Ranged::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_as_rfc_9110_says() {
        let len = 1000;
        let cases = [
            (None, Ranged::Full),
            (Some("bytes=0-99"), Ranged::Partial { start: 0, end: 99 }),
            (Some("bytes=900-"), Ranged::Partial { start: 900, end: 999 }),
            (Some("bytes=-100"), Ranged::Partial { start: 900, end: 999 }),
            (Some("bytes=990-5000"), Ranged::Partial { start: 990, end: 999 }),
            (Some("bytes=999-999"), Ranged::Partial { start: 999, end: 999 }),
            (Some("bytes=-5000"), Ranged::Full),
            (Some("bytes=1000-"), Ranged::Unsatisfiable),
            (Some("bytes=5000-6000"), Ranged::Unsatisfiable),
            (Some("bytes=50-10"), Ranged::Unsatisfiable),
            (Some("bytes=0-1,5-9"), Ranged::Full),
            (Some("items=0-1"), Ranged::Full),
            (Some("bytes=abc"), Ranged::Full),
            (Some(""), Ranged::Full),
        ];
        for (header, want) in cases {
            assert_eq!(ranged(header, len), want, "{header:?}");
        }
        assert_eq!(ranged(Some("bytes=0-"), 0), Ranged::Unsatisfiable, "nothing to send of an empty object");
    }
}
