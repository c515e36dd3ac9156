//! virtio-net (virtio 1.x §5.1) over a host backend ([`crate::net`]): one
//! RX and one TX queue, the 12-byte `virtio_net_hdr_v1`, a MAC address and a
//! link-up status, mergeable receive buffers, and — when the backend carries
//! the header through (a tap) — the checksum and TCP segmentation offloads
//! QEMU offers with a tap.
//!
//! With `VIRTIO_NET_F_MRG_RXBUF` a received frame spreads over as many RX
//! chains as it needs, `num_buffers` in its header saying how many; without
//! it a frame must fit one chain (a frame that does not is dropped and the
//! chain stays available). The offloads are passed through: the device
//! never looks inside a frame; it tells the backend which offloads the guest
//! accepts on receive (`TUNSETOFFLOAD`, as QEMU does) and drops a received
//! frame whose header asks for one the guest did not accept.

use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use crate::net::{Backend, Offloads, HDR_LEN};

use super::{
    gather, scatter, Avail, Chain, Malformed, QueueHandler, VirtioDevice, F_INDIRECT_DESC,
    F_VERSION_1,
};

/// `VIRTIO_NET_F_CSUM`: the device takes frames with a partial checksum.
pub const F_CSUM: u64 = 1 << 0;
/// `VIRTIO_NET_F_GUEST_CSUM`: the driver takes frames with a partial checksum.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_GUEST_TSO4`.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// `VIRTIO_NET_F_GUEST_TSO6`.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// `VIRTIO_NET_F_GUEST_ECN`.
pub const F_GUEST_ECN: u64 = 1 << 9;
/// `VIRTIO_NET_F_HOST_TSO4`.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// `VIRTIO_NET_F_HOST_TSO6`.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// `VIRTIO_NET_F_HOST_ECN`.
pub const F_HOST_ECN: u64 = 1 << 13;
/// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may use several buffers.
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// `VIRTIO_NET_F_STATUS`: the config space holds the link status.
pub const F_STATUS: u64 = 1 << 16;
/// The offloads offered when the backend carries them (QEMU's set with a
/// tap, less UFO: Linux taps take no new UFO frames).
pub const F_OFFLOADS: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN;
/// `VIRTIO_NET_S_LINK_UP`.
pub const S_LINK_UP: u16 = 1;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const HDR_F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`.
pub const GSO_ECN: u8 = 0x80;
const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: a 64 KiB GSO frame plus its Ethernet
/// header and room to spare (QEMU's NET_BUFSIZE).
pub const MAX_PACKET: usize = 65536 + 4096;
/// The receive queue.
pub const RXQ: usize = 0;
/// The transmit queue.
pub const TXQ: usize = 1;

/// A NIC to attach.
#[derive(Clone)]
pub struct NetSpec {
    /// Short id (`net0`): names the I/O thread `io-net0`.
    pub id: String,
    /// The MAC address shown to the guest.
    pub mac: [u8; 6],
    /// Where frames go.
    pub backend: Arc<dyn Backend>,
}

/// The virtio-net device model.
pub struct Net {
    spec: NetSpec,
}

impl Net {
    /// A device for a NIC.
    pub fn new(spec: &NetSpec) -> Self {
        Net { spec: spec.clone() }
    }

    /// `virtio_net_config`: mac, status, max_virtqueue_pairs.
    pub fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.spec.mac);
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        1
    }
    fn pci_class(&self) -> u32 {
        0x020000 // network, ethernet
    }
    fn id(&self) -> &str {
        &self.spec.id
    }
    fn features(&self) -> u64 {
        let f = F_VERSION_1 | F_INDIRECT_DESC | F_MAC | F_STATUS | F_MRG_RXBUF;
        if self.spec.backend.offloads() {
            f | F_OFFLOADS
        } else {
            f
        }
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, off: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, d) in data.iter_mut().enumerate() {
            *d = c.get(off as usize + i).copied().unwrap_or(0);
        }
    }
    fn handler(&self, acked: u64) -> Box<dyn QueueHandler> {
        let acked = acked & self.features();
        let b = &self.spec.backend;
        if b.offloads() {
            if let Err(e) = b.set_offloads(guest_offloads(acked)) {
                eprintln!(
                    "vmrun: {}: cannot set the backend's receive offloads: {e}",
                    self.spec.id
                );
            }
        }
        Box::new(NetHandler::new(b.clone(), acked))
    }
}

/// The receive offloads a driver accepted.
pub fn guest_offloads(acked: u64) -> Offloads {
    Offloads {
        csum: acked & F_GUEST_CSUM != 0,
        tso4: acked & F_GUEST_TSO4 != 0,
        tso6: acked & F_GUEST_TSO6 != 0,
        ecn: acked & F_GUEST_ECN != 0,
    }
}

/// The I/O-thread side of a virtio-net device.
pub struct NetHandler {
    backend: Arc<dyn Backend>,
    acked: u64,
    /// A frame read from the backend waiting for RX buffers.
    pending: Option<usize>,
    rx: Vec<u8>,
    tx: Vec<u8>,
    name_logged: bool,
    /// Received frames dropped (too big for the buffers, or an offload the
    /// guest did not accept).
    pub rx_dropped: u64,
}

impl NetHandler {
    /// A handler over a backend, for the features the driver accepted.
    pub fn new(backend: Arc<dyn Backend>, acked: u64) -> Self {
        NetHandler {
            backend,
            acked,
            pending: None,
            rx: vec![0u8; MAX_PACKET],
            tx: Vec::with_capacity(MAX_PACKET),
            name_logged: false,
            rx_dropped: 0,
        }
    }

    /// Whether the guest takes the received frame in `rx` (its header asks
    /// only for offloads the guest accepted); clears DATA_VALID for a
    /// guest without GUEST_CSUM.
    fn rx_acceptable(&mut self) -> bool {
        let csum = self.acked & F_GUEST_CSUM != 0;
        let flags = self.rx[0];
        if !csum {
            if flags & HDR_F_NEEDS_CSUM != 0 {
                return false;
            }
            self.rx[0] &= !HDR_F_DATA_VALID;
        }
        let gso = self.rx[1];
        if gso & GSO_ECN != 0 && self.acked & F_GUEST_ECN == 0 {
            return false;
        }
        match gso & !GSO_ECN {
            0 => true,
            GSO_TCPV4 => self.acked & F_GUEST_TSO4 != 0,
            GSO_TCPV6 => self.acked & F_GUEST_TSO6 != 0,
            _ => false,
        }
    }

    /// Put the pending frame of `n` bytes into RX chains.
    fn receive(
        &mut self,
        n: usize,
        mem: &GuestMemoryMmap,
        avail: &mut Avail<'_>,
    ) -> Result<Option<Vec<u32>>, Malformed> {
        let mrg = self.acked & F_MRG_RXBUF != 0;
        let mut lens = Vec::new();
        let mut first: Option<Chain> = None;
        let mut off = 0usize;
        while off < n {
            let Some(c) = avail.next()? else {
                return Ok(None);
            };
            let room = c.writable_len();
            if room < HDR_LEN as u64 {
                return Err(Malformed(format!(
                    "receive buffer of {room} bytes, shorter than the {HDR_LEN}-byte header"
                )));
            }
            if !mrg && (n as u64) > room {
                // The frame must fit one chain: drop it, leave the chain.
                self.pending = None;
                self.rx_dropped += 1;
                return Ok(Some(Vec::new()));
            }
            let take = (n - off).min(room.min(u64::from(u32::MAX)) as usize);
            scatter(mem, &c.writable, 0, &self.rx[off..off + take])?;
            lens.push(take as u32);
            off += take;
            if first.is_none() {
                first = Some(c);
            }
            if off < n && avail.taken() >= usize::from(avail.queue_size()) {
                // More than the whole ring: it can never fit.
                self.pending = None;
                self.rx_dropped += 1;
                return Ok(Some(Vec::new()));
            }
        }
        if let Some(c) = first {
            let nb = lens.len() as u16;
            scatter(mem, &c.writable, 10, &nb.to_le_bytes())?;
        }
        self.pending = None;
        Ok(Some(lens))
    }
}

impl QueueHandler for NetHandler {
    fn handle(&mut self, q: usize, mem: &GuestMemoryMmap, c: &Chain) -> Result<u32, Malformed> {
        match q {
            TXQ => {
                let len = c.readable_len();
                if len < HDR_LEN as u64 {
                    return Err(Malformed(format!(
                        "transmit buffer of {len} bytes, shorter than the {HDR_LEN}-byte header"
                    )));
                }
                if len > MAX_PACKET as u64 {
                    return Err(Malformed(format!(
                        "transmit frame of {len} bytes is too long (at most {MAX_PACKET} with \
                         the header)"
                    )));
                }
                self.tx.resize(len as usize, 0);
                gather(mem, &c.readable, 0, &mut self.tx)?;
                if let Err(e) = self.backend.send(&self.tx) {
                    // A full tap queue drops the frame, like a wire would.
                    if e.kind() != std::io::ErrorKind::WouldBlock && !self.name_logged {
                        eprintln!("vmrun: virtio-net: sending a frame failed: {e}");
                        self.name_logged = true;
                    }
                }
                Ok(0)
            }
            _ => Err(Malformed(format!("no queue {q}"))),
        }
    }

    fn many(&self, q: usize) -> bool {
        q == RXQ
    }

    fn handle_many(
        &mut self,
        q: usize,
        mem: &GuestMemoryMmap,
        avail: &mut Avail<'_>,
    ) -> Result<Option<Vec<u32>>, Malformed> {
        if q != RXQ {
            return Err(Malformed(format!("queue {q} takes one chain per request")));
        }
        match self.pending {
            Some(n) => self.receive(n, mem, avail),
            None => Ok(None),
        }
    }

    fn stop(&mut self) {
        if self.backend.offloads() {
            let _ = self.backend.set_offloads(Offloads::default());
        }
    }

    fn ready(&mut self, q: usize) -> bool {
        if q != RXQ {
            return true;
        }
        if self.pending.is_some() {
            return true;
        }
        loop {
            match self.backend.recv(&mut self.rx) {
                Ok(n) if n >= HDR_LEN => {
                    if !self.rx_acceptable() {
                        self.rx_dropped += 1;
                        continue;
                    }
                    self.pending = Some(n);
                    return true;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }

    fn poll_fd(&self) -> Option<(RawFd, usize)> {
        self.backend.fd().map(|fd| (fd, RXQ))
    }

    fn want_fd(&self) -> bool {
        self.pending.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::super::ring::{Buf, DriverRing};
    use super::super::serve;
    use super::*;
    use std::sync::Mutex;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    /// A backend over two in-memory queues of frames.
    #[derive(Default)]
    struct Mock {
        rx: Mutex<Vec<Vec<u8>>>,
        tx: Mutex<Vec<Vec<u8>>>,
        offloads: bool,
        set: Mutex<Vec<Offloads>>,
    }

    impl Backend for Mock {
        fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
            let mut q = self.rx.lock().unwrap();
            if q.is_empty() {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let f = q.remove(0);
            buf[..f.len()].copy_from_slice(&f);
            Ok(f.len())
        }
        fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
            self.tx.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn fd(&self) -> Option<RawFd> {
            None
        }
        fn offloads(&self) -> bool {
            self.offloads
        }
        fn set_offloads(&self, o: Offloads) -> std::io::Result<()> {
            self.set.lock().unwrap().push(o);
            Ok(())
        }
    }

    const RING: u64 = 0x10_0000;
    const BUFS: u64 = 0x20_0000;

    struct T {
        mem: GuestMemoryMmap,
        m: Arc<Mock>,
        h: NetHandler,
        ring: DriverRing,
        q: Queue,
    }

    fn setup(acked: u64) -> T {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let m = Arc::new(Mock::default());
        let h = NetHandler::new(m.clone(), acked);
        let ring = DriverRing::new(&mem, RING, 16).unwrap();
        let q = ring.queue();
        T { mem, m, h, ring, q }
    }

    impl T {
        fn post(&mut self, addr: u64, len: u32) -> u16 {
            self.ring
                .add(
                    &self.mem,
                    &[Buf {
                        addr,
                        len,
                        write: true,
                    }],
                )
                .unwrap()
        }
        fn serve(&mut self, qi: usize) -> Result<(), Malformed> {
            serve(qi, &mut self.q, &self.mem, &mut self.h, None)
        }
        fn read(&self, addr: u64, n: usize) -> Vec<u8> {
            let mut v = vec![0u8; n];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    fn frame(hdr: [u8; 2], n: usize) -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f[0] = hdr[0];
        f[1] = hdr[1];
        f[10] = 0x55; // garbage where num_buffers goes
        f.extend((0..n - HDR_LEN).map(|i| (i % 251) as u8));
        f
    }

    #[test]
    fn features_and_config() {
        let mut n = Net::new(&NetSpec {
            id: "net0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            backend: Arc::new(Mock::default()),
        });
        assert_eq!(
            n.features(),
            F_VERSION_1 | F_INDIRECT_DESC | F_MAC | F_STATUS | F_MRG_RXBUF,
            "a backend without offloads: no offload features"
        );
        assert_eq!(n.device_type(), 1);
        assert_eq!(n.queue_max_sizes().len(), 2);
        let mut c = [0xffu8; 12];
        n.read_config(0, &mut c);
        assert_eq!(&c[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), S_LINK_UP);
        assert_eq!(&c[10..], &[0, 0]);
        let m = Arc::new(Mock {
            offloads: true,
            ..Default::default()
        });
        n.spec.backend = m.clone();
        assert_eq!(n.features() & F_OFFLOADS, F_OFFLOADS);
        // Starting the device sets the backend's offloads to what the
        // guest took; stopping clears them.
        let mut h = n.handler(F_VERSION_1 | F_GUEST_CSUM | F_GUEST_TSO4 | F_CSUM);
        h.stop();
        assert_eq!(
            *m.set.lock().unwrap(),
            vec![
                Offloads {
                    csum: true,
                    tso4: true,
                    ..Default::default()
                },
                Offloads::default()
            ]
        );
    }

    #[test]
    fn rx_waits_for_a_frame_then_fills_one_chain() {
        let mut t = setup(F_VERSION_1);
        let head = t.post(BUFS, 1526);
        t.serve(RXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), None, "no frame: the buffer stays");
        assert!(t.h.want_fd());
        let f = frame([0, 0], 112);
        t.m.rx.lock().unwrap().push(f.clone());
        t.serve(RXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), Some((head, 112)));
        let got = t.read(BUFS, 112);
        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers is 1");
        assert_eq!(&got[12..], &f[12..]);
        assert!(t.h.want_fd());
    }

    #[test]
    fn rx_asks_for_kicks_only_when_the_ring_is_empty() {
        let mut t = setup(F_VERSION_1 | F_MRG_RXBUF);
        assert!(t.ring.kick_wanted(&t.mem), "a new queue wants kicks");
        let h0 = t.post(BUFS, 1536);
        t.serve(RXQ).unwrap();
        assert!(
            !t.ring.kick_wanted(&t.mem),
            "no frame but a buffer: the tap wakes the device, no kicks"
        );
        t.m.rx.lock().unwrap().push(frame([0, 0], 100));
        t.serve(RXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), Some((h0, 100)));
        assert!(t.ring.kick_wanted(&t.mem), "ring empty: kick when refilled");
        // A frame waiting for buffers also wants the kick.
        t.m.rx.lock().unwrap().push(frame([0, 0], 100));
        t.serve(RXQ).unwrap();
        assert!(t.ring.kick_wanted(&t.mem));
        let h1 = t.post(BUFS, 1536);
        t.serve(RXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), Some((h1, 100)));
    }

    #[test]
    fn rx_without_mrg_drops_a_frame_too_big_and_keeps_the_chain() {
        let mut t = setup(F_VERSION_1);
        let head = t.post(BUFS, 1526);
        t.m.rx.lock().unwrap().push(frame([0, 0], 2000));
        t.m.rx.lock().unwrap().push(frame([0, 0], 100));
        t.serve(RXQ).unwrap();
        assert_eq!(
            t.ring.used(&t.mem),
            Some((head, 100)),
            "the big frame is dropped, the small one takes the buffer"
        );
        assert_eq!(t.h.rx_dropped, 1);
    }

    #[test]
    fn rx_merges_buffers_for_a_big_frame() {
        let mut t = setup(F_VERSION_1 | F_MRG_RXBUF);
        let heads: Vec<u16> = (0..4).map(|i| t.post(BUFS + i * 0x1000, 1000)).collect();
        let f = frame([0, 0], 2500);
        t.m.rx.lock().unwrap().push(f.clone());
        t.serve(RXQ).unwrap();
        let used: Vec<_> = std::iter::from_fn(|| t.ring.used(&t.mem)).collect();
        assert_eq!(
            used,
            vec![(heads[0], 1000), (heads[1], 1000), (heads[2], 500)]
        );
        let mut got = t.read(BUFS, 1000);
        got.extend(t.read(BUFS + 0x1000, 1000));
        got.extend(t.read(BUFS + 0x2000, 500));
        assert_eq!(&got[10..12], &3u16.to_le_bytes(), "num_buffers");
        assert_eq!(&got[12..], &f[12..]);
        // The fourth buffer takes the next frame.
        t.m.rx.lock().unwrap().push(frame([0, 0], 60));
        t.serve(RXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), Some((heads[3], 60)));
        assert_eq!(&t.read(BUFS + 0x3000 + 10, 2), &1u16.to_le_bytes());
    }

    #[test]
    fn rx_waits_for_enough_merged_buffers() {
        let mut t = setup(F_VERSION_1 | F_MRG_RXBUF);
        let h0 = t.post(BUFS, 1000);
        t.m.rx.lock().unwrap().push(frame([0, 0], 1800));
        t.serve(RXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), None, "one buffer is not enough");
        assert!(!t.h.want_fd(), "the frame waits for buffers, not the tap");
        let h1 = t.post(BUFS + 0x1000, 1000);
        t.serve(RXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), Some((h0, 1000)));
        assert_eq!(t.ring.used(&t.mem), Some((h1, 800)));
        assert_eq!(&t.read(BUFS + 10, 2), &2u16.to_le_bytes());
    }

    #[test]
    fn rx_frame_bigger_than_the_whole_ring_is_dropped() {
        let mut t = setup(F_VERSION_1 | F_MRG_RXBUF);
        for i in 0..16 {
            t.post(BUFS + i * 0x100, 64);
        }
        t.m.rx.lock().unwrap().push(frame([0, 0], 4000));
        t.serve(RXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), None);
        assert_eq!(t.h.rx_dropped, 1);
        assert!(t.h.want_fd());
    }

    #[test]
    fn rx_offloads_the_guest_did_not_take_are_dropped() {
        let mut t = setup(F_VERSION_1 | F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO4);
        let h0 = t.post(BUFS, 4096);
        let h1 = t.post(BUFS + 0x1000, 4096);
        {
            let mut rx = t.m.rx.lock().unwrap();
            rx.push(frame([HDR_F_NEEDS_CSUM, GSO_TCPV6], 3000)); // no TSO6
            rx.push(frame([HDR_F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN], 3000)); // no ECN
            rx.push(frame([HDR_F_NEEDS_CSUM, 3], 3000)); // UDP: never offered
            rx.push(frame([HDR_F_NEEDS_CSUM, GSO_TCPV4], 3000));
        }
        t.serve(RXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), Some((h0, 3000)));
        assert_eq!(t.h.rx_dropped, 3);
        assert_eq!(t.read(BUFS, 2), vec![HDR_F_NEEDS_CSUM, GSO_TCPV4]);
        // Without GUEST_CSUM: no partial checksums, DATA_VALID cleared.
        let mut t2 = setup(F_VERSION_1 | F_MRG_RXBUF);
        let g0 = t2.post(BUFS, 4096);
        t2.m.rx
            .lock()
            .unwrap()
            .push(frame([HDR_F_NEEDS_CSUM, 0], 100));
        t2.m.rx
            .lock()
            .unwrap()
            .push(frame([HDR_F_DATA_VALID, 0], 100));
        t2.serve(RXQ).unwrap();
        assert_eq!(t2.ring.used(&t2.mem), Some((g0, 100)));
        assert_eq!(t2.read(BUFS, 1), vec![0]);
        assert_eq!(t2.h.rx_dropped, 1);
        let _ = h1;
    }

    #[test]
    fn bad_buffers_are_malformed() {
        // An RX buffer shorter than the header (seen when a frame comes).
        let mut t = setup(F_VERSION_1 | F_MRG_RXBUF);
        t.post(BUFS, 8);
        t.serve(RXQ).unwrap();
        t.m.rx.lock().unwrap().push(frame([0, 0], 60));
        let e = t.serve(RXQ).unwrap_err();
        assert!(e.0.contains("shorter than the 12-byte header"), "{}", e.0);
        // An RX buffer past the end of RAM.
        let mut t = setup(F_VERSION_1);
        t.post(0x3f_f000, 0x2000);
        t.m.rx.lock().unwrap().push(frame([0, 0], 60));
        let e = t.serve(RXQ).unwrap_err();
        assert!(e.0.contains("outside guest RAM"), "{}", e.0);
        // TX chains: a short one, one past RAM, one too long.
        for (addr, len, msg) in [
            (BUFS, 10u32, "shorter than the 12-byte header"),
            (0x3f_f000, 0x2000, "outside guest RAM"),
            (0, 0x20000, "too long"),
        ] {
            let mut t = setup(F_VERSION_1);
            t.ring.add(
                &t.mem,
                &[Buf {
                    addr,
                    len,
                    write: false,
                }],
            );
            let e = t.serve(TXQ).unwrap_err();
            assert!(e.0.contains(msg), "{}", e.0);
            assert!(t.m.tx.lock().unwrap().is_empty());
        }
    }

    #[test]
    fn tx_sends_header_and_frame_gathered() {
        let mut t = setup(F_VERSION_1 | F_CSUM | F_HOST_TSO4);
        let mut hdr = [0u8; HDR_LEN];
        hdr[0] = HDR_F_NEEDS_CSUM;
        hdr[1] = GSO_TCPV4;
        let payload: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        t.mem.write_slice(&hdr, GuestAddress(BUFS)).unwrap();
        t.mem
            .write_slice(&payload, GuestAddress(BUFS + 0x1000))
            .unwrap();
        let head = t
            .ring
            .add(
                &t.mem,
                &[
                    Buf {
                        addr: BUFS,
                        len: HDR_LEN as u32,
                        write: false,
                    },
                    Buf {
                        addr: BUFS + 0x1000,
                        len: 5000,
                        write: false,
                    },
                ],
            )
            .unwrap();
        t.serve(TXQ).unwrap();
        assert_eq!(t.ring.used(&t.mem), Some((head, 0)));
        let sent = t.m.tx.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(&sent[0][..HDR_LEN], &hdr, "offload header passed through");
        assert_eq!(&sent[0][HDR_LEN..], &payload[..]);
    }
}
