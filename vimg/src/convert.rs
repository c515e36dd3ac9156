//! `vimg convert`: copy an image (or a concatenation of images) to a new
//! raw or qcow2 image, flattening backing chains (`-B` keeps one), sparse by
//! default (`-S`), with progress (`-p`).

use crate::common::{fail, parse_opts, Failure, R};
use crate::fastcopy::{file_runs, is_zero, nonzero_runs, runs, Mapped, Pool, Throttle, WINDOW};
use crate::map::{is_zero_range, open_chain, plain_extent, read_chain, status, Layer};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use vcore::image::qcow2::Qcow2Device;
use vcore::image::raw::RawDevice;
use vcore::image::{self, BlockDevice, Format, OpenOptions};

/// Arguments of `convert`.
pub struct ConvertArgs {
    pub fmt: Option<String>,
    pub out_fmt: Option<String>,
    pub opts: Vec<String>,
    pub progress: bool,
    pub compress: bool,
    pub backing: Option<String>,
    pub backing_fmt: Option<String>,
    pub sparse: Option<String>,
    pub no_create: bool,
    pub force_share: bool,
    /// `-t`: target cache mode.
    pub cache: Option<String>,
    /// `-T`: source cache mode.
    pub src_cache: Option<String>,
    /// `-m`: QEMU's number of coroutines.
    pub coroutines: Option<String>,
    /// `--target-is-zero`: the existing target (`-n`) reads as zeroes.
    pub target_is_zero: bool,
    /// `-r`: rate limit of the target writes, bytes per second.
    pub rate_limit: Option<String>,
    /// `-C`: copy offloading (data extents copied whole, no zero scan).
    pub copy_range: bool,
    /// `--salvage`: unreadable sectors become zeroes; `Some(true)` warns
    /// about each (not with `-q`).
    pub salvage: Option<bool>,
    pub files: Vec<String>,
}

/// What a cache mode means for the target, as QEMU's
/// `bdrv_parse_cache_mode` reads it: writes bypass the page cache
/// (`O_DIRECT`), and the data is flushed before convert ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cache {
    pub direct: bool,
    pub flush: bool,
}

impl Cache {
    pub fn parse(s: &str) -> Option<Cache> {
        let (direct, flush) = match s {
            "none" | "off" | "directsync" => (true, true),
            "writeback" | "writethrough" => (false, true),
            "unsafe" => (false, false),
            _ => return None,
        };
        Some(Cache { direct, flush })
    }
}

const CHUNK: u64 = 2 << 20;

/// The progress line's last state, `-p`.
fn progress_done(on: bool) {
    if on {
        println!("    (100.00/100%)");
    }
}

fn progress(p: f64) {
    print!("    ({p:.2}/100%)\r");
    let _ = std::io::stdout().flush();
}

/// Run `convert`.
pub fn run(mut a: ConvertArgs) -> R<()> {
    if let Some(m) = &a.coroutines {
        match parse_c_long(m) {
            None => {
                return Err(fail(format!(
                    "Invalid number of coroutines specified: '{m}'."
                )))
            }
            Some(1..=16) => {}
            Some(_) => {
                return Err(fail(
                    "Invalid number of coroutines specified. Must be between 1 and 16.",
                ))
            }
        }
    }
    let rate = match a.rate_limit.as_deref() {
        None => 0,
        Some(r) => match vcore::units::parse_size(r, vcore::units::Suffix::B) {
            Ok(v) if v <= i64::MAX as u64 => v,
            Err(vcore::units::SizeError::Invalid { .. }) if !r.trim_start().starts_with('-') => {
                return Err(fail(format!("Invalid rate limit specified: '{r}'.")));
            }
            _ => {
                return Err(fail(
                    "Invalid rate limit specified. Must be between 0 and 9223372036854775807.",
                ))
            }
        },
    };
    if a.compress && a.copy_range {
        return Err(fail("Cannot enable copy offloading when -c is used"));
    }
    if a.sparse.is_some() && a.copy_range {
        return Err(fail("Cannot enable copy offloading when -S is used"));
    }
    if a.copy_range && a.salvage.is_some() {
        return Err(fail("Cannot use copy offloading in salvaging mode"));
    }
    if a.no_create && !a.opts.is_empty() {
        return Err(fail("-o has no effect when skipping image creation"));
    }
    if a.target_is_zero && !a.no_create {
        return Err(fail("--target-is-zero requires use of -n flag"));
    }
    if a.files.len() < 2 {
        return Err(fail("Expecting one image file name"));
    }
    let src_cache = a.src_cache.as_deref().unwrap_or("writeback");
    if Cache::parse(src_cache).is_none() {
        return Err(fail(format!("Invalid source cache option: {src_cache}")));
    }
    // qemu-img's default for convert targets: unsafe (no flush).
    let cache_name = a.cache.as_deref().unwrap_or("unsafe");
    let cache = Cache::parse(cache_name)
        .ok_or_else(|| fail(format!("Invalid cache option: {cache_name}")))?;
    let (srcs, dst) = a.files.split_at(a.files.len() - 1);
    let dst = &dst[0];
    let in_fmt = match a.fmt.as_deref() {
        None => None,
        Some(s) => {
            Some(Format::from_name(s).ok_or_else(|| fail(format!("Unknown file format '{s}'")))?)
        }
    };
    let out_fmt_name = a.out_fmt.clone().unwrap_or_else(|| "raw".into());
    let out_fmt = Format::from_name(&out_fmt_name)
        .ok_or_else(|| fail(format!("Unknown file format '{out_fmt_name}'")))?;
    let sparse = match a.sparse.as_deref() {
        None => 4096u64,
        Some(s) => {
            let v = vcore::units::parse_size(s, vcore::units::Suffix::B)
                .map_err(|_| fail("Invalid buffer size for sparse output specified".to_string()))?;
            if v != 0 && (v % 512 != 0 || v > CHUNK) {
                return Err(fail("Invalid buffer size for sparse output specified"));
            }
            v
        }
    };
    if a.compress && out_fmt != Format::Qcow2 {
        return Err(fail("Compression not supported for this file format"));
    }
    if a.target_is_zero && a.backing.is_some() {
        return Err(fail(
            "Cannot use --target-is-zero when the destination image has a backing file",
        ));
    }
    let mut sources: Vec<Vec<Layer>> = Vec::new();
    for s in srcs {
        sources.push(open_chain(s, in_fmt, a.force_share)?);
    }
    let total: u64 = sources.iter().map(|l| l[0].size()).sum();
    let target_opts = parse_opts(&a.opts.join(","));
    if srcs.len() > 1
        && (a.backing.is_some() || target_opts.iter().any(|(k, _)| k == "backing_file"))
    {
        return Err(fail(
            "Having a backing file for the target makes no sense when concatenating multiple input images",
        ));
    }
    let opt = |k: &str| target_opts.iter().any(|(key, _)| key == k);
    if !a.no_create
        && (a.backing.is_some() || opt("backing_file"))
        && a.backing_fmt.is_none()
        && !opt("backing_fmt")
    {
        return Err(fail("Use of backing file requires explicit backing format"));
    }
    let preallocated = target_opts
        .iter()
        .any(|(k, v)| k == "preallocation" && v != "off");
    if out_fmt == Format::Qcow2
        && preallocated
        && target_opts
            .iter()
            .any(|(k, v)| k == "extended_l2" && v == "on")
    {
        // Writes into extended L2 entries go through imago, which has no
        // subclusters; refuse before creating anything.
        return Err(fail(format!(
            "{dst}: error while converting qcow2: preallocation with extended L2 entries is not supported by this version"
        )));
    }
    // Target.
    if !a.no_create {
        let mut opts: Vec<String> = a.opts.clone();
        // Refuse unknown keys early with create's messages.
        let parsed = parse_opts(&a.opts.join(","));
        if parsed.iter().any(|(k, _)| k == "size") {
            opts.retain(|_| true);
        }
        crate::create::run(crate::create::CreateArgs {
            fmt: Some(out_fmt_name.clone()),
            opts,
            backing: a.backing.clone(),
            backing_fmt: a.backing_fmt.clone(),
            unsafe_backing: false,
            quiet: true,
            file: dst.clone(),
            size: Some(total.to_string()),
        })
        .map_err(|f| creation_failure(f, dst, &out_fmt_name))?;
    }
    // `-o backing_file=...,backing_fmt=...` make a target with a backing
    // file as -B and -F do, and qemu-img converts into it as with -B.
    let value = |k: &str| {
        target_opts
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    if a.backing.is_none() && !a.no_create {
        if let Some(b) = value("backing_file") {
            a.backing = Some(b);
            a.backing_fmt = a.backing_fmt.clone().or_else(|| value("backing_fmt"));
        }
    }
    // A preallocated target (`-o preallocation=metadata|falloc|full`) is
    // written in place, into the clusters its creation mapped, as qemu-img
    // does; the sequential writer would map the data anew and leave the
    // preallocated clusters unused.
    if out_fmt == Format::Qcow2 && !a.no_create && !preallocated {
        return convert_seq(&a, &mut sources, dst, total, sparse, cache, rate);
    }
    if out_fmt == Format::Qcow2
        && a.no_create
        && a.backing.is_none()
        && !a.compress
        && empty_qcow2(dst)
    {
        return convert_seq(&a, &mut sources, dst, total, sparse, cache, rate);
    }
    if a.compress {
        return Err(fail(
            "Compressed output (-c) needs a new qcow2 target (not -n)",
        ));
    }
    let oopts = OpenOptions {
        format: Some(out_fmt),
        read_only: false,
        ..Default::default()
    };
    let tfile = image::open_file(Path::new(dst), &oopts)
        .map_err(|e| fail(crate::common::open_error_text(&e)))?;
    if out_fmt == Format::Raw && !a.no_create && a.backing.is_none() && sparse != 0 {
        if a.progress {
            progress(0.0);
        }
        let fast = Fast::new(&a, cache, rate);
        fast_raw(&mut sources, &tfile, sparse, total, &fast)?;
        if cache.flush {
            tfile.sync_all().map_err(|e| {
                fail(format!(
                    "error while flushing {dst}: {}",
                    vcore::image::qcow2::os_msg(&e)
                ))
            })?;
        }
        progress_done(a.progress);
        return Ok(());
    }
    let target: Box<dyn BlockDevice> = match out_fmt {
        Format::Raw => Box::new(
            RawDevice::from_file(tfile, false)
                .map_err(|e| fail(crate::common::open_error_text(&e)))?,
        ),
        Format::Qcow2 => Box::new(
            Qcow2Device::open_file(Path::new(dst), tfile, &oopts, 0)
                .map_err(|e| fail(crate::common::open_error_text(&e)))?,
        ),
    };
    if a.no_create && target.size() < total {
        return Err(fail("output file is smaller than input file"));
    }
    // With -B, blocks equal to the backing file's are not copied.
    let mut backing: Option<Vec<Layer>> = match &a.backing {
        Some(b) => {
            let bp = image::resolve_backing(Path::new(dst), b)
                .display()
                .to_string();
            let bf = a.backing_fmt.as_deref().and_then(Format::from_name);
            Some(open_chain(&bp, bf, true)?)
        }
        None => None,
    };
    // A target the user says reads as zeroes (--target-is-zero) is
    // treated like a new one: zero blocks are not written.
    let fresh = !a.no_create || a.target_is_zero;
    let mut throttle = Throttle::new(rate);
    let mut last_pct = -1i64;
    if a.progress {
        progress(0.0);
    }
    // Reader thread (block status, reads, backing reads) feeding this
    // thread, which scans for zero blocks and writes: reads and writes
    // overlap.
    type Chunk = (u64, Vec<u8>, Option<Vec<u8>>);
    let (tx, rx) = std::sync::mpsc::sync_channel::<R<Chunk>>(4);
    // Buffers go back to the reader: no page faults on fresh allocations.
    let (pool_tx, pool_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let skip_zero = fresh && backing.is_none() && sparse != 0;
    std::thread::scope(|sc| -> R<()> {
        let backing = &mut backing;
        sc.spawn(move || {
            let mut base = 0u64;
            for src in sources.iter_mut() {
                let size = src[0].size();
                let mut off = 0u64;
                while off < size {
                    let mut n = (size - off).min(CHUNK) as usize;
                    // Follow block status: skip zero runs of a fresh target,
                    // read data runs only as far as they go.
                    if skip_zero {
                        if let Ok(e) = status(src, off, n as u64) {
                            if e.zero {
                                off += e.length.clamp(1, n as u64);
                                continue;
                            }
                            n = (e.length as usize).clamp(1, n);
                        }
                    }
                    let mut buf = pool_rx.try_recv().unwrap_or_default();
                    buf.resize(n, 0);
                    if let Err(e) = read_src(src, off, &mut buf, a.salvage) {
                        let _ = tx.send(Err(fail(format!(
                            "error while reading at byte {}: {}",
                            off,
                            e.msg.unwrap_or_default()
                        ))));
                        return;
                    }
                    let bb = match backing.as_mut() {
                        Some(bl) => {
                            let bsize = bl[0].size();
                            let g = base + off;
                            let mut bb = vec![0u8; n];
                            if g < bsize {
                                let bn = ((bsize - g) as usize).min(n);
                                if let Err(e) = read_chain(bl, g, &mut bb[..bn]) {
                                    let _ = tx.send(Err(e));
                                    return;
                                }
                            }
                            Some(bb)
                        }
                        None => None,
                    };
                    if tx.send(Ok((base + off, buf, bb))).is_err() {
                        return;
                    }
                    off += n as u64;
                }
                base += size;
            }
        });
        for item in rx {
            let (at0, buf, bbuf) = item?;
            let n = buf.len();
            let have_backing = bbuf.is_some();
            // Walk blocks of `sparse` bytes (or the whole chunk with -S 0).
            let blk = if sparse == 0 { n } else { sparse as usize };
            let keep = |i: usize, e: usize| -> bool {
                match &bbuf {
                    Some(b) => buf[i..e] != b[i..e],
                    None => sparse == 0 || !fresh || a.copy_range || !is_zero(&buf[i..e]),
                }
            };
            for (start, end) in runs(n, blk, keep) {
                let at = at0 + start as u64;
                throttle.wait((end - start) as u64);
                if !fresh && !have_backing && is_zero(&buf[start..end]) {
                    target
                        .write_zeroes(at, (end - start) as u64)
                        .map_err(|e| fail(format!("error while writing at byte {at}: {e}")))?;
                } else {
                    target
                        .write_at(&buf[start..end], at)
                        .map_err(|e| fail(format!("error while writing at byte {at}: {e}")))?;
                }
            }
            if a.progress && total > 0 {
                let done = at0 + n as u64;
                let pct = (done * 100 / total) as i64;
                if pct != last_pct {
                    last_pct = pct;
                    progress(done as f64 * 100.0 / total as f64);
                }
            }
            let _ = pool_tx.send(buf);
        }
        Ok(())
    })?;
    drop(pool_tx);
    // Like qemu-img convert: with the default cache=unsafe no fsync (data
    // reaches the disk with the page cache); other modes flush at the end.
    if cache.flush {
        target
            .flush()
            .map_err(|e| fail(format!("error while flushing {dst}: {e}")))?;
    }
    drop(target);
    progress_done(a.progress);
    Ok(())
}

/// Convert into a freshly created qcow2 image with its writer, which lays
/// it out as qemu-img does: [`fast_qcow2`], with -c [`compress_parallel`],
/// or with -c into a target that does not read as zeroes (-B, -n)
/// [`convert_writing_zeroes`].
fn convert_seq(
    a: &ConvertArgs,
    sources: &mut [Vec<Layer>],
    dst: &str,
    total: u64,
    sparse: u64,
    cache: Cache,
    rate: u64,
) -> R<()> {
    // -n: an empty image that exists (see `empty_qcow2`).
    let existing = a.no_create;
    use vcore::image::qcow2::writer::SeqWriter;
    let oopts = OpenOptions {
        format: Some(Format::Qcow2),
        read_only: false,
        ..Default::default()
    };
    let tfile = image::open_file(Path::new(dst), &oopts)
        .map_err(|e| fail(crate::common::open_error_text(&e)))?;
    let mut w = SeqWriter::new(tfile).map_err(|m| fail(format!("{dst}: {m}")))?;
    if existing && w.header().size < total {
        return Err(fail("output file is smaller than input file"));
    }
    let cs = w.header().cluster_size();
    let ctype = w.header().compression_type;
    let n_src = sources.len();
    if sources[..n_src - 1].iter().any(|s| s[0].size() % cs != 0) {
        return Err(fail(
            "Concatenating sources whose sizes are not multiples of the cluster size is not supported",
        ));
    }
    let backing: Option<Vec<Layer>> = match &a.backing {
        Some(b) => {
            let bp = image::resolve_backing(Path::new(dst), b)
                .display()
                .to_string();
            let bf = a.backing_fmt.as_deref().and_then(Format::from_name);
            Some(open_chain(&bp, bf, true)?)
        }
        None => None,
    };
    if a.progress {
        progress(0.0);
    }
    let werr = |m: String| fail(format!("error while writing to {dst}: {m}"));
    let fast = Fast::new(a, cache, rate);
    // A target that does not read as zeroes to qemu-img: -B, or -n without
    // --target-is-zero.
    let zeroes = match &backing {
        Some(bl) => Some(Zeroes {
            backing: Some(bl[0].size()),
        }),
        None if existing && !a.target_is_zero => Some(Zeroes { backing: None }),
        None => None,
    };
    if let Some(bl) = backing {
        w.set_backing(Box::new(BackingChain(bl)));
    }
    match (zeroes, a.compress) {
        (z, false) => {
            w.set_copy_range(a.copy_range);
            fast_qcow2(&mut w, sources, total, sparse, &fast, z).map_err(werr)?;
        }
        (Some(z), true) => convert_writing_zeroes(
            &mut w, sources, total, z.backing, sparse, ctype, rate, a.progress, a.salvage,
        )
        .map_err(werr)?,
        (None, true) => compress_parallel(a, sources, &mut w, dst, total, sparse, rate)?,
    }
    w.finish(cache.flush).map_err(werr)?;
    progress_done(a.progress);
    Ok(())
}

/// `convert -c` into a new qcow2 image without a backing file: a reader
/// thread fills chunks, compressor threads (one per CPU, each keeping its
/// compressor) compress their clusters, and this thread writes them in
/// guest order, one request per cluster as qemu-img writes them.
fn compress_parallel(
    a: &ConvertArgs,
    sources: &mut [Vec<Layer>],
    w: &mut vcore::image::qcow2::writer::SeqWriter,
    dst: &str,
    total: u64,
    sparse: u64,
    rate: u64,
) -> R<()> {
    use crate::compress::Compressor;
    let cs = w.header().cluster_size();
    let ctype = w.header().compression_type;
    // 2 MiB under a rate limit (qemu-img's request size), 8 MiB else.
    let chunk = (if rate > 0 { 2u64 << 20 } else { 8 << 20 }).max(cs);
    let mut throttle = Throttle::new(rate);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let mut last_pct = -1i64;
    // Reader thread: (sequence number, guest offset, data); -c only.
    type Chunk = (u64, u64, Data);
    let (tx, rx) = std::sync::mpsc::sync_channel::<R<Chunk>>(threads + 1);
    let map = !a.force_share;
    let (pool_tx, pool_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let salvage = a.salvage;
    std::thread::scope(|sc| -> R<()> {
        sc.spawn(move || {
            let mut base = 0u64;
            let mut seq = 0u64;
            for src in sources.iter_mut() {
                let size = src[0].size();
                let mut off = 0u64;
                while off < size {
                    let n = (size - off).min(chunk) as usize;
                    let skip = sparse != 0
                        && base % cs == 0
                        && matches!(is_zero_range(src, off, n as u64), Ok(true));
                    if skip {
                        off += n as u64;
                        continue;
                    }
                    let data = match mapped(src, off, n as u64, cs, map) {
                        Some(m) => Data::Map(m),
                        None => {
                            let mut buf = pool_rx.try_recv().unwrap_or_default();
                            buf.clear();
                            buf.resize(n.next_multiple_of(cs as usize), 0);
                            if let Err(e) = read_src(src, off, &mut buf[..n], salvage) {
                                let _ = tx.send(Err(e));
                                return;
                            }
                            Data::Buf(buf)
                        }
                    };
                    if tx.send(Ok((seq, base + off, data))).is_err() {
                        return;
                    }
                    seq += 1;
                    off += n as u64;
                }
                base += size;
            }
        });
        // Workers (one per CPU with -c, each with its own compressor):
        // which clusters to write, and their compressed form. The results
        // are written here, in order.
        let workers = if a.compress { threads } else { 1 };
        let rx = Arc::new(Mutex::new(rx));
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<R<Prepared>>(workers * 2);
        for _ in 0..workers {
            let (rx, done_tx) = (rx.clone(), done_tx.clone());
            let compress = a.compress;
            sc.spawn(move || {
                let mut z = compress.then(|| Compressor::new(ctype));
                loop {
                    let Ok(item) = rx.lock().map(|r| r.recv()) else {
                        return;
                    };
                    let Ok(item) = item else { return };
                    let out = item
                        .map(|(seq, goff, data)| prepare(seq, goff, data, cs, sparse, z.as_mut()));
                    if done_tx.send(out).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        drop(rx);
        let mut pending = std::collections::BTreeMap::new();
        let mut next = 0u64;
        for p in done_rx {
            let p = p?;
            pending.insert(p.seq, p);
            while let Some(p) = pending.remove(&next) {
                next += 1;
                let buf = p.data.bytes();
                let first_cluster = p.goff / cs;
                // Runs of plain clusters go out in one write each.
                let mut i = 0usize;
                while i < p.keep.len() {
                    if !p.keep[i] {
                        i += 1;
                        continue;
                    }
                    let gc = first_cluster + i as u64;
                    let werr = |m: String| fail(format!("error while writing to {dst}: {m}"));
                    if let Some(z) = &p.comp[i] {
                        throttle.wait(z.len() as u64);
                        w.write_compressed(gc, z).map_err(werr)?;
                        i += 1;
                        continue;
                    }
                    // With -c, a cluster that does not compress is its own
                    // request (up to the image's end), as in qemu-img.
                    let start = i;
                    i += 1;
                    while !a.compress && i < p.keep.len() && p.keep[i] && p.comp[i].is_none() {
                        i += 1;
                    }
                    let a0 = start * cs as usize;
                    let mut a1 = (i * cs as usize).min(buf.len());
                    if a.compress {
                        a1 = a1.min((total - gc * cs) as usize + a0);
                    }
                    throttle.wait((a1 - a0) as u64);
                    w.write(gc * cs, &buf[a0..a1]).map_err(werr)?;
                }
                if a.progress && total > 0 {
                    let done = (p.goff + buf.len() as u64).min(total);
                    let pct = (done * 100 / total) as i64;
                    if pct != last_pct {
                        last_pct = pct;
                        progress(done as f64 * 100.0 / total as f64);
                    }
                }
                if let Data::Buf(b) = p.data {
                    let _ = pool_tx.send(b);
                }
            }
        }
        Ok(())
    })
}

/// A chunk of the generic path, ready to be written: which of its clusters
/// to write (`keep`) and their compressed form, if compressed.
struct Prepared {
    seq: u64,
    goff: u64,
    data: Data,
    keep: Vec<bool>,
    comp: Vec<Option<Vec<u8>>>,
}

/// Decide a chunk's clusters: the non-zero ones (all with `-S 0`),
/// compressed with `z` (`-c`).
fn prepare(
    seq: u64,
    goff: u64,
    data: Data,
    cs: u64,
    sparse: u64,
    mut z: Option<&mut crate::compress::Compressor>,
) -> Prepared {
    let cs = cs as usize;
    let clusters: Vec<&[u8]> = data.bytes().chunks(cs).collect();
    let keep: Vec<bool> = clusters
        .iter()
        .map(|c| sparse == 0 || !is_zero(c))
        .collect();
    let comp = clusters
        .iter()
        .zip(&keep)
        .map(|(c, &k)| match z.as_mut() {
            Some(z) if k => z.compress(c),
            _ => None,
        })
        .collect();
    drop(clusters);
    Prepared {
        seq,
        goff,
        data,
        keep,
        comp,
    }
}

/// Source data of the generic path: read into a buffer (whole clusters,
/// zero-padded), or mapped.
enum Data {
    Buf(Vec<u8>),
    Map(Mapped),
}

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Buf(b) => b,
            Data::Map(m) => m.bytes(),
        }
    }
}

/// `[off, off + n)` of `src` mapped, when it is whole clusters of `cs`
/// bytes inside one plain data extent and `map` allows it (sources locked
/// against writers, see [`file_runs`]): compressing straight from the
/// mapping saves reading the data into a buffer, a third of the CPU time
/// of `convert -c` with zstd.
fn mapped(src: &mut [Layer], off: u64, n: u64, cs: u64, map: bool) -> Option<Mapped> {
    if !map || n % cs != 0 {
        return None;
    }
    let e = status(src, off, n).ok()?;
    if e.length < n {
        return None;
    }
    let (f, h) = plain_extent(src, &e)?;
    let m = Mapped::whole(f, h, n)?;
    m.advise(libc::MADV_WILLNEED);
    Some(m)
}

/// A failure to create the target, worded as qemu-img's convert words it:
/// option syntax and type errors (found while parsing `-o`) stand alone;
/// what the format driver refuses is "FILE: error while converting FMT:".
fn creation_failure(f: Failure, dst: &str, fmt: &str) -> Failure {
    let Some(msg) = f.msg.as_deref() else {
        return f;
    };
    let bare = msg.strip_prefix(&format!("{dst}: ")).unwrap_or(msg);
    let parse_time = bare.starts_with("Invalid parameter '")
        || (bare.starts_with("Parameter '") && bare.contains("' expects "));
    if parse_time {
        fail(bare)
    } else {
        fail(format!("{dst}: error while converting {fmt}: {bare}"))
    }
}

/// `s` read whole as C's `strtol` with base 0 reads it (decimal, 0x hex,
/// 0 octal; what qemu_strtol accepts without an end pointer). `None` if it
/// is not a number; a value past the range of a C long comes back as
/// `i64::MAX` (`strtol` saturates).
fn parse_c_long(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i64::from_str_radix(digits, radix).unwrap_or(i64::MAX);
    Some(if neg { -v } else { v })
}

/// Threads allocating target ranges ahead of the fast paths' copier.
const PREPARERS: usize = 2;

/// Progress printing by whole percent.
struct Progress {
    on: bool,
    total: u64,
    last: i64,
}

impl Progress {
    fn at(&mut self, done: u64) {
        if self.on && self.total > 0 {
            let done = done.min(self.total);
            let pct = (done * 100 / self.total) as i64;
            if pct != self.last {
                self.last = pct;
                progress(done as f64 * 100.0 / self.total as f64);
            }
        }
    }
}

/// Read source bytes (the whole chain). With `--salvage` (`salvage`:
/// whether to warn) a read that fails is done again sector by sector and
/// the sectors that fail read as zeroes, each with a warning, as
/// qemu-img's `convert_co_read` does.
fn read_src(src: &mut [Layer], off: u64, buf: &mut [u8], salvage: Option<bool>) -> R<()> {
    let Err(e) = read_chain(src, off, buf) else {
        return Ok(());
    };
    let Some(warn) = salvage else {
        return Err(e);
    };
    for (i, sec) in buf.chunks_mut(512).enumerate() {
        let at = off + i as u64 * 512;
        if let Err(e) = read_chain(src, at, sec) {
            if warn {
                eprintln!(
                    "vimg: warning: error while reading offset {at}: {}",
                    e.msg.unwrap_or_default()
                );
            }
            sec.fill(0);
        }
    }
    Ok(())
}

fn read_err(at: u64, f: Failure) -> Failure {
    fail(format!(
        "error while reading at byte {at}: {}",
        f.msg.unwrap_or_default()
    ))
}

fn write_err((at, e): (u64, std::io::Error)) -> Failure {
    fail(format!(
        "error while writing at byte {at}: {}",
        vcore::image::qcow2::os_msg(&e)
    ))
}

/// How the fast paths copy.
struct Fast {
    /// `-p`.
    progress: bool,
    /// `-t none|directsync`: every aligned job is written directly.
    direct: bool,
    /// `-r`, bytes per second (0: no limit).
    rate: u64,
    /// The sources are locked against writers (no `-U`): data extents
    /// are scanned through a mapping (see [`file_runs`]).
    map: bool,
    /// Zero blocks inside plain data extents are looked for (not with
    /// `-C`, which copies them whole as qemu-img's copy offloading does).
    scan: bool,
    /// `--salvage` (see [`read_src`]).
    salvage: Option<bool>,
}

impl Fast {
    fn new(a: &ConvertArgs, cache: Cache, rate: u64) -> Fast {
        Fast {
            progress: a.progress,
            direct: cache.direct,
            rate,
            map: !a.force_share,
            scan: !a.copy_range,
            salvage: a.salvage,
        }
    }
}

/// The runs of a plain data extent to copy: its non-zero blocks (see
/// [`file_runs`]), or with `-C` all of it (up to the file's end).
fn data_runs(
    f: &File,
    off: u64,
    len: u64,
    blk: usize,
    fast: &Fast,
    buf: &mut Vec<u8>,
) -> std::io::Result<Vec<(usize, usize)>> {
    if fast.scan {
        return file_runs(f, off, len, blk, fast.map, buf);
    }
    let n = len.min(f.metadata()?.len().saturating_sub(off)) as usize;
    Ok(if n > 0 { vec![(0, n)] } else { Vec::new() })
}

/// Convert into a fresh raw file (sparse, no backing): zero extents are
/// skipped, data extents scanned here for zero blocks of `sparse` bytes
/// (see [`file_runs`]) and their non-zero runs copied by the copier threads;
/// anything else (compressed clusters) is read, scanned and written here.
fn fast_raw(sources: &mut [Vec<Layer>], dst: &File, sparse: u64, total: u64, fast: &Fast) -> R<()> {
    let blk = sparse as usize;
    let mut prog = Progress {
        on: fast.progress,
        total,
        last: -1,
    };
    let mut buf: Vec<u8> = Vec::new();
    std::thread::scope(|sc| -> R<()> {
        let pool = Pool::new(sc, dst, PREPARERS, fast.direct, fast.rate);
        let mut base = 0u64;
        for src in sources.iter_mut() {
            let size = src[0].size();
            let mut off = 0u64;
            while off < size {
                let max = (size - off).min(WINDOW);
                let e = status(src, off, max).map_err(|f| read_err(off, f))?;
                let mut n = e.length.clamp(1, max);
                if !e.zero {
                    if let Some((f, h)) = plain_extent(src, &e) {
                        let found = data_runs(f, h, n, blk, fast, &mut buf).map_err(|e| {
                            fail(format!(
                                "error while reading at byte {off}: {}",
                                vcore::image::qcow2::os_msg(&e)
                            ))
                        })?;
                        for (a, b) in found {
                            pool.copy(f, h + a as u64, base + off + a as u64, (b - a) as u64)
                                .map_err(write_err)?;
                        }
                    } else {
                        n = n.min(CHUNK);
                        buf.resize(n as usize, 0);
                        read_src(src, off, &mut buf, fast.salvage).map_err(|f| read_err(off, f))?;
                        for (a, b) in nonzero_runs(&buf, blk) {
                            let at = base + off + a as u64;
                            pool.throttle((b - a) as u64);
                            dst.write_all_at(&buf[a..b], at)
                                .map_err(|e| write_err((at, e)))?;
                        }
                    }
                }
                off += n;
                prog.at(base + off);
            }
            base += size;
        }
        pool.finish().map_err(write_err)
    })
}

/// qemu-img convert's block status query at `off` of a source, at most
/// `max` bytes: capped as qemu-img caps it (`BDRV_REQUEST_MAX_SECTORS`,
/// the end of the top layer's L2 table) and cut back to the top layer's
/// cluster; with `top_only`, the status of the top layer alone (above the
/// source's backing file). The entry and its length.
fn qemu_extent(
    src: &mut [Layer],
    off: u64,
    max: u64,
    top_only: bool,
) -> Result<(crate::map::Entry, u64), String> {
    let (span, align) = match &src[0] {
        Layer::Qcow2 { m, .. } => {
            let h = m.header();
            (h.cluster_size() * h.l2_entries(), h.cluster_size())
        }
        Layer::Raw { .. } => (u64::MAX, 1),
    };
    let cap = max.min(REQ_MAX).min(span - off % span);
    let layers = if top_only { &mut src[..1] } else { src };
    let e = status(layers, off, cap).map_err(|f| f.msg.unwrap_or_default())?;
    let mut n = e.length.clamp(1, cap);
    let tail = (off + n) % align;
    if n > tail {
        n -= tail;
    }
    Ok((e, n))
}

/// Whether `dst` is a qcow2 image as `qemu-img create` leaves it, without
/// a backing file (a target of `-n` the writer can fill as QEMU would:
/// nothing mapped, no snapshots).
fn empty_qcow2(dst: &str) -> bool {
    let Ok(f) = std::fs::OpenOptions::new().read(true).open(dst) else {
        return false;
    };
    vcore::image::qcow2::meta::Header::read(&f).is_ok_and(|h| {
        h.backing_file.is_none()
            && h.incompatible & vcore::image::qcow2::meta::INCOMPAT_DATA_FILE == 0
    }) && vcore::image::qcow2::writer::is_fresh(&f).unwrap_or(false)
}

/// The new image's backing file (`-B`) as its writer asks about it.
struct BackingChain(Vec<Layer>);

impl vcore::image::qcow2::writer::Backing for BackingChain {
    fn is_zero(&mut self, off: u64, len: u64) -> Result<bool, String> {
        let end = (off + len).min(self.0[0].size());
        is_zero_range(&mut self.0, off, end.saturating_sub(off))
            .map_err(|f| f.msg.unwrap_or_default())
    }

    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        buf.fill(0);
        let size = self.0[0].size();
        if off >= size {
            return Ok(());
        }
        let n = ((size - off) as usize).min(buf.len());
        read_chain(&mut self.0, off, &mut buf[..n]).map_err(|f| f.msg.unwrap_or_default())
    }
}

/// Convert with `-c` into a qcow2 image that does not read as zeroes to
/// qemu-img: a new one with a backing file (`-B`, `backing`: its size), or
/// an empty one that exists (`-n`); without `-c`, [`fast_qcow2`] does the
/// same with [`Zeroes`]. As qemu-img: with `-B` the block status of each
/// source above its own backing file (so an overlay's unallocated clusters
/// stay unallocated: the new backing file shows through, as qemu-img
/// assumes it holds what the old one did; past the backing file's end
/// zeroes are left alone); zero extents written as zeroes (zero clusters,
/// as QEMU's zero writes make them); data extents cluster by cluster,
/// compressed, zero clusters written as zeroes. The writer places every
/// request as QEMU's allocator would,
/// copying the backing file into the rest of clusters written in part.
#[allow(clippy::too_many_arguments)]
fn convert_writing_zeroes(
    w: &mut vcore::image::qcow2::writer::SeqWriter,
    sources: &mut [Vec<Layer>],
    total: u64,
    backing: Option<u64>,
    sparse: u64,
    ctype: u8,
    rate: u64,
    progress: bool,
    salvage: Option<bool>,
) -> Result<(), String> {
    let cs = w.header().cluster_size();
    let mut z = crate::compress::Compressor::new(ctype);
    let msg = |f: Failure| f.msg.unwrap_or_default();
    let mut throttle = Throttle::new(rate);
    let mut prog = Progress {
        on: progress,
        total,
        last: -1,
    };
    let mut buf = Vec::new();
    let mut base = 0u64;
    for src in sources.iter_mut() {
        let size = src[0].size();
        let mut off = 0u64;
        while off < size {
            let g = base + off;
            let (e, mut n, zero) = target_extent(src, off, g, Some(Zeroes { backing }))?;
            // (data, zero; else it shows the backing file); one cluster
            // at least, whole clusters (qemu-img's rule for -c).
            let (mut data, mut zero) = (!e.zero, zero);
            if n < cs {
                n = cs.min(size - off);
                (data, zero) = (true, false);
            } else {
                n = n / cs * cs;
            }
            // -S 0: zeroes written as data.
            let zero_data = zero && sparse == 0;
            if zero && !zero_data {
                w.zero(g, n)?;
            } else if data || zero_data {
                let mut c = 0u64;
                while c < n {
                    let len = (n - c).min(cs);
                    let gc = g + c;
                    buf.clear();
                    buf.resize(len as usize, 0);
                    if !zero_data {
                        read_src(src, off + c, &mut buf, salvage).map_err(msg)?;
                    }
                    if sparse != 0 && is_zero(&buf) {
                        w.zero(gc, len)?;
                    } else {
                        let mut cl = buf.clone();
                        cl.resize(cs as usize, 0);
                        match z.compress(&cl) {
                            Some(d) => {
                                throttle.wait(d.len() as u64);
                                w.write_compressed(gc / cs, &d)?;
                            }
                            None => {
                                throttle.wait(len);
                                w.write(gc, &buf)?;
                            }
                        }
                    }
                    c += len;
                }
            }
            off += n;
            prog.at(base + off);
        }
        base += size;
    }
    Ok(())
}

/// qemu-img convert's longest block status query (`BDRV_REQUEST_MAX_SECTORS`).
const REQ_MAX: u64 = (i32::MAX as u64 >> 9) << 9;

/// Zero-block scan of one window of a source: the runs of `[g, g + len)`
/// (guest offsets) that hold data, in blocks of `blk` bytes aligned to
/// the guest offset as qemu-img aligns them (a partial first block when
/// `g` is not aligned). `f`/`h`: the window's plain extent in a file; else
/// `bytes` holds its data.
fn window_runs(
    src: Option<(&File, u64)>,
    bytes: &[u8],
    g: u64,
    len: u64,
    blk: u64,
    map: bool,
    probe: &mut Vec<u8>,
) -> std::io::Result<Vec<(u64, u64)>> {
    let lead = ((blk - g % blk) % blk).min(len);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut add = |a: u64, b: u64| match out.last_mut() {
        Some(l) if l.1 == a => l.1 = b,
        _ => out.push((a, b)),
    };
    for (at, n, bk) in [(0, lead, lead), (lead, len - lead, blk)] {
        if n == 0 {
            continue;
        }
        let found = match src {
            Some((f, h)) => file_runs(f, h + at, n, bk as usize, map, probe)?,
            None => {
                let end = ((at + n) as usize).min(bytes.len());
                let part = bytes.get(at as usize..end).unwrap_or(&[]);
                nonzero_runs(part, bk as usize)
            }
        };
        for (a, b) in found {
            add(g + at + a as u64, g + at + b as u64);
        }
    }
    Ok(out)
}

/// qemu-img convert's write requests from data runs (guest offsets) of an
/// extent that starts at `origin`: the runs cut at its request grid
/// (`chunk` bytes from `origin`), zero gaps shorter than `sparse` inside
/// one request bridged (`is_allocated_sectors_min`).
fn requests(runs: &[(u64, u64)], origin: u64, chunk: u64, sparse: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in runs {
        let mut s = a;
        while s < b {
            let k = (s - origin) / chunk;
            let e = b.min(origin + (k + 1) * chunk);
            match out.last_mut() {
                Some(l) if (l.0 - origin) / chunk == k && s - l.1 < sparse => l.1 = e,
                _ => out.push((s, e)),
            }
            s = e;
        }
    }
    out
}

/// Convert into a qcow2 image without -c, laid out as qemu-img lays it
/// out: the extents of its block status queries (capped as qemu-img caps
/// them: at the end of the top layer's L2 table, and cut to its clusters;
/// with -B above the source's backing file, see [`convert_writing_zeroes`]),
/// zero ones skipped (written with `-S 0`, and as zero writes when the
/// target does not read as zeroes: [`Zeroes`], with the zero blocks of the
/// data requests' chunks),
/// data ones cut into qemu-img's requests (2 MiB from the extent's start)
/// and each request into its runs of non-zero `-S` blocks; every request
/// is placed by the writer's replay of QEMU's allocator, and its pieces
/// are copied file to file by the copier threads (plain extents) or
/// written here (compressed source clusters, and bytes for clusters that
/// must wait for [`SeqWriter::finish`]).
fn fast_qcow2(
    w: &mut vcore::image::qcow2::writer::SeqWriter,
    sources: &mut [Vec<Layer>],
    total: u64,
    sparse: u64,
    fast: &Fast,
    zeroes: Option<Zeroes>,
) -> Result<(), String> {
    let cs = w.header().cluster_size();
    let chunk = (2u64 << 20).max(cs);
    // -S 0 and -C: requests are whole; else blocks of -S bytes (a power
    // of two: qemu-img's alignment), gaps of -S bridged.
    let whole = sparse == 0 || !fast.scan;
    let blk = if whole {
        0
    } else {
        1u64 << (63 - sparse.leading_zeros())
    };
    let out = w.file().try_clone().map_err(|e| e.to_string())?;
    let mut prog = Progress {
        on: fast.progress,
        total,
        last: -1,
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut probe = Vec::new();
    let msg = |f: Failure| f.msg.unwrap_or_default();
    let os = |e: std::io::Error| vcore::image::qcow2::os_msg(&e);
    std::thread::scope(|sc| -> Result<(), String> {
        let mut o = Emit {
            pool: Pool::new(sc, &out, PREPARERS, fast.direct, fast.rate),
            opened: Vec::new(),
            copy: None,
        };
        // A request from a plain extent, placed when the next one is
        // known: (start, end, file, source offset, file length).
        let mut held: Option<(u64, u64, usize, u64, u64)> = None;
        let mut base = 0u64;
        for src in sources.iter_mut() {
            let size = src[0].size();
            let mut off = 0u64;
            while off < size {
                let g0 = base + off;
                // `zero`: zeroes to write (a target that does not read as
                // zeroes), else nothing to do (or, with -S 0, zeroes as
                // data below).
                let (e, n, zero) = target_extent(src, off, g0, zeroes)?;
                if e.zero && (sparse != 0 || (zeroes.is_some() && !zero)) {
                    if zero {
                        if let Some((pa, pb, i, h, l)) = held.take() {
                            o.emit(w, pa, pb, 0, Source::Plain(i, h, l))?;
                        }
                        w.zero(g0, n)?;
                    }
                    off += n;
                    prog.at(base + off);
                    continue;
                }
                // A plain extent: (its file among `o.opened`, host offset,
                // file length); the copier threads get a handle of their
                // own that stays open to the end.
                let mut plain = None;
                if let Some((f, h)) = plain_extent(src, &e).filter(|_| !e.zero) {
                    let fd = f.as_raw_fd();
                    let i = match o.opened.iter().position(|(x, _)| *x == fd) {
                        Some(i) => i,
                        None => {
                            o.opened.push((fd, f.try_clone().map_err(os)?));
                            o.opened.len() - 1
                        }
                    };
                    plain = Some((i, h, f.metadata().map_err(os)?.len()));
                }
                let win = if plain.is_some() { WINDOW } else { chunk };
                let mut ws = 0u64;
                while ws < n {
                    let wn = (n - ws).min(win);
                    let g = g0 + ws;
                    // The window's bytes, unless copied file to file.
                    let data: &[u8] = if plain.is_none() && !e.zero {
                        buf.clear();
                        buf.resize(wn as usize, 0);
                        read_src(src, off + ws, &mut buf, fast.salvage).map_err(msg)?;
                        &buf
                    } else {
                        &[]
                    };
                    let runs = if whole {
                        vec![(g, g + wn)]
                    } else {
                        let f = plain.map(|(i, h, _)| (&o.opened[i].1, h + ws));
                        window_runs(f, data, g, wn, blk, fast.map, &mut probe).map_err(os)?
                    };
                    let reqs = requests(&runs, g0, chunk, sparse.max(1));
                    // With zeroes to write: the rest of each request's
                    // chunk, as zero requests (`false`) between the data.
                    let reqs = match zeroes {
                        Some(_) if !whole => with_gaps(&reqs, g0, g, g + wn, chunk),
                        _ => reqs.into_iter().map(|(a, b)| (a, b, true)).collect(),
                    };
                    for (k, &(a, b, is_data)) in reqs.iter().enumerate() {
                        if let Some((pa, pb, i, h, l)) = held.take() {
                            let then = if is_data && a == pb { b } else { 0 };
                            o.emit(w, pa, pb, then, Source::Plain(i, h, l))?;
                        }
                        if !is_data {
                            w.zero(a, b - a)?;
                            continue;
                        }
                        let from = match plain {
                            _ if e.zero => Source::Zero,
                            Some((i, h, flen)) => {
                                held = Some((a, b, i, h + (a - g0), flen));
                                continue;
                            }
                            None => Source::Buf(&data[(a - g) as usize..(b - g) as usize]),
                        };
                        let then = match reqs.get(k + 1) {
                            Some(&(c, d, true)) if c == b => d,
                            _ => 0,
                        };
                        o.emit(w, a, b, then, from)?;
                    }
                    ws += wn;
                    prog.at(base + off + ws);
                }
                off += n;
            }
            base += size;
        }
        if let Some((pa, pb, i, h, l)) = held.take() {
            o.emit(w, pa, pb, 0, Source::Plain(i, h, l))?;
        }
        o.finish()
    })
}

/// A target that does not read as zeroes to qemu-img (see
/// [`convert_writing_zeroes`]): a new one with a backing file of this size
/// (`-B`), or one that exists (`-n`, `backing: None`).
#[derive(Clone, Copy)]
struct Zeroes {
    backing: Option<u64>,
}

/// [`qemu_extent`] at `off` of a source (guest offset `g`) for a target
/// as `zeroes` says: with -B above the source's backing file, and not past
/// the backing file's end. Also whether the extent is to be written as
/// zeroes (a zero extent of a target that does not read as zeroes, not
/// past the backing file's end, not where it shows through).
fn target_extent(
    src: &mut [Layer],
    off: u64,
    g: u64,
    zeroes: Option<Zeroes>,
) -> Result<(crate::map::Entry, u64, bool), String> {
    let size = src[0].size();
    let has_base = src.len() > 1;
    let top_only = zeroes.is_some_and(|z| z.backing.is_some());
    let tbs = zeroes
        .and_then(|z| z.backing)
        .map_or(u64::MAX, |b| b.next_multiple_of(512));
    let post = g >= tbs;
    let max = if post {
        size - off
    } else {
        (size - off).min(tbs - g)
    };
    let (e, n) = qemu_extent(src, off, max, top_only)?;
    let zero = zeroes.is_some() && e.zero && (e.present || !has_base || !top_only) && !post;
    Ok((e, n, zero))
}

/// Data requests (from [`requests`]) within `[from, to)` of an extent
/// that starts at `origin`, with the rest of each request's chunk as zero
/// requests: `(start, end, is data)` in order, as qemu-img's
/// `convert_co_write` splits a chunk into writes and zero writes.
fn with_gaps(
    reqs: &[(u64, u64)],
    origin: u64,
    from: u64,
    to: u64,
    chunk: u64,
) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut r = reqs.iter().peekable();
    let mut c = from;
    while c < to {
        let ce = (origin + ((c - origin) / chunk + 1) * chunk).min(to);
        let mut at = c;
        while let Some(&&(a, b)) = r.peek() {
            if a >= ce {
                break;
            }
            if a > at {
                out.push((at, a, false));
            }
            out.push((a, b, true));
            at = b;
            r.next();
        }
        if at < ce {
            out.push((at, ce, false));
        }
        c = ce;
    }
    out
}

/// Where the bytes of a request of [`fast_qcow2`] come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A plain extent: file (index into [`Emit::opened`]), the offset of
    /// the request's first byte there, the file's length.
    Plain(usize, u64, u64),
    /// Zeroes written as data (`-S 0`).
    Zero,
    /// These bytes.
    Buf(&'a [u8]),
}

/// The output side of [`fast_qcow2`]: requests placed, their bytes copied
/// by the pool or written here.
struct Emit<'s> {
    pool: Pool<'s>,
    /// Source files the pool reads from (kept open for its threads).
    opened: Vec<(std::os::fd::RawFd, File)>,
    /// A copy still growing: (file, source offset, host offset, bytes).
    copy: Option<(usize, u64, u64, u64)>,
}

impl Emit<'_> {
    /// Place request `[a, b)` (see [`SeqWriter::place`] for `then`) and
    /// write its bytes.
    fn emit(
        &mut self,
        w: &mut vcore::image::qcow2::writer::SeqWriter,
        a: u64,
        b: u64,
        then: u64,
        from: Source,
    ) -> Result<(), String> {
        let os = |e: std::io::Error| vcore::image::qcow2::os_msg(&e);
        for seg in w.place(a, b - a, then)? {
            let rel = seg.guest - a;
            match from {
                Source::Plain(i, h, flen) if !w.held(seg.host, seg.len) => {
                    // Bytes past the source file's end stay zero.
                    let n = seg.len.min(flen.saturating_sub(h + rel));
                    if n > 0 {
                        self.copy(i, h + rel, seg.host, n)?;
                    }
                }
                Source::Plain(i, h, _) => {
                    let mut v = vec![0u8; seg.len as usize];
                    let got = self.opened[i].1.read_at(&mut v, h + rel).map_err(os)?;
                    v[got..].fill(0);
                    w.write_at(seg.host, &v)?;
                }
                Source::Zero => {
                    self.pool.throttle(seg.len);
                    w.write_at(seg.host, &vec![0u8; seg.len as usize])?;
                }
                Source::Buf(d) => {
                    self.pool.throttle(seg.len);
                    w.write_at(seg.host, &d[rel as usize..(rel + seg.len) as usize])?;
                }
            }
        }
        Ok(())
    }

    /// Queue a copy; pieces that continue each other in the source and the
    /// target go out as one (what the copiers are made for).
    /// A copy grows up to [`WINDOW`] bytes, then goes out up to a 4 KiB
    /// boundary of the target, so that the next one starts aligned (the
    /// direct copier writes aligned jobs only; requests of a raw source
    /// past 2 GiB - 512 are not aligned).
    fn copy(&mut self, i: usize, src: u64, host: u64, n: u64) -> Result<(), String> {
        if let Some((pi, ps, ph, pn)) = &mut self.copy {
            if *pi == i && *ps + *pn == src && *ph + *pn == host {
                *pn += n;
                let cut = (*ph + *pn) / 4096 * 4096;
                if *pn >= WINDOW && cut > *ph {
                    let (fi, fs, fh, fc) = (*pi, *ps, *ph, cut - *ph);
                    *ps += fc;
                    *ph += fc;
                    *pn -= fc;
                    let rest = self.copy.take();
                    self.copy = Some((fi, fs, fh, fc));
                    self.flush()?;
                    self.copy = rest.filter(|r| r.3 > 0);
                }
                return Ok(());
            }
        }
        self.flush()?;
        self.copy = Some((i, src, host, n));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if let Some((i, s, h, n)) = self.copy.take() {
            self.pool
                .copy(&self.opened[i].1, s, h, n)
                .map_err(|(_, e)| vcore::image::qcow2::os_msg(&e))?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), String> {
        self.flush()?;
        self.pool
            .finish()
            .map_err(|(_, e)| vcore::image::qcow2::os_msg(&e))
    }
}
