//! `vimg create`: raw and qcow2 images, with qemu-img's option names,
//! `Formatting ...` line and messages.

use crate::common::{fail, parse_bool, parse_img_size, parse_opts, Failure, R};
use std::os::unix::fs::FileExt;
use std::path::Path;
use vcore::image::qcow2::create::{self as qcreate, CreateOptions, Prealloc};
use vcore::image::{self, Format, OpenOptions};

/// Arguments of `create`.
pub struct CreateArgs {
    pub fmt: Option<String>,
    pub opts: Vec<String>,
    pub backing: Option<String>,
    pub backing_fmt: Option<String>,
    pub unsafe_backing: bool,
    pub quiet: bool,
    pub file: String,
    pub size: Option<String>,
}

const QCOW2_KEYS: &[&str] = &[
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "size",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "compat",
    "lazy_refcounts",
    "refcount_bits",
    "nocow",
    "extent_size_hint",
];
const RAW_KEYS: &[&str] = &["size", "nocow", "preallocation", "extent_size_hint"];
const SIZE_KEYS: &[&str] = &["cluster_size", "size", "extent_size_hint"];

fn with_file(file: &str, msg: impl std::fmt::Display) -> Failure {
    fail(format!("{file}: {msg}"))
}

/// Print qemu-img's `-o help` list for a format.
fn print_help(fmt: Format) {
    match fmt {
        Format::Qcow2 => print!(
            "Supported qcow2 options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  extended_l2=<bool (on/off)> - Extended L2 tables
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"
        ),
        Format::Raw => print!(
            "Supported raw options:
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
"
        ),
    }
}

/// Run `create`.
pub fn run(a: CreateArgs) -> R<()> {
    let fmt_name = a.fmt.clone().unwrap_or_else(|| "raw".into());
    let fmt = Format::from_name(&fmt_name)
        .ok_or_else(|| fail(format!("Unknown file format '{fmt_name}'")))?;
    let joined = a.opts.join(",");
    let mut opts = parse_opts(&joined);
    if opts.iter().any(|(k, _)| k == "help" || k == "?") {
        print_help(fmt);
        return Ok(());
    }
    let keys = if fmt == Format::Qcow2 {
        QCOW2_KEYS
    } else {
        RAW_KEYS
    };
    for (k, _) in &opts {
        if !keys.contains(&k.as_str()) {
            return Err(with_file(&a.file, format!("Invalid parameter '{k}'")));
        }
    }
    if let Some(b) = &a.backing {
        opts.retain(|(k, _)| k != "backing_file");
        opts.push(("backing_file".into(), b.clone()));
    }
    if let Some(bf) = &a.backing_fmt {
        opts.retain(|(k, _)| k != "backing_fmt");
        opts.push(("backing_fmt".into(), bf.clone()));
    }
    if fmt == Format::Raw && opts.iter().any(|(k, _)| k == "backing_file") {
        return Err(with_file(&a.file, "Invalid parameter 'backing_file'"));
    }
    let get = |opts: &Vec<(String, String)>, k: &str| {
        opts.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    // Size: positional argument wins over -o size=.
    let mut size: Option<u64> = None;
    if let Some(s) = &a.size {
        size = Some(parse_img_size(s)?);
    } else if let Some(s) = get(&opts, "size") {
        size = Some(
            vcore::units::parse_size(&s, vcore::units::Suffix::B)
                .map_err(|e| with_file(&a.file, e.qemu_option_message("size")))?,
        );
    }
    // Backing file: needs a format; opened to get its size / validate.
    let backing = get(&opts, "backing_file");
    let backing_fmt = get(&opts, "backing_fmt");
    if let Some(b) = &backing {
        let bpath = image::resolve_backing(Path::new(&a.file), b);
        if backing_fmt.is_none() {
            let detected = image::probe(&bpath)
                .map(|f| f.name().to_string())
                .unwrap_or_else(|_| "raw".into());
            return Err(with_file(
                &a.file,
                format!(
                    "Backing file specified without backing format\nDetected format of {detected}."
                ),
            ));
        }
        if !a.unsafe_backing || size.is_none() {
            let bf = backing_fmt.as_deref().unwrap_or("raw");
            let bopts = OpenOptions {
                format: Format::from_name(bf),
                read_only: true,
                no_backing: false,
                force_share: true,
                ..Default::default()
            };
            if Format::from_name(bf).is_none() {
                return Err(with_file(&a.file, format!("Unknown driver '{bf}'")));
            }
            match image::open(&bpath, &bopts) {
                Ok(dev) => {
                    if size.is_none() {
                        size = Some(dev.size());
                    }
                }
                Err(e) => {
                    let msg = match &e {
                        image::Error::Open { path, source } => format!(
                            "Could not open '{path}': {}",
                            vcore::image::qcow2::os_msg(source)
                        ),
                        other => other.to_string(),
                    };
                    return Err(with_file(
                        &a.file,
                        format!("{msg}\nCould not open backing image."),
                    ));
                }
            }
        }
    }
    let Some(size) = size else {
        return Err(with_file(&a.file, "Image creation needs a size parameter"));
    };
    // Typed options (bool, number, size) are checked before the
    // `Formatting` line, like QemuOpts does.
    for key in ["lazy_refcounts", "extended_l2", "data_file_raw", "nocow"] {
        if let Some(v) = get(&opts, key) {
            parse_bool(key, &v).map_err(|m| with_file(&a.file, m))?;
        }
    }
    if let Some(v) = get(&opts, "refcount_bits") {
        if v.parse::<u64>().is_err() {
            return Err(with_file(
                &a.file,
                "Parameter 'refcount_bits' expects a number".to_string(),
            ));
        }
    }
    for key in ["cluster_size", "extent_size_hint"] {
        if let Some(v) = get(&opts, key) {
            vcore::units::parse_size(&v, vcore::units::Suffix::B)
                .map_err(|e| with_file(&a.file, e.qemu_option_message(key)))?;
        }
    }
    // Formatting line.
    if !a.quiet {
        let mut line = format!("Formatting '{}', fmt={}", a.file, fmt.name());
        for k in keys {
            let given = get(&opts, k);
            let val = match (*k, &given) {
                ("size", _) => Some(size.to_string()),
                (_, Some(v)) if SIZE_KEYS.contains(k) => Some(
                    vcore::units::parse_size(v, vcore::units::Suffix::B)
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| v.clone()),
                ),
                (_, Some(v)) => Some(v.clone()),
                ("cluster_size", None) if fmt == Format::Qcow2 => Some("65536".into()),
                ("extended_l2", None) if fmt == Format::Qcow2 => Some("off".into()),
                ("compression_type", None) if fmt == Format::Qcow2 => Some("zlib".into()),
                ("lazy_refcounts", None) if fmt == Format::Qcow2 => Some("off".into()),
                ("refcount_bits", None) if fmt == Format::Qcow2 => Some("16".into()),
                _ => None,
            };
            if let Some(v) = val {
                line.push_str(&format!(" {k}={v}"));
            }
        }
        println!("{line}");
    }
    let prealloc_s = get(&opts, "preallocation").unwrap_or_else(|| "off".into());
    let prealloc = Prealloc::from_name(&prealloc_s).ok_or_else(|| {
        with_file(
            &a.file,
            format!("Parameter 'preallocation' does not accept value '{prealloc_s}'"),
        )
    })?;
    match fmt {
        Format::Raw => create_raw(&a.file, size, prealloc),
        Format::Qcow2 => {
            let mut o = CreateOptions {
                size: size.next_multiple_of(512),
                prealloc,
                backing_file: backing,
                backing_format: backing_fmt,
                ..Default::default()
            };
            if let Some(v) = get(&opts, "compat") {
                o.v3 = match v.as_str() {
                    "0.10" | "v2" => false,
                    "1.1" | "v3" => true,
                    _ => {
                        return Err(with_file(
                            &a.file,
                            format!("Parameter 'version' does not accept value '{v}'"),
                        ))
                    }
                };
            }
            if let Some(v) = get(&opts, "cluster_size") {
                o.cluster_size = vcore::units::parse_size(&v, vcore::units::Suffix::B)
                    .map_err(|e| with_file(&a.file, e.qemu_option_message("cluster_size")))?;
            }
            if let Some(v) = get(&opts, "compression_type") {
                o.zstd = match v.as_str() {
                    "zlib" => false,
                    "zstd" => true,
                    _ => {
                        return Err(with_file(
                            &a.file,
                            format!("Parameter 'compression-type' does not accept value '{v}'"),
                        ))
                    }
                };
            }
            for (key, field) in [("lazy_refcounts", 0), ("extended_l2", 1)] {
                if let Some(v) = get(&opts, key) {
                    let b = parse_bool(key, &v).map_err(|m| with_file(&a.file, m))?;
                    if field == 0 {
                        o.lazy_refcounts = b;
                    } else {
                        o.extended_l2 = b;
                    }
                }
            }
            if let Some(v) = get(&opts, "refcount_bits") {
                o.refcount_bits = v.parse().map_err(|_| {
                    with_file(
                        &a.file,
                        "Parameter 'refcount_bits' expects a number".to_string(),
                    )
                })?;
            }
            if get(&opts, "data_file").is_some() {
                return Err(with_file(
                    &a.file,
                    "External data files are not supported by vimg",
                ));
            }
            qcreate::create(Path::new(&a.file), &o).map_err(|m| with_file(&a.file, m))
        }
    }
}

fn create_raw(file: &str, size: u64, prealloc: Prealloc) -> R<()> {
    if prealloc == Prealloc::Metadata {
        // QEMU's file driver creates the file before it rejects the mode.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(file);
        return Err(with_file(file, "Unsupported preallocation mode: metadata"));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(|e| {
            with_file(
                file,
                format!(
                    "Could not create '{file}': {}",
                    vcore::image::qcow2::os_msg(&e)
                ),
            )
        })?;
    let len = size.next_multiple_of(512);
    f.set_len(len).map_err(|e| {
        with_file(
            file,
            format!("Could not resize file: {}", vcore::image::qcow2::os_msg(&e)),
        )
    })?;
    match prealloc {
        Prealloc::Falloc => {
            fallocate(&f, 0, len).map_err(|e| {
                with_file(
                    file,
                    format!(
                        "Could not preallocate data for the new file: {}",
                        vcore::image::qcow2::os_msg(&e)
                    ),
                )
            })?;
        }
        Prealloc::Full => {
            let zero = vec![0u8; 1 << 20];
            let mut o = 0;
            while o < len {
                let n = (len - o).min(zero.len() as u64) as usize;
                f.write_all_at(&zero[..n], o)
                    .map_err(|e| with_file(file, e))?;
                o += n as u64;
            }
        }
        _ => {
            // Like QEMU's file-posix: allocate the first block so that
            // alignment probing works (`disk size` then shows 4 KiB).
            let first = len.min(4096);
            if first > 0 {
                f.write_all_at(&vec![0u8; first as usize], 0)
                    .map_err(|e| with_file(file, e))?;
            }
        }
    }
    Ok(())
}

fn fallocate(f: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: valid fd; integer arguments only.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, offset as i64, len as i64) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
