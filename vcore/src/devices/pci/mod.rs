//! PCI: a single root bus with a host bridge at 00:00.0, reachable through
//! configuration mechanism #1 (ports 0xCF8/0xCFC) and an ECAM (MMCONFIG)
//! window, a 32-bit BAR allocator and MSI-X ([`msix`]).
//!
//! Linux without ACPI finds the bus through mechanism #1 (`pci=` defaults,
//! "PCI: Using configuration type 1 for base access"); it only uses
//! MMCONFIG when an ACPI MCFG table describes it, which vmrun does not
//! provide, so the ECAM window is there for firmware and tools that probe
//! it at the address the e820 map reserves. Legacy INTx is not wired (the MP
//! table lists no PCI interrupts): devices interrupt through MSI-X.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use crate::boot::layout::{PCI_MMCONFIG_SIZE, PCI_MMCONFIG_START, PCI_MMIO_SIZE, PCI_MMIO_START};
use crate::devices::bus::{Bus, BusDevice, BusError};
use config::{ConfigSpace, Ids};

/// Configuration mechanism #1 ports: address at 0xCF8, data at 0xCFC.
pub const CONFIG_IO_PORT: u64 = 0xcf8;
/// Length of the port range.
pub const CONFIG_IO_LEN: u64 = 8;

/// A function on the root bus.
pub trait PciDevice: Send {
    /// Read configuration space at byte offset `off`.
    fn config_read(&mut self, off: usize, data: &mut [u8]);
    /// Write configuration space at byte offset `off`.
    fn config_write(&mut self, off: usize, data: &[u8]);
}

/// The host bridge at 00:00.0 (a generic PCIe host bridge, 1b36:0008, so
/// guests apply no chipset quirks).
pub struct HostBridge {
    cfg: ConfigSpace,
}

impl HostBridge {
    /// A host bridge.
    pub fn new() -> Self {
        HostBridge {
            cfg: ConfigSpace::new(Ids {
                vendor: 0x1b36,
                device: 0x0008,
                class: 0x060000,
                revision: 0,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, off: usize, data: &mut [u8]) {
        self.cfg.read(off, data)
    }
    fn config_write(&mut self, off: usize, data: &[u8]) {
        self.cfg.write(off, data);
    }
}

type Slot = Arc<Mutex<dyn PciDevice>>;

/// The root bus: 32 slots, function 0 only.
#[derive(Clone)]
pub struct PciRoot {
    slots: Arc<Mutex<Vec<Option<Slot>>>>,
    next_bar: Arc<Mutex<u64>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Slot>> = vec![None; 32];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciRoot {
            slots: Arc::new(Mutex::new(slots)),
            next_bar: Arc::new(Mutex::new(PCI_MMIO_START)),
        }
    }

    /// Put the config-space access paths on the buses: ports 0xCF8-0xCFF
    /// and the ECAM window.
    pub fn attach(&self, pio: &Bus, mmio: &Bus) -> Result<(), BusError> {
        pio.insert(
            CONFIG_IO_PORT,
            CONFIG_IO_LEN,
            Arc::new(Mutex::new(ConfigIo {
                root: self.clone(),
                addr: 0,
            })),
        )?;
        mmio.insert(
            PCI_MMCONFIG_START,
            PCI_MMCONFIG_SIZE,
            Arc::new(Mutex::new(Ecam { root: self.clone() })),
        )
    }

    /// Reserve `size` bytes (a power of two) of the 32-bit BAR window,
    /// naturally aligned. `None` when the window is full.
    pub fn alloc_bar(&self, size: u64) -> Option<u64> {
        let mut next = self.next_bar.lock().unwrap_or_else(|e| e.into_inner());
        let addr = next.next_multiple_of(size);
        if addr + size > PCI_MMIO_START + PCI_MMIO_SIZE {
            return None;
        }
        *next = addr + size;
        Some(addr)
    }

    /// Plug a device into the first free slot; returns the slot number.
    pub fn add(&self, dev: Slot) -> Option<u8> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let i = slots.iter().position(Option::is_none)?;
        slots[i] = Some(dev);
        Some(i as u8)
    }

    fn device(&self, bus: u8, dev: u8, func: u8) -> Option<Slot> {
        if bus != 0 || func != 0 {
            return None;
        }
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(usize::from(dev)).cloned().flatten()
    }

    /// Configuration read of bus/device/function at `off`; all ones when
    /// nothing is there.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, off: usize, data: &mut [u8]) {
        match self.device(bus, dev, func) {
            Some(d) => d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_read(off, data),
            None => data.fill(0xff),
        }
    }

    /// Configuration write of bus/device/function at `off`.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, off: usize, data: &[u8]) {
        if let Some(d) = self.device(bus, dev, func) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_write(off, data)
        }
    }
}

/// Mechanism #1: a 32-bit address register at 0xCF8 (enable bit 31, bus,
/// device, function, register) and a data window at 0xCFC-0xCFF.
struct ConfigIo {
    root: PciRoot,
    addr: u32,
}

impl ConfigIo {
    fn target(&self, port_off: u64) -> Option<(u8, u8, u8, usize)> {
        if self.addr & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.addr >> 16) as u8;
        let dev = ((self.addr >> 11) & 0x1f) as u8;
        let func = ((self.addr >> 8) & 0x7) as u8;
        // Bits 27:24 extend the register number (AMD-style extended access).
        let reg = ((self.addr & 0xfc) | ((self.addr >> 16) & 0xf00)) as usize;
        Some((bus, dev, func, reg + (port_off - 4) as usize))
    }
}

impl BusDevice for ConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let b = self.addr.to_le_bytes();
            for (i, d) in data.iter_mut().enumerate() {
                *d = b.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        match self.target(offset) {
            Some((bus, dev, func, reg)) => self.root.config_read(bus, dev, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            // Only full 32-bit writes set the address (as on real chipsets;
            // Linux's type 1 probe writes a byte to 0xCFB first).
            if offset == 0 && data.len() == 4 {
                self.addr = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            return;
        }
        if let Some((bus, dev, func, reg)) = self.target(offset) {
            self.root.config_write(bus, dev, func, reg, data)
        }
    }
}

/// ECAM: bus << 20 | device << 15 | function << 12 | register.
struct Ecam {
    root: PciRoot,
}

fn ecam_decode(off: u64) -> (u8, u8, u8, usize) {
    (
        (off >> 20) as u8,
        ((off >> 15) & 0x1f) as u8,
        ((off >> 12) & 0x7) as u8,
        (off & 0xfff) as usize,
    )
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, r) = ecam_decode(offset);
        self.root.config_read(b, d, f, r, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, r) = ecam_decode(offset);
        self.root.config_write(b, d, f, r, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism1_and_ecam_reach_the_host_bridge() {
        let root = PciRoot::new();
        let pio = Bus::new();
        let mmio = Bus::new();
        root.attach(&pio, &mmio).unwrap();
        // Linux's type 1 probe.
        pio.write(0xcfb, &[1]);
        pio.write(0xcf8, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        pio.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        pio.read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        // Class code via a 16-bit read at 0xCFE of register 8.
        pio.write(0xcf8, &0x8000_0008u32.to_le_bytes());
        let mut w = [0u8; 2];
        pio.read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0600);
        // Empty slot 3 reads all ones.
        pio.write(0xcf8, &(0x8000_0000u32 | 3 << 11).to_le_bytes());
        pio.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        // ECAM.
        mmio.read(PCI_MMCONFIG_START, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        mmio.read(PCI_MMCONFIG_START + (1 << 20), &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(root.alloc_bar(0x4000), Some(PCI_MMIO_START));
        assert_eq!(root.alloc_bar(0x10000), Some(PCI_MMIO_START + 0x10000));
    }
}
