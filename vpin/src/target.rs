//! Finding a guest: a PID, a vmrun guest name, a QEMU `-name`, a pid file,
//! or every VMM process; and identifying its threads.

use std::path::Path;

use anyhow::Context;
use vcore::host::tasks;
use vcore::host::threads::{self, Guest, KnownThreads, ThreadMap, Vmm};

use crate::cli::{Failure, TargetArgs};
use crate::qmp;

/// Every VMM process on the host, classified. Processes that exit while
/// being read are skipped.
pub fn all_guests(root: &Path, vmm: Option<Vmm>) -> Result<Vec<Guest>, Failure> {
    let mut guests = Vec::new();
    for (pid, detected) in threads::vmm_processes(root).context("cannot list processes")? {
        if vmm.is_some_and(|v| v != detected) {
            continue;
        }
        let known = ThreadMap::find_by_pid(root, pid).map(|(_, m)| KnownThreads::from(&m));
        match threads::classify(root, pid, Some(detected), known.as_ref()) {
            Ok(g) => guests.push(g),
            Err(threads::ThreadsError::Task(tasks::TaskError::NoProcess { .. })) => continue,
            // Whatever failed, a process that has exited meanwhile is skipped.
            Err(_) if !tasks::process_exists(root, pid) => continue,
            Err(e) => return Err(Failure::fail(e.to_string())),
        }
    }
    Ok(guests)
}

/// Reads a PID from a pid file.
fn read_pidfile(path: &Path) -> Result<i32, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::fail(format!("cannot read pid file {}: {e}", path.display())))?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            Failure::fail(format!(
                "pid file {} does not hold a process id: {:?}",
                path.display(),
                text.trim()
            ))
        })
}

/// The thread group (process) of thread `tid`, from `/proc/TID/status`.
fn tgid_of(root: &Path, tid: i32) -> Option<i32> {
    let status =
        std::fs::read_to_string(tasks::proc_dir(root).join(format!("{tid}/status"))).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Resolves TARGET (or `--pidfile`) to a classified guest.
pub fn resolve(root: &Path, target: Option<&str>, args: &TargetArgs) -> Result<Guest, Failure> {
    let mut known: Option<KnownThreads> = None;
    if let Some(sock) = &args.qmp {
        let threads =
            qmp::query_threads(sock).with_context(|| format!("QMP on {}", sock.display()))?;
        known = Some(threads);
    }
    let pid = match (target, &args.pidfile) {
        (Some(_), Some(_)) => {
            return Err(Failure::usage(
                "give either a TARGET or --pidfile, not both",
            ))
        }
        (None, Some(file)) => read_pidfile(file)?,
        (Some(t), None) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
            let pid: i32 = t
                .parse()
                .map_err(|_| Failure::usage(format!("invalid PID: {t}")))?;
            pid
        }
        (Some(t), None) if t.contains('=') => {
            return Err(Failure::usage(format!(
                "missing TARGET before {t} (a PID, a guest name or --pidfile FILE)"
            )))
        }
        (Some(name), None) => return resolve_name(root, name, args, known),
        (None, None) => {
            // Only --qmp: the process owning the vCPU threads.
            let tid = known
                .as_ref()
                .and_then(|k| k.vcpus.first().map(|v| v.1))
                .ok_or_else(|| {
                    Failure::usage("missing TARGET (a PID, a guest name or --pidfile FILE)")
                })?;
            tgid_of(root, tid).ok_or_else(|| {
                Failure::fail(format!(
                    "QMP reports vCPU thread {tid}, which does not exist here"
                ))
            })?
        }
    };
    if !tasks::process_exists(root, pid) {
        return Err(Failure::fail(format!("no such process: {pid}")));
    }
    if known.is_none() {
        known = ThreadMap::find_by_pid(root, pid).map(|(_, m)| KnownThreads::from(&m));
    }
    classify(root, pid, args.vmm, known.as_ref())
}

fn classify(
    root: &Path,
    pid: i32,
    vmm: Option<Vmm>,
    known: Option<&KnownThreads>,
) -> Result<Guest, Failure> {
    threads::classify(root, pid, vmm, known).map_err(|e| Failure::fail(e.to_string()))
}

/// A guest by name: vmrun's thread map, else a VMM process whose command
/// line names it (`-name NAME`, `-name guest=NAME`, `--id NAME`).
fn resolve_name(
    root: &Path,
    name: &str,
    args: &TargetArgs,
    known: Option<KnownThreads>,
) -> Result<Guest, Failure> {
    if let Some((path, map)) =
        ThreadMap::find(root, name).map_err(|e| Failure::fail(e.to_string()))?
    {
        if !tasks::process_exists(root, map.pid) {
            return Err(Failure::fail(format!(
                "guest {name}: process {} from {} is not running (stale thread map)",
                map.pid,
                path.display()
            )));
        }
        let known = known.unwrap_or_else(|| KnownThreads::from(&map));
        return classify(root, map.pid, args.vmm.or(Some(Vmm::Vmrun)), Some(&known));
    }
    let mut matches = Vec::new();
    for (pid, _) in threads::vmm_processes(root).context("cannot list processes")? {
        let Ok(argv) = tasks::cmdline(root, pid) else {
            continue;
        };
        if threads::guest_name_from_cmdline(&argv).as_deref() == Some(name) {
            matches.push(pid);
        }
    }
    match matches[..] {
        [pid] => classify(root, pid, args.vmm, known.as_ref()),
        [] => {
            let tried: Vec<String> = ThreadMap::candidates(root, name)
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            Err(Failure::fail(format!(
                "no guest named {name}: no thread map at {} and no VMM process started with \
                 -name {name}",
                tried.join(" or ")
            )))
        }
        _ => Err(Failure::fail(format!(
            "guest name {name} is ambiguous: processes {}; give a PID",
            matches
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
