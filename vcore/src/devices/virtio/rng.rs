//! virtio-rng (virtio 1.x §5.4): fills the guest's buffers from the host's
//! `getrandom(2)`, like QEMU's default `rng-random` backend.

use vm_memory::GuestMemoryMmap;

use super::{scatter, Chain, Malformed, QueueHandler, VirtioDevice, F_VERSION_1};

/// Largest buffer filled per request (QEMU fills what the guest offers;
/// this bounds the host-side allocation).
const MAX_CHUNK: u64 = 64 * 1024;

/// The virtio-rng device model.
pub struct Rng {
    id: String,
}

impl Rng {
    /// A device named `id`.
    pub fn new(id: &str) -> Self {
        Rng { id: id.into() }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        4
    }
    fn pci_class(&self) -> u32 {
        0xff0000
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64]
    }
    fn read_config(&self, _off: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn handler(&self, _acked: u64) -> Box<dyn QueueHandler> {
        Box::new(RngHandler)
    }
}

struct RngHandler;

impl QueueHandler for RngHandler {
    fn handle(&mut self, _q: usize, mem: &GuestMemoryMmap, c: &Chain) -> Result<u32, Malformed> {
        let n = c.writable_len().min(MAX_CHUNK) as usize;
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            // SAFETY: the pointer and length describe the unfilled tail of `buf`.
            let r = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), n - got, 0) };
            if r <= 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            got += r as usize;
        }
        scatter(mem, &c.writable, 0, &buf[..got])?;
        Ok(got as u32)
    }
}
