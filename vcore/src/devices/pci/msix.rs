//! MSI-X: the capability, the vector table and pending-bit array a device
//! exposes in a BAR, and the KVM GSI routing that turns a vector into an
//! interrupt through an irqfd.
//!
//! Every vector owns a GSI and an event fd registered as a KVM irqfd at
//! creation. When the guest programs and unmasks a vector, the GSI is routed
//! to the vector's MSI message. A device raises a vector with
//! [`Msix::trigger`]: a write to the event fd when the vector is unmasked,
//! the pending bit otherwise (delivered on unmask, as the spec requires).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// Size of one MSI-X table entry.
pub const ENTRY_SIZE: u64 = 16;
/// MSI-X capability ID.
pub const CAP_ID: u8 = 0x11;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// "No vector" in virtio's vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// The VM's interrupt routing table: KVM's default routes for the PIC and
/// IOAPIC pins (replaced as a whole by `KVM_SET_GSI_ROUTING`, so they are
/// repeated here) plus one MSI route per programmed vector.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    next: u32,
    msi: BTreeMap<u32, (u64, u32)>,
}

/// A router shared by all devices of a VM.
pub type SharedRouter = Arc<Mutex<GsiRouter>>;

/// First GSI after the 24 IOAPIC pins.
const FIRST_MSI_GSI: u32 = 24;

impl GsiRouter {
    /// A router for `vm` (which must already have its in-kernel irqchip).
    pub fn new(vm: Arc<VmFd>) -> SharedRouter {
        Arc::new(Mutex::new(GsiRouter {
            vm,
            next: FIRST_MSI_GSI,
            msi: BTreeMap::new(),
        }))
    }

    /// The VM fd.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// A fresh GSI for an MSI vector.
    pub fn alloc(&mut self) -> u32 {
        let g = self.next;
        self.next += 1;
        g
    }

    /// Route `gsi` to an MSI message, or remove its route (`None`).
    pub fn set(&mut self, gsi: u32, msg: Option<(u64, u32)>) -> std::io::Result<()> {
        let changed = match msg {
            Some(m) => self.msi.insert(gsi, m) != Some(m),
            None => self.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit()?;
        }
        Ok(())
    }

    fn commit(&self) -> std::io::Result<()> {
        let mut entries = default_routes();
        for (&gsi, &(addr, data)) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| std::io::Error::other("too many interrupt routes"))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// KVM's default routing (virt/kvm/irqchip defaults on x86): GSI 0-15 to
/// the IOAPIC pin and the PIC, 16-23 to the IOAPIC only.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..24u32 {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
        e.u.irqchip.pin = gsi;
        v.push(e);
        if gsi < 16 {
            let mut p = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            p.u.irqchip.irqchip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            p.u.irqchip.pin = gsi % 8;
            v.push(p);
        }
    }
    v
}

struct Vector {
    addr: u64,
    data: u32,
    ctrl: u32,
    gsi: u32,
    evt: EventFd,
    pending: bool,
}

/// The MSI-X state of one function.
pub struct Msix {
    vectors: Vec<Vector>,
    control: u16,
    router: SharedRouter,
}

impl Msix {
    /// `n` vectors, each with a GSI and an irqfd.
    pub fn new(n: u16, router: &SharedRouter) -> std::io::Result<Msix> {
        let mut vectors = Vec::new();
        let mut r = router.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..n {
            let evt = EventFd::new(libc::EFD_NONBLOCK)?;
            let gsi = r.alloc();
            r.vm()
                .register_irqfd(&evt, gsi)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            vectors.push(Vector {
                addr: 0,
                data: 0,
                ctrl: VECTOR_MASKED,
                gsi,
                evt,
                pending: false,
            });
        }
        drop(r);
        Ok(Msix {
            vectors,
            control: 0,
            router: router.clone(),
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.vectors.len() as u16
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The capability body for [`super::config::ConfigSpace::add_capability`],
    /// with the table at `table_off` and the PBA at `pba_off` of BAR `bar`.
    pub fn capability(&self, bar: u8, table_off: u32, pba_off: u32) -> Vec<u8> {
        let mut v = vec![CAP_ID, 0];
        v.extend_from_slice(&(self.len() - 1).to_le_bytes());
        v.extend_from_slice(&(table_off | u32::from(bar)).to_le_bytes());
        v.extend_from_slice(&(pba_off | u32::from(bar)).to_le_bytes());
        v
    }

    /// Whether MSI-X is enabled by the guest.
    pub fn enabled(&self) -> bool {
        self.control & CTRL_ENABLE != 0
    }

    /// The guest wrote the message control register.
    pub fn set_control(&mut self, control: u16) {
        self.control = control & (CTRL_ENABLE | CTRL_FUNCTION_MASK);
        for i in 0..self.vectors.len() {
            self.update(i);
        }
    }

    fn masked(&self, i: usize) -> bool {
        !self.enabled()
            || self.control & CTRL_FUNCTION_MASK != 0
            || self.vectors[i].ctrl & VECTOR_MASKED != 0
    }

    /// Re-route a vector after a change and deliver its pending interrupt.
    fn update(&mut self, i: usize) {
        let v = &self.vectors[i];
        let route = (self.enabled() && v.ctrl & VECTOR_MASKED == 0).then_some((v.addr, v.data));
        let gsi = v.gsi;
        if let Err(e) = self
            .router
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(gsi, route)
        {
            eprintln!("vmrun: could not route MSI-X vector {i} (GSI {gsi}): {e}");
        }
        if !self.masked(i) && self.vectors[i].pending {
            self.vectors[i].pending = false;
            let _ = self.vectors[i].evt.write(1);
        }
    }

    /// Raise vector `i` (ignored when `i` is out of range or NO_VECTOR).
    pub fn trigger(&mut self, i: u16) {
        let i = usize::from(i);
        if i >= self.vectors.len() {
            return;
        }
        if self.masked(i) {
            self.vectors[i].pending = true;
        } else {
            let _ = self.vectors[i].evt.write(1);
        }
    }

    /// Guest read of the vector table.
    pub fn table_read(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        let i = (off / ENTRY_SIZE) as usize;
        let Some(v) = self.vectors.get(i) else { return };
        let mut entry = [0u8; 16];
        entry[0..8].copy_from_slice(&v.addr.to_le_bytes());
        entry[8..12].copy_from_slice(&v.data.to_le_bytes());
        entry[12..16].copy_from_slice(&v.ctrl.to_le_bytes());
        let o = (off % ENTRY_SIZE) as usize;
        let n = data.len().min(16 - o);
        data[..n].copy_from_slice(&entry[o..o + n]);
    }

    /// Guest write of the vector table.
    pub fn table_write(&mut self, off: u64, data: &[u8]) {
        let i = (off / ENTRY_SIZE) as usize;
        let Some(v) = self.vectors.get_mut(i) else {
            return;
        };
        let mut entry = [0u8; 16];
        entry[0..8].copy_from_slice(&v.addr.to_le_bytes());
        entry[8..12].copy_from_slice(&v.data.to_le_bytes());
        entry[12..16].copy_from_slice(&v.ctrl.to_le_bytes());
        let o = (off % ENTRY_SIZE) as usize;
        let n = data.len().min(16 - o);
        entry[o..o + n].copy_from_slice(&data[..n]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&entry[0..8]);
        v.addr = u64::from_le_bytes(a);
        v.data = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
        v.ctrl = u32::from_le_bytes([entry[12], entry[13], entry[14], entry[15]]) & VECTOR_MASKED;
        self.update(i);
    }

    /// Guest read of the pending-bit array.
    pub fn pba_read(&self, off: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            let base = ((off as usize) + k) * 8;
            let mut byte = 0u8;
            for bit in 0..8 {
                if self.vectors.get(base + bit).is_some_and(|v| v.pending) {
                    byte |= 1 << bit;
                }
            }
            *b = byte;
        }
    }
}

/// An MSI-X state shared between a transport (vCPU side) and an I/O thread.
pub type SharedMsix = Arc<Mutex<Msix>>;
