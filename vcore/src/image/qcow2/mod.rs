//! qcow2 images: data path on `imago`, metadata on the spec ([`meta`]),
//! consistency check and repair ([`check`]), creation ([`create`]).

mod allocator;
pub use allocator::refcount_metadata;
pub mod check;
pub mod create;
pub mod map;
pub mod meta;
mod prealloc;
pub mod resize;
pub mod snapshot;
pub mod writer;

use super::{check_range, Allocation, BlockDevice, Error, Format, OpenOptions, Result};
use imago::format::PreallocateMode;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, ShallowMapping};
use meta::Header;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

type Access = FormatAccess<imago::file::File>;

/// Maximum backing chain depth (loops are refused long before).
const MAX_CHAIN: usize = 32;

/// A qcow2 image opened as a block device.
pub struct Qcow2Device {
    access: RwLock<Access>,
    header: Header,
    file: File,
    read_only: bool,
    size: AtomicU64,
}

impl std::fmt::Debug for Qcow2Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Device")
            .field("header", &self.header)
            .finish()
    }
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

fn imago_file(f: &File, read_only: bool, direct: bool) -> Result<imago::file::File> {
    let dup = f.try_clone()?;
    let opts = imago::StorageOpenOptions::new()
        .write(!read_only)
        .direct(direct);
    Ok(imago::file::File::from_open_file(dup, opts)?)
}

/// Open the backing chain below an image (read-only), as imago layers.
fn open_backing(
    image: &Path,
    h: &Header,
    opts: &OpenOptions,
    depth: usize,
    seen: &mut Vec<PathBuf>,
) -> Result<Option<Access>> {
    let Some(name) = &h.backing_file else {
        return Ok(None);
    };
    if opts.no_backing {
        return Ok(None);
    }
    let path = super::resolve_backing(image, name);
    if depth >= MAX_CHAIN {
        return Err(fmt_err(image, "Backing chain too deep"));
    }
    let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    if seen.contains(&canon) {
        return Err(fmt_err(
            image,
            format!("Backing file loop detected at '{}'", path.display()),
        ));
    }
    seen.push(canon);
    let bopts = OpenOptions {
        format: None,
        read_only: true,
        force_share: opts.force_share,
        cache_direct: opts.cache_direct,
        no_backing: false,
        no_lock: opts.no_lock,
    };
    let file = super::open_file(&path, &bopts).map_err(|e| match e {
        Error::Open { path: p, source } => fmt_err(
            image,
            format!(
                "Could not open backing file: Could not open '{p}': {}",
                os_msg(&source)
            ),
        ),
        other => other,
    })?;
    let fmt = match h.backing_format.as_deref().and_then(Format::from_name) {
        Some(f) => f,
        None => super::probe_file(&file)?,
    };
    match fmt {
        Format::Raw => {
            let f = imago_file(&file, true, opts.cache_direct)?;
            let raw = imago::raw::Raw::builder(f)
                .write(false)
                .open(DenyImplicitOpenGate::default())?;
            Ok(Some(FormatAccess::new(raw)))
        }
        Format::Qcow2 => {
            let bh = Header::read(&file).map_err(|m| fmt_err(&path, m))?;
            let below = open_backing(&path, &bh, opts, depth + 1, seen)?;
            let f = imago_file(&file, true, opts.cache_direct)?;
            let q = imago::qcow2::Qcow2::<imago::file::File>::builder(f)
                .write(false)
                .backing(below)
                .open(DenyImplicitOpenGate::default())
                .map_err(|e| fmt_err(&path, e.to_string()))?;
            Ok(Some(FormatAccess::new(q)))
        }
    }
}

/// Before writing: the header, refcount table, L1 table and refcount
/// blocks must have a refcount, else allocating would hand their clusters
/// out (QEMU refuses such writes as "invalid write on metadata" and marks
/// the image corrupt; imago would recurse without end when the header
/// cluster looks free). Reads only the refcount blocks covering them.
fn metadata_counted(f: &File, h: &Header) -> std::result::Result<(), String> {
    let cs = h.cluster_size();
    let n = h.refcount_table_clusters as u64 * cs / 8;
    if n * 8 > meta::MAX_REFTABLE_BYTES {
        return Err("Refcount table too large".into());
    }
    let table = meta::read_table(f, h.refcount_table_offset, n).map_err(|e| os_msg(&e))?;
    let rb_bits = h.cluster_bits + 3 - h.refcount_order;
    let mut block = vec![0u8; cs as usize];
    let mut loaded = None;
    let mut refcount = |c: u64| -> std::result::Result<u64, String> {
        let k = (c >> rb_bits) as usize;
        let off = table.get(k).map_or(0, |e| e & meta::REFT_OFFSET_MASK);
        if off == 0 || off % cs != 0 {
            return Ok(0);
        }
        if loaded != Some(off) {
            crate::image::raw::pread_full(f, &mut block, off).map_err(|e| os_msg(&e))?;
            loaded = Some(off);
        }
        Ok(meta::refblock_get(
            &block,
            h.refcount_order,
            c & ((1 << rb_bits) - 1),
        ))
    };
    let mut need = vec![("header", 0u64, 1u64)];
    need.push((
        "refcount table",
        h.refcount_table_offset / cs,
        (n * 8).div_ceil(cs),
    ));
    if h.l1_size > 0 {
        need.push((
            "L1 table",
            h.l1_table_offset / cs,
            (h.l1_size as u64 * 8).div_ceil(cs),
        ));
    }
    for e in &table {
        let off = e & meta::REFT_OFFSET_MASK;
        if off != 0 {
            need.push(("refcount block", off / cs, 1));
        }
    }
    for (what, first, count) in need {
        for c in first..first + count.min(1 << 20) {
            if refcount(c)? == 0 {
                return Err(format!(
                    "qcow2: The {what} in cluster {c} has no refcount; the image needs repair (vimg check -r all)"
                ));
            }
        }
    }
    Ok(())
}

/// The OS part of an io::Error, like strerror (without "(os error N)").
pub fn os_msg(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let s = std::io::Error::from_raw_os_error(code).to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        None => e.to_string(),
    }
}

impl Qcow2Device {
    /// Open a qcow2 image from an already opened (and locked) file.
    pub fn open_file(path: &Path, file: File, opts: &OpenOptions, depth: usize) -> Result<Self> {
        let header = Header::read(&file).map_err(|m| fmt_err(path, m))?;
        if header.corrupt() && !opts.read_only {
            return Err(fmt_err(
                path,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        if header.dirty() && !opts.read_only {
            // Like QEMU: an image left dirty (lazy refcounts) gets its
            // refcounts rebuilt on the first read-write open.
            check::check(&file, check::Fix::ALL, &mut |_| {}).map_err(|e| fmt_err(path, e))?;
        }
        let header = Header::read(&file).map_err(|m| fmt_err(path, m))?;
        if !opts.read_only {
            metadata_counted(&file, &header).map_err(|m| fmt_err(path, m))?;
        }
        if header.incompatible & (meta::INCOMPAT_EXTL2 | meta::INCOMPAT_DATA_FILE) != 0 {
            return Err(fmt_err(
                path,
                "extended L2 entries and external data files are not supported by this version",
            ));
        }
        if header.crypt_method != 0 {
            return Err(fmt_err(path, "encrypted images are not supported"));
        }
        let mut seen = vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())];
        let backing = open_backing(path, &header, opts, depth + 1, &mut seen)?;
        let f = imago_file(&file, opts.read_only, opts.cache_direct)?;
        let q = imago::qcow2::Qcow2::<imago::file::File>::builder(f)
            .write(!opts.read_only)
            .backing(backing)
            .open(DenyImplicitOpenGate::default())
            .map_err(|e| fmt_err(path, e.to_string()))?;
        let access = FormatAccess::new(q);
        let size = access.size();
        Ok(Qcow2Device {
            access: RwLock::new(access),
            header,
            file,
            read_only: opts.read_only,
            size: AtomicU64::new(size),
        })
    }

    /// The header as read at open time.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Grow (with a preallocation mode) or shrink the virtual size.
    pub fn resize(&self, new_size: u64, prealloc: PreallocateMode) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut a = self.access.write().unwrap_or_else(|e| e.into_inner());
        let old = a.size();
        if new_size >= old {
            a.resize_grow(new_size, prealloc)?;
        } else {
            a.resize_shrink(new_size)?;
        }
        a.flush()?;
        self.size.store(a.size(), Ordering::SeqCst);
        Ok(())
    }

    fn acc(&self) -> std::sync::RwLockReadGuard<'_, Access> {
        self.access.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockDevice for Qcow2Device {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        Ok(self.acc().read(buf, offset)?)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size())?;
        Ok(self.acc().write(buf, offset)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        Ok(self.acc().write_zeroes(offset, len)?)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        let mut a = self.access.write().unwrap_or_else(|e| e.into_inner());
        Ok(a.discard_to_any(offset, len)?)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let a = self.acc();
        a.flush()?;
        Ok(a.sync()?)
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn mapping(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64)> {
        let size = self.size();
        if offset >= size {
            return Ok((Allocation::Zero { allocated: false }, 0));
        }
        let max_len = max_len.min(size - offset);
        let a = self.acc();
        let (m, len) = a.get_shallow_mapping(offset, max_len)?;
        let len = len.clamp(1, max_len);
        let alloc = match m {
            ShallowMapping::Raw { offset, .. } => Allocation::Data {
                offset: Some(offset),
            },
            ShallowMapping::Indirect { .. } => Allocation::Unallocated,
            ShallowMapping::Zero { explicit, .. } => {
                if explicit {
                    Allocation::Zero { allocated: true }
                } else {
                    Allocation::Unallocated
                }
            }
            ShallowMapping::Special { .. } => Allocation::Compressed,
            _ => Allocation::Unallocated,
        };
        Ok((alloc, len))
    }
}
