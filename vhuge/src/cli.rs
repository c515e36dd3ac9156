//! Command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use vcore::units::{self, Suffix};

use crate::{mount, persist, plan, pool, status};

const EXAMPLES: &str = "\
Examples:
  vhuge status                     pools, nodes, mounts, who holds pages
  vhuge status --json              the same for scripts
  vhuge set 1024                   default-size (2 MiB) pool to 1024 pages
  vhuge set --size 1G 4            four 1 GiB pages
  vhuge set +512 --compact         add 512 pages, compact memory if short
  vhuge set 8G                     enough default-size pages for 8 GiB
  vhuge set --node 1 -- -64        remove 64 pages from node 1
  vhuge mount                      hugetlbfs on /dev/hugepages
  vhuge mount /mnt/huge1g --size 1G --mode 0770 --gid kvm
  vhuge plan --mem 4G --guests 2   pages needed and the `vhuge set` line
  vhuge verify --mem 4G            exit 0 only if a 4 GiB guest fits now
  vhuge persist --dry-run          sysctl.d and fstab lines for this setup";

/// vhuge: hugepage pools and hugetlbfs mounts.
#[derive(Debug, Parser)]
#[command(
    name = "vhuge",
    version,
    about = "Hugepage pools and hugetlbfs mounts: status, set, mount, plan, verify, persist",
    after_help = EXAMPLES,
    propagate_version = true
)]
pub struct Cli {
    /// Read and write /proc, /sys and /etc under DIR instead of / (fixture trees, tests).
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show page sizes, every hugepage pool (hugeadm --pool-list columns plus free,
    /// reserved, surplus, overcommit), /proc/meminfo lines, NUMA nodes, hugetlbfs
    /// mounts and the processes that hold hugetlbfs memory.
    #[command(
        after_help = "Examples:\n  vhuge status\n  vhuge status --json | jq '.pools[] | select(.size == 2097152) .free'"
    )]
    Status {
        /// Print JSON (documented in docs/vhuge.md).
        #[arg(long)]
        json: bool,
    },
    /// Resize a hugepage pool through sysfs, read it back and explain a shortfall.
    #[command(
        after_help = "Examples:\n  vhuge set 1024\n  vhuge set --size 1G 4\n  vhuge set +512 --compact\n  vhuge set 8G\n  vhuge set --node 0 -- -64\n  vhuge set --overcommit 256"
    )]
    Set(SetArgs),
    /// Mount hugetlbfs (default /dev/hugepages); succeeds if already mounted alike.
    #[command(
        after_help = "Examples:\n  vhuge mount\n  vhuge mount /mnt/huge1g --size 1G\n  vhuge mount /srv/huge --mode 0770 --gid kvm --max-size 8G"
    )]
    Mount(MountArgs),
    /// Unmount a hugetlbfs mount (refuses other file systems).
    #[command(after_help = "Examples:\n  vhuge umount /mnt/huge1g")]
    Umount {
        /// Mount point.
        dir: PathBuf,
    },
    /// Pages needed for guests of a given size, whether the pool holds them now,
    /// and the `vhuge set` line to get there.
    #[command(
        after_help = "Examples:\n  vhuge plan --mem 4G\n  vhuge plan --mem 1.5G --size 1G --guests 3\n  vhuge plan --mem 4096 --json"
    )]
    Plan(PlanArgs),
    /// Exit 0 only when a guest of --mem can be backed by hugepages right now.
    #[command(
        after_help = "Examples:\n  vhuge verify --mem 4G\n  vhuge verify --mem 16G --path /mnt/huge1g"
    )]
    Verify(VerifyArgs),
    /// Print (--dry-run) or write the sysctl.d file and fstab line or mount unit that
    /// make the current pools and mounts survive a reboot.
    #[command(after_help = "Examples:\n  vhuge persist --dry-run\n  vhuge persist")]
    Persist {
        /// Print the files instead of writing them.
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
}

/// `vhuge set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// Page size (2M, 1G; QEMU units); default: the default hugepage size.
    #[arg(long, short = 's', value_name = "SIZE", value_parser = parse_page_size)]
    pub size: Option<u64>,
    /// Resize the pool of one NUMA node only.
    #[arg(long, value_name = "N")]
    pub node: Option<u32>,
    /// Write /proc/sys/vm/compact_memory and retry when the kernel allocates fewer pages.
    #[arg(long)]
    pub compact: bool,
    /// Also set nr_overcommit_hugepages (surplus pages allowed on demand).
    #[arg(long, value_name = "N")]
    pub overcommit: Option<u64>,
    /// COUNT pages, +N / -N pages, or a SIZE (8G, +1G) converted to pages, rounded up.
    #[arg(value_name = "COUNT|+N|-N|SIZE", allow_hyphen_values = true, value_parser = parse_amount)]
    pub amount: Option<pool::Amount>,
}

/// `vhuge mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Mount point (created if missing).
    #[arg(default_value = "/dev/hugepages")]
    pub dir: PathBuf,
    /// Page size (2M, 1G); default: the default hugepage size.
    #[arg(long, short = 's', value_name = "SIZE", value_parser = parse_page_size)]
    pub size: Option<u64>,
    /// Permissions of the root directory, octal (hugetlbfs default 0755).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// Owner of the root directory (name or number).
    #[arg(long, value_name = "USER")]
    pub uid: Option<String>,
    /// Group of the root directory (name or number).
    #[arg(long, value_name = "GROUP")]
    pub gid: Option<String>,
    /// Pages reserved for this mount at mount time (min_size=; SIZE or N%).
    #[arg(long, value_name = "SIZE", value_parser = parse_mount_size)]
    pub min_size: Option<String>,
    /// Most memory this mount may use (size=; SIZE or N% of the pool).
    #[arg(long, value_name = "SIZE", value_parser = parse_mount_size)]
    pub max_size: Option<String>,
}

/// `vhuge plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Guest memory, as for -m (bare number = MiB; 4G, 1.5G).
    #[arg(long, value_name = "SIZE", value_parser = parse_mem)]
    pub mem: u64,
    /// Page size (2M, 1G); default: the default hugepage size.
    #[arg(long, short = 's', value_name = "SIZE", value_parser = parse_page_size)]
    pub size: Option<u64>,
    /// Number of guests of that size.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub guests: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vhuge verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Guest memory, as for -m (bare number = MiB; 4G, 1.5G).
    #[arg(long, value_name = "SIZE", value_parser = parse_mem)]
    pub mem: u64,
    /// The hugetlbfs directory the guest will use (-mem-path); default: a mount
    /// with --size pages (or the default size).
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// Page size when no --path is given.
    #[arg(long, short = 's', value_name = "SIZE", value_parser = parse_page_size)]
    pub size: Option<u64>,
}

fn parse_page_size(s: &str) -> Result<u64, String> {
    let v = units::parse_size(s, Suffix::B).map_err(|e| e.to_string())?;
    if !v.is_power_of_two() || v < 4096 {
        return Err(format!(
            "'{s}' is not a hugepage size: use a power of two such as 2M or 1G"
        ));
    }
    Ok(v)
}

fn parse_mem(s: &str) -> Result<u64, String> {
    let v = units::parse_mem_size(s).map_err(|e| e.to_string())?;
    if v == 0 {
        return Err("guest memory must be larger than 0".to_string());
    }
    Ok(v)
}

fn parse_amount(s: &str) -> Result<pool::Amount, String> {
    pool::Amount::parse(s)
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s, 8)
        .map_err(|_| format!("'{s}' is not an octal mode such as 0755"))?;
    if m > 0o7777 {
        return Err(format!("'{s}' is not an octal mode such as 0755"));
    }
    Ok(m)
}

fn parse_mount_size(s: &str) -> Result<String, String> {
    if let Some(p) = s.strip_suffix('%') {
        return match p.parse::<u64>() {
            Ok(_) => Ok(s.to_string()),
            Err(_) => Err(format!("'{s}' is not a size or a percentage such as 50%")),
        };
    }
    units::parse_size(s, Suffix::B)
        .map(|v| v.to_string())
        .map_err(|e| e.to_string())
}

/// Run the command line; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return code;
        }
    };
    let root = cli.root.as_path();
    let res = match cli.command {
        Command::Status { json } => status::run(root, json),
        Command::Set(a) => pool::run(root, &a),
        Command::Mount(a) => mount::run_mount(root, &a),
        Command::Umount { dir } => mount::run_umount(root, &dir),
        Command::Plan(a) => plan::run_plan(root, &a),
        Command::Verify(a) => plan::run_verify(root, &a),
        Command::Persist { dry_run } => persist::run(root, dry_run),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return 0;
                }
            }
            eprintln!("vhuge: {e:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn value_parsers() {
        assert_eq!(parse_page_size("2M"), Ok(2 << 20));
        assert_eq!(parse_page_size("1g"), Ok(1 << 30));
        assert!(parse_page_size("3M").is_err());
        assert!(parse_page_size("1KiB").is_err());
        assert_eq!(parse_mem("4096"), Ok(4 << 30));
        assert_eq!(parse_mem("1.5G"), Ok(1536 << 20));
        assert!(parse_mem("0").is_err());
        assert_eq!(parse_mode("0770"), Ok(0o770));
        assert!(parse_mode("0999").is_err());
        assert_eq!(parse_mount_size("50%"), Ok("50%".to_string()));
        assert_eq!(parse_mount_size("1G"), Ok("1073741824".to_string()));
        assert!(parse_mount_size("x%").is_err());
    }

    #[test]
    fn set_accepts_negative_amount() {
        let c = Cli::try_parse_from(["vhuge", "set", "-16"]).unwrap();
        match c.command {
            Command::Set(a) => assert_eq!(
                a.amount,
                Some(pool::Amount::Remove(pool::Quantity::Pages(16)))
            ),
            _ => panic!(),
        }
        assert!(Cli::try_parse_from(["vhuge", "set", "--bogus"]).is_err());
    }
}
