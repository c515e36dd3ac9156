//! `vhuge mount` and `vhuge umount`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{MntFlags, MsFlags};
use vcore::host::hugepages as hp;
use vcore::host::mounts;
use vcore::units::{size_to_str, size_to_suffix};

use crate::cli::MountArgs;

/// The mount point as /proc/mounts shows it: absolute, symlinks resolved
/// when it exists (only for the real root).
pub fn absolute(root: &Path, dir: &Path) -> PathBuf {
    if root == Path::new("/") {
        if let Ok(c) = std::fs::canonicalize(dir) {
            return c;
        }
    }
    if dir.is_relative() {
        if let Ok(cwd) = std::env::current_dir() {
            return cwd.join(dir);
        }
    }
    dir.to_path_buf()
}

/// Resolve a user name or number.
fn uid_of(s: &str) -> Result<u32> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => bail!("--uid: no user named '{s}'"),
    }
}

/// Resolve a group name or number.
fn gid_of(s: &str) -> Result<u32> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => bail!("--gid: no group named '{s}'"),
    }
}

/// The hugetlbfs option string for the arguments (`pagesize=2M,mode=0770`).
pub fn options(a: &MountArgs, size: u64) -> Result<String> {
    let mut o = vec![format!("pagesize={}", size_to_suffix(size))];
    if let Some(m) = a.mode {
        o.push(format!("mode={m:04o}"));
    }
    if let Some(u) = &a.uid {
        o.push(format!("uid={}", uid_of(u)?));
    }
    if let Some(g) = &a.gid {
        o.push(format!("gid={}", gid_of(g)?));
    }
    if let Some(s) = &a.max_size {
        o.push(format!("size={s}"));
    }
    if let Some(s) = &a.min_size {
        o.push(format!("min_size={s}"));
    }
    Ok(o.join(","))
}

fn errno_of(e: nix::Error) -> String {
    hp::errno_text(&std::io::Error::from_raw_os_error(e as i32))
}

/// `vhuge mount`.
pub fn run_mount(root: &Path, a: &MountArgs) -> Result<i32> {
    let size = match a.size {
        Some(s) => s,
        None => hp::default_size(root)?,
    };
    hp::check_size(root, size)?;
    let opts = options(a, size)?;
    let existing = hp::hugetlbfs_mounts(root)?;
    let dir = &absolute(root, &a.dir);
    if let Some(m) = existing.iter().rev().find(|m| &m.target == dir) {
        if m.page_size == size {
            eprintln!(
                "vhuge: {} is already a hugetlbfs mount with {} pages ({})",
                dir.display(),
                size_to_str(size),
                m.options
            );
            return Ok(0);
        }
        bail!(
            "{} is already a hugetlbfs mount with {} pages, not {}; unmount it first \
             (vhuge umount {})",
            dir.display(),
            size_to_str(m.page_size),
            size_to_str(size),
            dir.display()
        );
    }
    let target = root.join(dir.strip_prefix("/").unwrap_or(dir));
    std::fs::create_dir_all(&target)
        .with_context(|| format!("cannot create mount point {}", target.display()))?;
    if let Err(e) = nix::mount::mount(
        Some("hugetlbfs"),
        &target,
        Some("hugetlbfs"),
        MsFlags::empty(),
        Some(opts.as_str()),
    ) {
        let mut msg = format!(
            "cannot mount hugetlbfs on {} with {opts}: {}",
            target.display(),
            errno_of(e)
        );
        match e {
            nix::Error::EPERM | nix::Error::EACCES => msg += "; run as root",
            nix::Error::ENOMEM if a.min_size.is_some() => {
                if let Ok(p) = hp::pool(root, size) {
                    msg += &format!(
                        "; min_size= could not be reserved: the {} pool has {} pages available",
                        size_to_str(size),
                        p.available()
                    );
                }
            }
            _ => {}
        }
        bail!("{msg}");
    }
    Ok(0)
}

/// `vhuge umount`.
pub fn run_umount(root: &Path, dir: &Path) -> Result<i32> {
    let dir = &absolute(root, dir);
    let all = mounts::mounts(root)
        .with_context(|| format!("cannot read {}", root.join("proc/mounts").display()))?;
    match mounts::mount_at(&all, dir) {
        Some(m) if m.fstype == "hugetlbfs" => {}
        Some(m) => bail!(
            "{} is a {} mount, not hugetlbfs; not unmounting it",
            dir.display(),
            m.fstype
        ),
        None => bail!("{} is not a mount point", dir.display()),
    }
    let target = root.join(dir.strip_prefix("/").unwrap_or(dir));
    if let Err(e) = nix::mount::umount2(&target, MntFlags::empty()) {
        let mut msg = format!("cannot unmount {}: {}", target.display(), errno_of(e));
        if e == nix::Error::EBUSY {
            let hm = hp::hugetlbfs_mounts(root)?;
            let only: Vec<_> = hm.into_iter().filter(|m| &m.target == dir).collect();
            let holders = hp::holders(root, &only)?;
            if !holders.is_empty() {
                let who: Vec<String> = holders
                    .iter()
                    .map(|h| format!("{} ({})", h.pid, h.comm))
                    .collect();
                msg += &format!("; in use by PID {}", who.join(", "));
            }
        } else if e == nix::Error::EPERM {
            msg += "; run as root";
        }
        bail!("{msg}");
    }
    Ok(0)
}
