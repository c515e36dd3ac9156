//! Port-I/O and MMIO buses: address ranges mapped to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus. Offsets are relative to the base
/// address the device was inserted at.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    /// A zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// A bus shared by all vCPU threads. Lookups take a read lock on the map and
/// then the device's own mutex, so different devices are used concurrently.
#[derive(Clone, Default)]
pub struct Bus {
    devices: Arc<RwLock<BTreeMap<u64, Entry>>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Map `device` at `[base, base + len)`.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let end = base.saturating_add(len);
        if let Some((&other, &(olen, _))) = map.range(..end).next_back() {
            if other.saturating_add(olen) > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        map.insert(base, (len, device));
        Ok(())
    }

    /// Remove the device mapped at exactly `base`.
    pub fn remove(&self, base: u64) -> bool {
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base).is_some()
    }

    fn lookup(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (&base, (len, dev)) = map.range(..=addr).next_back()?;
        if addr - base < *len {
            Some((base, dev.clone()))
        } else {
            None
        }
    }

    /// Dispatch a read. Returns false when nothing is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write. Returns false when nothing is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(0x3fc, 2, dev.clone()),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 2,
                other: 0x3f8
            })
        );
        assert_eq!(
            bus.insert(0x3f0, 9, dev.clone()),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9,
                other: 0x3f8
            })
        );
        bus.insert(0x3f0, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x400, &mut b));
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, 9)]);
        assert!(bus.remove(0x3f0));
        assert!(!bus.write(0x3f0, &[1]));
        assert_eq!(bus.insert(0x10, 0, dev), Err(BusError::ZeroLength(0x10)));
    }
}
