//! `vhuge status`: page sizes, pools, /proc/meminfo, nodes, mounts, holders.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use vcore::host::hugepages::{self as hp, Holder, HugetlbfsMount, NodePool, Pool};
use vcore::units::{size_to_str, size_with_bytes};

/// Everything `vhuge status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Base (small) page size in bytes.
    pub base_page_size: u64,
    /// Default hugepage size in bytes (`Hugepagesize`), if any.
    pub default_size: Option<u64>,
    /// Transparent hugepages: `enabled` and `defrag` choices (`madvise`).
    pub thp: Thp,
    /// One entry per hugepage size.
    pub pools: Vec<PoolView>,
    /// The hugepage lines of /proc/meminfo, name → value (kB lines in kB).
    pub meminfo: serde_json::Map<String, serde_json::Value>,
    #[serde(skip)]
    meminfo_lines: Vec<(String, u64, String)>,
    /// Per NUMA node and size.
    pub nodes: Vec<NodePool>,
    /// hugetlbfs mounts.
    pub mounts: Vec<HugetlbfsMount>,
    /// Processes holding hugetlbfs memory.
    pub holders: Vec<Holder>,
}

/// Transparent hugepage settings.
#[derive(Debug, Serialize)]
pub struct Thp {
    /// `always`, `madvise` or `never`; null without THP.
    pub enabled: Option<String>,
    /// The defrag choice; null without THP.
    pub defrag: Option<String>,
}

/// A pool with hugeadm's derived columns.
#[derive(Debug, Serialize)]
pub struct PoolView {
    #[serde(flatten)]
    pool: Pool,
    /// nr_hugepages - surplus.
    minimum: u64,
    /// minimum + overcommit.
    maximum: u64,
    /// free - reserved.
    available: u64,
    /// total - free.
    used: u64,
}

/// The base page size from sysconf.
pub fn base_page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(v)) if v > 0 => v as u64,
        _ => 4096,
    }
}

/// Read everything under `root`.
pub fn gather(root: &Path) -> Result<Status> {
    let mi = hp::meminfo(root)?;
    let raw = hp::pools(root)?;
    // No page in use or reserved in any pool: no process can hold hugetlb
    // memory, so skip reading every /proc/PID/maps.
    let busy = raw
        .iter()
        .any(|p| p.used() > 0 || p.reserved > 0 || p.surplus > 0);
    let pools = raw
        .into_iter()
        .map(|p| PoolView {
            minimum: p.minimum(),
            maximum: p.maximum(),
            available: p.available(),
            used: p.used(),
            pool: p,
        })
        .collect();
    let mounts = hp::hugetlbfs_mounts(root)?;
    let (holders, denied) = if busy {
        hp::holders_and_denied(root, &mounts)?
    } else {
        (Vec::new(), 0)
    };
    if denied > 0 {
        eprintln!(
            "vhuge: {denied} processes could not be inspected (permission denied); run as root \
             to see every holder of hugepages"
        );
    }
    let mut meminfo = serde_json::Map::new();
    for (k, v, _) in &mi.lines {
        meminfo.insert(k.clone(), (*v).into());
    }
    Ok(Status {
        base_page_size: base_page_size(),
        default_size: mi.default_size(),
        thp: Thp {
            enabled: hp::thp_setting(root, "enabled"),
            defrag: hp::thp_setting(root, "defrag"),
        },
        pools,
        meminfo,
        meminfo_lines: mi.lines,
        nodes: hp::node_pools(root)?,
        mounts,
        holders,
    })
}

/// Render the human form.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    o += &format!("Base page size: {}\n", size_with_bytes(s.base_page_size));
    match s.default_size {
        Some(d) => o += &format!("Default hugepage size: {}\n", size_with_bytes(d)),
        None => o += "Default hugepage size: none\n",
    }
    if let Some(e) = &s.thp.enabled {
        o += &format!(
            "Transparent hugepages: {e} (defrag {})\n",
            s.thp.defrag.as_deref().unwrap_or("?")
        );
    }
    o += "\n";
    if s.pools.is_empty() {
        o += "No hugepage sizes (no /sys/kernel/mm/hugepages).\n";
    } else {
        o += &format!(
            "{:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}\n",
            "Size",
            "Minimum",
            "Current",
            "Maximum",
            "Default",
            "Free",
            "Reserved",
            "Surplus",
            "Overcommit"
        );
        for v in &s.pools {
            let p = &v.pool;
            o += &format!(
                "{:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}\n",
                p.size,
                v.minimum,
                p.total,
                v.maximum,
                if p.default { "*" } else { "" },
                p.free,
                p.reserved,
                p.surplus,
                p.overcommit
            );
        }
    }
    let mem: Vec<_> = s
        .meminfo_lines
        .iter()
        .filter(|(k, _, _)| k.starts_with("HugePages_") || k == "Hugepagesize" || k == "Hugetlb")
        .collect();
    if !mem.is_empty() {
        o += "\n";
        for (k, v, unit) in mem {
            let name = format!("{k}:");
            if unit.is_empty() {
                o += &format!("{name:<16}{v:>8}\n");
            } else {
                o += &format!("{name:<16}{v:>8} {unit}\n");
            }
        }
    }
    if !s.nodes.is_empty() {
        o += &format!(
            "\n{:>4} {:>10} {:>8} {:>8} {:>8}\n",
            "Node", "Size", "Total", "Free", "Surplus"
        );
        for n in &s.nodes {
            o += &format!(
                "{:>4} {:>10} {:>8} {:>8} {:>8}\n",
                n.node, n.size, n.total, n.free, n.surplus
            );
        }
    }
    o += "\n";
    if s.mounts.is_empty() {
        o += "No hugetlbfs mounts (vhuge mount creates /dev/hugepages).\n";
    } else {
        let w = s
            .mounts
            .iter()
            .map(|m| m.target.to_string_lossy().len())
            .max()
            .unwrap_or(0)
            .max("Mount point".len());
        o += &format!("{:<w$}  {:<9}  Options\n", "Mount point", "Page size");
        for m in &s.mounts {
            o += &format!(
                "{:<w$}  {:<9}  {}\n",
                m.target.to_string_lossy(),
                size_to_str(m.page_size),
                m.options
            );
        }
    }
    o += "\n";
    if s.holders.is_empty() {
        o += "No process holds hugetlbfs memory.\n";
    } else {
        o += &format!(
            "{:>7}  {:<6} {:<16} {:>10}  Files\n",
            "PID", "Kind", "Command", "Mapped"
        );
        for h in &s.holders {
            let kind = match h.kind {
                hp::HolderKind::Vmrun => "vmrun",
                hp::HolderKind::Qemu => "qemu",
                hp::HolderKind::Other => "other",
            };
            o += &format!(
                "{:>7}  {:<6} {:<16} {:>10}  {}\n",
                h.pid,
                kind,
                h.comm,
                size_to_str(h.mapped),
                h.files.join(" ")
            );
        }
    }
    o
}

/// `vhuge status`.
pub fn run(root: &Path, json: bool) -> Result<i32> {
    let s = gather(root)?;
    let text = if json {
        let mut t = serde_json::to_string_pretty(&s)?;
        t.push('\n');
        t
    } else {
        render(&s)
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(0)
}
