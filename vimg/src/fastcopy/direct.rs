//! Asynchronous `O_DIRECT` writes of copy jobs, beside the buffered copier.
//!
//! Buffered writes run at memory speed only while the page cache takes
//! them: past the kernel's dirty limit the writer is throttled to the
//! speed of background writeback, and on this kvm_pvm host page allocation
//! itself gets slow once freed memory went back to the hypervisor
//! (measured: 3.5–4 GB/s, then 0.35–0.45 GB/s). A second copier takes
//! jobs from the same queue (see [`super::Pool`]) and writes them to the
//! target with `O_DIRECT` through io_uring, a few in flight, so that the
//! disk adds its bandwidth. A write reads straight from a mapping of the
//! source where the source offset is aligned too: the kernel takes the
//! source's pages and the CPU copies nothing (a 4 GiB `-t none` convert
//! took 0.2–0.35 s of CPU instead of 0.7–0.85 s through a buffer); else
//! from a page-aligned buffer the source is read into. Asynchronous
//! submission matters: a synchronous direct write holds the inode lock
//! shared for the whole transfer and starves the buffered writer, which
//! needs it exclusive.
//!
//! Only jobs whose target offset and length are multiples of the page size
//! (and of the file system's direct I/O alignment) go this way, so no page
//! holds both directly and buffered written bytes. Anything else, and
//! everything once a direct write has failed, is copied buffered.

use super::{borrow, write_all_at, Buffered, Job};
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Jobs in flight at once (each a buffer of [`super::JOB_MAX`] bytes).
const DEPTH: usize = 4;

/// A zeroed, page-aligned heap buffer.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain owned memory; it is only accessed through
// &mut self (or by the kernel while a write is in flight, during which the
// owner does not touch it).
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Option<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len, align).ok()?;
        if layout.size() == 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(AlignedBuf { ptr, layout })
    }

    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialized bytes owned by
        // self; the slice is bounds-checked below against that size.
        let all = unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) };
        &all[at..at + len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialized (zeroed) bytes
        // owned by self; the &mut borrow is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The direct I/O alignment of the file behind `fd` (offsets, lengths and
/// memory), at least a page; `None` if its file system does no direct I/O.
fn dio_align(fd: RawFd) -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    // SAFETY: statx zeroed is a valid (empty) value of a plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on an open descriptor (empty path, AT_EMPTY_PATH)
    // writing into our own struct.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        // Older kernels do not tell: try a page; a refused write turns the
        // direct path off.
        return Some(page);
    }
    if stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(
        page.max(u64::from(stx.stx_dio_offset_align))
            .max(u64::from(stx.stx_dio_mem_align)),
    )
}

/// The direct writer of one target file.
pub(super) struct Direct {
    /// The target opened anew with `O_DIRECT`.
    file: File,
    /// The target as the jobs name it (open without `O_DIRECT`).
    dst: RawFd,
    align: u64,
    ring: IoUring,
    bufs: Vec<AlignedBuf>,
    /// The job whose write from each buffer is in flight.
    inflight: Vec<Option<Job>>,
    /// The source mapping a write in flight reads from, by buffer.
    maps: Vec<Option<super::Mapped>>,
    free: Vec<usize>,
    /// Set after a direct write failed: the rest goes buffered.
    off: bool,
    buffered: Buffered,
}

impl Direct {
    /// A direct writer for the target `dst`, or `None` where direct I/O or
    /// io_uring is not available (then everything is copied buffered).
    pub(super) fn open(dst: RawFd) -> Option<Direct> {
        let align = dio_align(dst)?;
        let path = std::ffi::CString::new(format!("/proc/self/fd/{dst}")).ok()?;
        // SAFETY: opening a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_WRONLY | libc::O_DIRECT | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd is a descriptor we just opened and own alone.
        let file = unsafe { File::from_raw_fd(fd) };
        let ring = IoUring::new(DEPTH as u32).ok()?;
        let mut bufs = Vec::with_capacity(DEPTH);
        for _ in 0..DEPTH {
            bufs.push(AlignedBuf::new(super::JOB_MAX as usize, align as usize)?);
        }
        Some(Direct {
            file,
            dst,
            align,
            ring,
            bufs,
            inflight: vec![None; DEPTH],
            maps: (0..DEPTH).map(|_| None).collect(),
            free: (0..DEPTH).collect(),
            off: false,
            buffered: Buffered::new(),
        })
    }

    /// Wait until a buffer is free, so that the next job can start at
    /// once (while the disk is busy, the buffered copier takes the jobs).
    pub(super) fn ready(&mut self) -> Result<(), (u64, std::io::Error)> {
        while self.free.is_empty() {
            self.reap(1)?;
        }
        Ok(())
    }

    /// Do job `j`: read its source into a buffer and write it directly,
    /// asynchronously, if its target offset and length are aligned; else
    /// copy it buffered, here. Errors carry a target offset.
    pub(super) fn copy(&mut self, j: Job) -> Result<(), (u64, std::io::Error)> {
        let fits = j.dst == self.dst
            && j.len > 0
            && j.len <= super::JOB_MAX
            && j.dst_off % self.align == 0
            && j.len % self.align == 0;
        if self.off || !fits {
            return self.buffered.copy(j);
        }
        self.ready()?;
        let Some(slot) = self.free.pop() else {
            return self.buffered.copy(j);
        };
        let n = j.len as usize;
        // Where the source is aligned too, the write reads the source's
        // pages through a mapping: the CPU copies nothing (a source page
        // that is gone fails the write, which is then finished buffered).
        // Else the source is read into the buffer first.
        let map = (j.src_off % self.align == 0)
            .then(|| super::Mapped::whole(&borrow(j.src), j.src_off, j.len))
            .flatten();
        let data = match &map {
            Some(m) => m.bytes().as_ptr(),
            None => {
                let buf = &mut self.bufs[slot].bytes_mut()[..n];
                let got = match super::read_full_at(&borrow(j.src), buf, j.src_off) {
                    Ok(got) => got,
                    Err(e) => {
                        self.free.push(slot);
                        return Err((j.dst_off, e));
                    }
                };
                // A source that ended early (shrunk under -U): the rest of
                // the fresh target reads as zeroes either way.
                buf[got..].fill(0);
                buf.as_ptr()
            }
        };
        let sqe = opcode::Write::new(types::Fd(self.file.as_raw_fd()), data, n as u32)
            .offset(j.dst_off)
            .build()
            .user_data(slot as u64);
        // SAFETY: the data (the slot's buffer, or the source mapping kept
        // in `maps[slot]`) stays allocated and unwritten by us until this
        // write's completion is reaped (the slot is off the free list until
        // then; buffers and mappings are dropped only after every write in
        // flight completed), and the descriptor stays open as long as the
        // ring.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // Cannot happen (one entry per buffer); stay correct anyway.
            self.off = true;
            self.free.push(slot);
            return match map {
                Some(_) => self.buffered.copy(j),
                None => write_all_at(&borrow(self.dst), self.bufs[slot].bytes(0, n), j.dst_off),
            };
        }
        self.maps[slot] = map;
        self.inflight[slot] = Some(j);
        // A failed submission leaves the entry queued: the next wait
        // submits it, or reports the error.
        let _ = self.ring.submit();
        Ok(())
    }

    /// Writes in flight.
    fn busy(&self) -> usize {
        self.inflight.iter().filter(|j| j.is_some()).count()
    }

    /// Wait until at least `want` writes completed (fewer if fewer are in
    /// flight) and settle them: a failed or short write is finished
    /// buffered and turns the direct path off.
    fn reap(&mut self, want: usize) -> Result<(), (u64, std::io::Error)> {
        let want = want.min(self.busy());
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err((0, e)),
            }
        }
        let done: Vec<(usize, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        let mut result = Ok(());
        for (slot, res) in done {
            let Some(j) = self.inflight.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            let wrote = (res.max(0) as u64).min(j.len);
            let map = self.maps[slot].take();
            if wrote < j.len {
                self.off = true;
                let r = match map {
                    Some(_) => self.buffered.copy(Job {
                        src_off: j.src_off + wrote,
                        dst_off: j.dst_off + wrote,
                        len: j.len - wrote,
                        ..j
                    }),
                    None => write_all_at(
                        &borrow(self.dst),
                        self.bufs[slot].bytes(wrote as usize, (j.len - wrote) as usize),
                        j.dst_off + wrote,
                    ),
                };
                if result.is_ok() {
                    result = r;
                }
            }
            self.free.push(slot);
        }
        result
    }

    /// Wait for every write in flight.
    pub(super) fn drain(&mut self) -> Result<(), (u64, std::io::Error)> {
        while self.busy() > 0 {
            self.reap(DEPTH)?;
        }
        Ok(())
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        // The kernel may still read the buffers and mappings: wait for it
        // first.
        if self.drain().is_err() {
            // Cannot wait: leak them rather than free memory the kernel may
            // still read.
            std::mem::forget(std::mem::take(&mut self.bufs));
            std::mem::forget(std::mem::take(&mut self.maps));
        }
    }
}
