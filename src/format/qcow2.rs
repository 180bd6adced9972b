//! qcow2 (and the qcow v1 it shares a magic with). All fields are big-endian.
//!
//! Header: magic u32 @0, version u32 @4, backing_file_offset u64 @8, backing_file_size u32 @16,
//! cluster_bits u32 @20, size u64 @24, crypt_method u32 @32, l1_size u32 @36,
//! l1_table_offset u64 @40, refcount_table_offset u64 @48, refcount_table_clusters u32 @56,
//! nb_snapshots u32 @60, snapshots_offset u64 @64 (72 bytes: version 2); version 3 adds
//! incompatible_features u64 @72, compatible_features u64 @80, autoclear_features u64 @88,
//! refcount_order u32 @96, header_length u32 @100 (104 bytes).

use super::{Detected, Format, FormatError, Src, be32, be64, human};

pub(crate) const MAGIC: &[u8] = b"QFI\xfb";

const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// qemu's limits: the active L1 table and the refcount table are at most 32 MiB and 8 MiB.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Bits 9..55 of an L1 entry hold the L2 table offset.
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

pub(crate) fn detect(src: &mut Src<'_>, head: &[u8]) -> Result<Detected, FormatError> {
    let size = src.size;
    let version = if head.len() >= 8 { be32(head, 4) } else { 0 };
    let need = match version {
        1 => {
            return Err(FormatError::unsupported(
                "this is a qcow (version 1) image, which is not supported; convert it with \
                 `qemu-img convert -O qcow2` first",
            ));
        }
        2 => V2_HEADER_LEN,
        3 => V3_HEADER_LEN,
        _ if head.len() < 8 => V2_HEADER_LEN,
        v => {
            return Err(FormatError::unsupported(format!(
                "qcow2 version {v} is not supported (only versions 2 and 3 are)"
            )));
        }
    };
    if head.len() < need {
        return Err(FormatError::truncated(format!(
            "qcow2 header is truncated: the file is {size} bytes, the header needs {need}"
        )));
    }

    let backing_file_offset = be64(head, 8);
    let backing_file_size = be32(head, 16);
    let cluster_bits = be32(head, 20);
    let disk_size = be64(head, 24);
    let crypt_method = be32(head, 32);
    let l1_size = be32(head, 36);
    let l1_table_offset = be64(head, 40);
    let refcount_table_offset = be64(head, 48);
    let refcount_table_clusters = be32(head, 56);
    let (incompatible, refcount_order, header_length) =
        if version == 3 { (be64(head, 72), be32(head, 96), be32(head, 100)) } else { (0, 4, V2_HEADER_LEN as u32) };

    if !(9..=21).contains(&cluster_bits) {
        return Err(FormatError::corrupt(format!("qcow2 cluster_bits is {cluster_bits}, it must be between 9 and 21")));
    }
    let cluster_size = 1u64 << cluster_bits;
    if version == 3 {
        if (header_length as usize) < V3_HEADER_LEN {
            return Err(FormatError::corrupt(format!(
                "qcow2 header_length is {header_length}, a version 3 header needs at least 104"
            )));
        }
        if u64::from(header_length) > cluster_size {
            return Err(FormatError::corrupt(format!(
                "qcow2 header_length {header_length} exceeds the cluster size {cluster_size}"
            )));
        }
        if refcount_order > 6 {
            return Err(FormatError::corrupt(format!("qcow2 refcount_order is {refcount_order}, at most 6 is valid")));
        }
    }

    // Self-containedness and encryption come before anything else: they are the reasons a
    // user needs to hear.
    if backing_file_offset != 0 {
        let name = backing_name(src, backing_file_offset, backing_file_size);
        return Err(FormatError::unsupported(format!(
            "qcow2 images with a backing file are not self-contained (this one refers to {name}); \
             flatten it first with `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`"
        )));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(FormatError::unsupported(
            "qcow2 images with an external data file are not self-contained; flatten it first with \
             `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`",
        ));
    }
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(FormatError::unsupported(format!(
            "qcow2 image uses incompatible features this importer does not know (bits {unknown:#x})"
        )));
    }
    if crypt_method != 0 {
        let how = match crypt_method {
            1 => "AES",
            2 => "LUKS",
            _ => "an unknown method",
        };
        return Err(FormatError::unsupported(format!(
            "encrypted qcow2 images ({how}) are not supported; decrypt it first with \
             `qemu-img convert --object secret,... --image-opts ... -O qcow2`"
        )));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(FormatError::corrupt(
            "the qcow2 image is marked corrupt (incompatible feature bit 1); repair it with \
             `qemu-img check -r all`",
        ));
    }
    if disk_size > i64::MAX as u64 {
        return Err(FormatError::corrupt(format!("qcow2 virtual size {disk_size} is too large")));
    }

    // The L1 table must cover the virtual size (as qemu checks on open).
    let l2_entry_size: u64 = if incompatible & INCOMPAT_EXTL2 != 0 { 16 } else { 8 };
    let bytes_per_l1e = cluster_size * (cluster_size / l2_entry_size);
    let l1_needed = disk_size.div_ceil(bytes_per_l1e);
    let l1_bytes = u64::from(l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(FormatError::corrupt(format!("qcow2 L1 table has {l1_size} entries, more than qemu accepts")));
    }
    if u64::from(l1_size) < l1_needed {
        return Err(FormatError::corrupt(format!(
            "qcow2 L1 table has {l1_size} entries, the virtual size {} needs {l1_needed}",
            human(disk_size)
        )));
    }
    check_table(size, "L1 table", l1_table_offset, l1_bytes, cluster_size)?;
    let reftable_bytes = u64::from(refcount_table_clusters) * cluster_size;
    if reftable_bytes > MAX_REFTABLE_BYTES {
        return Err(FormatError::corrupt(format!(
            "qcow2 refcount table has {refcount_table_clusters} clusters, more than qemu accepts"
        )));
    }
    check_table(size, "refcount table", refcount_table_offset, reftable_bytes, cluster_size)?;
    check_l2_tables(src, l1_table_offset, l1_bytes, cluster_size)?;
    check_last_cluster(src, refcount_table_offset, reftable_bytes, cluster_size, refcount_order)?;

    Ok(Detected {
        format: Format::Qcow2,
        // qemu counts whole 512-byte sectors.
        virtual_size: disk_size / 512 * 512,
        variant: Some(if version == 2 { "qcow2 v2" } else { "qcow2 v3" }),
    })
}

/// A table must be cluster-aligned and lie within the file.
fn check_table(size: u64, what: &str, offset: u64, len: u64, cluster_size: u64) -> Result<(), FormatError> {
    if len == 0 {
        return Ok(());
    }
    if !offset.is_multiple_of(cluster_size) {
        return Err(FormatError::corrupt(format!(
            "qcow2 {what} offset {offset:#x} is not aligned to the cluster size {cluster_size}"
        )));
    }
    match offset.checked_add(len) {
        None => Err(FormatError::corrupt(format!("qcow2 {what} offset {offset:#x} is out of range"))),
        Some(end) if end > size => Err(FormatError::truncated(format!(
            "qcow2 {what} is truncated: the file is {size} bytes, the {what} needs bytes {offset} to {end}"
        ))),
        Some(_) => Ok(()),
    }
}

/// Every L2 table the L1 table points to must lie within the file: an image cut short loses its
/// later clusters, and L2 tables are spread through the file.
fn check_l2_tables(src: &mut Src<'_>, l1_offset: u64, l1_bytes: u64, cluster_size: u64) -> Result<(), FormatError> {
    const CHUNK: u64 = 64 << 10;
    let size = src.size;
    let mut pos = 0u64;
    // Bounded: l1_bytes <= MAX_L1_BYTES, so at most 512 chunks.
    while pos < l1_bytes {
        let len = (l1_bytes - pos).min(CHUNK) as usize;
        let buf = src.read_exact(l1_offset + pos, len, "qcow2", "L1 table")?;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let l2 = be64(e, 0) & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cluster_size) {
                return Err(FormatError::corrupt(format!(
                    "qcow2 L1 entry {} points to an unaligned L2 table at {l2:#x}",
                    pos / 8 + i as u64
                )));
            }
            if l2.saturating_add(cluster_size) > size {
                return Err(FormatError::truncated(format!(
                    "qcow2 image is truncated: the file is {size} bytes, an L2 table lies at bytes {l2} to {}",
                    l2.saturating_add(cluster_size)
                )));
            }
        }
        pos += len as u64;
    }
    Ok(())
}

/// The highest cluster with a non-zero refcount must start within the file: a qcow2 cut short
/// loses its last clusters. (Stale refcounts of a dirty image can only be too low, which makes
/// this check miss, never fail a good image.) Reads the refcount table and one refcount block.
fn check_last_cluster(
    src: &mut Src<'_>,
    reftable_offset: u64,
    reftable_bytes: u64,
    cluster_size: u64,
    refcount_order: u32,
) -> Result<(), FormatError> {
    const CHUNK: u64 = 64 << 10;
    let size = src.size;
    // The last refcount block in use, by its index in the refcount table.
    let mut last: Option<(u64, u64)> = None;
    let mut pos = 0u64;
    // Bounded: reftable_bytes <= MAX_REFTABLE_BYTES, so at most 128 chunks.
    while pos < reftable_bytes {
        let len = (reftable_bytes - pos).min(CHUNK) as usize;
        let buf = src.read_exact(reftable_offset + pos, len, "qcow2", "refcount table")?;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let block = be64(e, 0) & L1E_OFFSET_MASK;
            if block != 0 {
                last = Some((pos / 8 + i as u64, block));
            }
        }
        pos += len as u64;
    }
    let Some((index, block)) = last else { return Ok(()) };
    if !block.is_multiple_of(cluster_size) {
        return Err(FormatError::corrupt(format!("qcow2 refcount block at {block:#x} is not cluster aligned")));
    }
    let len = cluster_size as usize;
    let rb = src.read_exact(block, len, "qcow2", "refcount block")?;
    let Some(b) = rb.iter().rposition(|&x| x != 0) else { return Ok(()) };
    let refcount_bits = 1u64 << refcount_order;
    let entry = if refcount_bits >= 8 {
        b as u64 / (refcount_bits / 8)
    } else {
        // Sub-byte refcounts are packed from the least significant bit.
        let top_bit = 7 - u64::from(rb[b].leading_zeros());
        (b as u64 * 8 + top_bit) / refcount_bits
    };
    let per_block = cluster_size * 8 / refcount_bits;
    let cluster = index.saturating_mul(per_block).saturating_add(entry);
    let start = cluster.saturating_mul(cluster_size);
    if start >= size {
        return Err(FormatError::truncated(format!(
            "qcow2 image is truncated: the file is {size} bytes, but it has a cluster in use at byte {start}"
        )));
    }
    Ok(())
}

/// The backing file name, for messages (best effort).
fn backing_name(src: &mut Src<'_>, offset: u64, len: u32) -> String {
    let len = (len as usize).min(1023);
    match src.read_upto(offset, len) {
        Ok(b) if !b.is_empty() => format!("{:?}", String::from_utf8_lossy(&b)),
        _ => "another file".to_string(),
    }
}
