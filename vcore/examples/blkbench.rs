//! Block-backend benchmark: `qemu-img bench` semantics on `vcore::image`.
//!
//! ```text
//! blkbench [-c COUNT] [-d DEPTH] [-f FMT] [-n] [-o OFFSET] [-s SIZE] [-S STEP] [-w] FILE
//! ```
//!
//! Issues COUNT requests of SIZE bytes with DEPTH requests in flight (one
//! thread per in-flight request, like virtio-blk's worst case of a full
//! queue), starting at OFFSET and advancing by STEP, wrapping like
//! qemu-img bench (`offset %= size - bufsize`). `-w` writes, `-n` opens
//! with O_DIRECT (qemu-img's `-n`). Prints qemu-img bench's summary line
//! and the IOPS.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vcore::image::{self, BlockDevice, Format, OpenOptions};

struct Args {
    count: u64,
    depth: u64,
    format: Option<Format>,
    direct: bool,
    offset: u64,
    size: u64,
    step: Option<u64>,
    write: bool,
    file: PathBuf,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        count: 75000,
        depth: 64,
        format: None,
        direct: false,
        offset: 0,
        size: 4096,
        step: None,
        write: false,
        file: PathBuf::new(),
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, o: &str| -> Result<u64, String> {
        let v = v.ok_or(format!("{o} needs a value"))?;
        vcore::units::parse_size(&v, vcore::units::Suffix::B).map_err(|e| format!("{o} {v}: {e}"))
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "-c" => a.count = num(it.next(), "-c")?,
            "-d" => a.depth = num(it.next(), "-d")?.max(1),
            "-f" => {
                let v = it.next().unwrap_or_default();
                a.format = Some(Format::from_name(&v).ok_or(format!("-f {v}: unknown format"))?)
            }
            "-n" => a.direct = true,
            "-o" => a.offset = num(it.next(), "-o")?,
            "-s" => a.size = num(it.next(), "-s")?,
            "-S" => a.step = Some(num(it.next(), "-S")?),
            "-w" => a.write = true,
            f if !f.starts_with('-') => a.file = PathBuf::from(f),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.file.as_os_str().is_empty() {
        return Err("no image given".into());
    }
    Ok(a)
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("blkbench: {e}");
            std::process::exit(2);
        }
    };
    let opts = OpenOptions {
        format: a.format,
        read_only: !a.write,
        ..Default::default()
    };
    let dev: Arc<dyn BlockDevice> = match if a.direct {
        image::direct::open_direct(&a.file, &opts)
    } else {
        image::open(&a.file, &opts)
    } {
        Ok(d) => Arc::from(d),
        Err(e) => {
            eprintln!("blkbench: {e}");
            std::process::exit(1);
        }
    };
    let step = a.step.unwrap_or(a.size);
    let img = dev.size();
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        a.count,
        if a.write { "write" } else { "read" },
        a.size,
        a.depth,
        a.offset,
        step
    );
    // Offsets in qemu-img bench's order, handed out to the workers.
    let next = Arc::new(Mutex::new(a.offset));
    let issued = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..a.depth.min(a.count) {
        let (dev, next, issued) = (dev.clone(), next.clone(), issued.clone());
        let (count, size, write) = (a.count, a.size as usize, a.write);
        threads.push(std::thread::spawn(move || {
            let mut v = vec![0u8; size + 4096];
            let o = v.as_ptr().align_offset(4096);
            let buf = &mut v[o..o + size];
            if write {
                buf.fill(0xa5);
            }
            loop {
                if issued.fetch_add(1, Ordering::Relaxed) >= count {
                    break;
                }
                let off = {
                    let mut n = next.lock().unwrap();
                    let off = *n;
                    *n += step;
                    if img <= size as u64 {
                        *n = 0;
                    } else {
                        *n %= img - size as u64;
                    }
                    off
                };
                let r = if write {
                    dev.write_at(buf, off)
                } else {
                    dev.read_at(buf, off)
                };
                if let Err(e) = r {
                    eprintln!("blkbench: request at {off}: {e}");
                    std::process::exit(1);
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    // Like qemu-img bench, the final flush (at close) is not timed.
    let secs = t0.elapsed().as_secs_f64();
    if a.write {
        let _ = dev.flush();
    }
    println!("Run completed in {secs:.3} seconds.");
    println!("IOPS: {:.0}", a.count as f64 / secs);
}
