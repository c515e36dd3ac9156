//! The i8042 keyboard controller, reduced to what guests use: the CPU reset
//! line (`reboot=k`) and a quiet status register.

use vm_superio::I8042Device;

use super::bus::BusDevice;
use super::FnTrigger;

/// Base port; the device spans 0x60..0x65 (data at 0x60, command at 0x64).
pub const I8042_PORT: u64 = 0x60;

/// The i8042 on the port bus. A reset command signals the trigger.
pub struct I8042 {
    dev: I8042Device<FnTrigger>,
}

impl I8042 {
    /// An i8042 whose reset line signals `reset`.
    pub fn new(reset: FnTrigger) -> Self {
        I8042 {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.dev.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.dev.write(offset as u8, b);
        }
    }
}
