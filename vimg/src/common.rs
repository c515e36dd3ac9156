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

/// Parse a `-o` option list (QEMU's rules: [`vcore::qemuopts::pairs`]).
pub fn parse_opts(s: &str) -> Vec<(String, String)> {
    vcore::qemuopts::pairs(s)
}

/// qemu-img's check of each `-o` argument (`is_valid_option_list`): not
/// empty, not starting with a comma, not ending with an odd number of them.
pub fn check_option_lists(lists: &[String]) -> R<()> {
    for s in lists {
        let trailing = s.len() - s.trim_end_matches(',').len();
        if s.is_empty() || s.starts_with(',') || trailing % 2 == 1 {
            return Err(fail(format!("Invalid option list: {s}")));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn option_lists_parse_like_qemu() {
        assert_eq!(
            parse_opts("cluster_size=4k,lazy_refcounts,backing_file=a,,b.img,nofoo"),
            kv(&[
                ("cluster_size", "4k"),
                ("lazy_refcounts", "on"),
                ("backing_file", "a,b.img"),
                ("foo", "off")
            ])
        );
        // No escapes in names: `a,,b=1` is the flag `a`, an empty flag, b=1.
        assert_eq!(
            parse_opts("a,,b=1"),
            kv(&[("a", "on"), ("", "on"), ("b", "1")])
        );
        assert_eq!(parse_opts("=on"), kv(&[("", "on")]));
        assert_eq!(parse_opts("x=,y"), kv(&[("x", ""), ("y", "on")]));
        assert!(parse_opts("").is_empty());
    }

    #[test]
    fn option_list_validity_like_qemu_img() {
        for ok in ["a=1", "a=1,,", "a=x,,,,", "lazy_refcounts"] {
            assert!(check_option_lists(&[ok.to_string()]).is_ok(), "{ok}");
        }
        for bad in ["", ",a=1", "a=1,", "a=1,,,", ",,"] {
            let e = check_option_lists(&["a=1".to_string(), bad.to_string()]).unwrap_err();
            assert_eq!(
                e.msg.as_deref(),
                Some(format!("Invalid option list: {bad}").as_str())
            );
        }
    }
}
