//! The modern virtio-pci transport (virtio 1.x §4.1): vendor capabilities
//! pointing at common, notify, ISR and device configuration structures in
//! BAR 0, MSI-X in the same BAR, queue notifications on KVM ioeventfds.
//!
//! BAR 0 layout (32 KiB, 32-bit memory):
//!
//! | offset | structure |
//! |--------|-----------|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device configuration |
//! | 0x3000 | notifications, 4 bytes per queue |
//! | 0x4000 | MSI-X table |
//! | 0x5000 | MSI-X pending bits |

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, Interrupt, VirtioDevice, F_VERSION_1};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::pci::config::{ConfigSpace, Ids};
use crate::devices::pci::msix::{Msix, SharedMsix, SharedRouter, NO_VECTOR};
use crate::devices::pci::{PciDevice, PciRoot};

const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const NOTIFY_MULT: u32 = 4;
const REGION: u64 = 0x1000;

/// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

#[derive(Clone, Copy, Default)]
struct QueueCfg {
    max: u16,
    size: u16,
    ready: bool,
    vector: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueCfg {
    fn new(max: u16) -> Self {
        QueueCfg {
            max,
            size: max,
            vector: NO_VECTOR,
            ..Default::default()
        }
    }
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio device on PCI.
pub struct VirtioPci {
    cfg: ConfigSpace,
    msix_cap: usize,
    msix: SharedMsix,
    dev: Box<dyn VirtioDevice>,
    dev_feature_sel: u32,
    drv_feature_sel: u32,
    driver_features: u64,
    config_vector: Arc<AtomicU16>,
    status: Arc<AtomicU8>,
    isr: Arc<AtomicU8>,
    queue_sel: u16,
    queues: Vec<QueueCfg>,
    notify: Vec<EventFd>,
    bar: u64,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    worker: Option<Worker>,
    warned: bool,
    bus: Option<MmioHandle>,
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut v = vec![0x09, 0, len, cfg_type, 0, 0, 0, 0];
    v.extend_from_slice(&(offset as u32).to_le_bytes());
    v.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

impl VirtioPci {
    /// Create the device, allocate its BAR, plug it into `root` and map it
    /// on `mmio`, with an ioeventfd per queue.
    pub fn create(
        dev: Box<dyn VirtioDevice>,
        vm: &Arc<VmFd>,
        mem: &GuestMemoryMmap,
        mmio: &Bus,
        root: &PciRoot,
        router: &SharedRouter,
    ) -> Result<Arc<Mutex<VirtioPci>>, String> {
        let nq = dev.queue_max_sizes().len();
        let bar = root
            .alloc_bar(BAR_SIZE)
            .ok_or("the PCI memory window is full")?;
        let dt = dev.device_type();
        let mut cfg = ConfigSpace::new(Ids {
            vendor: 0x1af4,
            device: 0x1040 + dt,
            class: dev.pci_class(),
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        });
        cfg.add_bar(0, bar as u32, BAR_SIZE as u32);
        // One vector per queue plus one for configuration changes.
        let msix = Msix::new(nq as u16 + 1, router).map_err(|e| format!("MSI-X: {e}"))?;
        let msix_cap = cfg.add_capability(&msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32));
        cfg.set_byte_wmask(msix_cap + 3, 0xc0);
        cfg.add_capability(&cap(CAP_COMMON, COMMON, 0x38, None));
        cfg.add_capability(&cap(CAP_ISR, ISR, 1, None));
        cfg.add_capability(&cap(CAP_DEVICE, DEVICE, REGION, None));
        cfg.add_capability(&cap(
            CAP_NOTIFY,
            NOTIFY,
            nq as u64 * u64::from(NOTIFY_MULT),
            Some(NOTIFY_MULT),
        ));
        let mut notify = Vec::new();
        for q in 0..nq {
            let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
            let addr = IoEventAddress::Mmio(bar + NOTIFY + q as u64 * u64::from(NOTIFY_MULT));
            vm.register_ioevent(&e, &addr, NoDatamatch)
                .map_err(|e| format!("ioeventfd: {e}"))?;
            notify.push(e);
        }
        let queues = dev
            .queue_max_sizes()
            .into_iter()
            .map(QueueCfg::new)
            .collect();
        let d = Arc::new(Mutex::new(VirtioPci {
            cfg,
            msix_cap,
            msix: Arc::new(Mutex::new(msix)),
            dev,
            dev_feature_sel: 0,
            drv_feature_sel: 0,
            driver_features: 0,
            config_vector: Arc::new(AtomicU16::new(NO_VECTOR)),
            status: Arc::new(AtomicU8::new(0)),
            isr: Arc::new(AtomicU8::new(0)),
            queue_sel: 0,
            queues,
            notify,
            bar,
            vm: vm.clone(),
            mem: mem.clone(),
            worker: None,
            warned: false,
            bus: None,
        }));
        mmio.insert(bar, BAR_SIZE, d.clone())
            .map_err(|e| e.to_string())?;
        root.add(d.clone()).ok_or("no free PCI slot")?;
        // Remember the bus so the BAR can move.
        d.lock().unwrap_or_else(|e| e.into_inner()).bus = Some(MmioHandle {
            bus: mmio.clone(),
            me: Arc::downgrade(&d),
        });
        Ok(d)
    }

    fn status(&self) -> u8 {
        self.status.load(Ordering::SeqCst)
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.stop.write(1);
            let _ = w.thread.join();
        }
    }

    /// Stop the I/O thread (VM exit).
    pub fn shutdown(&mut self) {
        self.stop_worker();
        self.bus = None;
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.status.store(0, Ordering::SeqCst);
        self.isr.store(0, Ordering::SeqCst);
        self.driver_features = 0;
        self.dev_feature_sel = 0;
        self.drv_feature_sel = 0;
        self.queue_sel = 0;
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for q in self.queues.iter_mut() {
            *q = QueueCfg::new(q.max);
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        let mut evts = Vec::new();
        let mut vectors = Vec::new();
        for (i, qc) in self.queues.iter().enumerate() {
            vectors.push(qc.vector);
            if !qc.ready {
                continue;
            }
            let mut q = match Queue::new(qc.max) {
                Ok(q) => q,
                Err(_) => continue,
            };
            q.set_size(qc.size);
            q.set_desc_table_address(Some(qc.desc as u32), Some((qc.desc >> 32) as u32));
            q.set_avail_ring_address(Some(qc.avail as u32), Some((qc.avail >> 32) as u32));
            q.set_used_ring_address(Some(qc.used as u32), Some((qc.used >> 32) as u32));
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                eprintln!(
                    "vmrun: virtio {}: queue {i} is not valid (size {}, rings at {:#x}/{:#x}/{:#x}); \
                     device marked DEVICE_NEEDS_RESET",
                    self.dev.id(),
                    qc.size,
                    qc.desc,
                    qc.avail,
                    qc.used
                );
                self.status.fetch_or(status::NEEDS_RESET, Ordering::SeqCst);
                return;
            }
            let Ok(e) = self.notify[i].try_clone() else {
                continue;
            };
            queues.push((i, q));
            evts.push(e);
        }
        let irq = Interrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            status: self.status.clone(),
            config_vector: self.config_vector.clone(),
            queue_vectors: Arc::new(vectors),
        };
        let Ok(stop) = EventFd::new(libc::EFD_NONBLOCK) else {
            return;
        };
        let Ok(stop2) = stop.try_clone() else { return };
        let handler = self.dev.handler(self.driver_features);
        let name: String = format!("io-{}", self.dev.id()).chars().take(15).collect();
        let mem = self.mem.clone();
        let n = name.clone();
        match std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || super::io_loop(n, handler, queues, evts, stop2, mem, irq))
        {
            Ok(thread) => self.worker = Some(Worker { stop, thread }),
            Err(e) => eprintln!("vmrun: could not start thread {name}: {e}"),
        }
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status();
        let mut v = v | (old & status::NEEDS_RESET);
        if v & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.dev.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                v &= !status::FEATURES_OK;
            }
        }
        self.status.store(v, Ordering::SeqCst);
        if v & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 && self.worker.is_none() {
            self.activate();
        }
    }

    fn common_read(&self, off: u64, data: &mut [u8]) {
        let mut b = [0u8; 0x40];
        let feats = self.dev.features();
        let df = match self.dev_feature_sel {
            0 => feats as u32,
            1 => (feats >> 32) as u32,
            _ => 0,
        };
        let drf = match self.drv_feature_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        b[0..4].copy_from_slice(&self.dev_feature_sel.to_le_bytes());
        b[4..8].copy_from_slice(&df.to_le_bytes());
        b[8..12].copy_from_slice(&self.drv_feature_sel.to_le_bytes());
        b[12..16].copy_from_slice(&drf.to_le_bytes());
        b[16..18].copy_from_slice(&self.config_vector.load(Ordering::SeqCst).to_le_bytes());
        b[18..20].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        b[20] = self.status();
        b[21] = 0; // config generation: the device config never changes
        b[22..24].copy_from_slice(&self.queue_sel.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_sel)) {
            b[24..26].copy_from_slice(&q.size.to_le_bytes());
            b[26..28].copy_from_slice(&q.vector.to_le_bytes());
            b[28..30].copy_from_slice(&u16::from(q.ready).to_le_bytes());
            b[30..32].copy_from_slice(&self.queue_sel.to_le_bytes());
            b[32..40].copy_from_slice(&q.desc.to_le_bytes());
            b[40..48].copy_from_slice(&q.avail.to_le_bytes());
            b[48..56].copy_from_slice(&q.used.to_le_bytes());
        }
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(off as usize + i).copied().unwrap_or(0);
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        let n = self.msix.lock().unwrap_or_else(|e| e.into_inner()).len();
        if v < n {
            v
        } else {
            NO_VECTOR
        }
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let v = le(data);
        let live = self.status() & status::DRIVER_OK != 0;
        let sel = usize::from(self.queue_sel);
        match off {
            0x00 => self.dev_feature_sel = v as u32,
            0x08 => self.drv_feature_sel = v as u32,
            0x0c if self.status() & status::FEATURES_OK == 0 => match self.drv_feature_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            0x10 => {
                let vec = self.valid_vector(v as u16);
                self.config_vector.store(vec, Ordering::SeqCst);
            }
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_sel = v as u16,
            _ if live => {} // queue registers are frozen once the driver is live
            0x18 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.size = (v as u16).min(q.max);
                }
            }
            0x1a => {
                let vec = self.valid_vector(v as u16);
                if let Some(q) = self.queues.get_mut(sel) {
                    q.vector = vec;
                }
            }
            0x1c => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.ready = v & 1 == 1;
                }
            }
            0x20..=0x37 => {
                let Some(q) = self.queues.get_mut(sel) else {
                    return;
                };
                let field = match off & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.avail,
                    _ => &mut q.used,
                };
                if data.len() == 8 {
                    *field = v;
                } else if off & 4 == 0 {
                    *field = (*field & !0xffff_ffff) | (v & 0xffff_ffff);
                } else {
                    *field = (*field & 0xffff_ffff) | (v << 32);
                }
            }
            _ => {}
        }
    }
}

/// The MMIO bus and a weak reference to the device itself, to move the BAR.
struct MmioHandle {
    bus: Bus,
    me: std::sync::Weak<Mutex<VirtioPci>>,
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, off: usize, data: &mut [u8]) {
        self.cfg.read(off, data);
        // The MSI-X message control lives in the Msix state.
        let ctl = self.msix_cap + 2;
        for (i, d) in data.iter_mut().enumerate() {
            if off + i == ctl + 1 {
                let m = self.msix.lock().unwrap_or_else(|e| e.into_inner());
                let en = if m.enabled() { 0x80 } else { 0 };
                *d = (*d & 0x3f) | en | (self.cfg.byte(ctl + 1) & 0x40);
            }
        }
    }

    fn config_write(&mut self, off: usize, data: &[u8]) {
        let moved = self.cfg.write(off, data);
        let ctl = self.msix_cap + 2;
        if off <= ctl + 1 && off + data.len() > ctl + 1 {
            let c = self.cfg.word(ctl);
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_control(c);
        }
        for m in moved {
            let Some(h) = &self.bus else { continue };
            if let Some(me) = h.me.upgrade() {
                h.bus.remove(m.old);
                if let Err(e) = h.bus.insert(m.new, BAR_SIZE, me) {
                    eprintln!("vmrun: virtio {}: cannot move BAR 0: {e}", self.dev.id());
                }
            }
            for (q, e) in self.notify.iter().enumerate() {
                let o = NOTIFY + q as u64 * u64::from(NOTIFY_MULT);
                let _ =
                    self.vm
                        .unregister_ioevent(e, &IoEventAddress::Mmio(m.old + o), NoDatamatch);
                let _ = self
                    .vm
                    .register_ioevent(e, &IoEventAddress::Mmio(m.new + o), NoDatamatch);
            }
            self.bar = m.new;
        }
    }
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON + REGION => self.common_read(o, data),
            o if (ISR..ISR + REGION).contains(&o) => {
                data.fill(0);
                if o == ISR {
                    if let Some(d) = data.first_mut() {
                        *d = self.isr.swap(0, Ordering::SeqCst);
                    }
                }
            }
            o if (DEVICE..DEVICE + REGION).contains(&o) => self.dev.read_config(o - DEVICE, data),
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .table_read(o - MSIX_TABLE, data),
            o if (MSIX_PBA..MSIX_PBA + REGION).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pba_read(o - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + REGION => self.common_write(o, data),
            o if (DEVICE..DEVICE + REGION).contains(&o) => self.dev.write_config(o - DEVICE, data),
            o if (NOTIFY..NOTIFY + REGION).contains(&o) => {
                // Normally caught by the ioeventfd in the kernel; this is the
                // slow path (e.g. while the BAR moves).
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULT)) as usize;
                if let Some(e) = self.notify.get(q) {
                    let _ = e.write(1);
                } else if !self.warned {
                    self.warned = true;
                    eprintln!(
                        "vmrun: virtio {}: notify of missing queue {q}",
                        self.dev.id()
                    );
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .table_write(o - MSIX_TABLE, data),
            _ => {}
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
