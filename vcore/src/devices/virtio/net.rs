//! virtio-net (virtio 1.x §5.1) over a host backend ([`crate::net`]): one
//! RX and one TX queue, the 12-byte `virtio_net_hdr_v1`, a MAC address and a
//! link-up status. No offloads are offered, so the header is always "no
//! checksum, no GSO".

use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use crate::net::{Backend, HDR_LEN};

use super::{gather, scatter, Chain, Malformed, QueueHandler, VirtioDevice, F_VERSION_1};

/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`: the config space holds the link status.
pub const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP`.
pub const S_LINK_UP: u16 = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame read from the backend: header + 64 KiB.
const MAX_PACKET: usize = HDR_LEN + 65536;
const RXQ: usize = 0;
const TXQ: usize = 1;

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
        F_VERSION_1 | F_MAC | F_STATUS
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
    fn handler(&self, _acked: u64) -> Box<dyn QueueHandler> {
        Box::new(NetHandler::new(self.spec.backend.clone()))
    }
}

/// The I/O-thread side of a virtio-net device.
pub struct NetHandler {
    backend: Arc<dyn Backend>,
    /// A frame read from the backend waiting for an RX buffer.
    pending: Option<usize>,
    rx: Vec<u8>,
    tx: Vec<u8>,
    name_logged: bool,
}

impl NetHandler {
    /// A handler over a backend.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        NetHandler {
            backend,
            pending: None,
            rx: vec![0u8; MAX_PACKET],
            tx: Vec::new(),
            name_logged: false,
        }
    }
}

impl QueueHandler for NetHandler {
    fn handle(&mut self, q: usize, mem: &GuestMemoryMmap, c: &Chain) -> Result<u32, Malformed> {
        match q {
            RXQ => {
                if c.writable_len() < HDR_LEN as u64 {
                    return Err(Malformed(format!(
                        "receive buffer of {} bytes, shorter than the {HDR_LEN}-byte header",
                        c.writable_len()
                    )));
                }
                let Some(n) = self.pending.take() else {
                    return Ok(0);
                };
                if n as u64 > c.writable_len() {
                    // Without MRG_RXBUF a frame must fit one chain: drop it
                    // (the driver sizes its buffers for the MTU).
                    return Ok(0);
                }
                // num_buffers is 1 without MRG_RXBUF.
                self.rx[10..12].copy_from_slice(&1u16.to_le_bytes());
                scatter(mem, &c.writable, 0, &self.rx[..n])?;
                Ok(n as u32)
            }
            TXQ => {
                let len = c.readable_len();
                if len < HDR_LEN as u64 {
                    return Err(Malformed(format!(
                        "transmit buffer of {len} bytes, shorter than the {HDR_LEN}-byte header"
                    )));
                }
                if len > MAX_PACKET as u64 {
                    return Err(Malformed(format!(
                        "transmit frame of {len} bytes is too long"
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
    use super::*;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};

    /// A backend over two in-memory queues of frames.
    #[derive(Default)]
    struct Mock {
        rx: Mutex<Vec<Vec<u8>>>,
        tx: Mutex<Vec<Vec<u8>>>,
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
    }

    fn setup() -> (GuestMemoryMmap, Arc<Mock>, NetHandler) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let m = Arc::new(Mock::default());
        let h = NetHandler::new(m.clone());
        (mem, m, h)
    }

    #[test]
    fn features_and_config() {
        let n = Net::new(&NetSpec {
            id: "net0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            backend: Arc::new(Mock::default()),
        });
        assert_eq!(n.features(), F_VERSION_1 | F_MAC | F_STATUS);
        assert_eq!(n.device_type(), 1);
        assert_eq!(n.queue_max_sizes().len(), 2);
        let mut c = [0xffu8; 12];
        n.read_config(0, &mut c);
        assert_eq!(&c[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), S_LINK_UP);
        assert_eq!(&c[10..], &[0, 0]);
    }

    #[test]
    fn rx_waits_for_a_frame_then_fills_split_buffers() {
        let (mem, m, mut h) = setup();
        assert!(
            !h.ready(RXQ),
            "no frame: the RX buffers must stay available"
        );
        assert!(h.want_fd());
        let mut frame = vec![0u8; HDR_LEN];
        frame.extend((0..100u8).collect::<Vec<_>>());
        m.rx.lock().unwrap().push(frame.clone());
        assert!(h.ready(RXQ));
        assert!(!h.want_fd(), "a frame waits: stop polling the tap");
        let mut c = Chain::default();
        c.writable.push((GuestAddress(0x1000), 20));
        c.writable.push((GuestAddress(0x2000), 200));
        assert_eq!(h.handle(RXQ, &mem, &c).unwrap(), frame.len() as u32);
        let mut got = vec![0u8; 20];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers is 1");
        assert_eq!(&got[12..], &frame[12..20]);
        let mut rest = vec![0u8; 92];
        mem.read_slice(&mut rest, GuestAddress(0x2000)).unwrap();
        assert_eq!(&rest[..], &frame[20..]);
        assert!(h.want_fd());
    }

    #[test]
    fn rx_drops_a_frame_that_does_not_fit() {
        let (mem, m, mut h) = setup();
        m.rx.lock().unwrap().push(vec![0u8; 2000]);
        assert!(h.ready(RXQ));
        let mut c = Chain::default();
        c.writable.push((GuestAddress(0x1000), 1526));
        assert_eq!(h.handle(RXQ, &mem, &c).unwrap(), 0);
        assert!(!h.ready(RXQ));
    }

    #[test]
    fn bad_buffers_are_malformed() {
        let (mem, m, mut h) = setup();
        m.rx.lock().unwrap().push(vec![0u8; 60]);
        assert!(h.ready(RXQ));
        let mut c = Chain::default();
        c.writable.push((GuestAddress(0x1000), 8));
        assert!(h.handle(RXQ, &mem, &c).is_err());
        let mut c = Chain::default();
        c.readable.push((GuestAddress(0x1000), 10));
        assert!(h.handle(TXQ, &mem, &c).is_err());
        assert!(m.tx.lock().unwrap().is_empty());
    }

    #[test]
    fn tx_sends_header_and_frame_gathered() {
        let (mem, m, mut h) = setup();
        let hdr = [0u8; HDR_LEN];
        let payload: Vec<u8> = (0..64u8).collect();
        mem.write_slice(&hdr, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&payload, GuestAddress(0x3000)).unwrap();
        let mut c = Chain::default();
        c.readable.push((GuestAddress(0x1000), HDR_LEN as u32));
        c.readable.push((GuestAddress(0x3000), 64));
        assert_eq!(h.handle(TXQ, &mem, &c).unwrap(), 0);
        let sent = m.tx.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(&sent[0][..HDR_LEN], &hdr);
        assert_eq!(&sent[0][HDR_LEN..], &payload[..]);
    }
}
