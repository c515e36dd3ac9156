//! Host-side network backends for virtio-net: where a NIC's frames go.
//!
//! - [`tap`]: a Linux tap device, alone or attached to a bridge.
//! - [`stream`]: QEMU's stream protocol over a unix socket.
//! - [`passt`]: user-mode networking through a passt child process.
//!
//! Every backend moves whole frames each preceded by the 12-byte
//! `virtio_net_hdr_v1`, the layout the device model uses.

pub mod mac;
pub mod passt;
pub mod stream;
pub mod tap;

use std::os::fd::RawFd;

pub use mac::{default_mac, format_mac, parse_mac};
pub use tap::Tap;

/// Length of `virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const HDR_LEN: usize = 12;

/// Where a NIC's frames go.
pub trait Backend: Send + Sync {
    /// Read one frame (with its header); `WouldBlock` when none waits.
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Send one frame (with its header).
    fn send(&self, buf: &[u8]) -> std::io::Result<usize>;
    /// An fd that polls readable when a frame waits.
    fn fd(&self) -> Option<RawFd>;
    /// Whether the backend carries checksum and segmentation offloads in
    /// the header (a tap with `IFF_VNET_HDR`): frames it takes may need a
    /// checksum or segmentation (`VIRTIO_NET_HDR_F_NEEDS_CSUM`, a GSO
    /// type), and after [`Backend::set_offloads`] frames it gives may too.
    /// When false (a backend of plain Ethernet frames) the device offers no
    /// offload features and every header is "no checksum, no GSO".
    fn offloads(&self) -> bool {
        false
    }
    /// Which offloads the guest accepts in frames it receives (what
    /// `TUNSETOFFLOAD` sets on a tap); called when the driver starts the
    /// device. Only called when [`Backend::offloads`] is true.
    fn set_offloads(&self, _o: Offloads) -> std::io::Result<()> {
        Ok(())
    }
}

/// Offloads a guest accepts in received frames: partial checksums and
/// TCP segmentation (the `VIRTIO_NET_F_GUEST_*` features it acked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// `GUEST_CSUM`: frames may carry a partial checksum.
    pub csum: bool,
    /// `GUEST_TSO4`: TCP over IPv4 frames up to 64 KiB.
    pub tso4: bool,
    /// `GUEST_TSO6`: TCP over IPv6 frames up to 64 KiB.
    pub tso6: bool,
    /// `GUEST_ECN`: segmentation of frames with the ECN CWR bit.
    pub ecn: bool,
}
