//! Register state of the boot vCPU at the kernel's entry point, plus the
//! MSRs, FPU and local APIC set on every vCPU.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{GDT_START, IDT_START, PML4_START};
use super::Entry;

/// Errors from setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM rejected the vCPU's {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("could not write boot page tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let l = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if (entry >> 55) & 1 == 1 {
                (l << 12) | 0xfff
            } else {
                l
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Put the boot vCPU at the kernel's entry point.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: Entry,
) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh { rip, start_info } => {
            // Flat 32-bit segments; the kernel loads its own GDT at once.
            let gdt = [
                0,
                0,
                gdt_entry(0xc09b, 0, 0xfffff), // code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x008b, 0, 0x67),    // TSS
            ];
            write_gdt(mem, &gdt)?;
            sregs.cs = segment(gdt[2], 0x10);
            let data = segment(gdt[3], 0x18);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = segment(gdt[4], 0x20);
            sregs.gdt.base = GDT_START;
            sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = start_info;
        }
        Entry::Linux64 { rip, boot_params } => {
            let gdt = [
                0,
                gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x808b, 0, 0xfffff), // TSS
            ];
            write_gdt(mem, &gdt)?;
            mem.write_obj(0u64, GuestAddress(IDT_START))?;
            sregs.cs = segment(gdt[1], 0x08);
            let data = segment(gdt[2], 0x10);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = segment(gdt[3], 0x18);
            sregs.gdt.base = GDT_START;
            sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
            sregs.idt.base = IDT_START;
            sregs.idt.limit = 7;
            // Identity map the first 4 GiB with 2 MiB pages.
            let pdpt = PML4_START + 0x1000;
            mem.write_obj(pdpt | 0x3, GuestAddress(PML4_START))?;
            for i in 0..4u64 {
                let pd = pdpt + 0x1000 * (i + 1);
                mem.write_obj(pd | 0x3, GuestAddress(pdpt + i * 8))?;
                for j in 0..512u64 {
                    let addr = ((i << 9) | j) << 21;
                    mem.write_obj(addr | 0x83, GuestAddress(pd + j * 8))?;
                }
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsi = boot_params;
            regs.rsp = 0x8ff0;
            regs.rbp = 0x8ff0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;
    vcpu.set_regs(&regs).map_err(kvm("registers"))?;
    Ok(())
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))?;
    }
    Ok(())
}

/// FPU state after reset (x87 control word, MXCSR).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))
}

/// MSRs a kernel expects from firmware. KVMs that refuse some (nested,
/// paging-based ones) get the rest.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    let list = [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, 1),          // fast string operations
        (MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, write-back by default
    ];
    for (index, data) in list {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .map_err(|_| RegsError::Kvm {
            what: "MSRs",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        // One at a time: KVM stops at the first MSR it refuses.
        let _ = vcpu.set_msrs(&msrs);
    }
    Ok(())
}

/// Route LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware does.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment(code, 8);
        assert_eq!(
            (s.l, s.db, s.g, s.present, s.type_, s.s),
            (1, 0, 1, 1, 0xb, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        let data32 = segment(gdt_entry(0xc093, 0, 0xfffff), 0x18);
        assert_eq!((data32.db, data32.type_), (1, 3));
    }
}
