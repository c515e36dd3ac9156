//! Which thread of a VMM process does what: vCPU N, I/O or emulator.
//!
//! Sources, most authoritative first:
//!
//! 1. vmrun's thread map ([`ThreadMap`], `threads.json` in the guest's run
//!    directory) or QEMU's `query-cpus-fast` / `query-iothreads` over QMP,
//!    passed in as [`KnownThreads`];
//! 2. thread names: vmrun `vcpu0` and `io-<dev>`; QEMU `CPU 0/KVM` and
//!    `IO <id>` (only with `-name ...,debug-threads=on`); Firecracker
//!    `fc_vcpu 0`; Cloud Hypervisor `vcpu0` (its virtio queue workers
//!    `<dev>_q0` / `<dev>_qp0` count as I/O); crosvm `crosvm_vcpu0`;
//!    kvmtool `kvm-vcpu-0`;
//! 3. the `anon_inode:kvm-vcpu:N` descriptors, which give the vCPU count but
//!    not which thread runs which vCPU ([`Guest::vcpu_order_known`] is false).
//!
//! Every other thread is an emulator thread. Threads that exit while being
//! read are listed in [`Guest::vanished`], not treated as errors.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::tasks::{self, TaskError};
use crate::cpulist::CpuSet;

/// A virtual machine monitor we know the thread names of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vmm {
    /// This project's vmrun.
    Vmrun,
    /// QEMU (`qemu-system-*`, `qemu-kvm`).
    Qemu,
    /// Firecracker.
    Firecracker,
    /// Cloud Hypervisor.
    CloudHypervisor,
    /// crosvm.
    Crosvm,
    /// kvmtool (`lkvm`).
    Lkvm,
}

impl Vmm {
    /// Every VMM, in the order [`Vmm::from_name`] accepts them.
    pub const ALL: [Vmm; 6] = [
        Vmm::Vmrun,
        Vmm::Qemu,
        Vmm::Firecracker,
        Vmm::CloudHypervisor,
        Vmm::Crosvm,
        Vmm::Lkvm,
    ];

    /// The name used on command lines and in JSON (`cloud-hypervisor`).
    pub fn as_str(self) -> &'static str {
        match self {
            Vmm::Vmrun => "vmrun",
            Vmm::Qemu => "qemu",
            Vmm::Firecracker => "firecracker",
            Vmm::CloudHypervisor => "cloud-hypervisor",
            Vmm::Crosvm => "crosvm",
            Vmm::Lkvm => "lkvm",
        }
    }

    /// The VMM named `s` (as [`Vmm::as_str`] prints it).
    pub fn from_name(s: &str) -> Option<Vmm> {
        Vmm::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Recognises a VMM from a program name: an executable's file name, a
    /// command's argv\[0\] or a process's `comm` (which Linux truncates to 15
    /// bytes, so `cloud-hyperviso` and `qemu-system-x86` count).
    pub fn from_program(name: &str) -> Option<Vmm> {
        let base = name.rsplit('/').next().unwrap_or(name);
        let base = base.strip_suffix(" (deleted)").unwrap_or(base);
        if base.starts_with("qemu-system-") || base == "qemu-kvm" {
            Some(Vmm::Qemu)
        } else if base.starts_with("cloud-hyperviso") {
            Some(Vmm::CloudHypervisor)
        } else {
            match base {
                "vmrun" => Some(Vmm::Vmrun),
                "firecracker" => Some(Vmm::Firecracker),
                "crosvm" => Some(Vmm::Crosvm),
                "lkvm" => Some(Vmm::Lkvm),
                _ => None,
            }
        }
    }
}

impl fmt::Display for Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Runs vCPU N.
    Vcpu(u32),
    /// An I/O thread (QEMU iothread, vmrun device thread, virtio worker).
    Io,
    /// Anything else: main loop, monitor, RCU, workers.
    Emulator,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Vcpu(n) => write!(f, "vcpu{n}"),
            Role::Io => f.write_str("io"),
            Role::Emulator => f.write_str("emulator"),
        }
    }
}

impl Serialize for Role {
    /// Serialises as `"vcpu0"`, `"io"` or `"emulator"`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where the roles came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// vmrun's `threads.json`.
    ThreadMap,
    /// QEMU's QMP `query-cpus-fast` / `query-iothreads`.
    Qmp,
    /// Thread names.
    ThreadNames,
    /// Only `anon_inode:kvm-vcpu:N` descriptors: vCPU order unknown.
    VcpuFds,
    /// Nothing identified a vCPU thread.
    None,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::ThreadMap => "thread map",
            Source::Qmp => "QMP",
            Source::ThreadNames => "thread names",
            Source::VcpuFds => "kvm-vcpu descriptors",
            Source::None => "nothing",
        })
    }
}

/// vmrun's thread map, `threads.json` in the guest's run directory
/// (`$XDG_RUNTIME_DIR/vmrun/NAME/` or `/run/vmrun/NAME/`):
///
/// ```json
/// {"pid": 4242, "name": "db",
///  "vcpus": [{"index": 0, "tid": 4243}, {"index": 1, "tid": 4244}],
///  "io_threads": [{"name": "blk0", "tid": 4245}],
///  "monitor": "/run/vmrun/db/monitor.sock"}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadMap {
    /// The VMM process.
    pub pid: i32,
    /// The guest's name.
    pub name: String,
    /// vCPU threads.
    pub vcpus: Vec<VcpuThread>,
    /// I/O threads.
    #[serde(default)]
    pub io_threads: Vec<IoThread>,
    /// The monitor socket, if any.
    #[serde(default)]
    pub monitor: Option<String>,
}

/// A vCPU's thread in a [`ThreadMap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuThread {
    /// vCPU index (0-based).
    pub index: u32,
    /// Thread id.
    pub tid: i32,
}

/// An I/O thread in a [`ThreadMap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoThread {
    /// The device or iothread id (`blk0`).
    pub name: String,
    /// Thread id.
    pub tid: i32,
}

/// Errors classifying threads or reading thread maps.
#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    /// Reading /proc failed.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// A thread map could not be read.
    #[error("cannot read thread map {path}: {source}")]
    MapRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A thread map is not valid JSON of the expected shape.
    #[error("cannot parse thread map {path}: {source}")]
    MapParse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A thread map could not be written.
    #[error("cannot write thread map {path}: {source}")]
    MapWrite {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl ThreadMap {
    /// The file name in the run directory.
    pub const FILE_NAME: &'static str = "threads.json";

    /// Directories holding vmrun run directories, in lookup order:
    /// `$XDG_RUNTIME_DIR/vmrun` (when set), then `ROOT/run/vmrun`.
    pub fn run_dirs(root: &Path) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
            dirs.push(PathBuf::from(xdg).join("vmrun"));
        }
        dirs.push(root.join("run/vmrun"));
        dirs
    }

    /// Where guest `name`'s thread map may be, in lookup order.
    pub fn candidates(root: &Path, name: &str) -> Vec<PathBuf> {
        Self::run_dirs(root)
            .into_iter()
            .map(|d| d.join(name).join(Self::FILE_NAME))
            .collect()
    }

    /// Reads a thread map.
    pub fn read(path: &Path) -> Result<ThreadMap, ThreadsError> {
        let text = std::fs::read_to_string(path).map_err(|source| ThreadsError::MapRead {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ThreadsError::MapParse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes a thread map atomically (a temporary file renamed over it),
    /// creating the directory if needed.
    pub fn write(&self, path: &Path) -> Result<(), ThreadsError> {
        let err = |source| ThreadsError::MapWrite {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut text = serde_json::to_string_pretty(self).map_err(|e| err(io::Error::other(e)))?;
        text.push('\n');
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// The thread map of guest `name`: the first candidate that exists.
    pub fn find(root: &Path, name: &str) -> Result<Option<(PathBuf, ThreadMap)>, ThreadsError> {
        for path in Self::candidates(root, name) {
            if path.exists() {
                let map = Self::read(&path)?;
                return Ok(Some((path, map)));
            }
        }
        Ok(None)
    }

    /// The thread map whose `pid` is `pid`, searching every run directory.
    /// Unreadable maps are skipped (they belong to other guests).
    pub fn find_by_pid(root: &Path, pid: i32) -> Option<(PathBuf, ThreadMap)> {
        for dir in Self::run_dirs(root) {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut paths: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path().join(Self::FILE_NAME))
                .collect();
            paths.sort();
            for path in paths {
                if let Ok(map) = Self::read(&path) {
                    if map.pid == pid {
                        return Some((path, map));
                    }
                }
            }
        }
        None
    }
}

/// Thread ids known from outside /proc (a thread map or QMP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownThreads {
    /// Where they came from.
    pub source: Source,
    /// (vCPU index, thread id).
    pub vcpus: Vec<(u32, i32)>,
    /// (I/O thread name, thread id).
    pub io: Vec<(String, i32)>,
}

impl From<&ThreadMap> for KnownThreads {
    fn from(map: &ThreadMap) -> KnownThreads {
        KnownThreads {
            source: Source::ThreadMap,
            vcpus: map.vcpus.iter().map(|v| (v.index, v.tid)).collect(),
            io: map
                .io_threads
                .iter()
                .map(|t| (t.name.clone(), t.tid))
                .collect(),
        }
    }
}

/// One thread of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestThread {
    /// Process id.
    pub pid: i32,
    /// Thread id.
    pub tid: i32,
    /// Thread name (`comm`).
    pub name: String,
    /// What it does.
    pub role: Role,
    /// The CPU it last ran on.
    pub psr: Option<u32>,
    /// Its CPU affinity.
    pub affinity: CpuSet,
    /// The kernel forbids changing its affinity (`PF_NO_SETAFFINITY`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_setaffinity: bool,
}

/// A VMM process and its classified threads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Guest {
    /// Process id.
    pub pid: i32,
    /// The VMM, when recognised.
    pub vmm: Option<Vmm>,
    /// The guest's name (thread map, `-name`, `--id`), when known.
    pub name: Option<String>,
    /// Where the roles came from.
    pub source: Source,
    /// Number of `anon_inode:kvm-vcpu:N` descriptors.
    pub vcpu_fds: usize,
    /// Whether each vCPU's thread is known.
    pub vcpu_order_known: bool,
    /// The threads, by thread id.
    pub threads: Vec<GuestThread>,
    /// Threads that exited while being read.
    pub vanished: Vec<i32>,
    /// Warnings for the user (missing names, stale thread map, ...).
    pub notes: Vec<String>,
}

impl Guest {
    /// A short label: `NAME (PID)` or `PID`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{n} ({})", self.pid),
            None => self.pid.to_string(),
        }
    }

    /// The thread running vCPU `n`.
    pub fn vcpu(&self, n: u32) -> Option<&GuestThread> {
        self.threads.iter().find(|t| t.role == Role::Vcpu(n))
    }

    /// The vCPU threads, by vCPU index.
    pub fn vcpus(&self) -> Vec<&GuestThread> {
        let mut v: Vec<&GuestThread> = self
            .threads
            .iter()
            .filter(|t| matches!(t.role, Role::Vcpu(_)))
            .collect();
        v.sort_by_key(|t| t.role);
        v
    }
}

/// The role a thread name implies for `vmm` (any VMM's patterns when
/// `None`).
pub fn role_from_name(vmm: Option<Vmm>, name: &str) -> Role {
    let num = |s: &str| -> Option<u32> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let qemu = || -> Option<Role> {
        if let Some(rest) = name.strip_prefix("CPU ") {
            // "CPU 0/KVM"; names are cut at 15 bytes, so "CPU 1000/KVM" fits
            // but the accelerator part may be truncated.
            let (n, accel) = rest.split_once('/').unwrap_or((rest, ""));
            if "KVM".starts_with(accel) || accel.is_empty() {
                return num(n).map(Role::Vcpu);
            }
        }
        name.strip_prefix("IO ").map(|_| Role::Io)
    };
    let vcpu_n = || name.strip_prefix("vcpu").and_then(num).map(Role::Vcpu);
    let fc = || name.strip_prefix("fc_vcpu ").and_then(num).map(Role::Vcpu);
    let crosvm = || {
        name.strip_prefix("crosvm_vcpu")
            .and_then(num)
            .map(Role::Vcpu)
    };
    let lkvm = || name.strip_prefix("kvm-vcpu-").and_then(num).map(Role::Vcpu);
    let vmrun_io = || name.strip_prefix("io-").map(|_| Role::Io);
    let ch_io = || {
        // Cloud Hypervisor virtio workers: "<dev>_q<N>" (block), "<dev>_qp<N>" (net).
        let (_, tail) = name.rsplit_once('_')?;
        let n = tail.strip_prefix("qp").or_else(|| tail.strip_prefix('q'))?;
        num(n).map(|_| Role::Io)
    };
    let role = match vmm {
        Some(Vmm::Vmrun) => vcpu_n().or_else(vmrun_io),
        Some(Vmm::Qemu) => qemu(),
        Some(Vmm::Firecracker) => fc(),
        Some(Vmm::CloudHypervisor) => vcpu_n().or_else(ch_io),
        Some(Vmm::Crosvm) => crosvm(),
        Some(Vmm::Lkvm) => lkvm(),
        None => qemu()
            .or_else(vcpu_n)
            .or_else(fc)
            .or_else(crosvm)
            .or_else(lkvm)
            .or_else(vmrun_io),
    };
    role.unwrap_or(Role::Emulator)
}

/// Recognises the VMM of process `pid` from its executable, argv\[0\] and
/// name.
pub fn detect_vmm(root: &Path, pid: i32) -> Option<Vmm> {
    if let Some(v) = tasks::exe(root, pid)
        .as_deref()
        .and_then(Path::to_str)
        .and_then(Vmm::from_program)
    {
        return Some(v);
    }
    if let Some(v) = tasks::cmdline(root, pid)
        .ok()
        .and_then(|a| a.first().cloned())
        .as_deref()
        .and_then(Vmm::from_program)
    {
        return Some(v);
    }
    tasks::comm(root, pid)
        .ok()
        .as_deref()
        .and_then(Vmm::from_program)
}

/// Every VMM process under `ROOT/proc`, ascending by pid.
pub fn vmm_processes(root: &Path) -> Result<Vec<(i32, Vmm)>, ThreadsError> {
    Ok(tasks::pids(root)?
        .into_iter()
        .filter_map(|pid| detect_vmm(root, pid).map(|v| (pid, v)))
        .collect())
}

/// The guest name a VMM command line gives: QEMU/vmrun `-name guest=NAME,...`
/// or `-name NAME`, Firecracker `--id NAME`.
pub fn guest_name_from_cmdline(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if a == "-name" || a == "--name" || a == "--id" {
            it.next().cloned()
        } else {
            a.strip_prefix("-name=")
                .or_else(|| a.strip_prefix("--name="))
                .or_else(|| a.strip_prefix("--id="))
                .map(str::to_string)
        };
        if let Some(v) = value {
            if let Some(g) = v.split(',').find_map(|p| p.strip_prefix("guest=")) {
                return Some(g.to_string());
            }
            let first = v.split(',').next().unwrap_or("");
            if !first.is_empty() && !first.contains('=') {
                return Some(first.to_string());
            }
        }
    }
    None
}

/// Reads process `pid`'s threads and gives each a role.
///
/// `vmm` overrides detection; `known` gives authoritative thread ids (thread
/// map, QMP) and takes precedence over names.
pub fn classify(
    root: &Path,
    pid: i32,
    vmm: Option<Vmm>,
    known: Option<&KnownThreads>,
) -> Result<Guest, ThreadsError> {
    let list = tasks::read_tasks(root, pid)?;
    let vmm = vmm.or_else(|| detect_vmm(root, pid));
    let vcpu_fds = tasks::kvm_vcpu_fds(root, pid).map(|v| v.len()).unwrap_or(0);
    let mut notes = Vec::new();
    let mut source = Source::ThreadNames;
    let mut threads: Vec<GuestThread> = list
        .tasks
        .into_iter()
        .map(|t| GuestThread {
            pid,
            role: role_from_name(vmm, &t.name),
            tid: t.tid,
            name: t.name,
            psr: t.psr,
            affinity: t.affinity,
            no_setaffinity: t.no_setaffinity,
        })
        .collect();
    if let Some(known) = known {
        source = known.source;
        for t in &mut threads {
            t.role = if let Some((n, _)) = known.vcpus.iter().find(|(_, tid)| *tid == t.tid) {
                Role::Vcpu(*n)
            } else if known.io.iter().any(|(_, tid)| *tid == t.tid) || t.role == Role::Io {
                Role::Io
            } else {
                Role::Emulator
            };
        }
        for (n, tid) in &known.vcpus {
            if !threads.iter().any(|t| t.tid == *tid) {
                notes.push(format!(
                    "vcpu{n}: thread {tid} from the {source} is not a thread of process {pid}"
                ));
            }
        }
        for (name, tid) in &known.io {
            if !threads.iter().any(|t| t.tid == *tid) {
                notes.push(format!(
                    "I/O thread {name}: thread {tid} from the {source} is not a thread of process {pid}"
                ));
            }
        }
    }
    let named_vcpus = threads
        .iter()
        .filter(|t| matches!(t.role, Role::Vcpu(_)))
        .count();
    let mut vcpu_order_known = named_vcpus > 0;
    if named_vcpus == 0 {
        if vcpu_fds > 0 {
            source = Source::VcpuFds;
            vcpu_order_known = false;
            let hint = if vmm == Some(Vmm::Qemu) {
                "start QEMU with -name NAME,debug-threads=on or pass --qmp SOCKET"
            } else {
                "no thread carries a vCPU name"
            };
            notes.push(format!(
                "process {pid} has {vcpu_fds} vCPUs (anon_inode:kvm-vcpu descriptors) but \
                 which thread runs which vCPU is unknown: {hint}"
            ));
        } else {
            source = Source::None;
        }
    } else if vcpu_fds > 0 && named_vcpus != vcpu_fds {
        notes.push(format!(
            "process {pid} has {vcpu_fds} kvm-vcpu descriptors but {named_vcpus} vCPU threads \
             were identified"
        ));
    }
    let name = if let Some((_, map)) = ThreadMap::find_by_pid(root, pid) {
        Some(map.name)
    } else {
        tasks::cmdline(root, pid)
            .ok()
            .and_then(|a| guest_name_from_cmdline(&a))
    };
    threads.sort_by_key(|t| t.tid);
    Ok(Guest {
        pid,
        vmm,
        name,
        source,
        vcpu_fds,
        vcpu_order_known,
        threads,
        vanished: list.vanished,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vpin/host")
    }

    fn roles(g: &Guest) -> Vec<String> {
        g.threads.iter().map(|t| t.role.to_string()).collect()
    }

    #[test]
    fn names_per_vmm() {
        let r = |v, n| role_from_name(Some(v), n).to_string();
        assert_eq!(r(Vmm::Qemu, "CPU 3/KVM"), "vcpu3");
        assert_eq!(r(Vmm::Qemu, "CPU 12/KV"), "vcpu12");
        assert_eq!(r(Vmm::Qemu, "CPU 0/TCG"), "emulator");
        assert_eq!(r(Vmm::Qemu, "IO iothread0"), "io");
        assert_eq!(r(Vmm::Qemu, "qemu-system-x86"), "emulator");
        assert_eq!(r(Vmm::Qemu, "vcpu0"), "emulator");
        assert_eq!(r(Vmm::Firecracker, "fc_vcpu 7"), "vcpu7");
        assert_eq!(r(Vmm::Firecracker, "fc_api"), "emulator");
        assert_eq!(r(Vmm::CloudHypervisor, "vcpu2"), "vcpu2");
        assert_eq!(r(Vmm::CloudHypervisor, "_disk0_q1"), "io");
        assert_eq!(r(Vmm::CloudHypervisor, "_net1_qp0"), "io");
        assert_eq!(r(Vmm::CloudHypervisor, "http-server"), "emulator");
        assert_eq!(r(Vmm::Crosvm, "crosvm_vcpu1"), "vcpu1");
        assert_eq!(r(Vmm::Lkvm, "kvm-vcpu-1"), "vcpu1");
        assert_eq!(r(Vmm::Vmrun, "vcpu1"), "vcpu1");
        assert_eq!(r(Vmm::Vmrun, "io-blk0"), "io");
        assert_eq!(r(Vmm::Vmrun, "vcpu"), "emulator");
        assert_eq!(r(Vmm::Vmrun, "vcpu1x"), "emulator");
        assert_eq!(role_from_name(None, "CPU 1/KVM"), Role::Vcpu(1));
        assert_eq!(role_from_name(None, "bash"), Role::Emulator);
    }

    #[test]
    fn program_names() {
        let p = Vmm::from_program;
        assert_eq!(p("/usr/bin/qemu-system-x86_64"), Some(Vmm::Qemu));
        assert_eq!(p("qemu-system-x86"), Some(Vmm::Qemu));
        assert_eq!(p("/usr/libexec/qemu-kvm"), Some(Vmm::Qemu));
        assert_eq!(p("cloud-hyperviso"), Some(Vmm::CloudHypervisor));
        assert_eq!(p("/opt/vmrun (deleted)"), Some(Vmm::Vmrun));
        assert_eq!(p("qemu-img"), None);
        assert_eq!(p("bash"), None);
        for v in Vmm::ALL {
            assert_eq!(Vmm::from_name(v.as_str()), Some(v));
        }
    }

    #[test]
    fn finds_every_vmm_process() {
        let found = vmm_processes(&root()).unwrap();
        assert_eq!(
            found,
            [
                (4242, Vmm::Qemu),
                (5000, Vmm::Qemu),
                (6000, Vmm::Firecracker),
                (6100, Vmm::CloudHypervisor),
                (6200, Vmm::Crosvm),
                (6300, Vmm::Lkvm),
                (7000, Vmm::Vmrun),
            ]
        );
    }

    #[test]
    fn qemu_with_debug_threads() {
        let g = classify(&root(), 4242, None, None).unwrap();
        assert_eq!(g.vmm, Some(Vmm::Qemu));
        assert_eq!(g.name.as_deref(), Some("web"));
        assert_eq!(g.source, Source::ThreadNames);
        assert!(g.vcpu_order_known);
        assert_eq!(roles(&g), ["emulator", "emulator", "io", "vcpu0", "vcpu1"]);
        assert_eq!(g.vcpu(1).unwrap().tid, 4247);
        assert!(g.notes.is_empty(), "{:?}", g.notes);
    }

    #[test]
    fn qemu_without_names_has_unknown_order() {
        let g = classify(&root(), 5000, None, None).unwrap();
        assert_eq!(g.source, Source::VcpuFds);
        assert!(!g.vcpu_order_known);
        assert_eq!(g.vcpu_fds, 2);
        assert!(roles(&g).iter().all(|r| r == "emulator"));
        assert!(g.notes[0].contains("debug-threads=on"), "{:?}", g.notes);
        assert_eq!(g.name.as_deref(), Some("plain"));
    }

    #[test]
    fn qmp_ids_win_over_names() {
        let known = KnownThreads {
            source: Source::Qmp,
            vcpus: vec![(0, 5002), (1, 5003), (2, 9999)],
            io: vec![("iothread0".into(), 5001)],
        };
        let g = classify(&root(), 5000, None, Some(&known)).unwrap();
        assert_eq!(g.source, Source::Qmp);
        assert!(g.vcpu_order_known);
        assert_eq!(roles(&g), ["emulator", "io", "vcpu0", "vcpu1"]);
        assert!(g.notes[0].contains("thread 9999"), "{:?}", g.notes);
    }

    #[test]
    fn other_vmms() {
        let g = classify(&root(), 6000, None, None).unwrap();
        assert_eq!(roles(&g), ["emulator", "emulator", "vcpu0", "vcpu1"]);
        assert_eq!(g.vcpu(0).unwrap().affinity.to_list(), "6");
        let g = classify(&root(), 6100, None, None).unwrap();
        assert_eq!(
            roles(&g),
            ["emulator", "emulator", "emulator", "vcpu0", "vcpu1", "io"]
        );
        let g = classify(&root(), 6200, None, None).unwrap();
        assert_eq!(roles(&g), ["emulator", "vcpu0", "vcpu1"]);
        let g = classify(&root(), 6300, None, None).unwrap();
        assert_eq!(roles(&g), ["emulator", "vcpu0", "vcpu1"]);
    }

    #[test]
    fn vmrun_thread_map_and_names() {
        let (path, map) = ThreadMap::find(&root(), "db").unwrap().unwrap();
        assert!(path.ends_with("run/vmrun/db/threads.json"));
        assert_eq!(map.pid, 7000);
        let g = classify(&root(), 7000, None, Some(&KnownThreads::from(&map))).unwrap();
        assert_eq!(g.source, Source::ThreadMap);
        assert_eq!(g.name.as_deref(), Some("db"));
        assert_eq!(roles(&g), ["emulator", "vcpu0", "vcpu1", "io", "emulator"]);
        // Without the map the names give the same roles.
        let g = classify(&root(), 7000, None, None).unwrap();
        assert_eq!(g.source, Source::ThreadNames);
        assert_eq!(roles(&g), ["emulator", "vcpu0", "vcpu1", "io", "emulator"]);
        assert!(ThreadMap::find(&root(), "nosuch").unwrap().is_none());
    }

    #[test]
    fn vanished_threads_are_reported() {
        let g = classify(&root(), 777, None, None).unwrap();
        assert_eq!(g.vanished, [779]);
        assert_eq!(g.source, Source::None);
        assert_eq!(g.vmm, None);
    }

    #[test]
    fn thread_map_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmrun/x/threads.json");
        let map = ThreadMap {
            pid: 1,
            name: "x".into(),
            vcpus: vec![VcpuThread { index: 0, tid: 2 }],
            io_threads: vec![IoThread {
                name: "blk0".into(),
                tid: 3,
            }],
            monitor: None,
        };
        map.write(&path).unwrap();
        assert_eq!(ThreadMap::read(&path).unwrap(), map);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["vcpus"][0]["tid"], 2);
        assert!(json["monitor"].is_null());
        std::fs::write(&path, "{\"pid\": 1}").unwrap();
        let err = ThreadMap::read(&path).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot parse thread map "),
            "{err}"
        );
        assert!(err.to_string().contains("threads.json"), "{err}");
    }

    #[test]
    fn guest_names() {
        let a = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
        let g = |v: &[&str]| guest_name_from_cmdline(&a(v));
        assert_eq!(
            g(&["qemu", "-name", "t,debug-threads=on"]).as_deref(),
            Some("t")
        );
        assert_eq!(
            g(&["qemu", "-name", "guest=w,debug-threads=on"]).as_deref(),
            Some("w")
        );
        assert_eq!(
            g(&["qemu", "-name", "debug-threads=on,guest=z"]).as_deref(),
            Some("z")
        );
        assert_eq!(g(&["firecracker", "--id", "fc1"]).as_deref(), Some("fc1"));
        assert_eq!(g(&["qemu", "-m", "64"]), None);
    }
}
