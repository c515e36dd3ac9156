//! Cluster compression exactly as QEMU reads it: zlib as raw deflate with a
//! 4 KiB window (QEMU inflates with windowBits -12, so a larger window would
//! make clusters unreadable for it), zstd as one frame.

/// A reusable compressor (one per worker thread: contexts are expensive).
pub struct Compressor {
    ctype: u8,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    deflate: flate2::Compress,
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
            deflate: flate2::Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                12,
            ),
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
        self.deflate.reset();
        let mut out = Vec::with_capacity(limit);
        match self
            .deflate
            .compress_vec(data, &mut out, flate2::FlushCompress::Finish)
        {
            Ok(flate2::Status::StreamEnd) if out.len() <= limit => Some(out),
            _ => None,
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
    }
}
