//! Cluster compression exactly as QEMU reads it: zlib as raw deflate with a
//! 4 KiB window (QEMU inflates with windowBits -12, so a larger window would
//! make clusters unreadable for it), zstd as one frame.

/// Compress one cluster; `None` when the result would not be smaller than
/// `cluster_size - 1` bytes (QEMU then stores the cluster uncompressed).
pub fn compress(ctype: u8, data: &[u8]) -> Option<Vec<u8>> {
    let limit = data.len().saturating_sub(1);
    if ctype == 1 {
        let out = zstd::bulk::compress(data, 0).ok()?;
        return (out.len() <= limit).then_some(out);
    }
    let mut c = flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
    let mut out = Vec::with_capacity(limit);
    match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) if out.len() <= limit => Some(out),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn roundtrip_and_incompressible() {
        let text = b"some text that compresses well ".repeat(2200);
        let data = &text[..65536];
        for t in [0u8, 1] {
            let z = super::compress(t, data).unwrap();
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
        assert!(super::compress(0, &rnd).is_none());
    }
}
