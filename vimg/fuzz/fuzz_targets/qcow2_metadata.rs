//! Feed arbitrary bytes as a qcow2 image to the metadata parser, the
//! mapper, `check` and `check -r all`: they must return errors, never panic
//! or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use vcore::image::qcow2::{check, map::Mapper, meta};

fn memfile(data: &[u8]) -> Option<File> {
    // SAFETY: the name is a valid NUL-terminated string; flags are plain.
    let fd = unsafe { libc::memfd_create(c"qcow2".as_ptr(), 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(data).ok()?;
    Some(f)
}

fuzz_target!(|data: &[u8]| {
    let Some(f) = memfile(data) else { return };
    let Ok(h) = meta::Header::read(&f) else { return };
    let _ = meta::read_snapshots(&f, &h);
    if let Ok(mut m) = Mapper::new(&f, &h) {
        let mut off = 0u64;
        for _ in 0..64 {
            if off >= h.size {
                break;
            }
            match m.status(off, h.size - off) {
                Ok((_, len)) => off += len.max(1),
                Err(_) => break,
            }
        }
    }
    // Keep the work bounded for huge (but valid-looking) images.
    if h.l1_size <= 4096 && h.refcount_table_clusters <= 16 && h.nb_snapshots <= 16 {
        let _ = check::check(&f, check::Fix::NONE, &mut |_| {});
        let _ = check::check(&f, check::Fix::ALL, &mut |_| {});
    }
});
