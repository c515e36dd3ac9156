//! Disk images: a block-device abstraction with raw and qcow2 backends.
//!
//! [`open`] probes the format like QEMU (qcow2 magic, else raw), takes
//! QEMU-compatible lock bytes ([`lock`]) and returns a [`BlockDevice`] that
//! is `Send + Sync`, so a virtio-blk device can share it between threads.
//! The qcow2 data path runs on `imago`; [`qcow2`] adds the metadata code
//! imago lacks (header details, snapshots, check/repair, creation).

pub mod direct;
pub mod lock;
pub mod qcow2;
pub mod raw;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Image formats handled here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Plain file, byte for byte the guest disk.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// QEMU's name for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parse QEMU's name (`raw`, `qcow2`); `None` for anything else.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors from opening or accessing an image. `Display` gives QEMU's text
/// (without the `qemu-img: ` prefix).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened.
    #[error("Could not open '{path}': {source}")]
    Open {
        /// Path as given.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// Another process holds a conflicting lock.
    #[error("Could not open '{path}': {source}\nIs another process using the image [{path}]?")]
    Locked {
        /// Path as given.
        path: String,
        /// Which lock.
        source: lock::LockError,
    },
    /// The image metadata is invalid or unsupported.
    #[error("Could not open '{path}': {msg}")]
    Format {
        /// Path as given.
        path: String,
        /// QEMU-style explanation.
        msg: String,
    },
    /// I/O failure while using the image.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Request outside the device.
    #[error(
        "request at offset {offset} length {len} is beyond the end of the device ({size} bytes)"
    )]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// Write to a read-only device.
    #[error("the image is opened read-only")]
    ReadOnly,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What a range of the device maps to (like QEMU's block status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in this layer's file, at `offset` when known.
    Data {
        /// Host offset in the image file (None when not a plain mapping).
        offset: Option<u64>,
    },
    /// Compressed data in this layer.
    Compressed,
    /// Reads as zeroes; `allocated` when this layer says so explicitly.
    Zero {
        /// Explicit zero entry (qcow2 zero flag) or a hole in a raw file.
        allocated: bool,
    },
    /// Not allocated in this layer: comes from the backing file (or reads as
    /// zeroes when there is none).
    Unallocated,
}

/// A random-access virtual disk. All methods take `&self` and may be called
/// from several threads at once.
pub trait BlockDevice: Send + Sync {
    /// Read `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Write `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Make `len` bytes at `offset` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Hint that `len` bytes at `offset` are no longer needed (they may then
    /// read as zeroes or as the backing file's data).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Make written data durable.
    fn flush(&self) -> Result<()>;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Whether the device refuses writes.
    fn read_only(&self) -> bool;
    /// Format of this layer.
    fn format(&self) -> Format;
    /// What `[offset, offset+max_len)` maps to: the allocation of the first
    /// byte and how many bytes from `offset` share it (at least 1 byte
    /// unless `offset >= size()`).
    fn mapping(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64)>;
}

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Format; `None` probes (qcow2 magic, else raw).
    pub format: Option<Format>,
    /// Open read-only.
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub cache_direct: bool,
    /// Share all permissions with other users (qemu-img `-U`); read-only only.
    pub force_share: bool,
    /// Do not open the backing file of a qcow2 image (reads of unallocated
    /// clusters then return zeroes).
    pub no_backing: bool,
    /// Do not take QEMU lock bytes at all.
    pub no_lock: bool,
}

/// qcow2 magic `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Probe a file's format like QEMU: qcow2 when it starts with the qcow2
/// magic, raw otherwise.
pub fn probe(path: &Path) -> Result<Format> {
    let f = File::open(path).map_err(|e| Error::Open {
        path: path.display().to_string(),
        source: e,
    })?;
    probe_file(&f)
}

/// Probe an open file (see [`probe`]).
pub fn probe_file(f: &File) -> Result<Format> {
    use std::os::unix::fs::FileExt;
    let mut m = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read_at(&mut m[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
    Ok(if got == 4 && m == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Open a file for an image, with QEMU's lock bytes. Returns the file.
pub fn open_file(path: &Path, opts: &OpenOptions) -> Result<File> {
    let name = path.display().to_string();
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(!opts.read_only);
    if opts.cache_direct {
        use std::os::unix::fs::OpenOptionsExt;
        oo.custom_flags(libc::O_DIRECT);
    }
    let f = oo.open(path).map_err(|e| Error::Open {
        path: name.clone(),
        source: e,
    })?;
    if !opts.no_lock {
        let (p, s) = lock::perms_for(!opts.read_only, opts.force_share && opts.read_only);
        lock::lock(&f, p, s).map_err(|e| Error::Locked {
            path: name,
            source: e,
        })?;
    }
    Ok(f)
}

/// Open an image as a block device (see [`OpenOptions`]).
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let file = open_file(path, opts)?;
    let format = match opts.format {
        Some(f) => f,
        None => probe_file(&file)?,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::RawDevice::from_file(file, opts.read_only)?)),
        Format::Qcow2 => Ok(Box::new(qcow2::Qcow2Device::open_file(
            path, file, opts, 0,
        )?)),
    }
}

/// Resolve a backing file name the way QEMU does: relative names are taken
/// relative to the directory of the image that references them.
pub fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

/// Check that `[offset, offset+len)` lies within `size`.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::qcow2::create::{create, CreateOptions, Prealloc};
    use super::qcow2::meta::{self, Header};
    use super::*;
    use std::sync::Arc;

    fn assert_send_sync<T: Send + Sync + ?Sized>() {}

    /// Open for writing right after the last handle was dropped. Other
    /// tests of this process fork children (passt, scripts); between fork
    /// and exec a child holds a copy of every open fd, and with it the
    /// image's OFD lock, for a moment: wait that out.
    fn reopen(p: &std::path::Path) -> Box<dyn BlockDevice> {
        let t = std::time::Instant::now();
        loop {
            match open(p, &OpenOptions::default()) {
                Err(Error::Locked { .. }) if t.elapsed().as_secs() < 5 => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                r => return r.unwrap(),
            }
        }
    }

    fn exercise(dev: &dyn BlockDevice) {
        let size = dev.size();
        assert_eq!(size, 4 << 20);
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        dev.write_at(&data, 1000).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, 1000).unwrap();
        assert_eq!(back, data);
        dev.write_zeroes(65536, 4096).unwrap();
        let mut z = vec![1u8; 4096];
        dev.read_at(&mut z, 65536).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        dev.flush().unwrap();
        let (a, len) = dev.mapping(0, size).unwrap();
        assert!(len >= 1);
        assert!(matches!(a, Allocation::Data { .. }), "{a:?}");
        let (a, _) = dev.mapping(3 << 20, 4096).unwrap();
        assert!(!matches!(a, Allocation::Data { .. }), "{a:?}");
        // Out of range and read-only errors, no panics.
        let mut b = [0u8; 16];
        assert!(dev.read_at(&mut b, size - 8).is_err());
        assert!(dev.write_at(&b, u64::MAX - 4).is_err());
    }

    #[test]
    fn raw_and_qcow2_devices_read_write_map() {
        assert_send_sync::<dyn BlockDevice>();
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let q = dir.path().join("d.qcow2");
        create(
            &q,
            &CreateOptions {
                size: 4 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        for (p, f) in [(&raw, Format::Raw), (&q, Format::Qcow2)] {
            assert_eq!(probe(p).unwrap(), f);
            let dev = open(p, &OpenOptions::default()).unwrap();
            assert_eq!(dev.format(), f);
            exercise(dev.as_ref());
            // A second writer is refused by the QEMU lock bytes; -U readers pass.
            let e = open(p, &OpenOptions::default()).err().unwrap();
            assert!(e.to_string().contains("Failed to get"), "{e}");
            let ro = OpenOptions {
                read_only: true,
                force_share: true,
                ..Default::default()
            };
            let r = open(p, &ro).unwrap();
            assert!(r.read_only());
            assert!(matches!(r.write_at(&[1], 0), Err(Error::ReadOnly)));
            drop(dev);
            // Concurrent use from threads.
            drop(r);
            let dev: Arc<dyn BlockDevice> = Arc::from(reopen(p));
            let hs: Vec<_> = (0..4u8)
                .map(|t| {
                    let d = Arc::clone(&dev);
                    std::thread::spawn(move || {
                        let buf = vec![t + 1; 65536];
                        d.write_at(&buf, t as u64 * 65536 + (1 << 20)).unwrap();
                        let mut b = vec![0u8; 65536];
                        d.read_at(&mut b, t as u64 * 65536 + (1 << 20)).unwrap();
                        assert!(b.iter().all(|&x| x == t + 1));
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
        }
        // The qcow2 image stays consistent.
        let f = std::fs::File::open(&q).unwrap();
        let r = qcow2::check::check(&f, qcow2::check::Fix::NONE, &mut |_| {}).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
    }

    #[test]
    fn header_roundtrip_and_refblock_entries() {
        let dir = tempfile::tempdir().unwrap();
        for (bits, v3, prealloc) in [
            (16, true, Prealloc::Off),
            (1, true, Prealloc::Metadata),
            (64, true, Prealloc::Off),
            (16, false, Prealloc::Off),
        ] {
            let p = dir.path().join(format!("h{bits}{v3}.qcow2"));
            let o = CreateOptions {
                size: 1 << 30,
                refcount_bits: bits,
                v3,
                prealloc,
                backing_file: Some("base.img".into()),
                backing_format: Some("raw".into()),
                ..Default::default()
            };
            if prealloc != Prealloc::Off {
                assert!(create(&p, &o).is_err(), "backing + preallocation refused");
                continue;
            }
            create(&p, &o).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            let h = Header::read(&f).unwrap();
            assert_eq!(h.refcount_bits(), bits);
            assert_eq!(h.backing_file.as_deref(), Some("base.img"));
            assert_eq!(h.backing_format.as_deref(), Some("raw"));
            assert_eq!(h.size, 1 << 30);
            let again = h.serialize().unwrap();
            let mut first = vec![0u8; again.len()];
            raw::pread_full(&f, &mut first, 0).unwrap();
            assert_eq!(first, again, "serialize(read(x)) == x");
        }
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let n = 512 * 8 / (1u64 << order);
            for i in 0..n {
                meta::refblock_set(&mut b, order, i, (i * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    meta::refblock_get(&b, order, i),
                    (i * 7) & max,
                    "order {order} entry {i}"
                );
            }
        }
    }

    #[test]
    fn malformed_headers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.qcow2");
        create(
            &p,
            &CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let good = std::fs::read(&p).unwrap();
        let cases: &[(usize, &[u8], &str)] = &[
            (4, &[0, 0, 0, 4], "Unsupported qcow2 version 4"),
            (20, &[0, 0, 0, 8], "Unsupported cluster size: 2^8"),
            (
                72,
                &[0, 0, 0, 0, 0, 0, 0, 0x20],
                "Unsupported qcow2 feature(s): Unknown incompatible feature: 20",
            ),
            (
                96,
                &[0, 0, 0, 7],
                "Reference count entry width too large; may not exceed 64 bits",
            ),
            (36, &[0xff, 0xff, 0xff, 0xff], "Active L1 table too large"),
            (100, &[0, 0, 0, 8], "qcow2 header too short"),
            (0, b"QFI\xfa", "Image is not in qcow2 format"),
        ];
        for (off, bytes, msg) in cases {
            let mut b = good.clone();
            b[*off..*off + bytes.len()].copy_from_slice(bytes);
            std::fs::write(&p, &b).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            assert_eq!(Header::read(&f).unwrap_err(), *msg);
            let e = open(
                &p,
                &OpenOptions {
                    format: Some(Format::Qcow2),
                    read_only: true,
                    ..Default::default()
                },
            );
            assert!(e.is_err());
        }
    }
}
