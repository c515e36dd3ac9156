//! Workarounds for nested, paging-based KVM hosts ("kvm_pvm").
//!
//! On such hosts guest kernel code is emulated in software, and the
//! emulator gives up on some instructions with `KVM_EXIT_INTERNAL_ERROR`
//! (suberror 1, emulation) and the instruction bytes in the exit data. This
//! module is the only place that knows about it; nothing here runs on hosts
//! with hardware virtualisation.
//!
//! * `int3` (Linux runs one in its boot self-test): advance RIP past it and
//!   inject #BP, which is exactly what the CPU would have done.
//! * The x87 `fnclex`/`emms`/`fild` sequence in Linux's AMD FPU-restore path
//!   (the FXSAVE-leak workaround) and `fwait`: skipped. They only scrub x87
//!   state that the following FXRSTOR/XRSTOR overwrites, so skipping them
//!   changes nothing the guest kernel can observe except that scrubbing.
//! * The rest (`clac/stac`, `popcnt`, `xrstor`, `cmpxchg16b`, …) are kept
//!   out of a Linux guest's path with kernel parameters ([`LINUX_PARAMS`]).
//! * `no_timer_check`: Linux's boot check that the IO-APIC timer ticks
//!   (timer_irq_works) gives the timer interrupt a fixed number of TSC
//!   cycles; emulated interrupt handling on a loaded host can miss it and
//!   panic with "IO-APIC + timer doesn't work!". KVM guests with kvmclock
//!   skip the check the same way.

use std::path::Path;

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
use kvm_ioctls::VcpuFd;

/// Kernel parameters that keep a Linux guest off instructions the emulator
/// cannot handle.
pub const LINUX_PARAMS: &str = "no_timer_check noxsave nopcid noinvpcid nofsgsbase clearcpuid=cx16,smap,rdpid,rdrand,rdseed,avx,avx2,avx512f,xsaves,xsaveopt,clwb,clflushopt,popcnt,abm,bmi1,bmi2,movbe,adx,sha_ni,aes,pclmulqdq,f16c,fma,sse4_1,sse4_2";

/// Whether the host's KVM is the nested paging-based flavour.
pub fn detect(sys_root: &Path) -> bool {
    sys_root.join("sys/module/kvm_pvm").exists()
}

/// An emulation failure as reported in `kvm_run.internal`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulationFailure {
    pub suberror: u32,
    /// Instruction bytes at RIP, when KVM provided them.
    pub insn: Vec<u8>,
}

/// Decode `kvm_run.internal` (suberror, ndata, data[16]).
pub fn decode(suberror: u32, ndata: u32, data: &[u64]) -> EmulationFailure {
    let mut insn = Vec::new();
    let ndata = (ndata as usize).min(data.len());
    if suberror == KVM_INTERNAL_ERROR_EMULATION && ndata >= 3 && data[0] & 1 == 1 {
        let mut bytes = Vec::with_capacity(16);
        for w in &data[1..3] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        let len = usize::from(bytes[0]).min(15);
        insn = bytes[1..1 + len].to_vec();
    }
    EmulationFailure { suberror, insn }
}

/// What to do about an emulation failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fix {
    /// Advance RIP by this many bytes and inject #BP.
    Breakpoint(u64),
    /// Advance RIP by this many bytes.
    Skip(u64),
}

/// Length of a ModRM operand (ModRM, SIB, displacement) in 64-bit mode.
fn modrm_len(b: &[u8]) -> Option<usize> {
    let modrm = *b.first()?;
    let md = modrm >> 6;
    let rm = modrm & 7;
    if md == 3 {
        return Some(1);
    }
    let mut len = 1;
    if rm == 4 {
        let sib = *b.get(1)?;
        len += 1;
        if md == 0 && sib & 7 == 5 {
            len += 4;
        }
    } else if md == 0 && rm == 5 {
        len += 4; // RIP-relative
    }
    len += match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    Some(len)
}

/// Decide how to get past `insn`, or `None` when it is not one we handle.
pub fn classify(insn: &[u8]) -> Option<Fix> {
    let mut i = 0;
    // Operand-size, address-size and segment prefixes, then REX.
    while let Some(&p) = insn.get(i) {
        if matches!(p, 0x66 | 0x67 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65) {
            i += 1;
        } else {
            break;
        }
    }
    if matches!(insn.get(i), Some(0x40..=0x4f)) {
        i += 1;
    }
    let op = *insn.get(i)?;
    let rest = &insn[i + 1..];
    let n = |extra: usize| Some((i + 1 + extra) as u64);
    match op {
        0xcc => Some(Fix::Breakpoint(n(0)?)),
        0x9b => Some(Fix::Skip(n(0)?)), // fwait
        0x0f if rest.first() == Some(&0x77) => Some(Fix::Skip(n(1)?)), // emms
        0xdb if matches!(rest.first(), Some(0xe2) | Some(0xe3)) => Some(Fix::Skip(n(1)?)), // fnclex, fninit
        // fild m32 (DB /0), fild m16 (DF /0), fild m64 (DF /5).
        0xdb | 0xdf => {
            let reg = (rest.first()? >> 3) & 7;
            let md = rest.first()? >> 6;
            let ok = md != 3 && (reg == 0 || (op == 0xdf && reg == 5));
            if ok {
                Some(Fix::Skip(n(modrm_len(rest)?)?))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Apply a fix to the vCPU.
pub fn apply(vcpu: &VcpuFd, fix: Fix) -> Result<(), kvm_ioctls::Error> {
    let mut regs = vcpu.get_regs()?;
    let (len, bp) = match fix {
        Fix::Breakpoint(n) => (n, true),
        Fix::Skip(n) => (n, false),
    };
    regs.rip = regs.rip.wrapping_add(len);
    vcpu.set_regs(&regs)?;
    if bp {
        let mut ev = vcpu.get_vcpu_events()?;
        ev.exception.injected = 1;
        ev.exception.nr = 3;
        ev.exception.has_error_code = 0;
        ev.exception.error_code = 0;
        vcpu.set_vcpu_events(&ev)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_exit_data() {
        let mut bytes = [0u8; 16];
        bytes[0] = 3;
        bytes[1..4].copy_from_slice(&[0xdb, 0xe2, 0x90]);
        let data = [
            1,
            u64::from_le_bytes(bytes[0..8].try_into().unwrap()),
            u64::from_le_bytes(bytes[8..16].try_into().unwrap()),
        ];
        let f = decode(1, 3, &data);
        assert_eq!(f.insn, vec![0xdb, 0xe2, 0x90]);
        assert_eq!(decode(1, 3, &[0, data[1], data[2]]).insn, Vec::<u8>::new());
        assert_eq!(decode(1, 1, &data).insn, Vec::<u8>::new());
    }

    #[test]
    fn classifies_the_known_instructions() {
        assert_eq!(classify(&[0xcc, 0x90]), Some(Fix::Breakpoint(1)));
        assert_eq!(classify(&[0x9b]), Some(Fix::Skip(1)));
        assert_eq!(classify(&[0x0f, 0x77]), Some(Fix::Skip(2)));
        assert_eq!(classify(&[0xdb, 0xe2]), Some(Fix::Skip(2)));
        // fildl 0x0(%rip): DB 05 disp32
        assert_eq!(
            classify(&[0xdb, 0x05, 1, 2, 3, 4, 0x90]),
            Some(Fix::Skip(6))
        );
        // fildl abs via SIB: DB 04 25 disp32
        assert_eq!(
            classify(&[0xdb, 0x04, 0x25, 1, 2, 3, 4]),
            Some(Fix::Skip(7))
        );
        // fildl 8(%rax): DB 40 08
        assert_eq!(classify(&[0xdb, 0x40, 0x08]), Some(Fix::Skip(3)));
        // with a REX prefix
        assert_eq!(classify(&[0x48, 0xdf, 0x28]), Some(Fix::Skip(3)));
        // popcnt, xrstor, clac: not handled
        assert_eq!(classify(&[0xf3, 0x0f, 0xb8, 0xc0]), None);
        assert_eq!(classify(&[0x0f, 0xae, 0x2f]), None);
        assert_eq!(classify(&[0x0f, 0x01, 0xca]), None);
        assert_eq!(classify(&[0xdb, 0xc0]), None);
        assert_eq!(classify(&[]), None);
    }
}
