//! Emulated devices and the buses they sit on.

pub mod bus;
pub mod cmos;
pub mod debug;
pub mod i8042;
pub mod pci;
pub mod serial;
pub mod virtio;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An `EventFd` that devices signal to raise an interrupt (through a KVM
/// irqfd) or to tell the VMM about an event such as a reset request.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wrap an event fd.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// The event fd itself, to register as an irqfd or to wait on.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
