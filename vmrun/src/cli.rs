//! vmrun's command line: QEMU spelling (`-smp 2 -m 512m -kernel ...`), with
//! clap underneath. Single-dash long options are rewritten to the double-dash
//! form clap understands, so `-smp` and `--smp` both work.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};

const EXAMPLES: &str = "\
Examples:
  # Boot a kernel and initrd with a serial console on this terminal:
  vmrun -smp 2 -m 512m -kernel vmlinuz -initrd initrd.img \\
        -append 'console=ttyS0 panic=-1' -nographic -no-reboot

  # Send the console to a file and run in the background of a script:
  vmrun -m 256m -kernel bzImage -append console=ttyS0 -serial file:boot.log -no-reboot &

  # Boot a Linux disk image (raw or qcow2) like qemu-kvm, and see what it boots:
  vmrun -smp 1 -m 512m -nographic disk.qcow2
  vmrun --print-boot disk.qcow2

  # Boot from a qcow2 disk with an entropy source:
  vmrun -m 256m -kernel bzImage -append 'console=ttyS0 root=/dev/vda rw' \\
        -drive file=disk.qcow2,if=virtio,cache=writeback -device virtio-rng-pci -nographic

  # A second disk read-only, and keep every image unchanged:
  vmrun -m 256m -kernel bzImage -append 'root=/dev/vda console=ttyS0' -hda root.img \\
        -drive file=data.raw,format=raw,readonly=on -snapshot -nographic

  # A NIC on bridge br0 (as root), address by DHCP:
  vmrun -m 256m -kernel bzImage -append 'console=ttyS0 ip=dhcp' -nographic \\
        -netdev bridge,id=n0,br=br0 -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:99

  # User-mode networking through passt (no root), host port 2222 to guest ssh:
  vmrun -m 256m -kernel bzImage -append 'console=ttyS0 ip=dhcp' -nographic \\
        -nic user,hostfwd=tcp::2222-:22

  # What can this host do?
  vmrun --check-host

  # In the background with monitors, then ask for the vCPU thread ids:
  vmrun -name web -smp 2 -m 512m -kernel bzImage -append console=ttyS0 \\
        -serial file:web.log -daemonize -pidfile web.pid \\
        -monitor unix:web.mon,server,nowait -qmp unix:web.qmp,server,nowait
  echo 'info cpus' | socat - UNIX-CONNECT:web.mon

  # Guest RAM on 2 MiB hugepages, allocated up front:
  vmrun -m 1G -mem-path /dev/hugepages -mem-prealloc -kernel bzImage -nographic

  # CPU models, and a model with a flag removed:
  vmrun -cpu help
  vmrun -cpu qemu64,-svm -kernel bzImage -nographic

Keys with -nographic: Ctrl-a c switches between console and monitor, Ctrl-a x\nquits, Ctrl-a h shows help, Ctrl-a Ctrl-a sends Ctrl-a.

Exit status: 0 when the guest powers off, or resets with -no-reboot, or on
SIGINT/SIGTERM; the guest's value written to port 0x501 (debug exit); 1 on
an error; 2 on bad usage.";

/// Where `--check-host` writes its report.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Human,
    Json,
}

/// Who unpacks a compressed kernel.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DecompressArg {
    /// vmrun, on the host (cached by content hash)
    Host,
    /// the kernel's own decompressor, in the guest
    Guest,
}

/// Boot a Linux guest on KVM with a qemu-kvm style command line.
#[derive(Parser, Debug)]
#[command(
    name = "vmrun",
    version,
    about = "Boot a Linux guest on KVM with a qemu-kvm style command line",
    long_about = "Boot a Linux guest on KVM with a qemu-kvm style command line.\n\n\
                  Options take one dash as in QEMU (-smp 2) or two (--smp 2).",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Name of the guest (also names the process)
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Number of vCPUs and their topology
    #[arg(long, value_name = "N[,sockets=S][,cores=C][,threads=T]")]
    pub smp: Option<String>,
    /// Guest RAM; a bare number is MiB (default 128M)
    #[arg(short = 'm', value_name = "SIZE")]
    pub mem: Option<String>,
    /// CPU model and flags; `-cpu help` lists the models
    #[arg(long, value_name = "MODEL[,+FLAG][,-FLAG]")]
    pub cpu: Option<String>,
    /// Linux kernel: bzImage or ELF vmlinux
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line
    #[arg(long, value_name = "CMDLINE", allow_hyphen_values = true)]
    pub append: Option<String>,
    /// No display: serial console on stdio, Ctrl-a escapes
    #[arg(long)]
    pub nographic: bool,
    /// Serial port backend
    #[arg(long, value_name = "stdio|file:PATH|null|none")]
    pub serial: Option<String>,
    /// Accepted for QEMU compatibility (vmrun always uses KVM)
    #[arg(long = "enable-kvm")]
    pub enable_kvm: bool,
    /// Accepted for QEMU compatibility; the only value is none
    #[arg(long, value_name = "none")]
    pub display: Option<String>,
    /// Exit instead of rebooting when the guest resets
    #[arg(long = "no-reboot")]
    pub no_reboot: bool,
    /// Who unpacks a bzImage's compressed kernel
    #[arg(long = "kernel-decompress", value_enum, default_value = "host")]
    pub kernel_decompress: DecompressArg,
    /// Build the VM, print the CPUID table KVM holds for each vCPU
    /// (KVM_GET_CPUID2) and exit without running the guest
    #[arg(long = "print-cpuid")]
    pub print_cpuid: bool,
    /// Report what this host offers for guests and exit
    #[arg(long = "check-host")]
    pub check_host: bool,
    /// Format of --check-host's report
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
    /// Print the guest's boot-time markers (port 0x80 writes) on exit
    #[arg(long = "boot-markers")]
    pub boot_markers: bool,
    /// Human monitor: stdio, none or unix:PATH,server,nowait
    #[arg(long, value_name = "CHARDEV")]
    pub monitor: Option<String>,
    /// QMP (JSON) monitor: unix:PATH,server,nowait
    #[arg(long, value_name = "CHARDEV")]
    pub qmp: Option<String>,
    /// Detach from the terminal once the guest runs
    #[arg(long)]
    pub daemonize: bool,
    /// Write the VMM's PID to FILE (locked; removed on exit)
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Back guest RAM with a file in DIR (hugetlbfs), mapped shared
    #[arg(long = "mem-path", value_name = "DIR|FILE")]
    pub mem_path: Option<PathBuf>,
    /// Touch every page of guest RAM before the guest starts
    #[arg(long = "mem-prealloc")]
    pub mem_prealloc: bool,
    /// memory-backend-memfd,id=ID,size=SIZE[,hugetlb=on][,hugetlbsize=2M][,prealloc=on]
    #[arg(long, value_name = "SPEC")]
    pub object: Vec<String>,
    /// Pin vCPU threads at start: 0=2,1=3 (host CPU lists, ranges allowed)
    #[arg(long = "vcpu-affinity", value_name = "N=CPUS,...")]
    pub vcpu_affinity: Option<String>,
    /// A disk: a virtio-blk PCI device over a raw or qcow2 image. Keys: file, format=raw|qcow2,
    /// if=virtio|none, cache=writeback|none|writethrough|directsync|unsafe,
    /// aio=threads|native|io_uring, readonly=on|off, discard=unmap|ignore, serial, id,
    /// snapshot=on|off (see docs/disks.md)
    #[arg(
        long,
        value_name = "file=PATH[,format=F][,cache=MODE][,readonly=on][,...]"
    )]
    pub drive: Vec<String>,
    /// A virtio disk from an image (like -drive file=PATH)
    #[arg(long, value_name = "PATH")]
    pub hda: Option<PathBuf>,
    /// Write to temporary overlays; the disk images stay unchanged
    #[arg(long)]
    pub snapshot: bool,
    /// A device: virtio-rng-pci, virtio-blk-pci,drive=ID for an if=none drive, or
    /// virtio-net-pci,netdev=ID[,mac=MAC]
    #[arg(long, value_name = "DRIVER[,prop=value...]")]
    pub device: Vec<String>,
    /// A network backend: tap,id=ID[,ifname=NAME][,script=PATH|no][,downscript=PATH|no],
    /// bridge,id=ID,br=BRIDGE, user,id=ID[,hostfwd=tcp::HOSTPORT-:GUESTPORT] (passt), or
    /// stream,id=ID,addr.type=unix,addr.path=SOCKET (see docs/networking.md)
    #[arg(long, value_name = "tap|bridge|user|stream,id=ID[,...]")]
    pub netdev: Vec<String>,
    /// A NIC and its backend in one: tap[,ifname=NAME], bridge,br=BRIDGE or user[,hostfwd=...],
    /// each with [,mac=MAC]
    #[arg(long, value_name = "tap|bridge|user[,...]")]
    pub nic: Vec<String>,
    /// Disk image (raw or qcow2) to boot from when no -kernel is given
    #[arg(value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Show what would be booted from the disk image (kernel, initrd, command line) and exit
    #[arg(long = "print-boot")]
    pub print_boot: bool,
    /// Firmware image: not supported yet (disk images boot without firmware; see docs/boot.md)
    #[arg(long, value_name = "FILE")]
    pub bios: Option<PathBuf>,
}

/// Rewrite QEMU-style single-dash long options (`-smp`) to `--smp`.
pub fn qemu_style(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let cmd = Cli::command();
    let longs: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let takes_value: Vec<String> = cmd
        .get_arguments()
        .filter(|a| a.get_action().takes_values())
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let mut out = Vec::new();
    let mut value_next = false;
    for (i, a) in args.into_iter().enumerate() {
        if i == 0 || value_next {
            value_next = false;
            out.push(a);
            continue;
        }
        let s = a.to_string_lossy().to_string();
        let mut rewritten = a.clone();
        if let Some(name) = s
            .strip_prefix('-')
            .filter(|n| !n.starts_with('-') && n.len() > 1)
        {
            let key = name.split('=').next().unwrap_or(name);
            if longs.iter().any(|l| l == key) {
                rewritten = OsString::from(format!("-{s}"));
                value_next = takes_value.iter().any(|l| l == key) && !name.contains('=');
            }
        } else if let Some(name) = s.strip_prefix("--") {
            value_next = takes_value.iter().any(|l| l == name);
        } else if s == "-m" {
            value_next = true;
        }
        out.push(rewritten);
    }
    out
}
