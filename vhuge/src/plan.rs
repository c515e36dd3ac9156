//! `vhuge plan` and `vhuge verify`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;
use vcore::host::hugepages::{self as hp, BackingCheck};
use vcore::units::{size_to_str, size_to_suffix};

use crate::cli::{PlanArgs, VerifyArgs};

/// What `vhuge plan` computes.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Plan {
    /// Guest memory per guest, bytes.
    pub mem: u64,
    /// Number of guests.
    pub guests: u64,
    /// Page size, bytes.
    pub page_size: u64,
    /// Pages per guest (rounded up).
    pub pages_per_guest: u64,
    /// Pages for all guests.
    pub pages_needed: u64,
    /// Bytes per guest lost to rounding up.
    pub rounding_waste: u64,
    /// Pool now: total, free, reserved, surplus, overcommit.
    pub total: u64,
    /// `free_hugepages`.
    pub free: u64,
    /// `resv_hugepages`.
    pub reserved: u64,
    /// `free - reserved`.
    pub available: u64,
    /// Whether the pool holds the guests now.
    pub fits: bool,
    /// Pages missing.
    pub short: u64,
    /// The pool size (`nr_hugepages`) that makes it fit.
    pub target_total: u64,
    /// The command to get there, or `null` when nothing is needed.
    pub command: Option<String>,
    /// hugetlbfs mounts with this page size.
    pub mounts: Vec<PathBuf>,
}

/// Compute a plan from the pool.
pub fn plan(root: &Path, mem: u64, page_size: u64, guests: u64) -> Result<Plan> {
    let pool = hp::pool(root, page_size)?;
    let per = mem.div_ceil(page_size);
    let needed = per.saturating_mul(guests);
    let available = pool.available();
    let short = needed.saturating_sub(available);
    let target_total = pool.total + short;
    let mounts = hp::hugetlbfs_mounts(root)?
        .into_iter()
        .filter(|m| m.page_size == page_size)
        .map(|m| m.target)
        .collect();
    Ok(Plan {
        mem,
        guests,
        page_size,
        pages_per_guest: per,
        pages_needed: needed,
        rounding_waste: per * page_size - mem,
        total: pool.total,
        free: pool.free,
        reserved: pool.reserved,
        available,
        fits: short == 0,
        short,
        target_total,
        command: (short > 0).then(|| {
            format!(
                "vhuge set --size {} {target_total}",
                size_to_suffix(page_size)
            )
        }),
        mounts,
    })
}

/// The human form of a plan.
pub fn render(p: &Plan) -> String {
    let ps = size_to_str(p.page_size);
    let mut o = String::new();
    let guests = if p.guests == 1 {
        String::new()
    } else {
        format!(" x {} guests", p.guests)
    };
    o += &format!(
        "Guest memory:  {} ({} bytes){guests}\n",
        size_to_str(p.mem),
        p.mem
    );
    o += &format!("Page size:     {ps}\n");
    if p.guests == 1 {
        o += &format!("Pages needed:  {}\n", p.pages_needed);
    } else {
        o += &format!(
            "Pages needed:  {} ({} per guest)\n",
            p.pages_needed, p.pages_per_guest
        );
    }
    if p.rounding_waste > 0 {
        o += &format!(
            "Rounding:      {} is not a multiple of {ps}; each guest rounds up to {} pages \
             ({} unused)\n",
            size_to_str(p.mem),
            p.pages_per_guest,
            size_to_str(p.rounding_waste)
        );
    }
    o += &format!(
        "Pool now:      {} total, {} free, {} reserved: {} available\n",
        p.total, p.free, p.reserved, p.available
    );
    if p.fits {
        o += &format!(
            "Verdict:       fits now ({} pages spare)\n",
            p.available - p.pages_needed
        );
    } else {
        o += &format!("Verdict:       short by {} pages\n", p.short);
        o += &format!(
            "Run:           {}\n",
            p.command.as_deref().unwrap_or_default()
        );
    }
    if p.mounts.is_empty() {
        let size = if p.page_size == 2 << 20 {
            String::new()
        } else {
            format!(" --size {}", size_to_suffix(p.page_size))
        };
        o += &format!(
            "Mount:         no hugetlbfs mount with {ps} pages; run `vhuge mount{size}` \
             (for -mem-path)\n"
        );
    } else {
        let m: Vec<String> = p
            .mounts
            .iter()
            .map(|m| m.to_string_lossy().into_owned())
            .collect();
        o += &format!("Mount:         {}\n", m.join(" "));
    }
    o
}

fn page_size_or_default(root: &Path, s: Option<u64>) -> Result<u64> {
    Ok(match s {
        Some(s) => s,
        None => hp::default_size(root)?,
    })
}

/// `vhuge plan`.
pub fn run_plan(root: &Path, a: &PlanArgs) -> Result<i32> {
    let size = page_size_or_default(root, a.size)?;
    let p = plan(root, a.mem, size, a.guests)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", render(&p));
    }
    Ok(0)
}

/// `vhuge verify`: 0 only when the persistent pool (free - reserved) can back
/// the guest now, on a hugetlbfs mount of that page size.
pub fn run_verify(root: &Path, a: &VerifyArgs) -> Result<i32> {
    let real_root = root == Path::new("/");
    let check: BackingCheck = match &a.path {
        Some(path) => {
            let st = hp::statfs_hugetlbfs(path)?;
            if let Some(s) = a.size {
                if s != st.page_size {
                    bail!(
                        "{} has {} pages, not {} (--size)",
                        path.display(),
                        size_to_str(st.page_size),
                        size_to_str(s)
                    );
                }
            }
            hp::check_pool(root, path, st.page_size, a.mem, st.limit_free)?
        }
        None => {
            let size = page_size_or_default(root, a.size)?;
            hp::check_size(root, size)?;
            let mounts = hp::hugetlbfs_mounts(root)?;
            let Some(m) = mounts.iter().find(|m| m.page_size == size) else {
                let opt = if a.size.is_some() {
                    format!(" --size {}", size_to_suffix(size))
                } else {
                    String::new()
                };
                bail!(
                    "no hugetlbfs mount with {} pages to back guest memory; run `vhuge mount{opt}`",
                    size_to_str(size)
                );
            };
            let limit = if real_root {
                hp::statfs_hugetlbfs(&m.target)?.limit_free
            } else {
                m.max_size.map(|b| b / size)
            };
            hp::check_pool(root, &m.target, size, a.mem, limit)?
        }
    };
    if check.fits_persistent() {
        println!("ok: {check}");
        Ok(0)
    } else {
        eprintln!("vhuge: {check}");
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory removed on drop (no tempfile dev-dependency).
    struct TestDir(PathBuf);
    impl TestDir {
        fn new(tag: &str) -> TestDir {
            let p = std::env::temp_dir().join(format!("vhuge-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TestDir(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn plan_rounds_up_and_gives_command() {
        let t = TestDir::new("plan");
        let d = hp::pool_dir(t.path(), 1 << 30, None);
        std::fs::create_dir_all(&d).unwrap();
        for (n, v) in [
            ("nr_hugepages", 2),
            ("free_hugepages", 2),
            ("resv_hugepages", 1),
            ("surplus_hugepages", 0),
            ("nr_overcommit_hugepages", 0),
        ] {
            std::fs::write(d.join(n), format!("{v}\n")).unwrap();
        }
        std::fs::create_dir_all(t.path().join("proc")).unwrap();
        std::fs::write(t.path().join("proc/meminfo"), "Hugepagesize:    2048 kB\n").unwrap();
        std::fs::write(t.path().join("proc/mounts"), "").unwrap();
        let p = plan(t.path(), 1536 << 20, 1 << 30, 3).unwrap();
        assert_eq!(p.pages_per_guest, 2);
        assert_eq!(p.pages_needed, 6);
        assert_eq!(p.rounding_waste, 512 << 20);
        assert_eq!(p.available, 1);
        assert_eq!(p.short, 5);
        assert_eq!(p.target_total, 7);
        assert_eq!(p.command.as_deref(), Some("vhuge set --size 1G 7"));
        let r = render(&p);
        assert!(
            r.contains("each guest rounds up to 2 pages (512 MiB unused)"),
            "{r}"
        );
        assert!(r.contains("run `vhuge mount --size 1G`"), "{r}");
    }
}
