//! Tests of the format detector:
//! - images built here byte by byte (no tools needed), cross-checked with qemu-img when it is
//!   installed;
//! - real images made with `qemu-img create` / `qemu-img convert`, compared with
//!   `qemu-img info --output=json`;
//! - broken, truncated and non-self-contained images;
//! - a fuzz test that feeds thousands of mutated, truncated and random headers.
//!
//! Tests that need qemu-img are skipped when it is not installed, unless the environment
//! variable `IMS_REQUIRE_QEMU_IMG` is set, in which case they fail.

use super::*;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

// ----------------------------------------------------------------------------------------------
// Helpers

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ims-format-{tag}-{}-{n}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A small deterministic PRNG (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Whether qemu-img is installed. Without it the tests that need it are skipped, unless
/// `IMS_REQUIRE_QEMU_IMG` is set.
fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        assert!(
            std::env::var_os("IMS_REQUIRE_QEMU_IMG").is_none(),
            "qemu-img is required (IMS_REQUIRE_QEMU_IMG is set) but was not found"
        );
        eprintln!("qemu-img is not installed: skipping this test");
    }
    ok
}

/// Runs qemu-img in `dir`; panics when it fails.
fn qemu_img(dir: &TempDir, args: &[&str]) {
    let out = Command::new("qemu-img").args(args).current_dir(&dir.0).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// (format, virtual-size) from `qemu-img info --output=json [-f FMT]`.
fn qemu_info(path: &Path, fmt: Option<&str>) -> Result<(String, u64), String> {
    let mut c = Command::new("qemu-img");
    c.args(["info", "--output=json"]);
    if let Some(f) = fmt {
        c.args(["-f", f]);
    }
    let out = c.arg(path).output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok((v["format"].as_str().unwrap().to_string(), v["virtual-size"].as_u64().unwrap()))
}

fn detect_path(path: &Path) -> Result<Detected, FormatError> {
    detect_file(&mut File::open(path).unwrap())
}

fn detect_bytes(data: &[u8]) -> Result<Detected, FormatError> {
    let mut r = data;
    detect(&mut r, data.len() as u64)
}

/// A raw file of `size` bytes with non-zero data at the start, in the middle and at the end.
fn data_raw(path: &Path, size: u64) {
    let mut f = File::create(path).unwrap();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ size);
    for at in [0, size / 2 / 512 * 512, size.saturating_sub(4096)] {
        let len = (size - at).min(1 << 20) as usize;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&rng.bytes(len)).unwrap();
    }
    f.set_len(size).unwrap();
}

const MIB: u64 = 1 << 20;
use crate::policy::GIB;
/// 64 MiB + 512: an odd size.
const DATA_SIZE: u64 = 64 * MIB + 512;

/// One image made with qemu-img, and what `detect` must say about it.
struct Case {
    label: &'static str,
    /// The image file, in the temp dir.
    file: &'static str,
    /// The qemu-img arguments that make it, run in the temp dir, where `data.raw` is a raw file
    /// of [`DATA_SIZE`] bytes with data in it.
    make: &'static [&'static str],
    format: Format,
    variant: Option<&'static str>,
}

/// Makes each image and compares `detect` with `qemu-img info`: the format with qemu's own
/// probe (a fixed VHD, which has no header at the start, is probed as raw by qemu), the virtual
/// size with `-f` of the detected format. Prints one table row per case.
fn run_cases(tag: &str, cases: &[Case]) {
    let dir = TempDir::new(tag);
    data_raw(&dir.path("data.raw"), DATA_SIZE);
    for c in cases {
        qemu_img(&dir, c.make);
        let path = dir.path(c.file);
        let d = detect_path(&path).unwrap_or_else(|e| panic!("{}: detect failed: {e}", c.label));
        let (probed, probed_size) = qemu_info(&path, None).unwrap();
        let (_, size) = qemu_info(&path, Some(c.format.as_qemu_str())).unwrap();
        let format_ok = probed == c.format.as_qemu_str();
        let size_ok = d.virtual_size == size;
        eprintln!(
            "ROW | {} | {} {} {:?} | qemu probe {probed} {probed_size} | qemu -f {} {size} | format {} | size {}",
            c.label,
            d.format,
            d.virtual_size,
            d.variant,
            c.format.as_qemu_str(),
            if format_ok { "match" } else { "differs" },
            if size_ok { "match" } else { "differs" },
        );
        assert_eq!(d.format, c.format, "{}", c.label);
        assert_eq!(d.variant, c.variant, "{}", c.label);
        assert!(size_ok, "{}: detected {} bytes, qemu-img says {size}", c.label, d.virtual_size);
        let fixed_vhd = c.format == Format::Vhd && c.variant == Some("fixed");
        assert!(format_ok || (fixed_vhd && probed == "raw"), "{}: qemu-img probes {probed}", c.label);
        fs::remove_file(&path).unwrap();
    }
}

// ----------------------------------------------------------------------------------------------
// Images built byte by byte.

mod build {
    use super::super::vhdx::{crc32c, guid};

    fn put(b: &mut [u8], off: usize, v: &[u8]) {
        b[off..off + v.len()].copy_from_slice(v);
    }

    /// A qcow2 image with no data: header, refcount table, one refcount block, L1 table.
    pub fn qcow2(version: u32, size: u64) -> Vec<u8> {
        const C: usize = 65536;
        let mut b = vec![0u8; 4 * C];
        let l1_size = size.div_ceil(C as u64 * (C as u64 / 8)) as u32;
        put(&mut b, 0, b"QFI\xfb");
        put(&mut b, 4, &version.to_be_bytes());
        put(&mut b, 20, &16u32.to_be_bytes());
        put(&mut b, 24, &size.to_be_bytes());
        put(&mut b, 36, &l1_size.to_be_bytes());
        put(&mut b, 40, &(3 * C as u64).to_be_bytes());
        put(&mut b, 48, &(C as u64).to_be_bytes());
        put(&mut b, 56, &1u32.to_be_bytes());
        if version == 3 {
            put(&mut b, 96, &4u32.to_be_bytes());
            put(&mut b, 100, &104u32.to_be_bytes());
        }
        // Refcount table -> refcount block at cluster 2, which counts clusters 0 to 3.
        put(&mut b, C, &(2 * C as u64).to_be_bytes());
        for i in 0..4 {
            put(&mut b, 2 * C + 2 * i, &1u16.to_be_bytes());
        }
        b
    }

    /// A hosted sparse vmdk with no data. With `footer`, a streamOptimized image whose header
    /// defers to a footer (grain directory "at the end"), as VMware writes them.
    pub fn vmdk(capacity: u64, stream: bool, footer: bool) -> Vec<u8> {
        let l1 = capacity.div_ceil(512 * 128) as usize;
        let gd_sectors = (l1 * 4).div_ceil(512).max(1);
        let grain_offset = 128u64.max(21 + gd_sectors as u64).next_multiple_of(128);
        let mut b = vec![0u8; grain_offset as usize * 512];
        let header = |gd: u64| {
            let mut h = vec![0u8; 512];
            put(&mut h, 0, b"KDMV");
            put(&mut h, 4, &(if stream { 3u32 } else { 1 }).to_le_bytes());
            let flags: u32 = if stream { 1 | 1 << 16 | 1 << 17 } else { 1 };
            put(&mut h, 8, &flags.to_le_bytes());
            put(&mut h, 12, &capacity.to_le_bytes());
            put(&mut h, 20, &128u64.to_le_bytes());
            put(&mut h, 28, &1u64.to_le_bytes());
            put(&mut h, 36, &20u64.to_le_bytes());
            put(&mut h, 44, &512u32.to_le_bytes());
            put(&mut h, 56, &gd.to_le_bytes());
            put(&mut h, 64, &grain_offset.to_le_bytes());
            put(&mut h, 73, b"\n \r\n");
            if stream {
                put(&mut h, 77, &1u16.to_le_bytes());
            }
            h
        };
        put(&mut b, 0, &header(if footer { u64::MAX } else { 21 }));
        let create_type = if stream { "streamOptimized" } else { "monolithicSparse" };
        let desc = format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n\
             # Extent description\nRW {capacity} SPARSE \"test.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n"
        );
        put(&mut b, 512, desc.as_bytes());
        if footer {
            let mut marker = vec![0u8; 512];
            put(&mut marker, 12, &3u32.to_le_bytes());
            b.extend_from_slice(&marker);
            b.extend_from_slice(&header(21));
            b.extend_from_slice(&[0u8; 512]);
        }
        b
    }

    /// The VHD spec's CHS geometry for a number of sectors.
    pub fn chs(sectors: u64) -> (u16, u8, u8) {
        let ts = sectors.min(65535 * 16 * 255);
        let (spt, heads, cth);
        if ts >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = ts / spt;
        } else {
            let mut s = 17;
            let mut c = ts / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = ts / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = ts / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        ((cth / heads) as u16, heads as u8, spt as u8)
    }

    fn vhd_footer(size: u64, geometry: (u16, u8, u8), creator: &[u8; 4], disk_type: u32, data_offset: u64) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        put(&mut f, 0, b"conectix");
        put(&mut f, 8, &2u32.to_be_bytes());
        put(&mut f, 12, &0x0001_0000u32.to_be_bytes());
        put(&mut f, 16, &data_offset.to_be_bytes());
        put(&mut f, 28, creator);
        put(&mut f, 32, &0x0005_0003u32.to_be_bytes());
        put(&mut f, 36, b"Wi2k");
        put(&mut f, 40, &size.to_be_bytes());
        put(&mut f, 48, &size.to_be_bytes());
        put(&mut f, 56, &geometry.0.to_be_bytes());
        f[58] = geometry.1;
        f[59] = geometry.2;
        put(&mut f, 60, &disk_type.to_be_bytes());
        put(&mut f, 68, &[0x42; 16]);
        let sum = f.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
        put(&mut f, 64, &(!sum).to_be_bytes());
        f
    }

    /// A fixed VHD: `size` bytes of disk (zeros) and a footer.
    pub fn vhd_fixed(size: u64, creator: &[u8; 4]) -> Vec<u8> {
        let mut b = vec![0u8; size as usize];
        b.extend(vhd_footer(size, chs(size / 512), creator, 2, u64::MAX));
        b
    }

    /// A dynamic VHD with no data blocks.
    pub fn vhd_dynamic(size: u64, creator: &[u8; 4]) -> Vec<u8> {
        let block = 2u64 << 20;
        let entries = size.div_ceil(block);
        let footer = vhd_footer(size, chs(size / 512), creator, 3, 512);
        let mut b = footer.clone();
        let mut h = vec![0u8; 1024];
        put(&mut h, 0, b"cxsparse");
        put(&mut h, 8, &u64::MAX.to_be_bytes());
        put(&mut h, 16, &1536u64.to_be_bytes());
        put(&mut h, 24, &0x0001_0000u32.to_be_bytes());
        put(&mut h, 28, &(entries as u32).to_be_bytes());
        put(&mut h, 32, &(block as u32).to_be_bytes());
        let sum = h.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
        put(&mut h, 36, &(!sum).to_be_bytes());
        b.extend(h);
        b.resize(1536 + (entries as usize * 4).next_multiple_of(512), 0xff);
        b.extend(footer);
        b
    }

    /// A VDI. A static one has all its blocks (of zeros) in the file.
    pub fn vdi(disk_size: u64, static_: bool) -> Vec<u8> {
        let blocks = disk_size.div_ceil(1 << 20) as u32;
        let offset_data = 512 + (blocks as usize * 4).next_multiple_of(512);
        let mut h = vec![0u8; 512];
        put(&mut h, 0, b"<<< Oracle VM VirtualBox Disk Image >>>\n");
        put(&mut h, 64, &0xbeda_107fu32.to_le_bytes());
        put(&mut h, 68, &0x0001_0001u32.to_le_bytes());
        put(&mut h, 72, &0x190u32.to_le_bytes());
        put(&mut h, 76, &(if static_ { 2u32 } else { 1 }).to_le_bytes());
        put(&mut h, 340, &512u32.to_le_bytes());
        put(&mut h, 344, &(offset_data as u32).to_le_bytes());
        put(&mut h, 360, &512u32.to_le_bytes());
        put(&mut h, 368, &disk_size.to_le_bytes());
        put(&mut h, 376, &(1u32 << 20).to_le_bytes());
        put(&mut h, 384, &blocks.to_le_bytes());
        put(&mut h, 388, &(if static_ { blocks } else { 0 }).to_le_bytes());
        put(&mut h, 392, &[0x17; 16]);
        let mut b = h;
        for i in 0..blocks {
            b.extend(if static_ { i.to_le_bytes() } else { [0xff; 4] });
        }
        b.resize(offset_data, 0);
        if static_ {
            b.resize(offset_data + blocks as usize * (1 << 20), 0);
        }
        b
    }

    /// A dynamic VHDX with no data: log at 1 MiB, BAT at 2 MiB, metadata at 3 MiB.
    pub fn vhdx(disk_size: u64, logical_sector: u32) -> Vec<u8> {
        const MIB: usize = 1 << 20;
        let mut b = vec![0u8; 4 * MIB];
        put(&mut b, 0, b"vhdxfile");
        for (i, c) in "ims-test".encode_utf16().enumerate() {
            put(&mut b, 8 + 2 * i, &c.to_le_bytes());
        }
        for (n, at) in [(1u64, 64 * 1024), (2, 128 * 1024)] {
            let mut h = vec![0u8; 4096];
            put(&mut h, 0, b"head");
            put(&mut h, 8, &n.to_le_bytes());
            put(&mut h, 16, &[0x11; 16]);
            put(&mut h, 32, &[0x22; 16]);
            put(&mut h, 66, &1u16.to_le_bytes());
            put(&mut h, 68, &(MIB as u32).to_le_bytes());
            put(&mut h, 72, &(MIB as u64).to_le_bytes());
            let crc = crc32c(&h);
            put(&mut h, 4, &crc.to_le_bytes());
            put(&mut b, at, &h);
        }
        let bat = guid(0x2DC2_7766, 0xF623, 0x4200, [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
        let meta = guid(0x8B7C_A206, 0x4790, 0x4B9A, [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E]);
        let mut rt = vec![0u8; 65536];
        put(&mut rt, 0, b"regi");
        put(&mut rt, 8, &2u32.to_le_bytes());
        for (i, (g, off)) in [(bat, 2 * MIB), (meta, 3 * MIB)].into_iter().enumerate() {
            let e = 16 + 32 * i;
            put(&mut rt, e, &g);
            put(&mut rt, e + 16, &(off as u64).to_le_bytes());
            put(&mut rt, e + 24, &(MIB as u32).to_le_bytes());
            put(&mut rt, e + 28, &1u32.to_le_bytes());
        }
        let crc = crc32c(&rt);
        put(&mut rt, 4, &crc.to_le_bytes());
        put(&mut b, 192 * 1024, &rt);
        put(&mut b, 256 * 1024, &rt);
        let m = 3 * MIB;
        put(&mut b, m, b"metadata");
        let items: [([u8; 16], u32, u32); 5] = [
            (guid(0xCAA1_6737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B]), 8, 4),
            (guid(0x2FA5_4224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8]), 8, 6),
            (guid(0xBECA_12AB, 0xB2E6, 0x4523, [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46]), 16, 6),
            (guid(0x8141_BF1D, 0xA96F, 0x4709, [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F]), 4, 6),
            (guid(0xCDA3_48C7, 0x445D, 0x4471, [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56]), 4, 6),
        ];
        put(&mut b, m + 10, &(items.len() as u16).to_le_bytes());
        let mut data_off = 65536u32;
        for (i, (g, len, flags)) in items.iter().enumerate() {
            let e = m + 32 + 32 * i;
            put(&mut b, e, g);
            put(&mut b, e + 16, &data_off.to_le_bytes());
            put(&mut b, e + 20, &len.to_le_bytes());
            put(&mut b, e + 24, &flags.to_le_bytes());
            data_off += len;
        }
        let d = m + 65536;
        put(&mut b, d, &(32u32 << 20).to_le_bytes());
        put(&mut b, d + 8, &disk_size.to_le_bytes());
        put(&mut b, d + 16, &[0x33; 16]);
        put(&mut b, d + 32, &logical_sector.to_le_bytes());
        put(&mut b, d + 36, &512u32.to_le_bytes());
        b
    }

    /// [`vhdx`] with a log GUID in its headers and, with `entry`, one valid log entry.
    pub fn vhdx_with_log(entry: bool) -> Vec<u8> {
        let mut b = vhdx(1 << 30, 512);
        let log_guid = [0x44u8; 16];
        for at in [64 * 1024, 128 * 1024] {
            let h = &mut b[at..at + 4096];
            put(h, 48, &log_guid);
            h[4..8].fill(0);
            let crc = crc32c(h);
            put(h, 4, &crc.to_le_bytes());
        }
        if entry {
            let size = b.len() as u64;
            let e = &mut b[1 << 20..(1 << 20) + 4096];
            put(e, 0, b"loge");
            put(e, 8, &4096u32.to_le_bytes());
            put(e, 16, &1u64.to_le_bytes());
            put(e, 32, &log_guid);
            put(e, 48, &size.to_le_bytes());
            put(e, 56, &size.to_le_bytes());
            let crc = crc32c(e);
            put(e, 4, &crc.to_le_bytes());
        }
        b
    }

    /// An ISO 9660 image (see [`crate::format::sample::iso`]).
    pub fn iso(blocks: u32, boot_record_first: bool) -> Vec<u8> {
        crate::format::sample::iso(blocks, boot_record_first)
    }
}

// ----------------------------------------------------------------------------------------------
// Unit tests without tools.

#[test]
fn format_names() {
    let api: Vec<_> = Format::ALL.iter().map(|f| f.as_api_str()).collect();
    assert_eq!(api, ["Raw", "Qcow2", "Vmdk", "Vhd", "Vhdx", "Vdi", "Iso"]);
    let qemu: Vec<_> = Format::ALL.iter().map(|f| f.as_qemu_str()).collect();
    assert_eq!(qemu, ["raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "raw"]);
    let lower: Vec<_> = Format::ALL.iter().map(|f| f.lowercase()).collect();
    assert_eq!(lower, ["raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi", "iso"]);
    assert_eq!(Format::Vhd.to_string(), "Vhd");
}

#[test]
fn read_at_on_slices_vecs_and_files() {
    let data: Vec<u8> = (0..=255).collect();
    let mut s: &[u8] = &data;
    assert_eq!(s.read_at(250, 10).unwrap(), vec![250, 251, 252, 253, 254, 255]);
    assert!(s.read_at(256, 10).unwrap().is_empty());
    assert!(s.read_at(u64::MAX, 10).unwrap().is_empty());
    let mut v = data.clone();
    assert_eq!(v.read_at(1, 2).unwrap(), vec![1, 2]);
    let dir = TempDir::new("readat");
    fs::write(dir.path("f"), &data).unwrap();
    let mut f = File::open(dir.path("f")).unwrap();
    assert_eq!(f.read_at(254, 10).unwrap(), vec![254, 255]);
    assert_eq!(f.read_at(0, 3).unwrap(), vec![0, 1, 2]);
    assert!(f.read_at(1000, 3).unwrap().is_empty());
}

#[test]
fn empty_and_tiny_images() {
    let e = detect_bytes(&[]).unwrap_err();
    assert!(matches!(e, FormatError::Truncated { .. }));
    assert!(e.to_string().contains("the image is empty"), "{e}");
    for data in [&b"x"[..], b"QFI", b"conectix", &[0u8; 511]] {
        if data.starts_with(b"conectix") {
            assert!(matches!(detect_bytes(data), Err(FormatError::Truncated { .. })));
            continue;
        }
        let d = detect_bytes(data).unwrap();
        assert_eq!((d.format, d.virtual_size), (Format::Raw, data.len() as u64));
    }
}

#[test]
fn raw_is_everything_else() {
    let mut rng = XorShift(7);
    let data = rng.bytes(3 * 65536 + 17);
    let d = detect_bytes(&data).unwrap();
    assert_eq!(d, Detected { format: Format::Raw, virtual_size: data.len() as u64, variant: None });
    // A size larger than what can be read is an error, not a smaller raw image.
    let mut r: &[u8] = &data[..100];
    assert!(matches!(detect(&mut r, 5000), Err(FormatError::Truncated { .. })));
}

#[test]
fn synthetic_qcow2() {
    for (version, variant) in [(2, "qcow2 v2"), (3, "qcow2 v3")] {
        let img = build::qcow2(version, 10 * GIB + 1000);
        let d = detect_bytes(&img).unwrap();
        assert_eq!(d, Detected { format: Format::Qcow2, virtual_size: 10 * GIB + 512, variant: Some(variant) });
    }
    // Version 1 (qcow), backing file, encryption, external data file, unknown features, corrupt bit.
    let mut img = build::qcow2(3, GIB);
    img[7] = 1;
    assert!(matches!(detect_bytes(&img), Err(FormatError::Unsupported { .. })));
    let mut img = build::qcow2(3, GIB);
    img[8..16].copy_from_slice(&200u64.to_be_bytes());
    img[16..20].copy_from_slice(&9u32.to_be_bytes());
    img[200..209].copy_from_slice(b"base.img\0");
    let e = detect_bytes(&img).unwrap_err();
    assert!(e.to_string().contains("not self-contained") && e.to_string().contains("base.img"), "{e}");
    for (at, val, kind) in
        [(35, 2u8, "Unsupported"), (79, 4, "Unsupported"), (72, 0x80, "Unsupported"), (79, 2, "Corrupt")]
    {
        let mut img = build::qcow2(3, GIB);
        img[at] = val;
        let e = detect_bytes(&img).unwrap_err();
        assert!(format!("{e:?}").starts_with(kind), "byte {at}={val}: {e:?}");
    }
    // Cut after 40 bytes: truncated, never raw.
    let img = build::qcow2(3, GIB);
    let e = detect_bytes(&img[..40]).unwrap_err();
    assert_eq!(
        e.to_string().split(';').next().unwrap(),
        "qcow2 header is truncated: the file is 40 bytes, the header needs 104"
    );
    let e = detect_bytes(&build::qcow2(2, GIB)[..40]).unwrap_err();
    assert!(e.to_string().starts_with("qcow2 header is truncated: the file is 40 bytes, the header needs 72"), "{e}");
    // Cut before the L1 table; and an L1 table too small for the size.
    assert!(matches!(detect_bytes(&img[..3 * 65536 + 4]), Err(FormatError::Truncated { .. })));
    let mut img = build::qcow2(3, GIB);
    img[24..32].copy_from_slice(&(4096 * GIB).to_be_bytes());
    assert!(matches!(detect_bytes(&img), Err(FormatError::Corrupt { .. })));
}

#[test]
fn synthetic_vmdk() {
    for (stream, footer, variant) in
        [(false, false, "monolithicSparse"), (true, false, "streamOptimized"), (true, true, "streamOptimized")]
    {
        let img = build::vmdk(2 * 1024 * 1024 + 1, stream, footer);
        let d = detect_bytes(&img).unwrap();
        assert_eq!(d, Detected { format: Format::Vmdk, virtual_size: (GIB + 512), variant: Some(variant) });
    }
    // The footer of a GD_AT_END image is what counts: change the capacity there only.
    let mut img = build::vmdk(2048, true, true);
    let n = img.len();
    img[n - 1024 + 12..n - 1024 + 20].copy_from_slice(&4096u64.to_le_bytes());
    assert_eq!(detect_bytes(&img).unwrap().virtual_size, 4096 * 512);
    // Without its footer it is truncated.
    let e = detect_bytes(&img[..n - 1536]).unwrap_err();
    assert!(matches!(e, FormatError::Truncated { .. }), "{e}");
    // A grain table or a grain past the end: cut short (the directory is at sector 21, the
    // first grain table put at sector 22).
    let mut img = build::vmdk(2048, false, false);
    img[21 * 512..21 * 512 + 4].copy_from_slice(&5000u32.to_le_bytes());
    let e = detect_bytes(&img).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("vmdk image is truncated: the file is 65536 bytes, a grain table lies at bytes 2560000"),
        "{e}"
    );
    img[21 * 512..21 * 512 + 4].copy_from_slice(&22u32.to_le_bytes());
    assert!(detect_bytes(&img).is_ok(), "an empty grain table");
    img[22 * 512 + 8..22 * 512 + 12].copy_from_slice(&1000u32.to_le_bytes());
    let e = detect_bytes(&img).unwrap_err();
    assert!(
        e.to_string().starts_with("vmdk image is truncated: the file is 65536 bytes, a grain lies at bytes 512000"),
        "{e}"
    );
    img[22 * 512 + 8..22 * 512 + 12].copy_from_slice(&1u32.to_le_bytes());
    assert!(detect_bytes(&img).is_ok(), "a zeroed grain is no location");
    // A parent makes it not self-contained.
    let mut img = build::vmdk(2048, false, false);
    let hint = b"parentFileNameHint=\"base.vmdk\"\n";
    let end = 512 + img[512..].iter().position(|&b| b == 0).unwrap();
    img[end..end + hint.len()].copy_from_slice(hint);
    let e = detect_bytes(&img).unwrap_err();
    assert!(matches!(e, FormatError::Unsupported { .. }) && e.to_string().contains("base.vmdk"), "{e}");
    // Text descriptors (multi-file vmdk).
    for text in [
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"a-flat.vmdk\" 0\n",
        "\n# comment\n  \nversion=1\r\nCID=fffffffe\r\ncreateType=\"twoGbMaxExtentSparse\"\r\n",
    ] {
        let e = detect_bytes(text.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("multi-file vmdk"), "{e}");
    }
    // Broken headers.
    let e = detect_bytes(&build::vmdk(2048, false, false)[..60]).unwrap_err();
    assert!(e.to_string().starts_with("vmdk header is truncated"), "{e}");
    let mut img = build::vmdk(2048, false, false);
    img[44..48].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(detect_bytes(&img), Err(FormatError::Corrupt { .. })));
    assert!(matches!(detect_bytes(b"COWD\x01\0\0\0"), Err(FormatError::Unsupported { .. })));
}

#[test]
fn synthetic_vhd() {
    // 100 MiB is not a whole CHS geometry: Virtual PC (and qemu) count the CHS sectors,
    // Hyper-V ("win ") counts current_size.
    let size = 100 * MIB;
    let (c, h, s) = build::chs(size / 512);
    let chs = u64::from(c) * u64::from(h) * u64::from(s) * 512;
    assert!(chs < size);
    for (creator, expect) in [(b"vpc ", chs), (b"qemu", chs), (b"win ", size), (b"qem2", size), (b"d2v ", size)] {
        for (img, variant) in
            [(build::vhd_fixed(size, creator), "fixed"), (build::vhd_dynamic(size, creator), "dynamic")]
        {
            let d = detect_bytes(&img).unwrap();
            assert_eq!(d, Detected { format: Format::Vhd, virtual_size: expect, variant: Some(variant) });
        }
    }
    // Checksum, differencing, truncation.
    let mut img = build::vhd_dynamic(size, b"win ");
    img[50] ^= 1;
    assert!(matches!(detect_bytes(&img), Err(FormatError::Corrupt { .. })));
    let mut img = build::vhd_dynamic(size, b"win ");
    img[63] = 4;
    let sum = super::vpc::footer_checksum(&img[..512]);
    img[64..68].copy_from_slice(&sum.to_be_bytes());
    assert!(matches!(detect_bytes(&img), Err(FormatError::Unsupported { .. })));
    let img = build::vhd_dynamic(size, b"win ");
    assert!(matches!(detect_bytes(&img[..1000]), Err(FormatError::Truncated { .. })));
    // A dynamic VHD with a block allocated past the end of the file.
    let mut img = build::vhd_dynamic(size, b"win ");
    img[1536..1540].copy_from_slice(&100_000u32.to_be_bytes());
    let e = detect_bytes(&img).unwrap_err();
    assert!(e.to_string().starts_with("vhd image is truncated"), "{e}");
}

#[test]
fn synthetic_vdi() {
    for (static_, variant) in [(false, "dynamic"), (true, "static")] {
        let d = detect_bytes(&build::vdi(3 * MIB + 1000, static_)).unwrap();
        assert_eq!(d, Detected { format: Format::Vdi, virtual_size: 3 * MIB + 1024, variant: Some(variant) });
    }
    let img = build::vdi(3 * MIB, true);
    assert!(matches!(detect_bytes(&img[..img.len() - 1]), Err(FormatError::Truncated { .. })));
    assert!(matches!(detect_bytes(&img[..300]), Err(FormatError::Truncated { .. })));
    let mut img = build::vdi(3 * MIB, false);
    img[440] = 1;
    assert!(matches!(detect_bytes(&img), Err(FormatError::Unsupported { .. })));
    let mut img = build::vdi(3 * MIB, false);
    img[376..380].copy_from_slice(&4096u32.to_le_bytes());
    assert!(matches!(detect_bytes(&img), Err(FormatError::Unsupported { .. })));
}

#[test]
fn synthetic_vhdx() {
    let d = detect_bytes(&build::vhdx(10 * GIB, 512)).unwrap();
    assert_eq!(d, Detected { format: Format::Vhdx, virtual_size: 10 * GIB, variant: Some("dynamic") });
    assert!(matches!(detect_bytes(&build::vhdx(GIB, 4096)), Err(FormatError::Unsupported { .. })));
    // Cut in the region table: truncated, never raw.
    let img = build::vhdx(GIB, 512);
    let e = detect_bytes(&img[..200_000]).unwrap_err();
    assert!(e.to_string().starts_with("vhdx region table is truncated"), "{e}");
    // One damaged header or region table is fine; both is corrupt.
    let mut img = build::vhdx(GIB, 512);
    img[128 * 1024 + 100] ^= 1;
    img[192 * 1024 + 100] ^= 1;
    assert_eq!(detect_bytes(&img).unwrap().virtual_size, GIB);
    img[64 * 1024 + 100] ^= 1;
    assert!(matches!(detect_bytes(&img), Err(FormatError::Corrupt { .. })));
    let mut img = build::vhdx(GIB, 512);
    img[192 * 1024 + 100] ^= 1;
    img[256 * 1024 + 100] ^= 1;
    assert!(matches!(detect_bytes(&img), Err(FormatError::Corrupt { .. })));
    // A parent (has_parent in the file parameters).
    let mut img = build::vhdx(GIB, 512);
    img[3 * (1 << 20) + 65536 + 4] = 2;
    assert!(matches!(detect_bytes(&img), Err(FormatError::Unsupported { .. })));
    // A log GUID alone is fine; a valid log entry needs a replay.
    assert_eq!(detect_bytes(&build::vhdx_with_log(false)).unwrap().virtual_size, GIB);
    let e = detect_bytes(&build::vhdx_with_log(true)).unwrap_err();
    assert!(e.to_string().contains("log has not been replayed"), "{e}");
    // A fully present block past the end of the file.
    let mut img = build::vhdx(GIB, 512);
    img[2 << 20..(2 << 20) + 8].copy_from_slice(&((64u64 << 20) | 6).to_le_bytes());
    let e = detect_bytes(&img).unwrap_err();
    assert!(e.to_string().starts_with("vhdx image is truncated"), "{e}");
}

/// A log full of entry headers whose checksums fail: every sector claimed a 2 MiB entry to
/// check, so a 64 MiB log was 16384 reads of 2 MiB (32 GiB hashed; here 4 MiB, 2 GiB).
/// Detection stays within the work fuzz::check_bytes allows and calls the log damaged.
#[test]
fn vhdx_log_of_damaged_entries_is_bounded() {
    const MIB: usize = 1 << 20;
    let mut img = build::vhdx_with_log(false);
    let log_guid = [0x44u8; 16];
    let (log_at, log_len) = (4 * MIB, 4 * MIB);
    for at in [64 * 1024, 128 * 1024] {
        let h = &mut img[at..at + 4096];
        h[68..72].copy_from_slice(&(log_len as u32).to_le_bytes());
        h[72..80].copy_from_slice(&(log_at as u64).to_le_bytes());
        h[4..8].fill(0);
        let crc = super::vhdx::crc32c(h);
        h[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    img.resize(log_at + log_len, 0);
    for s in img[log_at..].chunks_mut(4096) {
        s[..4].copy_from_slice(b"loge");
        s[8..12].copy_from_slice(&(2 * MIB as u32).to_le_bytes());
        s[16..24].copy_from_slice(&1u64.to_le_bytes());
        s[32..48].copy_from_slice(&log_guid);
    }
    let r = std::panic::catch_unwind(|| super::fuzz::check_bytes(&img, img.len() as u64));
    let e = r.expect("detection within bounds").unwrap_err();
    assert!(matches!(e, FormatError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("vhdx log"), "{e}");
}

#[test]
fn synthetic_iso() {
    for boot in [false, true] {
        let img = build::iso(40, boot);
        let d = detect_bytes(&img).unwrap();
        assert_eq!(d, Detected { format: Format::Iso, virtual_size: 40 * 2048, variant: None });
    }
    // Padding after the volume is fine; a volume larger than the file is truncated.
    let mut img = build::iso(40, false);
    img.resize(img.len() + 4096, 0);
    assert_eq!(detect_bytes(&img).unwrap().virtual_size, 40 * 2048);
    let img = build::iso(40, false);
    assert!(matches!(detect_bytes(&img[..39 * 2048]), Err(FormatError::Truncated { .. })));
    // Inconsistent both-endian fields.
    let mut img = build::iso(40, false);
    img[32768 + 84] = 9;
    assert!(matches!(detect_bytes(&img), Err(FormatError::Corrupt { .. })));
    // A fixed VHD around an ISO is a VHD.
    let mut img = build::iso(64, false);
    let footer = build::vhd_fixed(0, b"win ");
    let mut f = footer[footer.len() - 512..].to_vec();
    f[48..56].copy_from_slice(&(64u64 * 2048).to_be_bytes());
    let sum = super::vpc::footer_checksum(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    img.extend(f);
    assert_eq!(detect_bytes(&img).unwrap().format, Format::Vhd);
}

#[test]
fn other_formats_are_unsupported() {
    for magic in [&b"QEF\0"[..], b"LUKS\xba\xbe\0\x01", b"WithoutFreeSpace", b"Bochs Virtual HD Image\0"] {
        let mut img = magic.to_vec();
        img.resize(4096, 0);
        assert!(matches!(detect_bytes(&img), Err(FormatError::Unsupported { .. })), "{magic:?}");
    }
}

#[test]
fn error_messages_are_sentences() {
    let e = FormatError::truncated("qcow2 header is truncated: the file is 40 bytes, the header needs 72");
    assert!(e.to_string().starts_with("qcow2 header is truncated: the file is 40 bytes, the header needs 72; "));
    let e = FormatError::Io(io::Error::other("boom"));
    assert_eq!(e.to_string(), "could not read the image: boom");
    assert!(std::error::Error::source(&e).is_some());
}

// ----------------------------------------------------------------------------------------------
// The byte-built images, as qemu-img sees them.

#[test]
fn synthetic_images_agree_with_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("synthetic");
    let size = 100 * MIB;
    let images: Vec<(&str, Vec<u8>, &str)> = vec![
        ("qcow2 v2", build::qcow2(2, 10 * GIB + 1000), "qcow2"),
        ("qcow2 v3", build::qcow2(3, 10 * GIB + 1000), "qcow2"),
        ("vmdk monolithicSparse", build::vmdk(2 * 1024 * 1024 + 1, false, false), "vmdk"),
        ("vmdk streamOptimized", build::vmdk(2 * 1024 * 1024 + 1, true, false), "vmdk"),
        ("vmdk streamOptimized, footer", build::vmdk(2 * 1024 * 1024 + 1, true, true), "vmdk"),
        ("vhd fixed vpc", build::vhd_fixed(size, b"vpc "), "vpc"),
        ("vhd fixed win", build::vhd_fixed(size, b"win "), "vpc"),
        ("vhd dynamic vpc", build::vhd_dynamic(size, b"vpc "), "vpc"),
        ("vhd dynamic win", build::vhd_dynamic(size, b"win "), "vpc"),
        ("vhd dynamic d2v", build::vhd_dynamic(size, b"d2v "), "vpc"),
        ("vdi dynamic", build::vdi(3 * MIB + 1000, false), "vdi"),
        ("vdi static", build::vdi(3 * MIB, true), "vdi"),
        ("vhdx dynamic", build::vhdx(10 * GIB, 512), "vhdx"),
        ("vhdx with a log GUID, empty log", build::vhdx_with_log(false), "vhdx"),
        ("iso", build::iso(40, true), "raw"),
    ];
    for (label, img, fmt) in images {
        let path = dir.path("img");
        fs::write(&path, &img).unwrap();
        let d = detect_path(&path).unwrap();
        let (_, size) = qemu_info(&path, Some(fmt)).unwrap_or_else(|e| panic!("{label}: {e}"));
        eprintln!("ROW | built: {label} | {} {} {:?} | qemu -f {fmt} {size}", d.format, d.virtual_size, d.variant);
        if d.format == Format::Iso {
            assert_eq!(d.virtual_size, size, "{label}: the volume is the whole file");
        } else {
            assert_eq!(d.virtual_size, size, "{label}");
        }
    }
    // qemu-img also refuses a 4096-byte-sector vhdx, which we call unsupported.
    let path = dir.path("4k.vhdx");
    fs::write(&path, build::vhdx(GIB, 4096)).unwrap();
    assert!(qemu_info(&path, Some("vhdx")).is_err());
    // qemu-img also refuses a vhdx whose log needs a replay (read-only open).
    let path = dir.path("log.vhdx");
    fs::write(&path, build::vhdx_with_log(true)).unwrap();
    let e = qemu_info(&path, Some("vhdx")).unwrap_err();
    assert!(e.contains("replay"), "{e}");
    // blkid agrees that the built ISO is ISO 9660, where blkid is installed.
    let path = dir.path("img.iso");
    fs::write(&path, build::iso(40, true)).unwrap();
    if let Ok(out) = Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE"]).arg(&path).output() {
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "iso9660");
    }
}

// ----------------------------------------------------------------------------------------------
// Real images made by qemu-img, compared with qemu-img info.

#[test]
fn qemu_raw() {
    if !have_qemu_img() {
        return;
    }
    run_cases(
        "raw",
        &[
            Case {
                label: "raw, convert, 64M+512",
                file: "a.raw",
                make: &["convert", "-O", "raw", "data.raw", "a.raw"],
                format: Format::Raw,
                variant: None,
            },
            Case {
                label: "raw, create, 10G sparse",
                file: "b.raw",
                make: &["create", "-f", "raw", "b.raw", "10G"],
                format: Format::Raw,
                variant: None,
            },
            Case {
                label: "raw, create, 100M",
                file: "c.raw",
                make: &["create", "-f", "raw", "c.raw", "100M"],
                format: Format::Raw,
                variant: None,
            },
        ],
    );
}

#[test]
fn qemu_qcow2() {
    if !have_qemu_img() {
        return;
    }
    const V3: Option<&str> = Some("qcow2 v3");
    const V2: Option<&str> = Some("qcow2 v2");
    let c = |label, file, make, variant| Case { label, file, make, format: Format::Qcow2, variant };
    run_cases(
        "qcow2",
        &[
            c("qcow2, convert, 64M+512", "a.qcow2", &["convert", "-O", "qcow2", "data.raw", "a.qcow2"], V3),
            c(
                "qcow2 compat=0.10, convert, 64M+512",
                "b.qcow2",
                &["convert", "-O", "qcow2", "-o", "compat=0.10", "data.raw", "b.qcow2"],
                V2,
            ),
            c(
                "qcow2 compressed (-c), convert, 64M+512",
                "c.qcow2",
                &["convert", "-c", "-O", "qcow2", "data.raw", "c.qcow2"],
                V3,
            ),
            c(
                "qcow2 compression_type=zstd -c, convert, 64M+512",
                "d.qcow2",
                &["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "data.raw", "d.qcow2"],
                V3,
            ),
            c(
                "qcow2 cluster_size=4k, convert, 64M+512",
                "e.qcow2",
                &["convert", "-O", "qcow2", "-o", "cluster_size=4k", "data.raw", "e.qcow2"],
                V3,
            ),
            c(
                "qcow2 refcount_bits=1, convert, 64M+512",
                "f.qcow2",
                &["convert", "-O", "qcow2", "-o", "refcount_bits=1", "data.raw", "f.qcow2"],
                V3,
            ),
            c(
                "qcow2 refcount_bits=64 extended_l2=on, convert, 64M+512",
                "g.qcow2",
                &["convert", "-O", "qcow2", "-o", "refcount_bits=64,extended_l2=on", "data.raw", "g.qcow2"],
                V3,
            ),
            c("qcow2, create, 1G", "h.qcow2", &["create", "-f", "qcow2", "h.qcow2", "1G"], V3),
            c("qcow2, create, 10G", "i.qcow2", &["create", "-f", "qcow2", "i.qcow2", "10G"], V3),
            c("qcow2, create, 100M", "j.qcow2", &["create", "-f", "qcow2", "j.qcow2", "100M"], V3),
            c("qcow2, create, 1000 bytes", "k.qcow2", &["create", "-f", "qcow2", "k.qcow2", "1000"], V3),
            c(
                "qcow2 cluster_size=2M, create, 4T",
                "l.qcow2",
                &["create", "-f", "qcow2", "-o", "cluster_size=2M", "l.qcow2", "4T"],
                V3,
            ),
            c(
                "qcow2 preallocation=metadata, create, 100M",
                "m.qcow2",
                &["create", "-f", "qcow2", "-o", "preallocation=metadata", "m.qcow2", "100M"],
                V3,
            ),
            c(
                "qcow2 lazy_refcounts=on, create, 1G",
                "n.qcow2",
                &["create", "-f", "qcow2", "-o", "lazy_refcounts=on", "n.qcow2", "1G"],
                V3,
            ),
            c(
                "qcow2 compat=0.10, create, 64M+512",
                "o.qcow2",
                &["create", "-f", "qcow2", "-o", "compat=0.10", "o.qcow2", "67109376"],
                V2,
            ),
        ],
    );
}

#[test]
fn qemu_vmdk() {
    if !have_qemu_img() {
        return;
    }
    const SPARSE: Option<&str> = Some("monolithicSparse");
    const STREAM: Option<&str> = Some("streamOptimized");
    let c = |label, file, make, variant| Case { label, file, make, format: Format::Vmdk, variant };
    run_cases(
        "vmdk",
        &[
            c(
                "vmdk monolithicSparse, convert, 64M+512",
                "a.vmdk",
                &["convert", "-O", "vmdk", "data.raw", "a.vmdk"],
                SPARSE,
            ),
            c(
                "vmdk streamOptimized, convert, 64M+512",
                "b.vmdk",
                &["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "data.raw", "b.vmdk"],
                STREAM,
            ),
            c(
                "vmdk monolithicSparse, create, 1G",
                "c.vmdk",
                &["create", "-f", "vmdk", "-o", "subformat=monolithicSparse", "c.vmdk", "1G"],
                SPARSE,
            ),
            c("vmdk monolithicSparse, create, 10G", "d.vmdk", &["create", "-f", "vmdk", "d.vmdk", "10G"], SPARSE),
            c(
                "vmdk streamOptimized, create, 10G",
                "e.vmdk",
                &["create", "-f", "vmdk", "-o", "subformat=streamOptimized", "e.vmdk", "10G"],
                STREAM,
            ),
            c("vmdk, create, 100M", "f.vmdk", &["create", "-f", "vmdk", "f.vmdk", "100M"], SPARSE),
            c("vmdk, create, 64M+512", "g.vmdk", &["create", "-f", "vmdk", "g.vmdk", "67109376"], SPARSE),
            c(
                "vmdk compat6=on zeroed_grain=on, convert, 64M+512",
                "h.vmdk",
                &["convert", "-O", "vmdk", "-o", "compat6=on,zeroed_grain=on", "data.raw", "h.vmdk"],
                SPARSE,
            ),
            c(
                "vmdk adapter_type=lsilogic, create, 1T",
                "i.vmdk",
                &["create", "-f", "vmdk", "-o", "adapter_type=lsilogic", "i.vmdk", "1T"],
                SPARSE,
            ),
        ],
    );
}

/// A vmdk made by qemu-img and cut in half keeps its grain tables (at the start) but loses
/// grains they point to: truncated, not a disk of zeros.
#[test]
fn qemu_vmdk_cut_short() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("vmdk-cut");
    data_raw(&dir.path("data.raw"), DATA_SIZE);
    for (file, opts) in [("a.vmdk", "subformat=monolithicSparse"), ("b.vmdk", "subformat=streamOptimized")] {
        qemu_img(&dir, &["convert", "-O", "vmdk", "-o", opts, "data.raw", file]);
        let bytes = std::fs::read(dir.path(file)).unwrap();
        assert!(detect_bytes(&bytes).is_ok(), "{opts}: whole");
        let e = detect_bytes(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(
            matches!(e, FormatError::Truncated { .. }) && e.to_string().contains("a grain lies at bytes"),
            "{opts}: {e}"
        );
    }
}

#[test]
fn qemu_vhd() {
    if !have_qemu_img() {
        return;
    }
    const FIXED: Option<&str> = Some("fixed");
    const DYNAMIC: Option<&str> = Some("dynamic");
    let c = |label, file, make, variant| Case { label, file, make, format: Format::Vhd, variant };
    run_cases(
        "vhd",
        &[
            c("vhd dynamic, convert, 64M+512", "a.vhd", &["convert", "-O", "vpc", "data.raw", "a.vhd"], DYNAMIC),
            c(
                "vhd fixed, convert, 64M+512",
                "b.vhd",
                &["convert", "-O", "vpc", "-o", "subformat=fixed", "data.raw", "b.vhd"],
                FIXED,
            ),
            c(
                "vhd dynamic force_size=on, convert, 64M+512",
                "c.vhd",
                &["convert", "-O", "vpc", "-o", "force_size=on", "data.raw", "c.vhd"],
                DYNAMIC,
            ),
            c(
                "vhd fixed force_size=on, convert, 64M+512",
                "d.vhd",
                &["convert", "-O", "vpc", "-o", "subformat=fixed,force_size=on", "data.raw", "d.vhd"],
                FIXED,
            ),
            c("vhd dynamic, create, 1G", "e.vhd", &["create", "-f", "vpc", "e.vhd", "1G"], DYNAMIC),
            c("vhd dynamic, create, 100M", "f.vhd", &["create", "-f", "vpc", "f.vhd", "100M"], DYNAMIC),
            c("vhd dynamic, create, 10G", "g.vhd", &["create", "-f", "vpc", "g.vhd", "10G"], DYNAMIC),
            c(
                "vhd fixed, create, 100M",
                "h.vhd",
                &["create", "-f", "vpc", "-o", "subformat=fixed", "h.vhd", "100M"],
                FIXED,
            ),
            c(
                "vhd fixed, create, 10G",
                "i.vhd",
                &["create", "-f", "vpc", "-o", "subformat=fixed", "i.vhd", "10G"],
                FIXED,
            ),
            c(
                "vhd dynamic force_size=on, create, 1G",
                "j.vhd",
                &["create", "-f", "vpc", "-o", "force_size=on", "j.vhd", "1G"],
                DYNAMIC,
            ),
            c(
                "vhd fixed force_size=on, create, 100M",
                "k.vhd",
                &["create", "-f", "vpc", "-o", "subformat=fixed,force_size=on", "k.vhd", "100M"],
                FIXED,
            ),
            c("vhd dynamic (beyond CHS), create, 200G", "l.vhd", &["create", "-f", "vpc", "l.vhd", "200G"], DYNAMIC),
            c("vhd dynamic, create, 2000G", "m.vhd", &["create", "-f", "vpc", "m.vhd", "2000G"], DYNAMIC),
        ],
    );
}

#[test]
fn qemu_vhdx() {
    if !have_qemu_img() {
        return;
    }
    const FIXED: Option<&str> = Some("fixed");
    const DYNAMIC: Option<&str> = Some("dynamic");
    let c = |label, file, make, variant| Case { label, file, make, format: Format::Vhdx, variant };
    run_cases(
        "vhdx",
        &[
            c("vhdx dynamic, convert, 64M+512", "a.vhdx", &["convert", "-O", "vhdx", "data.raw", "a.vhdx"], DYNAMIC),
            c(
                "vhdx fixed, convert, 64M+512",
                "b.vhdx",
                &["convert", "-O", "vhdx", "-o", "subformat=fixed", "data.raw", "b.vhdx"],
                FIXED,
            ),
            c(
                "vhdx block_size=1M, convert, 64M+512",
                "c.vhdx",
                &["convert", "-O", "vhdx", "-o", "block_size=1M", "data.raw", "c.vhdx"],
                DYNAMIC,
            ),
            c("vhdx dynamic, create, 1G", "d.vhdx", &["create", "-f", "vhdx", "d.vhdx", "1G"], DYNAMIC),
            c("vhdx dynamic, create, 100M", "e.vhdx", &["create", "-f", "vhdx", "e.vhdx", "100M"], DYNAMIC),
            c("vhdx dynamic, create, 10G", "f.vhdx", &["create", "-f", "vhdx", "f.vhdx", "10G"], DYNAMIC),
            c(
                "vhdx fixed, create, 100M",
                "g.vhdx",
                &["create", "-f", "vhdx", "-o", "subformat=fixed", "g.vhdx", "100M"],
                FIXED,
            ),
            c(
                "vhdx block_size=256M log_size=8M, create, 10G",
                "h.vhdx",
                &["create", "-f", "vhdx", "-o", "block_size=256M,log_size=8M", "h.vhdx", "10G"],
                DYNAMIC,
            ),
            c("vhdx dynamic, create, 16T", "i.vhdx", &["create", "-f", "vhdx", "i.vhdx", "16T"], DYNAMIC),
        ],
    );
}

#[test]
fn qemu_vdi() {
    if !have_qemu_img() {
        return;
    }
    const STATIC: Option<&str> = Some("static");
    const DYNAMIC: Option<&str> = Some("dynamic");
    let c = |label, file, make, variant| Case { label, file, make, format: Format::Vdi, variant };
    run_cases(
        "vdi",
        &[
            c("vdi dynamic, convert, 64M+512", "a.vdi", &["convert", "-O", "vdi", "data.raw", "a.vdi"], DYNAMIC),
            c(
                "vdi static, convert, 64M+512",
                "b.vdi",
                &["convert", "-O", "vdi", "-o", "static=on", "data.raw", "b.vdi"],
                STATIC,
            ),
            c("vdi dynamic, create, 1G", "c.vdi", &["create", "-f", "vdi", "c.vdi", "1G"], DYNAMIC),
            c("vdi dynamic, create, 100M", "d.vdi", &["create", "-f", "vdi", "d.vdi", "100M"], DYNAMIC),
            c("vdi dynamic, create, 10G", "e.vdi", &["create", "-f", "vdi", "e.vdi", "10G"], DYNAMIC),
            c("vdi dynamic, create, 64M+512", "f.vdi", &["create", "-f", "vdi", "f.vdi", "67109376"], DYNAMIC),
            c(
                "vdi static, create, 100M",
                "g.vdi",
                &["create", "-f", "vdi", "-o", "static=on", "g.vdi", "100M"],
                STATIC,
            ),
        ],
    );
}

#[test]
fn qemu_iso() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("iso");
    let path = dir.path("built.iso");
    fs::write(&path, build::iso(300, true)).unwrap();
    let d = detect_path(&path).unwrap();
    let (fmt, size) = qemu_info(&path, None).unwrap();
    eprintln!("ROW | iso, built by hand, 300 blocks | {} {} | qemu probe {fmt} {size}", d.format, d.virtual_size);
    assert_eq!((d.format, fmt.as_str(), d.virtual_size), (Format::Iso, "raw", size));
    // An ISO made by a real mastering tool, where one is installed.
    for tool in ["genisoimage", "mkisofs", "xorrisofs"] {
        let src = dir.path("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("hello.txt"), "hello\n").unwrap();
        let out = dir.path(&format!("{tool}.iso"));
        let Ok(st) = Command::new(tool).arg("-quiet").arg("-o").arg(&out).arg(&src).status() else { continue };
        if !st.success() {
            continue;
        }
        let d = detect_path(&out).unwrap();
        let (fmt, size) = qemu_info(&out, None).unwrap();
        eprintln!("ROW | iso, {tool} | {} {} | qemu probe {fmt} {size}", d.format, d.virtual_size);
        assert_eq!(d.format, Format::Iso);
        assert!(d.virtual_size <= size);
    }
}

/// Streamed-optimized vmdk as VMware writes it: the header says the grain directory is at the
/// end, and the footer holds the real header. Made from a qemu-img image, checked with qemu-img.
#[test]
fn qemu_vmdk_stream_with_footer() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("vmdkfooter");
    data_raw(&dir.path("data.raw"), DATA_SIZE);
    qemu_img(&dir, &["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "data.raw", "s.vmdk"]);
    let mut img = fs::read(dir.path("s.vmdk")).unwrap();
    // qemu ends the stream with an end-of-stream marker (a zero sector): put the footer before it.
    let n = img.len();
    assert!(img[n - 512..].iter().all(|&b| b == 0));
    let header = img[..512].to_vec();
    img.truncate(n - 512);
    let mut marker = vec![0u8; 512];
    marker[12] = 3;
    img.extend(&marker);
    img.extend(&header);
    img.extend(&[0u8; 512]);
    img[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    // A header capacity that differs from the footer's: the footer is what counts.
    let capacity = u64::from_le_bytes(img[12..20].try_into().unwrap());
    img[12..20].copy_from_slice(&(capacity + 2048).to_le_bytes());
    let path = dir.path("footer.vmdk");
    fs::write(&path, &img).unwrap();
    let d = detect_path(&path).unwrap();
    let (fmt, size) = qemu_info(&path, None).unwrap();
    eprintln!(
        "ROW | vmdk streamOptimized with footer (GD_AT_END), 64M+512 | {} {} {:?} | qemu probe {fmt} {size}",
        d.format, d.virtual_size, d.variant
    );
    assert_eq!((d.format, d.virtual_size, d.variant), (Format::Vmdk, size, Some("streamOptimized")));
    assert_eq!(fmt, "vmdk");
    // qemu-img reads the same data back.
    let out = Command::new("qemu-img").arg("compare").arg(dir.path("data.raw")).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // Cut off the footer: truncated.
    fs::write(&path, &img[..img.len() - 1024]).unwrap();
    assert!(matches!(detect_path(&path), Err(FormatError::Truncated { .. })));
}

/// Broken, truncated and not self-contained images: errors, never raw.
#[test]
fn qemu_broken_and_unsupported() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("broken");
    data_raw(&dir.path("data.raw"), DATA_SIZE);
    let cut = |from: &str, to: &str, len: usize| {
        let b = fs::read(dir.path(from)).unwrap();
        fs::write(dir.path(to), &b[..len.min(b.len())]).unwrap();
    };
    let expect = |file: &str, kind: &str, text: &str| {
        let e = detect_path(&dir.path(file)).expect_err(file);
        let q = qemu_info(&dir.path(file), None)
            .map(|(f, s)| format!("{f} {s}"))
            .unwrap_or_else(|e| format!("error: {}", e.trim()));
        eprintln!("ROW | {file} | {kind} | qemu probe: {q} | {e}");
        assert!(format!("{e:?}").starts_with(kind), "{file}: {e:?}");
        assert!(e.to_string().contains(text), "{file}: {e}");
    };

    qemu_img(&dir, &["convert", "-O", "qcow2", "data.raw", "a.qcow2"]);
    cut("a.qcow2", "cut40.qcow2", 40);
    expect("cut40.qcow2", "Truncated", "qcow2 header is truncated: the file is 40 bytes, the header needs 104");
    let len = fs::metadata(dir.path("a.qcow2")).unwrap().len() as usize;
    cut("a.qcow2", "half.qcow2", len / 2);
    expect("half.qcow2", "Truncated", "qcow2 image is truncated");
    qemu_img(&dir, &["create", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1G"]);
    cut("v2.qcow2", "cut40v2.qcow2", 40);
    expect("cut40v2.qcow2", "Truncated", "qcow2 header is truncated: the file is 40 bytes, the header needs 72");

    qemu_img(&dir, &["create", "-f", "qcow2", "base.qcow2", "1G"]);
    qemu_img(&dir, &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    expect("top.qcow2", "Unsupported", "images with a backing file are not self-contained");
    qemu_img(&dir, &["create", "-f", "qcow2", "-o", "data_file=ext.raw", "ext.qcow2", "1G"]);
    expect("ext.qcow2", "Unsupported", "external data file");
    qemu_img(
        &dir,
        &[
            "create",
            "--object",
            "secret,id=s0,data=pw",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "enc.qcow2",
            "1G",
        ],
    );
    expect("enc.qcow2", "Unsupported", "encrypted qcow2");
    qemu_img(&dir, &["create", "-f", "qcow", "v1.qcow", "1G"]);
    expect("v1.qcow", "Unsupported", "qcow (version 1)");

    qemu_img(&dir, &["create", "-f", "vmdk", "base.vmdk", "1G"]);
    qemu_img(&dir, &["create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "top.vmdk"]);
    expect("top.vmdk", "Unsupported", "base.vmdk");
    qemu_img(&dir, &["create", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "1G"]);
    expect("flat.vmdk", "Unsupported", "multi-file vmdk");
    qemu_img(&dir, &["create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "split.vmdk", "5G"]);
    expect("split.vmdk", "Unsupported", "multi-file vmdk");
    qemu_img(&dir, &["convert", "-O", "vmdk", "data.raw", "a.vmdk"]);
    qemu_img(&dir, &["create", "-f", "vmdk", "zero.vmdk", "0"]);
    expect("zero.vmdk", "Unsupported", "capacity of 0");
    cut("a.vmdk", "cut.vmdk", 60);
    expect("cut.vmdk", "Truncated", "vmdk header is truncated");
    cut("a.vmdk", "cut2.vmdk", 4096);
    expect("cut2.vmdk", "Truncated", "vmdk image is truncated");

    qemu_img(&dir, &["convert", "-O", "vhdx", "data.raw", "a.vhdx"]);
    cut("a.vhdx", "cut.vhdx", 200_000);
    expect("cut.vhdx", "Truncated", "vhdx region table is truncated");
    // 8 MiB blocks: the file is 8 MiB of metadata, then the blocks with data in the order
    // written (first at 8 MiB, middle at 16 MiB, ...). At 20 MiB the middle one is cut in two.
    assert_eq!(fs::metadata(dir.path("a.vhdx")).unwrap().len(), 40 << 20);
    cut("a.vhdx", "end.vhdx", 20 << 20);
    expect("end.vhdx", "Truncated", "vhdx image is truncated");
    let mut b = fs::read(dir.path("a.vhdx")).unwrap();
    b.truncate(10 << 20);
    for at in [64 * 1024 + 200, 128 * 1024 + 200] {
        b[at] ^= 0xff;
    }
    fs::write(dir.path("bad.vhdx"), &b).unwrap();
    expect("bad.vhdx", "Corrupt", "no valid header");

    qemu_img(&dir, &["convert", "-O", "vpc", "data.raw", "a.vhd"]);
    let len = fs::metadata(dir.path("a.vhd")).unwrap().len() as usize;
    cut("a.vhd", "cut.vhd", len / 2);
    expect("cut.vhd", "Truncated", "vhd image is truncated");
    cut("a.vhd", "cut2.vhd", 700);
    expect("cut2.vhd", "Truncated", "vhd dynamic disk header is truncated");

    qemu_img(&dir, &["convert", "-O", "vdi", "data.raw", "a.vdi"]);
    let len = fs::metadata(dir.path("a.vdi")).unwrap().len() as usize;
    cut("a.vdi", "cut.vdi", len / 2);
    expect("cut.vdi", "Truncated", "vdi image is truncated");
    cut("a.vdi", "cut2.vdi", 300);
    expect("cut2.vdi", "Truncated", "vdi header is truncated");

    fs::write(dir.path("empty.img"), b"").unwrap();
    expect("empty.img", "Truncated", "the image is empty");
}

// ----------------------------------------------------------------------------------------------
// Fuzz: no input makes detect panic, and a known magic at the start never comes out as raw.

/// Positions worth mutating: the headers and tables of each format.
const HOT_SPOTS: &[(usize, usize)] = &[
    (0, 1024),
    (32768, 256),
    (64 * 1024, 128),
    (128 * 1024, 128),
    (192 * 1024, 128),
    (256 * 1024, 128),
    (1 << 20, 64),
    (2 << 20, 64),
    (3 << 20, 256),
    ((3 << 20) + 65536, 64),
    (65536, 64),
    (2 * 65536, 64),
    (3 * 65536, 64),
];

fn check_no_panic(label: &str, data: &[u8], declared: u64) {
    // fuzz::check_bytes asserts what must hold of any detection (a known magic never raw, ...).
    let r = std::panic::catch_unwind(|| super::fuzz::check_bytes(data, declared));
    assert!(r.is_ok(), "detect failed on {label} (len {}, declared {declared})", data.len());
}

#[test]
fn fuzz_never_panics() {
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("qcow2 v2", build::qcow2(2, 10 * GIB)),
        ("qcow2 v3", build::qcow2(3, 10 * GIB)),
        ("vmdk sparse", build::vmdk(1 << 21, false, false)),
        ("vmdk stream footer", build::vmdk(1 << 21, true, true)),
        ("vhd fixed", build::vhd_fixed(MIB, b"vpc ")),
        ("vhd dynamic", build::vhd_dynamic(100 * MIB, b"win ")),
        ("vdi dynamic", build::vdi(100 * MIB, false)),
        ("vdi static", build::vdi(2 * MIB, true)),
        ("vhdx", build::vhdx(10 * GIB, 512)),
        ("vhdx log", build::vhdx_with_log(true)),
        ("iso", build::iso(40, true)),
    ];
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let specials = [0u8, 0xff, 0x7f, 0x80, 1, 2, 3, 4, 6, 9, 0x10, 0x20];
    let mut runs = 0;
    for (label, base) in &seeds {
        for _ in 0..1500 {
            let mut data = base.clone();
            let n = data.len();
            // Mutate a few bytes, mostly in headers and tables.
            for _ in 0..1 + rng.below(6) {
                let (start, span) = HOT_SPOTS[rng.below(HOT_SPOTS.len() as u64) as usize];
                let pos = if rng.below(5) == 0 || start >= n {
                    rng.below(n as u64) as usize
                } else {
                    (start + rng.below(span as u64) as usize).min(n - 1)
                };
                match rng.below(4) {
                    0 => data[pos] ^= 1 << rng.below(8),
                    1 => data[pos] = specials[rng.below(specials.len() as u64) as usize],
                    2 => {
                        // An extreme 64-bit value at an aligned offset.
                        let at = (pos & !7).min(n.saturating_sub(8));
                        let v = [u64::MAX, 0, 1 << 63, u64::from(u32::MAX), rng.next()][rng.below(5) as usize];
                        data[at..at + 8].copy_from_slice(&v.to_le_bytes());
                    }
                    _ => data[pos] = rng.next() as u8,
                }
            }
            // A footer at the end, sometimes.
            if rng.below(10) == 0 && n > 2048 {
                let tail = &seeds[rng.below(seeds.len() as u64) as usize].1;
                let t = &tail[tail.len() - 512..];
                data[n - 512..].copy_from_slice(t);
            }
            if rng.below(2) == 0 {
                super::fuzz::fix_checksums(&mut data);
            }
            // Truncate sometimes, and sometimes declare a size other than the real one.
            let cut = if rng.below(4) == 0 { rng.below(n as u64 + 1) as usize } else { n };
            let declared = match rng.below(10) {
                0 => cut as u64 + rng.below(1 << 30),
                1 => u64::MAX - rng.below(4096),
                2 => rng.below(cut as u64 + 1),
                _ => cut as u64,
            };
            check_no_panic(label, &data[..cut], declared);
            runs += 1;
        }
    }
    // Random bytes, bare or behind a known magic.
    let magics: [&[u8]; 9] = [
        b"",
        b"QFI\xfb\0\0\0\x03",
        b"QFI\xfb\0\0\0\x02",
        b"KDMV",
        b"conectix",
        b"vhdxfile",
        b"COWD",
        b"# Disk DescriptorFile\n",
        b"version=1\n",
    ];
    for i in 0..3000 {
        let len = [rng.below(100), rng.below(600), rng.below(5000), rng.below(300_000)][i % 4] as usize;
        let mut data = rng.bytes(len);
        let m = magics[rng.below(magics.len() as u64) as usize];
        if data.len() >= m.len() {
            data[..m.len()].copy_from_slice(m);
        }
        if rng.below(3) == 0 && data.len() >= 68 {
            data[64..68].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
            let k = (data.len() - 68).min(4);
            data[68..68 + k].copy_from_slice(&[1, 0, 1, 0][..k]);
        }
        super::fuzz::fix_checksums(&mut data);
        check_no_panic("random", &data, data.len() as u64);
        runs += 1;
    }
    eprintln!("fuzz: {runs} inputs, no panic");
    assert!(runs >= 15_000);
}
