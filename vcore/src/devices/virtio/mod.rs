//! virtio devices on the modern virtio-pci transport ([`pci`]): a block
//! device ([`blk`]), an entropy source ([`rng`]) and a NIC ([`net`]).
//!
//! Each device runs its queues on an I/O thread of its own, named
//! `io-<id>` (`io-blk0`, `io-rng0`), woken by KVM ioeventfds on the
//! queue-notify registers, so vCPU threads never wait for a disk. The
//! split virtqueues come from the `virtio-queue` crate; descriptor chains
//! are checked before use, and a malformed one (a loop, an address outside
//! guest RAM, a length past the end of RAM, a missing header or status
//! byte) puts the device in the DEVICE_NEEDS_RESET state: it stops serving
//! its queues, raises a configuration interrupt and logs the fault once.
//! The VMM keeps running; a driver reset revives the device.
//!
//! A request normally fills one chain ([`QueueHandler::handle`]); a queue
//! whose requests may fill several (virtio-net RX with mergeable buffers)
//! takes chains one by one from an [`Avail`] ([`QueueHandler::handle_many`])
//! and may put them back when there are too few. [`ring`] is the driver's
//! side of a queue, for tests and harnesses.

pub mod blk;
pub mod net;
pub mod pci;
pub mod ring;
pub mod rng;

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::bus::Bus;
use crate::devices::pci::msix::{SharedMsix, NO_VECTOR};
use crate::devices::pci::PciRoot;

/// `VIRTIO_F_VERSION_1`: the modern interface.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << 28;

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// What the transport needs to know about a device.
pub trait VirtioDevice: Send {
    /// virtio device type (2 block, 4 entropy).
    fn device_type(&self) -> u16;
    /// PCI class code (24 bits).
    fn pci_class(&self) -> u32;
    /// Short id: the I/O thread is `io-<id>`.
    fn id(&self) -> &str;
    /// Offered features.
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Read the device-specific configuration.
    fn read_config(&self, off: u64, data: &mut [u8]);
    /// Write the device-specific configuration (ignored by default).
    fn write_config(&mut self, _off: u64, _data: &[u8]) {}
    /// A handler for the queues, run on the I/O thread, for the features
    /// the driver accepted.
    fn handler(&self, acked: u64) -> Box<dyn QueueHandler>;
}

/// A descriptor chain the device cannot make sense of.
#[derive(Debug)]
pub struct Malformed(pub String);

/// Serves the requests of a device's queues.
pub trait QueueHandler: Send {
    /// Handle one request (a checked descriptor chain); returns the number
    /// of bytes written into the guest's buffers.
    fn handle(
        &mut self,
        queue: usize,
        mem: &GuestMemoryMmap,
        chain: &Chain,
    ) -> Result<u32, Malformed>;
    /// Called when the device stops (reset, VM exit).
    fn stop(&mut self) {}
    /// Whether queue `queue` has work for a buffer now (virtio-net RX: a
    /// frame waits); when false the queue's buffers stay available.
    fn ready(&mut self, _queue: usize) -> bool {
        true
    }
    /// An extra fd the I/O thread polls (a tap) and the queue to serve
    /// when it is readable.
    fn poll_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }
    /// Whether the extra fd should be polled now (not while a frame
    /// already waits for a buffer).
    fn want_fd(&self) -> bool {
        true
    }
    /// Whether a request of queue `queue` may fill several descriptor
    /// chains (virtio-net RX with `VIRTIO_NET_F_MRG_RXBUF`): such a queue is
    /// served by [`QueueHandler::handle_many`] instead of
    /// [`QueueHandler::handle`].
    fn many(&self, _queue: usize) -> bool {
        false
    }
    /// Handle one request of a [`QueueHandler::many`] queue, taking as many
    /// chains as it needs from `avail`, in ring order. Returns the bytes
    /// written into each chain used, in order; chains taken but not listed
    /// go back to the ring. `Ok(None)`: not enough buffers yet; every chain
    /// taken goes back and the queue waits for the driver to add more.
    fn handle_many(
        &mut self,
        queue: usize,
        _mem: &GuestMemoryMmap,
        _avail: &mut Avail<'_>,
    ) -> Result<Option<Vec<u32>>, Malformed> {
        Err(Malformed(format!(
            "queue {queue} takes one chain per request"
        )))
    }
}

/// The available chains of a queue, for [`QueueHandler::handle_many`].
pub struct Avail<'a> {
    q: &'a mut Queue,
    mem: &'a GuestMemoryMmap,
    heads: Vec<u16>,
}

impl Avail<'_> {
    /// Take the next available chain, checked; `None` when the ring is
    /// empty.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Chain>, Malformed> {
        let chain = match self.q.iter(self.mem) {
            Ok(mut it) => it.next(),
            Err(e) => return Err(Malformed(format!("available ring: {e}"))),
        };
        let Some(chain) = chain else { return Ok(None) };
        self.heads.push(chain.head_index());
        let descs: Vec<Descriptor> = chain.collect();
        Chain::check(self.mem, &descs).map(Some)
    }

    /// How many chains the ring holds at most (the queue size).
    pub fn queue_size(&self) -> u16 {
        self.q.size()
    }

    /// How many chains were taken so far.
    pub fn taken(&self) -> usize {
        self.heads.len()
    }
}

/// A checked descriptor chain: its readable then writable buffers, all of
/// them inside guest RAM.
#[derive(Debug, Default)]
pub struct Chain {
    /// Device-readable buffers (address, length), in order.
    pub readable: Vec<(GuestAddress, u32)>,
    /// Device-writable buffers, in order.
    pub writable: Vec<(GuestAddress, u32)>,
}

impl Chain {
    /// Check the descriptors of a chain: every buffer inside guest RAM,
    /// the chain ending (no loop, no dangling `next`), readable buffers
    /// before writable ones.
    pub fn check(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<Chain, Malformed> {
        let Some(last) = descs.last() else {
            return Err(Malformed(
                "empty descriptor chain (bad index or indirect table)".into(),
            ));
        };
        if last.has_next() {
            return Err(Malformed(format!(
                "descriptor chain breaks off after {} descriptor(s): a loop, a next index past \
                 the queue, an unreadable descriptor or more than 4 GiB in total",
                descs.len()
            )));
        }
        let mut c = Chain::default();
        for d in descs {
            let (addr, len) = (d.addr(), d.len());
            if len > 0 && !GuestMemoryBackend::check_range(mem, addr, len as usize) {
                return Err(Malformed(format!(
                    "buffer at {:#x} of {} bytes is outside guest RAM",
                    addr.0, len
                )));
            }
            if d.is_write_only() {
                c.writable.push((addr, len));
            } else if !c.writable.is_empty() {
                return Err(Malformed(
                    "device-readable buffer after a device-writable one".into(),
                ));
            } else {
                c.readable.push((addr, len));
            }
        }
        Ok(c)
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.1)).sum()
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.1)).sum()
    }
}

/// Copy `buf.len()` bytes starting `skip` bytes into `segs` out of guest memory.
pub fn gather(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, u32)],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<(), Malformed> {
    let mut done = 0usize;
    for &(addr, len) in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], GuestAddress(addr.0 + skip))
            .map_err(|e| Malformed(format!("guest memory read failed: {e}")))?;
        done += n;
        skip = 0;
    }
    if done < buf.len() {
        return Err(Malformed("request shorter than its header says".into()));
    }
    Ok(())
}

/// Copy `buf` into guest memory starting `skip` bytes into `segs`.
pub fn scatter(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, u32)],
    mut skip: u64,
    buf: &[u8],
) -> Result<(), Malformed> {
    let mut done = 0usize;
    for &(addr, len) in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(buf.len() - done);
        mem.write_slice(&buf[done..done + n], GuestAddress(addr.0 + skip))
            .map_err(|e| Malformed(format!("guest memory write failed: {e}")))?;
        done += n;
        skip = 0;
    }
    if done < buf.len() {
        return Err(Malformed("buffers too short for the reply".into()));
    }
    Ok(())
}

/// How a device interrupts the guest: MSI-X vectors chosen by the driver,
/// the ISR byte, and the device status (for NEEDS_RESET).
#[derive(Clone)]
pub struct Interrupt {
    msix: SharedMsix,
    isr: Arc<AtomicU8>,
    status: Arc<AtomicU8>,
    config_vector: Arc<AtomicU16>,
    queue_vectors: Arc<Vec<u16>>,
}

impl Interrupt {
    /// Tell the driver that queue `q` has used buffers.
    pub fn queue(&self, q: usize) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        let v = self.queue_vectors.get(q).copied().unwrap_or(NO_VECTOR);
        if v != NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger(v);
        }
    }

    /// Tell the driver the configuration (or status) changed.
    pub fn config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        let v = self.config_vector.load(Ordering::SeqCst);
        if v != NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger(v);
        }
    }

    /// Set DEVICE_NEEDS_RESET and raise a configuration interrupt.
    pub fn needs_reset(&self) {
        self.status.fetch_or(status::NEEDS_RESET, Ordering::SeqCst);
        self.config();
    }
}

/// The I/O thread of one device: wait for queue notifications (or the stop
/// event), serve the queues, interrupt the guest.
pub(crate) fn io_loop(
    name: String,
    mut handler: Box<dyn QueueHandler>,
    mut queues: Vec<(usize, Queue)>,
    evts: Vec<vmm_sys_util::eventfd::EventFd>,
    stop: vmm_sys_util::eventfd::EventFd,
    mem: GuestMemoryMmap,
    irq: Interrupt,
) {
    use std::os::fd::AsRawFd;
    let mut broken = false;
    let mut fds: Vec<libc::pollfd> = evts
        .iter()
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    fds.push(libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let stop_idx = evts.len();
    let extra = handler.poll_fd();
    if let Some((fd, _)) = extra {
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
    }
    // Requests may already be waiting (a driver that notified before
    // DRIVER_OK, or a restart): look at every queue once.
    let mut ready: Vec<bool> = vec![true; queues.len()];
    loop {
        for (k, (qi, q)) in queues.iter_mut().enumerate() {
            if !ready[k] || broken {
                continue;
            }
            if let Err(m) = serve(*qi, q, &mem, handler.as_mut(), Some(&irq)) {
                eprintln!(
                    "vmrun: {name}: malformed request on queue {qi}: {}; device marked \
                     DEVICE_NEEDS_RESET until the guest resets it",
                    m.0
                );
                broken = true;
                irq.needs_reset();
            }
        }
        for f in fds.iter_mut() {
            f.revents = 0;
        }
        if extra.is_some() {
            fds[stop_idx + 1].events = if handler.want_fd() && !broken {
                libc::POLLIN
            } else {
                0
            };
        }
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                ready.fill(false);
                continue;
            }
            break;
        }
        if fds[stop_idx].revents != 0 {
            break;
        }
        for (k, e) in evts.iter().enumerate() {
            ready[k] = fds[k].revents != 0;
            if ready[k] {
                let _ = e.read();
            }
        }
        if let Some((_, q)) = extra {
            let rev = fds[stop_idx + 1].revents;
            if rev & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                // The backend hung up (passt exited): stop polling it, or
                // poll would return at once forever. What it sent before
                // is still delivered as RX buffers come.
                eprintln!("vmrun: {name}: the network backend closed its end");
                fds[stop_idx + 1].fd = -1;
            }
            if rev != 0 {
                if let Some(k) = queues.iter().position(|(qi, _)| *qi == q) {
                    ready[k] = true;
                }
            }
        }
    }
    handler.stop();
}

/// Serve queue `qi` until it is empty (or the handler has nothing to put
/// in its buffers); interrupt the guest through `irq` if it wants. The I/O
/// thread's loop; public for harnesses that drive a handler without a VM
/// (`irq` None: no interrupts).
pub fn serve(
    qi: usize,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    handler: &mut dyn QueueHandler,
    irq: Option<&Interrupt>,
) -> Result<(), Malformed> {
    let mut used_any = false;
    let res = loop {
        if let Err(e) = q.disable_notification(mem) {
            break Err(Malformed(format!("used ring not accessible: {e}")));
        }
        let mut failed = None;
        let mut idle = false;
        // The available index when a multi-chain request found too few
        // buffers: if it moved before notifications were enabled, retry.
        let mut short: Option<u16> = None;
        loop {
            if !handler.ready(qi) {
                idle = true;
                break;
            }
            if handler.many(qi) {
                let start = q.next_avail();
                let mut av = Avail {
                    q: &mut *q,
                    mem,
                    heads: Vec::new(),
                };
                let r = handler.handle_many(qi, mem, &mut av);
                let heads = av.heads;
                match r {
                    Ok(Some(lens)) if lens.len() <= heads.len() => {
                        q.set_next_avail(start.wrapping_add(lens.len() as u16));
                        for (&h, &l) in heads.iter().zip(&lens) {
                            if let Err(e) = q.add_used(mem, h, l) {
                                failed = Some(Malformed(format!("used ring: {e}")));
                                break;
                            }
                            used_any = true;
                        }
                        if failed.is_some() {
                            break;
                        }
                    }
                    Ok(Some(_)) => {
                        failed = Some(Malformed("device used more chains than it took".into()));
                        break;
                    }
                    Ok(None) => {
                        q.set_next_avail(start);
                        match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
                            Ok(i) => short = Some(i.0),
                            Err(e) => failed = Some(Malformed(format!("available ring: {e}"))),
                        }
                        idle = true;
                        break;
                    }
                    Err(m) => {
                        failed = Some(m);
                        break;
                    }
                }
                continue;
            }
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    failed = Some(Malformed(format!("available ring: {e}")));
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.clone().collect();
            let r = Chain::check(mem, &descs).and_then(|c| handler.handle(qi, mem, &c));
            match r {
                Ok(len) => {
                    if let Err(e) = q.add_used(mem, head, len) {
                        failed = Some(Malformed(format!("used ring: {e}")));
                        break;
                    }
                    used_any = true;
                }
                Err(m) => {
                    failed = Some(m);
                    break;
                }
            }
        }
        if let Some(m) = failed {
            break Err(m);
        }
        if idle && short.is_none() {
            // Nothing to put in the buffers (no frame waits): they stay
            // available, and while some are the device needs no kick; the
            // backend's fd wakes it. Ask for a kick only when the ring is
            // empty, as QEMU does for virtio-net RX: a guest reposting
            // buffers then costs no VM exits.
            match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
                Ok(i) if i.0 != q.next_avail() => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(Malformed(format!("available ring: {e}"))),
            }
            if let Err(e) = q.enable_notification(mem) {
                break Err(Malformed(format!("used ring not accessible: {e}")));
            }
            break Ok(());
        }
        if idle {
            // Too few buffers for the waiting request: leave them for later.
            if let Err(e) = q.enable_notification(mem) {
                break Err(Malformed(format!("used ring not accessible: {e}")));
            }
            if let Some(seen) = short {
                // Buffers added while notifications were off would
                // never be announced: look again.
                match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
                    Ok(i) if i.0 != seen => continue,
                    Ok(_) => {}
                    Err(e) => break Err(Malformed(format!("available ring: {e}"))),
                }
            }
            break Ok(());
        }
        match q.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break Ok(()),
            Err(e) => break Err(Malformed(format!("used ring not accessible: {e}"))),
        }
    };
    if used_any && q.needs_notification(mem).unwrap_or(true) {
        if let Some(irq) = irq {
            irq.queue(qi);
        }
    }
    res
}

/// A block device to attach.
#[derive(Clone)]
pub struct DiskSpec {
    /// Short id (`blk0`): names the I/O thread `io-blk0`.
    pub id: String,
    /// The image.
    pub disk: Arc<dyn crate::image::BlockDevice>,
    /// Serial number returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes used).
    pub serial: String,
    /// Cache mode.
    pub cache: blk::CacheMode,
    /// Pass discard requests to the image (`discard=unmap`).
    pub discard: bool,
    /// A raw image whose format was probed: like QEMU, refuse guest writes
    /// to sector 0 that would make it probe as qcow2.
    pub restrict_block0: bool,
}

/// The virtio-pci devices of a VM.
pub struct PciDevices {
    root: PciRoot,
    devices: Vec<Arc<Mutex<pci::VirtioPci>>>,
}

impl PciDevices {
    /// The root bus.
    pub fn root(&self) -> &PciRoot {
        &self.root
    }

    /// Stop every device's I/O thread and flush the disks.
    pub fn shutdown(&self) {
        for d in &self.devices {
            d.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        }
    }
}

/// Build the PCI root bus with a virtio-blk device per disk and, if asked,
/// a virtio-rng device, and put them on the buses.
pub fn attach(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    pio: &Bus,
    mmio: &Bus,
    disks: &[DiskSpec],
    rng: bool,
    nets: &[net::NetSpec],
) -> Result<PciDevices, String> {
    let root = PciRoot::new();
    root.attach(pio, mmio).map_err(|e| e.to_string())?;
    let router = crate::devices::pci::msix::GsiRouter::new(vm.clone());
    let mut devs: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in disks {
        devs.push(Box::new(blk::Blk::new(d)));
    }
    if rng {
        devs.push(Box::new(rng::Rng::new("rng0")));
    }
    for n in nets {
        devs.push(Box::new(net::Net::new(n)));
    }
    let mut devices = Vec::new();
    for dev in devs {
        let id = dev.id().to_string();
        let d = pci::VirtioPci::create(dev, vm, mem, mmio, &root, &router)
            .map_err(|e| format!("virtio device {id}: {e}"))?;
        devices.push(d);
    }
    Ok(PciDevices { root, devices })
}
