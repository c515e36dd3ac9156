//! `vhuge persist`: make the current pools and mounts survive a reboot.
//!
//! * The default-size pool and its overcommit go to
//!   `/etc/sysctl.d/80-vhuge.conf` (`vm.nr_hugepages`,
//!   `vm.nr_overcommit_hugepages`), read by `sysctl --system` at boot.
//! * Other sizes (1 GiB) and uneven per-node pools cannot be set by sysctl:
//!   vhuge prints the kernel command line (`hugepagesz=1G hugepages=4`) to add
//!   to the boot loader; it does not edit the boot loader.
//! * hugetlbfs mounts become fstab lines, or systemd mount units when systemd
//!   runs (`/run/systemd/system` exists). `/dev/hugepages` with default options
//!   is skipped under systemd, which mounts it itself (dev-hugepages.mount).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use vcore::host::hugepages::{self as hp, HugetlbfsMount, Pool};
use vcore::units::size_to_suffix;

/// The sysctl.d file vhuge writes.
pub const SYSCTL_FILE: &str = "etc/sysctl.d/80-vhuge.conf";

/// Options worth persisting from a /proc/mounts option list.
fn persistent_options(m: &HugetlbfsMount) -> String {
    let keep = [
        "pagesize",
        "mode",
        "uid",
        "gid",
        "size",
        "min_size",
        "nr_inodes",
    ];
    let v: Vec<&str> = m
        .options
        .split(',')
        .filter(|o| keep.iter().any(|k| o.split('=').next() == Some(*k)))
        .collect();
    if v.is_empty() {
        "defaults".to_string()
    } else {
        v.join(",")
    }
}

/// systemd's path escaping for unit names (`/mnt/huge-1g` → `mnt-huge\x2d1g`).
pub fn systemd_escape_path(p: &Path) -> String {
    let s = p.to_string_lossy();
    let s = s.trim_matches('/');
    if s.is_empty() {
        return "-".to_string();
    }
    let mut o = String::new();
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'/' => o.push('-'),
            b'.' if i == 0 => o.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b':' => o.push(b as char),
            _ => {
                let _ = write!(o, "\\x{b:02x}");
            }
        }
    }
    o
}

/// The sysctl.d file for the default-size pool.
pub fn sysctl_text(default: Option<&Pool>) -> String {
    let mut o =
        String::from("# Written by `vhuge persist`: hugepage pool of the default size at boot.\n");
    if let Some(p) = default {
        let _ = writeln!(o, "vm.nr_hugepages = {}", p.minimum());
        let _ = writeln!(o, "vm.nr_overcommit_hugepages = {}", p.overcommit);
    }
    o
}

/// Kernel command line for pools sysctl cannot restore, or `None`.
pub fn cmdline_hint(root: &Path, pools: &[Pool]) -> Result<Option<String>> {
    let nodes = hp::node_pools(root)?;
    let mut parts = Vec::new();
    for p in pools {
        let per_node: Vec<_> = nodes.iter().filter(|n| n.size == p.size).collect();
        let uneven = per_node.len() > 1 && {
            let first = per_node[0].total;
            per_node.iter().any(|n| n.total.abs_diff(first) > 1)
        };
        if (p.default || p.minimum() == 0) && !uneven {
            continue;
        }
        let count = if uneven {
            per_node
                .iter()
                .map(|n| format!("{}:{}", n.node, n.total.saturating_sub(n.surplus)))
                .collect::<Vec<_>>()
                .join(",")
        } else {
            p.minimum().to_string()
        };
        parts.push(format!(
            "hugepagesz={} hugepages={count}",
            size_to_suffix(p.size)
        ));
    }
    Ok((!parts.is_empty()).then(|| parts.join(" ")))
}

/// fstab line for a mount.
pub fn fstab_line(m: &HugetlbfsMount) -> String {
    format!(
        "hugetlbfs {} hugetlbfs {} 0 0",
        m.target.to_string_lossy().replace(' ', "\\040"),
        persistent_options(m)
    )
}

/// systemd mount unit for a mount: (file name, content).
pub fn mount_unit(m: &HugetlbfsMount) -> (String, String) {
    let name = format!("{}.mount", systemd_escape_path(&m.target));
    let text = format!(
        "# Written by `vhuge persist`.\n[Unit]\nDescription=hugetlbfs on {}\n\
         DefaultDependencies=no\nBefore=sysinit.target\n\
         ConditionPathExists=/sys/kernel/mm/hugepages\n\n\
         [Mount]\nWhat=hugetlbfs\nWhere={}\nType=hugetlbfs\nOptions={}\n\n\
         [Install]\nWantedBy=sysinit.target\n",
        m.target.display(),
        m.target.display(),
        persistent_options(m)
    );
    (name, text)
}

/// `vhuge persist`.
pub fn run(root: &Path, dry_run: bool) -> Result<i32> {
    let pools = hp::pools(root)?;
    let mounts = hp::hugetlbfs_mounts(root)?;
    let systemd = root.join("run/systemd/system").is_dir();
    let default = pools.iter().find(|p| p.default);
    let sysctl = sysctl_text(default);
    let hint = cmdline_hint(root, &pools)?;
    let sysctl_path = root.join(SYSCTL_FILE);
    let fstab_path = root.join("etc/fstab");
    let unit_dir = root.join("etc/systemd/system");

    let mounts: Vec<&HugetlbfsMount> = mounts
        .iter()
        .filter(|m| {
            !(systemd
                && m.target == Path::new("/dev/hugepages")
                && persistent_options(m) == format!("pagesize={}", size_to_suffix(m.page_size)))
        })
        .collect();

    if dry_run {
        println!("# {}", sysctl_path.display());
        print!("{sysctl}");
        if let Some(h) = &hint {
            println!();
            println!(
                "# kernel command line (sysctl cannot set these pools; add to the boot loader):"
            );
            println!("# {h}");
        }
        if !mounts.is_empty() {
            if systemd {
                for m in &mounts {
                    let (name, text) = mount_unit(m);
                    println!();
                    println!("# {}", unit_dir.join(name).display());
                    print!("{text}");
                }
            } else {
                println!();
                println!("# {}", fstab_path.display());
                for m in &mounts {
                    println!("{}", fstab_line(m));
                }
            }
        }
        return Ok(0);
    }

    write_file(&sysctl_path, &sysctl)?;
    println!("wrote {}", sysctl_path.display());
    if systemd {
        for m in &mounts {
            let (name, text) = mount_unit(m);
            let p = unit_dir.join(&name);
            write_file(&p, &text)?;
            println!(
                "wrote {} (enable with: systemctl enable {name})",
                p.display()
            );
        }
    } else if !mounts.is_empty() {
        let old = std::fs::read_to_string(&fstab_path).unwrap_or_default();
        let mut add = String::new();
        for m in &mounts {
            let target = m.target.to_string_lossy().replace(' ', "\\040");
            let present = old.lines().any(|l| {
                !l.trim_start().starts_with('#')
                    && l.split_ascii_whitespace().nth(1) == Some(target.as_str())
            });
            if present {
                eprintln!(
                    "vhuge: {} already has an entry for {target}; left as is",
                    fstab_path.display()
                );
            } else {
                add += &fstab_line(m);
                add.push('\n');
            }
        }
        if !add.is_empty() {
            let mut text = old;
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text += &add;
            write_file(&fstab_path, &text)?;
            println!("added to {}:", fstab_path.display());
            print!("{add}");
        }
    }
    if let Some(h) = hint {
        eprintln!("vhuge: sysctl cannot restore every pool; add to the kernel command line: {h}");
    }
    Ok(0)
}

fn write_file(path: &PathBuf, text: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let tmp = path.with_extension("vhuge-tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_systemd() {
        assert_eq!(
            systemd_escape_path(Path::new("/dev/hugepages")),
            "dev-hugepages"
        );
        assert_eq!(
            systemd_escape_path(Path::new("/mnt/huge-1g")),
            "mnt-huge\\x2d1g"
        );
        assert_eq!(systemd_escape_path(Path::new("/")), "-");
    }

    #[test]
    fn fstab_keeps_hugetlbfs_options() {
        let m = HugetlbfsMount {
            target: PathBuf::from("/mnt/huge 1g"),
            source: "none".into(),
            page_size: 1 << 30,
            options: "rw,relatime,gid=36,mode=1770,pagesize=1024M".into(),
            max_size: None,
            min_size: None,
        };
        assert_eq!(
            fstab_line(&m),
            "hugetlbfs /mnt/huge\\0401g hugetlbfs gid=36,mode=1770,pagesize=1024M 0 0"
        );
        let (name, text) = mount_unit(&m);
        assert_eq!(name, "mnt-huge\\x201g.mount");
        assert!(text.contains("Options=gid=36,mode=1770,pagesize=1024M\n"));
    }
}
