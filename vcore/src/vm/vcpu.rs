//! The loop of one vCPU thread: run the guest, dispatch its exits.

use std::sync::Arc;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::{pvm, Events, VmControl, VmExit};
use crate::devices::bus::Bus;

pub(crate) struct VcpuCtx {
    pub index: u32,
    pub pio: Bus,
    pub mmio: Bus,
    pub events: Events,
    pub control: Arc<VmControl>,
    pub pvm_quirks: bool,
}

enum Next {
    Continue,
    Stop(VmExit),
    Internal,
}

/// Registers and instruction bytes, for an error message.
fn describe(vcpu: &VcpuFd, index: u32, what: &str, insn: &[u8]) -> String {
    let mut s = format!("vCPU {index}: {what}");
    if let (Ok(r), Ok(sr)) = (vcpu.get_regs(), vcpu.get_sregs()) {
        s += &format!(
            "\n  RIP={:016x} RSP={:016x} RFLAGS={:08x} RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\n  CS={:04x} CR0={:08x} CR3={:016x} CR4={:08x} EFER={:x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, sr.cs.selector, sr.cr0, sr.cr3, sr.cr4, sr.efer
        );
    }
    if !insn.is_empty() {
        let hex: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
        s += &format!("\n  instruction bytes: {}", hex.join(" "));
    }
    s
}

pub(crate) fn run(mut vcpu: VcpuFd, ctx: VcpuCtx) {
    loop {
        if !ctx.control.wait_runnable() {
            return;
        }
        let next = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::Shutdown) => Next::Stop(VmExit::Reset),
            Ok(VcpuExit::Hlt) => Next::Stop(VmExit::PowerOff),
            Ok(VcpuExit::SystemEvent(t, _)) => match t {
                KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(VmExit::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Next::Stop(VmExit::Reset),
                KVM_SYSTEM_EVENT_CRASH => {
                    Next::Stop(VmExit::Error(format!("vCPU {}: guest crashed", ctx.index)))
                }
                other => Next::Stop(VmExit::Error(format!(
                    "vCPU {}: unexpected system event {other}",
                    ctx.index
                ))),
            },
            Ok(VcpuExit::InternalError) => Next::Internal,
            Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => Next::Continue,
            Ok(other) => {
                let what = format!("unhandled exit {other:?}");
                Next::Stop(VmExit::Error(describe(&vcpu, ctx.index, &what, &[])))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => Next::Stop(VmExit::Error(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                ctx.index
            ))),
        };
        match next {
            Next::Continue => {}
            Next::Stop(exit) => {
                let _ = ctx.events.send(exit);
                return;
            }
            Next::Internal => {
                let run = vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the union is the one KVM filled in.
                let (suberror, ndata, data) = unsafe {
                    let i = &run.__bindgen_anon_1.internal;
                    (i.suberror, i.ndata, i.data)
                };
                let failure = pvm::decode(suberror, ndata, &data);
                let fix = if ctx.pvm_quirks {
                    pvm::classify(&failure.insn)
                } else {
                    None
                };
                let applied = fix.map(|f| pvm::apply(&vcpu, f));
                match applied {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        let what = format!("could not step over an emulation failure: {e}");
                        let _ = ctx.events.send(VmExit::Error(describe(
                            &vcpu,
                            ctx.index,
                            &what,
                            &failure.insn,
                        )));
                        return;
                    }
                    None => {
                        let what = format!("KVM internal error, suberror {suberror}");
                        let _ = ctx.events.send(VmExit::Error(describe(
                            &vcpu,
                            ctx.index,
                            &what,
                            &failure.insn,
                        )));
                        return;
                    }
                }
            }
        }
    }
}
