//! `vimg map`: allocation map of an image and its backing chain, printed
//! like qemu-img (human table of data ranges, or one JSON object per range).

use crate::common::{fail, open_error_text, R};
use std::fs::File;
use std::path::Path;
use vcore::image::qcow2::map::{Kind, Mapper};
use vcore::image::qcow2::meta::Header;
use vcore::image::raw::RawDevice;
use vcore::image::{self, Allocation, BlockDevice, Format, OpenOptions};

/// One layer of a backing chain, for block-status queries.
#[allow(clippy::large_enum_variant)]
pub enum Layer {
    Raw {
        dev: RawDevice,
        name: String,
    },
    Qcow2 {
        m: Mapper,
        name: String,
        size: u64,
        meta_prealloc: bool,
    },
}

impl Layer {
    pub fn size(&self) -> u64 {
        match self {
            Layer::Raw { dev, .. } => dev.size(),
            Layer::Qcow2 { size, .. } => *size,
        }
    }
    pub fn name(&self) -> &str {
        match self {
            Layer::Raw { name, .. } | Layer::Qcow2 { name, .. } => name,
        }
    }
}

/// Open an image and its backing chain as layers (top first).
pub fn open_chain(path: &str, fmt: Option<Format>, force_share: bool) -> R<Vec<Layer>> {
    let mut layers = Vec::new();
    let mut cur = (path.to_string(), fmt);
    let mut seen = Vec::new();
    loop {
        let canon = std::fs::canonicalize(&cur.0).unwrap_or_else(|_| cur.0.clone().into());
        if seen.contains(&canon) || seen.len() > 32 {
            return Err(fail(format!(
                "Could not open '{path}': Backing file '{}' creates an infinite loop.",
                cur.0
            )));
        }
        seen.push(canon);
        let opts = OpenOptions {
            format: cur.1,
            read_only: true,
            force_share,
            ..Default::default()
        };
        let f: File =
            image::open_file(Path::new(&cur.0), &opts).map_err(|e| fail(open_error_text(&e)))?;
        let format = match cur.1 {
            Some(f) => f,
            None => image::probe_file(&f).map_err(|e| fail(open_error_text(&e)))?,
        };
        match format {
            Format::Raw => {
                let dev = RawDevice::from_file(f, true).map_err(|e| fail(open_error_text(&e)))?;
                layers.push(Layer::Raw {
                    dev,
                    name: cur.0.clone(),
                });
                break;
            }
            Format::Qcow2 => {
                let h = Header::read(&f)
                    .map_err(|m| fail(format!("Could not open '{}': {m}", cur.0)))?;
                let m = Mapper::new(&f, &h)
                    .map_err(|e| fail(format!("Could not open '{}': {e}", cur.0)))?;
                let next = h.backing_file.as_ref().map(|b| {
                    (
                        image::resolve_backing(Path::new(&cur.0), b)
                            .display()
                            .to_string(),
                        h.backing_format.as_deref().and_then(Format::from_name),
                    )
                });
                let meta_prealloc =
                    vcore::image::qcow2::check::detect_metadata_preallocation(&f).unwrap_or(false);
                layers.push(Layer::Qcow2 {
                    m,
                    name: cur.0.clone(),
                    size: h.size,
                    meta_prealloc,
                });
                match next {
                    Some(n) => cur = n,
                    None => break,
                }
            }
        }
    }
    Ok(layers)
}

/// A map entry (QEMU's MapEntry).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
    pub layer: usize,
    /// L2 entry of a compressed cluster.
    pub cl2e: Option<u64>,
}

/// Block status of `[off, off+max)` through the chain.
pub fn status(layers: &mut [Layer], off: u64, max: u64) -> R<Entry> {
    let mut depth = 0usize;
    let mut max = max;
    loop {
        let n_layers = layers.len();
        let layer = &mut layers[depth];
        let name = layer.name().to_string();
        let err = |e: std::io::Error| fail(format!("{name}: {e}"));
        let mk = |len: u64, present, zero, data, compressed, offset| Entry {
            start: off,
            length: len,
            depth: depth as u64,
            present,
            zero,
            data,
            compressed,
            offset,
            layer: depth,
            cl2e: None,
        };
        match layer {
            Layer::Raw { dev, .. } => {
                let (a, len) = dev
                    .mapping(off, max)
                    .map_err(|e| fail(format!("{name}: {e}")))?;
                let len = len.max(1).min(max);
                return Ok(match a {
                    Allocation::Data { .. } => mk(len, true, false, true, false, Some(off)),
                    _ => mk(len, true, true, false, false, Some(off)),
                });
            }
            Layer::Qcow2 {
                m, meta_prealloc, ..
            } => {
                let meta_prealloc = *meta_prealloc;
                let (k, len) = m.status(off, max).map_err(err)?;
                return Ok(match k {
                    Kind::Normal(h) if meta_prealloc => {
                        // Like QEMU on metadata-preallocated images: ask the
                        // file system whether the data cluster is a hole.
                        let (zero, flen) = file_zero_run(m.file(), h, len).map_err(err)?;
                        mk(flen, true, zero, true, false, Some(h))
                    }
                    Kind::Normal(h) => mk(len, true, false, true, false, Some(h)),
                    Kind::ZeroAlloc(h) => mk(len, true, true, false, false, Some(h)),
                    Kind::ZeroPlain => mk(len, true, true, false, false, None),
                    Kind::Compressed(l2e) => Entry {
                        cl2e: Some(l2e),
                        ..mk(len, true, false, true, true, None)
                    },
                    Kind::Unallocated => {
                        if depth + 1 < n_layers {
                            let bsize = layers[depth + 1].size();
                            if off < bsize {
                                max = len.min(bsize - off);
                                depth += 1;
                                continue;
                            }
                        }
                        mk(len, false, true, false, false, None)
                    }
                });
            }
        }
    }
}

fn mergeable(a: &Entry, b: &Entry) -> bool {
    a.depth == b.depth
        && a.present == b.present
        && a.zero == b.zero
        && a.data == b.data
        && a.compressed == b.compressed
        && a.layer == b.layer
        && match (a.offset, b.offset) {
            (None, None) => true,
            (Some(x), Some(y)) => x + a.length == y,
            _ => false,
        }
}

/// Run `map`.
pub fn run(file: &str, fmt: Option<&str>, json: bool, force_share: bool) -> R<()> {
    let fmt = match fmt {
        None => None,
        Some(s) => Some(
            Format::from_name(s)
                .ok_or_else(|| fail(format!("Could not open '{file}': Unknown driver '{s}'")))?,
        ),
    };
    let mut layers = open_chain(file, fmt, force_share)?;
    let size = layers[0].size();
    let names: Vec<String> = layers.iter().map(|l| l.name().to_string()).collect();
    let mut out = String::new();
    if json {
        out.push('[');
    } else {
        out.push_str(&format!(
            "{:<16}{:<16}{:<16}{}\n",
            "Offset", "Length", "Mapped to", "File"
        ));
    }
    let mut cur: Option<Entry> = None;
    let mut off = 0u64;
    let mut first = true;
    let emit = |e: &Entry, out: &mut String, first: &mut bool| -> R<()> {
        if json {
            if !*first {
                out.push_str(",\n");
            }
            out.push_str(&format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            ));
            if let Some(o) = e.offset {
                out.push_str(&format!(", \"offset\": {o}"));
            }
            out.push('}');
        } else {
            if e.data && e.offset.is_none() {
                return Err(fail(
                    "File contains external, encrypted or compressed clusters.",
                ));
            }
            if e.data && !e.zero {
                out.push_str(&format!(
                    "{:<16}{:<16}{:<16}{}\n",
                    hex(e.start),
                    hex(e.length),
                    hex(e.offset.unwrap_or(0)),
                    names[e.layer]
                ));
            }
        }
        *first = false;
        Ok(())
    };
    while off < size {
        let e = status(&mut layers, off, (size - off).min(1 << 30))?;
        off += e.length;
        match &mut cur {
            Some(c) if mergeable(c, &e) => c.length += e.length,
            _ => {
                if let Some(c) = cur.take() {
                    if let Err(f) = emit(&c, &mut out, &mut first) {
                        print!("{out}");
                        return Err(f);
                    }
                }
                cur = Some(e);
            }
        }
    }
    if let Some(c) = cur.take() {
        if let Err(f) = emit(&c, &mut out, &mut first) {
            print!("{out}");
            return Err(f);
        }
    }
    if json {
        out.push_str("]\n");
    }
    print!("{out}");
    Ok(())
}

/// C's `%#x`: `0` for zero, `0x..` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Read guest data through the chain (own read path: works for every image
/// the metadata parser accepts, including zstd and extended L2).
pub fn read_chain(layers: &mut [Layer], off: u64, buf: &mut [u8]) -> R<()> {
    use std::os::unix::fs::FileExt;
    let mut pos = 0usize;
    let mut cbuf: Vec<u8> = Vec::new();
    while pos < buf.len() {
        let at = off + pos as u64;
        let e = status(layers, at, (buf.len() - pos) as u64)?;
        let n = (e.length as usize).min(buf.len() - pos);
        let dst = &mut buf[pos..pos + n];
        let layer = &layers[e.layer];
        if e.compressed {
            if let (Layer::Qcow2 { m, name, .. }, Some(l2e)) = (layer, e.cl2e) {
                let cs = m.header().cluster_size();
                cbuf.resize(cs as usize, 0);
                m.read_compressed(l2e, &mut cbuf)
                    .map_err(|err| fail(format!("{name}: {err}")))?;
                let in_cl = (at % cs) as usize;
                dst.copy_from_slice(&cbuf[in_cl..in_cl + n]);
            }
        } else if e.data && !e.zero {
            let host = e.offset.unwrap_or(at);
            let file = match layer {
                Layer::Raw { dev, .. } => dev.file(),
                Layer::Qcow2 { m, .. } => m.file(),
            };
            let mut done = 0;
            while done < n {
                match file.read_at(&mut dst[done..], host + done as u64) {
                    Ok(0) => {
                        dst[done..].fill(0);
                        break;
                    }
                    Ok(k) => done += k,
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(fail(format!("{}: {err}", layer.name()))),
                }
            }
        } else {
            dst.fill(0);
        }
        pos += n;
    }
    Ok(())
}

/// Whether `[off, off+len)` of a file starts in a hole (or past EOF), and
/// how long that state lasts (at most `len`).
fn file_zero_run(f: &File, off: u64, len: u64) -> std::io::Result<(bool, u64)> {
    let flen = f.metadata()?.len();
    if off >= flen {
        return Ok((true, len));
    }
    let data = seek(f, off, libc::SEEK_DATA)?;
    match data {
        Some(d) if d == off => {
            let h = seek(f, off, libc::SEEK_HOLE)?.unwrap_or(flen);
            if h >= flen {
                Ok((false, (flen - off).clamp(1, len)))
            } else {
                Ok((false, (h - off).clamp(1, len)))
            }
        }
        Some(d) => Ok((true, (d - off).clamp(1, len))),
        None => Ok((true, len)),
    }
}

fn seek(f: &File, off: u64, whence: i32) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd; integer arguments only.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The file and host offset of a plain (uncompressed, non-zero) data
/// extent found by [`status`]: its bytes can be used straight from the file.
pub fn plain_extent<'a>(layers: &'a [Layer], e: &Entry) -> Option<(&'a File, u64)> {
    if e.zero || !e.data || e.compressed {
        return None;
    }
    let h = e.offset?;
    match layers.get(e.layer)? {
        Layer::Raw { dev, .. } => Some((dev.file(), h)),
        Layer::Qcow2 { m, .. } => Some((m.file(), h)),
    }
}

/// Whether `[off, off+len)` reads as zeroes according to block status
/// (without reading data).
pub fn is_zero_range(layers: &mut [Layer], off: u64, len: u64) -> R<bool> {
    let mut pos = off;
    let end = off + len;
    while pos < end {
        let e = status(layers, pos, end - pos)?;
        if !e.zero {
            return Ok(false);
        }
        pos += e.length.max(1);
    }
    Ok(true)
}
