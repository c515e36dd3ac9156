//! Online, isolated and nohz_full CPUs, SMT siblings and NUMA nodes from
//! /sys, and the `isolcpus=` / `nohz_full=` the kernel command line asked for.
//!
//! Every reader takes the filesystem root (normally `/`). The `procfs` crate
//! does not read /sys, so these files are parsed here; each holds one CPU
//! list in the kernel's format, which [`CpuSet::parse_list`] reads. An empty
//! file (`isolated` on a host without isolation) is the empty set.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::cpulist::{CpuListError, CpuSet};

/// Errors reading host CPU information.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file did not hold a CPU list.
    #[error("cannot parse {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The CPU list error.
        source: CpuListError,
    },
}

/// What the kernel command line asked for with `isolcpus=`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IsolCpus {
    /// The value as written (`domain,managed_irq,2-3`).
    pub raw: String,
    /// Flags before the list (`nohz`, `domain`, `managed_irq`).
    pub flags: Vec<String>,
    /// The CPUs, if the list is in a syntax we read.
    pub cpus: Option<CpuSet>,
}

/// Everything `vpin cpus` shows about the host's CPUs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostCpus {
    /// `/sys/devices/system/cpu/online`.
    pub online: CpuSet,
    /// `/sys/devices/system/cpu/isolated` (what the kernel accepted).
    pub isolated: CpuSet,
    /// `/sys/devices/system/cpu/nohz_full`; `None` without CONFIG_NO_HZ_FULL.
    pub nohz_full: Option<CpuSet>,
    /// `isolcpus=` on `/proc/cmdline`.
    pub isolcpus_cmdline: Option<IsolCpus>,
    /// `nohz_full=` on `/proc/cmdline`, as written.
    pub nohz_full_cmdline: Option<String>,
    /// SMT siblings of each online CPU (`topology/thread_siblings_list`).
    pub siblings: BTreeMap<u32, CpuSet>,
    /// CPUs of each NUMA node (`/sys/devices/system/node/nodeN/cpulist`);
    /// empty when the kernel has no NUMA support.
    pub nodes: BTreeMap<u32, CpuSet>,
}

impl HostCpus {
    /// Reads everything from `root`.
    pub fn read(root: &Path) -> Result<HostCpus, CpuError> {
        let online = online(root)?;
        let cmdline = kernel_cmdline(root)?;
        let mut siblings = BTreeMap::new();
        for cpu in online.iter() {
            if let Some(s) = thread_siblings(root, cpu)? {
                siblings.insert(cpu, s);
            }
        }
        Ok(HostCpus {
            isolated: isolated(root)?,
            nohz_full: nohz_full(root)?,
            isolcpus_cmdline: isolcpus_from_cmdline(&cmdline),
            nohz_full_cmdline: cmdline_param(&cmdline, "nohz_full").map(str::to_string),
            siblings,
            nodes: numa_nodes(root)?,
            online,
        })
    }

    /// The NUMA node of a CPU.
    pub fn node_of(&self, cpu: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|(_, cpus)| cpus.contains(cpu))
            .map(|(n, _)| *n)
    }

    /// The core of a CPU, named by its lowest SMT sibling.
    pub fn core_of(&self, cpu: u32) -> u32 {
        self.siblings
            .get(&cpu)
            .and_then(|s| s.iter().next())
            .unwrap_or(cpu)
    }
}

/// `ROOT/sys/devices/system/cpu`.
pub fn cpu_dir(root: &Path) -> PathBuf {
    root.join("sys/devices/system/cpu")
}

/// Reads a file holding one CPU list; `Ok(None)` if it does not exist.
pub fn read_cpulist_file(path: &Path) -> Result<Option<CpuSet>, CpuError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CpuError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let text = text.trim();
    if text.is_empty() || text == "(null)" {
        return Ok(Some(CpuSet::new()));
    }
    CpuSet::parse_list(text)
        .map(Some)
        .map_err(|source| CpuError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

fn required(path: PathBuf) -> Result<CpuSet, CpuError> {
    read_cpulist_file(&path)?.ok_or_else(|| CpuError::Read {
        path,
        source: io::Error::from(io::ErrorKind::NotFound),
    })
}

/// Online CPUs.
pub fn online(root: &Path) -> Result<CpuSet, CpuError> {
    required(cpu_dir(root).join("online"))
}

/// Isolated CPUs (`isolcpus=` as the kernel accepted it); empty if none or
/// if the file does not exist.
pub fn isolated(root: &Path) -> Result<CpuSet, CpuError> {
    Ok(read_cpulist_file(&cpu_dir(root).join("isolated"))?.unwrap_or_default())
}

/// Adaptive-tick CPUs; `None` when the kernel lacks CONFIG_NO_HZ_FULL.
pub fn nohz_full(root: &Path) -> Result<Option<CpuSet>, CpuError> {
    read_cpulist_file(&cpu_dir(root).join("nohz_full"))
}

/// SMT siblings of a CPU, including itself; `None` if the kernel does not
/// say (offline CPU, no topology directory).
pub fn thread_siblings(root: &Path, cpu: u32) -> Result<Option<CpuSet>, CpuError> {
    read_cpulist_file(
        &cpu_dir(root)
            .join(format!("cpu{cpu}"))
            .join("topology/thread_siblings_list"),
    )
}

/// NUMA nodes and their CPUs; empty without `/sys/devices/system/node`.
pub fn numa_nodes(root: &Path) -> Result<BTreeMap<u32, CpuSet>, CpuError> {
    let dir = root.join("sys/devices/system/node");
    let mut nodes = BTreeMap::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(nodes),
        Err(source) => return Err(CpuError::Read { path: dir, source }),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("node"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(cpus) = read_cpulist_file(&entry.path().join("cpulist"))? {
            nodes.insert(n, cpus);
        }
    }
    Ok(nodes)
}

/// The kernel command line (`ROOT/proc/cmdline`), empty if unreadable.
pub fn kernel_cmdline(root: &Path) -> Result<String, CpuError> {
    let path = root.join("proc/cmdline");
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(CpuError::Read { path, source }),
    }
}

/// The value of the last `NAME=` on a kernel command line (the kernel lets
/// later ones win), before any `--` that starts init's arguments.
pub fn cmdline_param<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .filter_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .last()
}

/// Parses `isolcpus=[flag,...,]LIST` from a kernel command line.
pub fn isolcpus_from_cmdline(cmdline: &str) -> Option<IsolCpus> {
    let raw = cmdline_param(cmdline, "isolcpus")?;
    const FLAGS: [&str; 3] = ["nohz", "domain", "managed_irq"];
    let mut flags = Vec::new();
    let mut rest = raw;
    while let Some((head, tail)) = rest.split_once(',') {
        if FLAGS.contains(&head) {
            flags.push(head.to_string());
            rest = tail;
        } else {
            break;
        }
    }
    if FLAGS.contains(&rest) {
        flags.push(rest.to_string());
        rest = "";
    }
    Some(IsolCpus {
        raw: raw.to_string(),
        flags,
        cpus: CpuSet::parse_list(rest).ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vpin/host")
    }

    #[test]
    fn reads_fixture_host() {
        let h = HostCpus::read(&fixtures()).unwrap();
        assert_eq!(h.online.to_list(), "0-7");
        assert_eq!(h.isolated.to_list(), "2,3,6,7");
        assert_eq!(h.nohz_full.as_ref().unwrap().to_list(), "2,3,6,7");
        let iso = h.isolcpus_cmdline.as_ref().unwrap();
        assert_eq!(iso.flags, ["domain", "managed_irq"]);
        assert_eq!(iso.cpus.as_ref().unwrap().to_list(), "2,3,6,7");
        assert_eq!(h.nohz_full_cmdline.as_deref(), Some("2-3,6-7"));
        assert_eq!(h.siblings[&6].to_list(), "2,6");
        assert_eq!(h.core_of(6), 2);
        assert_eq!(h.nodes.len(), 2);
        assert_eq!(h.nodes[&1].to_list(), "2,3,6,7");
        assert_eq!(h.node_of(5), Some(0));
    }

    #[test]
    fn isolcpus_forms() {
        let p = |s: &str| isolcpus_from_cmdline(s);
        assert_eq!(
            p("quiet isolcpus=1-3").unwrap().cpus.unwrap().to_list(),
            "1-3"
        );
        assert_eq!(p("isolcpus=nohz,2").unwrap().flags, ["nohz"]);
        assert_eq!(p("isolcpus=1 isolcpus=2").unwrap().raw, "2");
        assert!(p("quiet").is_none());
        assert!(p("quiet -- isolcpus=1").is_none());
        // The kernel's "N" (last CPU) and group syntax are kept raw.
        let odd = p("isolcpus=0-7:2/4").unwrap();
        assert!(odd.cpus.is_none());
        assert_eq!(odd.raw, "0-7:2/4");
    }

    #[test]
    fn missing_and_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = online(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("sys/devices/system/cpu/online"),
            "{err}"
        );
        assert!(isolated(dir.path()).unwrap().is_empty());
        assert!(nohz_full(dir.path()).unwrap().is_none());
        assert!(numa_nodes(dir.path()).unwrap().is_empty());
        let cpu = cpu_dir(dir.path());
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join("online"), "0-x\n").unwrap();
        let err = online(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("online: failed to parse CPU list: 0-x"),
            "{err}"
        );
        std::fs::write(cpu.join("isolated"), "\n").unwrap();
        assert!(isolated(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn this_host() {
        let h = HostCpus::read(Path::new("/")).unwrap();
        assert!(!h.online.is_empty());
        for cpu in h.online.iter() {
            if let Some(s) = h.siblings.get(&cpu) {
                assert!(s.contains(cpu));
            }
        }
    }
}
