//! VirtualBox VDI. All fields are little-endian.
//!
//! Header (512 bytes): text [64] @0, signature u32 @64 (0xbeda107f), version u32 @68 (1.1 =
//! 0x00010001), header_size u32 @72, image_type u32 @76 (1 dynamic, 2 static, 3 undo, 4
//! differencing), image_flags @80, description [256] @84, offset_bmap u32 @340, offset_data u32
//! @344, cylinders @348, heads @352, sectors @356, sector_size u32 @360, unused @364,
//! disk_size u64 @368, block_size u32 @376, block_extra @380, blocks_in_image u32 @384,
//! blocks_allocated u32 @388, uuid_image @392, uuid_last_snap @408, uuid_link @424,
//! uuid_parent @440.

use super::{Detected, Format, FormatError, Src, bytes, human, le32, le64};

const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
const HEADER_LEN: usize = 512;
const SECTOR: u32 = 512;
const BLOCK_SIZE: u32 = 1 << 20;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_STATIC: u32 = 2;
/// qemu's limit on the block map: (2^31 - 512) / 4 entries.
const MAX_BLOCKS: u32 = ((1u64 << 31) - 512) as u32 / 4;

pub(crate) fn has_signature(head: &[u8]) -> bool {
    head.len() >= 68 && le32(head, 64) == SIGNATURE
}

pub(crate) fn detect(src: &mut Src<'_>, head: &[u8]) -> Result<Detected, FormatError> {
    let size = src.size;
    if head.len() < HEADER_LEN {
        return Err(FormatError::truncated(format!(
            "vdi header is truncated: the file is {size} bytes, the header needs {HEADER_LEN}"
        )));
    }
    let h = &head[..HEADER_LEN];
    let version = le32(h, 68);
    if version != VERSION_1_1 {
        return Err(FormatError::unsupported(format!(
            "vdi header version {}.{} is not supported (1.1 is)",
            version >> 16,
            version & 0xffff
        )));
    }
    let image_type = le32(h, 76);
    let offset_bmap = le32(h, 340);
    let offset_data = le32(h, 344);
    let sector_size = le32(h, 360);
    let disk_size = le64(h, 368);
    let block_size = le32(h, 376);
    let blocks_in_image = le32(h, 384);
    let blocks_allocated = le32(h, 388);
    let uuid_link: [u8; 16] = bytes(h, 424);
    let uuid_parent: [u8; 16] = bytes(h, 440);

    if uuid_link != [0; 16] || uuid_parent != [0; 16] || image_type == 4 {
        return Err(FormatError::unsupported(
            "differencing vdi images refer to a parent image and are not self-contained; clone \
             it into a standalone image first (`VBoxManage clonemedium`)",
        ));
    }
    let variant = match image_type {
        TYPE_DYNAMIC => "dynamic",
        TYPE_STATIC => "static",
        t => {
            return Err(FormatError::unsupported(format!(
                "vdi image type {t} is not supported (1 dynamic and 2 static are)"
            )));
        }
    };
    if !offset_bmap.is_multiple_of(SECTOR) || !offset_data.is_multiple_of(SECTOR) {
        return Err(FormatError::corrupt(format!(
            "vdi block map offset {offset_bmap} or data offset {offset_data} is not sector aligned"
        )));
    }
    if sector_size != SECTOR {
        return Err(FormatError::unsupported(format!("vdi sector size {sector_size} is not supported (512 is)")));
    }
    if block_size != BLOCK_SIZE {
        return Err(FormatError::unsupported(format!("vdi block size {block_size} is not supported (1 MiB is)")));
    }
    if blocks_in_image > MAX_BLOCKS {
        return Err(FormatError::unsupported(format!(
            "vdi image has {blocks_in_image} blocks, more than qemu supports"
        )));
    }
    // VBoxManage convertfromraw can write sizes that are not whole sectors; qemu rounds up.
    let disk_size = disk_size.div_ceil(512).saturating_mul(512);
    let room = u64::from(blocks_in_image) * u64::from(block_size);
    if disk_size > room {
        return Err(FormatError::corrupt(format!(
            "vdi disk size {} does not fit its {blocks_in_image} blocks",
            human(disk_size)
        )));
    }
    if blocks_allocated > blocks_in_image {
        return Err(FormatError::corrupt(format!(
            "vdi header says {blocks_allocated} blocks are allocated out of {blocks_in_image}"
        )));
    }
    let bmap_end = u64::from(offset_bmap) + u64::from(blocks_in_image) * 4;
    let data_end = u64::from(offset_data) + u64::from(blocks_allocated) * u64::from(block_size);
    let end = bmap_end.max(data_end);
    if end > size {
        return Err(FormatError::truncated(format!(
            "vdi image is truncated: the file is {size} bytes, its block map and {blocks_allocated} \
             allocated blocks need {end}"
        )));
    }
    Ok(Detected { format: Format::Vdi, virtual_size: disk_size, variant: Some(variant) })
}
