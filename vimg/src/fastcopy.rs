//! Fast data path of `convert` into a fresh target: data extents of the
//! source (contiguous host ranges found through block status) are scanned
//! for zero blocks (in place through a mapping, or with `pread`; see
//! [`file_runs`]), and the non-zero runs are written at their final
//! offsets by two copiers that take jobs from one queue, each as fast as
//! it can: one through the page cache with `copy_file_range` (one copy,
//! inside the kernel, instead of `pread` + `pwrite`'s two), one with
//! asynchronous direct writes straight from the source's pages (no copy
//! by the CPU; see [`direct`]) once runs are large enough, so that memory
//! and disk bandwidth add up.
//! Buffered writes to one file are serialized by its inode lock, so one
//! thread copies buffered while other threads prepare the target ranges
//! ahead of it. Falls back to
//! `pread`/`pwrite` where `copy_file_range` is not supported (other file
//! systems on old kernels, block devices), and to the buffered copier
//! alone where direct I/O is not.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

mod direct;

/// Largest piece handed to one worker.
pub(crate) const JOB_MAX: u64 = 8 << 20;

/// Largest source window looked at at once (block status, mappings).
pub const WINDOW: u64 = 64 << 20;

/// Whether `b` is all zeroes (word-wise, vectorizable, early exit).
pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
    // the aligned middle part of the slice.
    let (head, mid, tail) = unsafe { b.align_to::<u64>() };
    if !head.iter().all(|&x| x == 0) || !tail.iter().all(|&x| x == 0) {
        return false;
    }
    // Data is usually told by its first word: one cache line touched per
    // block, not the four of the first 256-byte step (a 4 KiB-block scan
    // of 4 GiB misses the cache once per page).
    if mid.first().is_some_and(|&x| x != 0) {
        return false;
    }
    // OR 32 words (256 bytes) at a time: the compiler vectorizes the inner
    // fold; random data leaves after the first block.
    let mut it = mid.chunks_exact(32);
    for c in &mut it {
        if c.iter().fold(0u64, |a, &x| a | x) != 0 {
            return false;
        }
    }
    it.remainder().iter().all(|&x| x == 0)
}

/// Runs `[start, end)` of `[0, len)`, walked in blocks of `blk` bytes (the
/// last one may be short), made of blocks for which `keep(start, end)` is
/// true; adjacent kept blocks merge.
pub fn runs(
    len: usize,
    blk: usize,
    mut keep: impl FnMut(usize, usize) -> bool,
) -> Vec<(usize, usize)> {
    let blk = blk.max(1);
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < len {
        let e = (i + blk).min(len);
        if keep(i, e) {
            match out.last_mut() {
                Some(r) if r.1 == i => r.1 = e,
                _ => out.push((i, e)),
            }
        }
        i = e;
    }
    out
}

/// Runs of `data` made of blocks of `blk` bytes that are not all zeroes.
pub fn nonzero_runs(data: &[u8], blk: usize) -> Vec<(usize, usize)> {
    runs(data.len(), blk, |i, e| !is_zero(&data[i..e]))
}

/// Blocks from which on [`file_runs`] probes (a 64 KiB cluster of a raw
/// source scanned through a mapping cost 0.55 s per 4 GiB, probed 0.12 s).
const PROBED: usize = 32 << 10;

/// Bytes read first from each block of [`file_runs`]'s probing mode.
const PROBE: usize = 4096;

/// Read at `at` into `buf` until it is full or the file ends; the number
/// of bytes read.
fn read_full_at(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Whether the `n` bytes of `f` at `at` hold data: read a probe first,
/// then the rest, a buffer at a time, while all read is zero.
fn has_data(f: &File, at: u64, n: usize, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut done = 0;
    let mut step = PROBE.min(buf.len());
    while done < n {
        let k = (n - done).min(step);
        let got = read_full_at(f, &mut buf[..k], at + done as u64)?;
        if !is_zero(&buf[..got]) {
            return Ok(true);
        }
        if got < k {
            return Ok(false);
        }
        done += k;
        step = buf.len();
    }
    Ok(false)
}

/// [`nonzero_runs`] of the `len` bytes of `f` at `off`. Bytes past the
/// file's end count as zeroes and are not part of any run.
///
/// Blocks of [`PROBED`] bytes and more are probed with `pread`: data is
/// usually told by a block's first 4 KiB, and only blocks that start with
/// zeroes are read further. Smaller blocks (`-S 4k`, the default for raw
/// targets), with `map` (only for files locked against writers: a file
/// that shrinks under a mapping faults the reader), are scanned in place
/// through a read-only mapping: nothing is copied, and a data block is
/// told by its first bytes (reading them with `pread` took a third of a
/// 4 GiB convert's CPU time); else they are read 1 MiB at a time (a file
/// that shrinks meanwhile reads short).
pub fn file_runs(
    f: &File,
    off: u64,
    len: u64,
    blk: usize,
    map: bool,
    buf: &mut Vec<u8>,
) -> std::io::Result<Vec<(usize, usize)>> {
    let blk = blk.max(1);
    let len = len.min(f.metadata()?.len().saturating_sub(off));
    if map && blk < PROBED {
        if let Some(m) = Mapped::new(f, off, len) {
            // Read the whole range ahead at once (a cold file would
            // otherwise be read a fault's read-around at a time).
            m.advise(libc::MADV_WILLNEED);
            return Ok(nonzero_runs(m.bytes(), blk));
        }
    }
    if blk >= PROBED {
        buf.resize(64 << 10, 0);
        let mut err = None;
        let out = runs(len as usize, blk, |i, e| {
            err.is_none()
                && has_data(f, off + i as u64, e - i, buf).unwrap_or_else(|x| {
                    err = Some(x);
                    false
                })
        });
        return match err {
            Some(e) => Err(e),
            None => Ok(out),
        };
    }
    let step = ((1 << 20) / blk).max(1) * blk;
    buf.resize(step, 0);
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut at = 0usize;
    while (at as u64) < len {
        let k = (len - at as u64).min(step as u64) as usize;
        let got = read_full_at(f, &mut buf[..k], off + at as u64)?;
        for (a, b) in nonzero_runs(&buf[..got], blk) {
            match out.last_mut() {
                Some(r) if r.1 == at + a => r.1 = at + b,
                _ => out.push((at + a, at + b)),
            }
        }
        if got < k {
            break;
        }
        at += k;
    }
    Ok(out)
}

/// A read-only shared mapping of part of a file.
pub struct Mapped {
    base: *mut libc::c_void,
    map_len: usize,
    skip: usize,
    len: usize,
}

// SAFETY: the mapping is owned by the value and only read; moving it to
// another thread moves that ownership (munmap on drop is thread-agnostic).
unsafe impl Send for Mapped {}

impl Mapped {
    /// Map `[off, off + len)` of `f`, clamped to the file's current length
    /// (bytes past the end read as zeroes and are not part of the slice).
    /// `None` if the range is empty or the file cannot be mapped.
    pub fn new(f: &File, off: u64, len: u64) -> Option<Mapped> {
        let flen = f.metadata().ok()?.len();
        if off >= flen || len == 0 {
            return None;
        }
        let len = len.min(flen - off) as usize;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let start = off / page * page;
        let skip = (off - start) as usize;
        let map_len = skip + len;
        // SAFETY: a fresh read-only shared mapping of an open file; the
        // kernel picks the address; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                start as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        Some(Mapped {
            base,
            map_len,
            skip,
            len,
        })
    }

    /// [`Mapped::new`], but only if all of `[off, off + len)` lies inside
    /// the file.
    pub fn whole(f: &File, off: u64, len: u64) -> Option<Mapped> {
        Mapped::new(f, off, len).filter(|m| m.bytes().len() as u64 == len)
    }

    /// Tell the kernel how the mapping will be used (`madvise` advice; a
    /// hint only, errors are ignored).
    pub fn advise(&self, advice: libc::c_int) {
        // SAFETY: advice on exactly the mapping created in `new`.
        unsafe { libc::madvise(self.base, self.map_len, advice) };
    }

    /// The mapped bytes (from `off`).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is live for &self, readable, and covers
        // skip + len bytes, all inside the file at mapping time (the image
        // is locked against writers like qemu-img's).
        unsafe { std::slice::from_raw_parts((self.base as *const u8).add(self.skip), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no slice
        // borrowed from it outlives self.
        unsafe { libc::munmap(self.base, self.map_len) };
    }
}

/// One copy: `len` bytes from `src` at `src_off` to `dst` at `dst_off`.
#[derive(Clone, Copy)]
struct Job {
    src: RawFd,
    src_off: u64,
    dst: RawFd,
    dst_off: u64,
    len: u64,
}

/// The open file behind a job's descriptor, borrowed.
fn borrow(fd: RawFd) -> ManuallyDrop<File> {
    // SAFETY: jobs only name descriptors their pool's caller keeps open
    // until `Pool::finish` (the source and target files of the convert);
    // ManuallyDrop keeps this File from closing it.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// Write all of `b` to `f` at `at`; the target offset with an error.
fn write_all_at(f: &File, b: &[u8], at: u64) -> Result<(), (u64, std::io::Error)> {
    f.write_all_at(b, at).map_err(|e| (at, e))
}

/// Copy a range file to file. Bytes past the source's end are left
/// unwritten (the fresh target reads them as zeroes).
fn copy_range(j: Job, buf: &mut Vec<u8>, use_cfr: &mut bool) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < j.len && *use_cfr {
        let mut so = (j.src_off + done) as libc::loff_t;
        let mut d_o = (j.dst_off + done) as libc::loff_t;
        // SAFETY: both descriptors stay open for the whole convert (their
        // owners outlive the worker scope); the offsets are our own locals.
        let r = unsafe {
            libc::copy_file_range(j.src, &mut so, j.dst, &mut d_o, (j.len - done) as usize, 0)
        };
        if r > 0 {
            done += r as u64;
        } else if r == 0 {
            return Ok(());
        } else {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(
                    libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF,
                ) => {
                    *use_cfr = false;
                }
                _ => return Err(e),
            }
        }
    }
    if done < j.len && buf.len() < 1 << 20 {
        buf.resize(1 << 20, 0);
    }
    let (src, dst) = (borrow(j.src), borrow(j.dst));
    while done < j.len {
        let n = ((j.len - done) as usize).min(buf.len());
        let got = read_full_at(&src, &mut buf[..n], j.src_off + done)?;
        dst.write_all_at(&buf[..got], j.dst_off + done)?;
        if got < n {
            return Ok(());
        }
        done += got as u64;
    }
    Ok(())
}

/// The buffered copier's state: its buffer and whether `copy_file_range`
/// works here.
struct Buffered {
    buf: Vec<u8>,
    use_cfr: bool,
}

impl Buffered {
    fn new() -> Buffered {
        Buffered {
            buf: Vec::new(),
            use_cfr: true,
        }
    }

    /// Do job `j` through the page cache. Errors carry a target offset.
    fn copy(&mut self, j: Job) -> Result<(), (u64, std::io::Error)> {
        copy_range(j, &mut self.buf, &mut self.use_cfr).map_err(|e| (j.dst_off, e))
    }
}

/// Bytes by which [`Pool`]'s preparers grow the target ahead of appended
/// jobs when direct writes are on (a direct write past the end of the
/// file would be synchronous and hold the inode lock exclusive).
const GROW_STEP: u64 = 1 << 30;

/// What the preparing threads share.
struct Prep {
    /// The direct copier is at work.
    direct: AtomicBool,
    /// Size the target was grown to.
    grown: Mutex<u64>,
}

impl Prep {
    /// Prepare the target for a job, here, so that the copiers only copy:
    ///
    /// - allocate the range with `fallocate` (one extent allocation
    ///   instead of delayed allocation page by page, as QEMU's qcow2 driver
    ///   does for new clusters; it saves the buffered copier a third of its
    ///   time: a 20 GiB image holding 512 MiB in 1 MiB pieces converted in
    ///   0.12–0.15 s instead of 0.17–0.20 s), unless the direct copier is
    ///   at work: `fallocate` waits for every direct write in flight,
    ///   holding the inode lock, so the copiers would stall behind it;
    /// - while the direct copier is at work, grow the file past the range by
    ///   [`GROW_STEP`] when needed (appended qcow2 data): a direct write
    ///   past the end of the file is synchronous and holds the inode lock
    ///   exclusive. The writer of the image cuts the file to its end when
    ///   it finishes.
    ///
    /// Errors (file systems without fallocate, block devices) only lose
    /// the optimization.
    ///
    /// Filling the range's page cache ahead (`readahead` of the unwritten
    /// range) was tried and dropped: it moves page allocation off the
    /// copier but zeroes every page once more, which measured slower on
    /// this host whenever freed pages were reused.
    fn prepare(&self, j: &Job) {
        let end = j.dst_off + j.len;
        let direct = self.direct.load(Ordering::Relaxed);
        if direct {
            if let Ok(mut grown) = self.grown.lock() {
                if end > *grown {
                    let to = end + GROW_STEP;
                    // SAFETY: plain syscall on an open descriptor with an
                    // integer argument.
                    if unsafe { libc::ftruncate(j.dst, to as libc::off_t) } == 0 {
                        *grown = to;
                    }
                }
            }
        }
        if !direct {
            // SAFETY: plain syscall on an open descriptor with integer
            // arguments.
            unsafe {
                libc::fallocate(
                    j.dst,
                    libc::FALLOC_FL_KEEP_SIZE,
                    j.dst_off as libc::off_t,
                    j.len as libc::off_t,
                )
            };
        }
    }
}

/// qemu-img's `-r`: target writes of at most `rate` bytes per second on
/// average (0: no limit). Each write waits until the bytes written before
/// it are due, so the first one goes at once.
pub struct Throttle {
    rate: u64,
    start: std::time::Instant,
    sent: u64,
}

impl Throttle {
    pub fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            start: std::time::Instant::now(),
            sent: 0,
        }
    }

    /// Wait until `n` more bytes may be written.
    pub fn wait(&mut self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let due = std::time::Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        if let Some(rest) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(rest);
        }
        self.sent += n;
    }
}

/// The first error of a pool: target offset and error.
type Failed = Arc<Mutex<Option<(u64, std::io::Error)>>>;

/// The next prepared job, shared by the copiers; `None` when all are done.
fn next(rx: &Mutex<Receiver<Job>>) -> Option<Job> {
    rx.lock().ok()?.recv().ok()
}

/// Keep the first error of a pool and make everyone stop.
fn record(failed: &AtomicBool, err: &Failed, e: (u64, std::io::Error)) {
    failed.store(true, Ordering::Relaxed);
    if let Ok(mut g) = err.lock() {
        g.get_or_insert(e);
    }
}

/// Copies into one target in two stages: `preparers` threads prepare the
/// target ranges (see [`Prep::prepare`]) and hand the jobs to two copiers,
/// which take the next job whenever they are ready for one: one copies
/// through the page cache ([`Buffered`]), the other writes directly
/// ([`direct`]), so that the disk adds its bandwidth to the page cache's.
/// The direct copier joins once a run of at least [`JOB_MAX`] bytes is
/// queued: for small runs its per-write costs (mapping, pinning, the
/// inode lock for block allocation, waiting for the disk at the end) are
/// not worth it, and until it works the preparers can `fallocate` ahead of
/// the buffered copier (see [`Prep::prepare`]). A 20 GiB image holding
/// 512 MiB in 1 MiB pieces: 0.12–0.13 s, against 0.17–0.20 s with the
/// direct copier at work from the start.
/// Buffered writes to one file are serialized by its inode lock, so more
/// buffered copiers would only spin on it (measured: 4 copiers used 40%
/// more CPU for the same wall time). Where direct I/O is not available
/// the buffered copier does all. The first error stops everything.
pub struct Pool<'s> {
    tx: Option<SyncSender<Job>>,
    /// `-r`: jobs are queued no faster than this allows.
    throttle: std::cell::RefCell<Throttle>,
    dst: RawFd,
    /// Starts the direct copier (see above); dropped when it has started
    /// or when no more jobs come.
    start_direct: std::cell::RefCell<Option<SyncSender<()>>>,
    workers: Vec<std::thread::ScopedJoinHandle<'s, ()>>,
    failed: Arc<AtomicBool>,
    err: Failed,
}

impl<'s> Pool<'s> {
    /// Start `preparers` preparing threads and the copiers of `dst` in
    /// `scope`. `dst` must stay open until [`Pool::finish`].
    /// With `direct_only` (`-t none`), every job goes to the direct copier
    /// (where direct I/O is available).
    /// Jobs are queued at most `rate` bytes per second (0: no limit).
    pub fn new<'e>(
        scope: &'s std::thread::Scope<'s, 'e>,
        dst: &File,
        preparers: usize,
        direct_only: bool,
        rate: u64,
    ) -> Pool<'s> {
        Pool::with_copiers(scope, dst, preparers, !direct_only, true, rate)
    }

    /// Wait until `n` more bytes may be written to the target (a write
    /// the caller does itself, under the same `-r` limit as the jobs).
    pub fn throttle(&self, n: u64) {
        self.throttle.borrow_mut().wait(n);
    }

    /// [`Pool::new`] with a choice of copiers: the buffered one, the
    /// direct one (where direct I/O is available), or both. With neither
    /// available, the buffered one.
    fn with_copiers<'e>(
        scope: &'s std::thread::Scope<'s, 'e>,
        dst: &File,
        preparers: usize,
        buffered: bool,
        direct: bool,
        rate: u64,
    ) -> Pool<'s> {
        let preparers = preparers.max(1);
        // Beside the buffered copier, the direct one is set up only when
        // it starts (see `start_direct`); alone, here, so that the
        // buffered copier can stand in where direct I/O is not available.
        let gated = buffered && direct;
        let dst_fd = dst.as_raw_fd();
        let dio = (direct && !gated)
            .then(|| direct::Direct::open(dst_fd))
            .flatten();
        let buffered = buffered || (!gated && dio.is_none());
        let prep = Arc::new(Prep {
            direct: AtomicBool::new(dio.is_some()),
            grown: Mutex::new(dst.metadata().map(|m| m.len()).unwrap_or(0)),
        });
        let (tx, rx) = sync_channel::<Job>(preparers * 2);
        let (ctx, crx) = sync_channel::<Job>(preparers * 2);
        let rx: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(rx));
        let failed = Arc::new(AtomicBool::new(false));
        let err: Failed = Arc::new(Mutex::new(None));
        let mut workers = Vec::new();
        for _ in 0..preparers {
            let (rx, ctx, prep, failed) = (rx.clone(), ctx.clone(), prep.clone(), failed.clone());
            workers.push(scope.spawn(move || {
                while let Some(job) = next(&rx) {
                    if !failed.load(Ordering::Relaxed) {
                        prep.prepare(&job);
                    }
                    if ctx.send(job).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(ctx);
        let crx = Arc::new(Mutex::new(crx));
        // Beside the buffered copier, the direct one waits for its start.
        let (start_tx, start_rx) = sync_channel::<()>(1);
        if buffered {
            let (crx, failed, err) = (crx.clone(), failed.clone(), err.clone());
            workers.push(scope.spawn(move || {
                let mut b = Buffered::new();
                while let Some(job) = next(&crx) {
                    if !failed.load(Ordering::Relaxed) {
                        if let Err(e) = b.copy(job) {
                            record(&failed, &err, e);
                        }
                    }
                }
            }));
        }
        if gated || dio.is_some() {
            let (failed, err) = (failed.clone(), err.clone());
            workers.push(scope.spawn(move || {
                let mut d = match dio {
                    Some(d) => d,
                    None => {
                        // Only small runs came (the buffered copier did
                        // all), or no direct I/O here (it does the rest).
                        if start_rx.recv().is_err() {
                            return;
                        }
                        let Some(d) = direct::Direct::open(dst_fd) else {
                            return;
                        };
                        prep.direct.store(true, Ordering::Relaxed);
                        d
                    }
                };
                loop {
                    // Take a job only with a buffer free for it (while the
                    // disk is busy, the buffered copier takes the jobs).
                    if let Err(e) = d.ready() {
                        record(&failed, &err, e);
                    }
                    let Some(job) = next(&crx) else { break };
                    if !failed.load(Ordering::Relaxed) {
                        if let Err(e) = d.copy(job) {
                            record(&failed, &err, e);
                        }
                    }
                }
                if let Err(e) = d.drain() {
                    record(&failed, &err, e);
                }
            }));
        }
        Pool {
            tx: Some(tx),
            throttle: std::cell::RefCell::new(Throttle::new(rate)),
            dst: dst_fd,
            start_direct: std::cell::RefCell::new(gated.then_some(start_tx)),
            workers,
            failed,
            err,
        }
    }

    /// Queue a copy of `len` bytes from `src` at `src_off` to the target
    /// at `dst_off` (split for the copiers). Returns the first error of an
    /// earlier copy (target offset, error), if any.
    pub fn copy(
        &self,
        src: &File,
        src_off: u64,
        dst_off: u64,
        len: u64,
    ) -> Result<(), (u64, std::io::Error)> {
        // Under a rate limit, jobs of 2 MiB (qemu-img's request size), so
        // that the limit holds within a file too.
        let step = if self.throttle.borrow().rate > 0 {
            2 << 20
        } else {
            JOB_MAX
        };
        if len >= JOB_MAX {
            if let Some(go) = self.start_direct.borrow_mut().take() {
                let _ = go.try_send(());
            }
        }
        let mut done = 0;
        while done < len {
            self.check()?;
            let n = (len - done).min(step);
            self.throttle(n);
            let job = Job {
                src: src.as_raw_fd(),
                src_off: src_off + done,
                dst: self.dst,
                dst_off: dst_off + done,
                len: n,
            };
            if let Some(tx) = &self.tx {
                if tx.send(job).is_err() {
                    break;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), (u64, std::io::Error)> {
        if self.failed.load(Ordering::Relaxed) {
            if let Ok(mut g) = self.err.lock() {
                if let Some(e) = g.take() {
                    return Err(e);
                }
            }
            return Err((0, std::io::Error::other("copy failed")));
        }
        Ok(())
    }

    /// Wait for all queued copies; the first error, if any.
    pub fn finish(mut self) -> Result<(), (u64, std::io::Error)> {
        self.tx = None;
        self.start_direct.borrow_mut().take();
        for w in std::mem::take(&mut self.workers) {
            let _ = w.join();
        }
        self.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(name: &str, data: &[u8]) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("vimg-fastcopy-{}-{name}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.write_all(data).unwrap();
        (p, f)
    }

    #[test]
    fn zero_detection_at_every_position() {
        let mut b = vec![0u8; 4096 + 13];
        assert!(is_zero(&b));
        assert!(is_zero(&b[3..]));
        assert!(is_zero(&[]));
        for i in [0, 1, 7, 8, 255, 256, 2048, 4095, 4096, 4108] {
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
            assert!(!is_zero(&b[..=i]), "{i}");
            assert!(is_zero(&b[i + 1..]), "{i}");
            b[i] = 0;
        }
    }

    #[test]
    fn runs_merge_and_keep_a_short_last_block() {
        let mut b = vec![0u8; 10 * 512 + 100];
        b[0] = 1;
        b[512 + 3] = 1;
        b[4 * 512] = 1;
        b[10 * 512 + 99] = 1;
        assert_eq!(
            nonzero_runs(&b, 512),
            vec![(0, 1024), (2048, 2560), (5120, 5220)]
        );
        assert_eq!(nonzero_runs(&b, 4096), vec![(0, 5220)]);
        assert!(nonzero_runs(&vec![0u8; 9000], 4096).is_empty());
    }

    #[test]
    fn file_runs_match_the_bytes_in_every_mode_and_stop_at_the_end() {
        // 40 blocks of 64 KiB: data at a block's start, at its very end
        // (past the probe), none, and a short data tail at EOF.
        let bs = 64 << 10;
        let mut data = vec![0u8; 40 * bs + 1000];
        data[0] = 1;
        data[3 * bs + bs - 1] = 2;
        data[4 * bs + 5000] = 3;
        data[20 * bs + 4096] = 4;
        data[40 * bs + 999] = 5;
        let (p, f) = tmp("runs", &data);
        let mut buf = Vec::new();
        for map in [false, true] {
            for blk in [bs, 32 << 10, 4096, 512] {
                let want = nonzero_runs(&data, blk);
                let runs = |off: usize, len: u64, buf: &mut Vec<u8>| {
                    file_runs(&f, off as u64, len, blk, map, buf).unwrap()
                };
                assert_eq!(runs(0, data.len() as u64, &mut buf), want);
                // Asked past the end: the same runs.
                assert_eq!(runs(0, 1 << 30, &mut buf), want);
                // From an offset.
                let want: Vec<_> = nonzero_runs(&data[bs..], blk);
                assert_eq!(runs(bs, (data.len() - bs) as u64, &mut buf), want);
            }
            assert!(file_runs(&f, 1 << 30, 4096, 4096, map, &mut buf)
                .unwrap()
                .is_empty());
        }
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn mapping_is_clamped_to_the_file_and_unaligned_offsets_work() {
        let data: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8).collect();
        let (p, f) = tmp("map", &data);
        let m = Mapped::new(&f, 4097, 100_000).unwrap();
        assert_eq!(m.bytes(), &data[4097..]);
        assert!(Mapped::new(&f, 10000, 10).is_none());
        drop(m);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn copies_with_copy_file_range_and_with_the_fallback() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let (ps, src) = tmp("src", &data);
        for cfr in [true, false] {
            let (pd, dst) = tmp(&format!("dst{cfr}"), &[]);
            let mut buf = Vec::new();
            let mut use_cfr = cfr;
            let job = Job {
                src: src.as_raw_fd(),
                src_off: 1000,
                dst: dst.as_raw_fd(),
                dst_off: 77,
                len: 2_999_500, // runs 500 bytes past the source's end
            };
            copy_range(job, &mut buf, &mut use_cfr).unwrap();
            let mut got = vec![0u8; 2_999_000];
            dst.read_exact_at(&mut got, 77).unwrap();
            assert_eq!(got, &data[1000..], "copy_file_range: {cfr}");
            let len = dst.metadata().unwrap().len();
            assert!(len == 77 + 2_999_000 || len == 77 + 2_999_500, "{len}");
            std::fs::remove_file(pd).unwrap();
        }
        std::fs::remove_file(ps).unwrap();
    }

    /// Patterned data over several jobs with zero stretches: a whole 64
    /// KiB block, a page, a sub-page piece, and a short tail.
    fn sample() -> Vec<u8> {
        let mut d: Vec<u8> = (0..(3 * JOB_MAX as usize + 12345))
            .map(|i| (i % 251) as u8 | 1)
            .collect();
        d[(5 << 20)..(5 << 20) + (64 << 10)].fill(0);
        d[(9 << 20) + 8192..(9 << 20) + 12288].fill(0);
        d[(17 << 20) + 512..(17 << 20) + 1024].fill(0);
        d
    }

    #[test]
    fn pool_copies_in_pieces_with_and_without_the_direct_copier() {
        let data = sample();
        let (ps, src) = tmp("psrc", &data);
        // The buffered copier alone (no direct I/O), both, the direct
        // copier alone (-t none).
        for (buffered, direct) in [(true, false), (true, true), (false, true)] {
            for raw in [true, false] {
                // A raw target as convert makes it (full size, all holes),
                // or an empty file grown by appending (a qcow2 target).
                let (pd, dst) = tmp(&format!("pdst{buffered}{direct}{raw}"), &[]);
                if raw {
                    dst.set_len(data.len() as u64).unwrap();
                }
                std::thread::scope(|sc| {
                    let pool = Pool::with_copiers(sc, &dst, 2, buffered, direct, 0);
                    let cut = (7 << 20) + 4096;
                    pool.copy(&src, 0, 0, cut).unwrap();
                    pool.copy(&src, cut, cut, data.len() as u64 - cut).unwrap();
                    pool.finish().unwrap();
                });
                let mut got = vec![0u8; data.len()];
                dst.read_exact_at(&mut got, 0).unwrap();
                assert!(
                    got == data,
                    "buffered {buffered} direct {direct} raw {raw}: content differs"
                );
                std::fs::remove_file(pd).unwrap();
            }
        }
        std::fs::remove_file(ps).unwrap();
    }

    /// Pages of `[off, off + len)` of `f` in the page cache.
    fn resident(f: &File, off: u64, len: u64) -> usize {
        let m = Mapped::new(f, off, len).unwrap();
        let pages = len.div_ceil(4096) as usize;
        let mut v = vec![0u8; pages];
        // SAFETY: mincore over our own live mapping (off is page
        // aligned here), into a vector of one byte per page.
        let r = unsafe {
            libc::mincore(
                m.bytes().as_ptr() as *mut libc::c_void,
                len as usize,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn direct_writer_bypasses_the_page_cache_where_aligned() {
        let data = sample();
        let (ps, src) = tmp("dsrc", &data);
        let (pd, dst) = tmp("ddst", &[]);
        dst.set_len(32 << 20).unwrap();
        let Some(mut d) = direct::Direct::open(dst.as_raw_fd()) else {
            eprintln!(
                "skipped: no direct I/O or io_uring on {}",
                std::env::temp_dir().display()
            );
            std::fs::remove_file(pd).unwrap();
            std::fs::remove_file(ps).unwrap();
            return;
        };
        let job = |src_off: u64, dst_off: u64, len: u64| Job {
            src: src.as_raw_fd(),
            src_off,
            dst: dst.as_raw_fd(),
            dst_off,
            len,
        };
        let mib = 1u64 << 20;
        // Aligned, whole: direct.
        d.copy(job(0, 0, 4 * mib)).unwrap();
        // Unaligned target offset: buffered.
        d.copy(job(4 * mib, 4 * mib + 100, mib)).unwrap();
        // Whole pages, but more than the buffers hold: buffered.
        d.copy(job(16 * mib, 8 * mib, JOB_MAX + 4096)).unwrap();
        // Past the source's end: the missing part is written as zeroes.
        let tail = data.len() as u64 - 4096;
        d.copy(job(tail, 24 * mib, mib)).unwrap();
        d.drain().unwrap();
        // The direct range never went through the page cache; the
        // buffered one did.
        assert_eq!(resident(&dst, 0, 4 * mib), 0);
        assert!(resident(&dst, 4 * mib, mib) > 0);
        assert!(resident(&dst, 8 * mib, mib) > 0);
        let mut got = vec![0u8; 32 << 20];
        dst.read_exact_at(&mut got, 0).unwrap();
        let m = mib as usize;
        assert!(got[..4 * m] == data[..4 * m]);
        assert!(got[4 * m + 100..5 * m + 100] == data[4 * m..5 * m]);
        assert!(got[8 * m..16 * m + 4096] == data[16 * m..24 * m + 4096]);
        assert!(got[24 * m..24 * m + 4096] == data[tail as usize..]);
        assert!(got[24 * m + 4096..25 * m].iter().all(|&b| b == 0));
        drop(d);
        std::fs::remove_file(pd).unwrap();
        std::fs::remove_file(ps).unwrap();
    }
}
