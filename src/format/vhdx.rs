//! Microsoft VHDX. All fields are little-endian; GUIDs are stored in the Microsoft layout
//! (the first three fields little-endian).
//!
//! Layout: file identifier "vhdxfile" @0; two 4 KiB headers @64 KiB and @128 KiB (signature
//! "head", crc32c @4, sequence_number u64 @8, file_write_guid @16, data_write_guid @32,
//! log_guid @48, log_version u16 @64, version u16 @66, log_length u32 @68, log_offset u64 @72);
//! two copies of the 64 KiB region table @192 KiB and @256 KiB (signature "regi", crc32c @4,
//! entry_count u32 @8; 32-byte entries from @16: guid, file_offset u64, length u32,
//! required u32). The metadata region starts with a table (signature "metadata", entry_count
//! u16 @10; 32-byte entries from @32: item guid, offset u32, length u32, flags u32) whose items
//! give the virtual disk size, the block size and whether the disk has a parent.

use super::{Detected, Format, FormatError, Src, bytes, human, le16, le32, le64};

pub(crate) const SIGNATURE: &[u8] = b"vhdxfile";

const KIB: u64 = 1024;
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_LEN: usize = 4096;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const TABLE_LEN: usize = 64 * 1024;
const MAX_ENTRIES: u64 = 2047;

const BAT_REGION: [u8; 16] = guid(0x2DC2_7766, 0xF623, 0x4200, [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
const METADATA_REGION: [u8; 16] = guid(0x8B7C_A206, 0x4790, 0x4B9A, [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E]);
const FILE_PARAMETERS: [u8; 16] = guid(0xCAA1_6737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B]);
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(0x2FA5_4224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8]);
const PAGE_83_DATA: [u8; 16] = guid(0xBECA_12AB, 0xB2E6, 0x4523, [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46]);
const LOGICAL_SECTOR_SIZE: [u8; 16] =
    guid(0x8141_BF1D, 0xA96F, 0x4709, [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F]);
const PHYSICAL_SECTOR_SIZE: [u8; 16] =
    guid(0xCDA3_48C7, 0x445D, 0x4471, [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56]);
const PARENT_LOCATOR: [u8; 16] = guid(0xA8D3_5F2D, 0xB30B, 0x454D, [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C]);

const REGION_REQUIRED: u32 = 1;
const METADATA_REQUIRED: u32 = 1 << 2;
const PARAMS_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
const PARAMS_HAS_PARENT: u32 = 1 << 1;
const BLOCK_SIZE_MIN: u32 = 1 << 20;
const BLOCK_SIZE_MAX: u32 = 256 << 20;
/// The spec's limit on the virtual disk size: 64 TiB.
const MAX_DISK_SIZE: u64 = 64 << 40;
/// A BAT entry's low three bits are the block state; bits 20..63 the file offset in MiB.
const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
const BAT_OFFSET_MASK: u64 = !0xF_FFFF;
/// The BAT is checked against the file length only while it is at most this big.
const MAX_BAT_CHECK: u64 = 64 << 20;
/// How much of the log is looked through for entries (qemu makes 1 MiB logs).
const MAX_LOG_SCAN: u64 = 64 << 20;
/// Log entries up to this length get their checksum checked.
const MAX_READ_ENTRY: u64 = 2 << 20;
/// How many bytes of log entries whose checksums fail are read before the log is called
/// damaged: every sector of a crafted log can claim an entry of up to [`MAX_READ_ENTRY`].
const MAX_LOG_CHECK: u64 = 8 << 20;

/// A GUID in the on-disk (Microsoft) byte order.
pub(crate) const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]]
}

pub(crate) fn detect(src: &mut Src<'_>) -> Result<Detected, FormatError> {
    check_headers(src)?;
    let (bat, metadata) = region_table(src)?;
    let md = metadata_items(src, metadata)?;
    check_bat(src, bat, &md)?;
    Ok(Detected {
        format: Format::Vhdx,
        // qemu counts whole 512-byte sectors.
        virtual_size: md.disk_size / 512 * 512,
        variant: Some(if md.params_flags & PARAMS_LEAVE_BLOCKS_ALLOCATED != 0 { "fixed" } else { "dynamic" }),
    })
}

/// At least one of the two headers must be valid; the current one (highest sequence number)
/// must be version 1 and have an empty log.
fn check_headers(src: &mut Src<'_>) -> Result<(), FormatError> {
    let mut best: Option<Vec<u8>> = None;
    let mut truncated = None;
    for off in HEADER_OFFSETS {
        match src.read_exact(off, HEADER_LEN, "vhdx", "header") {
            Ok(h) => {
                if &h[..4] == b"head" && checksum_ok(&h) {
                    let better = best.as_ref().is_none_or(|b| le64(&h, 8) > le64(b, 8));
                    if better {
                        best = Some(h);
                    }
                }
            }
            Err(e @ FormatError::Truncated { .. }) => truncated = truncated.or(Some(e)),
            Err(e) => return Err(e),
        }
    }
    let Some(h) = best else {
        return Err(truncated.unwrap_or_else(|| FormatError::corrupt("vhdx has no valid header at 64 KiB or 128 KiB")));
    };
    let version = le16(&h, 66);
    if version != 1 {
        return Err(FormatError::unsupported(format!("vhdx version {version} is not supported (1 is)")));
    }
    let log_guid: [u8; 16] = bytes(&h, 48);
    if log_guid != [0; 16] && log_has_entries(src, &log_guid, le64(&h, 72), u64::from(le32(&h, 68)))? {
        return Err(FormatError::unsupported(
            "the vhdx log has not been replayed (the image was not closed cleanly); open it once \
             read-write, e.g. with `qemu-img check -r all IMAGE.vhdx` or by attaching it in \
             Hyper-V, then upload it again",
        ));
    }
    Ok(())
}

/// Whether the log holds a valid entry of the current log GUID, which qemu would have to
/// replay (and refuses to, on a read-only open). Scans at most [`MAX_LOG_SCAN`] bytes and
/// checks the checksums of at most [`MAX_LOG_CHECK`] bytes of entries.
fn log_has_entries(src: &mut Src<'_>, log_guid: &[u8; 16], offset: u64, length: u64) -> Result<bool, FormatError> {
    const CHUNK: u64 = 1 << 20;
    const SECTOR: u64 = 4096;
    let scan = length.min(MAX_LOG_SCAN);
    let mut checked = 0u64;
    let mut pos = 0u64;
    // Bounded: at most MAX_LOG_SCAN / CHUNK chunks.
    while pos < scan {
        let len = (scan - pos).min(CHUNK) as usize;
        let buf = src.read_exact(offset.saturating_add(pos), len, "vhdx", "log")?;
        for (i, s) in buf.chunks(SECTOR as usize).enumerate() {
            if !s.starts_with(b"loge") || bytes::<16>(s, 32) != *log_guid || le64(s, 16) == 0 {
                continue;
            }
            let entry_length = u64::from(le32(s, 8));
            if entry_length == 0 || !entry_length.is_multiple_of(SECTOR) || entry_length > length {
                continue;
            }
            let at = offset.saturating_add(pos + i as u64 * SECTOR);
            if entry_length > MAX_READ_ENTRY {
                // Too big to check its checksum here: take it as valid.
                return Ok(true);
            }
            checked += entry_length;
            if checked > MAX_LOG_CHECK {
                return Err(FormatError::corrupt(format!(
                    "the vhdx log holds more than {} of damaged entries",
                    human(MAX_LOG_CHECK)
                )));
            }
            let entry = src.read_upto(at, entry_length as usize)?;
            if entry.len() as u64 == entry_length && checksum_ok(&entry) {
                return Ok(true);
            }
        }
        pos += len as u64;
    }
    Ok(false)
}

#[derive(Clone, Copy)]
struct Region {
    offset: u64,
    length: u64,
}

/// The BAT and metadata regions from the first valid region table.
fn region_table(src: &mut Src<'_>) -> Result<(Region, Region), FormatError> {
    let mut first_err = None;
    for off in REGION_TABLE_OFFSETS {
        let r = src.read_exact(off, TABLE_LEN, "vhdx", "region table").and_then(|t| parse_region_table(&t, off));
        match r {
            Ok(regions) => return Ok(regions),
            Err(e @ (FormatError::Truncated { .. } | FormatError::Corrupt { .. })) => {
                first_err = first_err.or(Some(e));
            }
            Err(e) => return Err(e),
        }
    }
    Err(first_err.unwrap_or_else(|| FormatError::corrupt("vhdx has no valid region table")))
}

fn parse_region_table(t: &[u8], at: u64) -> Result<(Region, Region), FormatError> {
    if &t[..4] != b"regi" || !checksum_ok(t) {
        return Err(FormatError::corrupt(format!("vhdx region table at {} KiB is damaged", at / KIB)));
    }
    let count = u64::from(le32(t, 8));
    if count > MAX_ENTRIES {
        return Err(FormatError::corrupt(format!("vhdx region table has {count} entries, at most 2047 are valid")));
    }
    let (mut bat, mut metadata) = (None, None);
    for e in t[16..].chunks_exact(32).take(count as usize) {
        let id: [u8; 16] = bytes(e, 0);
        let region = Region { offset: le64(e, 16), length: u64::from(le32(e, 24)) };
        let slot = if id == BAT_REGION {
            &mut bat
        } else if id == METADATA_REGION {
            &mut metadata
        } else if le32(e, 28) & REGION_REQUIRED != 0 {
            return Err(FormatError::unsupported("vhdx image has a required region this importer does not know"));
        } else {
            continue;
        };
        if slot.replace(region).is_some() {
            return Err(FormatError::corrupt("vhdx region table lists a region twice"));
        }
    }
    match (bat, metadata) {
        (Some(b), Some(m)) => Ok((b, m)),
        _ => Err(FormatError::corrupt("vhdx region table lacks the BAT or the metadata region")),
    }
}

struct Metadata {
    disk_size: u64,
    block_size: u32,
    logical_sector_size: u32,
    params_flags: u32,
}

fn metadata_items(src: &mut Src<'_>, region: Region) -> Result<Metadata, FormatError> {
    let t = src.read_exact(region.offset, TABLE_LEN, "vhdx", "metadata table")?;
    if &t[..8] != b"metadata" {
        return Err(FormatError::corrupt(format!(
            "vhdx metadata table at offset {} has no \"metadata\" signature",
            region.offset
        )));
    }
    let count = u64::from(le16(&t, 10));
    if count > MAX_ENTRIES {
        return Err(FormatError::corrupt(format!("vhdx metadata table has {count} entries, at most 2047 are valid")));
    }
    const KNOWN: [[u8; 16]; 6] =
        [FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE_83_DATA, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR];
    let mut offsets: [Option<u32>; 6] = [None; 6];
    for e in t[32..].chunks_exact(32).take(count as usize) {
        let id: [u8; 16] = bytes(e, 0);
        match KNOWN.iter().position(|k| *k == id) {
            Some(i) if offsets[i].replace(le32(e, 16)).is_some() => {
                return Err(FormatError::corrupt("vhdx metadata table lists an item twice"));
            }
            Some(_) => {}
            None if le32(e, 24) & METADATA_REQUIRED != 0 => {
                return Err(FormatError::unsupported("vhdx image has required metadata this importer does not know"));
            }
            None => {}
        }
    }
    let [Some(params), Some(disk_size), Some(_), Some(logical), Some(physical), parent] = offsets else {
        return Err(FormatError::corrupt(
            "vhdx metadata lacks a required item (file parameters, disk size, page 83 data or sector sizes)",
        ));
    };
    let mut item = |off: u32, len: usize, name: &str| {
        src.read_exact(region.offset.saturating_add(u64::from(off)), len, "vhdx", name)
    };
    let p = item(params, 8, "file parameters")?;
    let (block_size, params_flags) = (le32(&p, 0), le32(&p, 4));
    if params_flags & PARAMS_HAS_PARENT != 0 {
        return Err(FormatError::unsupported(if parent.is_some() {
            "differencing vhdx images refer to a parent file and are not self-contained; merge it first"
        } else {
            "vhdx image says it has a parent but has no parent locator"
        }));
    }
    let disk_size = le64(&item(disk_size, 8, "virtual disk size")?, 0);
    let logical_sector_size = le32(&item(logical, 4, "logical sector size")?, 0);
    let physical_sector_size = le32(&item(physical, 4, "physical sector size")?, 0);
    if !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(FormatError::corrupt(format!(
            "vhdx block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )));
    }
    if logical_sector_size != 512 && logical_sector_size != 4096 {
        return Err(FormatError::corrupt(format!(
            "vhdx logical sector size {logical_sector_size} is neither 512 nor 4096"
        )));
    }
    if physical_sector_size != 512 && physical_sector_size != 4096 {
        return Err(FormatError::corrupt(format!(
            "vhdx physical sector size {physical_sector_size} is neither 512 nor 4096"
        )));
    }
    if logical_sector_size != 512 {
        // qemu-img refuses these ("Operation not supported"), so they cannot be converted.
        return Err(FormatError::unsupported(
            "vhdx images with 4096-byte logical sectors are not supported (qemu-img cannot read \
             them); convert it to a 512-byte-sector vhdx or to raw first, e.g. with Hyper-V's \
             Convert-VHD",
        ));
    }
    if disk_size > MAX_DISK_SIZE {
        return Err(FormatError::corrupt(format!(
            "vhdx virtual disk size {} is larger than the 64 TiB the format allows",
            human(disk_size)
        )));
    }
    Ok(Metadata { disk_size, block_size, logical_sector_size, params_flags })
}

/// Like qemu: the BAT must be large enough, and every fully present payload block must lie
/// within the file.
fn check_bat(src: &mut Src<'_>, bat: Region, md: &Metadata) -> Result<(), FormatError> {
    const CHUNK: u64 = 1 << 20;
    let size = src.size;
    let block_size = u64::from(md.block_size);
    // Payload blocks per sector bitmap block.
    let chunk_ratio = (1u64 << 23) * u64::from(md.logical_sector_size) / block_size;
    let data_blocks = md.disk_size.div_ceil(block_size);
    let entries = if data_blocks == 0 { 0 } else { data_blocks + (data_blocks - 1) / chunk_ratio };
    if entries * 8 > bat.length {
        return Err(FormatError::corrupt(format!(
            "vhdx BAT region of {} bytes is too small for {entries} entries",
            bat.length
        )));
    }
    let bat_bytes = entries * 8;
    if bat_bytes > MAX_BAT_CHECK {
        return Ok(());
    }
    let mut pos = 0u64;
    // Bounded: bat_bytes <= MAX_BAT_CHECK, so at most 64 chunks.
    while pos < bat_bytes {
        let len = (bat_bytes - pos).min(CHUNK) as usize;
        let buf = src.read_exact(bat.offset.saturating_add(pos), len, "vhdx", "BAT")?;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let index = pos / 8 + i as u64;
            // Every (chunk_ratio + 1)-th entry is a sector bitmap block.
            if (index + 1).is_multiple_of(chunk_ratio + 1) {
                continue;
            }
            let e = le64(e, 0);
            if e & 7 != PAYLOAD_BLOCK_FULLY_PRESENT {
                continue;
            }
            let payload = index - index / (chunk_ratio + 1);
            let len = block_size.min(md.disk_size.saturating_sub(payload * block_size));
            let start = e & BAT_OFFSET_MASK;
            let end = start.saturating_add(len);
            if end > size {
                return Err(FormatError::truncated(format!(
                    "vhdx image is truncated: the file is {size} bytes, block {payload} lies at bytes {start} to {end}"
                )));
            }
        }
        pos += len as u64;
    }
    Ok(())
}

/// The crc32c stored at bytes 4..8 matches the block (with those bytes taken as zero).
fn checksum_ok(block: &[u8]) -> bool {
    let stored = le32(block, 4);
    let mut crc = !0u32;
    for (i, &b) in block.iter().enumerate() {
        let b = if (4..8).contains(&i) { 0 } else { b };
        crc = CRC32C[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc == stored
}

/// Castagnoli CRC table (reflected polynomial 0x82F63B78).
static CRC32C: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// For test image builders and the fuzz targets' checksum repair: the crc32c of `data`.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| CRC32C[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8))
}
