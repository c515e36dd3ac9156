//! Command line: qemu-img's commands and options (clap), dispatch, exit codes.

use crate::common::{Failure, R};
use clap::{Parser, Subcommand};

const EXAMPLES: &str = "Examples:
  vimg create -f qcow2 -o size=20G,preallocation=metadata disk.qcow2
  vimg info --output json disk.qcow2
  vimg resize disk.qcow2 +5G
  vimg check -r leaks disk.qcow2
  vimg convert -p -O raw disk.qcow2 disk.raw
  vimg map --output json disk.qcow2
  vimg compare a.qcow2 b.raw
  vimg snapshot -c before-upgrade disk.qcow2

Exit status: 0 success, 1 failure, 2 bad usage; check: 2 corruptions,
3 leaks only, 63 format without checks; compare: 1 images differ, 2 error.";

/// qemu-img compatible disk image tool for raw and qcow2.
#[derive(Parser, Debug)]
#[command(name = "vimg", version, about, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a new image: vimg create [-f fmt] [-o options] [-b backing -F fmt] [-u] [-q] FILE [SIZE]
    #[command(
        after_help = "Examples:\n  vimg create -f qcow2 disk.qcow2 20G\n  vimg create -f qcow2 -o cluster_size=2M,preallocation=metadata disk.qcow2 100G\n  vimg create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2"
    )]
    Create {
        /// Image format (raw or qcow2; default raw).
        #[arg(short = 'f')]
        fmt: Option<String>,
        /// Format options, comma separated (repeatable); `-o help` lists them.
        #[arg(short = 'o')]
        opts: Vec<String>,
        /// Backing file.
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format.
        #[arg(short = 'F')]
        backing_fmt: Option<String>,
        /// Do not open the backing file (size must be given).
        #[arg(short = 'u')]
        unsafe_backing: bool,
        /// Quiet: no `Formatting` line.
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file.
        file: String,
        /// Virtual size (k, M, G, T, P, E suffixes).
        size: Option<String>,
    },
    /// Show image information: vimg info [-f fmt] [--backing-chain] [-U] [--output human|json] FILE
    #[command(
        after_help = "Examples:\n  vimg info disk.qcow2\n  vimg info --backing-chain --output=json overlay.qcow2"
    )]
    Info {
        #[arg(short = 'f')]
        fmt: Option<String>,
        /// Show the whole backing chain.
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        /// Force sharing (read an image that is in use).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Output format: human or json.
        #[arg(long)]
        output: Option<String>,
        file: String,
    },
    /// Check a qcow2 image: vimg check [-f fmt] [-r leaks|all] [-U] [--output human|json] FILE
    #[command(
        after_help = "Examples:\n  vimg check disk.qcow2\n  vimg check -r all --output json disk.qcow2"
    )]
    Check {
        #[arg(short = 'f')]
        fmt: Option<String>,
        /// Repair: leaks or all.
        #[arg(short = 'r', long = "repair")]
        repair: Option<String>,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long)]
        output: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        /// Cache mode (accepted for compatibility).
        #[arg(short = 'T')]
        cache: Option<String>,
        file: String,
    },
    /// Change the virtual size: vimg resize [-f fmt] [--shrink] [--preallocation=mode] FILE [+|-]SIZE
    #[command(
        after_help = "Examples:\n  vimg resize disk.qcow2 +5G\n  vimg resize --shrink disk.qcow2 -- -1G"
    )]
    Resize {
        #[arg(short = 'f')]
        fmt: Option<String>,
        /// Preallocation for the new area (off, metadata, falloc, full).
        #[arg(long)]
        preallocation: Option<String>,
        /// Allow shrinking.
        #[arg(long)]
        shrink: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file and new size (absolute, +N or -N after `--`).
        #[arg(num_args = 0..)]
        args: Vec<String>,
    },
    /// Convert or copy an image: vimg convert [-p] [-c] [-f fmt] [-O fmt] [-o opts] [-B backing -F fmt] [-S n] [-t cache] [-n] SRC DST
    #[command(
        after_help = "Examples:\n  vimg convert -O raw disk.qcow2 disk.raw\n  vimg convert -p -c -O qcow2 disk.raw small.qcow2\n  vimg convert -t none -O raw disk.qcow2 /srv/disk.raw"
    )]
    Convert {
        #[arg(short = 'f')]
        fmt: Option<String>,
        /// Output format (default raw).
        #[arg(short = 'O')]
        out_fmt: Option<String>,
        #[arg(short = 'o')]
        opts: Vec<String>,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Compress the output (qcow2).
        #[arg(short = 'c')]
        compress: bool,
        /// Backing file of the output (keeps that layer).
        #[arg(short = 'B')]
        backing: Option<String>,
        /// Backing format of -B.
        #[arg(short = 'F')]
        backing_fmt: Option<String>,
        /// Zero run length that becomes a hole (0 = fully allocated).
        #[arg(short = 'S')]
        sparse: Option<String>,
        /// Do not create the target (it must exist).
        #[arg(short = 'n')]
        no_create: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Target cache mode: unsafe (default: no flush), writeback,
        /// writethrough (flush at the end), none, directsync (O_DIRECT
        /// writes, flush at the end).
        #[arg(short = 't', allow_hyphen_values = true)]
        cache: Option<String>,
        /// Source cache mode (checked, reads go through the page cache).
        #[arg(short = 'T', allow_hyphen_values = true)]
        src_cache: Option<String>,
        /// Allow out-of-order writes (accepted: vimg's writes are unordered).
        #[arg(short = 'W')]
        out_of_order: bool,
        /// Parallel requests, 1..16 (checked; vimg sizes its own threads).
        #[arg(short = 'm', allow_hyphen_values = true)]
        coroutines: Option<String>,
        /// With -n: the target already reads as zeroes (zero blocks are not written).
        #[arg(long = "target-is-zero")]
        target_is_zero: bool,
        /// Rate limit of the target writes, bytes per second (suffixes k, M, G, ...).
        #[arg(short = 'r', allow_hyphen_values = true)]
        rate_limit: Option<String>,
        /// Copy offloading: data extents are copied whole (copy_file_range),
        /// without zero detection; not with -c or -S.
        #[arg(short = 'C')]
        copy_range: bool,
        /// Go on after read errors: the sectors that cannot be read are
        /// written as zeroes, each with a warning (not with -C).
        #[arg(long = "salvage")]
        salvage: bool,
        /// Source image and target file.
        #[arg(num_args = 2..)]
        files: Vec<String>,
    },
    /// Show the allocation map: vimg map [-f fmt] [--output human|json] FILE
    #[command(
        after_help = "Examples:\n  vimg map disk.qcow2\n  vimg map --output=json disk.qcow2"
    )]
    Map {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long)]
        output: Option<String>,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        file: String,
    },
    /// Compare the contents of two images: vimg compare [-f fmt] [-F fmt] [-s] A B
    #[command(
        after_help = "Examples:\n  vimg compare a.qcow2 b.qcow2\n  vimg compare -s -f raw -F qcow2 a.raw b.qcow2"
    )]
    Compare {
        #[arg(short = 'f')]
        fmt1: Option<String>,
        #[arg(short = 'F')]
        fmt2: Option<String>,
        /// Strict: sizes must match too.
        #[arg(short = 's')]
        strict: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        file1: String,
        file2: String,
    },
    /// Manage internal snapshots: vimg snapshot [-l | -c NAME | -a NAME | -d NAME] FILE
    #[command(
        after_help = "Examples:\n  vimg snapshot -c before-upgrade disk.qcow2\n  vimg snapshot -l disk.qcow2\n  vimg snapshot -a before-upgrade disk.qcow2"
    )]
    Snapshot {
        #[arg(short = 'f')]
        fmt: Option<String>,
        /// List snapshots.
        #[arg(short = 'l')]
        list: bool,
        /// Create a snapshot.
        #[arg(short = 'c')]
        create: Option<String>,
        /// Apply (revert to) a snapshot.
        #[arg(short = 'a')]
        apply: Option<String>,
        /// Delete a snapshot.
        #[arg(short = 'd')]
        delete: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        file: String,
    },
    /// Change image options: vimg amend [-f fmt] -o compat=..,lazy_refcounts=..,refcount_bits=.. FILE
    #[command(
        after_help = "Examples:\n  vimg amend -o compat=1.1,lazy_refcounts=on disk.qcow2\n  vimg amend -o refcount_bits=64 disk.qcow2"
    )]
    Amend {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(short = 'o')]
        opts: Vec<String>,
        #[arg(short = 'q')]
        quiet: bool,
        file: Option<String>,
    },
    /// Space needed for an image: vimg measure [--output human|json] [-O fmt] [-o opts] (--size N | [-f fmt] FILE)
    #[command(
        after_help = "Examples:\n  vimg measure -O qcow2 --size 20G\n  vimg measure --output=json -O qcow2 disk.raw"
    )]
    Measure {
        #[arg(short = 'O')]
        out_fmt: Option<String>,
        #[arg(short = 'o')]
        opts: Vec<String>,
        /// Virtual size of a new image.
        #[arg(long)]
        size: Option<String>,
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long)]
        output: Option<String>,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        file: Option<String>,
    },
}

fn output_json(o: &Option<String>, cmd: &str) -> R<bool> {
    match o.as_deref() {
        None | Some("human") => Ok(false),
        Some("json") => Ok(true),
        Some(x) => Err(crate::common::fail(format!(
            "--output expects 'human' or 'json' not '{x}'\nTry 'vimg {cmd} --help' for more info"
        ))),
    }
}

fn dispatch(cmd: Cmd) -> R<i32> {
    match &cmd {
        Cmd::Create { opts, .. }
        | Cmd::Convert { opts, .. }
        | Cmd::Amend { opts, .. }
        | Cmd::Measure { opts, .. } => crate::common::check_option_lists(opts)?,
        _ => {}
    }
    match cmd {
        Cmd::Create {
            fmt,
            opts,
            backing,
            backing_fmt,
            unsafe_backing,
            quiet,
            file,
            size,
        } => crate::create::run(crate::create::CreateArgs {
            fmt,
            opts,
            backing,
            backing_fmt,
            unsafe_backing,
            quiet,
            file,
            size,
        })
        .map(|_| 0),
        Cmd::Info {
            fmt,
            backing_chain,
            force_share,
            output,
            file,
        } => {
            let json = output_json(&output, "info")?;
            crate::info::run(&file, fmt.as_deref(), backing_chain, force_share, json).map(|_| 0)
        }
        Cmd::Check {
            fmt,
            repair,
            force_share,
            output,
            quiet,
            cache: _,
            file,
        } => {
            let json = output_json(&output, "check")?;
            crate::check::run(
                &file,
                fmt.as_deref(),
                repair.as_deref(),
                json,
                force_share,
                quiet,
            )
        }
        Cmd::Resize {
            fmt,
            preallocation,
            shrink,
            quiet,
            args,
        } => {
            if args.len() != 2 {
                return Err(crate::common::fail(
                    "Expecting image file name and size\nTry 'vimg resize --help' for more info",
                ));
            }
            crate::resize::run(crate::resize::ResizeArgs {
                fmt,
                prealloc: preallocation,
                shrink,
                quiet,
                file: args[0].clone(),
                size: args[1].clone(),
            })
            .map(|_| 0)
        }
        Cmd::Convert {
            fmt,
            out_fmt,
            opts,
            progress,
            compress,
            backing,
            backing_fmt,
            sparse,
            no_create,
            quiet,
            force_share,
            cache,
            src_cache,
            out_of_order: _,
            coroutines,
            target_is_zero,
            rate_limit,
            copy_range,
            salvage,
            files,
        } => crate::convert::run(crate::convert::ConvertArgs {
            fmt,
            out_fmt,
            opts,
            progress: progress && !quiet,
            compress,
            backing,
            backing_fmt,
            sparse,
            no_create,
            force_share,
            cache,
            src_cache,
            coroutines,
            target_is_zero,
            rate_limit,
            copy_range,
            salvage: salvage.then_some(!quiet),
            files,
        })
        .map(|_| 0),
        Cmd::Map {
            fmt,
            output,
            force_share,
            file,
        } => {
            let json = output_json(&output, "map")?;
            crate::map::run(&file, fmt.as_deref(), json, force_share).map(|_| 0)
        }
        Cmd::Snapshot {
            fmt,
            list,
            create,
            apply,
            delete,
            quiet: _,
            force_share,
            file,
        } => {
            use crate::snapshot::Action;
            let n = list as usize
                + create.is_some() as usize
                + apply.is_some() as usize
                + delete.is_some() as usize;
            if n > 1 {
                return Err(crate::common::fail(
                    "Cannot mix '-l', '-a', '-c', '-d'\nTry 'vimg snapshot --help' for more info",
                ));
            }
            let action = if let Some(c) = create {
                Action::Create(c)
            } else if let Some(a) = apply {
                Action::Apply(a)
            } else if let Some(d) = delete {
                Action::Delete(d)
            } else {
                Action::List
            };
            crate::snapshot::run_snapshot(&file, fmt.as_deref(), action, force_share).map(|_| 0)
        }
        Cmd::Amend {
            fmt,
            opts,
            quiet,
            file,
        } => crate::snapshot::run_amend(file.as_deref(), fmt.as_deref(), &opts, quiet).map(|_| 0),
        Cmd::Measure {
            out_fmt,
            opts,
            size,
            fmt,
            output,
            force_share,
            file,
        } => {
            let json = output_json(&output, "measure")?;
            crate::snapshot::run_measure(crate::snapshot::MeasureArgs {
                out_fmt,
                opts,
                size,
                fmt,
                json,
                force_share,
                file,
            })
            .map(|_| 0)
        }
        Cmd::Compare {
            fmt1,
            fmt2,
            strict,
            progress: _,
            quiet,
            force_share,
            file1,
            file2,
        } => Ok(crate::compare::run(
            &file1,
            &file2,
            fmt1.as_deref(),
            fmt2.as_deref(),
            strict,
            quiet,
            force_share,
        )),
    }
}

/// Parse arguments, run, print errors; returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match dispatch(cli.cmd) {
        Ok(code) => code,
        Err(Failure { code, msg }) => {
            if let Some(m) = msg {
                eprintln!("vimg: {m}");
            }
            code
        }
    }
}
