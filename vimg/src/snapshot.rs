//! `vimg snapshot`, `vimg amend`, `vimg measure`.

use crate::common::{fail, open_error_text, parse_bool, parse_opts, R};
use crate::map::{open_chain, status};
use crate::qjson::{pretty, J};
use std::path::Path;
use vcore::image::qcow2::meta::{self, Header};
use vcore::image::qcow2::snapshot as qsnap;
use vcore::image::{self, Format, OpenOptions};

fn open_qcow2(
    file: &str,
    fmt: Option<&str>,
    rw: bool,
    force_share: bool,
) -> R<(std::fs::File, Format)> {
    let format = match fmt {
        None => None,
        Some(s) => Some(
            Format::from_name(s)
                .ok_or_else(|| fail(format!("Could not open '{file}': Unknown driver '{s}'")))?,
        ),
    };
    let opts = OpenOptions {
        format,
        read_only: !rw,
        force_share,
        ..Default::default()
    };
    let f = image::open_file(Path::new(file), &opts).map_err(|e| fail(open_error_text(&e)))?;
    let format = match format {
        Some(f) => f,
        None => {
            let p = image::probe_file(&f).map_err(|e| fail(open_error_text(&e)))?;
            if p == Format::Raw && rw {
                crate::common::warn_probed_raw(file);
            }
            p
        }
    };
    if format == Format::Qcow2 {
        let h = Header::read(&f).map_err(|m| fail(format!("Could not open '{file}': {m}")))?;
        if rw && h.corrupt() {
            return Err(fail(format!(
                "Could not open '{file}': qcow2: Image is corrupt; cannot be opened read/write"
            )));
        }
        if rw && h.dirty() {
            vcore::image::qcow2::check::check(
                &f,
                vcore::image::qcow2::check::Fix::ALL,
                &mut |_| {},
            )
            .map_err(|m| fail(format!("Could not open '{file}': {m}")))?;
        }
    }
    Ok((f, format))
}

/// Snapshot action.
pub enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// Run `snapshot`.
pub fn run_snapshot(file: &str, fmt: Option<&str>, action: Action, force_share: bool) -> R<()> {
    let rw = !matches!(action, Action::List);
    let (f, format) = open_qcow2(file, fmt, rw, force_share && !rw)?;
    if format == Format::Raw {
        return match action {
            Action::List => Ok(()),
            Action::Create(n) => Err(fail(format!(
                "Could not create snapshot '{n}': Operation not supported"
            ))),
            Action::Apply(n) => Err(fail(format!(
                "Could not apply snapshot '{n}': Operation not supported"
            ))),
            Action::Delete(n) => Err(fail(format!(
                "Could not delete snapshot '{n}': Operation not supported"
            ))),
        };
    }
    match action {
        Action::List => {
            let h = Header::read(&f).map_err(|m| fail(format!("Could not open '{file}': {m}")))?;
            let snaps = meta::read_snapshots(&f, &h)
                .map_err(|m| fail(format!("Could not open '{file}': {m}")))?;
            if !snaps.is_empty() {
                print!("Snapshot list:\n{}", crate::info::snapshot_table(&snaps));
            }
            Ok(())
        }
        Action::Create(n) => {
            qsnap::create(&f, &n).map_err(|m| fail(format!("Could not create snapshot '{n}': {m}")))
        }
        Action::Apply(n) => {
            qsnap::apply(&f, &n).map_err(|m| fail(format!("Could not apply snapshot '{n}': {m}")))
        }
        Action::Delete(n) => {
            qsnap::delete(&f, &n).map_err(|m| fail(format!("Could not delete snapshot '{n}': {m}")))
        }
    }
}

/// qemu-img's `amend -o help` list for qcow2.
const QCOW2_AMEND_HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Run `amend`.
pub fn run_amend(file: Option<&str>, fmt: Option<&str>, opts: &[String], quiet: bool) -> R<()> {
    let _ = quiet;
    if opts.is_empty() {
        return Err(fail(
            "Must specify options (-o)\nTry 'vimg amend --help' for more info",
        ));
    }
    let help = parse_opts(&opts.join(","))
        .iter()
        .any(|(k, _)| k == "help" || k == "?");
    let Some(file) = file else {
        if help && fmt == Some("qcow2") {
            print!("{QCOW2_AMEND_HELP}");
            return Ok(());
        }
        return Err(fail("Expecting one image file name"));
    };
    let (f, format) = open_qcow2(file, fmt, true, false)?;
    if format == Format::Raw {
        return Err(fail(
            "Format driver 'raw' does not support option amendment",
        ));
    }
    if help {
        print!("{QCOW2_AMEND_HELP}");
        return Ok(());
    }
    let mut v3 = None;
    let mut lazy = None;
    let mut bits = None;
    for (k, v) in parse_opts(&opts.join(",")) {
        match k.as_str() {
            "compat" => {
                v3 = Some(match v.as_str() {
                    "0.10" | "v2" => false,
                    "1.1" | "v3" => true,
                    _ => return Err(fail(format!("Unknown compatibility level {v}"))),
                })
            }
            "lazy_refcounts" => lazy = Some(parse_bool(&k, &v).map_err(fail)?),
            "refcount_bits" => {
                bits =
                    Some(v.parse::<u64>().map_err(|_| {
                        fail("Parameter 'refcount_bits' expects a number".to_string())
                    })?)
            }
            "cluster_size" | "preallocation" | "backing_fmt" | "backing_file" | "size"
            | "compression_type" | "extended_l2" | "data_file" | "data_file_raw" | "encryption"
            | "nocow" | "extent_size_hint" => {
                return Err(fail(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                )))
            }
            _ => return Err(fail(format!("Invalid parameter '{k}'"))),
        }
    }
    qsnap::amend(&f, v3, lazy, bits).map_err(fail)
}

/// QEMU's `qcow2_refcount_metadata_size`, in bytes.
fn refcount_metadata_size(clusters: u64, cs: u64, order: u32) -> u64 {
    let (blocks, table) = vcore::image::qcow2::refcount_metadata(clusters, cs, order, false);
    (blocks + table) * cs
}

/// QEMU's `qcow2_calc_prealloc_size`.
fn prealloc_size(total: u64, cs: u64, order: u32, ext_l2: bool) -> u64 {
    let aligned = total.next_multiple_of(cs);
    let l2e = if ext_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).next_multiple_of(cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).next_multiple_of(cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, order);
    meta + aligned
}

/// Arguments of `measure`.
pub struct MeasureArgs {
    pub out_fmt: Option<String>,
    pub opts: Vec<String>,
    pub size: Option<String>,
    pub fmt: Option<String>,
    pub json: bool,
    pub force_share: bool,
    pub file: Option<String>,
}

/// Run `measure`.
pub fn run_measure(a: MeasureArgs) -> R<()> {
    if a.size.is_some() && a.file.is_some() {
        return Err(fail("--size N cannot be used together with a filename."));
    }
    if a.size.is_none() && a.file.is_none() {
        return Err(fail("Either --size N or one filename must be specified."));
    }
    let out = a.out_fmt.clone().unwrap_or_else(|| "raw".into());
    let out_fmt =
        Format::from_name(&out).ok_or_else(|| fail(format!("Unknown file format '{out}'")))?;
    let opts = parse_opts(&a.opts.join(","));
    // What the format's create options and the file protocol's accept, as
    // qemu-img checks them.
    for (k, _) in &opts {
        let file_opt = matches!(
            k.as_str(),
            "size" | "preallocation" | "nocow" | "extent_size_hint"
        );
        let qcow2_opt = matches!(
            k.as_str(),
            "compat"
                | "backing_file"
                | "backing_fmt"
                | "encryption"
                | "cluster_size"
                | "lazy_refcounts"
                | "refcount_bits"
                | "compression_type"
                | "extended_l2"
                | "data_file"
                | "data_file_raw"
        ) || k.starts_with("encrypt.");
        let accepted = file_opt || (out_fmt == Format::Qcow2 && qcow2_opt);
        if !accepted {
            return Err(fail(format!(
                "Invalid parameter '{k}'\nvimg: Invalid options for file format '{out}'"
            )));
        }
    }
    let get = |k: &str| {
        opts.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let mut cs = 65536u64;
    let mut order = 4u32;
    let mut v3 = true;
    let mut ext = false;
    if let Some(v) = get("cluster_size") {
        cs = vcore::units::parse_size(&v, vcore::units::Suffix::B)
            .map_err(|e| fail(e.qemu_option_message("cluster_size")))?;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(fail(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
    }
    if let Some(v) = get("refcount_bits") {
        let b: u64 = v
            .parse()
            .map_err(|_| fail("Parameter 'refcount_bits' expects a number"))?;
        if !b.is_power_of_two() || b > 64 {
            return Err(fail(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        order = b.trailing_zeros();
    }
    if let Some(v) = get("compat") {
        // qcow2_measure takes only the numeric levels.
        v3 = match v.as_str() {
            "0.10" => false,
            "1.1" => true,
            _ => return Err(fail(format!("Invalid compatibility level: '{v}'"))),
        };
    }
    if let Some(v) = get("extended_l2") {
        ext = parse_bool("extended_l2", &v).map_err(fail)?;
    }
    let prealloc = get("preallocation").unwrap_or_else(|| "off".into());
    let has_backing = get("backing_file").is_some();
    let (vsize, mut required, in_qcow2) = match (&a.size, &a.file) {
        (Some(s), _) => {
            let v = crate::common::parse_img_size(s)?;
            (v, 0u64, false)
        }
        (None, Some(file)) => {
            let fmt = match a.fmt.as_deref() {
                None => None,
                Some(s) => Some(Format::from_name(s).ok_or_else(|| {
                    fail(format!("Could not open '{file}': Unknown driver '{s}'"))
                })?),
            };
            let mut layers = open_chain(file, fmt, a.force_share)?;
            let ssize = layers[0].size();
            let is_q = match &layers[0] {
                crate::map::Layer::Qcow2 { m, .. } => m.header().version >= 3,
                _ => false,
            };
            let mut req = 0u64;
            if out_fmt == Format::Qcow2 {
                if has_backing {
                    req = ssize.next_multiple_of(cs);
                } else {
                    let mut off = 0u64;
                    while off < ssize {
                        let e = status(&mut layers, off, ssize - off)?;
                        let mut pnum = e.length.max(1);
                        if !e.zero && e.data {
                            pnum = (off + pnum).next_multiple_of(cs) - off;
                            req += off % cs + pnum;
                        }
                        off += pnum;
                    }
                }
            }
            (ssize, req, is_q)
        }
        _ => unreachable!(),
    };
    let (full, req, bitmaps) = match out_fmt {
        Format::Raw => {
            let v = vsize.next_multiple_of(512);
            (v, v, None)
        }
        Format::Qcow2 => {
            let aligned = vsize.next_multiple_of(cs);
            let l2_tables = (aligned / cs).div_ceil(cs / if ext { 16 } else { 8 });
            if l2_tables * 8 > meta::MAX_L1_BYTES {
                return Err(fail(
                    "The image size is too large (try using a larger cluster size)",
                ));
            }
            if prealloc == "full" || prealloc == "falloc" {
                required = aligned;
            }
            let full = prealloc_size(aligned, cs, order, ext);
            let req = full - aligned + required;
            (full, req, (v3 && in_qcow2).then_some(0u64))
        }
    };
    if a.json {
        let mut o = J::obj()
            .with("required", J::UInt(req))
            .with("fully-allocated", J::UInt(full));
        if let Some(b) = bitmaps {
            o.set("bitmaps", J::UInt(b));
        }
        println!("{}", pretty(&o));
    } else {
        println!("required size: {req}");
        println!("fully allocated size: {full}");
        if let Some(b) = bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(())
}
