//! Guest-offset → host-cluster lookups straight from the L1/L2 tables
//! (QEMU's cluster types), for `map`, `compare` and `convert`. Works on any
//! image the header parser accepts (also zstd and extended-L2 images).

use super::meta::{self, Header, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO};
use crate::image::raw::pread_full;
use std::fs::File;

/// Status of a guest range in one qcow2 layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Not allocated here (backing file or zeroes).
    Unallocated,
    /// Reads as zeroes, no host cluster.
    ZeroPlain,
    /// Reads as zeroes, host cluster preallocated at the offset.
    ZeroAlloc(u64),
    /// Data at the host offset.
    Normal(u64),
    /// Compressed data (L2 entry).
    Compressed(u64),
}

/// Reads L2 tables of one image, caching the last one.
pub struct Mapper {
    f: File,
    h: Header,
    l1: Vec<u64>,
    cache_off: u64,
    cache: Vec<u8>,
}

impl Mapper {
    /// Load the active L1 table.
    pub fn new(f: &File, h: &Header) -> std::io::Result<Mapper> {
        let f = f.try_clone()?;
        let mut b = vec![0u8; h.l1_size as usize * 8];
        pread_full(&f, &mut b, h.l1_table_offset)?;
        let l1 = b
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Ok(Mapper {
            f,
            h: h.clone(),
            l1,
            cache_off: u64::MAX,
            cache: Vec::new(),
        })
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.f
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.h
    }

    /// Status at `guest` and the number of bytes from `guest` (at most
    /// `max`) that share it (host offsets contiguous for data).
    pub fn status(&mut self, guest: u64, max: u64) -> std::io::Result<(Kind, u64)> {
        let cs = self.h.cluster_size();
        let sub = if self.h.extended_l2() { cs / 32 } else { cs };
        let mut first: Option<Kind> = None;
        let mut len = 0u64;
        let mut pos = guest;
        let l1_span = cs * self.h.l2_entries();
        while len < max {
            let k = self.unit(pos)?;
            // A whole missing L2 table is one unallocated step.
            let l1i = (pos / l1_span) as usize;
            let no_l2 = self.l1.get(l1i).is_none_or(|e| e & OFFSET_MASK == 0);
            let unit = if no_l2 { l1_span } else { sub };
            let in_unit = pos % unit;
            let step = (unit - in_unit).min(max - len);
            match first {
                None => first = Some(k),
                Some(f) => {
                    let cont = match (f, k) {
                        (Kind::Normal(a), Kind::Normal(b)) => b == a + len,
                        (Kind::ZeroAlloc(a), Kind::ZeroAlloc(b)) => b == a + len,
                        (Kind::Compressed(_), Kind::Compressed(_)) => false,
                        (a, b) => a == b,
                    };
                    if !cont {
                        break;
                    }
                }
            }
            len += step;
            pos += step;
            if len > (1 << 30) {
                break;
            }
        }
        Ok((first.unwrap_or(Kind::Unallocated), len.max(1).min(max)))
    }

    /// Kind of the cluster (or subcluster) containing `guest`, with the host
    /// offset adjusted to `guest`'s position.
    fn unit(&mut self, guest: u64) -> std::io::Result<Kind> {
        let h = &self.h;
        let cs = h.cluster_size();
        let l2_entries = h.l2_entries();
        let cl = guest / cs;
        let l1i = (cl / l2_entries) as usize;
        let l2i = cl % l2_entries;
        let Some(&l1e) = self.l1.get(l1i) else {
            return Ok(Kind::Unallocated);
        };
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Kind::Unallocated);
        }
        if self.cache_off != l2_off {
            let mut b = vec![0u8; cs as usize];
            pread_full(&self.f, &mut b, l2_off)?;
            self.cache = b;
            self.cache_off = l2_off;
        }
        let esz = h.l2_entry_size();
        let p = (l2i * esz) as usize;
        let e = u64::from_be_bytes(self.cache[p..p + 8].try_into().unwrap_or([0; 8]));
        let in_cl = guest % cs;
        if e & OFLAG_COMPRESSED != 0 {
            return Ok(Kind::Compressed(e));
        }
        let host = e & OFFSET_MASK;
        if h.extended_l2() {
            let bm = u64::from_be_bytes(self.cache[p + 8..p + 16].try_into().unwrap_or([0; 8]));
            let sc = in_cl / (cs / 32);
            if bm & (1 << (32 + sc)) != 0 {
                return Ok(Kind::ZeroPlain);
            }
            if bm & (1 << sc) != 0 && host != 0 {
                return Ok(Kind::Normal(host + in_cl));
            }
            return Ok(Kind::Unallocated);
        }
        if e & OFLAG_ZERO != 0 {
            return Ok(if host != 0 {
                Kind::ZeroAlloc(host + in_cl)
            } else {
                Kind::ZeroPlain
            });
        }
        if host == 0 {
            return Ok(Kind::Unallocated);
        }
        Ok(Kind::Normal(host + in_cl))
    }

    /// Read one whole cluster's worth of a compressed cluster into `out`
    /// (length = cluster size), decompressing zlib (raw deflate) or zstd.
    pub fn read_compressed(&self, l2e: u64, out: &mut [u8]) -> std::io::Result<()> {
        let (off, len) = meta::compressed_extent(&self.h, l2e);
        let mut buf = vec![0u8; len as usize];
        pread_full(&self.f, &mut buf, off)?;
        decompress(self.h.compression_type, &buf, out)
    }
}

/// Decompress one qcow2 cluster.
pub fn decompress(ctype: u8, input: &[u8], out: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad compressed cluster");
    if ctype == 1 {
        let mut d = zstd::stream::read::Decoder::new(input)?;
        let mut got = 0;
        while got < out.len() {
            match d.read(&mut out[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => return Err(bad()),
            }
        }
        if got != out.len() {
            return Err(bad());
        }
    } else {
        let mut d = flate2::read::DeflateDecoder::new(input);
        let mut got = 0;
        while got < out.len() {
            match d.read(&mut out[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => return Err(bad()),
            }
        }
        if got != out.len() {
            return Err(bad());
        }
    }
    Ok(())
}
