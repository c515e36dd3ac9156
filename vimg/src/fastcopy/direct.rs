//! Asynchronous `O_DIRECT` writes of copy jobs, beside the buffered copier.
//!
//! Buffered writes only run at memory speed until the kernel's dirty-page
//! limit: past it (about 2 GiB of dirty pages on a 24 GiB machine) the
//! writer is throttled to the speed of background writeback, which is
//! far below the disk's. So while one thread copies through the page
//! cache, another takes jobs from the same queue, reads their source into
//! page-aligned buffers and writes them to the target with `O_DIRECT`
//! through io_uring, a few in flight: the disk works from the start, the
//! page cache holds less dirty data, and each path takes as many jobs as
//! it can do. Asynchronous submission matters: a synchronous direct write
//! holds the inode lock shared for the whole transfer and starves the
//! buffered writer, which needs it exclusive.
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

/// Direct writes in flight at most.
const RING: usize = 64;

/// One direct write in flight: its buffer, where in it, how many bytes,
/// and where in the target.
#[derive(Clone, Copy)]
struct Write {
    slot: usize,
    at: usize,
    len: usize,
    dst_off: u64,
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
    /// Writes in flight per buffer; a buffer is free at 0.
    pending: Vec<usize>,
    free: Vec<usize>,
    writes: Vec<Option<Write>>,
    free_writes: Vec<usize>,
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
        let ring = IoUring::new(RING as u32).ok()?;
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
            pending: vec![0; DEPTH],
            free: (0..DEPTH).collect(),
            writes: vec![None; RING],
            free_writes: (0..RING).collect(),
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

    /// Do job `j`: read its source into a buffer and write it directly
    /// (asynchronously) where it is aligned, else buffered, here. Errors
    /// carry a target offset.
    pub(super) fn copy(&mut self, j: Job) -> Result<(), (u64, std::io::Error)> {
        if self.off || j.dst != self.dst || j.len == 0 || j.len > super::JOB_MAX {
            return self.buffered.copy(j);
        }
        self.ready()?;
        let Some(slot) = self.free.pop() else {
            return self.buffered.copy(j);
        };
        // Held while this job fills and queues the buffer: completions
        // reaped meanwhile must not free it.
        self.pending[slot] += 1;
        let r = self.fill(slot, j);
        self.pending[slot] -= 1;
        self.settle(slot);
        if self.ring.submit().is_err() {
            self.off = true;
        }
        r
    }

    fn fill(&mut self, slot: usize, j: Job) -> Result<(), (u64, std::io::Error)> {
        let n = j.len as usize;
        let src = borrow(j.src);
        let buf = &mut self.bufs[slot].bytes_mut()[..n];
        let got = super::read_full_at(&src, buf, j.src_off).map_err(|e| (j.dst_off, e))?;
        // A source that ended early (shrunk under -U): the rest of the
        // fresh target reads as zeroes either way.
        buf[got..].fill(0);
        let w = Write {
            slot,
            at: 0,
            len: n,
            dst_off: j.dst_off,
        };
        let aligned = w.dst_off % self.align == 0 && w.len as u64 % self.align == 0;
        if !self.off && aligned && self.push(w)? {
            return Ok(());
        }
        // Unaligned (a run of sub-page blocks, an unaligned end):
        // buffered, from the same buffer.
        let dst = borrow(self.dst);
        write_all_at(&dst, self.bufs[slot].bytes(0, n), w.dst_off)
    }

    /// A buffer whose writes are all done goes back to the free list.
    fn settle(&mut self, slot: usize) {
        if self.pending[slot] == 0 && !self.free.contains(&slot) {
            self.free.push(slot);
        }
    }

    /// Queue direct write `w`; false if it cannot go that way.
    fn push(&mut self, w: Write) -> Result<bool, (u64, std::io::Error)> {
        while self.free_writes.is_empty() {
            self.reap(1)?;
        }
        if self.off {
            return Ok(false);
        }
        let Some(id) = self.free_writes.pop() else {
            return Ok(false);
        };
        let ptr = self.bufs[w.slot].bytes(w.at, w.len).as_ptr();
        let sqe = opcode::Write::new(types::Fd(self.file.as_raw_fd()), ptr, w.len as u32)
            .offset(w.dst_off)
            .build()
            .user_data(id as u64);
        // SAFETY: the buffer stays allocated and unwritten by us until
        // this write's completion is reaped (its pending count keeps it off
        // the free list; the buffers are dropped only after every write in
        // flight completed), and the descriptor stays open as long as the
        // ring.
        let mut pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok();
        if !pushed && self.ring.submit().is_ok() {
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok();
        }
        if !pushed {
            self.free_writes.push(id);
            self.off = true;
            return Ok(false);
        }
        self.writes[id] = Some(w);
        self.pending[w.slot] += 1;
        Ok(true)
    }

    /// Wait until at least `want` writes completed (fewer if fewer are in
    /// flight) and settle them: failed or short writes are finished
    /// buffered and turn the direct path off.
    fn reap(&mut self, want: usize) -> Result<(), (u64, std::io::Error)> {
        let inflight = RING - self.free_writes.len();
        let want = want.min(inflight);
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
        for (id, res) in done {
            let Some(w) = self.writes.get_mut(id).and_then(Option::take) else {
                continue;
            };
            self.free_writes.push(id);
            let wrote = (res.max(0) as usize).min(w.len);
            let mut result = Ok(());
            if wrote < w.len {
                self.off = true;
                let dst = borrow(self.dst);
                let b = self.bufs[w.slot].bytes(w.at + wrote, w.len - wrote);
                result = write_all_at(&dst, b, w.dst_off + wrote as u64);
            }
            self.pending[w.slot] -= 1;
            self.settle(w.slot);
            result?;
        }
        Ok(())
    }

    /// Wait for every write in flight.
    pub(super) fn drain(&mut self) -> Result<(), (u64, std::io::Error)> {
        while self.free_writes.len() < RING {
            self.reap(RING)?;
        }
        Ok(())
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        // The kernel may still read the buffers: wait for it first.
        if self.drain().is_err() {
            // Cannot wait: leak the buffers rather than free memory the
            // kernel may still read.
            for b in std::mem::take(&mut self.bufs) {
                std::mem::forget(b);
            }
        }
    }
}
