//! ISO 9660. The volume descriptor set starts at sector 16 (byte 32768) in 2048-byte sectors:
//! each descriptor has a type byte @0 (1 primary, 255 set terminator), "CD001" @1 and a version
//! @6. The primary volume descriptor holds the volume space size (both-endian u32 @80) and the
//! logical block size (both-endian u16 @128).

use super::{Detected, Format, FormatError, Src, be16, be32, human, le16, le32};

const DESCRIPTORS_AT: u64 = 32768;
const SECTOR: usize = 2048;
const STANDARD_ID: &[u8] = b"CD001";
const TYPE_PRIMARY: u8 = 1;
const TYPE_TERMINATOR: u8 = 255;
/// How many volume descriptors we look through for the primary one.
const MAX_DESCRIPTORS: u64 = 32;

/// An ISO when the first volume descriptor carries "CD001"; `None` otherwise.
pub(crate) fn detect(src: &mut Src<'_>) -> Result<Option<Detected>, FormatError> {
    let first = src.read_upto(DESCRIPTORS_AT, SECTOR)?;
    if first.get(1..6) != Some(STANDARD_ID) {
        return Ok(None);
    }
    for i in 0..MAX_DESCRIPTORS {
        let at = DESCRIPTORS_AT + i * SECTOR as u64;
        let d = src.read_exact(at, SECTOR, "ISO 9660", "volume descriptor")?;
        if &d[1..6] != STANDARD_ID {
            break;
        }
        match d[0] {
            TYPE_PRIMARY => return primary(&d, src.size).map(Some),
            TYPE_TERMINATOR => break,
            _ => {}
        }
    }
    Err(FormatError::corrupt("ISO 9660 image has no primary volume descriptor"))
}

fn primary(d: &[u8], size: u64) -> Result<Detected, FormatError> {
    let (blocks, blocks_be) = (le32(d, 80), be32(d, 84));
    let (block_size, block_size_be) = (le16(d, 128), be16(d, 130));
    if blocks != blocks_be || block_size != block_size_be {
        return Err(FormatError::corrupt(
            "ISO 9660 primary volume descriptor has different little- and big-endian sizes",
        ));
    }
    if !block_size.is_power_of_two() || block_size < 512 {
        return Err(FormatError::corrupt(format!("ISO 9660 logical block size {block_size} is invalid")));
    }
    if blocks == 0 {
        return Err(FormatError::corrupt("ISO 9660 volume space size is zero"));
    }
    let volume = u64::from(blocks) * u64::from(block_size);
    if volume > size {
        return Err(FormatError::truncated(format!(
            "ISO 9660 volume is truncated: the file is {size} bytes, the volume is {}",
            human(volume)
        )));
    }
    Ok(Detected { format: Format::Iso, virtual_size: volume, variant: None })
}
