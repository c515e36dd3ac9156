//! `vimg compare [-s] A B`: 0 identical, 1 different, 2 error (qemu-img's
//! messages; mismatches are reported at 512-byte granularity).

use crate::map::{is_zero_range, open_chain, read_chain, status, Layer};
use vcore::image::Format;

const CHUNK: usize = 256 << 10;

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
    let mut off = 0u64;
    while off < common {
        let mut n = (common - off).min(CHUNK as u64) as usize;
        // Follow block status: skip where both sides read as zeroes, and
        // read only up to the next change of state.
        if let (Ok(ea), Ok(eb)) = (status(&mut a, off, n as u64), status(&mut b, off, n as u64)) {
            let run = ea.length.min(eb.length).clamp(1, n as u64);
            if ea.zero && eb.zero {
                off += run;
                continue;
            }
            if ea.zero || eb.zero {
                n = run as usize;
            }
        }
        if let Err(e) = read_chain(&mut a, off, &mut b1[..n]) {
            eprintln!(
                "vimg: Error while reading offset {off} of {f1}: {}",
                e.msg.unwrap_or_default()
            );
            return 2;
        }
        if let Err(e) = read_chain(&mut b, off, &mut b2[..n]) {
            eprintln!(
                "vimg: Error while reading offset {off} of {f2}: {}",
                e.msg.unwrap_or_default()
            );
            return 2;
        }
        if b1[..n] != b2[..n] {
            let i = b1[..n]
                .iter()
                .zip(&b2[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0) as u64;
            say(format!(
                "Content mismatch at offset {}!",
                (off + i) / 512 * 512
            ));
            return 1;
        }
        off += n as u64;
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
