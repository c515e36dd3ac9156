//! Shared helpers: failures with exit codes, opening images with
//! qemu-img's messages, `-o` option lists, sizes.

use vcore::image::qcow2::os_msg;
use vcore::image::Error;

/// A command failure: message for stderr (prefixed `vimg: `) and exit code.
#[derive(Debug)]
pub struct Failure {
    /// Exit status.
    pub code: i32,
    /// Message lines; `None` when already printed.
    pub msg: Option<String>,
}

/// Result of a command.
pub type R<T> = Result<T, Failure>;

/// Failure with exit code 1.
pub fn fail(msg: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        msg: Some(msg.into()),
    }
}

/// Failure with a chosen exit code.
pub fn fail_code(code: i32, msg: impl Into<String>) -> Failure {
    Failure {
        code,
        msg: Some(msg.into()),
    }
}

/// qemu-img's text for an open error.
pub fn open_error_text(e: &Error) -> String {
    match e {
        Error::Open { path, source } => {
            format!(
                "Could not open '{path}': Could not open '{path}': {}",
                os_msg(source)
            )
        }
        other => other.to_string(),
    }
}

/// Parse a QEMU option string `a=b,c=d` (`,,` is a literal comma).
pub fn parse_opts(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        if p.is_empty() {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => out.push((p.clone(), "on".to_string())),
        }
    }
    out
}

/// Parse an image size argument like qemu-img (exact value, no rounding).
pub fn parse_img_size(s: &str) -> R<u64> {
    vcore::units::parse_image_size(s).map_err(|e| fail(e.qemu_img_message("image size")))
}

/// QEMU bool option values.
pub fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

/// Human size like qemu-img.
pub fn hsize(v: u64) -> String {
    vcore::units::size_to_str(v)
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated_bytes(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// qemu-img's warning when a read-write open probed a raw image.
pub fn warn_probed_raw(file: &str) {
    eprintln!(
        "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
    );
}
