//! Small valid images built byte by byte, for tests and for examples that must work offline.

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

fn both_endian_u32(b: &mut [u8], off: usize, v: u32) {
    put(b, off, &v.to_le_bytes());
    put(b, off + 4, &v.to_be_bytes());
}

fn both_endian_u16(b: &mut [u8], off: usize, v: u16) {
    put(b, off, &v.to_le_bytes());
    put(b, off + 2, &v.to_be_bytes());
}

/// An ISO 9660 image of `blocks` logical blocks of 2048 bytes: (optionally a boot record,)
/// a primary volume descriptor, a terminator, and a root directory.
pub fn iso(blocks: u32, boot_record_first: bool) -> Vec<u8> {
    const S: usize = 2048;
    let mut b = vec![0u8; blocks as usize * S];
    let mut sector = 16;
    if boot_record_first {
        let d = &mut b[sector * S..(sector + 1) * S];
        d[0] = 0;
        put(d, 1, b"CD001");
        d[6] = 1;
        put(d, 7, b"EL TORITO SPECIFICATION");
        sector += 1;
    }
    let root_sector = sector + 2;
    {
        let d = &mut b[sector * S..(sector + 1) * S];
        d[0] = 1;
        put(d, 1, b"CD001");
        d[6] = 1;
        put(d, 8, &[b' '; 32]);
        put(d, 40, b"IMS_TEST                        ");
        both_endian_u32(d, 80, blocks);
        both_endian_u16(d, 120, 1);
        both_endian_u16(d, 124, 1);
        both_endian_u16(d, 128, S as u16);
        // Root directory record.
        d[156] = 34;
        both_endian_u32(d, 158, root_sector as u32);
        both_endian_u32(d, 166, S as u32);
        d[181] = 2;
        both_endian_u16(d, 184, 1);
        d[188] = 1;
        d[881] = 1;
    }
    {
        let d = &mut b[(sector + 1) * S..(sector + 2) * S];
        d[0] = 255;
        put(d, 1, b"CD001");
        d[6] = 1;
    }
    // Root directory: "." and "..".
    let r = root_sector * S;
    for (i, id) in [0u8, 1].into_iter().enumerate() {
        let e = r + 34 * i;
        b[e] = 34;
        both_endian_u32(&mut b, e + 2, root_sector as u32);
        both_endian_u32(&mut b, e + 10, S as u32);
        b[e + 25] = 2;
        both_endian_u16(&mut b, e + 28, 1);
        b[e + 32] = 1;
        b[e + 33] = id;
    }
    b
}

#[cfg(test)]
mod tests {
    /// `examples/images/rescue.iso` (the offline example set's ISO) is this sample; rewrite it
    /// with `IMS_WRITE_EXAMPLES=1 cargo test --lib the_example_iso`.
    #[test]
    fn the_example_iso_is_this_sample() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/images/rescue.iso");
        if std::env::var_os("IMS_WRITE_EXAMPLES").is_some() {
            std::fs::write(&path, super::iso(64, true)).unwrap();
        }
        assert!(std::fs::read(&path).unwrap() == super::iso(64, true), "{} differs from the sample", path.display());
    }
}
