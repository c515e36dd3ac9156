//! What vmrun does with its command line.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use clap::Parser;
use vcore::boot::Decompress;
use vcore::cpuid::{CpuModel, CpuSpec, MODELS};
use vcore::cpulist::CpuSet;
use vcore::devices::serial::SharedWriter;
use vcore::host::threads::{IoThread, ThreadMap, VcpuThread};
use vcore::monitor::{self, Chardev, MemInfo, MonitorCtx, Protocol};
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
    let mut daemon: Option<Daemon> = None;
    let code = match run(cli, &mut daemon) {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => {
            eprintln!("vmrun: {msg}");
            eprintln!("Try 'vmrun --help' for more information.");
            2
        }
        Err(Failure::Runtime(e)) => {
            let msg = format!("vmrun: {e:#}");
            // Before detaching, the error goes to the waiting parent.
            match daemon.as_mut() {
                Some(d) if !d.detached => d.fail(&msg),
                _ => eprintln!("{msg}"),
            }
            1
        }
    };
    code
}

fn set_process_name(name: &str) {
    let mut n: Vec<u8> = name.bytes().take(15).collect();
    n.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, n.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// The child side of `-daemonize`: a pipe to the parent, which waits for
/// "ready" (exit 0) or an error message (printed, exit 1).
struct Daemon {
    pipe: Option<File>,
    detached: bool,
}

impl Daemon {
    /// Fork; the parent waits and exits, the child returns.
    fn start() -> anyhow::Result<Daemon> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array with new descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(anyhow!(
                "-daemonize: pipe: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: both fds were just created and are owned only here.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: vmrun is still single-threaded here (no VM, no threads yet),
        // so the child may continue to run arbitrary code.
        match unsafe { nix::unistd::fork() }.context("-daemonize: fork")? {
            nix::unistd::ForkResult::Parent { .. } => {
                drop(wr);
                let mut msg = String::new();
                let _ = File::from(rd).read_to_string(&mut msg);
                if msg == "ready" {
                    std::process::exit(0);
                }
                if msg.is_empty() {
                    msg = "vmrun: the daemon exited before the guest started".into();
                }
                eprintln!("{}", msg.trim_end());
                std::process::exit(1);
            }
            nix::unistd::ForkResult::Child => {
                drop(rd);
                let _ = nix::unistd::setsid();
                Ok(Daemon {
                    pipe: Some(File::from(wr)),
                    detached: false,
                })
            }
        }
    }

    fn fail(&mut self, msg: &str) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(msg.as_bytes());
        }
    }

    /// Tell the parent all is well and point stdio at /dev/null.
    fn ready(&mut self) {
        if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors, which we own.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(b"ready");
        }
        self.detached = true;
    }
}

/// A pid file, written and locked; removed when dropped.
struct PidFile {
    path: PathBuf,
    _file: File,
}

impl PidFile {
    fn create(path: &Path) -> anyhow::Result<PidFile> {
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("-pidfile: could not open '{}'", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(anyhow!(
                "-pidfile: '{}' is locked by another running instance",
                path.display()
            ));
        }
        f.set_len(0)?;
        writeln!(f, "{}", std::process::id())
            .with_context(|| format!("-pidfile: could not write '{}'", path.display()))?;
        Ok(PidFile {
            path: path.to_path_buf(),
            _file: f,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The run directory with the thread map; removed when dropped.
struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    fn path_for(name: &str) -> PathBuf {
        let base = match std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
            Some(x) => PathBuf::from(x).join("vmrun"),
            None => PathBuf::from("/run/vmrun"),
        };
        base.join(name)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(ThreadMap::FILE_NAME));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Parse `-vcpu-affinity 0=2,1=3-4` (a pair without `=` continues the
/// previous CPU list: `0=2,3` pins vCPU 0 to CPUs 2 and 3).
fn parse_affinity(s: &str, vcpus: u32) -> Result<Vec<Option<CpuSet>>, String> {
    let mut out: Vec<Option<String>> = vec![None; vcpus as usize];
    let mut last: Option<usize> = None;
    for part in s.split(',') {
        if let Some((v, cpus)) = part.split_once('=') {
            let i: usize = v
                .trim()
                .parse()
                .map_err(|_| format!("-vcpu-affinity {s}: '{v}' is not a vCPU number"))?;
            if i >= vcpus as usize {
                return Err(format!(
                    "-vcpu-affinity {s}: vCPU {i} does not exist (the guest has {vcpus})"
                ));
            }
            out[i] = Some(cpus.to_string());
            last = Some(i);
        } else if let Some(i) = last {
            if let Some(l) = out[i].as_mut() {
                l.push(',');
                l.push_str(part);
            }
        } else {
            return Err(format!(
                "-vcpu-affinity {s}: expected VCPU=CPUS pairs, e.g. 0=2,1=3"
            ));
        }
    }
    out.into_iter()
        .map(|o| {
            o.map(|l| CpuSet::parse_list(&l).map_err(|e| format!("-vcpu-affinity {s}: {e}")))
                .transpose()
        })
        .collect()
}

/// Memory backend from `-mem-path`, `-mem-prealloc` and `-object memory-backend-memfd`.
fn memory_backend(cli: &Cli) -> Result<(Backing, bool, Option<u64>), Failure> {
    let mut prealloc = cli.mem_prealloc;
    let mut backing = Backing::Anonymous;
    let mut size = None;
    for o in &cli.object {
        let (first, kv) = vcore::qemuopts::split(o);
        match first.as_deref() {
            Some("memory-backend-memfd") | Some("memory-backend-ram") => {
                let mut hugetlb = false;
                for (k, v) in &kv {
                    match k.as_str() {
                        "id" | "share" | "hugetlbsize" => {}
                        "size" => {
                            size = Some(
                                vcore::units::parse_size(v, vcore::units::Suffix::B).map_err(
                                    |e| Failure::Usage(format!("-object {o}: size: {e}")),
                                )?,
                            )
                        }
                        "hugetlb" => hugetlb = v == "on" || v == "true",
                        "prealloc" => prealloc = v == "on" || v == "true",
                        other => {
                            return Err(Failure::Usage(format!(
                                "-object {o}: unknown property '{other}'"
                            )))
                        }
                    }
                }
                if first.as_deref() == Some("memory-backend-memfd") {
                    backing = Backing::Memfd { hugetlb };
                }
            }
            _ => {
                return Err(Failure::Usage(format!(
                    "-object {o}: only memory-backend-memfd and memory-backend-ram are supported"
                )))
            }
        }
    }
    if let Some(p) = &cli.mem_path {
        if backing != Backing::Anonymous {
            return Err(Failure::Usage(
                "-mem-path and -object memory-backend-memfd exclude each other".into(),
            ));
        }
        backing = Backing::Path(p.clone());
    }
    Ok((backing, prealloc, size))
}

fn run(cli: Cli, daemon: &mut Option<Daemon>) -> Result<i32, Failure> {
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
    let boot_disk = crate::diskboot::boot_disk(
        cli.image.as_deref(),
        cli.hda.as_deref(),
        &cli.drive,
        &cli.device,
    )
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
    let (backing, prealloc, object_size) = memory_backend(&cli)?;
    let mem_arg = cli.mem.clone().unwrap_or_else(|| "128M".into());
    let mem_arg = mem_arg
        .strip_prefix("size=")
        .unwrap_or(&mem_arg)
        .to_string();
    let mut mem_size = match (&cli.mem, object_size) {
        (None, Some(s)) => s,
        _ => vcore::units::parse_mem_size(&mem_arg)
            .map_err(|e| Failure::Usage(format!("-m {mem_arg}: {e}")))?,
    };
    if mem_size < (16 << 20) {
        return Err(Failure::Usage(format!(
            "-m {mem_arg}: guests need at least 16 MiB"
        )));
    }
    let max_vcpus = kvm_max_vcpus();
    let topology = vcore::qemuopts::parse_smp(cli.smp.as_deref().unwrap_or("1"), max_vcpus)
        .map_err(Failure::Usage)?;
    let nvcpus = topology.sockets * topology.cores * topology.threads;
    let affinity = match &cli.vcpu_affinity {
        Some(a) => parse_affinity(a, nvcpus).map_err(Failure::Usage)?,
        None => vec![None; nvcpus as usize],
    };
    let monitor_dev = cli
        .monitor
        .as_deref()
        .map(Chardev::parse)
        .transpose()
        .map_err(|e| Failure::Usage(format!("-monitor {e}")))?;
    let qmp_dev = cli
        .qmp
        .as_deref()
        .map(Chardev::parse)
        .transpose()
        .map_err(|e| Failure::Usage(format!("-qmp {e}")))?;
    if qmp_dev == Some(Chardev::Stdio) {
        return Err(Failure::Usage(
            "-qmp stdio is not supported; use -qmp unix:PATH,server,nowait".into(),
        ));
    }
    if cli.daemonize && cli.nographic {
        return Err(Failure::Usage(
            "-nographic cannot be used with -daemonize".into(),
        ));
    }
    let serial_spec = cli.serial.clone().unwrap_or_else(|| {
        if cli.daemonize {
            "null".into()
        } else {
            "stdio".into()
        }
    });
    if cli.daemonize && (serial_spec.contains("stdio") || monitor_dev == Some(Chardev::Stdio)) {
        return Err(Failure::Usage("cannot use stdio with -daemonize".into()));
    }
    // The monitor: on stdio muxed with the console under -nographic (QEMU's
    // default), elsewhere when asked.
    let monitor_dev = monitor_dev.unwrap_or(if cli.nographic && !cli.daemonize {
        Chardev::Stdio
    } else {
        Chardev::None
    });

    // Page size of the backing, and the pool check before anything is mapped.
    let mut page_size = 4096;
    match &backing {
        Backing::Path(p) => {
            let dir = if p.is_dir() {
                p.clone()
            } else {
                p.parent().map(Path::to_path_buf).unwrap_or_default()
            };
            if let Ok(st) = vcore::host::hugepages::statfs_hugetlbfs(&dir) {
                page_size = st.page_size;
                mem_size = vcore::units::round_up(mem_size, page_size);
                vcore::host::hugepages::check_backing(&dir, mem_size)
                    .map_err(|e| anyhow!("-mem-path {}: {e}", p.display()))?;
            }
        }
        Backing::Memfd { hugetlb: true } => {
            let def = vcore::host::hugepages::default_size(Path::new("/")).unwrap_or(2 << 20);
            page_size = def;
            mem_size = vcore::units::round_up(mem_size, page_size);
            vcore::host::hugepages::check_hugetlb_memory(
                "-object memory-backend-memfd,hugetlb=on",
                Some(page_size),
                mem_size,
            )
            .map_err(|e| anyhow!("{e}"))?;
        }
        _ => mem_size = vcore::units::round_up(mem_size, 2 << 20),
    }

    let nics = crate::net::parse(&cli.netdev, &cli.nic, &cli.device).map_err(Failure::Usage)?;
    let devices = crate::drive::parse_devices(&cli.device).map_err(Failure::Usage)?;
    // The positional IMAGE is the first disk, like QEMU's (-hda).
    let hda = cli.hda.as_deref().or(cli.image.as_deref());
    let disks =
        crate::drive::open_all(hda, &cli.drive, &devices, cli.snapshot).map_err(|e| match e {
            crate::drive::DriveError::Usage(m) => Failure::Usage(m),
            crate::drive::DriveError::Open(m) => Failure::Runtime(anyhow!(m)),
        })?;
    if cli.daemonize {
        *daemon = Some(Daemon::start()?);
    }
    // After the fork: passt must be the daemon's child. Errors still reach
    // the terminal through the daemon's pipe.
    let (nets, _net_guard) = crate::net::open(&nics).map_err(|e| Failure::Runtime(anyhow!(e)))?;
    let _pidfile = cli.pidfile.as_deref().map(PidFile::create).transpose()?;

    let serial_slot: console::SerialSlot = Arc::new(Mutex::new(None));
    let (serial_out, stdio_console) = match serial_spec.as_str() {
        "stdio" | "mon:stdio" => (SerialOut::Stdout, true),
        "null" | "none" => (SerialOut::Null, false),
        s if s.starts_with("file:") => {
            let path = &s[5..];
            let f = File::create(path)
                .with_context(|| format!("-serial {s}: could not create '{path}'"))?;
            (SerialOut::Writer(Box::new(f)), false)
        }
        s if s.starts_with("unix:") => {
            let dev = Chardev::parse(s).map_err(|e| Failure::Usage(format!("-serial {e}")))?;
            let Chardev::Unix(path) = dev else {
                return Err(Failure::Usage(format!(
                    "-serial {s}: expected unix:PATH,server,nowait"
                )));
            };
            let wait = !s.split(',').any(|o| o == "nowait");
            let w = console::serve_serial_unix(&path, serial_slot.clone(), wait).with_context(
                || format!("-serial {s}: could not listen on '{}'", path.display()),
            )?;
            (SerialOut::Writer(Box::new(w)), false)
        }
        s => {
            return Err(Failure::Usage(format!(
                "-serial {s}: expected stdio, file:PATH, unix:PATH,server,nowait, null or none"
            )))
        }
    };

    let guest_name = cli
        .name
        .as_deref()
        .map(|n| n.split(',').next().unwrap_or(n).to_string());
    if let Some(n) = &guest_name {
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
    let _raw = (cli.nographic && stdio_console).then(console::RawTerminal::enable);
    // One writer for every boot: a reboot rebuilds the VM, not the console.
    let serial_writer = match serial_out {
        SerialOut::Stdout => Some(SharedWriter::new(Box::new(std::io::stdout()))),
        SerialOut::Writer(w) => Some(SharedWriter::new(w)),
        SerialOut::Null => None,
    };
    let mut mon: Option<Arc<MonitorCtx>> = None;
    let mut monitor_path = None;
    let pid = std::process::id() as i32;
    let run_name = guest_name.clone().unwrap_or_else(|| format!("vmrun-{pid}"));
    let run_dir = RunDir {
        dir: RunDir::path_for(&run_name),
    };
    let version = env!("CARGO_PKG_VERSION").to_string();
    let mut first_boot = true;
    loop {
        let cfg = VmConfig {
            name: guest_name.clone(),
            topology,
            mem_size,
            backing: backing.clone(),
            prealloc,
            cpu: cpu.clone(),
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            cmdline: cmdline.clone(),
            decompress: match cli.kernel_decompress {
                DecompressArg::Host => Decompress::Host,
                DecompressArg::Guest => Decompress::Guest,
            },
            kernel_cache: vcore::boot::decompress::cache_dir(),
            serial: match &serial_writer {
                Some(w) => SerialOut::Writer(Box::new(w.clone())),
                None => SerialOut::Null,
            },
            pvm_quirks,
            disks: disks.iter().map(|d| d.spec.clone()).collect(),
            rng: devices.rng,
            nets: nets.clone(),
        };
        let vm = Vm::new(cfg).map_err(|e| anyhow!(e.to_string()))?;
        if cli.print_cpuid {
            let tables = vm.cpuid_tables().map_err(|e| anyhow!(e.to_string()))?;
            println!("vcpu     leaf  index      eax      ebx      ecx      edx");
            for (i, t) in tables.iter().enumerate() {
                for e in t {
                    println!(
                        "{i:>4} {:08x} {:>6} {:08x} {:08x} {:08x} {:08x}",
                        e.function, e.index, e.eax, e.ebx, e.ecx, e.edx
                    );
                }
            }
            return Ok(0);
        }
        *serial_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm.serial());
        if let Some(m) = &mon {
            m.set_control(vm.control());
        }
        if first_boot {
            let m = Arc::new(MonitorCtx {
                control: Mutex::new(vm.control()),
                name: guest_name.clone(),
                topology,
                mem: MemInfo {
                    size: mem_size,
                    backing: vcore::vm::memory::describe(&backing),
                    page_size,
                    prealloc,
                },
                version: version.clone(),
            });
            for (dev, proto, opt) in [
                (&monitor_dev, Protocol::Hmp, "-monitor"),
                (
                    qmp_dev.as_ref().unwrap_or(&Chardev::None),
                    Protocol::Qmp,
                    "-qmp",
                ),
            ] {
                if let Chardev::Unix(p) = dev {
                    monitor::serve_unix(p, proto, m.clone())
                        .with_context(|| format!("{opt}: could not listen on '{}'", p.display()))?;
                    monitor_path.get_or_insert(p.display().to_string());
                }
            }
            if stdio_console || monitor_dev == Chardev::Stdio {
                console::spawn_stdin(console::StdinTargets {
                    serial: stdio_console.then(|| serial_slot.clone()),
                    monitor: (monitor_dev == Chardev::Stdio).then(|| m.clone()),
                    mux: cli.nographic,
                });
            }
            mon = Some(m);
        }

        // Thread map for vpin, affinity, and -daemonize's "ready", once
        // every vCPU thread runs.
        let started = Arc::new(AtomicUsize::new(0));
        let tids = Arc::new(Mutex::new(vec![0i32; nvcpus as usize]));
        let map_path = run_dir.dir.join(ThreadMap::FILE_NAME);
        let ready = Arc::new(Mutex::new(daemon.take()));
        let control = vm.control();
        let on_start = {
            let (started, tids, ready, affinity, map_path, run_name) = (
                started.clone(),
                tids.clone(),
                ready.clone(),
                affinity.clone(),
                map_path.clone(),
                run_name.clone(),
            );
            let monitor_path = monitor_path.clone();
            move |i: u32, tid: i32| {
                if let Some(Some(set)) = affinity.get(i as usize) {
                    let ok = vcore::host::tasks::set_affinity(tid, set)
                        .and_then(|_| vcore::host::tasks::get_affinity(tid))
                        .map_err(|e| e.to_string())
                        .and_then(|got| {
                            if &got == set {
                                Ok(())
                            } else {
                                Err("the kernel kept a different CPU set".into())
                            }
                        });
                    if let Err(e) = ok {
                        control.request_exit(VmExit::Error(format!(
                            "-vcpu-affinity: could not pin vCPU {i} (thread {tid}): {e}"
                        )));
                    }
                }
                if let Ok(mut t) = tids.lock() {
                    t[i as usize] = tid;
                }
                if started.fetch_add(1, Ordering::SeqCst) + 1 == nvcpus as usize {
                    let vcpus = tids
                        .lock()
                        .map(|t| {
                            t.iter()
                                .enumerate()
                                .map(|(index, &tid)| VcpuThread {
                                    index: index as u32,
                                    tid,
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let io_threads = monitor::threads()
                        .into_iter()
                        .filter(|t| t.role == "io")
                        .map(|t| IoThread {
                            name: t.name.trim_start_matches("io-").to_string(),
                            tid: t.tid,
                        })
                        .collect();
                    let map = ThreadMap {
                        pid,
                        name: run_name.clone(),
                        vcpus,
                        io_threads,
                        monitor: monitor_path.clone(),
                    };
                    if let Err(e) = map.write(&map_path) {
                        eprintln!("vmrun: warning: {e}");
                    }
                    if let Ok(mut d) = ready.lock() {
                        if let Some(d) = d.as_mut() {
                            d.ready();
                        }
                    }
                }
            }
        };
        let markers = vm.markers();
        let result = vm.run(on_start);
        *daemon = ready.lock().ok().and_then(|mut d| d.take());
        let exit = result.map_err(|e| anyhow!(e.to_string()))?;
        first_boot = false;
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
