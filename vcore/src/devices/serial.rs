//! The 16550A UART on COM1 (vm-superio), wired to a KVM irqfd.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::bus::BusDevice;
use super::EventFdTrigger;

/// COM1's base port and IRQ.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's legacy IRQ line.
pub const COM1_IRQ: u32 = 4;

/// A UART whose output goes to `W` and whose interrupt line is an event fd.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART writing to `out` and raising `irq` for interrupts.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }

    /// Queue bytes typed by the user. Returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity();
        let n = room.min(bytes.len());
        if n > 0 && self.serial.enqueue_raw_bytes(&bytes[..n]).is_err() {
            return 0;
        }
        n
    }

    /// Flush buffered guest output.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            // An output error (closed stdout, full disk) must not stop the
            // guest; the byte is dropped.
            let _ = self.serial.write(offset as u8, b);
        }
    }
}

/// A writer shared by successive UARTs, so that serial output keeps going
/// to the same place when the guest reboots and the VM is rebuilt.
#[derive(Clone)]
pub struct SharedWriter(std::sync::Arc<std::sync::Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    /// Share `w`.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        SharedWriter(std::sync::Arc::new(std::sync::Mutex::new(w)))
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_receives() {
        let sink = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            EventFdTrigger::new(evt.try_clone().unwrap()),
            Box::new(sink.clone()),
        );
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the receive interrupt, then type a byte.
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert_eq!(evt.read().unwrap(), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }
}
