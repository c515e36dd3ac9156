//! Opening images for `cache=none`/`directsync` (O_DIRECT), owned by the
//! disks code.
//!
//! [`super::open`] with `cache_direct` opens the file with O_DIRECT from the
//! start, and the qcow2 header parser reads into unaligned buffers, which
//! O_DIRECT refuses (EINVAL). [`open_direct`] instead:
//! - raw: opens the file with the page cache, then switches the open file
//!   description to O_DIRECT (`fcntl(F_SETFL)`); the callers (virtio-blk)
//!   use page-aligned buffers and 512-byte aligned offsets;
//! - qcow2: opens and checks the image once through [`super::open`] (header
//!   validation, dirty-image repair), closes it, and reopens the file with
//!   O_DIRECT under imago directly, which probes and honours the direct-I/O
//!   alignments for its metadata and data.
//!
//! Limitation: a qcow2 image with a backing file cannot be opened with
//! O_DIRECT yet (its backing chain goes through the buffered path).

use std::os::fd::AsRawFd;
use std::path::Path;

use std::os::unix::fs::OpenOptionsExt;

use imago::{FormatDriverBuilder, ShallowMapping};

use super::{
    check_range, open_file, probe_file, qcow2, raw, Allocation, BlockDevice, Error, Format,
    OpenOptions, Result,
};

/// Set O_DIRECT on an open file.
pub fn set_direct(f: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: fcntl on a valid descriptor with integer arguments.
    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Open an image like [`super::open`], bypassing the host page cache for
/// its data (`opts.cache_direct` is implied).
pub fn open_direct(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let buffered = OpenOptions {
        cache_direct: false,
        ..opts.clone()
    };
    let file = open_file(path, &buffered)?;
    let format = match opts.format {
        Some(f) => f,
        None => probe_file(&file)?,
    };
    let direct_err = |e: std::io::Error| Error::Open {
        path: path.display().to_string(),
        source: e,
    };
    match format {
        Format::Raw => {
            set_direct(&file).map_err(direct_err)?;
            Ok(Box::new(raw::RawDevice::from_file(file, opts.read_only)?))
        }
        Format::Qcow2 => {
            let dev = qcow2::Qcow2Device::open_file(path, file, &buffered, 0)?;
            if dev.header().backing_file.is_some() {
                return Err(Error::Format {
                    path: path.display().to_string(),
                    msg: "cache=none/directsync on a qcow2 image with a backing file is not \
                          supported yet; use cache=writeback"
                        .into(),
                });
            }
            // Keep the lock while reopening: take a second descriptor first.
            let direct = std::fs::OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .map_err(direct_err)?;
            let sopts = imago::StorageOpenOptions::new()
                .write(!opts.read_only)
                .direct(true);
            let f = imago::file::File::from_open_file(direct, sopts)?;
            let q = imago::qcow2::Qcow2::<imago::file::File>::builder(f)
                .write(!opts.read_only)
                .open(imago::DenyImplicitOpenGate::default())
                .map_err(|e| Error::Format {
                    path: path.display().to_string(),
                    msg: e.to_string(),
                })?;
            let access = imago::FormatAccess::new(q);
            Ok(Box::new(DirectQcow2 {
                size: access.size(),
                access: std::sync::RwLock::new(access),
                read_only: opts.read_only,
                _locked: dev,
            }))
        }
    }
}

/// A qcow2 image on an O_DIRECT descriptor, served by imago. `_locked` is
/// the buffered device that holds QEMU's lock bytes (and is not used for
/// I/O).
struct DirectQcow2 {
    access: std::sync::RwLock<imago::FormatAccess<imago::file::File>>,
    size: u64,
    read_only: bool,
    _locked: qcow2::Qcow2Device,
}

impl DirectQcow2 {
    fn acc(&self) -> std::sync::RwLockReadGuard<'_, imago::FormatAccess<imago::file::File>> {
        self.access.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockDevice for DirectQcow2 {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        Ok(self.acc().read(buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        Ok(self.acc().write(buf, offset)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        Ok(self.acc().write_zeroes(offset, len)?)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
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
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn mapping(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64)> {
        if offset >= self.size {
            return Ok((Allocation::Zero { allocated: false }, 0));
        }
        let max_len = max_len.min(self.size - offset);
        let a = self.acc();
        let (m, len) = a.get_shallow_mapping(offset, max_len)?;
        let alloc = match m {
            ShallowMapping::Raw { offset, .. } => Allocation::Data {
                offset: Some(offset),
            },
            ShallowMapping::Zero { explicit: true, .. } => Allocation::Zero { allocated: true },
            ShallowMapping::Special { .. } => Allocation::Compressed,
            _ => Allocation::Unallocated,
        };
        Ok((alloc, len.clamp(1, max_len)))
    }
}

impl Drop for DirectQcow2 {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.acc().flush();
        }
    }
}
