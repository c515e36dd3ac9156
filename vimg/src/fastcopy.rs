//! Fast data path of `convert` into a fresh target: data extents of the
//! source (contiguous host ranges found through block status) are scanned
//! for zero blocks with `pread` (probing large blocks), and the non-zero
//! runs are copied file to file with `copy_file_range` (one copy, inside
//! the kernel, instead of `pread` + `pwrite`'s two), each at its final
//! offset. Buffered writes to one file are serialized by its inode lock,
//! so one thread copies while other threads allocate the target ranges
//! ahead of it. Falls back to
//! `pread`/`pwrite` where `copy_file_range` is not supported (other file
//! systems on old kernels, block devices).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Largest piece handed to one worker.
const JOB_MAX: u64 = 8 << 20;

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

/// [`nonzero_runs`] of the `len` bytes of `f` at `off`, read with `pread`
/// (a file that shrinks meanwhile reads short instead of faulting, as a
/// mapping would). Blocks of 32 KiB and more are probed: data is usually
/// told by a block's first 4 KiB, and only blocks that start with zeroes
/// are read further. Smaller blocks are read 1 MiB at a time. Bytes past
/// the file's end count as zeroes and are not part of any run.
pub fn file_runs(
    f: &File,
    off: u64,
    len: u64,
    blk: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<Vec<(usize, usize)>> {
    let blk = blk.max(1);
    let len = len.min(f.metadata()?.len().saturating_sub(off));
    if blk >= 32 << 10 {
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
    if done < j.len && buf.is_empty() {
        buf.resize(1 << 20, 0);
    }
    while done < j.len {
        let n = ((j.len - done) as usize).min(buf.len());
        // SAFETY: reads into our own buffer of at least n bytes from an
        // open descriptor.
        let r = unsafe {
            libc::pread(
                j.src,
                buf.as_mut_ptr() as *mut libc::c_void,
                n,
                (j.src_off + done) as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut w = 0usize;
        while w < r as usize {
            // SAFETY: writes initialized bytes of our buffer to an open
            // descriptor.
            let k = unsafe {
                libc::pwrite(
                    j.dst,
                    buf[w..].as_ptr() as *const libc::c_void,
                    r as usize - w,
                    (j.dst_off + done + w as u64) as libc::off_t,
                )
            };
            if k < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            w += k as usize;
        }
        done += r as u64;
    }
    Ok(())
}

/// Prepare a target range for its copy: allocate it with `fallocate`
/// (one extent allocation instead of delayed allocation page by page, as
/// QEMU's qcow2 driver does for new clusters), here, on a preparing
/// thread, so that the copier only copies. Errors (file systems without
/// fallocate, block devices) only lose the optimization; the file size is
/// left to the copy.
///
/// Filling the range's page cache ahead (`readahead` of the unwritten
/// range) was tried and dropped: it moves page allocation off the copier
/// but zeroes every page once more, which measured slower on this host
/// whenever freed pages were reused.
fn prepare(j: &Job) {
    // SAFETY: plain syscall on an open descriptor with integer arguments.
    unsafe {
        libc::fallocate(
            j.dst,
            libc::FALLOC_FL_KEEP_SIZE,
            j.dst_off as libc::off_t,
            j.len as libc::off_t,
        )
    };
}

/// The first error of a pool: target offset and error.
type Failed = Arc<Mutex<Option<(u64, std::io::Error)>>>;

/// Copies in two stages: `preparers` threads allocate the target ranges
/// (see [`prepare`]) and hand them to one copier thread. Buffered writes
/// to one file are serialized by its inode lock, so more copiers would
/// only spin on it (measured: 4 copiers used 40% more CPU for the same
/// wall time). The first error stops everything.
pub struct Pool<'s> {
    tx: Option<SyncSender<Job>>,
    workers: Vec<std::thread::ScopedJoinHandle<'s, ()>>,
    failed: Arc<AtomicBool>,
    err: Failed,
}

impl<'s> Pool<'s> {
    /// Start `preparers` preparing threads and the copier in `scope`.
    pub fn new<'e>(scope: &'s std::thread::Scope<'s, 'e>, preparers: usize) -> Pool<'s> {
        let preparers = preparers.max(1);
        let (tx, rx) = sync_channel::<Job>(preparers * 2);
        let (ctx, crx) = sync_channel::<Job>(preparers * 2);
        let rx: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(rx));
        let failed = Arc::new(AtomicBool::new(false));
        let err: Failed = Arc::new(Mutex::new(None));
        let mut workers = Vec::new();
        for _ in 0..preparers {
            let rx = rx.clone();
            let ctx = ctx.clone();
            let failed = failed.clone();
            workers.push(scope.spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                let Ok(job) = job else { return };
                if !failed.load(Ordering::Relaxed) {
                    prepare(&job);
                }
                if ctx.send(job).is_err() {
                    return;
                }
            }));
        }
        drop(ctx);
        {
            let failed = failed.clone();
            let err = err.clone();
            workers.push(scope.spawn(move || {
                let mut buf = Vec::new();
                let mut use_cfr = true;
                for job in crx {
                    if failed.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Err(e) = copy_range(job, &mut buf, &mut use_cfr) {
                        failed.store(true, Ordering::Relaxed);
                        if let Ok(mut g) = err.lock() {
                            g.get_or_insert((job.dst_off, e));
                        }
                    }
                }
            }));
        }
        Pool {
            tx: Some(tx),
            workers,
            failed,
            err,
        }
    }

    /// Queue a copy of `len` bytes (split for the workers). Returns the
    /// first error of an earlier copy (target offset, error), if any.
    pub fn copy(
        &self,
        src: &File,
        src_off: u64,
        dst: &File,
        dst_off: u64,
        len: u64,
    ) -> Result<(), (u64, std::io::Error)> {
        let mut done = 0;
        while done < len {
            self.check()?;
            let n = (len - done).min(JOB_MAX);
            let job = Job {
                src: src.as_raw_fd(),
                src_off: src_off + done,
                dst: dst.as_raw_fd(),
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
    fn file_runs_match_the_bytes_in_both_modes_and_stop_at_the_end() {
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
        for blk in [bs, 32 << 10, 4096, 512] {
            let want = nonzero_runs(&data, blk);
            assert_eq!(
                file_runs(&f, 0, data.len() as u64, blk, &mut buf).unwrap(),
                want
            );
            // Asked past the end: the same runs.
            assert_eq!(file_runs(&f, 0, 1 << 30, blk, &mut buf).unwrap(), want);
            // From an offset.
            let want: Vec<_> = nonzero_runs(&data[bs..], blk);
            assert_eq!(
                file_runs(&f, bs as u64, (data.len() - bs) as u64, blk, &mut buf).unwrap(),
                want
            );
        }
        assert!(file_runs(&f, 1 << 30, 4096, 4096, &mut buf)
            .unwrap()
            .is_empty());
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
        // Through the pool, in pieces, by two workers.
        let (pd, dst) = tmp("pool", &[]);
        std::thread::scope(|sc| {
            let pool = Pool::new(sc, 2);
            pool.copy(&src, 0, &dst, 0, 1 << 20).unwrap();
            pool.copy(&src, 1 << 20, &dst, 1 << 20, 2_000_000 - (1 << 20))
                .unwrap();
            pool.finish().unwrap();
        });
        let mut got = vec![0u8; 2_000_000];
        dst.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, &data[..2_000_000]);
        std::fs::remove_file(pd).unwrap();
        std::fs::remove_file(ps).unwrap();
    }
}
