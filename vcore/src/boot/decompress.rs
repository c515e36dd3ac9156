//! Host-side decompression of a bzImage's payload into its ELF vmlinux.
//!
//! A bzImage carries the kernel as a compressed ELF (`payload_offset` and
//! `payload_length` in the setup header, boot protocol 2.08+). Running the
//! kernel's own decompressor in the guest costs tens to hundreds of
//! milliseconds on real hardware and minutes on hosts where guest kernel
//! code is emulated, so vmrun unpacks it on the host and enters the ELF
//! directly. Results are cached by the bzImage's SHA-256.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Errors from unpacking a bzImage.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// Not a bzImage (no `HdrS` magic) or too old to carry a payload offset.
    #[error("not a bzImage with a boot protocol 2.08+ header")]
    NotBzImage,
    /// The payload lies outside the file.
    #[error("payload offset {offset:#x}+{len:#x} is outside the {size}-byte file")]
    BadPayload { offset: u64, len: u64, size: u64 },
    /// A compression we do not unpack.
    #[error("{0} payload not supported on the host; use -kernel-decompress guest")]
    Unsupported(&'static str),
    /// The decoder failed.
    #[error("{method} payload is corrupt: {source}")]
    Corrupt {
        method: &'static str,
        source: std::io::Error,
    },
    /// The decompressed payload is not an ELF file.
    #[error("the decompressed payload is not an ELF file")]
    NotElf,
}

/// Compression method of a payload, from its magic bytes.
pub fn method(payload: &[u8]) -> &'static str {
    match payload {
        [0x1f, 0x8b, ..] => "gzip",
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "xz",
        [0x5d, 0, 0, ..] => "lzma",
        [b'B', b'Z', b'h', ..] => "bzip2",
        [0x02, 0x21, 0x4c, 0x18, ..] => "lz4",
        [0x89, b'L', b'Z', b'O', ..] => "lzo",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0x7f, b'E', b'L', b'F', ..] => "none",
        _ => "unknown",
    }
}

/// Whether `image` looks like a bzImage (boot sector signature and `HdrS`).
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() > 0x250 && image[0x1fe..0x200] == [0x55, 0xaa] && &image[0x202..0x206] == b"HdrS"
}

/// The compressed payload inside a bzImage.
pub fn payload(image: &[u8]) -> Result<&[u8], DecompressError> {
    if !is_bzimage(image) {
        return Err(DecompressError::NotBzImage);
    }
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x208 {
        return Err(DecompressError::NotBzImage);
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let off = u64::from(u32::from_le_bytes(
        image[0x248..0x24c].try_into().unwrap_or_default(),
    ));
    let len = u64::from(u32::from_le_bytes(
        image[0x24c..0x250].try_into().unwrap_or_default(),
    ));
    let start = (setup_sects + 1) * 512 + off;
    let size = image.len() as u64;
    match start.checked_add(len) {
        Some(end) if end <= size && len > 0 => Ok(&image[start as usize..end as usize]),
        _ => Err(DecompressError::BadPayload {
            offset: start,
            len,
            size,
        }),
    }
}

fn corrupt(method: &'static str) -> impl FnOnce(std::io::Error) -> DecompressError {
    move |source| DecompressError::Corrupt { method, source }
}

/// The kernel's lz4 "legacy" framing: magic, then blocks each preceded by
/// its compressed size (lz4_flex only reads the modern frame format).
fn lz4_legacy(data: &[u8]) -> std::io::Result<Vec<u8>> {
    const BLOCK: usize = 8 << 20;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut out = Vec::new();
    let mut pos = 4;
    let mut buf = vec![0u8; BLOCK];
    while pos + 4 <= data.len() {
        let n = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        if n == 0x184c_2102 {
            pos += 4; // a concatenated stream starts again
            continue;
        }
        pos += 4;
        if n == 0 || pos + n > data.len() {
            // The kernel appends the uncompressed size after the last block.
            break;
        }
        let got = lz4_flex::block::decompress_into(&data[pos..pos + n], &mut buf)
            .map_err(|e| bad(&e.to_string()))?;
        out.extend_from_slice(&buf[..got]);
        pos += n;
    }
    if out.is_empty() {
        return Err(bad("no lz4 blocks"));
    }
    Ok(out)
}

/// Decompress a payload into the ELF it holds.
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, DecompressError> {
    let m = method(payload);
    let mut out = Vec::with_capacity(payload.len() * 4);
    match m {
        "gzip" => {
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(corrupt(m))?;
        }
        "xz" => {
            // The kernel uses CRC32 and a BCJ filter; liblzma handles both.
            let mut d = xz2::read::XzDecoder::new_multi_decoder(payload);
            d.read_to_end(&mut out).map_err(corrupt(m))?;
        }
        "lzma" => {
            let stream = xz2::stream::Stream::new_lzma_decoder(u64::MAX)
                .map_err(|e| corrupt(m)(std::io::Error::other(e)))?;
            xz2::read::XzDecoder::new_stream(payload, stream)
                .read_to_end(&mut out)
                .map_err(corrupt(m))?;
        }
        "bzip2" => {
            bzip2::read::BzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(corrupt(m))?;
        }
        "zstd" => {
            // The kernel appends the 4-byte uncompressed size after the
            // frame; decode the first frame only.
            let mut d = zstd::stream::read::Decoder::new(payload)
                .map_err(corrupt(m))?
                .single_frame();
            d.read_to_end(&mut out).map_err(corrupt(m))?;
        }
        "lz4" => out = lz4_legacy(payload).map_err(corrupt(m))?,
        "none" => out.extend_from_slice(payload),
        "lzo" => return Err(DecompressError::Unsupported("lzo")),
        _ => return Err(DecompressError::Unsupported("unknown compression")),
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(DecompressError::NotElf);
    }
    Ok(out)
}

/// Directory of the decompressed-kernel cache: `$VMRUN_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/vmrun/kernels`, else `~/.cache/vmrun/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("VMRUN_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("vmrun").join("kernels"))
}

/// Unpack `image` (a bzImage), using and filling the cache in `cache`.
/// Returns the ELF and whether it came from the cache.
pub fn unpack_cached(
    image: &[u8],
    cache: Option<&Path>,
) -> Result<(Vec<u8>, bool), DecompressError> {
    let key = format!("{:x}", Sha256::digest(image));
    let cached = cache.map(|d| d.join(format!("{key}.elf")));
    if let Some(p) = &cached {
        if let Ok(elf) = fs::read(p) {
            if elf.starts_with(b"\x7fELF") {
                return Ok((elf, true));
            }
        }
    }
    let elf = decompress(payload(image)?)?;
    if let (Some(dir), Some(p)) = (cache, &cached) {
        // The cache is an optimisation: failing to write it is not an error.
        let _ = fs::create_dir_all(dir).and_then(|_| {
            let tmp = dir.join(format!(".{key}.{}", std::process::id()));
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&elf)?;
            fs::rename(&tmp, p)
        });
    }
    Ok((elf, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_elf() -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend((0..100_000u32).map(|i| (i % 251) as u8));
        v
    }

    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4;
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 16]);
        img.extend_from_slice(payload);
        img.extend_from_slice(&[1, 2, 3, 4]); // the size trailer
        img
    }

    #[test]
    fn every_supported_method_round_trips() {
        let elf = fake_elf();
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&elf).unwrap();
            e.finish().unwrap()
        };
        let xz = {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(&elf).unwrap();
            e.finish().unwrap()
        };
        let lzma = {
            let opts = xz2::stream::LzmaOptions::new_preset(1).unwrap();
            let s = xz2::stream::Stream::new_lzma_encoder(&opts).unwrap();
            let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), s);
            e.write_all(&elf).unwrap();
            e.finish().unwrap()
        };
        let bz = {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(&elf).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&elf[..], 1).unwrap();
        let lz4 = {
            let block = lz4_flex::block::compress(&elf);
            let mut v = vec![0x02, 0x21, 0x4c, 0x18];
            v.extend_from_slice(&(block.len() as u32).to_le_bytes());
            v.extend_from_slice(&block);
            v
        };
        for (name, p) in [
            ("gzip", gz),
            ("xz", xz),
            ("lzma", lzma),
            ("bzip2", bz),
            ("zstd", zst),
            ("lz4", lz4),
        ] {
            assert_eq!(method(&p), name);
            let img = fake_bzimage(&p);
            assert_eq!(payload(&img).unwrap(), &p[..]);
            assert_eq!(decompress(payload(&img).unwrap()).unwrap(), elf, "{name}");
        }
    }

    #[test]
    fn errors() {
        assert!(matches!(
            payload(b"not a kernel"),
            Err(DecompressError::NotBzImage)
        ));
        let mut img = fake_bzimage(b"\x89LZOxxxx");
        assert!(matches!(
            decompress(payload(&img).unwrap()),
            Err(DecompressError::Unsupported("lzo"))
        ));
        img[0x24c..0x250].copy_from_slice(&0x0fff_ffff_u32.to_le_bytes());
        assert!(matches!(
            payload(&img),
            Err(DecompressError::BadPayload { .. })
        ));
        let gz_not_elf = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(b"hello").unwrap();
            e.finish().unwrap()
        };
        assert!(matches!(
            decompress(&gz_not_elf),
            Err(DecompressError::NotElf)
        ));
        assert!(matches!(
            decompress(&[0x1f, 0x8b, 0, 0]),
            Err(DecompressError::Corrupt { .. })
        ));
    }

    #[test]
    fn cache_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let img = fake_bzimage(&zstd::encode_all(&fake_elf()[..], 1).unwrap());
        let (a, hit_a) = unpack_cached(&img, Some(dir.path())).unwrap();
        let (b, hit_b) = unpack_cached(&img, Some(dir.path())).unwrap();
        assert!(!hit_a);
        assert!(hit_b);
        assert_eq!(a, b);
    }
}
