//! `vimg compare [-s] A B`: 0 identical, 1 different, 2 error (qemu-img's
//! messages; mismatches are reported at 512-byte granularity).

use crate::fastcopy::{is_zero, Mapped, WINDOW};
use crate::map::{is_zero_range, open_chain, plain_extent, read_chain, status, Entry, Layer};
use vcore::image::Format;

const CHUNK: usize = 2 << 20;

/// Index of the first differing byte.
fn first_diff(x: &[u8], y: &[u8]) -> Option<usize> {
    const B: usize = 4096;
    let mut i = 0;
    while i < x.len() {
        let e = (i + B).min(x.len());
        if x[i..e] != y[i..e] {
            return x[i..e]
                .iter()
                .zip(&y[i..e])
                .position(|(p, q)| p != q)
                .map(|k| i + k);
        }
        i = e;
    }
    None
}

/// Index of the first non-zero byte.
fn first_nonzero(x: &[u8]) -> Option<usize> {
    const B: usize = 4096;
    let mut i = 0;
    while i < x.len() {
        let e = (i + B).min(x.len());
        if !is_zero(&x[i..e]) {
            return x[i..e].iter().position(|&p| p != 0).map(|k| i + k);
        }
        i = e;
    }
    None
}

fn fmt_arg(file: &str, f: Option<&str>) -> Result<Option<Format>, String> {
    match f {
        None => Ok(None),
        Some(s) => Format::from_name(s)
            .map(Some)
            .ok_or_else(|| format!("Could not open '{file}': Unknown driver '{s}'")),
    }
}

fn open(file: &str, f: Option<&str>, force_share: bool) -> Result<Vec<Layer>, String> {
    let fmt = fmt_arg(file, f)?;
    open_chain(file, fmt, force_share).map_err(|e| e.msg.unwrap_or_default())
}

/// Run `compare`; returns the exit code.
pub fn run(
    f1: &str,
    f2: &str,
    fmt1: Option<&str>,
    fmt2: Option<&str>,
    strict: bool,
    quiet: bool,
    force_share: bool,
) -> i32 {
    let say = |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    let (mut a, mut b) = match (open(f1, fmt1, force_share), open(f2, fmt2, force_share)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vimg: {e}");
            return 2;
        }
    };
    let (s1, s2) = (a[0].size(), b[0].size());
    let common = s1.min(s2);
    if strict && s1 != s2 {
        say("Strict mode: Image size mismatch!".into());
        return 1;
    }
    let mut b1 = vec![0u8; CHUNK];
    let mut b2 = vec![0u8; CHUNK];
    // Block status of each side, valid over [start, start + length).
    let mut ea: Option<Entry> = None;
    let mut eb: Option<Entry> = None;
    let mut off = 0u64;
    while off < common {
        let max = (common - off).min(1 << 30);
        for (e, l, name) in [(&mut ea, &mut a, f1), (&mut eb, &mut b, f2)] {
            if e.as_ref().is_none_or(|e| e.start + e.length <= off) {
                *e = match status(l, off, max) {
                    Ok(x) => Some(Entry {
                        length: x.length.clamp(1, max),
                        ..x
                    }),
                    Err(f) => {
                        eprintln!(
                            "vimg: Error while reading offset {off} of {name}: {}",
                            f.msg.unwrap_or_default()
                        );
                        return 2;
                    }
                };
            }
        }
        let (Some(xa), Some(xb)) = (&ea, &eb) else {
            return 2;
        };
        let run = (xa.start + xa.length).min(xb.start + xb.length) - off;
        if xa.zero && xb.zero {
            off += run;
            continue;
        }
        let mut n = run.min(WINDOW);
        // Data extents are compared through mappings of the files (no
        // copy); anything else is read into a buffer.
        let map = |e: &Entry, l: &[Layer], n: u64| -> Option<Mapped> {
            let (f, h) = plain_extent(l, e)?;
            Mapped::whole(f, h + (off - e.start), n)
        };
        let (ma, mb) = (map(xa, &a, n), map(xb, &b, n));
        let need_a = !xa.zero && ma.is_none();
        let need_b = !xb.zero && mb.is_none();
        if need_a || need_b {
            n = n.min(CHUNK as u64);
        }
        let nu = n as usize;
        if need_a {
            if let Err(e) = read_chain(&mut a, off, &mut b1[..nu]) {
                eprintln!(
                    "vimg: Error while reading offset {off} of {f1}: {}",
                    e.msg.unwrap_or_default()
                );
                return 2;
            }
        }
        if need_b {
            if let Err(e) = read_chain(&mut b, off, &mut b2[..nu]) {
                eprintln!(
                    "vimg: Error while reading offset {off} of {f2}: {}",
                    e.msg.unwrap_or_default()
                );
                return 2;
            }
        }
        let da: Option<&[u8]> = match (&ma, xa.zero) {
            (_, true) => None,
            (Some(m), _) => Some(&m.bytes()[..nu]),
            (None, _) => Some(&b1[..nu]),
        };
        let db: Option<&[u8]> = match (&mb, xb.zero) {
            (_, true) => None,
            (Some(m), _) => Some(&m.bytes()[..nu]),
            (None, _) => Some(&b2[..nu]),
        };
        let diff = match (da, db) {
            (Some(x), Some(y)) => first_diff(x, y),
            (Some(x), None) | (None, Some(x)) => first_nonzero(x),
            (None, None) => None,
        };
        if let Some(i) = diff {
            say(format!(
                "Content mismatch at offset {}!",
                (off + i as u64) / 512 * 512
            ));
            return 1;
        }
        off += n;
    }
    if s1 != s2 {
        if strict {
            say("Strict mode: Image size mismatch!".into());
            return 1;
        }
        say("Warning: Image size mismatch!".into());
        let (big, name, size) = if s1 > s2 {
            (&mut a, f1, s1)
        } else {
            (&mut b, f2, s2)
        };
        let mut off = common;
        while off < size {
            let n = (size - off).min(CHUNK as u64) as usize;
            if matches!(is_zero_range(big, off, n as u64), Ok(true)) {
                off += n as u64;
                continue;
            }
            if let Err(e) = read_chain(big, off, &mut b1[..n]) {
                eprintln!(
                    "vimg: Error while reading offset {off} of {name}: {}",
                    e.msg.unwrap_or_default()
                );
                return 2;
            }
            if let Some(i) = b1[..n].iter().position(|&x| x != 0) {
                say(format!(
                    "Content mismatch at offset {}!",
                    (off + i as u64) / 512 * 512
                ));
                return 1;
            }
            off += n as u64;
        }
    }
    say("Images are identical.".into());
    0
}
