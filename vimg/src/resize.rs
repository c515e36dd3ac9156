//! `vimg resize [--shrink] [--preallocation=MODE] FILE [+|-]SIZE`.

use crate::common::{fail, open_error_text, Failure, R};
use std::path::Path;
use vcore::image::qcow2::create::Prealloc;
use vcore::image::qcow2::Qcow2Device;
use vcore::image::raw::RawDevice;
use vcore::image::{self, BlockDevice, Format, OpenOptions};

/// Arguments of `resize`.
pub struct ResizeArgs {
    pub fmt: Option<String>,
    pub prealloc: Option<String>,
    pub shrink: bool,
    pub quiet: bool,
    pub file: String,
    pub size: String,
}

/// Run `resize`.
pub fn run(a: ResizeArgs) -> R<()> {
    let (rel, num) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, &a.size[1..]),
        Some(b'-') => (-1i8, &a.size[1..]),
        _ => (0i8, a.size.as_str()),
    };
    let n = vcore::units::parse_size(num, vcore::units::Suffix::B)
        .map_err(|e| fail(e.qemu_option_message("size")))?;
    let prealloc = match &a.prealloc {
        None => None,
        Some(p) => Some(
            Prealloc::from_name(p)
                .ok_or_else(|| fail(format!("Invalid preallocation mode '{p}'")))?,
        ),
    };
    let format =
        match a.fmt.as_deref() {
            None => None,
            Some(s) => Some(Format::from_name(s).ok_or_else(|| {
                fail(format!("Could not open '{}': Unknown driver '{s}'", a.file))
            })?),
        };
    let opts = OpenOptions {
        format,
        read_only: false,
        ..Default::default()
    };
    let file =
        image::open_file(Path::new(&a.file), &opts).map_err(|e| fail(open_error_text(&e)))?;
    let format = match format {
        Some(f) => f,
        None => {
            let f = image::probe_file(&file).map_err(|e| fail(open_error_text(&e)))?;
            if f == Format::Raw {
                crate::common::warn_probed_raw(&a.file);
            }
            f
        }
    };
    let dev: Dev = match format {
        Format::Raw => {
            Dev::Raw(RawDevice::from_file(file, false).map_err(|e| fail(open_error_text(&e)))?)
        }
        Format::Qcow2 => {
            // Growing, and shrinking with --shrink: QEMU's own layout (its
            // allocator replayed), no imago needed.
            let h = vcore::image::qcow2::meta::Header::read(&file)
                .map_err(|m| fail(format!("Could not open '{}': {m}", a.file)))?;
            if h.corrupt() {
                return Err(fail(format!(
                    "Could not open '{}': qcow2: Image is corrupt; cannot be opened read/write",
                    a.file
                )));
            }
            let target = match rel {
                1 => (h.size as i128) + n as i128,
                -1 => (h.size as i128) - n as i128,
                _ => n as i128,
            };
            if target <= 0 {
                return Err(fail("New image size must be positive"));
            }
            if a.shrink
                && prealloc.is_none_or(|p| p == Prealloc::Off)
                && (0..h.size as i128).contains(&target)
                && target % 512 == 0
            {
                let shrunk = vcore::image::qcow2::resize::shrink(&file, target as u64)
                    .map_err(|m| fail(format!("Failed to resize image: {m}")))?;
                if shrunk {
                    if !a.quiet {
                        println!("Image resized.");
                    }
                    return Ok(());
                }
            }
            if target >= h.size as i128 && target <= i64::MAX as i128 {
                let grown = vcore::image::qcow2::resize::grow(
                    &file,
                    target as u64,
                    prealloc.unwrap_or(Prealloc::Off),
                )
                .map_err(|m| fail(format!("Failed to resize image: {m}")))?;
                if grown {
                    if !a.quiet {
                        println!("Image resized.");
                    }
                    return Ok(());
                }
            }
            Dev::Qcow2(
                Qcow2Device::open_file(Path::new(&a.file), file, &opts, 0)
                    .map_err(|e| fail(open_error_text(&e)))?,
            )
        }
    };
    let current = match &dev {
        Dev::Raw(r) => r.file().metadata().map(|m| m.len()).unwrap_or(0),
        Dev::Qcow2(q) => q.size(),
    } as i128;
    let total: i128 = match rel {
        1 => current + n as i128,
        -1 => current - n as i128,
        _ => n as i128,
    };
    if total <= 0 {
        return Err(fail("New image size must be positive"));
    }
    if total < current && !a.shrink {
        return Err(Failure {
            code: 1,
            msg: Some(
                "Use the --shrink option to perform a shrink operation.\nvimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there."
                    .into(),
            ),
        });
    }
    if total < current && prealloc.is_some_and(|p| p != Prealloc::Off) {
        return Err(fail("Preallocation can only be used for growing images"));
    }
    let total = total as u64;
    match dev {
        Dev::Raw(r) => {
            let p = prealloc.unwrap_or(Prealloc::Off);
            if p == Prealloc::Metadata {
                return Err(fail("Unsupported preallocation mode: metadata"));
            }
            let old = current as u64;
            r.truncate(total)
                .map_err(|e| fail(format!("Could not resize file: {e}")))?;
            if total > old {
                match p {
                    Prealloc::Falloc => {
                        vcore::image::raw::allocate(r.file(), old, total - old)
                            .map_err(|e| fail(format!("Could not resize file: {e}")))?;
                    }
                    Prealloc::Full => {
                        vcore::image::raw::write_zeros(r.file(), old, total - old)
                            .map_err(|e| fail(format!("Could not resize file: {e}")))?;
                    }
                    _ => {}
                }
            }
            r.flush().map_err(|e| fail(e.to_string()))?;
        }
        Dev::Qcow2(q) => {
            if total % 512 != 0 {
                return Err(fail("The new size must be a multiple of 512"));
            }
            let p = prealloc.unwrap_or(Prealloc::Off);
            q.resize(total, p.imago())
                .map_err(|e| fail(format!("Failed to resize image: {e}")))?;
        }
    }
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(())
}

#[allow(clippy::large_enum_variant)]
enum Dev {
    Raw(RawDevice),
    Qcow2(Qcow2Device),
}
