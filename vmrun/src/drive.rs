//! `-drive`, `-hda`, `-snapshot` and `-device`: QEMU's spelling, turned into
//! opened images for the virtio-blk devices (see docs/disks.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vcore::devices::virtio::blk::CacheMode;
use vcore::devices::virtio::DiskSpec;
use vcore::image::{self, BlockDevice, Format, OpenOptions};

/// One `-drive` as parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    /// The option text, for messages (`-drive file=...`).
    pub spec: String,
    pub file: PathBuf,
    pub format: Option<Format>,
    /// `if=none`: attached only by `-device virtio-blk-pci,drive=ID`.
    pub if_none: bool,
    pub cache: CacheMode,
    pub read_only: bool,
    pub discard: bool,
    pub serial: String,
    pub id: Option<String>,
    pub snapshot: bool,
}

fn on_off(opt: &str, k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!(
            "{opt}: Parameter '{k}' expects 'on' or 'off', not '{v}'"
        )),
    }
}

/// Parse a `-drive` value (QEMU's key=value list with `,,` escaping).
pub fn parse_drive(s: &str) -> Result<Drive, String> {
    let opt = format!("-drive {s}");
    let (first, kv) = vcore::qemuopts::split(s);
    let mut file = first.filter(|f| !f.is_empty()).map(PathBuf::from);
    let mut d = Drive {
        spec: opt.clone(),
        file: PathBuf::new(),
        format: None,
        if_none: false,
        cache: CacheMode::Writeback,
        read_only: false,
        discard: false,
        serial: String::new(),
        id: None,
        snapshot: false,
    };
    let mut aio = "threads".to_string();
    for (k, v) in kv {
        match k.as_str() {
            "file" => file = Some(PathBuf::from(v)),
            "format" => {
                d.format = Some(Format::from_name(&v).ok_or_else(|| {
                    format!("{opt}: Unknown driver '{v}' (vmrun reads raw and qcow2)")
                })?)
            }
            "if" => match v.as_str() {
                "virtio" => {}
                "none" => d.if_none = true,
                other => {
                    return Err(format!(
                        "{opt}: if={other} is not supported, use if=virtio \
                         (vmrun's disks are virtio-blk PCI devices)"
                    ))
                }
            },
            "cache" => {
                d.cache = CacheMode::from_name(&v)
                    .ok_or_else(|| format!("{opt}: invalid cache option"))?
            }
            "aio" => match v.as_str() {
                "threads" | "native" | "io_uring" => aio = v,
                _ => return Err(format!("{opt}: invalid aio option")),
            },
            "readonly" => d.read_only = on_off(&opt, &k, &v)?,
            "snapshot" => d.snapshot = on_off(&opt, &k, &v)?,
            "discard" => {
                d.discard = match v.as_str() {
                    "unmap" | "on" => true,
                    "ignore" | "off" => false,
                    _ => return Err(format!("{opt}: Invalid discard option")),
                }
            }
            "serial" => d.serial = v,
            "id" => {
                if v.is_empty()
                    || !v.starts_with(|c: char| c.is_ascii_alphabetic())
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
                {
                    return Err(format!(
                        "{opt}: Parameter 'id' expects an identifier (a letter, then letters, \
                         digits, '-', '.', '_')"
                    ));
                }
                d.id = Some(v)
            }
            "media" if v == "disk" => {}
            "index" | "werror" | "rerror" => {}
            other => {
                return Err(format!(
                    "{opt}: Invalid parameter '{other}' (vmrun knows file, format, if, cache, \
                     aio, readonly, discard, serial, id, snapshot)"
                ))
            }
        }
    }
    d.file = file.ok_or_else(|| format!("{opt}: a file= is required"))?;
    if aio == "native" && !d.cache.direct() {
        return Err(format!(
            "{opt}: aio=native was specified, but it requires cache.direct=on, which was not specified."
        ));
    }
    Ok(d)
}

/// An image opened for a guest.
pub struct Opened {
    pub spec: DiskSpec,
}

/// Open the image of a drive (taking QEMU's locks). With `snapshot`, the
/// image is opened read-only below a temporary qcow2 overlay that takes the
/// guest's writes and is deleted when vmrun exits.
pub fn open(d: &Drive, id: String, snapshot: bool) -> Result<Opened, String> {
    let opt = &d.spec;
    let format = match d.format {
        Some(f) => f,
        None => {
            let f = image::probe(&d.file).map_err(|e| format!("{opt}: {e}"))?;
            if f == Format::Raw {
                eprintln!(
                    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
                     Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                     Specify the 'raw' format explicitly to remove the restrictions.",
                    d.file.display()
                );
            }
            f
        }
    };
    let snapshot = (snapshot || d.snapshot) && !d.read_only;
    let oo = OpenOptions {
        format: Some(format),
        read_only: d.read_only,
        cache_direct: d.cache.direct(),
        ..Default::default()
    };
    let disk: Box<dyn BlockDevice> = if snapshot {
        // The overlay and its backing use the page cache (see docs/disks.md).
        let oo = OpenOptions {
            cache_direct: false,
            ..oo.clone()
        };
        open_overlay(&d.file, format, &oo).map_err(|e| format!("{opt}: {e}"))?
    } else if d.cache.direct() {
        image::direct::open_direct(&d.file, &oo).map_err(|e| format!("{opt}: {e}"))?
    } else {
        image::open(&d.file, &oo).map_err(|e| format!("{opt}: {e}"))?
    };
    Ok(Opened {
        spec: DiskSpec {
            id,
            disk: Arc::from(disk),
            serial: d.serial.clone(),
            cache: d.cache,
            discard: d.discard,
            restrict_block0: d.format.is_none() && format == Format::Raw,
        },
    })
}

/// A temporary qcow2 overlay over `file` (QEMU's `-snapshot`), in $TMPDIR
/// or /var/tmp, unlinked once open.
fn open_overlay(
    file: &Path,
    format: Format,
    oo: &OpenOptions,
) -> Result<Box<dyn BlockDevice>, String> {
    let base = image::open(
        file,
        &OpenOptions {
            read_only: true,
            ..oo.clone()
        },
    )
    .map_err(|e| e.to_string())?;
    let size = base.size();
    drop(base);
    let abs = std::fs::canonicalize(file)
        .map_err(|e| format!("Could not open '{}': {e}", file.display()))?;
    let dir = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let tmp = tempfile::Builder::new()
        .prefix("vl.")
        .tempfile_in(&dir)
        .map_err(|e| {
            format!(
                "could not create a snapshot overlay in {}: {e}",
                dir.display()
            )
        })?;
    let path = tmp.path().to_path_buf();
    let co = image::qcow2::create::CreateOptions {
        size,
        backing_file: Some(abs.display().to_string()),
        backing_format: Some(format.name().to_string()),
        ..Default::default()
    };
    image::qcow2::create::create_in(tmp.as_file(), &co)
        .map_err(|e| format!("could not create a snapshot overlay: {e}"))?;
    let dev = image::open(
        &path,
        &OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            cache_direct: false,
            ..oo.clone()
        },
    )
    .map_err(|e| e.to_string())?;
    drop(tmp); // unlinks the overlay; the open device keeps it alive
    Ok(dev)
}

/// What `-device` asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Devices {
    pub rng: bool,
    /// `virtio-blk-pci,drive=ID[,serial=S]`: drives with `if=none` to attach.
    pub blk: Vec<(String, Option<String>)>,
}

/// Parse the `-device` options vmrun knows.
pub fn parse_devices(list: &[String]) -> Result<Devices, String> {
    let mut out = Devices::default();
    for s in list {
        let (first, kv) = vcore::qemuopts::split(s);
        let driver = first.unwrap_or_default();
        match driver.as_str() {
            // NICs and passthrough: parsed by net.rs.
            "virtio-net-pci" | "virtio-net" | "vfio-pci" => {}
            "virtio-rng-pci" | "virtio-rng" => {
                if let Some((k, _)) = kv.iter().find(|(k, _)| k != "id") {
                    return Err(format!("-device {s}: Property '{driver}.{k}' not found"));
                }
                out.rng = true;
            }
            "virtio-blk-pci" | "virtio-blk" => {
                let mut drive = None;
                let mut serial = None;
                for (k, v) in kv {
                    match k.as_str() {
                        "drive" => drive = Some(v),
                        "serial" => serial = Some(v),
                        // Read by the disk boot (diskboot.rs).
                        "id" | "bootindex" => {}
                        other => {
                            return Err(format!(
                                "-device {s}: Property '{driver}.{other}' not found"
                            ))
                        }
                    }
                }
                let drive = drive.ok_or_else(|| format!("-device {s}: drive property not set"))?;
                out.blk.push((drive, serial));
            }
            _ => {
                return Err(format!(
                    "-device {s}: device '{driver}' is not supported (vmrun has virtio-rng-pci, \
                     virtio-blk-pci,drive=ID and virtio-net-pci,netdev=ID; give disks with -drive)"
                ))
            }
        }
    }
    Ok(out)
}

/// Open every disk: `-hda`, then the `-drive`s in order (if=none ones only
/// when a `-device virtio-blk-pci,drive=ID` names them).
pub fn open_all(
    hda: Option<&Path>,
    drives: &[String],
    devices: &Devices,
    snapshot: bool,
) -> Result<Vec<Opened>, DriveError> {
    let mut parsed = Vec::new();
    if let Some(h) = hda {
        let mut d = parse_drive("file=x").map_err(DriveError::Usage)?;
        d.file = h.to_path_buf();
        d.spec = format!("-hda {}", h.display());
        parsed.push(d);
    }
    for s in drives {
        parsed.push(parse_drive(s).map_err(DriveError::Usage)?);
    }
    for (drive, serial) in &devices.blk {
        let Some(d) = parsed
            .iter_mut()
            .find(|d| d.id.as_deref() == Some(drive.as_str()))
        else {
            return Err(DriveError::Usage(format!(
                "-device virtio-blk-pci,drive={drive}: Property 'virtio-blk-pci.drive' can't find value '{drive}'"
            )));
        };
        d.if_none = false;
        if let Some(s) = serial {
            d.serial = s.clone();
        }
    }
    let mut out: Vec<Opened> = Vec::new();
    let mut used_ids: Vec<String> = parsed.iter().filter_map(|d| d.id.clone()).collect();
    let mut n = 0;
    for d in parsed.iter().filter(|d| !d.if_none) {
        let id = match &d.id {
            Some(i) => i.clone(),
            None => loop {
                let cand = format!("blk{n}");
                n += 1;
                if !used_ids.contains(&cand) {
                    used_ids.push(cand.clone());
                    break cand;
                }
            },
        };
        if out.iter().any(|o| o.spec.id == id) {
            return Err(DriveError::Usage(format!(
                "{}: Duplicate ID '{id}' for drive",
                d.spec
            )));
        }
        out.push(open(d, id, snapshot).map_err(DriveError::Open)?);
    }
    Ok(out)
}

/// A usage error (exit 2) or an image that would not open (exit 1).
#[derive(Debug)]
pub enum DriveError {
    Usage(String),
    Open(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_drive_options() {
        let d = parse_drive(
            "file=a,,b.qcow2,format=qcow2,if=virtio,cache=none,aio=native,readonly=on,\
             discard=unmap,serial=S1,id=d0",
        )
        .unwrap();
        assert_eq!(d.file, PathBuf::from("a,b.qcow2"));
        assert_eq!(d.format, Some(Format::Qcow2));
        assert_eq!(d.cache, CacheMode::None);
        assert!(d.read_only && d.discard);
        assert_eq!((d.serial.as_str(), d.id.as_deref()), ("S1", Some("d0")));
        let e = parse_drive("file=x,if=ide").unwrap_err();
        assert!(e.contains("if=ide is not supported, use if=virtio"), "{e}");
        let e = parse_drive("file=x,aio=native").unwrap_err();
        assert!(e.ends_with(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
        ));
        assert!(parse_drive("file=x,cache=directsync,aio=native").is_ok());
        assert!(parse_drive("file=x,cache=bogus")
            .unwrap_err()
            .ends_with("invalid cache option"));
        assert!(parse_drive("file=x,format=vmdk")
            .unwrap_err()
            .contains("Unknown driver 'vmdk'"));
        assert!(parse_drive("file=x,bogus=1")
            .unwrap_err()
            .contains("Invalid parameter 'bogus'"));
        assert!(parse_drive("if=virtio")
            .unwrap_err()
            .contains("file= is required"));
        assert!(parse_drive("file=x,readonly=maybe").is_err());
        for m in ["writeback", "none", "writethrough", "directsync", "unsafe"] {
            assert!(parse_drive(&format!("file=x,cache={m}")).is_ok());
        }
    }

    #[test]
    fn parses_devices() {
        let d =
            parse_devices(&["virtio-rng-pci".into(), "virtio-blk-pci,drive=d1".into()]).unwrap();
        assert!(d.rng);
        assert_eq!(d.blk, vec![("d1".to_string(), None)]);
        assert!(parse_devices(&["e1000".into()])
            .unwrap_err()
            .contains("not supported"));
    }
}
