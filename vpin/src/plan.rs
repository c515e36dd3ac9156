//! `vpin plan`: one vCPU per CPU from the isolated set (or `--cpus`), with
//! emulator and I/O threads on the other online CPUs.
//!
//! Placement rules:
//! * all vCPUs on one NUMA node when a node has enough candidate CPUs (the
//!   node with the most; ties go to the lowest node), else nodes in order;
//! * one vCPU per physical core first (the lowest SMT sibling of each core),
//!   second siblings only when the cores run out, so vCPUs do not compete
//!   for a core's execution units;
//! * emulator and I/O threads on the online CPUs outside the candidate set,
//!   restricted to the vCPUs' node when it has any; left alone (with a note)
//!   when there are none.

use std::path::Path;

use serde::Serialize;
use vcore::cpulist::CpuSet;
use vcore::host::cpus::HostCpus;
use vcore::host::threads::{Guest, Role};

use crate::cli::{Failure, Outcome, PinOutput};
use crate::pin;

/// A proposed placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The process.
    pub pid: i32,
    /// Role and CPUs, in the order `vpin pin` takes them.
    pub assignments: Vec<Assignment>,
    /// The equivalent `vpin pin` command.
    pub command: String,
    /// Remarks (node spread, emulator threads left alone).
    pub notes: Vec<String>,
}

/// One `ROLE=CPULIST` of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    /// `vcpu0`, `emulator`, `io`.
    pub role: String,
    /// Where it goes.
    pub cpus: CpuSet,
}

/// Orders candidate CPUs: chosen node first, one CPU per core first.
fn order_cpus(host: &HostCpus, pool: &CpuSet, n: usize) -> (Vec<u32>, Option<u32>) {
    // Per node, the candidate CPUs; CPUs without a node form node None.
    let mut nodes: Vec<(Option<u32>, CpuSet)> = host
        .nodes
        .iter()
        .map(|(id, cpus)| (Some(*id), cpus.intersection(pool)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    let covered = nodes.iter().fold(CpuSet::new(), |acc, (_, c)| acc.union(c));
    let rest = pool.difference(&covered);
    if !rest.is_empty() {
        nodes.push((None, rest));
    }
    let fitting = nodes
        .iter()
        .filter(|(_, c)| c.len() >= n)
        .max_by_key(|(id, c)| (c.len(), std::cmp::Reverse(*id)));
    let (node_order, chosen): (Vec<CpuSet>, Option<u32>) = match fitting {
        Some((id, c)) => (vec![c.clone()], *id),
        None => (nodes.into_iter().map(|(_, c)| c).collect(), None),
    };
    let mut out = Vec::new();
    for cpus in node_order {
        let (first, second): (Vec<u32>, Vec<u32>) = cpus
            .iter()
            .partition(|&c| host.core_of(c) == c || !cpus.contains(host.core_of(c)));
        out.extend(first);
        out.extend(second);
    }
    (out, chosen)
}

/// Proposes a placement for `guest`.
pub fn propose(host: &HostCpus, guest: &Guest, cpus: Option<&CpuSet>) -> Result<Plan, Failure> {
    let vcpus = guest.vcpus();
    if vcpus.is_empty() || !guest.vcpu_order_known {
        return Err(Failure::fail(format!(
            "guest {}: cannot plan without knowing its vCPU threads{}",
            guest.label(),
            if guest.vcpu_fds > 0 {
                " (start QEMU with -name NAME,debug-threads=on or pass --qmp SOCKET)"
            } else {
                ""
            }
        )));
    }
    let (pool, from) = match cpus {
        Some(c) => (c.clone(), format!("--cpus {}", c.to_list())),
        None => (host.isolated.clone(), "the isolated CPUs".to_string()),
    };
    if pool.is_empty() {
        return Err(Failure::fail(
            "no isolated CPUs (/sys/devices/system/cpu/isolated is empty; boot with \
             isolcpus=LIST or give --cpus LIST)",
        ));
    }
    let offline = pool.difference(&host.online);
    if !offline.is_empty() {
        return Err(Failure::fail(format!(
            "CPUs {} of {from} are not online (online: {})",
            offline.to_list(),
            host.online.to_list()
        )));
    }
    if pool.len() < vcpus.len() {
        return Err(Failure::fail(format!(
            "guest {} has {} vCPUs but {from} ({}) hold only {} CPUs",
            guest.label(),
            vcpus.len(),
            pool.to_list(),
            pool.len()
        )));
    }
    let (order, node) = order_cpus(host, &pool, vcpus.len());
    let mut notes = Vec::new();
    if node.is_none() && host.nodes.len() > 1 {
        notes.push("no single NUMA node has enough CPUs: the vCPUs span nodes".to_string());
    }
    let mut assignments = Vec::new();
    for (t, cpu) in vcpus.iter().zip(order) {
        assignments.push(Assignment {
            role: t.role.to_string(),
            cpus: CpuSet::from_cpus([cpu]),
        });
    }
    let mut rest = host.online.difference(&pool);
    if let Some(n) = node {
        let local = rest.intersection(&host.nodes[&n]);
        if !local.is_empty() {
            rest = local;
        }
    }
    let has = |r: Role| guest.threads.iter().any(|t| t.role == r);
    if rest.is_empty() {
        notes.push(format!(
            "every online CPU is in {from}: emulator and I/O threads are left as they are"
        ));
    } else {
        if has(Role::Emulator) {
            assignments.push(Assignment {
                role: "emulator".into(),
                cpus: rest.clone(),
            });
        }
        if has(Role::Io) {
            assignments.push(Assignment {
                role: "io".into(),
                cpus: rest.clone(),
            });
        }
    }
    let command = format!(
        "vpin pin {} {}",
        guest.pid,
        assignments
            .iter()
            .map(|a| format!("{}={}", a.role, a.cpus.to_list_strided()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(Plan {
        pid: guest.pid,
        assignments,
        command,
        notes,
    })
}

/// `vpin plan`.
pub fn run(root: &Path, guest: &Guest, cpus: Option<&CpuSet>, apply: bool, json: bool) -> Outcome {
    let host = HostCpus::read(root).map_err(|e| Failure::fail(e.to_string()))?;
    let plan = propose(&host, guest, cpus)?;
    for n in &plan.notes {
        eprintln!("vpin: note: {n}");
    }
    if !apply {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&plan).expect("serialise")
            );
        } else {
            println!("{}", plan.command);
        }
        return Ok(());
    }
    let words: Vec<String> = plan
        .assignments
        .iter()
        .map(|a| format!("{}={}", a.role, a.cpus.to_list_strided()))
        .collect();
    let req = pin::Request::parse(&words, None)?;
    pin::run(
        root,
        guest,
        &req,
        false,
        if json {
            PinOutput::Json
        } else {
            PinOutput::Taskset
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcore::host::threads::classify;

    fn root() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../vcore/tests/fixtures/vpin/host")
    }

    #[test]
    fn plans_on_isolated_cpus_one_core_each_same_node() {
        let host = HostCpus::read(&root()).unwrap();
        let g = classify(&root(), 4242, None, None).unwrap();
        let p = propose(&host, &g, None).unwrap();
        // Isolated 2,3,6,7 are all on node 1; cores 2 and 3 first (6, 7 are
        // their siblings). Emulator/io on node 1's other CPUs: none, so all
        // of the rest... node 1 = 2,3,6,7 is fully isolated, so the rest is
        // the other node.
        assert_eq!(
            p.command,
            "vpin pin 4242 vcpu0=2 vcpu1=3 emulator=0,1,4,5 io=0,1,4,5"
        );
        assert!(p.notes.is_empty());
    }

    #[test]
    fn siblings_only_when_cores_run_out() {
        let host = HostCpus::read(&root()).unwrap();
        let g = classify(&root(), 4242, None, None).unwrap();
        let p = propose(&host, &g, Some(&CpuSet::parse_list("0,4,5").unwrap())).unwrap();
        // 0 and 4 are siblings: take 0 and 5 (different cores).
        assert_eq!(p.assignments[0].cpus.to_list(), "0");
        assert_eq!(p.assignments[1].cpus.to_list(), "5");
        // Emulator on node 0's remaining CPU.
        assert_eq!(p.assignments[2].role, "emulator");
        assert_eq!(p.assignments[2].cpus, CpuSet::from_cpus([1]));
    }

    #[test]
    fn refuses_what_cannot_work() {
        let host = HostCpus::read(&root()).unwrap();
        let g = classify(&root(), 4242, None, None).unwrap();
        let e = propose(&host, &g, Some(&CpuSet::parse_list("2").unwrap())).unwrap_err();
        assert!(
            e.message
                .contains("has 2 vCPUs but --cpus 2 (2) hold only 1 CPUs"),
            "{}",
            e.message
        );
        let e = propose(&host, &g, Some(&CpuSet::parse_list("9").unwrap())).unwrap_err();
        assert!(e.message.contains("not online"), "{}", e.message);
        let g = classify(&root(), 5000, None, None).unwrap();
        let e = propose(&host, &g, None).unwrap_err();
        assert!(e.message.contains("debug-threads=on"), "{}", e.message);
    }

    #[test]
    fn spans_nodes_when_needed() {
        let host = HostCpus::read(&root()).unwrap();
        let mut g = classify(&root(), 4242, None, None).unwrap();
        // Pretend the guest has 5 vCPUs by relabelling threads.
        for (i, t) in g.threads.iter_mut().enumerate() {
            t.role = Role::Vcpu(i as u32);
        }
        let p = propose(&host, &g, Some(&CpuSet::parse_list("0-7").unwrap())).unwrap();
        let cpus: Vec<String> = p.assignments.iter().map(|a| a.cpus.to_list()).collect();
        assert_eq!(cpus, ["0", "1", "4", "5", "2"]);
        assert_eq!(p.notes.len(), 2, "{:?}", p.notes);
    }
}
