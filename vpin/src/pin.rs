//! `vpin pin`: set affinity per role, verify, roll back on failure.
//!
//! Order per thread, as taskset does: read the current affinity, set the new
//! one; once every thread is set, re-read each to verify. If a set fails (or
//! a thread reads back differently) every thread changed so far is restored
//! and vpin exits 1 naming the thread and the errno. A thread that exits
//! before it is set (`ESRCH`) is reported and skipped.

use std::collections::BTreeMap;
use std::io;

use serde::Serialize;
use vcore::cpulist::CpuSet;
use vcore::host::tasks;
use vcore::host::threads::{Guest, GuestThread, Role};

use crate::cli::{Failure, Outcome, PinOutput};
use crate::hostview::table;

/// Which threads a `ROLE=` assignment selects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Selector {
    /// `--all`: every thread.
    All,
    /// `emulator=`.
    Emulator,
    /// `io=`.
    Io,
    /// `vcpus=`: every vCPU thread.
    Vcpus,
    /// `vcpuN=`.
    Vcpu(u32),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::All => f.write_str("--all"),
            Selector::Emulator => f.write_str("emulator"),
            Selector::Io => f.write_str("io"),
            Selector::Vcpus => f.write_str("vcpus"),
            Selector::Vcpu(n) => write!(f, "vcpu{n}"),
        }
    }
}

/// Threads to change (with their new affinity), and threads left out
/// because the kernel forbids changing them.
pub type Targets<'g> = (Vec<(&'g GuestThread, CpuSet)>, Vec<&'g GuestThread>);

/// The parsed assignments of a `vpin pin` command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Sorted from general (`--all`) to specific (`vcpuN`); later wins.
    pub assignments: BTreeMap<Selector, CpuSet>,
}

fn parse_cpus(what: &str, list: &str) -> Result<CpuSet, Failure> {
    CpuSet::parse_list(list).map_err(|e| Failure::usage(format!("{what}: {e} ({})", e.reason())))
}

impl Request {
    /// Parses `ROLE=CPULIST` words and `--all CPULIST`.
    pub fn parse(words: &[String], all: Option<&str>) -> Result<Request, Failure> {
        let mut req = Request::default();
        if let Some(list) = all {
            req.assignments
                .insert(Selector::All, parse_cpus(&format!("--all {list}"), list)?);
        }
        for word in words {
            let Some((role, list)) = word.split_once('=') else {
                return Err(Failure::usage(format!(
                    "expected ROLE=CPULIST, got \"{word}\" (roles: vcpuN, vcpus, emulator, io)"
                )));
            };
            let sel = match role {
                "emulator" => Selector::Emulator,
                "io" => Selector::Io,
                "vcpus" => Selector::Vcpus,
                r => match r.strip_prefix("vcpu").and_then(|n| {
                    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                        .then(|| n.parse::<u32>().ok())
                        .flatten()
                }) {
                    Some(n) => Selector::Vcpu(n),
                    None => {
                        return Err(Failure::usage(format!(
                            "unknown role \"{r}\" in {word} (roles: vcpuN, vcpus, emulator, io)"
                        )))
                    }
                },
            };
            let cpus = parse_cpus(word, list)?;
            if req.assignments.insert(sel.clone(), cpus).is_some() {
                return Err(Failure::usage(format!("{sel} is given twice")));
            }
        }
        if req.assignments.is_empty() {
            return Err(Failure::usage(
                "nothing to pin: give ROLE=CPULIST (vcpu0=2, emulator=0-1, ...) or --all CPULIST",
            ));
        }
        Ok(req)
    }

    /// The new affinity of each thread this request touches, by thread; and
    /// the selected threads whose affinity the kernel does not let anyone
    /// change (`PF_NO_SETAFFINITY`), which are left out.
    pub fn targets<'g>(&self, guest: &'g Guest) -> Result<Targets<'g>, Failure> {
        for sel in self.assignments.keys() {
            if let Selector::Vcpu(n) = sel {
                if guest.vcpu(*n).is_none() {
                    let have: Vec<u32> = guest
                        .vcpus()
                        .iter()
                        .filter_map(|t| match t.role {
                            Role::Vcpu(n) => Some(n),
                            _ => None,
                        })
                        .collect();
                    let why = if !guest.vcpu_order_known {
                        format!(
                            "which thread runs which vCPU is unknown ({} kvm-vcpu descriptors); \
                             start QEMU with -name NAME,debug-threads=on or pass --qmp SOCKET",
                            guest.vcpu_fds
                        )
                    } else {
                        format!("its vCPUs are {}", CpuSet::from_cpus(have).to_list())
                    };
                    return Err(Failure::fail(format!(
                        "guest {} has no vcpu{n}: {why}",
                        guest.label()
                    )));
                }
            }
        }
        if self.assignments.contains_key(&Selector::Vcpus) && guest.vcpus().is_empty() {
            return Err(Failure::fail(format!(
                "guest {} has no identified vCPU threads",
                guest.label()
            )));
        }
        let mut out = Vec::new();
        let mut fixed = Vec::new();
        for t in &guest.threads {
            let mut new = None;
            for (sel, cpus) in &self.assignments {
                let hit = match sel {
                    Selector::All => true,
                    Selector::Emulator => t.role == Role::Emulator,
                    Selector::Io => t.role == Role::Io,
                    Selector::Vcpus => matches!(t.role, Role::Vcpu(_)),
                    Selector::Vcpu(n) => t.role == Role::Vcpu(*n),
                };
                if hit {
                    new = Some(cpus.clone());
                }
            }
            if let Some(cpus) = new {
                if t.no_setaffinity {
                    fixed.push(t);
                } else {
                    out.push((t, cpus));
                }
            }
        }
        Ok((out, fixed))
    }
}

/// One thread's change.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Thread id.
    pub tid: i32,
    /// Thread name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Affinity before.
    pub old: CpuSet,
    /// Affinity after (re-read), or requested on a dry run.
    pub new: CpuSet,
}

#[derive(Serialize)]
struct Report<'a> {
    pid: i32,
    name: Option<&'a str>,
    dry_run: bool,
    changes: &'a [Change],
    vanished: &'a [i32],
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let errno = nix::errno::Errno::from_raw(n);
            format!("{} ({errno:?})", errno.desc())
        }
        None => e.to_string(),
    }
}

fn describe(t: &GuestThread) -> String {
    format!("thread {} ({}, {})", t.tid, t.name, t.role)
}

fn is_gone(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ESRCH)
}

/// Restores `done` (thread, old affinity) in reverse order; returns how
/// many were restored and the errors of those that could not be.
fn rollback(done: &[(&GuestThread, CpuSet)]) -> (usize, Vec<String>) {
    let mut restored = 0;
    let mut errors = Vec::new();
    for (t, old) in done.iter().rev() {
        match tasks::set_affinity(t.tid, old) {
            Ok(()) => restored += 1,
            Err(e) if is_gone(&e) => restored += 1,
            Err(e) => errors.push(format!(
                "cannot restore {} to {}: {}",
                describe(t),
                old.to_list(),
                errno_name(&e)
            )),
        }
    }
    (restored, errors)
}

fn failure_after_rollback(msg: String, done: &[(&GuestThread, CpuSet)]) -> Failure {
    let (restored, errors) = rollback(done);
    let mut msg = format!(
        "{msg}; restored {restored} thread{} to {} previous affinity",
        if restored == 1 { "" } else { "s" },
        if restored == 1 { "its" } else { "their" }
    );
    for e in errors {
        msg.push_str("\nvpin: ");
        msg.push_str(&e);
    }
    Failure::fail(msg)
}

/// Applies `targets` (thread, new affinity). Returns the changes, re-read.
pub fn apply(
    targets: &[(&GuestThread, CpuSet)],
    vanished: &mut Vec<i32>,
) -> Result<Vec<Change>, Failure> {
    let mut done: Vec<(&GuestThread, CpuSet)> = Vec::new();
    for (t, new) in targets {
        let old = match tasks::get_affinity(t.tid) {
            Ok(o) => o,
            Err(e) if is_gone(&e) => {
                vanished.push(t.tid);
                continue;
            }
            Err(e) => {
                return Err(failure_after_rollback(
                    format!(
                        "failed to get the affinity of {}: {}",
                        describe(t),
                        errno_name(&e)
                    ),
                    &done,
                ))
            }
        };
        match tasks::set_affinity(t.tid, new) {
            Ok(()) => done.push((t, old)),
            Err(e) if is_gone(&e) => vanished.push(t.tid),
            Err(e) => {
                return Err(failure_after_rollback(
                    format!(
                        "failed to set the affinity of {} to {}: {}",
                        describe(t),
                        new.to_list(),
                        errno_name(&e)
                    ),
                    &done,
                ))
            }
        }
    }
    // Verify: re-read every thread we set.
    let mut changes = Vec::new();
    for (t, old) in &done {
        let want = &targets
            .iter()
            .find(|(x, _)| x.tid == t.tid)
            .expect("target")
            .1;
        match tasks::get_affinity(t.tid) {
            Ok(now) if &now == want => changes.push(Change {
                tid: t.tid,
                name: t.name.clone(),
                role: t.role,
                old: old.clone(),
                new: now,
            }),
            Ok(now) => {
                return Err(failure_after_rollback(
                    format!(
                        "{} reads back affinity {} after setting {} (a cgroup cpuset may \
                         restrict it)",
                        describe(t),
                        now.to_list(),
                        want.to_list()
                    ),
                    &done,
                ))
            }
            Err(e) if is_gone(&e) => vanished.push(t.tid),
            Err(e) => {
                return Err(failure_after_rollback(
                    format!(
                        "failed to re-read the affinity of {}: {}",
                        describe(t),
                        errno_name(&e)
                    ),
                    &done,
                ))
            }
        }
    }
    Ok(changes)
}

/// Prints changes in the chosen style.
pub fn print_changes(
    guest: &Guest,
    changes: &[Change],
    vanished: &[i32],
    dry: bool,
    out: PinOutput,
) {
    match out {
        PinOutput::Json => {
            let r = Report {
                pid: guest.pid,
                name: guest.name.as_deref(),
                dry_run: dry,
                changes,
                vanished,
            };
            println!("{}", serde_json::to_string_pretty(&r).expect("serialise"));
        }
        PinOutput::Table => {
            let mut rows = vec![["PID", "TID", "NAME", "ROLE", "OLD", "NEW"]
                .map(String::from)
                .to_vec()];
            for c in changes {
                rows.push(vec![
                    guest.pid.to_string(),
                    c.tid.to_string(),
                    c.name.clone(),
                    c.role.to_string(),
                    c.old.to_list(),
                    c.new.to_list(),
                ]);
            }
            print!("{}", table(&rows));
        }
        PinOutput::Taskset => {
            for c in changes {
                println!("pid {}'s current affinity list: {}", c.tid, c.old.to_list());
                if dry {
                    println!(
                        "pid {}'s new affinity list would be: {}",
                        c.tid,
                        c.new.to_list()
                    );
                } else {
                    println!("pid {}'s new affinity list: {}", c.tid, c.new.to_list());
                }
            }
        }
    }
}

/// Remarks on a placement: vCPUs sharing a CPU, vCPUs outside the isolated
/// CPUs, other threads on isolated CPUs.
pub fn advice(targets: &[(&GuestThread, CpuSet)], isolated: &CpuSet) -> Vec<String> {
    let mut notes = Vec::new();
    let vcpus: Vec<&(&GuestThread, CpuSet)> = targets
        .iter()
        .filter(|(t, _)| matches!(t.role, Role::Vcpu(_)))
        .collect();
    for (i, (a, ca)) in vcpus.iter().enumerate() {
        for (b, cb) in &vcpus[i + 1..] {
            if ca.len() == 1 && ca == cb {
                notes.push(format!(
                    "{} and {} share CPU {}",
                    a.role,
                    b.role,
                    ca.to_list()
                ));
            }
        }
    }
    if isolated.is_empty() {
        return notes;
    }
    for (t, cpus) in targets {
        let outside = cpus.difference(isolated);
        let inside = cpus.intersection(isolated);
        match t.role {
            Role::Vcpu(_) if !outside.is_empty() => notes.push(format!(
                "{} goes to CPUs {} that are not isolated (isolated: {})",
                t.role,
                outside.to_list(),
                isolated.to_list()
            )),
            Role::Emulator | Role::Io if !inside.is_empty() => notes.push(format!(
                "{} thread {} ({}) goes to isolated CPUs {}, where it competes with vCPUs",
                t.role,
                t.tid,
                t.name,
                inside.to_list()
            )),
            _ => {}
        }
    }
    notes
}

/// `vpin pin`.
pub fn run(
    root: &std::path::Path,
    guest: &Guest,
    req: &Request,
    dry: bool,
    out: PinOutput,
) -> Outcome {
    for note in &guest.notes {
        eprintln!("vpin: note: {note}");
    }
    let (targets, fixed) = req.targets(guest)?;
    let isolated = vcore::host::cpus::isolated(root).unwrap_or_default();
    for note in advice(&targets, &isolated) {
        eprintln!("vpin: note: {note}");
    }
    for t in fixed {
        eprintln!(
            "vpin: note: {} cannot be moved (the kernel sets PF_NO_SETAFFINITY); skipped",
            describe(t)
        );
    }
    let mut vanished = guest.vanished.clone();
    let changes = if dry {
        let mut changes = Vec::new();
        for (t, new) in &targets {
            match tasks::get_affinity(t.tid) {
                Ok(old) => changes.push(Change {
                    tid: t.tid,
                    name: t.name.clone(),
                    role: t.role,
                    old,
                    new: new.clone(),
                }),
                Err(e) if is_gone(&e) => vanished.push(t.tid),
                Err(e) => {
                    return Err(Failure::fail(format!(
                        "failed to get the affinity of {}: {}",
                        describe(t),
                        errno_name(&e)
                    )))
                }
            }
        }
        changes
    } else {
        apply(&targets, &mut vanished)?
    };
    for tid in &vanished {
        eprintln!(
            "vpin: thread {tid} of process {} exited; skipped",
            guest.pid
        );
    }
    print_changes(guest, &changes, &vanished, dry, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kernel_fixed_threads_are_left_out() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../vcore/tests/fixtures/vpin/host");
        let g = vcore::host::threads::classify(&root, 777, None, None).unwrap();
        let r = Request::parse(&[], Some("0")).unwrap();
        let (targets, fixed) = r.targets(&g).unwrap();
        assert_eq!(
            targets.iter().map(|(t, _)| t.tid).collect::<Vec<_>>(),
            [777]
        );
        assert_eq!(fixed.iter().map(|t| t.tid).collect::<Vec<_>>(), [778]);
    }

    #[test]
    fn advice_on_placement() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../vcore/tests/fixtures/vpin/host");
        let g = vcore::host::threads::classify(&root, 4242, None, None).unwrap();
        let r = Request::parse(&words(&["vcpus=2", "io=3", "vcpu1=0"]), None).unwrap();
        let (targets, _) = r.targets(&g).unwrap();
        let notes = advice(&targets, &CpuSet::parse_list("2-3").unwrap());
        assert_eq!(
            notes,
            [
                "io thread 4244 (IO mon_iothread) goes to isolated CPUs 3, where it competes \
                 with vCPUs",
                "vcpu1 goes to CPUs 0 that are not isolated (isolated: 2,3)"
            ]
        );
        let r = Request::parse(&words(&["vcpus=2"]), None).unwrap();
        let (targets, _) = r.targets(&g).unwrap();
        assert_eq!(
            advice(&targets, &CpuSet::new()),
            ["vcpu0 and vcpu1 share CPU 2"]
        );
    }

    #[test]
    fn parses_assignments() {
        let r = Request::parse(
            &words(&["vcpu0=2", "vcpu1=3", "emulator=0-1", "io=0"]),
            None,
        )
        .unwrap();
        assert_eq!(r.assignments.len(), 4);
        assert_eq!(r.assignments[&Selector::Vcpu(1)].to_list(), "3");
        let r = Request::parse(&[], Some("0-1")).unwrap();
        assert_eq!(r.assignments[&Selector::All].to_list(), "0,1");
    }

    #[test]
    fn rejects_bad_assignments_as_usage_errors() {
        for (w, msg) in [
            (vec!["vcpu0"], "expected ROLE=CPULIST"),
            (vec!["cpu0=1"], "unknown role \"cpu0\""),
            (vec!["vcpu=1"], "unknown role"),
            (
                vec!["vcpu0=2-1"],
                "vcpu0=2-1: failed to parse CPU list: 2-1 (range 2-1 ends",
            ),
            (vec!["vcpu0=1", "vcpu0=2"], "vcpu0 is given twice"),
            (vec![], "nothing to pin"),
        ] {
            let err = Request::parse(&words(&w), None).unwrap_err();
            assert_eq!(err.code, 2);
            assert!(err.message.contains(msg), "{} vs {msg}", err.message);
        }
        let err = Request::parse(&[], Some("x")).unwrap_err();
        assert_eq!(
            err.message,
            "--all x: failed to parse CPU list: x (expected a number at \"x\")"
        );
    }

    #[test]
    fn selects_threads_by_role_specific_wins() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../vcore/tests/fixtures/vpin/host");
        let g = vcore::host::threads::classify(&root, 4242, None, None).unwrap();
        let r =
            Request::parse(&words(&["vcpus=4-5", "vcpu1=3", "emulator=0"]), Some("0-7")).unwrap();
        let t: Vec<(i32, String)> = r
            .targets(&g)
            .unwrap()
            .0
            .into_iter()
            .map(|(t, c)| (t.tid, c.to_list()))
            .collect();
        assert_eq!(
            t,
            [
                (4242, "0".to_string()),
                (4243, "0".to_string()),
                (4244, "0-7".to_string()),
                (4246, "4,5".to_string()),
                (4247, "3".to_string())
            ]
        );
        let r = Request::parse(&words(&["vcpu2=1"]), None).unwrap();
        let err = r.targets(&g).unwrap_err();
        assert_eq!(err.code, 1);
        assert_eq!(
            err.message,
            "guest web (4242) has no vcpu2: its vCPUs are 0,1"
        );
        let g = vcore::host::threads::classify(&root, 5000, None, None).unwrap();
        let r = Request::parse(&words(&["vcpu0=1"]), None).unwrap();
        assert!(r
            .targets(&g)
            .unwrap_err()
            .message
            .contains("debug-threads=on"));
    }
}
