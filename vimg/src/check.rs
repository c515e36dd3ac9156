//! `vimg check [-r leaks|all]`: qemu-img's counts, messages and exit codes
//! (0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 no checks).

use crate::common::{fail, fail_code, open_error_text, Failure, R};
use crate::qjson::{pretty, J};
use std::path::Path;
use vcore::image::qcow2::check::{self as qcheck, CheckResult, Fix};
use vcore::image::{self, Format, OpenOptions};

fn json(file: &str, r: &CheckResult) -> J {
    let mut o = J::obj()
        .with("filename", J::s(file))
        .with("format", J::s("qcow2"))
        .with("check-errors", J::UInt(r.check_errors));
    let opt = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, v) in opt {
        if v != 0 {
            o.set(k, J::UInt(v));
        }
    }
    o
}

fn human(r: &CheckResult, out: &mut String) {
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions != 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks != 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors != 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64,
            r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
}

/// Run `check`. Returns the exit code.
pub fn run(
    file: &str,
    fmt: Option<&str>,
    repair: Option<&str>,
    json_out: bool,
    force_share: bool,
    quiet: bool,
) -> R<i32> {
    let fix = match repair {
        None => Fix::NONE,
        Some("leaks") => Fix::LEAKS,
        Some("all") => Fix::ALL,
        Some(o) => {
            return Err(fail(format!(
                "--repair (-r) expects 'leaks' or 'all' not '{o}'\nTry 'vimg check --help' for more info"
            )))
        }
    };
    let rw = fix != Fix::NONE;
    if rw && force_share {
        return Err(fail(format!(
            "Could not open '{file}': force-share=on can only be used with read-only images"
        )));
    }
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
        None => image::probe_file(&f).map_err(|e| fail(open_error_text(&e)))?,
    };
    if format == Format::Raw {
        return Err(fail_code(63, "This image format does not support checks"));
    }
    // Validate the header like an open would.
    vcore::image::qcow2::meta::Header::read(&f)
        .map_err(|m| fail(format!("Could not open '{file}': {m}")))?;
    let mut log = |s: &str| eprintln!("{s}");
    let mut r = match qcheck::check(&f, fix, &mut log) {
        Ok(r) => r,
        Err(m) => return Err(fail(format!("Check failed: {m}"))),
    };
    let mut out = String::new();
    if rw && (r.corruptions_fixed != 0 || r.leaks_fixed != 0) {
        let (lf, cf) = (r.leaks_fixed, r.corruptions_fixed);
        if !json_out {
            out.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {lf} leaked clusters\n    {cf} corruptions\n\nDouble checking the fixed image now...\n"
            ));
        }
        r = match qcheck::check(&f, Fix::NONE, &mut log) {
            Ok(r) => r,
            Err(m) => {
                if !quiet {
                    print!("{out}");
                }
                return Err(fail(format!("Check failed: {m}")));
            }
        };
        r.leaks_fixed = lf;
        r.corruptions_fixed = cf;
    }
    if json_out {
        out.push_str(&pretty(&json(file, &r)));
        out.push('\n');
    } else {
        human(&r, &mut out);
    }
    if !quiet || json_out {
        print!("{out}");
    }
    if r.check_errors != 0 {
        return Err(Failure {
            code: 1,
            msg: Some("Check failed".into()),
        });
    }
    Ok(if r.corruptions != 0 {
        2
    } else if r.leaks != 0 {
        3
    } else {
        0
    })
}
