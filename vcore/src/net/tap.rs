//! Linux tap devices: created with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and
//! a 12-byte virtio-net header, so the header passes between guest and
//! kernel unchanged: checksum and segmentation offloads go through, and
//! `TUNSETOFFLOAD` tells the kernel which ones the guest takes on receive.
//!
//! Bridge mode attaches the tap to an existing bridge and brings it up with
//! the `SIOCBRADDIF` / `SIOCSIFFLAGS` ioctls (what `brctl` uses), which need
//! no netlink message building; `ip` is never run.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{Backend, Offloads, HDR_LEN};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

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
    fn offloads(&self) -> bool {
        true
    }
    fn set_offloads(&self, o: Offloads) -> std::io::Result<()> {
        let flags = tun_offload_flags(o);
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is open.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The `TUN_F_*` flags for what a guest accepts, as QEMU sets them: no
/// segmentation without checksum offload (the kernel needs both), ECN only
/// with a TSO.
fn tun_offload_flags(o: Offloads) -> libc::c_uint {
    let mut f = 0;
    if o.csum {
        f |= TUN_F_CSUM;
        if o.tso4 {
            f |= TUN_F_TSO4;
        }
        if o.tso6 {
            f |= TUN_F_TSO6;
        }
        if o.ecn && (o.tso4 || o.tso6) {
            f |= TUN_F_TSO_ECN;
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags_follow_the_guest() {
        let all = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
        };
        assert_eq!(tun_offload_flags(all), 0xf);
        assert_eq!(tun_offload_flags(Offloads::default()), 0);
        assert_eq!(
            tun_offload_flags(Offloads { csum: false, ..all }),
            0,
            "TSO needs checksum offload"
        );
        assert_eq!(
            tun_offload_flags(Offloads {
                tso4: false,
                tso6: false,
                ..all
            }),
            TUN_F_CSUM
        );
        assert_eq!(
            tun_offload_flags(Offloads {
                tso6: false,
                ecn: false,
                ..all
            }),
            TUN_F_CSUM | TUN_F_TSO4
        );
    }

    #[test]
    fn tap_takes_offload_flags() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("SKIP: needs root and /dev/net/tun");
            return;
        }
        // In a network namespace of this thread's own, gone with it.
        std::thread::spawn(|| {
            // SAFETY: unshare(2) moves only the calling thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("SKIP: unshare(CLONE_NEWNET) failed");
                return;
            }
            let t = Tap::open("").expect("tap");
            t.set_offloads(Offloads {
                csum: true,
                tso4: true,
                tso6: true,
                ecn: true,
            })
            .expect("TUNSETOFFLOAD");
            t.set_offloads(Offloads::default())
                .expect("TUNSETOFFLOAD 0");
        })
        .join()
        .unwrap();
    }
}
