//! `vmrun IMAGE` without `-kernel`: find the kernel, initrd and command line
//! on the disk (vcore::boot::disk) and boot them like `-kernel`;
//! `--print-boot` shows them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use vcore::boot::disk::{self, BootEntry};
use vcore::image::{self, OpenOptions};

use crate::cli::Output;

/// The disk to boot when there is no `-kernel`: the positional IMAGE (which
/// is also `-hda`), else `-hda`, else the drive of the
/// `-device virtio-blk-pci,drive=ID,bootindex=N` with the lowest N, else the
/// `-drive` with `index=0`, else the first `-drive` the guest sees. `None`
/// when there are no disks.
pub fn boot_disk(
    image: Option<&Path>,
    hda: Option<&Path>,
    drives: &[String],
    devices: &[String],
) -> Result<Option<(PathBuf, Option<image::Format>)>, String> {
    if let (Some(i), Some(h)) = (image, hda) {
        return Err(format!(
            "both IMAGE {} and -hda {} name the first disk; give one",
            i.display(),
            h.display()
        ));
    }
    if let Some(p) = image.or(hda) {
        return Ok(Some((p.to_path_buf(), None)));
    }
    let mut best: Option<(u32, String)> = None;
    for dev in devices {
        let (_, kv) = vcore::qemuopts::split(dev);
        let get = |key: &str| kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let (Some(id), Some(bi)) = (get("drive"), get("bootindex")) else {
            continue;
        };
        let n: u32 = bi.parse().map_err(|_| {
            format!("-device {dev}: bootindex expects a non-negative number, not '{bi}'")
        })?;
        if best.as_ref().is_none_or(|(b, _)| n < *b) {
            best = Some((n, id));
        }
    }
    if let Some((_, id)) = best {
        for s in drives {
            let d = crate::drive::parse_drive(s)?;
            if d.id.as_deref() == Some(id.as_str()) {
                return Ok(Some((d.file, d.format)));
            }
        }
    }
    let mut first = None;
    for s in drives {
        let d = crate::drive::parse_drive(s)?;
        let (_, kv) = vcore::qemuopts::split(s);
        if kv.iter().any(|(k, v)| k == "index" && v == "0") {
            return Ok(Some((d.file, d.format)));
        }
        if first.is_none() && !d.if_none {
            first = Some((d.file, d.format));
        }
    }
    Ok(first)
}

/// Open `path` read-only (shared with other users, like `qemu-img -U`) and
/// find what to boot on it.
pub fn find(
    path: &Path,
    format: Option<image::Format>,
) -> anyhow::Result<(BootEntry, image::Format)> {
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        format,
        ..Default::default()
    };
    let dev = image::open(path, &opts).map_err(|e| anyhow!("{e}"))?;
    let format = dev.format();
    let dev: Arc<dyn image::BlockDevice> = Arc::from(dev);
    let entry = disk::find_boot(dev)
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("cannot boot '{}'", path.display()))?;
    Ok((entry, format))
}

/// The command line the kernel gets: the entry's, then `-append`, then
/// `console=ttyS0` when nothing names a console (vmrun has no display; the
/// serial port is the console).
pub fn cmdline(entry: &str, append: Option<&str>, serial_console: bool) -> String {
    let mut c = entry.trim().to_string();
    if let Some(a) = append.map(str::trim).filter(|a| !a.is_empty()) {
        if !c.is_empty() {
            c.push(' ');
        }
        c.push_str(a);
    }
    if serial_console && !c.split_whitespace().any(|w| w.starts_with("console=")) {
        if !c.is_empty() {
            c.push(' ');
        }
        c.push_str("console=ttyS0");
    }
    c
}

/// `--print-boot`: what would be booted, on stdout.
pub fn print(
    path: &Path,
    format: image::Format,
    e: &BootEntry,
    cmdline: &str,
    output: Output,
) -> anyhow::Result<()> {
    let p = &e.partition;
    match output {
        Output::Json => {
            let mut v = serde_json::to_value(e)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("image".into(), path.display().to_string().into());
                o.insert("format".into(), format.name().into());
                o.insert("kernel_size".into(), e.kernel.len().into());
                o.insert(
                    "initrd_size".into(),
                    e.initrd.as_ref().map(Vec::len).unwrap_or(0).into(),
                );
                o.insert("entry_cmdline".into(), e.cmdline.clone().into());
                o.insert("cmdline".into(), cmdline.into());
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Human => {
            println!("image:     {} ({})", path.display(), format.name());
            println!(
                "partition: {} ({}, {}, UUID={}, PARTUUID={})",
                p.number,
                match p.table {
                    disk::TableKind::Gpt => "gpt",
                    disk::TableKind::Mbr => "mbr",
                },
                p.fs,
                p.uuid,
                p.partuuid
            );
            match &e.config {
                Some(c) => println!("config:    {} {c}", e.method),
                None => println!("config:    none (newest /boot/vmlinuz-*)"),
            }
            println!("entry:     {}", e.title);
            println!(
                "kernel:    {} ({}, {} bytes)",
                e.kernel_path,
                e.kernel_format,
                e.kernel.len()
            );
            match &e.initrd {
                Some(d) => println!(
                    "initrd:    {} ({} bytes)",
                    e.initrd_paths.join(" + "),
                    d.len()
                ),
                None => println!("initrd:    none"),
            }
            println!("cmdline:   {cmdline}");
            for l in &e.looked_at {
                println!("note:      {l}");
            }
        }
    }
    Ok(())
}
