//! Hugepage pools (/sys/kernel/mm/hugepages, per NUMA node), /proc/meminfo and hugetlbfs mounts.
//!
//! Every function takes a `root` (normally `/`) under which `proc/` and
//! `sys/` are read, so tests run on fixture trees without root.
//!
//! Kernel interface (Documentation/admin-guide/mm/hugetlbpage.rst):
//! `sys/kernel/mm/hugepages/hugepages-<N>kB/{nr_hugepages, free_hugepages,
//! resv_hugepages, surplus_hugepages, nr_overcommit_hugepages}`, per node
//! `sys/devices/system/node/node<N>/hugepages/hugepages-<N>kB/{nr_hugepages,
//! free_hugepages, surplus_hugepages}`, `proc/meminfo` (`HugePages_*` cover
//! the default size only), `proc/sys/vm/compact_memory`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::host::mounts::{self, Mount};
use crate::units::{size_to_str, size_to_suffix};

/// `statfs.f_type` of hugetlbfs.
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Errors from reading or writing the hugepage interface. Messages name the
/// file and, for system errors, the errno (`EPERM`, `EINVAL`).
#[derive(Debug, thiserror::Error)]
pub enum HugeError {
    /// Reading a file failed.
    #[error("cannot read {}: {}", path.display(), errno_text(source))]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Writing a file failed.
    #[error("cannot write {value} to {}: {}{}", path.display(), errno_text(source), write_hint(source))]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The error.
        source: io::Error,
    },
    /// A file did not hold what the kernel puts there.
    #[error("unexpected content in {}: '{text}'", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Its content.
        text: String,
    },
    /// The host does not offer this page size.
    #[error("this host has no {} hugepages (no {}): EINVAL; supported sizes: {}",
        size_to_str(*size), path.display(), supported_list(supported))]
    UnsupportedSize {
        /// The size asked for, in bytes.
        size: u64,
        /// The sysfs directory that would describe it.
        path: PathBuf,
        /// Sizes this host has, in bytes.
        supported: Vec<u64>,
    },
    /// The NUMA node does not exist.
    #[error("NUMA node {node} does not exist (no {})", path.display())]
    NoSuchNode {
        /// Node number.
        node: u32,
        /// The directory looked for.
        path: PathBuf,
    },
    /// A path for guest memory is not on hugetlbfs.
    #[error("{} is not on hugetlbfs (file system magic {magic:#x}); mount one with `vhuge mount {}`",
        path.display(), path.display())]
    NotHugetlbfs {
        /// The path.
        path: PathBuf,
        /// The file system magic found.
        magic: i64,
    },
    /// statfs failed on a path.
    #[error("cannot statfs {}: {}", path.display(), errno_text(source))]
    Statfs {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The pool cannot back the requested guest memory.
    #[error("{0}")]
    Shortfall(Box<BackingCheck>),
}

fn supported_list(sizes: &[u64]) -> String {
    if sizes.is_empty() {
        return "none (kernel without hugetlbfs?)".to_string();
    }
    sizes
        .iter()
        .map(|s| size_to_suffix(*s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `EPERM (Operation not permitted)` style text for an io::Error.
pub fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let name = format!("{:?}", nix::errno::Errno::from_raw(code));
            let msg = io::Error::from_raw_os_error(code).to_string();
            let msg = msg.split(" (os error").next().unwrap_or(&msg).to_string();
            format!("{name} ({msg})")
        }
        None => e.to_string(),
    }
}

fn write_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => "; run as root",
        _ => "",
    }
}

/// One hugepage pool (one page size), from /sys/kernel/mm/hugepages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pool {
    /// Page size in bytes.
    pub size: u64,
    /// `nr_hugepages`: pages in the pool, persistent plus surplus.
    pub total: u64,
    /// `free_hugepages`: pages not faulted in by anyone (reserved ones included).
    pub free: u64,
    /// `resv_hugepages`: pages promised to mappings but not faulted yet.
    pub reserved: u64,
    /// `surplus_hugepages`: pages above the persistent pool (overcommit).
    pub surplus: u64,
    /// `nr_overcommit_hugepages`: how many surplus pages may be allocated.
    pub overcommit: u64,
    /// Whether this is the default size (`Hugepagesize` in /proc/meminfo).
    pub default: bool,
}

impl Pool {
    /// hugeadm's Minimum: persistent pages (`total - surplus`).
    pub fn minimum(&self) -> u64 {
        self.total.saturating_sub(self.surplus)
    }
    /// hugeadm's Maximum: `minimum + overcommit`.
    pub fn maximum(&self) -> u64 {
        self.minimum() + self.overcommit
    }
    /// Pages a new mapping can reserve now: `free - reserved`.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
    /// Pages in use (faulted in): `total - free`.
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }
    /// Surplus pages that may still be allocated on demand.
    pub fn overcommit_headroom(&self) -> u64 {
        self.overcommit.saturating_sub(self.surplus)
    }
}

/// One page size on one NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodePool {
    /// NUMA node number.
    pub node: u32,
    /// Page size in bytes.
    pub size: u64,
    /// `nr_hugepages` on this node.
    pub total: u64,
    /// `free_hugepages` on this node.
    pub free: u64,
    /// `surplus_hugepages` on this node.
    pub surplus: u64,
}

/// The hugepage lines of /proc/meminfo, in file order, values as printed
/// (kB lines keep their number of kB).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HugeMeminfo {
    /// `(name, value, unit)`, e.g. `("HugePages_Total", 64, "")`,
    /// `("Hugepagesize", 2048, "kB")`.
    pub lines: Vec<(String, u64, String)>,
}

impl HugeMeminfo {
    /// A value by name (`get("HugePages_Free")`), kB lines in kB.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.lines.iter().find(|l| l.0 == name).map(|l| l.1)
    }
    /// The default hugepage size in bytes (`Hugepagesize`).
    pub fn default_size(&self) -> Option<u64> {
        self.get("Hugepagesize").map(|kb| kb * 1024)
    }
}

fn read_text(path: &Path) -> Result<String, HugeError> {
    fs::read_to_string(path).map_err(|source| HugeError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64, HugeError> {
    let text = read_text(path)?;
    text.trim().parse().map_err(|_| HugeError::Parse {
        path: path.to_path_buf(),
        text: text.trim().to_string(),
    })
}

fn read_u64_or_zero(path: &Path) -> Result<u64, HugeError> {
    match read_u64(path) {
        Err(HugeError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(0),
        other => other,
    }
}

/// `hugepages-2048kB` for 2 MiB.
pub fn size_dir_name(size: u64) -> String {
    format!("hugepages-{}kB", size / 1024)
}

fn parse_size_dir(name: &str) -> Option<u64> {
    name.strip_prefix("hugepages-")?
        .strip_suffix("kB")?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// `<root>/sys/kernel/mm/hugepages`.
pub fn global_dir(root: &Path) -> PathBuf {
    root.join("sys/kernel/mm/hugepages")
}

/// `<root>/sys/devices/system/node`.
pub fn node_root(root: &Path) -> PathBuf {
    root.join("sys/devices/system/node")
}

/// The directory for one size, global (`node = None`) or on one node.
pub fn pool_dir(root: &Path, size: u64, node: Option<u32>) -> PathBuf {
    match node {
        None => global_dir(root).join(size_dir_name(size)),
        Some(n) => node_root(root)
            .join(format!("node{n}"))
            .join("hugepages")
            .join(size_dir_name(size)),
    }
}

/// `<root>/proc/sys/vm/compact_memory`.
pub fn compact_memory_path(root: &Path) -> PathBuf {
    root.join("proc/sys/vm/compact_memory")
}

/// Hugepage sizes this host offers, ascending, in bytes.
pub fn sizes(root: &Path) -> Result<Vec<u64>, HugeError> {
    let dir = global_dir(root);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(HugeError::Read { path: dir, source }),
    };
    let mut v: Vec<u64> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_size_dir(&e.file_name().to_string_lossy()))
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// The hugepage lines of `<root>/proc/meminfo` (`HugePages_*`,
/// `Hugepagesize`, `Hugetlb`; also `AnonHugePages` and friends).
pub fn meminfo(root: &Path) -> Result<HugeMeminfo, HugeError> {
    let path = root.join("proc/meminfo");
    let text = read_text(&path)?;
    let mut lines = Vec::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if !name.to_ascii_lowercase().contains("huge") {
            continue;
        }
        let mut f = rest.split_ascii_whitespace();
        let Some(Ok(value)) = f.next().map(str::parse::<u64>) else {
            continue;
        };
        lines.push((name.to_string(), value, f.next().unwrap_or("").to_string()));
    }
    Ok(HugeMeminfo { lines })
}

/// The default hugepage size in bytes (`Hugepagesize` in /proc/meminfo),
/// or the smallest size in sysfs when meminfo has none.
pub fn default_size(root: &Path) -> Result<u64, HugeError> {
    if let Some(s) = meminfo(root)?.default_size() {
        return Ok(s);
    }
    sizes(root)?
        .first()
        .copied()
        .ok_or_else(|| HugeError::UnsupportedSize {
            size: 2 << 20,
            path: global_dir(root),
            supported: Vec::new(),
        })
}

/// Fail with `UnsupportedSize` (naming the supported sizes) unless the host
/// has pages of `size` bytes.
pub fn check_size(root: &Path, size: u64) -> Result<(), HugeError> {
    let supported = sizes(root)?;
    if supported.contains(&size) {
        return Ok(());
    }
    Err(HugeError::UnsupportedSize {
        size,
        path: pool_dir(root, size, None),
        supported,
    })
}

/// The pool of one page size.
pub fn pool(root: &Path, size: u64) -> Result<Pool, HugeError> {
    check_size(root, size)?;
    let dir = pool_dir(root, size, None);
    let default = meminfo(root).ok().and_then(|m| m.default_size()) == Some(size);
    Ok(Pool {
        size,
        total: read_u64(&dir.join("nr_hugepages"))?,
        free: read_u64(&dir.join("free_hugepages"))?,
        reserved: read_u64_or_zero(&dir.join("resv_hugepages"))?,
        surplus: read_u64_or_zero(&dir.join("surplus_hugepages"))?,
        overcommit: read_u64_or_zero(&dir.join("nr_overcommit_hugepages"))?,
        default,
    })
}

/// Every pool, by ascending page size.
pub fn pools(root: &Path) -> Result<Vec<Pool>, HugeError> {
    sizes(root)?.into_iter().map(|s| pool(root, s)).collect()
}

/// NUMA node numbers that have a hugepages directory, ascending.
pub fn nodes(root: &Path) -> Result<Vec<u32>, HugeError> {
    let dir = node_root(root);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(HugeError::Read { path: dir, source }),
    };
    let mut v: Vec<u32> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("hugepages").is_dir())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("node")?
                .parse()
                .ok()
        })
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Fail with `NoSuchNode` unless `node` has a hugepages directory.
pub fn check_node(root: &Path, node: u32) -> Result<(), HugeError> {
    let dir = node_root(root)
        .join(format!("node{node}"))
        .join("hugepages");
    if dir.is_dir() {
        Ok(())
    } else {
        Err(HugeError::NoSuchNode { node, path: dir })
    }
}

/// Per-node pools: every node × every size present under the node.
pub fn node_pools(root: &Path) -> Result<Vec<NodePool>, HugeError> {
    let mut out = Vec::new();
    for node in nodes(root)? {
        for size in sizes(root)? {
            let dir = pool_dir(root, size, Some(node));
            if !dir.is_dir() {
                continue;
            }
            out.push(NodePool {
                node,
                size,
                total: read_u64(&dir.join("nr_hugepages"))?,
                free: read_u64(&dir.join("free_hugepages"))?,
                surplus: read_u64_or_zero(&dir.join("surplus_hugepages"))?,
            });
        }
    }
    Ok(out)
}

/// One node's pool of one size.
pub fn node_pool(root: &Path, size: u64, node: u32) -> Result<NodePool, HugeError> {
    check_size(root, size)?;
    check_node(root, node)?;
    let dir = pool_dir(root, size, Some(node));
    Ok(NodePool {
        node,
        size,
        total: read_u64(&dir.join("nr_hugepages"))?,
        free: read_u64(&dir.join("free_hugepages"))?,
        surplus: read_u64_or_zero(&dir.join("surplus_hugepages"))?,
    })
}

fn write_value(path: &Path, value: u64) -> Result<(), HugeError> {
    fs::write(path, format!("{value}\n")).map_err(|source| HugeError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Write `nr_hugepages` of one size, globally or on one node. The kernel
/// may allocate fewer pages than asked; read the pool back to see.
pub fn set_nr_hugepages(
    root: &Path,
    size: u64,
    node: Option<u32>,
    count: u64,
) -> Result<(), HugeError> {
    check_size(root, size)?;
    if let Some(n) = node {
        check_node(root, n)?;
    }
    write_value(&pool_dir(root, size, node).join("nr_hugepages"), count)
}

/// Write `nr_overcommit_hugepages` of one size (global only).
pub fn set_overcommit(root: &Path, size: u64, count: u64) -> Result<(), HugeError> {
    check_size(root, size)?;
    write_value(
        &pool_dir(root, size, None).join("nr_overcommit_hugepages"),
        count,
    )
}

/// Write 1 to /proc/sys/vm/compact_memory (compacts all zones).
pub fn compact_memory(root: &Path) -> Result<(), HugeError> {
    write_value(&compact_memory_path(root), 1)
}

/// Transparent hugepage settings (`enabled`, `defrag`) from
/// `<root>/sys/kernel/mm/transparent_hugepage`: the bracketed choice, e.g.
/// `madvise`. `None` when the kernel has no THP.
pub fn thp_setting(root: &Path, name: &str) -> Option<String> {
    let text =
        fs::read_to_string(root.join("sys/kernel/mm/transparent_hugepage").join(name)).ok()?;
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// Lock file that tests and tools take (flock, exclusive) while they change
/// the host's hugepage pools, so that concurrent runs do not see each
/// other's pages.
pub const POOL_LOCK: &str = "/run/lock/vtools-hugepages.lock";

/// Take the exclusive [`POOL_LOCK`] (blocks); released when the file drops.
pub fn lock_pools() -> io::Result<nix::fcntl::Flock<fs::File>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(POOL_LOCK)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io::Error::from_raw_os_error(e as i32))
}

/// A hugetlbfs mount and its page size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugetlbfsMount {
    /// Mount point.
    pub target: PathBuf,
    /// Source field (`hugetlbfs`, `none`).
    pub source: String,
    /// Page size in bytes: the `pagesize=` option, else the default size.
    pub page_size: u64,
    /// All options as in /proc/mounts.
    pub options: String,
    /// `size=` limit in bytes, if any.
    pub max_size: Option<u64>,
    /// `min_size=` in bytes, if any.
    pub min_size: Option<u64>,
}

/// hugetlbfs mounts in `<root>/proc/mounts`. `pagesize=` comes from the
/// options (the kernel prints it as `2M`/`1024M`); without it the default
/// size applies.
pub fn hugetlbfs_mounts(root: &Path) -> Result<Vec<HugetlbfsMount>, HugeError> {
    let path = root.join("proc/mounts");
    let all = mounts::mounts(root).map_err(|source| HugeError::Read { path, source })?;
    let default = default_size(root).unwrap_or(2 << 20);
    Ok(all
        .iter()
        .filter(|m| m.fstype == "hugetlbfs")
        .map(|m| hugetlbfs_mount_of(m, default))
        .collect())
}

fn opt_size(m: &Mount, name: &str) -> Option<u64> {
    m.option(name)
        .and_then(|v| crate::units::parse_size(v, crate::units::Suffix::B).ok())
}

fn hugetlbfs_mount_of(m: &Mount, default: u64) -> HugetlbfsMount {
    HugetlbfsMount {
        target: m.target.clone(),
        source: m.source.clone(),
        page_size: opt_size(m, "pagesize").unwrap_or(default),
        options: m.options_string(),
        max_size: opt_size(m, "size"),
        min_size: opt_size(m, "min_size"),
    }
}

/// What kind of process holds hugetlbfs memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HolderKind {
    /// A vmrun guest.
    Vmrun,
    /// A QEMU process.
    Qemu,
    /// Anything else.
    Other,
}

/// A process that maps or has open files on hugetlbfs (or anonymous
/// `MAP_HUGETLB` memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// `comm`.
    pub comm: String,
    /// vmrun, QEMU or other.
    pub kind: HolderKind,
    /// Bytes mapped from hugetlbfs files and anonymous hugetlb memory.
    pub mapped: u64,
    /// Files (hugetlbfs paths, `/anon_hugepage`), each once, sorted.
    pub files: Vec<String>,
}

fn classify(comm: &str, cmdline: &str) -> HolderKind {
    let exe = cmdline.split('\0').next().unwrap_or("");
    let base = exe.rsplit('/').next().unwrap_or("");
    if comm == "vmrun" || base == "vmrun" {
        HolderKind::Vmrun
    } else if comm.starts_with("qemu") || base.starts_with("qemu") {
        HolderKind::Qemu
    } else {
        HolderKind::Other
    }
}

/// Parse one /proc/PID/maps text: hugetlbfs ranges as `(path, bytes)`.
/// A range counts when its path is under one of `mount_points` or is
/// anonymous hugetlb memory (`/anon_hugepage`). ` (deleted)` is kept in the
/// path, as the kernel prints it.
pub fn parse_maps(text: &str, mount_points: &[PathBuf]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(6, ' ');
        let Some(range) = f.next() else { continue };
        // perms, offset, dev, inode
        for _ in 0..4 {
            f.next();
        }
        let path = f.next().unwrap_or("").trim_start();
        if path.is_empty() {
            continue;
        }
        let plain = path.strip_suffix(" (deleted)").unwrap_or(path);
        let hugetlb = plain == "/anon_hugepage"
            || mount_points.iter().any(|m| Path::new(plain).starts_with(m));
        if !hugetlb {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        out.push((path.to_string(), b.saturating_sub(a)));
    }
    out
}

/// Parse /proc/PID/smaps text: `memfd:` mappings backed by hugepages
/// (`KernelPageSize` above 4 kB; transparent hugepages report 4 kB), as
/// `(path, bytes)`. This finds `memfd_create(MFD_HUGETLB)` guest memory
/// (QEMU `memory-backend-memfd,hugetlb=on`, vmrun memfd backing), which
/// /proc/PID/maps alone cannot tell from ordinary memfds.
pub fn parse_smaps_memfd_hugetlb(text: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, u64)> = None;
    for line in text.lines() {
        let first = line.split(' ').next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let path = line.splitn(6, ' ').nth(5).unwrap_or("").trim_start();
                cur = path
                    .starts_with("/memfd:")
                    .then(|| (path.to_string(), b.saturating_sub(a)));
                continue;
            }
        }
        if let Some(kb) = line.strip_prefix("KernelPageSize:") {
            let kb: u64 = kb
                .split_ascii_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if let Some(c) = cur.take() {
                if kb > 4 {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Processes under `<root>/proc` that map hugetlbfs files (from
/// `/proc/PID/maps`), anonymous hugetlb memory, hugetlb memfds (from
/// `/proc/PID/smaps`, read only for processes with memfd mappings), or hold
/// open file descriptors on a hugetlbfs mount. Processes that vanish or cannot be
/// read are skipped.
pub fn holders(root: &Path, mounts: &[HugetlbfsMount]) -> Result<Vec<Holder>, HugeError> {
    holders_and_denied(root, mounts).map(|(h, _)| h)
}

/// [`holders`], plus how many processes could not be inspected because
/// their /proc/PID/maps was not readable (EACCES without root).
pub fn holders_and_denied(
    root: &Path,
    mounts: &[HugetlbfsMount],
) -> Result<(Vec<Holder>, usize), HugeError> {
    let mut denied = 0;
    let proc_dir = root.join("proc");
    let rd = fs::read_dir(&proc_dir).map_err(|source| HugeError::Read {
        path: proc_dir.clone(),
        source,
    })?;
    let points: Vec<PathBuf> = mounts.iter().map(|m| m.target.clone()).collect();
    let mut out = Vec::new();
    for entry in rd.filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let dir = entry.path();
        let mut files: BTreeMap<String, ()> = BTreeMap::new();
        let mut mapped = 0;
        let maps = fs::read_to_string(dir.join("maps"));
        if let Err(e) = &maps {
            if e.kind() == io::ErrorKind::PermissionDenied {
                denied += 1;
            }
        }
        if let Ok(maps) = maps {
            for (path, bytes) in parse_maps(&maps, &points) {
                mapped += bytes;
                files.insert(path, ());
            }
            if maps.contains("/memfd:") {
                if let Ok(smaps) = fs::read_to_string(dir.join("smaps")) {
                    for (path, bytes) in parse_smaps_memfd_hugetlb(&smaps) {
                        mapped += bytes;
                        files.insert(path, ());
                    }
                }
            }
        }
        if !points.is_empty() {
            if let Ok(fds) = fs::read_dir(dir.join("fd")) {
                for fd in fds.filter_map(|e| e.ok()) {
                    let Ok(link) = fs::read_link(fd.path()) else {
                        continue;
                    };
                    let s = link.to_string_lossy().into_owned();
                    let plain = s.strip_suffix(" (deleted)").unwrap_or(&s);
                    if points.iter().any(|m| Path::new(plain).starts_with(m)) {
                        files.insert(s.clone(), ());
                    }
                }
            }
        }
        if files.is_empty() {
            continue;
        }
        let comm = fs::read_to_string(dir.join("comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default();
        let cmdline = fs::read_to_string(dir.join("cmdline")).unwrap_or_default();
        out.push(Holder {
            pid,
            kind: classify(&comm, &cmdline),
            comm,
            mapped,
            files: files.into_keys().collect(),
        });
    }
    out.sort_by_key(|h| h.pid);
    Ok((out, denied))
}

/// Page size and free blocks of a hugetlbfs path, from statfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugetlbfsStat {
    /// `f_bsize`: the mount's hugepage size in bytes.
    pub page_size: u64,
    /// Pages left under the mount's `size=` limit (`f_bavail`), or `None`
    /// when the mount has no limit.
    pub limit_free: Option<u64>,
}

/// statfs `path` and check that it is on hugetlbfs.
pub fn statfs_hugetlbfs(path: &Path) -> Result<HugetlbfsStat, HugeError> {
    let st = nix::sys::statfs::statfs(path).map_err(|e| HugeError::Statfs {
        path: path.to_path_buf(),
        source: io::Error::from_raw_os_error(e as i32),
    })?;
    #[allow(clippy::unnecessary_cast)]
    let magic = st.filesystem_type().0 as i64;
    if magic != HUGETLBFS_MAGIC {
        return Err(HugeError::NotHugetlbfs {
            path: path.to_path_buf(),
            magic,
        });
    }
    #[allow(clippy::unnecessary_cast)]
    let page_size = st.block_size() as u64;
    #[allow(clippy::unnecessary_cast)]
    let blocks = st.blocks() as u64;
    #[allow(clippy::unnecessary_cast)]
    let avail = st.blocks_available() as u64;
    Ok(HugetlbfsStat {
        page_size,
        limit_free: (blocks != 0).then_some(avail),
    })
}

/// The verdict on backing guest memory with hugepages. `Display` explains
/// it, with numbers and the `vhuge set` command that fixes a shortfall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackingCheck {
    /// What backs the memory (a hugetlbfs path), for messages.
    pub path: PathBuf,
    /// Guest memory in bytes.
    pub bytes: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages needed: ⌈bytes / page_size⌉.
    pub pages_needed: u64,
    /// The pool of that size as read.
    pub pool: Pool,
    /// Pages left under the mount's `size=` limit, if it has one.
    pub limit_free: Option<u64>,
}

impl BackingCheck {
    /// Pages short in the persistent pool (0 when it fits in free - reserved).
    pub fn short(&self) -> u64 {
        self.pages_needed.saturating_sub(self.pool.available())
    }
    /// True when the mount's `size=` limit is too small.
    pub fn limit_short(&self) -> bool {
        self.limit_free.is_some_and(|f| f < self.pages_needed)
    }
    /// True when the memory can be backed now, counting surplus pages the
    /// overcommit setting still allows (those may fail to allocate).
    pub fn fits(&self) -> bool {
        !self.limit_short() && self.short() <= self.pool.overcommit_headroom()
    }
    /// True when the memory fits without surplus pages.
    pub fn fits_persistent(&self) -> bool {
        !self.limit_short() && self.short() == 0
    }
    /// The pool size (`nr_hugepages`) that makes it fit.
    pub fn target_total(&self) -> u64 {
        self.pool.total + self.short()
    }
    /// `vhuge set --size 2M 612`.
    pub fn fix_command(&self) -> String {
        format!(
            "vhuge set --size {} {}",
            size_to_suffix(self.page_size),
            self.target_total()
        )
    }
}

impl std::fmt::Display for BackingCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ps = size_to_str(self.page_size);
        write!(
            f,
            "{} of guest memory needs {} pages of {ps} on {}",
            size_to_str(self.bytes),
            self.pages_needed,
            self.path.display()
        )?;
        if self.limit_short() {
            return write!(
                f,
                ", but the mount's size= limit leaves {} pages; remount with a larger \
                 --max-size (vhuge umount {p}; vhuge mount {p} --size {})",
                self.limit_free.unwrap_or(0),
                size_to_suffix(self.page_size),
                p = self.path.display()
            );
        }
        let p = &self.pool;
        if self.fits_persistent() {
            return write!(
                f,
                "; the {ps} pool has {} available ({} free - {} reserved)",
                p.available(),
                p.free,
                p.reserved
            );
        }
        write!(
            f,
            ", but the {ps} pool has {} available ({} total, {} free - {} reserved)",
            p.available(),
            p.total,
            p.free,
            p.reserved
        )?;
        if self.fits() {
            write!(
                f,
                "; the rest may come from overcommit ({} surplus pages allowed) if memory \
                 allows; to be sure run `{}`",
                p.overcommit_headroom(),
                self.fix_command()
            )
        } else {
            write!(
                f,
                ": short by {} pages; run `{}`",
                self.short(),
                self.fix_command()
            )
        }
    }
}

/// Compare guest memory of `bytes` with the pool of `page_size` (no statfs;
/// for fixture trees and plans).
pub fn check_pool(
    root: &Path,
    path: &Path,
    page_size: u64,
    bytes: u64,
    limit_free: Option<u64>,
) -> Result<BackingCheck, HugeError> {
    let pool = pool(root, page_size)?;
    Ok(BackingCheck {
        path: path.to_path_buf(),
        bytes,
        page_size,
        pages_needed: bytes.div_ceil(page_size.max(1)),
        pool,
        limit_free,
    })
}

/// What a VMM calls before mapping guest memory of `bytes` from hugetlbfs
/// directory `path` (`-mem-path`): statfs gives the page size; the pool of
/// that size must have `free - reserved` pages for it (or overcommit room).
/// Returns the check on success and `HugeError::Shortfall` (whose message
/// has the numbers and the `vhuge set` command) when it cannot fit.
pub fn check_backing(path: &Path, bytes: u64) -> Result<BackingCheck, HugeError> {
    let st = statfs_hugetlbfs(path)?;
    let check = check_pool(Path::new("/"), path, st.page_size, bytes, st.limit_free)?;
    if check.fits() {
        Ok(check)
    } else {
        Err(HugeError::Shortfall(Box::new(check)))
    }
}

/// The same check for hugetlb memory without a mount (`memfd_create` with
/// `MFD_HUGETLB`, `MAP_HUGETLB`): `page_size` `None` means the default
/// hugepage size. `what` names the backing in messages (e.g. `memfd`).
pub fn check_hugetlb_memory(
    what: &str,
    page_size: Option<u64>,
    bytes: u64,
) -> Result<BackingCheck, HugeError> {
    let root = Path::new("/");
    let size = match page_size {
        Some(s) => s,
        None => default_size(root)?,
    };
    let check = check_pool(root, Path::new(what), size, bytes, None)?;
    if check.fits() {
        Ok(check)
    } else {
        Err(HugeError::Shortfall(Box::new(check)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a fixture tree: `pools` = (size, total, free, resv, surp, overcommit).
    fn fixture(pools: &[(u64, u64, u64, u64, u64, u64)], default_kb: u64) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for &(size, total, free, resv, surp, over) in pools {
            let d = pool_dir(t.path(), size, None);
            fs::create_dir_all(&d).unwrap();
            for (n, v) in [
                ("nr_hugepages", total),
                ("free_hugepages", free),
                ("resv_hugepages", resv),
                ("surplus_hugepages", surp),
                ("nr_overcommit_hugepages", over),
            ] {
                fs::write(d.join(n), format!("{v}\n")).unwrap();
            }
            let nd = pool_dir(t.path(), size, Some(0));
            fs::create_dir_all(&nd).unwrap();
            for (n, v) in [
                ("nr_hugepages", total),
                ("free_hugepages", free),
                ("surplus_hugepages", surp),
            ] {
                fs::write(nd.join(n), format!("{v}\n")).unwrap();
            }
        }
        fs::create_dir_all(t.path().join("proc/sys/vm")).unwrap();
        fs::write(
            t.path().join("proc/meminfo"),
            format!(
                "MemTotal:       24000000 kB\nAnonHugePages:         0 kB\n\
                 HugePages_Total:      64\nHugePages_Free:       48\nHugePages_Rsvd:        4\n\
                 HugePages_Surp:        0\nHugepagesize:       {default_kb} kB\nHugetlb:          131072 kB\n"
            ),
        )
        .unwrap();
        fs::write(
            t.path().join("proc/mounts"),
            "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n\
             none /mnt/huge1g hugetlbfs rw,relatime,pagesize=1024M,size=2147483648 0 0\n\
             none /mnt/hdef hugetlbfs rw,relatime 0 0\n",
        )
        .unwrap();
        t
    }

    const M2: u64 = 2 << 20;
    const G1: u64 = 1 << 30;

    #[test]
    fn reads_pools_and_meminfo() {
        let t = fixture(&[(M2, 64, 48, 4, 2, 8), (G1, 2, 2, 0, 0, 0)], 2048);
        let root = t.path();
        assert_eq!(sizes(root).unwrap(), vec![M2, G1]);
        let p = pool(root, M2).unwrap();
        assert_eq!(
            (p.total, p.free, p.reserved, p.surplus, p.overcommit),
            (64, 48, 4, 2, 8)
        );
        assert!(p.default);
        assert_eq!(
            (p.minimum(), p.maximum(), p.available(), p.used()),
            (62, 70, 44, 16)
        );
        assert_eq!(p.overcommit_headroom(), 6);
        assert!(!pool(root, G1).unwrap().default);
        let m = meminfo(root).unwrap();
        assert_eq!(m.get("HugePages_Rsvd"), Some(4));
        assert_eq!(m.get("MemTotal"), None);
        assert_eq!(m.default_size(), Some(M2));
        assert_eq!(m.lines[0].0, "AnonHugePages");
        assert_eq!(default_size(root).unwrap(), M2);
        let n = node_pools(root).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(
            (n[0].node, n[0].size, n[0].total, n[0].free),
            (0, M2, 64, 48)
        );
        assert_eq!(nodes(root).unwrap(), vec![0]);
        assert!(matches!(
            check_node(root, 1),
            Err(HugeError::NoSuchNode { node: 1, .. })
        ));
    }

    #[test]
    fn thp_settings() {
        let t = fixture(&[(M2, 0, 0, 0, 0, 0)], 2048);
        assert_eq!(thp_setting(t.path(), "enabled"), None);
        let d = t.path().join("sys/kernel/mm/transparent_hugepage");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("enabled"), "always [madvise] never\n").unwrap();
        fs::write(
            d.join("defrag"),
            "always defer defer+madvise [madvise] never\n",
        )
        .unwrap();
        assert_eq!(thp_setting(t.path(), "enabled").as_deref(), Some("madvise"));
        assert_eq!(thp_setting(t.path(), "defrag").as_deref(), Some("madvise"));
    }

    #[test]
    fn unsupported_size_names_file_and_einval() {
        let t = fixture(&[(M2, 0, 0, 0, 0, 0)], 2048);
        let e = pool(t.path(), G1).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("hugepages-1048576kB"), "{s}");
        assert!(s.contains("EINVAL"), "{s}");
        assert!(s.ends_with("supported sizes: 2M"), "{s}");
    }

    #[test]
    fn writes_pool_files() {
        let t = fixture(&[(M2, 0, 0, 0, 0, 0)], 2048);
        set_nr_hugepages(t.path(), M2, None, 64).unwrap();
        set_nr_hugepages(t.path(), M2, Some(0), 32).unwrap();
        set_overcommit(t.path(), M2, 5).unwrap();
        compact_memory(t.path()).unwrap();
        assert_eq!(pool(t.path(), M2).unwrap().total, 64);
        assert_eq!(pool(t.path(), M2).unwrap().overcommit, 5);
        assert_eq!(node_pool(t.path(), M2, 0).unwrap().total, 32);
        assert_eq!(
            fs::read_to_string(compact_memory_path(t.path())).unwrap(),
            "1\n"
        );
        assert!(set_nr_hugepages(t.path(), M2, Some(3), 1).is_err());
    }

    #[test]
    fn write_error_names_file_and_errno() {
        let e = HugeError::Write {
            path: PathBuf::from("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
            value: "64".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(
            e.to_string(),
            "cannot write 64 to /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages: \
             EPERM (Operation not permitted); run as root"
        );
    }

    #[test]
    fn mounts_with_page_sizes() {
        let t = fixture(&[(M2, 0, 0, 0, 0, 0), (G1, 0, 0, 0, 0, 0)], 2048);
        let m = hugetlbfs_mounts(t.path()).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].page_size, M2);
        assert_eq!(m[1].page_size, G1);
        assert_eq!(m[1].max_size, Some(2 * G1));
        assert_eq!(m[2].page_size, M2, "no pagesize= means the default size");
    }

    #[test]
    fn maps_and_holders() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 fd:01 123  /usr/bin/qemu-system-x86_64
7f0000000000-7f0040000000 rw-s 00000000 00:2e 4567                       /dev/hugepages/qemu_back_mem.pc.ram.abc (deleted)
7f1000000000-7f1000200000 rw-p 00000000 00:0f 99   /anon_hugepage (deleted)
7f2000000000-7f2000001000 rw-p 00000000 00:00 0 
7f3000000000-7f3000200000 rw-s 00000000 00:2e 4568 /dev/hugepages2/x
";
        let r = parse_maps(maps, &[PathBuf::from("/dev/hugepages")]);
        assert_eq!(
            r,
            vec![
                (
                    "/dev/hugepages/qemu_back_mem.pc.ram.abc (deleted)".to_string(),
                    1 << 30
                ),
                ("/anon_hugepage (deleted)".to_string(), 2 << 20),
            ]
        );
        let t = fixture(&[(M2, 64, 48, 0, 0, 0)], 2048);
        let pd = t.path().join("proc/4242");
        fs::create_dir_all(&pd).unwrap();
        fs::write(pd.join("maps"), maps).unwrap();
        fs::write(pd.join("comm"), "qemu-system-x86\n").unwrap();
        fs::write(
            pd.join("cmdline"),
            "/usr/bin/qemu-system-x86_64\0-m\x001G\0",
        )
        .unwrap();
        let pd = t.path().join("proc/77");
        fs::create_dir_all(&pd).unwrap();
        fs::write(pd.join("maps"), "").unwrap();
        let mounts = hugetlbfs_mounts(t.path()).unwrap();
        let h = holders(t.path(), &mounts).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].pid, 4242);
        assert_eq!(h[0].kind, HolderKind::Qemu);
        assert_eq!(h[0].mapped, (1 << 30) + (2 << 20));
        assert_eq!(classify("vmrun", ""), HolderKind::Vmrun);
        assert_eq!(
            classify("vcpu0", "/usr/local/bin/vmrun\0-m"),
            HolderKind::Vmrun
        );
        assert_eq!(classify("bash", "bash"), HolderKind::Other);
    }

    #[test]
    fn smaps_finds_hugetlb_memfd() {
        let smaps = "\
7f0000000000-7f0040000000 rw-s 00000000 00:01 12 /memfd:guest-ram (deleted)
Size:            1048576 kB
KernelPageSize:     2048 kB
MMUPageSize:        2048 kB
7f1000000000-7f1000400000 rw-s 00000000 00:01 13 /memfd:other (deleted)
Size:               4096 kB
KernelPageSize:        4 kB
7f2000000000-7f2000200000 rw-p 00000000 00:00 0
KernelPageSize:     2048 kB
";
        assert_eq!(
            parse_smaps_memfd_hugetlb(smaps),
            vec![("/memfd:guest-ram (deleted)".to_string(), 1 << 30)]
        );
    }

    #[test]
    fn backing_check_numbers_and_fix() {
        let t = fixture(&[(M2, 120, 120, 20, 0, 0)], 2048);
        let c = check_pool(t.path(), Path::new("/dev/hugepages"), M2, G1, None).unwrap();
        assert_eq!(c.pages_needed, 512);
        assert_eq!(c.short(), 412);
        assert!(!c.fits());
        assert_eq!(c.target_total(), 532);
        assert_eq!(c.fix_command(), "vhuge set --size 2M 532");
        assert_eq!(
            c.to_string(),
            "1 GiB of guest memory needs 512 pages of 2 MiB on /dev/hugepages, but the 2 MiB \
             pool has 100 available (120 total, 120 free - 20 reserved): short by 412 pages; \
             run `vhuge set --size 2M 532`"
        );
        let ok = check_pool(
            t.path(),
            Path::new("/dev/hugepages"),
            M2,
            100 * M2 - 1,
            None,
        )
        .unwrap();
        assert_eq!(ok.pages_needed, 100);
        assert!(ok.fits() && ok.fits_persistent());
        let lim = check_pool(t.path(), Path::new("/h"), M2, 100 * M2, Some(10)).unwrap();
        assert!(!lim.fits());
        assert!(
            lim.to_string().contains("size= limit leaves 10 pages"),
            "{lim}"
        );
    }

    #[test]
    fn backing_check_counts_overcommit() {
        let t = fixture(&[(M2, 10, 10, 0, 0, 100)], 2048);
        let c = check_pool(t.path(), Path::new("/dev/hugepages"), M2, 50 * M2, None).unwrap();
        assert!(c.fits());
        assert!(!c.fits_persistent());
        assert!(c.to_string().contains("overcommit"), "{c}");
    }

    #[test]
    fn check_hugetlb_memory_on_this_host() {
        // Read-only: 1 byte of hugetlb memory fits exactly when the default
        // pool has a page available (or overcommit room).
        let Ok(p) = pool(Path::new("/"), default_size(Path::new("/")).unwrap_or(M2)) else {
            eprintln!("skipping: no hugepages on this host");
            return;
        };
        let r = check_hugetlb_memory("memfd", None, 1);
        assert_eq!(
            r.is_ok(),
            p.available() + p.overcommit_headroom() >= 1,
            "{r:?}"
        );
        if let Err(e) = r {
            assert!(e.to_string().contains("on memfd"), "{e}");
        }
        assert!(check_hugetlb_memory("memfd", Some(3 << 20), 1).is_err());
    }

    #[test]
    fn check_backing_rejects_non_hugetlbfs() {
        let e = check_backing(Path::new("/"), G1).unwrap_err();
        assert!(matches!(e, HugeError::NotHugetlbfs { .. }), "{e}");
        assert!(e.to_string().contains("is not on hugetlbfs"));
        let e = check_backing(Path::new("/nonexistent/x"), G1).unwrap_err();
        assert!(e.to_string().contains("ENOENT"), "{e}");
    }
}
