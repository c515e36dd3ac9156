//! QEMU-compatible image locking.
//!
//! QEMU (block/file-posix.c) takes open-file-description (OFD) byte-range
//! read locks on the image file: byte `100 + i` while it *uses* permission
//! bit `i`, and byte `200 + i` while it does *not share* permission bit `i`
//! with other users. Before taking a permission it tests whether anyone holds
//! the matching "unshared" byte, and before unsharing one it tests whether
//! anyone holds the matching "used" byte. Doing the same here makes vimg and
//! vmrun refuse to write an image that a running QEMU holds (and vice versa).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Offset of the "permission used" lock bytes.
const PERM_BASE: i64 = 100;
/// Offset of the "permission not shared" lock bytes.
const SHARED_BASE: i64 = 200;

/// Block permissions, numbered like QEMU's `BLK_PERM_*` bits.
pub mod perm {
    /// The content read is consistent (metadata readers need it).
    pub const CONSISTENT_READ: u32 = 1 << 0;
    /// Writes that change the content.
    pub const WRITE: u32 = 1 << 1;
    /// Writes that do not change the content.
    pub const WRITE_UNCHANGED: u32 = 1 << 2;
    /// Changing the length of the file.
    pub const RESIZE: u32 = 1 << 3;
    /// Every permission.
    pub const ALL: u32 = 0x0f;
}

/// QEMU's name for permission bit `i` (used in its error messages).
fn perm_name(bit: u32) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds a conflicting lock (QEMU's wording).
    #[error("Failed to get {}\"{name}\" lock", if *.shared { "shared " } else { "" })]
    Conflict {
        /// The permission's name.
        name: &'static str,
        /// true when we wanted to unshare a permission someone uses.
        shared: bool,
    },
    /// The locking system call failed.
    #[error("Failed to lock byte {offset}: {source}")]
    Io {
        /// Byte that could not be locked or tested.
        offset: i64,
        /// The OS error.
        source: std::io::Error,
    },
}

fn flock_struct(ty: libc::c_short, offset: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset;
    fl.l_len = 1;
    fl
}

fn set_lock(file: &File, offset: i64, ty: libc::c_short) -> Result<(), LockError> {
    let fl = flock_struct(ty, offset);
    // SAFETY: valid fd and a pointer to a properly initialised flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        return Err(LockError::Io {
            offset,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether another open file description holds a lock on byte `offset`.
fn locked_by_other(file: &File, offset: i64) -> Result<bool, LockError> {
    let mut fl = flock_struct(libc::F_WRLCK as libc::c_short, offset);
    // SAFETY: valid fd and a pointer to a properly initialised flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(LockError::Io {
            offset,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Take QEMU's lock bytes on `file` for using permissions `perms` while
/// sharing only `shared` with others. Locks live as long as `file` stays
/// open (they belong to its open file description).
pub fn lock(file: &File, perms: u32, shared: u32) -> Result<(), LockError> {
    for bit in 0..4 {
        if perms & (1 << bit) != 0 {
            set_lock(file, PERM_BASE + bit as i64, libc::F_RDLCK as libc::c_short)?;
        }
        if shared & (1 << bit) == 0 {
            set_lock(
                file,
                SHARED_BASE + bit as i64,
                libc::F_RDLCK as libc::c_short,
            )?;
        }
    }
    for bit in 0..4u32 {
        if perms & (1 << bit) != 0 && locked_by_other(file, SHARED_BASE + bit as i64)? {
            unlock_all(file);
            return Err(LockError::Conflict {
                name: perm_name(bit),
                shared: false,
            });
        }
    }
    for bit in 0..4u32 {
        if shared & (1 << bit) == 0 && locked_by_other(file, PERM_BASE + bit as i64)? {
            unlock_all(file);
            return Err(LockError::Conflict {
                name: perm_name(bit),
                shared: true,
            });
        }
    }
    Ok(())
}

/// Drop every lock byte this open file description holds.
pub fn unlock_all(file: &File) {
    for base in [PERM_BASE, SHARED_BASE] {
        for bit in 0..4 {
            let _ = set_lock(file, base + bit, libc::F_UNLCK as libc::c_short);
        }
    }
}

/// Permissions QEMU's qemu-img asks for: `(perms, shared)`.
pub fn perms_for(write: bool, force_share: bool) -> (u32, u32) {
    if write {
        (
            perm::CONSISTENT_READ | perm::WRITE | perm::RESIZE,
            perm::CONSISTENT_READ | perm::WRITE_UNCHANGED,
        )
    } else if force_share {
        (perm::CONSISTENT_READ, perm::ALL)
    } else {
        (
            perm::CONSISTENT_READ,
            perm::ALL & !(perm::WRITE | perm::RESIZE),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_excludes_reader_and_writer() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = File::options()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let b = File::open(f.path()).unwrap();
        let (p, s) = perms_for(true, false);
        lock(&a, p, s).unwrap();
        let (p, s) = perms_for(false, false);
        let e = lock(&b, p, s).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
        let (p, s) = perms_for(false, true);
        lock(&b, p, s).unwrap();
        let c = File::open(f.path()).unwrap();
        let (p, s) = perms_for(true, false);
        assert!(lock(&c, p, s).is_err());
    }
}
