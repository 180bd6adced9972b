//! VHD (qemu: vpc). All fields are big-endian.
//!
//! The 512-byte footer is at the end of the file; dynamic and differencing disks also keep a
//! copy at offset 0. Footer: cookie "conectix" @0, features @8, version @12, data_offset u64
//! @16, timestamp @24, creator_app [4] @28, creator_version @32, creator_os @36,
//! original_size u64 @40, current_size u64 @48, cylinders u16 @56, heads u8 @58,
//! sectors_per_track u8 @59, disk_type u32 @60, checksum u32 @64, uuid @68, saved_state @84.
//!
//! Dynamic disk header (at the footer's data_offset, 1024 bytes): cookie "cxsparse" @0,
//! data_offset u64 @8, table_offset u64 @16, header_version u32 @24, max_table_entries u32 @28,
//! block_size u32 @32, ...

use super::{Detected, Format, FormatError, Src, be16, be32, be64, bytes, human};

pub(crate) const COOKIE: &[u8] = b"conectix";
const DYN_COOKIE: &[u8] = b"cxsparse";
const FOOTER_LEN: usize = 512;
const DYN_HEADER_LEN: usize = 1024;

const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;

/// The largest CHS geometry, 65535 cylinders * 16 heads * 255 sectors: qemu then takes the
/// size from current_size.
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// qemu's limit, 2040 GiB in sectors.
const MAX_SECTORS: u64 = 0xff00_0000;
/// The BAT is checked against the file length only while it is at most this big.
const MAX_BAT_CHECK: u64 = 64 << 20;

/// A VHD whose first sector is a footer: dynamic (or differencing), or a fixed disk with a
/// footer copy at the start.
pub(crate) fn detect_at_start(src: &mut Src<'_>, head: &[u8]) -> Result<Detected, FormatError> {
    let size = src.size;
    if head.len() < FOOTER_LEN {
        return Err(FormatError::truncated(format!(
            "vhd footer is truncated: the file is {size} bytes, the footer needs {FOOTER_LEN}"
        )));
    }
    let footer = &head[..FOOTER_LEN];
    let total_sectors = parse_footer(footer)?;
    match be32(footer, 60) {
        TYPE_FIXED => fixed(total_sectors),
        TYPE_DYNAMIC => dynamic(src, footer, total_sectors),
        t => Err(bad_type(t)),
    }
}

/// A fixed VHD: a footer at the end of the file and the disk before it. `None` when the file
/// does not end in a footer.
pub(crate) fn detect_at_end(src: &mut Src<'_>) -> Result<Option<Detected>, FormatError> {
    let size = src.size;
    if size < FOOTER_LEN as u64 {
        return Ok(None);
    }
    let footer = src.read_exact(size - FOOTER_LEN as u64, FOOTER_LEN, "vhd", "footer")?;
    if !footer.starts_with(COOKIE) {
        return Ok(None);
    }
    let total_sectors = parse_footer(&footer)?;
    match be32(&footer, 60) {
        TYPE_FIXED => fixed(total_sectors).map(Some),
        TYPE_DYNAMIC => {
            Err(FormatError::corrupt("the file ends in a dynamic vhd footer but does not start with its copy"))
        }
        t => Err(bad_type(t)),
    }
}

fn fixed(total_sectors: u64) -> Result<Detected, FormatError> {
    Ok(Detected { format: Format::Vhd, virtual_size: total_sectors * 512, variant: Some("fixed") })
}

fn bad_type(t: u32) -> FormatError {
    if t == TYPE_DIFFERENCING {
        FormatError::unsupported(
            "differencing vhd images refer to a parent file and are not self-contained; merge it \
             first (e.g. `qemu-img convert -O vpc CHILD.vhd MERGED.vhd` next to its parent)",
        )
    } else {
        FormatError::corrupt(format!("vhd disk type is {t}, only 2 (fixed), 3 (dynamic) and 4 are valid"))
    }
}

/// The checksum a footer should carry at 64..68: the one's complement of the sum of its other
/// bytes.
pub(crate) fn footer_checksum(f: &[u8]) -> u32 {
    !f.iter()
        .take(FOOTER_LEN)
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)))
}

/// Checks the footer and returns the disk size in sectors, by qemu's rule.
fn parse_footer(f: &[u8]) -> Result<u64, FormatError> {
    let stored = be32(f, 64);
    let sum = footer_checksum(f);
    if sum != stored {
        return Err(FormatError::corrupt(format!(
            "vhd footer checksum is {stored:#010x}, the footer sums to {sum:#010x}"
        )));
    }

    // The visible size of an image made by Virtual PC (or qemu's default) follows its CHS
    // geometry; Hyper-V, disk2vhd, XenServer, Azure and `qemu-img -o force_size=on` ("qem2")
    // use current_size. A maximal geometry always means current_size.
    let creator: [u8; 4] = bytes(f, 28);
    let uses_current_size = matches!(&creator, b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0" | b"wa\0\0");
    let chs = u64::from(be16(f, 56)) * u64::from(f[58]) * u64::from(f[59]);
    let current_size = be64(f, 48);
    let sectors = if uses_current_size || chs == MAX_GEOMETRY { current_size / 512 } else { chs };
    if sectors > MAX_SECTORS {
        return Err(FormatError::unsupported(format!(
            "vhd images larger than 2040 GiB are not supported (this one is {})",
            human(sectors.saturating_mul(512))
        )));
    }
    Ok(sectors)
}

fn dynamic(src: &mut Src<'_>, footer: &[u8], total_sectors: u64) -> Result<Detected, FormatError> {
    let data_offset = be64(footer, 16);
    let h = src.read_exact(data_offset, DYN_HEADER_LEN, "vhd", "dynamic disk header")?;
    if !h.starts_with(DYN_COOKIE) {
        return Err(FormatError::corrupt(format!(
            "vhd dynamic disk header at offset {data_offset} does not start with \"cxsparse\""
        )));
    }
    let bat_offset = be64(&h, 16);
    let max_table_entries = u64::from(be32(&h, 28));
    let block_size = u64::from(be32(&h, 32));
    if !block_size.is_power_of_two() || block_size < 512 {
        return Err(FormatError::corrupt(format!("vhd block size {block_size} is not a power of two of at least 512")));
    }
    let disk_bytes = total_sectors * 512;
    if disk_bytes / block_size > u64::from(u32::MAX) || max_table_entries > MAX_SECTORS * 512 / block_size {
        return Err(FormatError::corrupt("vhd block allocation table is too large"));
    }
    if max_table_entries * block_size < disk_bytes {
        return Err(FormatError::corrupt(format!(
            "vhd block allocation table has {max_table_entries} entries of {block_size} bytes, too few for {}",
            human(disk_bytes)
        )));
    }
    check_bat(src, bat_offset, max_table_entries, block_size)?;
    Ok(Detected { format: Format::Vhd, virtual_size: disk_bytes, variant: Some("dynamic") })
}

/// Like qemu: every allocated block (bitmap and data) must lie within the file.
fn check_bat(src: &mut Src<'_>, bat_offset: u64, entries: u64, block_size: u64) -> Result<(), FormatError> {
    const CHUNK: u64 = 1 << 20;
    let size = src.size;
    let bat_bytes = entries * 4;
    let Some(bat_end) = bat_offset.checked_add(bat_bytes) else {
        return Err(FormatError::corrupt(format!("vhd block allocation table offset {bat_offset} is out of range")));
    };
    if bat_end > size {
        return Err(FormatError::truncated(format!(
            "vhd block allocation table is truncated: the file is {size} bytes, the table needs bytes {bat_offset} to {bat_end}"
        )));
    }
    if bat_bytes > MAX_BAT_CHECK {
        return Ok(());
    }
    let bitmap_size = (block_size / (8 * 512)).div_ceil(512) * 512;
    let mut end = bat_end.div_ceil(512) * 512;
    let mut pos = 0u64;
    // Bounded: bat_bytes <= MAX_BAT_CHECK, so at most 64 chunks.
    while pos < bat_bytes {
        let len = (bat_bytes - pos).min(CHUNK) as usize;
        let buf = src.read_exact(bat_offset + pos, len, "vhd", "block allocation table")?;
        for e in buf.chunks_exact(4) {
            let e = be32(e, 0);
            if e != u32::MAX {
                end = end.max(u64::from(e) * 512 + bitmap_size + block_size);
            }
        }
        pos += len as u64;
    }
    if end > size {
        return Err(FormatError::truncated(format!(
            "vhd image is truncated: the file is {size} bytes, its allocated blocks reach byte {end}"
        )));
    }
    Ok(())
}
