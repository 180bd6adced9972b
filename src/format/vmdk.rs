//! VMware vmdk: single-file hosted sparse extents (monolithicSparse, streamOptimized) and the
//! text descriptor files of multi-file images. Sparse header fields are little-endian.
//!
//! Sparse header: magic "KDMV" @0, version u32 @4, flags u32 @8, capacity u64 @12 (sectors),
//! granularity u64 @20 (sectors), desc_offset u64 @28, desc_size u64 @36 (sectors),
//! num_gtes_per_gt u32 @44, rgd_offset u64 @48, gd_offset u64 @56, grain_offset u64 @64,
//! filler u8 @72, check bytes @73, compress_algorithm u16 @77.
//!
//! A streamOptimized image written by VMware has gd_offset == GD_AT_END in the header and
//! the real header in a footer: the last three sectors are a footer marker, a sector holding
//! the magic and the header, and an end-of-stream marker.

use super::{Detected, Format, FormatError, Src, le16, le32, le64};

pub(crate) const MAGIC: &[u8] = b"KDMV";
pub(crate) const COWD_MAGIC: &[u8] = b"COWD";

const HEADER_LEN: usize = 79;
const GD_AT_END: u64 = u64::MAX;
const FLAG_COMPRESS: u32 = 1 << 16;
const COMPRESSION_DEFLATE: u16 = 1;
const MARKER_END_OF_STREAM: u32 = 0;
const MARKER_FOOTER: u32 = 3;
/// The embedded descriptor is read up to this many bytes.
const MAX_DESC: usize = 64 << 10;
/// qemu: at most 512 entries per grain table, 2^21 sectors per grain, 32 MiB of L1 table.
const MAX_GTES: u32 = 512;
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
const MAX_L1_ENTRIES: u64 = (32 << 20) / 4;
/// The grain tables are checked (see `check_grains`) while there are at most this many and
/// they lie within this many bytes (those of a 1 TiB disk of 64 KiB grains, as qemu writes it).
const MAX_GTS: usize = 1 << 16;
const MAX_GT_SPAN: u64 = 64 << 20;

/// The createType values we name as variants.
const CREATE_TYPES: &[&str] = &[
    "monolithicSparse",
    "streamOptimized",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfs",
    "vmfsSparse",
    "vmfsThin",
    "vmfsRaw",
    "vmfsRDM",
    "vmfsRDMP",
    "vmfsPassthroughRawDeviceMap",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "fullDevice",
    "partitionedDevice",
    "custom",
    "seSparse",
];

struct Header {
    version: u32,
    flags: u32,
    capacity: u64,
    granularity: u64,
    desc_offset: u64,
    desc_size: u64,
    num_gtes_per_gt: u32,
    gd_offset: u64,
    grain_offset: u64,
    compress: u16,
}

/// Parses the header that starts with the magic at `b[0]`.
fn parse_header(b: &[u8]) -> Header {
    Header {
        version: le32(b, 4),
        flags: le32(b, 8),
        capacity: le64(b, 12),
        granularity: le64(b, 20),
        desc_offset: le64(b, 28),
        desc_size: le64(b, 36),
        num_gtes_per_gt: le32(b, 44),
        gd_offset: le64(b, 56),
        grain_offset: le64(b, 64),
        compress: le16(b, 77),
    }
}

pub(crate) fn detect_sparse(src: &mut Src<'_>, head: &[u8]) -> Result<Detected, FormatError> {
    let size = src.size;
    if head.len() < HEADER_LEN {
        return Err(FormatError::truncated(format!(
            "vmdk header is truncated: the file is {size} bytes, the header needs {HEADER_LEN}"
        )));
    }
    let mut h = parse_header(head);

    // A sparse header without capacity defers to its embedded descriptor, whose extents are
    // other files (qemu opens it as a descriptor file).
    let desc = read_descriptor(src, &h)?;
    if h.capacity == 0 && h.desc_offset != 0 {
        let create_type = desc.as_deref().and_then(|d| descriptor_value(d, "createType"));
        if matches!(create_type.as_deref(), Some("monolithicSparse" | "streamOptimized")) {
            return Err(FormatError::unsupported(
                "this vmdk has a capacity of 0 (an empty disk), which qemu-img cannot open",
            ));
        }
        return Err(multi_file(create_type));
    }
    if let Some(parent) = desc.as_deref().and_then(|d| descriptor_value(d, "parentFileNameHint"))
        && !parent.is_empty()
    {
        return Err(FormatError::unsupported(format!(
            "vmdk images with a parent (backing) file are not self-contained (this one refers to \
             {parent:?}); flatten it first with `qemu-img convert -O vmdk IMAGE FLAT.vmdk`"
        )));
    }

    if h.gd_offset == GD_AT_END {
        h = footer_header(src)?;
    }

    if h.version > 3 {
        return Err(FormatError::unsupported(format!(
            "vmdk sparse extent version {} is not supported (1 to 3 are)",
            h.version
        )));
    }
    if h.num_gtes_per_gt > MAX_GTES {
        return Err(FormatError::corrupt(format!(
            "vmdk grain tables have {} entries, at most {MAX_GTES} are valid",
            h.num_gtes_per_gt
        )));
    }
    let l1_entry_sectors = u64::from(h.num_gtes_per_gt).saturating_mul(h.granularity);
    if l1_entry_sectors == 0 {
        return Err(FormatError::corrupt("vmdk grain size or grain table size is zero"));
    }
    if h.granularity > MAX_GRAIN_SECTORS {
        return Err(FormatError::corrupt(format!(
            "vmdk grain size is {} sectors, at most {MAX_GRAIN_SECTORS} are valid",
            h.granularity
        )));
    }
    if h.capacity.div_ceil(l1_entry_sectors) > MAX_L1_ENTRIES {
        return Err(FormatError::corrupt(format!(
            "vmdk capacity of {} sectors needs a grain directory larger than qemu accepts",
            h.capacity
        )));
    }
    let Some(virtual_size) = h.capacity.checked_mul(512).filter(|v| *v <= i64::MAX as u64) else {
        return Err(FormatError::corrupt(format!("vmdk capacity of {} sectors is too large", h.capacity)));
    };
    match h.grain_offset.checked_mul(512) {
        Some(g) if g <= size => {}
        _ => {
            return Err(FormatError::truncated(format!(
                "vmdk image is truncated: the file is {size} bytes, its data starts at sector {}",
                h.grain_offset
            )));
        }
    }

    check_grains(src, &h)?;

    let variant = desc
        .as_deref()
        .and_then(|d| descriptor_value(d, "createType"))
        .and_then(|t| CREATE_TYPES.iter().find(|c| c.eq_ignore_ascii_case(&t)).copied())
        .unwrap_or(if h.flags & FLAG_COMPRESS != 0 && h.compress == COMPRESSION_DEFLATE {
            "streamOptimized"
        } else {
            "monolithicSparse"
        });
    Ok(Detected { format: Format::Vmdk, virtual_size, variant: Some(variant) })
}

/// The grain directory, every grain table it points to, and every grain those point to must
/// start within the file (as `qemu-img check` has it): a sparse vmdk cut short loses its later
/// grains, which qemu then reads as zeros or fails on. The directory is read whole (at most
/// 32 MiB, capped above); the grain tables only when they lie within [`MAX_GT_SPAN`] bytes of
/// each other and are at most [`MAX_GTS`] (qemu writes them next to each other after the
/// directory), so the reads stay bounded.
fn check_grains(src: &mut Src<'_>, h: &Header) -> Result<(), FormatError> {
    const CHUNK: u64 = 1 << 20;
    let size = src.size;
    let truncated = |what: &str, start: u64, end: u64| {
        FormatError::truncated(format!(
            "vmdk image is truncated: the file is {size} bytes, {what} lies at bytes {start} to {end}"
        ))
    };
    let gt_bytes = u64::from(h.num_gtes_per_gt) * 4;
    let gd_entries = h.capacity.div_ceil(u64::from(h.num_gtes_per_gt) * h.granularity);
    let gd_bytes = gd_entries * 4;
    let gd_start = h.gd_offset.saturating_mul(512);
    if gd_start.saturating_add(gd_bytes) > size {
        return Err(truncated("its grain directory", gd_start, gd_start.saturating_add(gd_bytes)));
    }
    let mut tables = Vec::new();
    let mut too_many = false;
    let mut pos = 0u64;
    // Bounded: gd_bytes <= MAX_L1_ENTRIES * 4 (32 MiB), so at most 32 chunks.
    while pos < gd_bytes {
        let len = (gd_bytes - pos).min(CHUNK) as usize;
        let buf = src.read_exact(gd_start + pos, len, "vmdk", "grain directory")?;
        for e in buf.chunks_exact(4) {
            let start = u64::from(le32(e, 0)) * 512;
            if start == 0 {
                continue;
            }
            if start + gt_bytes > size {
                return Err(truncated("a grain table", start, start + gt_bytes));
            }
            if tables.len() < MAX_GTS {
                tables.push(start);
            } else {
                too_many = true;
            }
        }
        pos += len as u64;
    }
    tables.sort_unstable();
    tables.dedup();
    let (Some(&first), Some(&last)) = (tables.first(), tables.last()) else { return Ok(()) };
    if too_many || last + gt_bytes - first > MAX_GT_SPAN {
        return Ok(());
    }
    // The tables in windows of up to CHUNK bytes: each byte of the span is read about once.
    let mut window: (u64, Vec<u8>) = (0, Vec::new());
    for start in tables {
        if start < window.0 || start + gt_bytes > window.0 + window.1.len() as u64 {
            let len = (last + gt_bytes - start).clamp(gt_bytes, CHUNK.max(gt_bytes)) as usize;
            window = (start, src.read_exact(start, len, "vmdk", "grain table")?);
        }
        let from = (start - window.0) as usize;
        for e in window.1[from..from + gt_bytes as usize].chunks_exact(4) {
            // 0: not allocated; 1: a zeroed grain (VMDK4_GTE_ZEROED).
            let grain = u64::from(le32(e, 0)) * 512;
            if grain > 512 && grain >= size {
                return Err(truncated("a grain", grain, grain + h.granularity * 512));
            }
        }
    }
    Ok(())
}

/// The embedded descriptor text, if the header names one.
fn read_descriptor(src: &mut Src<'_>, h: &Header) -> Result<Option<String>, FormatError> {
    if h.desc_offset == 0 || h.desc_size == 0 {
        return Ok(None);
    }
    let Some(offset) = h.desc_offset.checked_mul(512) else {
        return Err(FormatError::corrupt(format!("vmdk descriptor offset {} is out of range", h.desc_offset)));
    };
    let len = usize::try_from(h.desc_size.saturating_mul(512)).unwrap_or(MAX_DESC).min(MAX_DESC);
    // Only the first sector must be there: the descriptor area is often padded.
    let buf = src.read_upto(offset, len)?;
    if buf.len() < len.min(512) {
        return Err(FormatError::truncated(format!(
            "vmdk embedded descriptor is truncated: the file is {} bytes, the descriptor starts at byte {offset}",
            src.size
        )));
    }
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()))
}

/// The header from the footer of a streamOptimized image.
fn footer_header(src: &mut Src<'_>) -> Result<Header, FormatError> {
    let size = src.size;
    let missing = || {
        FormatError::truncated(format!(
            "vmdk streamOptimized image has no footer at its end (the header says the grain \
             directory is at the end); the file ({size} bytes) is probably cut short"
        ))
    };
    if size < 1536 {
        return Err(missing());
    }
    let b = src.read_exact(size - 1536, 1536, "vmdk", "footer")?;
    let footer_marker_ok = le64(&b, 0) == 0 && le32(&b, 8) == 0 && le32(&b, 12) == MARKER_FOOTER;
    let eos_ok = le64(&b, 1024) == 0 && le32(&b, 1032) == 0 && le32(&b, 1036) == MARKER_END_OF_STREAM;
    if !footer_marker_ok || !eos_ok || !b[512..].starts_with(MAGIC) {
        return Err(missing());
    }
    let h = parse_header(&b[512..]);
    if h.gd_offset == GD_AT_END {
        return Err(FormatError::corrupt("vmdk footer does not say where the grain directory is"));
    }
    Ok(h)
}

/// qemu's probe for a text descriptor: comment and blank lines, then "version=1|2|3".
pub(crate) fn is_text_descriptor(head: &[u8]) -> bool {
    if head.starts_with(b"# Disk DescriptorFile") {
        return true;
    }
    for line in head.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b"#") || line.iter().all(|&c| c == b' ') {
            continue;
        }
        return matches!(line, b"version=1" | b"version=2" | b"version=3");
    }
    false
}

/// A text descriptor at the start of the image: the data is in other files.
pub(crate) fn descriptor_file(head: &[u8]) -> Result<Detected, FormatError> {
    let text = String::from_utf8_lossy(head);
    Err(multi_file(descriptor_value(&text, "createType")))
}

fn multi_file(create_type: Option<String>) -> FormatError {
    let kind = create_type.map(|t| format!(" (createType {t:?})")).unwrap_or_default();
    FormatError::unsupported(format!(
        "this is a vmdk descriptor that refers to separate extent files{kind}; multi-file vmdk \
         images are not supported, convert it to a single file first with \
         `qemu-img convert -O vmdk -o subformat=streamOptimized DESCRIPTOR.vmdk SINGLE.vmdk`"
    ))
}

/// The value of `key = "value"` in a descriptor, unquoted.
fn descriptor_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.trim();
        if line.starts_with('#') {
            return None;
        }
        let (k, v) = line.split_once('=')?;
        if k.trim() != key {
            return None;
        }
        let v = v.trim();
        let v = v.strip_prefix('"').map(|v| v.strip_suffix('"').unwrap_or(v)).unwrap_or(v);
        Some(v.to_string())
    })
}
