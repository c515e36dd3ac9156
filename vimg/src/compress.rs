//! Cluster compression exactly as QEMU writes it (`qcow2_co_compress`):
//! zlib as raw deflate with a 4 KiB window (QEMU inflates with windowBits
//! -12, so a larger window would make clusters unreadable for it) and
//! memLevel 9, through the system zlib as QEMU's; zstd as one frame at the
//! default level. The same bytes as QEMU's, so `convert -c` writes QEMU's
//! file. (flate2 cannot set memLevel, and its fast zlib-rs backend deflates
//! to other bytes: same format, another file.)

use libz_sys as z;
use std::os::raw::c_int;

/// A reusable compressor (one per worker thread: contexts are expensive).
pub struct Compressor {
    ctype: u8,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    deflate: Option<Deflate>,
}

impl Compressor {
    /// For compression type 0 (zlib) or 1 (zstd).
    pub fn new(ctype: u8) -> Self {
        Compressor {
            ctype,
            zstd: if ctype == 1 {
                zstd::bulk::Compressor::new(0).ok()
            } else {
                None
            },
            deflate: if ctype == 1 { None } else { Deflate::new() },
        }
    }

    /// Compress one cluster; `None` when the result would not be smaller
    /// than `cluster_size - 1` bytes (QEMU then stores it uncompressed).
    pub fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let limit = data.len().saturating_sub(1);
        if self.ctype == 1 {
            let z = self.zstd.as_mut()?;
            let out = z.compress(data).ok()?;
            return (out.len() <= limit).then_some(out);
        }
        self.deflate.as_mut()?.compress(data, limit)
    }
}

/// A raw deflate stream of the system zlib, set up as QEMU's
/// `qcow2_zlib_compress` sets it up.
struct Deflate {
    /// Boxed: zlib keeps a pointer to the stream in its state.
    strm: Box<z::z_stream>,
}

unsafe extern "C" fn zalloc(_: z::voidpf, items: z::uInt, size: z::uInt) -> z::voidpf {
    // SAFETY: calloc accepts any counts (returns NULL when it cannot
    // allocate, which zlib handles).
    unsafe { libc::calloc(items as usize, size as usize) }
}

unsafe extern "C" fn zfree(_: z::voidpf, p: z::voidpf) {
    // SAFETY: `p` was allocated by `zalloc` (zlib frees only what it got).
    unsafe { libc::free(p) }
}

impl Deflate {
    fn new() -> Option<Deflate> {
        let mut strm = Box::new(z::z_stream {
            next_in: std::ptr::null_mut(),
            avail_in: 0,
            total_in: 0,
            next_out: std::ptr::null_mut(),
            avail_out: 0,
            total_out: 0,
            msg: std::ptr::null_mut(),
            state: std::ptr::null_mut(),
            zalloc,
            zfree,
            opaque: std::ptr::null_mut(),
            data_type: 0,
            adler: 0,
            reserved: 0,
        });
        // SAFETY: `strm` is a fully initialized stream at a stable heap
        // address for its whole life; the version and size are this
        // library's own, as deflateInit2() passes them.
        let rc = unsafe {
            z::deflateInit2_(
                &mut *strm,
                z::Z_DEFAULT_COMPRESSION,
                z::Z_DEFLATED,
                -12,
                9,
                z::Z_DEFAULT_STRATEGY,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        (rc == z::Z_OK).then_some(Deflate { strm })
    }

    /// `data` deflated into at most `limit` bytes, as one stream; `None`
    /// when it does not fit.
    fn compress(&mut self, data: &[u8], limit: usize) -> Option<Vec<u8>> {
        let s = &mut *self.strm;
        // SAFETY: the stream was set up by deflateInit2_.
        if unsafe { z::deflateReset(s) } != z::Z_OK {
            return None;
        }
        let mut out = vec![0u8; limit];
        s.next_in = data.as_ptr() as *mut u8;
        s.avail_in = data.len() as z::uInt;
        s.next_out = out.as_mut_ptr();
        s.avail_out = limit as z::uInt;
        // SAFETY: next_in/avail_in describe `data` (deflate only reads
        // it), next_out/avail_out describe `out`; both outlive the call,
        // and the pointers are cleared before they could dangle.
        let rc = unsafe { z::deflate(s, z::Z_FINISH) };
        let n = limit - s.avail_out as usize;
        s.next_in = std::ptr::null_mut();
        s.next_out = std::ptr::null_mut();
        s.avail_in = 0;
        s.avail_out = 0;
        if rc != z::Z_STREAM_END {
            return None;
        }
        out.truncate(n);
        Some(out)
    }
}

impl Drop for Deflate {
    fn drop(&mut self) {
        // SAFETY: the stream was set up by deflateInit2_ and is not used
        // again.
        unsafe {
            z::deflateEnd(&mut *self.strm);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn roundtrip_and_incompressible() {
        let text = b"some text that compresses well ".repeat(2200);
        let data = &text[..65536];
        for t in [0u8, 1] {
            let mut c = super::Compressor::new(t);
            let z = c.compress(data).unwrap();
            assert_eq!(c.compress(data).unwrap(), z, "reused state");
            assert!(z.len() < 4096);
            let mut out = vec![0u8; 65536];
            vcore::image::qcow2::map::decompress(t, &z, &mut out).unwrap();
            assert_eq!(&out[..], data);
        }
        let mut x = 0x1234_5678_9abc_def0u64;
        let rnd: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(super::Compressor::new(0).compress(&rnd).is_none());
        // Small clusters of random data (zlib-rs panicked on these when
        // the output buffer held just the cluster size - 1).
        for n in [512usize, 1024, 4096] {
            assert!(super::Compressor::new(0).compress(&rnd[..n]).is_none());
        }
    }
}
