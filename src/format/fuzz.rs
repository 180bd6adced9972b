//! Fuzzing entry points of the detector: what the cargo-fuzz targets in `fuzz/` run, and what
//! the regression test replays for every input that ever failed (`tests/fixtures/fuzz/`).
//!
//! Built for tests and with the `fuzzing` feature only; not part of the API.
//!
//! An input is one control byte and a body. The body becomes an image of the [`Target`]'s
//! format: its magic is written where the format has it (the ISO's descriptors start at 32 KiB,
//! the VHDX's structures are spread over 3 MiB, so their bodies are laid out at those offsets),
//! and the checksums a mutation broke are recomputed, so that mutations reach the parsers
//! behind them. The control byte says how the store presents the image: exactly, with zeros
//! in the middle (a large sparse file), with a declared size larger than the store holds (a
//! lying or cut store), or as a prefix; without checksum repair; and the target's variant
//! (a VHD footer at the end instead of the start, a vmdk text descriptor instead of a sparse
//! header).
//!
//! [`run`] then checks what must hold for every input: detection returns (no panic, no read
//! larger than the detector's cap, a bounded number of reads), a known magic never comes out
//! as raw, and a detected virtual size is one the format's header can describe.

use std::io;

use super::*;

/// The parser a fuzz target aims at: the format whose magic its inputs carry (`Raw`: the
/// bytes as they are, whatever detection makes of them). The fuzz target is
/// `format_<lowercase>`, and so is its regression directory.
pub type Target = Format;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Where a VHDX body goes: the file identifier, both headers, both region tables (their first
/// 512 bytes: the entries), the first log sector, the start of the BAT, the metadata table and,
/// with the rest of the body, its items. These are the offsets `qemu-img create -f vhdx` uses.
const VHDX_WINDOWS: [(u64, usize); 8] = [
    (0, 512),
    (64 * KIB, 4096),
    (128 * KIB, 4096),
    (192 * KIB, 512),
    (256 * KIB, 512),
    (MIB, 4096),
    (2 * MIB, 4096),
    (3 * MIB, 512),
];
/// The rest of a VHDX body: the metadata items.
const VHDX_REST: u64 = 3 * MIB + 64 * KIB;
/// An ISO body starts at the volume descriptors.
const ISO_AT: usize = 32768;

/// The most reads, and bytes read, one detection may take (the largest tables it checks, a
/// 32 MiB qcow2 L1 table, a 64 MiB VHDX BAT and log, take a few hundred reads).
const MAX_READS: u64 = 20_000;
const MAX_BYTES: u64 = 256 * MIB;

/// Bytes of a vmdk text descriptor's first line.
const DESCRIPTOR: &[u8] = b"# Disk DescriptorFile\n";

/// What a run found, in words: the regression test compares it.
pub fn run(target: Target, input: &[u8]) -> String {
    let Some((&control, body)) = input.split_first() else { return "empty input".into() };
    let variant = control & 0b1000 != 0;
    let (head, tail) = shape(target, variant, body);
    let mut head = head;
    let mut tail = tail;
    if control & 0b100 == 0 {
        // Checksums are repaired over the whole image as the detector sees it.
        let split = head.len();
        head.extend_from_slice(&tail);
        fix_checksums(&mut head);
        tail = head.split_off(split);
    }
    let real = (head.len() + tail.len()) as u64;
    let k = u32::from(control >> 4);
    let ext = 1u64 << (9 + 2 * k);
    let (gap, declared) = match control & 0b11 {
        0 => (0, real),
        1 => (ext, real + ext),
        2 => (0, real + ext),
        _ => (0, real * u64::from(k) / 16),
    };
    let image = Image { head, gap, tail, reads: 0, bytes: 0 };
    // Whether the image ends where the store says (a footer at the end is at the end).
    let whole = control & 0b11 <= 1;
    describe(&detect_checked(image, declared, target, variant, whole))
}

/// [`detect`] on `data` as a store of `declared` bytes, with the invariants of [`run`] (the
/// unit tests' own mutations go through here too).
#[cfg(test)]
pub(crate) fn check_bytes(data: &[u8], declared: u64) -> Result<Detected, FormatError> {
    let image = Image { head: data.to_vec(), gap: 0, tail: Vec::new(), reads: 0, bytes: 0 };
    detect_checked(image, declared, Target::Raw, false, declared == data.len() as u64)
}

fn detect_checked(
    mut image: Image,
    declared: u64,
    target: Target,
    variant: bool,
    whole: bool,
) -> Result<Detected, FormatError> {
    // What the start claims, judged on the bytes detection reads first.
    let seen = image.read_at(0, declared.min(HEAD_LEN as u64) as usize).unwrap_or_default();
    let claimed = claimed_format(&seen);
    (image.reads, image.bytes) = (0, 0);
    let result = detect(&mut image, declared);
    check(Case { target, variant, whole, claimed, declared }, &result);
    result
}

/// The image bytes before the zero gap, and after it (a footer that must stay at the end).
fn shape(target: Target, variant: bool, body: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut b = body.to_vec();
    let force = |b: &mut Vec<u8>, at: usize, magic: &[u8]| {
        if b.len() < at + magic.len() {
            b.resize(at + magic.len(), 0);
        }
        b[at..at + magic.len()].copy_from_slice(magic);
    };
    match target {
        Target::Qcow2 => force(&mut b, 0, qcow2::MAGIC),
        Target::Vmdk if variant => {
            if !b.starts_with(DESCRIPTOR) {
                b.splice(0..0, DESCRIPTOR.iter().copied());
            }
        }
        Target::Vmdk => {
            force(&mut b, 0, vmdk::MAGIC);
            // A streamOptimized footer stays at the end when zeros are put in the middle.
            if b.len() >= 2048 {
                let footer = b.split_off(b.len() - 1536);
                return (b, footer);
            }
        }
        Target::Vhd if variant => {
            if b.len() < 512 {
                b.splice(0..0, std::iter::repeat_n(0, 512 - b.len()));
            }
            let footer = b.split_off(b.len() - 512);
            let mut footer = footer;
            footer[..8].copy_from_slice(vpc::COOKIE);
            return (b, footer);
        }
        Target::Vhd => force(&mut b, 0, vpc::COOKIE),
        Target::Vdi => force(&mut b, 64, &0xbeda_107fu32.to_le_bytes()),
        Target::Vhdx => {
            let mut img = Vec::new();
            let mut rest = &b[..];
            for (at, len) in VHDX_WINDOWS {
                let n = len.min(rest.len());
                img.resize(at as usize, 0);
                img.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            img.resize(VHDX_REST as usize, 0);
            img.extend_from_slice(rest);
            force(&mut img, 0, vhdx::SIGNATURE);
            return (img, Vec::new());
        }
        Target::Iso => {
            let mut img = vec![0u8; ISO_AT];
            img.extend_from_slice(&b);
            force(&mut img, ISO_AT + 1, b"CD001");
            return (img, Vec::new());
        }
        Target::Raw => {}
    }
    (b, Vec::new())
}

/// The format [`detect`] must answer (or fail on) for an image starting with `head`, by the
/// magic at its start; `None` when the start claims nothing.
fn claimed_format(head: &[u8]) -> Option<Option<Format>> {
    if head.starts_with(qcow2::MAGIC) {
        Some(Some(Format::Qcow2))
    } else if head.starts_with(vmdk::MAGIC) {
        Some(Some(Format::Vmdk))
    } else if head.starts_with(vpc::COOKIE) {
        Some(Some(Format::Vhd))
    } else if head.starts_with(vhdx::SIGNATURE) {
        Some(Some(Format::Vhdx))
    } else if vdi::has_signature(head) {
        Some(Some(Format::Vdi))
    } else if head.starts_with(vmdk::COWD_MAGIC) || other_known_magic(head).is_some() || vmdk::is_text_descriptor(head)
    {
        // Never detected: always an error.
        Some(None)
    } else {
        None
    }
}

/// One run, as [`check`] needs it.
struct Case {
    target: Target,
    variant: bool,
    /// The store holds exactly the declared bytes.
    whole: bool,
    claimed: Option<Option<Format>>,
    declared: u64,
}

/// The invariants of one detection.
fn check(case: Case, result: &Result<Detected, FormatError>) {
    let Case { target, variant, whole, claimed, declared } = case;
    if target == Target::Vmdk && variant && whole {
        assert!(matches!(result, Err(FormatError::Unsupported { .. })), "a vmdk descriptor gave {result:?}");
    }
    let Ok(d) = result else { return };
    match claimed {
        Some(Some(f)) => assert_eq!(d.format, f, "the magic of {f} detected as {d:?}"),
        Some(None) => panic!("an unsupported magic detected as {d:?}"),
        None => assert!(
            matches!(d.format, Format::Raw | Format::Vhd | Format::Iso),
            "no magic at the start, detected as {d:?}"
        ),
    }
    if target == Target::Vhd && variant && whole && claimed.is_none() {
        assert_eq!(d.format, Format::Vhd, "a vhd footer at the end detected as {d:?}");
    }
    if target == Target::Iso && whole && claimed.is_none() {
        assert!(matches!(d.format, Format::Iso | Format::Vhd), "ISO descriptors detected as {d:?}");
    }
    let v = d.virtual_size;
    let whole_sectors = v.is_multiple_of(512);
    let (max, variants): (u64, &[&str]) = match d.format {
        Format::Raw => {
            assert_eq!(v, declared, "raw virtual size is the file size");
            (u64::MAX, &[])
        }
        Format::Iso => {
            assert!(v > 0 && v <= declared, "ISO volume of {v} in {declared} bytes");
            (declared, &[])
        }
        Format::Qcow2 => (i64::MAX as u64, &["qcow2 v2", "qcow2 v3"]),
        Format::Vmdk => (i64::MAX as u64, &["monolithicSparse", "streamOptimized", "seSparse", "vmfsSparse"]),
        Format::Vhd => (0xff00_0000 * 512, &["fixed", "dynamic"]),
        Format::Vhdx => (64 << 40, &["fixed", "dynamic"]),
        Format::Vdi => ((((1u64 << 31) - 512) / 4) << 20, &["static", "dynamic"]),
    };
    assert!(v <= max, "{d:?}: larger than the format can describe ({max})");
    if !matches!(d.format, Format::Raw | Format::Iso) {
        assert!(whole_sectors, "{d:?}: not whole sectors");
        if d.format != Format::Vmdk {
            assert!(d.variant.is_some_and(|x| variants.contains(&x)), "{d:?}: unexpected variant");
        } else {
            assert!(d.variant.is_some(), "{d:?}: no variant");
        }
    }
}

fn describe(result: &Result<Detected, FormatError>) -> String {
    match result {
        Ok(d) => format!("{} {} {}", d.format, d.virtual_size, d.variant.unwrap_or("-")),
        Err(e @ FormatError::Truncated { .. }) => format!("truncated: {e}"),
        Err(e @ FormatError::Corrupt { .. }) => format!("corrupt: {e}"),
        Err(e @ FormatError::Unsupported { .. }) => format!("unsupported: {e}"),
        Err(e @ FormatError::Io(_)) => format!("io: {e}"),
    }
}

/// The image a store holds: `head`, `gap` zero bytes, `tail`; nothing after. Refuses a read
/// larger than the detector's cap (a store would allocate it) and more work than
/// [`MAX_READS`] and [`MAX_BYTES`].
struct Image {
    head: Vec<u8>,
    gap: u64,
    tail: Vec<u8>,
    reads: u64,
    bytes: u64,
}

impl ReadAt for Image {
    fn read_at(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        assert!(len <= MAX_READ, "a read of {len} bytes, above the cap of {MAX_READ}");
        self.reads += 1;
        self.bytes += len as u64;
        // Bounded work: detection reads headers and tables, never the whole of a large image.
        assert!(self.reads <= MAX_READS, "more than {MAX_READS} reads");
        assert!(self.bytes <= MAX_BYTES, "more than {MAX_BYTES} bytes read");
        let head_len = self.head.len() as u64;
        let tail_at = head_len + self.gap;
        let end = tail_at + self.tail.len() as u64;
        let stop = offset.saturating_add(len as u64).min(end);
        let mut out = Vec::with_capacity(usize::try_from(stop.saturating_sub(offset)).unwrap_or(0));
        let mut pos = offset;
        while pos < stop {
            if pos < head_len {
                let n = (stop.min(head_len) - pos) as usize;
                out.extend_from_slice(&self.head[pos as usize..pos as usize + n]);
                pos += n as u64;
            } else if pos < tail_at {
                let n = stop.min(tail_at) - pos;
                out.resize(out.len() + n as usize, 0);
                pos += n;
            } else {
                let at = (pos - tail_at) as usize;
                let n = (stop - pos) as usize;
                out.extend_from_slice(&self.tail[at..at + n]);
                pos += n as u64;
            }
        }
        Ok(out)
    }
}

/// Recomputes the checksums a mutation broke (the VHD footer at the start and at the end, the
/// VHDX headers and region tables), so that the mutation reaches the code behind them.
pub fn fix_checksums(b: &mut [u8]) {
    let n = b.len();
    let vhd_sum = |f: &mut [u8]| {
        let sum = vpc::footer_checksum(f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
    };
    if n >= 512 && b.starts_with(vpc::COOKIE) {
        vhd_sum(&mut b[..512]);
    }
    if n >= 512 && b[n - 512..].starts_with(vpc::COOKIE) {
        vhd_sum(&mut b[n - 512..]);
    }
    if b.starts_with(vhdx::SIGNATURE) {
        for (at, len) in [(64 * 1024, 4096), (128 * 1024, 4096), (192 * 1024, 65536), (256 * 1024, 65536)] {
            if at + len <= n {
                let t = &mut b[at..at + len];
                t[4..8].fill(0);
                let crc = vhdx::crc32c(t);
                t[4..8].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
}
