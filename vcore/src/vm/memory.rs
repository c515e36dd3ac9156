//! Guest RAM: anonymous memory, or a file on hugetlbfs (`-mem-path`), or a
//! memfd, optionally preallocated, mapped into KVM slots around the 32-bit
//! MMIO hole.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::boot::layout::ram_ranges;

/// Where guest RAM comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (the default).
    #[default]
    Anonymous,
    /// A file created and unlinked in a directory (hugetlbfs for
    /// `-mem-path`), or an existing file, mapped shared.
    Path(PathBuf),
    /// A memfd, with hugetlb pages when asked.
    Memfd { hugetlb: bool },
}

/// Errors from creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("could not create guest memory file in '{path}': {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not size guest memory file '{path}' to {size} bytes: {source}")]
    Truncate {
        path: PathBuf,
        size: u64,
        source: std::io::Error,
    },
    #[error("could not map {size} bytes of guest memory: {source}")]
    Map { size: u64, source: std::io::Error },
    #[error("could not preallocate guest memory: {0}")]
    Prealloc(std::io::Error),
    #[error("guest memory layout: {0}")]
    Layout(String),
}

fn backing_file(backing: &Backing, size: u64) -> Result<Option<File>, MemoryError> {
    match backing {
        Backing::Anonymous => Ok(None),
        Backing::Path(p) => {
            let file = if p.is_dir() {
                // As QEMU: a temporary file in the directory, unlinked at once.
                tempfile::tempfile_in(p).map_err(|source| MemoryError::CreateFile {
                    path: p.clone(),
                    source,
                })?
            } else {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(p)
                    .map_err(|source| MemoryError::CreateFile {
                        path: p.clone(),
                        source,
                    })?
            };
            file.set_len(size).map_err(|source| MemoryError::Truncate {
                path: p.clone(),
                size,
                source,
            })?;
            Ok(Some(file))
        }
        Backing::Memfd { hugetlb } => {
            let mut flags = libc::MFD_CLOEXEC;
            if *hugetlb {
                flags |= libc::MFD_HUGETLB;
            }
            // SAFETY: the name is a valid NUL-terminated string and the
            // returned fd (checked below) is owned by the File we build.
            let fd = unsafe { libc::memfd_create(c"vmrun-guest-ram".as_ptr(), flags) };
            if fd < 0 {
                let path = PathBuf::from("memfd:vmrun-guest-ram");
                return Err(MemoryError::CreateFile {
                    path,
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
            let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            file.set_len(size).map_err(|source| MemoryError::Truncate {
                path: PathBuf::from("memfd:vmrun-guest-ram"),
                size,
                source,
            })?;
            Ok(Some(file))
        }
    }
}

/// Touch every page of `[ptr, ptr + len)` for writing, with `threads`
/// threads, the way QEMU's `-mem-prealloc` does.
fn prealloc(ptr: usize, len: usize, threads: usize) -> Result<(), MemoryError> {
    const MADV_POPULATE_WRITE: i32 = 23;
    let threads = threads.max(1);
    let chunk = len.div_ceil(threads).next_multiple_of(2 << 20);
    let results: Vec<std::io::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                s.spawn(move || {
                    let start = i * chunk;
                    if start >= len {
                        return Ok(());
                    }
                    let n = chunk.min(len - start);
                    // SAFETY: the range lies inside a mapping we own and
                    // MADV_POPULATE_WRITE only faults pages in.
                    let r =
                        unsafe { libc::madvise((ptr + start) as *mut _, n, MADV_POPULATE_WRITE) };
                    if r == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("thread")))
            })
            .collect()
    });
    results
        .into_iter()
        .collect::<std::io::Result<()>>()
        .map_err(MemoryError::Prealloc)
}

/// Create guest RAM of `size` bytes.
pub fn create(
    size: u64,
    backing: &Backing,
    prealloc_pages: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let file = backing_file(backing, size)?.map(Arc::new);
    let mut regions = Vec::new();
    let mut file_off = 0u64;
    for (base, len) in ram_ranges(size) {
        let mut b =
            MmapRegionBuilder::new(len as usize).with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
        b = match &file {
            None => {
                b.with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            }
            Some(f) => b
                .with_mmap_flags(libc::MAP_SHARED)
                .with_file_offset(FileOffset::from_arc(f.clone(), file_off)),
        };
        let region = b.build().map_err(|e| MemoryError::Map {
            size: len,
            source: std::io::Error::other(e.to_string()),
        })?;
        if file.is_none() {
            // As QEMU does: let the kernel back anonymous guest RAM with
            // transparent hugepages (fewer faults, shorter prealloc, fewer
            // TLB misses in the guest). Advice only: failure is harmless.
            // SAFETY: the range is the mapping we just created.
            unsafe { libc::madvise(region.as_ptr().cast(), len as usize, libc::MADV_HUGEPAGE) };
        }
        if prealloc_pages {
            prealloc(
                region.as_ptr() as usize,
                len as usize,
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
                    .min(16),
            )?;
        }
        let r = GuestRegionMmap::new(region, GuestAddress(base))
            .ok_or_else(|| MemoryError::Layout(format!("region at {base:#x} overflows")))?;
        regions.push(r);
        file_off += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

/// The path used for a `Backing::Path`, for messages.
pub fn describe(backing: &Backing) -> String {
    match backing {
        Backing::Anonymous => "anonymous".into(),
        Backing::Path(p) => format!("file in {}", p.display()),
        Backing::Memfd { hugetlb: true } => "memfd (hugetlb)".into(),
        Backing::Memfd { hugetlb: false } => "memfd".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn anonymous_and_file_backed() {
        let m = create(64 << 20, &Backing::Anonymous, false).unwrap();
        m.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let dir = tempfile::tempdir().unwrap();
        let m = create(8 << 20, &Backing::Path(dir.path().into()), true).unwrap();
        m.write_obj(7u8, GuestAddress((8 << 20) - 1)).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "file is unlinked"
        );
        let m = create(4 << 20, &Backing::Memfd { hugetlb: false }, true).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(5)).unwrap(), 0);
    }
}
