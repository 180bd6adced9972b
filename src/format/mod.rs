//! Disk image format detection from the bytes of an image.
//!
//! [`detect`] looks at magic numbers and headers only (never at a file name) and tells which
//! [`Format`] an image is in and its virtual size, the way `qemu-img info` would report it.
//! It is pure Rust without dependencies and reads through the small [`ReadAt`] trait, so it
//! works on a local file, an in-memory buffer or any other random-access source.
//!
//! Safety rules for imports, enforced here:
//! - An image that carries the magic of a known format but whose header is broken or cut short
//!   is an error ([`FormatError::Truncated`] / [`FormatError::Corrupt`]), never [`Format::Raw`].
//! - Images that are not self-contained (a qcow2, vmdk, vhd, vhdx or vdi with a backing or
//!   parent file, a qcow2 with an external data file, a descriptor-only vmdk) are
//!   [`FormatError::Unsupported`], as are encrypted qcow2 images.
//! - Detection never panics, never allocates based on a size field of the image (every read is
//!   capped) and never loops without bound, whatever the input.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};

mod iso;
mod qcow2;
pub mod sample;
mod vdi;
mod vhdx;
mod vmdk;
mod vpc;

#[cfg(test)]
mod tests;

// Entry points of the fuzz targets in fuzz/ (tests and the `fuzzing` feature only).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;

/// Image file formats we detect. `Display` gives the API spelling: Raw, Qcow2, Vmdk, Vhd, Vhdx,
/// Vdi, Iso.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// A plain disk image: the bytes are the disk.
    Raw,
    /// QEMU copy-on-write version 2 (qcow2 v2 and v3).
    Qcow2,
    /// VMware virtual disk, single-file sparse (monolithicSparse or streamOptimized).
    Vmdk,
    /// Microsoft Virtual PC / Hyper-V VHD (qemu calls it `vpc`), fixed or dynamic.
    Vhd,
    /// Microsoft Hyper-V VHDX, fixed or dynamic.
    Vhdx,
    /// VirtualBox disk image, static or dynamic.
    Vdi,
    /// An ISO 9660 optical disc image (qemu reads it as raw).
    Iso,
}

impl Format {
    /// Every format, in declaration order.
    pub const ALL: [Format; 7] =
        [Format::Raw, Format::Qcow2, Format::Vmdk, Format::Vhd, Format::Vhdx, Format::Vdi, Format::Iso];

    /// The API spelling: "Raw", "Qcow2", "Vmdk", "Vhd", "Vhdx", "Vdi", "Iso".
    pub fn as_api_str(&self) -> &'static str {
        match self {
            Format::Raw => "Raw",
            Format::Qcow2 => "Qcow2",
            Format::Vmdk => "Vmdk",
            Format::Vhd => "Vhd",
            Format::Vhdx => "Vhdx",
            Format::Vdi => "Vdi",
            Format::Iso => "Iso",
        }
    }

    /// The name `qemu-img -f` / `-O` takes: "raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", and
    /// "raw" for an ISO (qemu-img reads an ISO as a raw image).
    pub fn as_qemu_str(&self) -> &'static str {
        match self {
            Format::Raw | Format::Iso => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
        }
    }

    /// The lower-case name provisioners such as Metal3 expect: "raw", "qcow2", "vmdk", "vhd",
    /// "vhdx", "vdi", "iso".
    pub fn lowercase(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Iso => "iso",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_api_str())
    }
}

/// What [`detect`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detected {
    /// The image format.
    pub format: Format,
    /// The size of the disk the image holds, in bytes: what `qemu-img info --output=json`
    /// reports as "virtual-size" (for raw, the file size; for an ISO, the ISO 9660 volume size,
    /// volume space size times logical block size).
    pub virtual_size: u64,
    /// The sub-format, where the format has one: "qcow2 v2", "qcow2 v3", "monolithicSparse",
    /// "streamOptimized", "fixed", "dynamic", "static".
    pub variant: Option<&'static str>,
}

/// Why an image could not be detected.
#[derive(Debug)]
pub enum FormatError {
    /// The image carries the magic of a known format but ends before its structures do
    /// (including an empty file).
    Truncated {
        /// What is missing, e.g. "qcow2 header is truncated: the file is 40 bytes, the header
        /// needs 104".
        what: String,
    },
    /// The image carries the magic of a known format but its structures are inconsistent.
    Corrupt {
        /// What is wrong.
        what: String,
    },
    /// The image is of a known format, or a variant of one, that cannot be imported as it is.
    Unsupported {
        /// What it is and, where there is one, how to make it importable.
        what: String,
    },
    /// Reading the image failed.
    Io(io::Error),
}

impl FormatError {
    pub(crate) fn truncated(what: impl Into<String>) -> Self {
        FormatError::Truncated { what: what.into() }
    }
    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        FormatError::Corrupt { what: what.into() }
    }
    pub(crate) fn unsupported(what: impl Into<String>) -> Self {
        FormatError::Unsupported { what: what.into() }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Truncated { what } => {
                write!(f, "{what}; the image looks incomplete, upload the whole file again")
            }
            FormatError::Corrupt { what } => {
                write!(f, "{what}; the image is damaged, check it with `qemu-img check` or export it again")
            }
            FormatError::Unsupported { what } => write!(f, "{what}"),
            FormatError::Io(e) => write!(f, "could not read the image: {e}"),
        }
    }
}

impl std::error::Error for FormatError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FormatError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for FormatError {
    fn from(e: io::Error) -> Self {
        FormatError::Io(e)
    }
}

/// Random access to the image bytes (the stored object).
pub trait ReadAt {
    /// Reads exactly `len` bytes at `offset`; fewer only at the end of the file (none at or
    /// past it).
    fn read_at(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

impl ReadAt for std::fs::File {
    fn read_at(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }
}

impl ReadAt for &[u8] {
    fn read_at(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        Ok(slice_at(self, offset, len).to_vec())
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        Ok(slice_at(self, offset, len).to_vec())
    }
}

fn slice_at(data: &[u8], offset: u64, len: usize) -> &[u8] {
    let Ok(start) = usize::try_from(offset) else { return &[] };
    if start >= data.len() {
        return &[];
    }
    let end = start.saturating_add(len).min(data.len());
    &data[start..end]
}

/// Detects the format of the image at hand from its bytes (magic numbers and headers), never
/// from a file name. `size` is the total byte length of the image.
///
/// Anything that is not recognised is [`Format::Raw`] with `virtual_size == size`; but an image
/// that starts with the magic of a known format whose header is broken is an error, and so is
/// an empty image.
pub fn detect(src: &mut dyn ReadAt, size: u64) -> Result<Detected, FormatError> {
    let mut src = Src { inner: src, size };
    if size == 0 {
        return Err(FormatError::truncated("the image is empty: the file is 0 bytes"));
    }
    let head = src.read_upto(0, HEAD_LEN)?;
    let expected = usize::try_from(size.min(HEAD_LEN as u64)).unwrap_or(HEAD_LEN);
    if head.len() < expected {
        return Err(short_read(size, 0, head.len()));
    }

    if head.starts_with(qcow2::MAGIC) {
        return qcow2::detect(&mut src, &head);
    }
    if head.starts_with(vmdk::MAGIC) {
        return vmdk::detect_sparse(&mut src, &head);
    }
    if head.starts_with(vmdk::COWD_MAGIC) {
        return Err(FormatError::unsupported(
            "this is a VMware 3 / ESX (COWD) sparse vmdk, which is not supported; convert it \
             with `qemu-img convert -O qcow2` first",
        ));
    }
    if head.starts_with(vpc::COOKIE) {
        return vpc::detect_at_start(&mut src, &head);
    }
    if head.starts_with(vhdx::SIGNATURE) {
        return vhdx::detect(&mut src);
    }
    if vdi::has_signature(&head) {
        return vdi::detect(&mut src, &head);
    }
    if let Some(what) = other_known_magic(&head) {
        return Err(FormatError::unsupported(format!(
            "{what} images are not supported; convert it with `qemu-img convert -O qcow2` first"
        )));
    }
    if vmdk::is_text_descriptor(&head) {
        return vmdk::descriptor_file(&head);
    }
    if let Some(d) = vpc::detect_at_end(&mut src)? {
        return Ok(d);
    }
    if let Some(d) = iso::detect(&mut src)? {
        return Ok(d);
    }
    Ok(Detected { format: Format::Raw, virtual_size: size, variant: None })
}

/// Detects the format of an open file, taking its length from its metadata.
pub fn detect_file(file: &mut std::fs::File) -> Result<Detected, FormatError> {
    let size = file.metadata()?.len();
    detect(file, size)
}

/// How much of the start of the image is read up front.
const HEAD_LEN: usize = 4096;

/// The most [`Src`] reads in one call (a qcow2 cluster is at most 2 MiB): every read of the
/// detector is bounded by a constant.
const MAX_READ: usize = 2 << 20;

/// Magic numbers of formats qemu knows and we do not import.
fn other_known_magic(head: &[u8]) -> Option<&'static str> {
    const KNOWN: &[(&[u8], &str)] = &[
        (b"QEF\0", "QED"),
        (b"LUKS\xba\xbe", "LUKS-encrypted"),
        (b"WithoutFreeSpace", "Parallels"),
        (b"WithouFreSpacExt", "Parallels"),
        (b"Bochs Virtual HD Image", "Bochs"),
    ];
    KNOWN.iter().find(|(m, _)| head.starts_with(m)).map(|(_, n)| *n)
}

/// The image being detected: a [`ReadAt`] and its declared size. Every read is bounded by the
/// declared size and by [`MAX_READ`].
pub(crate) struct Src<'a> {
    inner: &'a mut dyn ReadAt,
    pub(crate) size: u64,
}

impl Src<'_> {
    /// Reads up to `len` (at most [`MAX_READ`]) bytes at `offset`, stopping at the declared end
    /// of the image; nothing at or past it.
    pub(crate) fn read_upto(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, FormatError> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let avail = self.size - offset;
        let want = usize::try_from((len.min(MAX_READ) as u64).min(avail)).unwrap_or(0);
        let mut v = self.inner.read_at(offset, want)?;
        v.truncate(want);
        Ok(v)
    }

    /// Reads exactly `len` bytes at `offset`, or says that the `format` `part` (e.g. "qcow2",
    /// "header") is truncated.
    pub(crate) fn read_exact(
        &mut self,
        offset: u64,
        len: usize,
        format: &str,
        part: &str,
    ) -> Result<Vec<u8>, FormatError> {
        let v = self.read_upto(offset, len)?;
        if v.len() >= len {
            return Ok(v);
        }
        let end = offset.saturating_add(len as u64);
        if end <= self.size {
            return Err(short_read(self.size, offset, v.len()));
        }
        Err(FormatError::truncated(if offset == 0 {
            format!("{format} {part} is truncated: the file is {} bytes, the {part} needs {end}", self.size)
        } else {
            format!(
                "{format} {part} is truncated: the file is {} bytes, the {part} needs bytes {offset} to {end}",
                self.size
            )
        }))
    }
}

fn short_read(size: u64, offset: u64, got: usize) -> FormatError {
    FormatError::truncated(format!(
        "the image is said to be {size} bytes, but reading at offset {offset} returned only {got} bytes"
    ))
}

// Field readers. They never panic: a field outside the buffer reads as zero (callers check
// lengths first, so that does not happen in practice).

fn field<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = off.checked_add(N).and_then(|end| b.get(off..end)) {
        a.copy_from_slice(s);
    }
    a
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(field(b, off))
}
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(field(b, off))
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(field(b, off))
}
pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(field(b, off))
}
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(field(b, off))
}
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(field(b, off))
}
pub(crate) fn bytes<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    field(b, off)
}

/// Human-readable size for messages: "1073741824 bytes (1 GiB)".
pub(crate) fn human(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (u, s) in UNITS {
        if n >= s && n.is_multiple_of(s) {
            return format!("{n} bytes ({} {u})", n / s);
        }
    }
    format!("{n} bytes")
}
