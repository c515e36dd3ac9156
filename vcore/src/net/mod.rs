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
}
