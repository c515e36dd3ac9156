//! `vhuge set`: resize a pool through sysfs, read it back, explain a shortfall.

use std::path::Path;

use anyhow::{bail, Result};
use vcore::host::hugepages as hp;
use vcore::units::{self, size_to_str, size_to_suffix, Suffix};

use crate::cli::SetArgs;

/// Pages, or bytes to be converted to pages (rounded up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// A page count.
    Pages(u64),
    /// A size in bytes.
    Bytes(u64),
}

impl Quantity {
    /// Pages of `page_size` bytes, rounded up.
    pub fn pages(self, page_size: u64) -> u64 {
        match self {
            Quantity::Pages(n) => n,
            Quantity::Bytes(b) => b.div_ceil(page_size.max(1)),
        }
    }
}

/// The positional argument of `vhuge set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// `COUNT` or `SIZE`: the pool becomes this.
    Set(Quantity),
    /// `+N`: grow by.
    Add(Quantity),
    /// `-N`: shrink by.
    Remove(Quantity),
}

impl Amount {
    /// Parse `1024`, `+64`, `-64`, `8G`, `+1G`, `-512M`. A bare number is a
    /// page count; a number with a QEMU suffix is a size.
    pub fn parse(s: &str) -> Result<Amount, String> {
        let (kind, rest): (fn(Quantity) -> Amount, &str) = if let Some(r) = s.strip_prefix('+') {
            (Amount::Add, r)
        } else if let Some(r) = s.strip_prefix('-') {
            (Amount::Remove, r)
        } else {
            (Amount::Set, s)
        };
        if !rest.is_empty() && rest.bytes().all(|c| c.is_ascii_digit()) {
            return rest
                .parse()
                .map(|n| kind(Quantity::Pages(n)))
                .map_err(|_| format!("'{s}' is too large"));
        }
        match units::parse_size(rest, Suffix::B) {
            Ok(b) if rest.starts_with(|c: char| c.is_ascii_digit() || c == '.') => {
                Ok(kind(Quantity::Bytes(b)))
            }
            _ => Err(format!(
                "'{s}' is not a page count (1024, +64, -64) or a size (8G, +1G)"
            )),
        }
    }

    /// The new count, given the current one.
    pub fn target(self, current: u64, page_size: u64) -> Result<u64, String> {
        match self {
            Amount::Set(q) => Ok(q.pages(page_size)),
            Amount::Add(q) => current
                .checked_add(q.pages(page_size))
                .ok_or_else(|| "the page count overflows".to_string()),
            Amount::Remove(q) => {
                let n = q.pages(page_size);
                current
                    .checked_sub(n)
                    .ok_or_else(|| format!("cannot remove {n} pages: the pool has {current}"))
            }
        }
    }
}

/// Kernel command line that reserves `count` pages of `size` at boot
/// (`hugepagesz=2M hugepages=1024`, or `hugepages=0:1024` for a node).
pub fn boot_params(size: u64, node: Option<u32>, count: u64) -> String {
    match node {
        None => format!("hugepagesz={} hugepages={count}", size_to_suffix(size)),
        Some(n) => format!("hugepagesz={} hugepages={n}:{count}", size_to_suffix(size)),
    }
}

/// The error for fewer pages than requested.
pub fn shortfall_message(
    size: u64,
    node: Option<u32>,
    requested: u64,
    got: u64,
    compacted: bool,
) -> String {
    let on = node.map(|n| format!(" on node {n}")).unwrap_or_default();
    let why = if compacted {
        "memory is fragmented even after compaction; free memory (drop caches, stop \
         processes) and retry,"
    } else {
        "memory is fragmented; try --compact,"
    };
    let mut m = format!(
        "requested {requested} pages of {}{on}, got {got}: {why} or reserve at boot with {}",
        size_to_str(size),
        boot_params(size, node, requested)
    );
    if size >= 1 << 30 {
        m.push_str(&format!(
            " (or hugetlb_cma={}G for runtime 1 GiB pages)",
            requested.saturating_mul(size >> 30)
        ));
    }
    m
}

/// The error for a shrink that left pages in use.
pub fn in_use_message(size: u64, node: Option<u32>, requested: u64, got: u64) -> String {
    let on = node.map(|n| format!(" on node {n}")).unwrap_or_default();
    format!(
        "requested {requested} pages of {}{on}, got {got}: {} pages are in use and stay as \
         surplus pages until freed (see `vhuge status` for who holds them)",
        size_to_str(size),
        got.saturating_sub(requested)
    )
}

fn current_count(root: &Path, size: u64, node: Option<u32>) -> Result<u64> {
    Ok(match node {
        None => hp::pool(root, size)?.total,
        Some(n) => hp::node_pool(root, size, n)?.total,
    })
}

/// `vhuge set`.
pub fn run(root: &Path, a: &SetArgs) -> Result<i32> {
    if a.amount.is_none() && a.overcommit.is_none() {
        eprintln!(
            "vhuge set: nothing to set: give COUNT, +N, -N or SIZE, or --overcommit N \
             (see vhuge set --help)"
        );
        return Ok(2);
    }
    let size = match a.size {
        Some(s) => s,
        None => hp::default_size(root)?,
    };
    hp::check_size(root, size)?;
    if let Some(n) = a.node {
        hp::check_node(root, n)?;
    }
    let ps = size_to_str(size);
    if let Some(amount) = a.amount {
        let before = current_count(root, size, a.node)?;
        let target = match amount.target(before, size) {
            Ok(t) => t,
            Err(e) => bail!("{e}"),
        };
        hp::set_nr_hugepages(root, size, a.node, target)?;
        let mut got = current_count(root, size, a.node)?;
        if got < target && a.compact {
            eprintln!(
                "vhuge: got {got} of {target} pages of {ps}; compacting memory ({}) and retrying",
                hp::compact_memory_path(root).display()
            );
            hp::compact_memory(root)?;
            hp::set_nr_hugepages(root, size, a.node, target)?;
            got = current_count(root, size, a.node)?;
        }
        if got < target {
            bail!(
                "{}",
                shortfall_message(size, a.node, target, got, a.compact)
            );
        }
        if got > target {
            bail!("{}", in_use_message(size, a.node, target, got));
        }
        let p = hp::pool(root, size)?;
        let on = a.node.map(|n| format!(" on node {n}")).unwrap_or_default();
        println!(
            "{ps} pages{on}: {got} (was {before}); pool {} total, {} free",
            p.total, p.free
        );
    }
    if let Some(n) = a.overcommit {
        let before = hp::pool(root, size)?.overcommit;
        hp::set_overcommit(root, size, n)?;
        let got = hp::pool(root, size)?.overcommit;
        if got != n {
            bail!(
                "requested overcommit of {n} pages of {ps}, the kernel shows {got} in {}",
                hp::pool_dir(root, size, None)
                    .join("nr_overcommit_hugepages")
                    .display()
            );
        }
        println!("{ps} overcommit: {got} (was {before})");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M2: u64 = 2 << 20;

    #[test]
    fn amounts() {
        assert_eq!(
            Amount::parse("1024"),
            Ok(Amount::Set(Quantity::Pages(1024)))
        );
        assert_eq!(Amount::parse("+64"), Ok(Amount::Add(Quantity::Pages(64))));
        assert_eq!(
            Amount::parse("-64"),
            Ok(Amount::Remove(Quantity::Pages(64)))
        );
        assert_eq!(
            Amount::parse("8G"),
            Ok(Amount::Set(Quantity::Bytes(8 << 30)))
        );
        assert_eq!(
            Amount::parse("+1G"),
            Ok(Amount::Add(Quantity::Bytes(1 << 30)))
        );
        assert_eq!(Amount::parse("0x10"), Ok(Amount::Set(Quantity::Bytes(16))));
        for bad in ["", "+", "abc", "1KiB", "--1", "1 G", "+-1"] {
            assert!(Amount::parse(bad).is_err(), "{bad:?}");
        }
        let t = |s: &str, cur| Amount::parse(s).unwrap().target(cur, M2);
        assert_eq!(t("8G", 0), Ok(4096));
        assert_eq!(t("3M", 0), Ok(2), "sizes round up");
        assert_eq!(t("+64", 10), Ok(74));
        assert_eq!(t("-4", 10), Ok(6));
        assert_eq!(
            t("-11", 10),
            Err("cannot remove 11 pages: the pool has 10".to_string())
        );
    }

    #[test]
    fn messages() {
        assert_eq!(
            shortfall_message(M2, None, 1024, 733, false),
            "requested 1024 pages of 2 MiB, got 733: memory is fragmented; try --compact, or \
             reserve at boot with hugepagesz=2M hugepages=1024"
        );
        assert!(shortfall_message(M2, None, 8, 7, true).contains("even after compaction"));
        assert!(shortfall_message(1 << 30, Some(1), 4, 1, false)
            .ends_with("hugepagesz=1G hugepages=1:4 (or hugetlb_cma=4G for runtime 1 GiB pages)"));
        assert_eq!(
            in_use_message(M2, None, 0, 16),
            "requested 0 pages of 2 MiB, got 16: 16 pages are in use and stay as surplus pages \
             until freed (see `vhuge status` for who holds them)"
        );
    }
}
