//! virtio-net (virtio 1.x §5.1) over a Linux tap device: one RX and one TX
//! queue, the 12-byte `virtio_net_hdr_v1`, a MAC address and a link-up
//! status. The tap is opened with `IFF_VNET_HDR` and a 12-byte header, so
//! the header passes between guest and kernel unchanged; no offloads are
//! offered, so the header is always "no checksum, no GSO".
//!
//! Bridge mode attaches the tap to an existing bridge and brings it up with
//! the `SIOCBRADDIF` / `SIOCSIFFLAGS` ioctls (what `brctl` uses), which need
//! no netlink message building; `ip` is never run.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::{gather, scatter, Chain, Malformed, QueueHandler, VirtioDevice, F_VERSION_1};

/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`: the config space holds the link status.
pub const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP`.
pub const S_LINK_UP: u16 = 1;
/// Length of `virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const HDR_LEN: usize = 12;
const QUEUE_SIZE: u16 = 256;
/// Largest frame read from the tap: header + 64 KiB.
const MAX_PACKET: usize = HDR_LEN + 65536;
const RXQ: usize = 0;
const TXQ: usize = 1;

/// QEMU's first default MAC address; the n-th NIC gets `...:56 + n`.
pub fn default_mac(index: usize) -> [u8; 6] {
    [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]
}

/// Parse `52:54:00:12:34:56` (also with `-`): six hex bytes, unicast.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(format!(
            "'{s}' is not a MAC address (six hex bytes like 52:54:00:12:34:56)"
        ));
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() || p.len() > 2 {
            return Err(format!(
                "'{s}' is not a MAC address (six hex bytes like 52:54:00:12:34:56)"
            ));
        }
        m[i] = u8::from_str_radix(p, 16)
            .map_err(|_| format!("'{s}' is not a MAC address (bad byte '{p}')"))?;
    }
    if m[0] & 1 != 0 {
        return Err(format!(
            "'{s}' is a multicast MAC address; a NIC needs a unicast one"
        ));
    }
    Ok(m)
}

/// Format a MAC address like QEMU.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// `struct ifreq` with the union as flags / ifindex.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<IfReq, String> {
        if name.len() >= libc::IFNAMSIZ || name.contains('\0') || name.contains('/') {
            return Err(format!(
                "'{name}' is not a valid interface name (at most 15 bytes, no '/')"
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }
    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
}

/// A tap device: a nonblocking fd carrying frames with a 12-byte
/// virtio-net header.
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn ioctl_err(what: &str, name: &str) -> String {
    let e = std::io::Error::last_os_error();
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => " (needs root or CAP_NET_ADMIN)",
        Some(libc::EBUSY) => " (the interface is in use by another process)",
        _ => "",
    };
    format!("{what} {name}: {e}{hint}")
}

impl Tap {
    /// Open (or create) the tap `ifname` ("" lets the kernel pick tapN).
    pub fn open(ifname: &str) -> Result<Tap, String> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "/dev/net/tun is missing: load the tun module (modprobe tun) or create the \
                     node (mknod /dev/net/tun c 10 200)"
                        .to_string()
                }
                std::io::ErrorKind::PermissionDenied => {
                    format!("cannot open /dev/net/tun: {e} (needs root or CAP_NET_ADMIN)")
                }
                _ => format!("cannot open /dev/net/tun: {e}"),
            })?;
        let mut req = IfReq::new(ifname)?;
        req.set_short(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req`
        // is laid out as; the fd is open.
        if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            let shown = if ifname.is_empty() { "tap" } else { ifname };
            return Err(ioctl_err("cannot create tap device", shown));
        }
        let name = req.name();
        let sz: libc::c_int = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETVNETHDRSZ as _, &sz) } < 0 {
            return Err(ioctl_err("cannot set the virtio-net header size of", &name));
        }
        Ok(Tap { fd: f.into(), name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bring the interface up.
    pub fn up(&self) -> Result<(), String> {
        let s = ctl_socket()?;
        let mut req = IfReq::new(&self.name)?;
        // SAFETY: SIOCGIFFLAGS fills the flags of a `struct ifreq`.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
            return Err(ioctl_err("cannot read the flags of", &self.name));
        }
        req.set_short(req.short() | libc::IFF_UP as libc::c_short);
        // SAFETY: SIOCSIFFLAGS reads a `struct ifreq`.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
            return Err(ioctl_err("cannot bring up", &self.name));
        }
        Ok(())
    }

    /// Attach the tap to bridge `br` (which must exist).
    pub fn attach_to_bridge(&self, br: &str) -> Result<(), String> {
        let mut breq = IfReq::new(br)?;
        let cname = CString::new(br).map_err(|_| format!("bad bridge name '{br}'"))?;
        // SAFETY: a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(format!(
                "bridge '{br}' does not exist (create it with: ip link add {br} type bridge)"
            ));
        }
        if !std::path::Path::new("/sys/class/net")
            .join(br)
            .join("bridge")
            .exists()
        {
            return Err(format!("'{br}' is not a bridge"));
        }
        let tname = CString::new(self.name.as_str()).map_err(|_| "bad tap name".to_string())?;
        // SAFETY: a valid NUL-terminated string.
        let idx = unsafe { libc::if_nametoindex(tname.as_ptr()) };
        if idx == 0 {
            return Err(format!("tap {} vanished", self.name));
        }
        breq.set_int(idx as libc::c_int);
        let s = ctl_socket()?;
        // SAFETY: SIOCBRADDIF reads a `struct ifreq` naming the bridge and
        // holding the port's ifindex.
        if unsafe { libc::ioctl(s.as_raw_fd(), SIOCBRADDIF as _, &breq) } < 0 {
            return Err(ioctl_err(
                &format!("cannot add {} to bridge", self.name),
                br,
            ));
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is writable for its length.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    fn write(&self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is readable for its length.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

fn ctl_socket() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2) call.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `s` is a new fd owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s) })
}

/// Where a NIC's frames go.
pub trait Backend: Send + Sync {
    /// Read one frame (with its header); `WouldBlock` when none waits.
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Send one frame (with its header).
    fn send(&self, buf: &[u8]) -> std::io::Result<usize>;
    /// An fd that polls readable when a frame waits.
    fn fd(&self) -> Option<RawFd>;
}

impl Backend for Tap {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read(buf)
    }
    fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.write(buf)
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

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
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:34:99").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x99]
        );
        assert_eq!(parse_mac("02-00-00-00-00-0A").unwrap()[5], 10);
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "525:4:00:12:34:56",
            "01:00:5e:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(format_mac(&default_mac(0)), "52:54:00:12:34:56");
        assert_eq!(format_mac(&default_mac(1)), "52:54:00:12:34:57");
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
