//! Command line: argument definitions, dispatch and exit codes.
//!
//! Exit codes: 0 success, 1 failure (including a pin that was rolled back),
//! 2 bad usage (unknown option, bad CPU list, bad assignment).

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{hostview, pin, plan, target};

const EXAMPLES: &str = "\
Examples:
  vpin list                          every VMM process on the host, one row per thread
  vpin list web --json               guest \"web\" (vmrun thread map or QEMU -name web)
  vpin list 2573 --qmp /run/web.qmp  QEMU vCPU thread ids from query-cpus-fast
  vpin pin web vcpu0=2 vcpu1=3 emulator=0-1
  vpin pin --pidfile /run/web.pid vcpus=2-3 io=1 --dry-run
  vpin pin 2573 --all 0-1            every thread of process 2573, like taskset -a
  vpin cpus                          online, isolated, nohz_full CPUs and who runs where
  vpin plan web                      propose vCPU pinning on the isolated CPUs
  vpin plan web --cpus 4-7 --apply";

/// taskset for guests: list a VM's vCPU, I/O and emulator threads and pin
/// them to host CPUs.
#[derive(Parser, Debug)]
#[command(name = "vpin", version, after_help = EXAMPLES, max_term_width = 100)]
pub struct Cli {
    /// Read /proc and /sys under DIR instead of / (for tests on fixture trees)
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        hide = true,
        default_value = "/"
    )]
    root: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List a guest's threads: PID, TID, NAME, ROLE, PSR, AFFINITY
    #[command(after_help = EXAMPLES)]
    List(ListArgs),
    /// Pin a guest's threads by role: vcpuN=LIST, vcpus=, emulator=, io=
    #[command(after_help = EXAMPLES)]
    Pin(PinArgs),
    /// Show host CPUs: online, isolated, nohz_full, isolcpus= and threads per CPU
    #[command(after_help = EXAMPLES)]
    Cpus(CpusArgs),
    /// Propose (or --apply) one vCPU per isolated CPU, emulator threads on the rest
    #[command(after_help = EXAMPLES)]
    Plan(PlanArgs),
}

/// How a guest is found and its threads identified.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// Read the VMM's PID from FILE (QEMU -pidfile, vmrun's pid file)
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Ask QEMU for vCPU and iothread thread ids over QMP (query-cpus-fast)
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// Treat the process as this VMM instead of detecting it
    #[arg(long, value_name = "VMM", value_parser = parse_vmm)]
    pub vmm: Option<vcore::host::threads::Vmm>,
}

fn parse_vmm(s: &str) -> Result<vcore::host::threads::Vmm, String> {
    vcore::host::threads::Vmm::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = vcore::host::threads::Vmm::ALL
            .iter()
            .map(|v| v.as_str())
            .collect();
        format!("unknown VMM \"{s}\" (known: {})", names.join(", "))
    })
}

#[derive(Args, Debug)]
struct ListArgs {
    /// A PID or a guest name; every VMM process when omitted
    #[arg(value_name = "TARGET")]
    target: Option<String>,
    #[command(flatten)]
    target_args: TargetArgs,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// Output style of `pin`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutput {
    /// taskset's lines: "pid N's current affinity list: L" / "... new ..."
    Taskset,
    /// A table with the old and new affinity of each thread
    Table,
    /// JSON
    Json,
}

#[derive(Args, Debug)]
struct PinArgs {
    /// TARGET (PID or guest name, omitted with --pidfile), then ROLE=CPULIST
    /// assignments: vcpuN, vcpus (every vCPU), emulator, io
    #[arg(value_name = "TARGET ROLE=CPULIST")]
    args: Vec<String>,
    /// Pin every thread of the process to CPULIST (roles given override it)
    #[arg(long, value_name = "CPULIST")]
    all: Option<String>,
    #[command(flatten)]
    target_args: TargetArgs,
    /// Show what would change, change nothing
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Output style
    #[arg(short, long, value_enum, default_value = "taskset")]
    output: PinOutput,
    /// Same as --output json
    #[arg(long)]
    json: bool,
    /// Same as --output table
    #[arg(long)]
    table: bool,
}

#[derive(Args, Debug)]
struct CpusArgs {
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// A PID or a guest name (omit with --pidfile)
    #[arg(value_name = "TARGET")]
    target: Option<String>,
    #[command(flatten)]
    target_args: TargetArgs,
    /// Put vCPUs on these CPUs instead of the isolated ones
    #[arg(long, value_name = "CPULIST")]
    cpus: Option<String>,
    /// Pin the threads as proposed
    #[arg(long)]
    apply: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// An error with its exit code.
#[derive(Debug)]
pub struct Failure {
    /// 1 for a failure, 2 for bad usage.
    pub code: i32,
    /// The message, without the `vpin: ` prefix.
    pub message: String,
}

impl Failure {
    /// A failure (exit 1).
    pub fn fail(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }

    /// Bad usage (exit 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::fail(format!("{e:#}"))
    }
}

/// The result of a command.
pub type Outcome = Result<(), Failure>;

/// Runs vpin with the process's arguments and returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("vpin: {}", f.message);
            }
            f.code
        }
    }
}

fn run(cli: Cli) -> Outcome {
    let root: &Path = &cli.root;
    match cli.command {
        Command::List(a) => {
            let guests = match &a.target {
                None if a.target_args.pidfile.is_none() && a.target_args.qmp.is_none() => {
                    target::all_guests(root, a.target_args.vmm)?
                }
                t => vec![target::resolve(root, t.as_deref(), &a.target_args)?],
            };
            hostview::print_list(&guests, a.json)
        }
        Command::Pin(a) => {
            // TARGET is omitted with --pidfile, and may be with --qmp.
            let implicit = a.args.is_empty()
                || a.target_args.pidfile.is_some()
                || (a.target_args.qmp.is_some() && a.args[0].contains('='));
            let (target, assignments) = if implicit {
                (None, &a.args[..])
            } else {
                (Some(a.args[0].as_str()), &a.args[1..])
            };
            let request = pin::Request::parse(assignments, a.all.as_deref())?;
            let guest = target::resolve(root, target, &a.target_args)?;
            let output = if a.json {
                PinOutput::Json
            } else if a.table {
                PinOutput::Table
            } else {
                a.output
            };
            pin::run(root, &guest, &request, a.dry_run, output)
        }
        Command::Cpus(a) => hostview::print_cpus(root, a.json),
        Command::Plan(a) => {
            let cpus = match &a.cpus {
                Some(s) => Some(
                    vcore::cpulist::CpuSet::parse_list(s)
                        .map_err(|e| Failure::usage(format!("--cpus {s}: {e} ({})", e.reason())))?,
                ),
                None => None,
            };
            let guest = target::resolve(root, a.target.as_deref(), &a.target_args)?;
            plan::run(root, &guest, cpus.as_ref(), a.apply, a.json)
        }
    }
}
