//! `vpin list` and `vpin cpus` output, and the table printer.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use vcore::cpulist::CpuSet;
use vcore::host::cpus::{HostCpus, IsolCpus};
use vcore::host::tasks;
use vcore::host::threads::Guest;

use crate::cli::{Failure, Outcome};
use crate::target;

/// Left-aligned columns separated by two spaces; the last column is not
/// padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The rows of `vpin list` (with header).
pub fn list_rows(guests: &[Guest]) -> Vec<Vec<String>> {
    let mut rows = vec![["PID", "TID", "NAME", "ROLE", "PSR", "AFFINITY"]
        .map(String::from)
        .to_vec()];
    for g in guests {
        for t in &g.threads {
            rows.push(vec![
                g.pid.to_string(),
                t.tid.to_string(),
                t.name.clone(),
                t.role.to_string(),
                t.psr.map_or("-".into(), |p| p.to_string()),
                t.affinity.to_list(),
            ]);
        }
    }
    rows
}

/// `vpin list`.
pub fn print_list(guests: &[Guest], json: bool) -> Outcome {
    for g in guests {
        for note in &g.notes {
            eprintln!("vpin: note: {note}");
        }
        for tid in &g.vanished {
            eprintln!(
                "vpin: thread {tid} of process {} exited while being read",
                g.pid
            );
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(guests).expect("serialise")
        );
        return Ok(());
    }
    if guests.is_empty() {
        eprintln!("vpin: no VMM processes found");
        return Ok(());
    }
    print!("{}", table(&list_rows(guests)));
    Ok(())
}

/// One CPU in `vpin cpus`.
#[derive(Debug, Serialize)]
pub struct CpuRow {
    /// CPU number.
    pub cpu: u32,
    /// NUMA node.
    pub node: Option<u32>,
    /// SMT siblings.
    pub siblings: Option<CpuSet>,
    /// In the isolated set.
    pub isolated: bool,
    /// Threads (all processes) that last ran here.
    pub threads: usize,
    /// Guest threads whose affinity includes this CPU and is narrower than
    /// the online set, as `GUEST:ROLE` (with a count for several).
    pub pinned: Vec<String>,
}

/// What `vpin cpus --json` prints.
#[derive(Debug, Serialize)]
pub struct CpusReport {
    /// /sys and /proc/cmdline facts.
    #[serde(flatten)]
    pub host: HostCpus,
    /// Per online CPU.
    pub cpus: Vec<CpuRow>,
}

/// Builds the `vpin cpus` report.
pub fn cpus_report(root: &Path) -> Result<CpusReport, Failure> {
    let host = HostCpus::read(root).map_err(|e| Failure::fail(e.to_string()))?;
    // Threads per CPU over every process, like `ps -eLo psr`.
    let mut per_cpu: BTreeMap<u32, usize> = BTreeMap::new();
    for pid in tasks::pids(root).map_err(|e| Failure::fail(e.to_string()))? {
        let Ok(list) = tasks::read_tasks(root, pid) else {
            continue; // exited, or unreadable
        };
        for t in list.tasks {
            if let Some(p) = t.psr {
                *per_cpu.entry(p).or_default() += 1;
            }
        }
    }
    let guests = target::all_guests(root, None)?;
    let mut pinned: BTreeMap<u32, BTreeMap<String, usize>> = BTreeMap::new();
    for g in &guests {
        let label = g.name.clone().unwrap_or_else(|| g.pid.to_string());
        for t in &g.threads {
            if t.affinity.is_empty() || host.online.is_subset(&t.affinity) {
                continue; // not pinned
            }
            for cpu in t.affinity.iter() {
                *pinned
                    .entry(cpu)
                    .or_default()
                    .entry(format!("{label}:{}", t.role))
                    .or_default() += 1;
            }
        }
    }
    let cpus = host
        .online
        .iter()
        .map(|cpu| CpuRow {
            cpu,
            node: host.node_of(cpu),
            siblings: host.siblings.get(&cpu).cloned(),
            isolated: host.isolated.contains(cpu),
            threads: per_cpu.get(&cpu).copied().unwrap_or(0),
            pinned: pinned
                .get(&cpu)
                .map(|m| {
                    m.iter()
                        .map(|(k, n)| {
                            if *n > 1 {
                                format!("{k}*{n}")
                            } else {
                                k.clone()
                            }
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    Ok(CpusReport { host, cpus })
}

fn or_none(s: &CpuSet) -> String {
    if s.is_empty() {
        "(none)".into()
    } else {
        s.to_list()
    }
}

fn isolcpus_text(i: &Option<IsolCpus>) -> String {
    match i {
        None => "(not set)".into(),
        Some(i) => i.raw.clone(),
    }
}

/// Renders the `vpin cpus` text.
pub fn cpus_text(r: &CpusReport) -> String {
    let h = &r.host;
    let mut out = String::new();
    let summary = vec![
        vec!["online:".into(), h.online.to_list()],
        vec!["isolated:".into(), or_none(&h.isolated)],
        vec![
            "nohz_full:".into(),
            h.nohz_full
                .as_ref()
                .map_or("(not supported)".into(), or_none),
        ],
        vec!["isolcpus=:".into(), isolcpus_text(&h.isolcpus_cmdline)],
        vec![
            "nohz_full=:".into(),
            h.nohz_full_cmdline
                .clone()
                .unwrap_or_else(|| "(not set)".into()),
        ],
    ];
    out.push_str(&table(&summary));
    if let Some(asked) = h.isolcpus_cmdline.as_ref().and_then(|i| i.cpus.as_ref()) {
        if asked != &h.isolated {
            out.push_str(&format!(
                "note: isolcpus= asked for {} but the kernel isolated {}\n",
                asked.to_list(),
                or_none(&h.isolated)
            ));
        }
    }
    out.push('\n');
    let mut rows = vec![["CPU", "NODE", "SIBLINGS", "ISOLATED", "THREADS", "PINNED"]
        .map(String::from)
        .to_vec()];
    for c in &r.cpus {
        rows.push(vec![
            c.cpu.to_string(),
            c.node.map_or("-".into(), |n| n.to_string()),
            c.siblings.as_ref().map_or("-".into(), CpuSet::to_list),
            if c.isolated { "yes" } else { "no" }.into(),
            c.threads.to_string(),
            if c.pinned.is_empty() {
                "-".into()
            } else {
                c.pinned.join(",")
            },
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// `vpin cpus`.
pub fn print_cpus(root: &Path, json: bool) -> Outcome {
    let r = cpus_report(root)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).expect("serialise"));
    } else {
        print!("{}", cpus_text(&r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../vcore/tests/fixtures/vpin/host")
    }

    #[test]
    fn table_aligns() {
        let rows = vec![
            vec!["A".to_string(), "BB".into(), "C".into()],
            vec!["xxx".to_string(), "y".into(), "z z".into()],
        ];
        assert_eq!(table(&rows), "A    BB  C\nxxx  y   z z\n");
    }

    #[test]
    fn cpus_view_of_fixture_host() {
        let r = cpus_report(&root()).unwrap();
        let text = cpus_text(&r);
        let expected_head = "\
online:      0-7
isolated:    2,3,6,7
nohz_full:   2,3,6,7
isolcpus=:   domain,managed_irq,2-3,6-7
nohz_full=:  2-3,6-7

CPU  NODE  SIBLINGS  ISOLATED  THREADS  PINNED
";
        assert!(text.starts_with(expected_head), "{text}");
        // CPU 3: web's vcpu1 is pinned there; CPU 6 and 7: Firecracker's vCPUs.
        assert!(text.contains("\n3    1     3,7       yes       "), "{text}");
        assert!(text.contains("web:vcpu1"), "{text}");
        let row6 = &r.cpus[6];
        assert_eq!(row6.pinned, ["6000:vcpu0"]);
        // 778 ("a) (b c", affinity 0-3) belongs to a non-VMM process: not listed.
        assert_eq!(r.cpus[0].pinned, Vec::<String>::new());
        // psr counts: systemd, web main, plain main, firecracker, ... ran on 0.
        assert!(r.cpus[0].threads >= 5);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["isolated"], "2,3,6,7");
        assert_eq!(json["cpus"][2]["node"], 1);
    }

    #[test]
    fn list_rows_of_fixture_qemu() {
        let g = vcore::host::threads::classify(&root(), 4242, None, None).unwrap();
        let text = table(&list_rows(&[g]));
        assert_eq!(
            text,
            "\
PID   TID   NAME             ROLE      PSR  AFFINITY
4242  4242  qemu-system-x86  emulator  0    0-7
4242  4243  qemu-system-x86  emulator  4    0-7
4242  4244  IO mon_iothread  io        5    0-7
4242  4246  CPU 0/KVM        vcpu0     2    0-7
4242  4247  CPU 1/KVM        vcpu1     3    3
"
        );
    }
}
