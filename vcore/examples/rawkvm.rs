//! The physical limit for bench/vmrun.sh: the least a VMM can do to run a
//! tiny PVH guest to its exit on raw KVM ioctls. It creates a VM with 64 MiB
//! of RAM (what the bench gives vmrun and QEMU), loads the ELF's PT_LOAD segments with
//! linux-loader, writes a PVH `hvm_start_info` with the command line, enters
//! the PVH entry in 32-bit protected mode and runs the vCPU until the guest
//! writes its status to the debug-exit port 0x501. Other port writes are
//! ignored, reads return 0xff. No devices, no threads, and no irqchip unless
//! `--irqchip` asks for the in-kernel PIC/IOAPIC/LAPIC and PIT that any VMM
//! booting Linux this way creates (vmrun does): that shows what they cost
//! KVM to create and, mostly, to destroy.
//!
//!   cargo run --release -p vcore --example rawkvm -- [--irqchip] GUEST.elf [CMDLINE]
//!
//! Exit status: the byte the guest wrote to port 0x501; 1 on any failure.

use std::io::Cursor;

use kvm_bindings::{
    kvm_pit_config, kvm_segment, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use linux_loader::start_info::hvm_start_info;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const MEM_SIZE: usize = 64 << 20;
const START_INFO: u64 = 0x6000;
const CMDLINE: u64 = 0x20000;
const DEBUG_EXIT: u16 = 0x501;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let irqchip = args.first().is_some_and(|a| a == "--irqchip");
    if irqchip {
        args.remove(0);
    }
    if args.is_empty() || args.len() > 2 {
        eprintln!("usage: rawkvm [--irqchip] GUEST.elf [CMDLINE]");
        std::process::exit(2);
    }
    match run(
        &args[0],
        args.get(1).map(String::as_str).unwrap_or(""),
        irqchip,
    ) {
        Ok(status) => std::process::exit(i32::from(status)),
        Err(e) => {
            eprintln!("rawkvm: {e}");
            std::process::exit(1);
        }
    }
}

fn run(path: &str, cmdline: &str, irqchip: bool) -> Result<u8, String> {
    let image = std::fs::read(path).map_err(|e| format!("could not read '{path}': {e}"))?;
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("create VM: {e}"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .map_err(|e| format!("guest memory: {e}"))?;
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives
        // the VM (both are dropped at the end of this function).
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("map memory: {e}"))?;
    }
    if irqchip {
        vm.set_tss_address(0xfffb_d000)
            .map_err(|e| format!("set TSS address: {e}"))?;
        vm.create_irq_chip()
            .map_err(|e| format!("create irqchip: {e}"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| format!("create PIT: {e}"))?;
    }

    let loaded = Elf::load(&mem, None, &mut Cursor::new(&image), None)
        .map_err(|e| format!("load '{path}': {e}"))?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(format!("'{path}' has no PVH entry note"));
    };
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(CMDLINE))
        .map_err(|e| e.to_string())?;
    let info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: CMDLINE,
        ..Default::default()
    };
    mem.write_obj(info, GuestAddress(START_INFO))
        .map_err(|e| e.to_string())?;

    // PVH entry state: flat 32-bit code and data segments, protected mode
    // without paging, EBX = hvm_start_info.
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("create vCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("get sregs: {e}"))?;
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(0x10, 0xb);
    let data = flat(0x18, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("set sregs: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("get regs: {e}"))?;
    regs.rflags = 0x2;
    regs.rip = entry.0;
    regs.rbx = START_INFO;
    vcpu.set_regs(&regs).map_err(|e| format!("set regs: {e}"))?;

    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(DEBUG_EXIT, data)) => return Ok(data[0]),
            Ok(VcpuExit::IoOut(..)) => {}
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
}
