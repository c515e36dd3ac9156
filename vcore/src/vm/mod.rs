//! A KVM virtual machine: guest memory, the in-kernel interrupt controllers
//! and PIT, the legacy devices, the vCPU threads, and the loop that waits
//! for the guest to stop.

pub mod control;
pub mod memory;
pub mod pvm;
mod vcpu;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootSpec, Decompress};
use crate::cpuid::{self, CpuModel, CpuSpec, Topology};
use crate::devices::bus::Bus;
use crate::devices::cmos::{Cmos, CMOS_PORT};
use crate::devices::debug::{DebugExit, Markers, DEBUG_EXIT_PORT, MARKER_PORT};
use crate::devices::i8042::{I8042, I8042_PORT};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT};
use crate::devices::{EventFdTrigger, FnTrigger};
pub use control::{RunState, VmControl};
pub use memory::Backing;

/// Where the guest's serial output goes.
pub enum SerialOut {
    /// The VMM's standard output.
    Stdout,
    /// Any writer (a file, a socket, a test buffer).
    Writer(Box<dyn Write + Send>),
    /// Nowhere; the UART still exists.
    Null,
}

/// Everything needed to build a VM.
pub struct VmConfig {
    pub name: Option<String>,
    pub topology: Topology,
    pub mem_size: u64,
    pub backing: Backing,
    pub prealloc: bool,
    pub cpu: CpuSpec,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub decompress: Decompress,
    pub kernel_cache: Option<PathBuf>,
    pub serial: SerialOut,
    /// Apply the nested-PVM workarounds (see [`pvm`]).
    pub pvm_quirks: bool,
    /// virtio-blk disks on PCI (see [`crate::devices::virtio`]).
    pub disks: Vec<crate::devices::virtio::DiskSpec>,
    /// A virtio-rng device on PCI.
    pub rng: bool,
    /// virtio-net NICs on PCI (see [`crate::devices::virtio::net`]).
    pub nets: Vec<crate::devices::virtio::net::NetSpec>,
}

impl VmConfig {
    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.topology.sockets * self.topology.cores * self.topology.threads
    }
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("could not open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: String,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Regs(#[from] boot::regs::RegsError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("{0}")]
    Device(String),
    #[error("could not start a thread: {0}")]
    Thread(std::io::Error),
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Kvm { what, source }
}

/// How the guest stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042, triple fault, KVM reset event).
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The guest wrote a status to the debug-exit port.
    DebugExit(u8),
    /// A signal asked the VMM to stop.
    Signal(i32),
    /// The user quit (`Ctrl-a x`, monitor `quit`).
    Quit,
    /// A vCPU hit something the VMM cannot handle.
    Error(String),
}

/// Messages from devices and vCPU threads to the VM's main loop.
pub(crate) type Events = Sender<VmExit>;

/// Last signal delivered to the VMM (SIGINT/SIGTERM), 0 if none.
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

use control::kick_signal;

/// Install the handlers for SIGINT/SIGTERM (stop the guest cleanly) and the
/// vCPU kick signal. Safe to call more than once.
pub fn install_signal_handlers() {
    use vmm_sys_util::signal::register_signal_handler;
    let _ = register_signal_handler(libc::SIGINT, on_stop_signal);
    let _ = register_signal_handler(libc::SIGTERM, on_stop_signal);
    let _ = register_signal_handler(kick_signal(), on_kick);
}

/// A built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    pio: Bus,
    mmio: Bus,
    vcpus: Vec<VcpuFd>,
    events_tx: Sender<VmExit>,
    events_rx: Receiver<VmExit>,
    serial: Arc<Mutex<SerialDevice>>,
    markers: Markers,
    pvm_quirks: bool,
    control: Arc<VmControl>,
    pci: crate::devices::virtio::PciDevices,
    /// What was loaded, for reports.
    pub loaded: boot::Loaded,
    /// The command line the kernel got.
    pub cmdline: String,
}

impl Vm {
    /// Create the VM, its memory, devices and vCPUs, and load the kernel.
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("create VM"))?);
        let n = cfg.vcpus();
        let max = kvm.get_max_vcpus() as u32;
        if n == 0 || n > max {
            return Err(VmError::Device(format!(
                "-smp {n}: this host's KVM supports 1 to {max} vCPUs"
            )));
        }

        // Guest memory and KVM slots.
        let mem = memory::create(cfg.mem_size, &cfg.backing, cfg.prealloc)?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // Vm keeps for as long as the VM fd exists.
            unsafe { vm_fd.set_user_memory_region(r) }.map_err(kvm_err("map guest memory"))?;
        }

        // In-kernel PIC/IOAPIC/LAPIC and PIT.
        let _ = vm_fd.set_tss_address(0xfffb_d000);
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("create in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(kvm_err("create in-kernel PIT"))?;

        let (events_tx, events_rx) = mpsc::channel();
        let pio = Bus::new();
        let mmio = Bus::new();

        // COM1.
        let serial_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Device(e.to_string()))?;
        vm_fd
            .register_irqfd(&serial_evt, COM1_IRQ)
            .map_err(kvm_err("register the serial IRQ"))?;
        let out: Box<dyn Write + Send> = match cfg.serial {
            SerialOut::Stdout => Box::new(std::io::stdout()),
            SerialOut::Writer(w) => w,
            SerialOut::Null => Box::new(std::io::sink()),
        };
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new(serial_evt),
            out,
        )));
        let dev_err = |e: crate::devices::bus::BusError| VmError::Device(e.to_string());
        pio.insert(COM1_PORT, 8, serial.clone()).map_err(dev_err)?;

        // Run control first: the i8042 reset line and the debug-exit port
        // stop the vCPUs through it, from the vCPU thread that wrote the port,
        // before the guest can run another instruction.
        let control = Arc::new(VmControl::new(n as usize, events_tx.clone()));
        let c = control.clone();
        let reset = FnTrigger::new(Box::new(move || c.request_exit(VmExit::Reset)));
        pio.insert(I8042_PORT, 5, Arc::new(Mutex::new(I8042::new(reset))))
            .map_err(dev_err)?;

        // CMOS, debug exit and boot markers.
        let low = cfg.mem_size.min(boot::layout::MMIO_HOLE_START);
        let high = cfg.mem_size - low;
        pio.insert(CMOS_PORT, 2, Arc::new(Mutex::new(Cmos::new(low, high))))
            .map_err(dev_err)?;
        let c = control.clone();
        let exit = DebugExit::new(Box::new(move |v| c.request_exit(VmExit::DebugExit(v))));
        pio.insert(DEBUG_EXIT_PORT, 1, Arc::new(Mutex::new(exit)))
            .map_err(dev_err)?;
        let markers = Markers::new();
        pio.insert(MARKER_PORT, 1, Arc::new(Mutex::new(markers.clone())))
            .map_err(dev_err)?;

        // PCI root bus and virtio devices (MSI-X routes need the irqchip).
        let pci = crate::devices::virtio::attach(
            &vm_fd, &mem, &pio, &mmio, &cfg.disks, cfg.rng, &cfg.nets,
        )
        .map_err(VmError::Device)?;

        // CPUID table for the model.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read supported CPUID"))?;
        let (hv, hb) = cpuid::host_vendor_brand();
        let model = CpuModel::by_name(&cfg.cpu.model, &hv, &hb)?;

        // Kernel, initrd, command line.
        let mut cmdline = cfg.cmdline.clone();
        if cfg.pvm_quirks {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(pvm::LINUX_PARAMS);
        }
        let loaded = boot::load(
            &mem,
            &BootSpec {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: &cmdline,
                mem_size: cfg.mem_size,
                decompress: cfg.decompress,
                cache: cfg.kernel_cache.clone(),
            },
        )?;
        let apic_ids: Vec<u32> = (0..n).map(|i| cfg.topology.apic_id(i)).collect();
        boot::write_mptable(&mem, &apic_ids)?;

        // vCPUs.
        let mut vcpus = Vec::new();
        for i in 0..n {
            let vcpu = vm_fd
                .create_vcpu(u64::from(apic_ids[i as usize]))
                .map_err(kvm_err(format!("create vCPU {i}")))?;
            let tsc = vcpu.get_tsc_khz().ok().filter(|&k| k > 0);
            let table = cpuid::model_table(supported.as_slice(), &model, &cfg.cpu.changes, tsc);
            let entries = cpuid::for_vcpu(&table, i, cfg.topology);
            let c = kvm_bindings::CpuId::from_entries(&entries)
                .map_err(|_| VmError::Device("CPUID table too large".into()))?;
            vcpu.set_cpuid2(&c)
                .map_err(kvm_err(format!("set CPUID of vCPU {i}")))?;
            boot::regs::setup_msrs(&vcpu)?;
            boot::regs::setup_fpu(&vcpu)?;
            boot::regs::setup_lapic(&vcpu)?;
            if i == 0 {
                boot::regs::setup_boot_vcpu(&vcpu, &mem, loaded.entry)?;
            }
            vcpus.push(vcpu);
        }

        Ok(Vm {
            control,
            _kvm: kvm,
            vm_fd,
            mem,
            pio,
            mmio,
            vcpus,
            events_tx,
            events_rx,
            serial,
            markers,
            pvm_quirks: cfg.pvm_quirks,
            pci,
            loaded,
            cmdline,
        })
    }

    /// The VM fd, for devices that register irqfds and ioeventfds.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The port-I/O bus.
    pub fn pio_bus(&self) -> &Bus {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    /// The COM1 UART, to feed it input.
    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.serial.clone()
    }

    /// A sender that stops the VM with the given exit (for the monitor,
    /// the console's `Ctrl-a x`).
    pub fn stopper(&self) -> Sender<VmExit> {
        self.events_tx.clone()
    }

    /// Run control: pause/resume, vCPU thread ids, exit requests.
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// The CPUID table KVM holds for each vCPU, read back with
    /// `KVM_GET_CPUID2`.
    pub fn cpuid_tables(&self) -> Result<Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>, VmError> {
        self.vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map(|c| c.as_slice().to_vec())
                    .map_err(kvm_err(format!("read back the CPUID of vCPU {i}")))
            })
            .collect()
    }

    /// Boot markers recorded so far.
    pub fn markers(&self) -> Markers {
        self.markers.clone()
    }

    /// Start the vCPU threads and wait until the guest stops.
    /// `on_start` gets each vCPU's index and thread id once it runs.
    pub fn run(
        self,
        on_start: impl Fn(u32, i32) + Send + Sync + 'static,
    ) -> Result<VmExit, VmError> {
        install_signal_handlers();
        let on_start = Arc::new(on_start);
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        // Each vCPU thread says when it ends, so stopping waits for exactly
        // that instead of polling.
        let (done_tx, done_rx) = mpsc::channel::<usize>();
        for (i, vcpu) in self.vcpus.into_iter().enumerate() {
            let ctx = vcpu::VcpuCtx {
                index: i as u32,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                events: self.events_tx.clone(),
                control: self.control.clone(),
                pvm_quirks: self.pvm_quirks,
            };
            let on_start = on_start.clone();
            let control = self.control.clone();
            let done = done_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    control.register(i as u32, tid);
                    on_start(i as u32, tid);
                    vcpu::run(vcpu, ctx);
                    let _ = done.send(i);
                })
                .map_err(VmError::Thread)?;
            threads.push(h);
        }

        let exit = loop {
            // A signal wins over guest events, so that SIGTERM also stops a
            // guest that keeps resetting.
            let sig = SIGNALLED.swap(0, Ordering::SeqCst);
            if sig != 0 {
                break VmExit::Signal(sig);
            }
            match self.events_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(e) => {
                    let sig = SIGNALLED.swap(0, Ordering::SeqCst);
                    break if sig != 0 { VmExit::Signal(sig) } else { e };
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    break VmExit::Error("all vCPUs stopped".into())
                }
            }
        };

        // Stop every vCPU: set the flag, then kick the running ones until
        // each has said it ended (a kick can land just before a thread
        // enters KVM_RUN, hence the repeat).
        self.control.stop();
        drop(done_tx);
        let mut running = vec![true; threads.len()];
        let mut left = threads.len();
        while left > 0 {
            for (h, _) in threads.iter().zip(&running).filter(|(_, &r)| r) {
                // SAFETY: the thread has not ended (it has not reported on
                // `done`, and the handle keeps it joinable) and the kick
                // signal has a handler installed above.
                unsafe {
                    libc::pthread_kill(
                        std::os::unix::thread::JoinHandleExt::as_pthread_t(h),
                        kick_signal(),
                    )
                };
            }
            match done_rx.recv_timeout(Duration::from_millis(1)) {
                Ok(i) => {
                    running[i] = false;
                    left -= 1;
                    // Collect the others that already ended without kicking.
                    while let Ok(i) = done_rx.try_recv() {
                        running[i] = false;
                        left -= 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // A thread panicked before reporting: join tells.
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        for h in threads {
            let _ = h.join();
        }
        self.pci.shutdown();
        if let Ok(mut s) = self.serial.lock() {
            s.flush();
        }
        Ok(exit)
    }
}
