//! What vmrun does with its command line.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context};
use clap::Parser;
use vcore::boot::Decompress;
use vcore::cpuid::{CpuModel, CpuSpec, MODELS};
use vcore::vm::{pvm, Backing, SerialOut, Vm, VmConfig, VmExit};

use crate::cli::{qemu_style, Cli, DecompressArg, Output};
use crate::console;

/// A failure: bad usage (exit 2) or a runtime error (exit 1).
enum Failure {
    Usage(String),
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

/// Entry point; returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse_from(qemu_style(std::env::args_os())) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => {
            eprintln!("vmrun: {msg}");
            eprintln!("Try 'vmrun --help' for more information.");
            2
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("vmrun: {e:#}");
            1
        }
    }
}

fn set_process_name(name: &str) {
    let mut n: Vec<u8> = name.bytes().take(15).collect();
    n.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, n.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

fn run(cli: Cli) -> Result<i32, Failure> {
    if cli.check_host {
        let r = vcore::hostcheck::check(Path::new("/"));
        match cli.output {
            Output::Human => print!("{}", vcore::hostcheck::format(&r)),
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&r).map_err(|e| anyhow!(e))?
            ),
        }
        return Ok(if r.ok() { 0 } else { 1 });
    }
    let cpu = cli.cpu.clone().unwrap_or_else(|| "qemu64".into());
    if cpu == "help" || cpu == "?" {
        println!("Available CPUs:");
        for (name, desc) in MODELS {
            println!("  {name:<12} {desc}");
        }
        println!("\nRecognized CPUID flags:");
        let names: Vec<&str> = vcore::cpuid::FLAGS.iter().map(|f| f.name).collect();
        println!("  {}", names.join(" "));
        return Ok(0);
    }
    let cpu = CpuSpec::parse(&cpu).map_err(|e| Failure::Usage(format!("-cpu {cpu}: {e}")))?;
    CpuModel::by_name(&cpu.model, "", "")
        .map_err(|e| Failure::Usage(format!("-cpu {}: {e}", cpu.model)))?;
    if let Some(d) = &cli.display {
        if d != "none" {
            return Err(Failure::Usage(format!(
                "-display {d}: vmrun has no display; use -display none or -nographic"
            )));
        }
    }
    if let Some(b) = &cli.bios {
        return Err(Failure::Runtime(anyhow!(
            "-bios {}: firmware boot is not supported yet; vmrun boots a Linux disk image \
             without firmware (give the image without -bios) or a kernel with -kernel \
             (see docs/boot.md)",
            b.display()
        )));
    }
    // The kernel: -kernel, or the one the boot disk's configuration names.
    let serial_console = !matches!(cli.serial.as_deref(), Some("null" | "none"));
    let mut _staged = None;
    let boot_disk =
        crate::diskboot::boot_disk(cli.image.as_deref(), cli.hda.as_deref(), &cli.drive)
            .map_err(Failure::Usage)?;
    let (kernel, initrd, cmdline) = match (&cli.kernel, &boot_disk) {
        (Some(k), _) if !cli.print_boot => (
            k.clone(),
            cli.initrd.clone(),
            cli.append.clone().unwrap_or_default(),
        ),
        (Some(_), _) => {
            return Err(Failure::Usage(
                "--print-boot shows what vmrun would boot from a disk image; give IMAGE \
                 without -kernel"
                    .into(),
            ))
        }
        (None, Some((image, image_format))) => {
            if let Some(i) = &cli.initrd {
                return Err(Failure::Usage(format!(
                    "-initrd {}: an initrd needs -kernel (the disk's boot entry names its own)",
                    i.display()
                )));
            }
            let (entry, format) = crate::diskboot::find(image, *image_format)?;
            let cmdline =
                crate::diskboot::cmdline(&entry.cmdline, cli.append.as_deref(), serial_console);
            if cli.print_boot {
                crate::diskboot::print(image, format, &entry, &cmdline, cli.output)?;
                return Ok(0);
            }
            let staged = entry
                .stage()
                .context("could not stage the kernel from the disk in memory")?;
            let r = (staged.kernel.clone(), staged.initrd.clone(), cmdline);
            _staged = Some(staged);
            r
        }
        (None, None) => {
            return Err(Failure::Usage(if cli.print_boot {
                "--print-boot needs a disk IMAGE".into()
            } else {
                "no kernel given: use -kernel FILE, or give a disk IMAGE to boot".into()
            }))
        }
    };
    let mem_arg = cli.mem.clone().unwrap_or_else(|| "128M".into());
    let mem_arg = mem_arg
        .strip_prefix("size=")
        .unwrap_or(&mem_arg)
        .to_string();
    let mem_size = vcore::units::parse_mem_size(&mem_arg)
        .map_err(|e| Failure::Usage(format!("-m {mem_arg}: {e}")))?;
    if mem_size < (16 << 20) {
        return Err(Failure::Usage(format!(
            "-m {mem_arg}: guests need at least 16 MiB"
        )));
    }
    let mem_size = vcore::units::round_up(mem_size, 2 << 20);
    let max_vcpus = kvm_max_vcpus();
    let topology = vcore::qemuopts::parse_smp(cli.smp.as_deref().unwrap_or("1"), max_vcpus)
        .map_err(Failure::Usage)?;

    let serial_spec = cli.serial.clone().unwrap_or_else(|| "stdio".into());
    let (serial_out, stdio_console) = match serial_spec.as_str() {
        "stdio" | "mon:stdio" => (SerialOut::Stdout, true),
        "null" | "none" => (SerialOut::Null, false),
        s if s.starts_with("file:") => {
            let path = &s[5..];
            let f = File::create(path)
                .with_context(|| format!("-serial {s}: could not create '{path}'"))?;
            (SerialOut::Writer(Box::new(f)), false)
        }
        s => {
            return Err(Failure::Usage(format!(
                "-serial {s}: expected stdio, file:PATH, null or none"
            )))
        }
    };

    if let Some(name) = &cli.name {
        let n = name.split(',').next().unwrap_or(name);
        set_process_name(n);
    }

    let pvm_quirks = pvm::detect(Path::new("/"));
    if pvm_quirks {
        eprintln!(
            "vmrun: host KVM is nested and paging-based (kvm_pvm): guest kernel code runs emulated; \
             stepping over int3/x87 emulation failures and adding '{}' to the kernel command line",
            pvm::LINUX_PARAMS
        );
    }
    let devices = crate::drive::parse_devices(&cli.device).map_err(Failure::Usage)?;
    // The positional IMAGE is the first disk, like QEMU's (-hda).
    let hda = cli.hda.as_deref().or(cli.image.as_deref());
    let disks =
        crate::drive::open_all(hda, &cli.drive, &devices, cli.snapshot).map_err(|e| match e {
            crate::drive::DriveError::Usage(m) => Failure::Usage(m),
            crate::drive::DriveError::Open(m) => Failure::Runtime(anyhow!(m)),
        })?;
    let _raw = (cli.nographic && stdio_console).then(console::RawTerminal::enable);
    let mut serial_out = Some(serial_out);
    loop {
        let cfg = VmConfig {
            name: cli.name.clone(),
            topology,
            mem_size,
            backing: Backing::Anonymous,
            prealloc: false,
            cpu: cpu.clone(),
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            cmdline: cmdline.clone(),
            decompress: match cli.kernel_decompress {
                DecompressArg::Host => Decompress::Host,
                DecompressArg::Guest => Decompress::Guest,
            },
            kernel_cache: vcore::boot::decompress::cache_dir(),
            serial: serial_out.take().unwrap_or(SerialOut::Stdout),
            pvm_quirks,
            disks: disks.iter().map(|d| d.spec.clone()).collect(),
            rng: devices.rng,
        };
        let vm = Vm::new(cfg).map_err(|e| anyhow!(e))?;
        if stdio_console {
            console::spawn_stdin(vm.serial(), vm.stopper(), cli.nographic);
        }
        let markers = vm.markers();
        let exit = vm.run(|_, _| {}).map_err(|e| anyhow!(e))?;
        let _ = std::io::stdout().flush();
        if cli.boot_markers {
            for (t, v) in markers.snapshot() {
                eprintln!("vmrun: marker {v:#04x} at {:.3} ms", t.as_secs_f64() * 1e3);
            }
        }
        return Ok(match exit {
            VmExit::Reset if !cli.no_reboot => continue,
            VmExit::Reset | VmExit::PowerOff | VmExit::Quit => 0,
            VmExit::DebugExit(v) => i32::from(v),
            VmExit::Signal(s) => {
                eprintln!("vmrun: terminating on signal {s}");
                0
            }
            VmExit::Error(msg) => return Err(Failure::Runtime(anyhow!(msg))),
        });
    }
}

fn kvm_max_vcpus() -> u32 {
    kvm_ioctls::Kvm::new()
        .map(|k| k.get_max_vcpus() as u32)
        .unwrap_or(255)
}
