//! `vimg info`: qemu-img's human and JSON image information.

use crate::common::{allocated_bytes, fail, hsize, open_error_text, R};
use crate::qjson::{dump_human, pretty, J};
use std::path::Path;
use vcore::image::qcow2::meta::{self, Header};
use vcore::image::{self, Format, OpenOptions};

/// Information about one image (one layer).
pub struct Info {
    pub json: J,
    pub backing: Option<(String, Option<Format>)>,
}

/// Snapshot list lines (header + rows) as qemu-img prints them.
pub fn snapshot_table(snaps: &[meta::Snapshot]) -> String {
    let mut s = format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        let date = local_date(sn.date_sec as i64);
        let icount = match sn.icount {
            Some(i) if i != u64::MAX => i.to_string(),
            _ => String::new(),
        };
        s.push_str(&format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            hsize(sn.vm_state_size),
            date,
            clock,
            icount
        ));
    }
    s
}

/// `%Y-%m-%d %H:%M:%S` in local time.
fn local_date(t: i64) -> String {
    // SAFETY: tm is a plain C struct; localtime_r fills it from a valid time_t.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let tt: libc::time_t = t as libc::time_t;
    // SAFETY: valid pointers to a time_t and a tm struct owned by this frame.
    unsafe { libc::localtime_r(&tt, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn snapshot_json(sn: &meta::Snapshot) -> J {
    let mut o = J::obj()
        .with("id", J::s(sn.id.clone()))
        .with("name", J::s(sn.name.clone()))
        .with("vm-state-size", J::UInt(sn.vm_state_size))
        .with("date-sec", J::Int(sn.date_sec as i64))
        .with("date-nsec", J::Int(sn.date_nsec as i64))
        .with(
            "vm-clock-sec",
            J::Int((sn.vm_clock_nsec / 1_000_000_000) as i64),
        )
        .with(
            "vm-clock-nsec",
            J::Int((sn.vm_clock_nsec % 1_000_000_000) as i64),
        );
    if let Some(i) = sn.icount {
        if i != u64::MAX {
            o.set("icount", J::UInt(i));
        }
    }
    o
}

fn full_backing(image: &str, backing: &str) -> String {
    image::resolve_backing(Path::new(image), backing)
        .display()
        .to_string()
}

/// Collect the information of one image file.
pub fn collect(path: &str, fmt: Option<Format>, force_share: bool) -> R<Info> {
    let opts = OpenOptions {
        format: fmt,
        read_only: true,
        force_share,
        ..Default::default()
    };
    let file = image::open_file(Path::new(path), &opts).map_err(|e| fail(open_error_text(&e)))?;
    let format = match fmt {
        Some(f) => f,
        None => image::probe_file(&file).map_err(|e| fail(open_error_text(&e)))?,
    };
    let flen = file
        .metadata()
        .map_err(|e| fail(format!("Could not open '{path}': {e}")))?
        .len();
    let alloc = allocated_bytes(path);
    let child = J::obj()
        .with("filename", J::s(path))
        .with("format", J::s("file"))
        .with("dirty-flag", J::Bool(false))
        .with("actual-size", J::UInt(alloc))
        .with("virtual-size", J::UInt(flen.next_multiple_of(512)))
        .with(
            "format-specific",
            J::obj().with("type", J::s("file")).with("data", J::obj()),
        )
        .with("children", J::Arr(vec![]));
    let children = J::Arr(vec![J::obj()
        .with("name", J::s("file"))
        .with("info", child)]);
    let mut o = J::obj()
        .with("filename", J::s(path))
        .with("format", J::s(format.name()));
    let mut backing = None;
    match format {
        Format::Raw => {
            o.set("dirty-flag", J::Bool(false));
            o.set("actual-size", J::UInt(alloc));
            o.set("virtual-size", J::UInt(flen.next_multiple_of(512)));
        }
        Format::Qcow2 => {
            let h =
                Header::read(&file).map_err(|m| fail(format!("Could not open '{path}': {m}")))?;
            if h.crypt_method != 0 {
                o.set("encrypted", J::Bool(true));
            }
            let snaps = meta::read_snapshots(&file, &h)
                .map_err(|m| fail(format!("Could not open '{path}': {m}")))?;
            o.set("dirty-flag", J::Bool(h.dirty()));
            o.set("actual-size", J::UInt(alloc));
            o.set("virtual-size", J::UInt(h.size));
            o.set("cluster-size", J::UInt(h.cluster_size()));
            if let Some(b) = &h.backing_file {
                o.set("backing-filename", J::s(b.clone()));
                o.set("full-backing-filename", J::s(full_backing(path, b)));
                if let Some(bf) = &h.backing_format {
                    o.set("backing-filename-format", J::s(bf.clone()));
                }
                backing = Some((
                    full_backing(path, b),
                    h.backing_format.as_deref().and_then(Format::from_name),
                ));
            }
            if !snaps.is_empty() {
                o.set(
                    "snapshots",
                    J::Arr(snaps.iter().map(snapshot_json).collect()),
                );
            }
            let mut data = J::obj();
            if h.version == 2 {
                data.set("compat", J::s("0.10"));
                data.set("refcount-bits", J::UInt(h.refcount_bits()));
                data.set("compression-type", J::s(h.compression_name()));
            } else {
                data.set("compat", J::s("1.1"));
                if let Some(df) = &h.data_file {
                    data.set("data-file", J::s(df.clone()));
                    data.set(
                        "data-file-raw",
                        J::Bool(h.autoclear & meta::AUTOCLEAR_DATA_FILE_RAW != 0),
                    );
                }
                data.set("extended-l2", J::Bool(h.extended_l2()));
                data.set("lazy-refcounts", J::Bool(h.lazy_refcounts()));
                data.set("corrupt", J::Bool(h.corrupt()));
                data.set("refcount-bits", J::UInt(h.refcount_bits()));
                data.set("compression-type", J::s(h.compression_name()));
            }
            o.set(
                "format-specific",
                J::obj().with("type", J::s("qcow2")).with("data", data),
            );
        }
    }
    o.set("children", children);
    Ok(Info { json: o, backing })
}

fn get<'a>(j: &'a J, k: &str) -> Option<&'a J> {
    match j {
        J::Obj(m) => m.iter().find(|(n, _)| n == k).map(|(_, v)| v),
        _ => None,
    }
}

fn num(j: Option<&J>) -> u64 {
    match j {
        Some(J::UInt(u)) => *u,
        Some(J::Int(i)) => *i as u64,
        _ => 0,
    }
}

fn st(j: Option<&J>) -> &str {
    match j {
        Some(J::Str(s)) => s,
        _ => "",
    }
}

/// QEMU's `bdrv_node_info_dump` + children (human output).
pub fn human(j: &J, indent: usize, protocol: bool, out: &mut String) {
    let ind = " ".repeat(indent * 4);
    let vs = num(get(j, "virtual-size"));
    out.push_str(&format!(
        "{ind}{}: {}\n{ind}{}: {}\n{ind}{}: {} ({} bytes)\n{ind}disk size: {}\n",
        if protocol { "filename" } else { "image" },
        st(get(j, "filename")),
        if protocol {
            "protocol type"
        } else {
            "file format"
        },
        st(get(j, "format")),
        if protocol {
            "file length"
        } else {
            "virtual size"
        },
        hsize(vs),
        vs,
        hsize(num(get(j, "actual-size")))
    ));
    if let Some(c) = get(j, "cluster-size") {
        out.push_str(&format!("{ind}cluster_size: {}\n", num(Some(c))));
    }
    if let Some(J::Bool(true)) = get(j, "encrypted") {
        out.push_str(&format!("{ind}encrypted: yes\n"));
    }
    if let Some(J::Bool(true)) = get(j, "dirty-flag") {
        out.push_str(&format!("{ind}cleanly shut down: no\n"));
    }
    if let Some(b) = get(j, "backing-filename") {
        let b = st(Some(b));
        let full = st(get(j, "full-backing-filename"));
        out.push_str(&format!("{ind}backing file: {b}"));
        if b != full {
            out.push_str(&format!(" (actual path: {full})"));
        }
        out.push('\n');
    }
    if let Some(bf) = get(j, "backing-filename-format") {
        out.push_str(&format!("{ind}backing file format: {}\n", st(Some(bf))));
    }
    if let Some(J::Arr(snaps)) = get(j, "snapshots") {
        out.push_str(&format!("{ind}Snapshot list:\n"));
        let list: Vec<meta::Snapshot> = snaps
            .iter()
            .map(|s| meta::Snapshot {
                id: st(get(s, "id")).to_string(),
                name: st(get(s, "name")).to_string(),
                vm_state_size: num(get(s, "vm-state-size")),
                date_sec: num(get(s, "date-sec")) as u32,
                date_nsec: num(get(s, "date-nsec")) as u32,
                vm_clock_nsec: num(get(s, "vm-clock-sec")) * 1_000_000_000
                    + num(get(s, "vm-clock-nsec")),
                icount: get(s, "icount").map(|v| num(Some(v))),
                ..Default::default()
            })
            .collect();
        for line in snapshot_table(&list).lines() {
            out.push_str(&format!("{ind}{line}\n"));
        }
    }
    if let Some(fs) = get(j, "format-specific") {
        if let Some(J::Obj(d)) = get(fs, "data") {
            if !d.is_empty() {
                out.push_str(&format!(
                    "{ind}{}:\n",
                    if protocol {
                        "Protocol specific information"
                    } else {
                        "Format specific information"
                    }
                ));
                dump_human(&J::Obj(d.clone()), indent + 1, out);
            }
        }
    }
    if let Some(J::Arr(children)) = get(j, "children") {
        for c in children {
            out.push_str(&format!("{ind}Child node '/{}':\n", st(get(c, "name"))));
            if let Some(ci) = get(c, "info") {
                human(ci, indent + 1, true, out);
            }
        }
    }
}

/// Run `info`.
pub fn run(file: &str, fmt: Option<&str>, chain: bool, force_share: bool, json: bool) -> R<()> {
    let fmt = match fmt {
        None => None,
        Some(s) => Some(
            Format::from_name(s)
                .ok_or_else(|| fail(format!("Could not open '{file}': Unknown driver '{s}'")))?,
        ),
    };
    let mut infos = Vec::new();
    let mut cur = (file.to_string(), fmt);
    let mut seen: Vec<std::path::PathBuf> = Vec::new();
    loop {
        let canon = std::fs::canonicalize(&cur.0).unwrap_or_else(|_| cur.0.clone().into());
        if seen.contains(&canon) {
            return Err(fail(format!(
                "Backing file '{}' creates an infinite loop.",
                cur.0
            )));
        }
        seen.push(canon);
        let info = collect(&cur.0, cur.1, force_share)?;
        let next = info.backing.clone();
        infos.push(info.json);
        match next {
            Some(b) if chain => cur = b,
            _ => break,
        }
    }
    if json {
        if chain {
            println!("{}", pretty(&J::Arr(infos)));
        } else {
            println!("{}", pretty(&infos[0]));
        }
    } else {
        let mut out = String::new();
        for (i, j) in infos.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            human(j, 0, false, &mut out);
        }
        print!("{out}");
    }
    Ok(())
}
