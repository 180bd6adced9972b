//! The stored form of an encrypted disk (version 1): a 4 KiB header, then the plaintext in
//! 64 KiB segments, each sealed with AES-256-GCM under the disk's own data key.
//!
//! ```text
//! header (4096 bytes)
//!   0..8     magic "IMSCRYPT"
//!   8..10    version, u16 big-endian (1)
//!   10..12   reserved (0)
//!   12..16   plaintext bytes per segment, u32 big-endian (65536)
//!   16..23   nonce prefix: 7 random bytes
//!   23       reserved (0)
//!   24..     provider, key id, wrapped data key: each a u16 big-endian length and its bytes
//!   ...      zeros up to 4096
//! segment i (i = 0, 1, ...): AES-256-GCM(data key, nonce_i, aad, plaintext_i) || tag (16 bytes)
//!   nonce_i = nonce prefix (7) || i as u32 big-endian (4) || 1 for the last segment, else 0 (1)
//!   aad     = sha256 of the 4096 header bytes
//! ```
//!
//! Every segment holds 65536 plaintext bytes but the last, which holds the rest: 0 to 65535
//! bytes (a plaintext that is a whole number of segments ends with an empty last segment, and an
//! empty disk is one empty segment). So every full segment is sealed as soon as its bytes are
//! in, and the object's length gives the plaintext's: a range maps to whole segments without
//! reading anything else.
//!
//! - **Nonces never repeat**: the data key is random and used for one object only, and within
//!   it the segment index is in the nonce. The random prefix adds a margin should a data key
//!   ever be reused by a bug elsewhere.
//! - **Reordering, truncation and extension are detected**: a segment opens only at its own
//!   index, and only the last opens as last, so cutting the object at a segment boundary (the
//!   new last one was sealed as not last) or appending to it (the old last one is no longer
//!   last) fails as surely as a flipped byte does.
//! - **The header is authenticated**: its sha256 is every segment's additional data, so a
//!   changed key id or prefix fails every segment.

use std::ops::Range;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

/// The header's magic number.
pub const MAGIC: &[u8; 8] = b"IMSCRYPT";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the header.
pub const HEADER_LEN: u64 = 4096;
/// Plaintext bytes per segment.
pub const SEGMENT: u64 = 64 * 1024;
/// Bytes of a GCM tag.
pub const TAG: u64 = 16;
/// Bytes of a sealed full segment.
pub const SEALED: u64 = SEGMENT + TAG;
/// The most segments one object may have (the index is a u32 in the nonce): 256 TiB.
const MAX_SEGMENTS: u64 = 1 << 32;

/// Why encrypted bytes cannot be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The header is not one this version reads.
    #[error("the stored object is not an encrypted image of this operator (format version 1): {0}")]
    Header(String),
    /// A segment did not open: its bytes, or the header's, are not what was sealed.
    #[error("segment {0} of the stored object fails authentication: the stored bytes were changed, cut or reordered")]
    Segment(u64),
    /// The object's length is not one a sealed object can have.
    #[error("the stored object's length ({0} bytes) is not that of a whole encrypted image: it was cut or extended")]
    Length(u64),
    /// More plaintext than the format holds.
    #[error("an encrypted image holds at most 256 TiB")]
    TooLarge,
}

/// What the header says: who wrapped the data key and how to rebuild the nonces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The KMS provider that wrapped the data key (`local`, `aws`).
    pub provider: String,
    /// The KMS key that wrapped it.
    pub key_id: String,
    /// The data key, wrapped by that KMS key.
    pub wrapped: Vec<u8>,
    /// The nonce prefix.
    pub nonce_prefix: [u8; 7],
}

impl Header {
    /// The 4096 header bytes.
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::with_capacity(HEADER_LEN as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(SEGMENT as u32).to_be_bytes());
        out.extend_from_slice(&self.nonce_prefix);
        out.push(0);
        for field in [self.provider.as_bytes(), self.key_id.as_bytes(), &self.wrapped] {
            let len =
                u16::try_from(field.len()).map_err(|_| EnvelopeError::Header("a header field is too long".into()))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(field);
        }
        if out.len() > HEADER_LEN as usize {
            return Err(EnvelopeError::Header(format!("the header needs {} bytes, more than {HEADER_LEN}", out.len())));
        }
        out.resize(HEADER_LEN as usize, 0);
        Ok(out)
    }

    /// Reads the header from the object's first bytes (at least [`HEADER_LEN`] of them).
    pub fn decode(bytes: &[u8]) -> Result<Header, EnvelopeError> {
        let bad = |why: &str| EnvelopeError::Header(why.to_string());
        if bytes.len() < HEADER_LEN as usize {
            return Err(bad("it is shorter than the 4096-byte header"));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("no IMSCRYPT magic"));
        }
        let version = u16::from_be_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(EnvelopeError::Header(format!("version {version}")));
        }
        if u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as u64 != SEGMENT {
            return Err(bad("an unknown segment size"));
        }
        let mut nonce_prefix = [0u8; 7];
        nonce_prefix.copy_from_slice(&bytes[16..23]);
        let mut at = 24usize;
        let mut field = || -> Result<Vec<u8>, EnvelopeError> {
            let len = u16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
            let end = at + 2 + len;
            if end > HEADER_LEN as usize - 2 {
                return Err(bad("a field runs past the header"));
            }
            let value = bytes[at + 2..end].to_vec();
            at = end;
            Ok(value)
        };
        let text = |b: Vec<u8>| String::from_utf8(b).map_err(|_| bad("a name is not UTF-8"));
        let provider = text(field()?)?;
        let key_id = text(field()?)?;
        let wrapped = field()?;
        Ok(Header { provider, key_id, wrapped, nonce_prefix })
    }
}

/// A data key, with the header it is bound to.
struct Keyed {
    key: LessSafeKey,
    prefix: [u8; 7],
    aad: [u8; 32],
}

impl Keyed {
    fn new(data_key: &[u8; 32], header_bytes: &[u8], prefix: [u8; 7]) -> Keyed {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, data_key).expect("a 32-byte AES-256 key"));
        Keyed { key, prefix, aad: Sha256::digest(header_bytes).into() }
    }

    fn nonce(&self, index: u64, last: bool) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[..7].copy_from_slice(&self.prefix);
        nonce[7..11].copy_from_slice(&(index as u32).to_be_bytes());
        nonce[11] = u8::from(last);
        Nonce::assume_unique_for_key(nonce)
    }
}

/// Seals plaintext as it streams: bytes in, sealed segments out, in order.
pub struct Sealer {
    keyed: Keyed,
    index: u64,
    /// Plaintext of the segment being filled (less than a segment).
    pending: Vec<u8>,
}

impl Sealer {
    /// A sealer under `data_key` for the object that starts with `header`: the sealer and the
    /// header bytes, which go first.
    pub fn new(data_key: &[u8; 32], header: &Header) -> Result<(Sealer, Vec<u8>), EnvelopeError> {
        let bytes = header.encode()?;
        let keyed = Keyed::new(data_key, &bytes, header.nonce_prefix);
        Ok((Sealer { keyed, index: 0, pending: Vec::with_capacity(SEGMENT as usize) }, bytes))
    }

    /// Takes `plain`; returns the segments it completed, sealed (possibly none).
    pub fn push(&mut self, plain: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let segment = SEGMENT as usize;
        let mut out = Vec::with_capacity(plain.len() + (plain.len() / segment + 1) * TAG as usize);
        let mut input = plain;
        if !self.pending.is_empty() {
            let take = (segment - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() == segment {
                seal_into(&self.keyed, self.index, false, &self.pending, &mut out)?;
                self.index += 1;
                self.pending.clear();
            }
        }
        // Whole segments straight from the input: one copy, into the output, sealed there.
        while input.len() >= segment {
            seal_into(&self.keyed, self.index, false, &input[..segment], &mut out)?;
            self.index += 1;
            input = &input[segment..];
        }
        self.pending.extend_from_slice(input);
        Ok(out)
    }

    /// Seals what is left as the last segment.
    pub fn finish(mut self) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::with_capacity(self.pending.len() + TAG as usize);
        let rest = std::mem::take(&mut self.pending);
        seal_into(&self.keyed, self.index, true, &rest, &mut out)?;
        Ok(out)
    }
}

fn seal_into(keyed: &Keyed, index: u64, last: bool, plain: &[u8], out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
    if index >= MAX_SEGMENTS {
        return Err(EnvelopeError::TooLarge);
    }
    let start = out.len();
    out.extend_from_slice(plain);
    let tag = keyed
        .key
        .seal_in_place_separate_tag(keyed.nonce(index, last), Aad::from(keyed.aad), &mut out[start..])
        .map_err(|_| EnvelopeError::TooLarge)?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Opens the segments of one stored object, of `object_len` bytes.
pub struct Opener {
    keyed: Keyed,
    segments: u64,
    plain_len: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("segments", &self.segments).field("plain_len", &self.plain_len).finish()
    }
}

impl Opener {
    /// An opener under `data_key` of the object whose header bytes are `header_bytes`.
    pub fn new(data_key: &[u8; 32], header_bytes: &[u8], object_len: u64) -> Result<Opener, EnvelopeError> {
        let header = Header::decode(header_bytes)?;
        let (segments, plain_len) = plain_len(object_len)?;
        Ok(Opener {
            keyed: Keyed::new(data_key, &header_bytes[..HEADER_LEN as usize], header.nonce_prefix),
            segments,
            plain_len,
        })
    }

    /// Plaintext bytes.
    pub fn plain_len(&self) -> u64 {
        self.plain_len
    }

    /// The segments that hold plaintext `range`, and the object bytes they take. A range to the
    /// end takes the last segment too (possibly empty), so reading it checks the end is there.
    pub fn sealed_range(&self, range: &Range<u64>) -> (Range<u64>, Range<u64>) {
        let first = range.start / SEGMENT;
        let end = if range.end >= self.plain_len { self.segments } else { range.end.div_ceil(SEGMENT) };
        let last = end.max(first + 1).min(self.segments);
        let bytes = HEADER_LEN + first * SEALED..(HEADER_LEN + last * SEALED).min(HEADER_LEN + self.sealed_body());
        (first..last, bytes)
    }

    fn sealed_body(&self) -> u64 {
        self.plain_len + self.segments * TAG
    }

    /// Opens segment `index` from its sealed bytes, in place: its plaintext.
    pub fn open<'a>(&self, index: u64, sealed: &'a mut [u8]) -> Result<&'a mut [u8], EnvelopeError> {
        if index >= self.segments {
            return Err(EnvelopeError::Segment(index));
        }
        let last = index + 1 == self.segments;
        let want = if last { self.sealed_body() - index * SEALED } else { SEALED };
        if sealed.len() as u64 != want {
            return Err(EnvelopeError::Segment(index));
        }
        self.keyed
            .key
            .open_in_place(self.keyed.nonce(index, last), Aad::from(self.keyed.aad), sealed)
            .map(|plain| &mut plain[..])
            .map_err(|_| EnvelopeError::Segment(index))
    }
}

/// The sealed size of `plain` plaintext bytes: the header, the full segments and the last one.
pub fn sealed_len(plain: u64) -> u64 {
    HEADER_LEN + plain + (plain / SEGMENT + 1) * TAG
}

/// (segments, plaintext bytes) of a sealed object of `object_len` bytes: full segments, then a
/// last one of 16 to 65551 sealed bytes.
fn plain_len(object_len: u64) -> Result<(u64, u64), EnvelopeError> {
    let body = object_len.checked_sub(HEADER_LEN).ok_or(EnvelopeError::Length(object_len))?;
    let full = body / SEALED;
    let last = body - full * SEALED;
    if last < TAG {
        return Err(EnvelopeError::Length(object_len));
    }
    Ok((full + 1, full * SEGMENT + last - TAG))
}

/// Plaintext `range` out of the sealed bytes of its segments (as [`Opener::sealed_range`] names
/// them), fed in pieces of any size.
pub struct Opening<'a> {
    opener: &'a Opener,
    next: u64,
    end: u64,
    /// Bytes of the plaintext to skip (the range starts inside its first segment).
    skip: u64,
    /// Plaintext bytes still to give.
    left: u64,
    buf: Vec<u8>,
}

impl<'a> Opening<'a> {
    /// Opens plaintext `range` (within [`Opener::plain_len`]).
    pub fn new(opener: &'a Opener, range: &Range<u64>) -> Opening<'a> {
        let (segments, _) = opener.sealed_range(range);
        Opening {
            opener,
            next: segments.start,
            end: segments.end,
            skip: range.start - segments.start * SEGMENT,
            left: range.end.saturating_sub(range.start),
            buf: Vec::with_capacity(SEALED as usize),
        }
    }

    /// Takes sealed bytes; returns the plaintext of the range they completed.
    pub fn push(&mut self, mut sealed: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::new();
        while !sealed.is_empty() && self.next < self.end {
            let want = self.segment_len() as usize;
            let take = (want - self.buf.len()).min(sealed.len());
            self.buf.extend_from_slice(&sealed[..take]);
            sealed = &sealed[take..];
            if self.buf.len() == want {
                let plain = self.opener.open(self.next, &mut self.buf)?;
                let from = (self.skip as usize).min(plain.len());
                let to = (from as u64 + self.left).min(plain.len() as u64) as usize;
                out.extend_from_slice(&plain[from..to]);
                self.left -= (to - from) as u64;
                self.skip = 0;
                self.next += 1;
                self.buf.clear();
            }
        }
        Ok(out)
    }

    /// Whether all of the range was given; an error names the segment that did not come whole.
    pub fn finish(self) -> Result<(), EnvelopeError> {
        if self.left == 0 { Ok(()) } else { Err(EnvelopeError::Segment(self.next)) }
    }

    fn segment_len(&self) -> u64 {
        if self.next + 1 == self.opener.segments { self.opener.sealed_body() - self.next * SEALED } else { SEALED }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            provider: "local".into(),
            key_id: "k1".into(),
            wrapped: vec![7; 60],
            nonce_prefix: [1, 2, 3, 4, 5, 6, 7],
        }
    }

    fn seal(plain: &[u8], pieces: usize) -> Vec<u8> {
        let (mut sealer, mut out) = Sealer::new(&[9; 32], &header()).unwrap();
        for piece in plain.chunks(pieces.max(1)) {
            out.extend(sealer.push(piece).unwrap());
        }
        out.extend(sealer.finish().unwrap());
        out
    }

    fn open(object: &[u8], range: Range<u64>, pieces: usize) -> Result<Vec<u8>, EnvelopeError> {
        let opener = Opener::new(&[9; 32], object, object.len() as u64)?;
        let (_, bytes) = opener.sealed_range(&range);
        let mut opening = Opening::new(&opener, &range);
        let mut out = Vec::new();
        for piece in object[bytes.start as usize..bytes.end as usize].chunks(pieces) {
            out.extend(opening.push(piece)?);
        }
        opening.finish()?;
        Ok(out)
    }

    fn plain(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
    }

    #[test]
    fn every_size_round_trips_whole_and_in_ranges() {
        let s = SEGMENT as usize;
        for len in [0, 1, 100, s - 1, s, s + 1, 2 * s, 3 * s + 17] {
            let data = plain(len);
            for pieces in [1usize, 4096, s, 3 * s] {
                let object = seal(&data, pieces);
                assert_eq!(object.len() as u64, sealed_len(len as u64), "len {len}");
                assert_eq!(Opener::new(&[9; 32], &object, object.len() as u64).unwrap().plain_len(), len as u64);
                assert_eq!(open(&object, 0..len as u64, 1000).unwrap(), data, "len {len} pieces {pieces}");
            }
            let object = seal(&data, 777);
            for (a, b) in [(0, 1), (s - 1, s + 1), (5, len), (len / 2, len)] {
                if a < b && b <= len {
                    assert_eq!(open(&object, a as u64..b as u64, 333).unwrap(), data[a..b], "{a}..{b} of {len}");
                }
            }
        }
    }

    #[test]
    fn no_run_of_the_plaintext_is_stored() {
        let data = vec![0x41u8; 5 * SEGMENT as usize];
        let object = seal(&data, 8192);
        assert!(!object.windows(64).any(|w| w == &data[..64]), "no 64-byte run of the plaintext");
    }

    #[test]
    fn flipped_cut_extended_and_reordered_objects_fail() {
        let data = plain(3 * SEGMENT as usize + 10);
        let object = seal(&data, 4096);
        let whole = 0..data.len() as u64;
        let at = |i: u64| (HEADER_LEN + i * SEALED) as usize;

        let mut flipped = object.clone();
        flipped[at(1) + 5] ^= 1;
        assert_eq!(open(&flipped, whole.clone(), 4096), Err(EnvelopeError::Segment(1)));
        // A range that does not touch the flipped segment still reads.
        assert_eq!(open(&flipped, 0..100, 4096).unwrap(), data[..100]);

        let mut header_changed = object.clone();
        header_changed[30] ^= 1;
        assert!(open(&header_changed, 0..10, 4096).is_err(), "the header is authenticated");

        // Cut at a segment boundary: no last segment, which the length says.
        assert_eq!(open(&object[..at(2)], 0..2 * SEGMENT, 4096), Err(EnvelopeError::Length(at(2) as u64)));
        // Cut to a length a last segment could have: that segment was not sealed as last.
        assert_eq!(open(&object[..at(2) + 100], 0..2 * SEGMENT + 84, 4096), Err(EnvelopeError::Segment(2)));
        // Cut inside a segment.
        let cut = &object[..object.len() - 3];
        assert!(open(cut, 0..data.len() as u64 - 3, 4096).is_err());
        // Extended by a segment's worth: the old last one is no longer last.
        let mut longer = object.clone();
        longer.extend(vec![0u8; SEALED as usize]);
        assert!(open(&longer, whole.clone(), 4096).is_err());
        // Two segments swapped.
        let mut swapped = object.clone();
        let (one, two) = (object[at(0)..at(1)].to_vec(), object[at(1)..at(2)].to_vec());
        swapped[at(0)..at(1)].copy_from_slice(&two);
        swapped[at(1)..at(2)].copy_from_slice(&one);
        assert_eq!(open(&swapped, whole.clone(), 4096), Err(EnvelopeError::Segment(0)));
        // Another data key.
        let opener = Opener::new(&[8; 32], &object, object.len() as u64).unwrap();
        let mut first = object[at(0)..at(1)].to_vec();
        assert_eq!(opener.open(0, &mut first).unwrap_err(), EnvelopeError::Segment(0));
    }

    #[test]
    fn headers_round_trip_and_bad_ones_say_why() {
        let bytes = header().encode().unwrap();
        assert_eq!(bytes.len() as u64, HEADER_LEN);
        assert_eq!(Header::decode(&bytes).unwrap(), header());
        assert!(Header::decode(&bytes[..100]).unwrap_err().to_string().contains("shorter"));
        let mut other = bytes.clone();
        other[0] = b'X';
        assert!(Header::decode(&other).unwrap_err().to_string().contains("magic"));
        let mut v2 = bytes.clone();
        v2[9] = 2;
        assert!(Header::decode(&v2).unwrap_err().to_string().contains("version 2"));
        let mut long = bytes;
        long[24..26].copy_from_slice(&5000u16.to_be_bytes());
        assert!(Header::decode(&long).unwrap_err().to_string().contains("past the header"));
        let huge = Header { wrapped: vec![0; 5000], ..header() };
        assert!(huge.encode().is_err());
        for bad in [0u64, HEADER_LEN, HEADER_LEN + 15, HEADER_LEN + SEALED, HEADER_LEN + SEALED + 3] {
            assert_eq!(plain_len(bad), Err(EnvelopeError::Length(bad)), "{bad}");
        }
    }
}
