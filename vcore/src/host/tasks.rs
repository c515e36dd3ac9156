//! Tasks (processes and threads) from /proc: names, last CPU, affinity,
//! command line, executable and KVM vCPU file descriptors; and the
//! `sched_{get,set}affinity` calls that pin them.
//!
//! Every reader takes the filesystem root (normally `/`) and reads
//! `ROOT/proc`, so tests run on fixture trees without root.
//!
//! The `procfs` crate does the parsing where it accepts a root
//! ([`procfs::process::Process::new_with_root`]): the task list, `stat`
//! (whose `comm` may hold spaces and parentheses, `CPU 0/KVM`, `a) (b`),
//! `status`, `cmdline` and `exe`. File descriptors are read by hand with
//! `readlink`, because procfs's `fd()` also stats each descriptor, which a
//! fixture tree (dangling `anon_inode:kvm-vcpu:0` symlinks) cannot satisfy.

use std::io;
use std::path::{Path, PathBuf};

use procfs::process::Process;
use procfs::ProcError;

use crate::cpulist::{CpuSet, MAX_CPUS};

/// One thread of a process, as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskInfo {
    /// Process (thread group) id.
    pub pid: i32,
    /// Thread id.
    pub tid: i32,
    /// Thread name (`comm`, at most 15 bytes).
    pub name: String,
    /// The CPU the thread last ran on (`stat` field 39, `ps -o psr`).
    pub psr: Option<u32>,
    /// `Cpus_allowed_list` from `status`.
    pub affinity: CpuSet,
    /// The kernel forbids changing this thread's affinity (`PF_NO_SETAFFINITY`
    /// in `stat` flags: io_uring workers `iou-wrk-*`/`iou-sqp-*`, some
    /// kernel workers living in the process).
    pub no_setaffinity: bool,
}

/// `PF_NO_SETAFFINITY` in `stat` field 9 (include/linux/sched.h).
pub const PF_NO_SETAFFINITY: u32 = 0x0400_0000;

/// The threads of a process, and those that exited while being read.
#[derive(Debug, Clone, Default)]
pub struct TaskList {
    /// Threads read completely.
    pub tasks: Vec<TaskInfo>,
    /// Thread ids listed in `task/` that were gone before they could be read.
    pub vanished: Vec<i32>,
}

/// Errors reading /proc.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The process does not exist.
    #[error("no such process: {pid} ({path} does not exist)")]
    NoProcess {
        /// The process id.
        pid: i32,
        /// Its /proc directory.
        path: PathBuf,
    },
    /// The thread exited (or never existed).
    #[error("thread {tid} of process {pid} is gone")]
    Gone {
        /// The process id.
        pid: i32,
        /// The thread id.
        tid: i32,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file held something unexpected.
    #[error("cannot parse {path}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

/// `ROOT/proc`.
pub fn proc_dir(root: &Path) -> PathBuf {
    root.join("proc")
}

fn pid_dir(root: &Path, pid: i32) -> PathBuf {
    proc_dir(root).join(pid.to_string())
}

fn task_dir(root: &Path, pid: i32, tid: i32) -> PathBuf {
    pid_dir(root, pid).join("task").join(tid.to_string())
}

/// Maps a procfs error about `path` to ours; `gone` is returned for
/// "not found" and "no such process".
fn map_err(e: ProcError, path: &Path, gone: TaskError) -> TaskError {
    match e {
        ProcError::NotFound(_) => gone,
        ProcError::Io(err, _) if err.raw_os_error() == Some(libc::ESRCH) => gone,
        ProcError::Io(err, p) => TaskError::Read {
            path: p.unwrap_or_else(|| path.to_path_buf()),
            source: err,
        },
        ProcError::PermissionDenied(p) => TaskError::Read {
            path: p.unwrap_or_else(|| path.to_path_buf()),
            source: io::Error::from_raw_os_error(libc::EACCES),
        },
        other => TaskError::Parse {
            path: path.to_path_buf(),
            what: other.to_string(),
        },
    }
}

fn open_process(root: &Path, pid: i32) -> Result<Process, TaskError> {
    let dir = pid_dir(root, pid);
    Process::new_with_root(dir.clone()).map_err(|e| {
        map_err(
            e,
            &dir,
            TaskError::NoProcess {
                pid,
                path: dir.clone(),
            },
        )
    })
}

/// Whether `ROOT/proc/PID` exists.
pub fn process_exists(root: &Path, pid: i32) -> bool {
    pid_dir(root, pid).is_dir()
}

/// Every process id under `ROOT/proc`, ascending.
pub fn pids(root: &Path) -> Result<Vec<i32>, TaskError> {
    let dir = proc_dir(root);
    let entries = std::fs::read_dir(&dir).map_err(|source| TaskError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut pids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// The thread ids of a process (`ROOT/proc/PID/task`), ascending.
pub fn tids(root: &Path, pid: i32) -> Result<Vec<i32>, TaskError> {
    let process = open_process(root, pid)?;
    let dir = pid_dir(root, pid).join("task");
    let iter = process.tasks().map_err(|e| {
        map_err(
            e,
            &dir,
            TaskError::NoProcess {
                pid,
                path: dir.clone(),
            },
        )
    })?;
    let mut tids: Vec<i32> = iter.filter_map(|t| t.ok().map(|t| t.tid)).collect();
    tids.sort_unstable();
    Ok(tids)
}

/// Reads one thread: name and last CPU from `stat`, affinity from `status`.
pub fn read_task(root: &Path, pid: i32, tid: i32) -> Result<TaskInfo, TaskError> {
    let dir = task_dir(root, pid, tid);
    let gone = || TaskError::Gone { pid, tid };
    let process = open_process(root, pid).map_err(|e| match e {
        TaskError::NoProcess { .. } => gone(),
        other => other,
    })?;
    let task = process
        .task_from_tid(tid)
        .map_err(|e| map_err(e, &dir, gone()))?;
    let stat = task
        .stat()
        .map_err(|e| map_err(e, &dir.join("stat"), gone()))?;
    let status = task
        .status()
        .map_err(|e| map_err(e, &dir.join("status"), gone()))?;
    let ranges = status.cpus_allowed_list.ok_or_else(|| TaskError::Parse {
        path: dir.join("status"),
        what: "no Cpus_allowed_list line".into(),
    })?;
    let mut affinity = CpuSet::new();
    for (a, b) in ranges {
        for cpu in a..=b.min(MAX_CPUS - 1) {
            affinity.insert(cpu);
        }
    }
    Ok(TaskInfo {
        pid,
        tid,
        name: stat.comm,
        psr: stat.processor.and_then(|p| u32::try_from(p).ok()),
        affinity,
        no_setaffinity: stat.flags & PF_NO_SETAFFINITY != 0,
    })
}

/// Reads every thread of a process. Threads that exit while being read go
/// to [`TaskList::vanished`] instead of failing the whole read.
pub fn read_tasks(root: &Path, pid: i32) -> Result<TaskList, TaskError> {
    let mut list = TaskList::default();
    for tid in tids(root, pid)? {
        match read_task(root, pid, tid) {
            Ok(t) => list.tasks.push(t),
            Err(TaskError::Gone { .. }) => list.vanished.push(tid),
            Err(e) => return Err(e),
        }
    }
    Ok(list)
}

/// The process's name (`ROOT/proc/PID/comm`, from `stat`).
pub fn comm(root: &Path, pid: i32) -> Result<String, TaskError> {
    let process = open_process(root, pid)?;
    let path = pid_dir(root, pid).join("stat");
    let stat = process.stat().map_err(|e| {
        map_err(
            e,
            &path,
            TaskError::NoProcess {
                pid,
                path: path.clone(),
            },
        )
    })?;
    Ok(stat.comm)
}

/// The process's command line (`ROOT/proc/PID/cmdline`).
pub fn cmdline(root: &Path, pid: i32) -> Result<Vec<String>, TaskError> {
    let process = open_process(root, pid)?;
    let path = pid_dir(root, pid).join("cmdline");
    process.cmdline().map_err(|e| {
        map_err(
            e,
            &path,
            TaskError::NoProcess {
                pid,
                path: path.clone(),
            },
        )
    })
}

/// The process's executable (`ROOT/proc/PID/exe`), or `None` when it cannot
/// be read (kernel threads, another user's process without privileges).
pub fn exe(root: &Path, pid: i32) -> Option<PathBuf> {
    let process = open_process(root, pid).ok()?;
    process.exe().ok()
}

/// The vCPU indices of the process's `anon_inode:kvm-vcpu:N` descriptors,
/// ascending. Any KVM VMM has one per vCPU; they do not say which thread
/// runs which vCPU.
pub fn kvm_vcpu_fds(root: &Path, pid: i32) -> Result<Vec<u32>, TaskError> {
    let dir = pid_dir(root, pid).join("fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TaskError::NoProcess {
                pid,
                path: dir.clone(),
            }
        } else {
            TaskError::Read {
                path: dir.clone(),
                source,
            }
        }
    })?;
    let mut vcpus = Vec::new();
    for entry in entries.flatten() {
        // A descriptor closed since the listing simply does not count.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if let Some(n) = target
            .to_str()
            .and_then(|t| t.strip_prefix("anon_inode:kvm-vcpu:"))
            .and_then(|n| n.parse().ok())
        {
            vcpus.push(n);
        }
    }
    vcpus.sort_unstable();
    Ok(vcpus)
}

/// The affinity of a thread, from `sched_getaffinity(2)`.
pub fn get_affinity(tid: i32) -> io::Result<CpuSet> {
    // Grow the mask until the kernel accepts its size, like util-linux's
    // get_max_number_of_cpus.
    let mut words = 16usize;
    loop {
        let mut buf = vec![0u64; words];
        // SAFETY: the kernel writes at most `words * 8` bytes into `buf`,
        // which is that long and lives across the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sched_getaffinity,
                tid as libc::pid_t,
                words * 8,
                buf.as_mut_ptr(),
            )
        };
        if n >= 0 {
            return Ok(CpuSet::from_words(&buf));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINVAL) && words * 64 < MAX_CPUS as usize {
            words *= 2;
            continue;
        }
        return Err(err);
    }
}

/// Sets the affinity of a thread with `sched_setaffinity(2)`.
///
/// Errors are the kernel's: `EINVAL` when no CPU of the set is allowed (not
/// online, or outside the thread's cgroup cpuset), `EPERM` without
/// CAP_SYS_NICE for another user's thread, `ESRCH` when the thread is gone.
pub fn set_affinity(tid: i32, set: &CpuSet) -> io::Result<()> {
    let mut words = set.words().to_vec();
    if words.is_empty() {
        words.push(0);
    }
    // SAFETY: the kernel reads `words.len() * 8` bytes from `words`, which
    // is that long and lives across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setaffinity,
            tid as libc::pid_t,
            words.len() * 8,
            words.as_ptr(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vpin/host")
    }

    #[test]
    fn reads_qemu_fixture_threads() {
        let root = fixtures();
        assert!(pids(&root).unwrap().contains(&4242));
        assert_eq!(comm(&root, 4242).unwrap(), "qemu-system-x86");
        let list = read_tasks(&root, 4242).unwrap();
        let names: Vec<&str> = list.tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "qemu-system-x86",
                "qemu-system-x86",
                "IO mon_iothread",
                "CPU 0/KVM",
                "CPU 1/KVM"
            ]
        );
        let vcpu1 = &list.tasks[4];
        assert_eq!(vcpu1.tid, 4247);
        assert_eq!(vcpu1.psr, Some(3));
        assert_eq!(vcpu1.affinity.to_list(), "3");
        assert_eq!(list.tasks[0].affinity.to_list(), "0-7");
        assert!(list.vanished.is_empty());
        assert_eq!(kvm_vcpu_fds(&root, 4242).unwrap(), vec![0, 1]);
        let args = cmdline(&root, 4242).unwrap();
        assert_eq!(args[0], "qemu-system-x86_64");
        assert_eq!(
            exe(&root, 4242).unwrap(),
            PathBuf::from("/usr/bin/qemu-system-x86_64")
        );
    }

    #[test]
    fn thread_name_with_parentheses_and_spaces() {
        let root = fixtures();
        let t = read_task(&root, 777, 778).unwrap();
        assert_eq!(t.name, "a) (b c");
        assert_eq!(t.psr, Some(2));
        assert!(t.no_setaffinity);
        assert!(!read_task(&root, 777, 777).unwrap().no_setaffinity);
    }

    #[test]
    fn vanished_thread_is_reported() {
        // Task 779 is listed in task/ but has no stat: it exited mid-read.
        let root = fixtures();
        let list = read_tasks(&root, 777).unwrap();
        assert_eq!(list.vanished, vec![779]);
        assert!(matches!(
            read_task(&root, 777, 12345),
            Err(TaskError::Gone {
                pid: 777,
                tid: 12345
            })
        ));
    }

    #[test]
    fn missing_process_names_the_path() {
        let root = fixtures();
        let err = tids(&root, 99999).unwrap_err();
        assert!(matches!(err, TaskError::NoProcess { pid: 99999, .. }));
        assert!(err.to_string().contains("proc/99999"), "{err}");
    }

    #[test]
    fn own_affinity_round_trip() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let before = get_affinity(tid).unwrap();
        let t = read_task(Path::new("/"), std::process::id() as i32, tid).unwrap();
        assert_eq!(t.affinity, before);
        let one = CpuSet::from_cpus(before.iter().take(1));
        set_affinity(tid, &one).unwrap();
        assert_eq!(get_affinity(tid).unwrap(), one);
        set_affinity(tid, &before).unwrap();
        assert_eq!(get_affinity(tid).unwrap(), before);
        let err = set_affinity(tid, &CpuSet::from_cpus([MAX_CPUS - 1])).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
