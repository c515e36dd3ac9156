//! `vimg convert`: copy an image (or a concatenation of images) to a new
//! raw or qcow2 image, flattening backing chains (`-B` keeps one), sparse by
//! default (`-S`), with progress (`-p`).

use crate::common::{fail, parse_opts, R};
use crate::map::{open_chain, read_chain, Layer};
use std::io::Write;
use std::path::Path;
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
    pub files: Vec<String>,
}

const CHUNK: u64 = 2 << 20;

fn progress(p: f64) {
    print!("    ({p:.2}/100%)\r");
    let _ = std::io::stdout().flush();
}

/// Run `convert`.
pub fn run(a: ConvertArgs) -> R<()> {
    if a.files.len() < 2 {
        return Err(fail("Expecting one image file name"));
    }
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
                .map_err(|_| fail(format!("Invalid buffer size for sparse output specified")))?;
            if v != 0 && (v % 512 != 0 || v > CHUNK) {
                return Err(fail("Invalid buffer size for sparse output specified"));
            }
            v
        }
    };
    if a.compress && out_fmt != Format::Qcow2 {
        return Err(fail("Compression not supported for this file format"));
    }
    if a.compress {
        return Err(fail(
            "Compressed output (-c) is not supported by this version of vimg",
        ));
    }
    if a.backing.is_some() && a.backing_fmt.is_none() && !a.no_create {
        return Err(fail(format!(
            "{dst}: Backing file specified without backing format"
        )));
    }
    let mut sources: Vec<Vec<Layer>> = Vec::new();
    for s in srcs {
        sources.push(open_chain(s, in_fmt, a.force_share)?);
    }
    let total: u64 = sources.iter().map(|l| l[0].size()).sum();
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
        })?;
    }
    let oopts = OpenOptions {
        format: Some(out_fmt),
        read_only: false,
        ..Default::default()
    };
    let tfile = image::open_file(Path::new(dst), &oopts)
        .map_err(|e| fail(crate::common::open_error_text(&e)))?;
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
        return Err(fail(format!("Target image ({dst}) is too small")));
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
    let fresh = !a.no_create;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut bbuf = vec![0u8; CHUNK as usize];
    let mut base = 0u64;
    let mut last_pct = -1i64;
    if a.progress {
        progress(0.0);
    }
    for src in sources.iter_mut() {
        let size = src[0].size();
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(CHUNK) as usize;
            read_chain(src, off, &mut buf[..n]).map_err(|e| {
                fail(format!(
                    "error while reading at byte {}: {}",
                    off,
                    e.msg.unwrap_or_default()
                ))
            })?;
            let have_backing = if let Some(bl) = backing.as_mut() {
                let bsize = bl[0].size();
                let bn = if base + off < bsize {
                    ((bsize - base - off) as usize).min(n)
                } else {
                    0
                };
                bbuf[..n].fill(0);
                if bn > 0 {
                    read_chain(bl, base + off, &mut bbuf[..bn])?;
                }
                true
            } else {
                false
            };
            // Walk blocks of `sparse` bytes (or the whole chunk with -S 0).
            let blk = if sparse == 0 { n } else { sparse as usize };
            let mut i = 0usize;
            while i < n {
                // Gather a run of blocks that must be written.
                let skip = |i: usize| -> bool {
                    let e = (i + blk).min(n);
                    if have_backing {
                        buf[i..e] == bbuf[i..e]
                    } else {
                        sparse != 0 && fresh && buf[i..e].iter().all(|&b| b == 0)
                    }
                };
                if skip(i) {
                    i += blk;
                    continue;
                }
                let start = i;
                while i < n && !skip(i) {
                    i += blk;
                }
                let end = i.min(n);
                let at = base + off + start as u64;
                if !fresh && !have_backing && buf[start..end].iter().all(|&b| b == 0) {
                    target
                        .write_zeroes(at, (end - start) as u64)
                        .map_err(|e| fail(format!("error while writing at byte {at}: {e}")))?;
                } else {
                    target
                        .write_at(&buf[start..end], at)
                        .map_err(|e| fail(format!("error while writing at byte {at}: {e}")))?;
                }
            }
            off += n as u64;
            if a.progress && total > 0 {
                let pct = ((base + off) * 100 / total) as i64;
                if pct != last_pct {
                    last_pct = pct;
                    progress((base + off) as f64 * 100.0 / total as f64);
                }
            }
        }
        base += size;
    }
    target
        .flush()
        .map_err(|e| fail(format!("error while flushing {dst}: {e}")))?;
    if a.progress {
        println!("    (100.00/100%)");
    }
    Ok(())
}
