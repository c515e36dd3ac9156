//! Raw images: the file is the disk. Positional I/O (`pread`/`pwrite`) on a
//! shared descriptor, holes via `fallocate`, mapping via `SEEK_DATA`/`SEEK_HOLE`.
//!
//! Like QEMU, the virtual size is the file length rounded up to 512 bytes;
//! the tail past the end of the file reads as zeroes.

use super::{check_range, Allocation, BlockDevice, Error, Format, Result};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A raw image file opened as a block device.
#[derive(Debug)]
pub struct RawDevice {
    file: File,
    read_only: bool,
    size: AtomicU64,
}

impl RawDevice {
    /// Wrap an open file.
    pub fn from_file(file: File, read_only: bool) -> Result<RawDevice> {
        let len = file.metadata()?.len();
        Ok(RawDevice {
            file,
            read_only,
            size: AtomicU64::new(len.next_multiple_of(512)),
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Change the file length (QEMU `resize` on raw: any byte size).
    pub fn truncate(&self, new_len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.file.set_len(new_len)?;
        self.size
            .store(new_len.next_multiple_of(512), Ordering::SeqCst);
        Ok(())
    }
}

/// Read fully at `offset`; bytes past EOF are zero.
pub(crate) fn pread_full(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `fallocate` wrapper.
pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid fd; integer arguments only.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Allocate `[offset, offset + len)` of `file` (`fallocate` mode 0; the
/// file grows to cover it).
pub fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, 0, offset, len)
}

/// Give `[offset, offset + len)` of `file` back to the file system (it reads
/// as zeroes; only whole blocks are freed, the rest is zeroed); the length
/// stays.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Write zeroes over `[offset, offset + len)` of `file` (allocated, written
/// data), a few MiB at a time.
pub fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zero = vec![0u8; (4u64 << 20).min(len) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zero.len() as u64) as usize;
        file.write_all_at(&zero[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// `lseek(SEEK_DATA / SEEK_HOLE)`; `None` on ENXIO (past the end).
pub(crate) fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: valid fd; integer arguments only.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

impl BlockDevice for RawDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        Ok(pread_full(&self.file, buf, offset)?)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size())?;
        Ok(self.file.write_all_at(buf, offset)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let flen = self.file.metadata()?.len();
        let end = (offset + len).min(flen);
        if offset >= end {
            return Ok(());
        }
        if punch_hole(&self.file, offset, end - offset).is_err() {
            write_zeros(&self.file, offset, end - offset)?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if !self.read_only {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn mapping(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64)> {
        let size = self.size();
        if offset >= size {
            return Ok((Allocation::Zero { allocated: true }, 0));
        }
        let max_len = max_len.min(size - offset);
        match seek(&self.file, offset, libc::SEEK_DATA)? {
            Some(d) if d == offset => {
                let h = seek(&self.file, offset, libc::SEEK_HOLE)?.unwrap_or(size);
                let h = if h >= self.file.metadata()?.len() {
                    size
                } else {
                    h
                };
                Ok((
                    Allocation::Data {
                        offset: Some(offset),
                    },
                    (h - offset).clamp(1, max_len),
                ))
            }
            Some(d) => Ok((
                Allocation::Zero { allocated: true },
                (d - offset).clamp(1, max_len),
            )),
            None => Ok((Allocation::Zero { allocated: true }, max_len)),
        }
    }
}
