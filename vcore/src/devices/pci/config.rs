//! A PCI function's configuration space: 4 KiB of registers with per-bit
//! write masks, 32-bit memory BARs and a capability list.

/// Size of a PCI Express configuration space (what ECAM exposes).
pub const CONFIG_SIZE: usize = 4096;
const REGS: usize = CONFIG_SIZE / 4;

/// Register offsets (in bytes) of the type 0 header.
pub const COMMAND: usize = 0x04;
/// Status register (upper half of dword 1).
pub const STATUS: usize = 0x06;
/// First BAR.
pub const BAR0: usize = 0x10;
/// Capability pointer.
pub const CAP_PTR: usize = 0x34;
/// Interrupt line.
pub const INTERRUPT_LINE: usize = 0x3c;

/// Command register: memory space decoding.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Status register: capability list present.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// Command bits a guest may set: I/O, memory, bus master, parity, SERR, INTx disable.
const CMD_WMASK: u32 = 0x0547;

/// A BAR that moved: the guest wrote a new base address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index (0-5).
    pub bar: usize,
    /// Previous base address.
    pub old: u64,
    /// New base address.
    pub new: u64,
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    size: u32,
    addr: u32,
}

/// The configuration space of one function.
pub struct ConfigSpace {
    regs: Box<[u32; REGS]>,
    wmask: Box<[u32; REGS]>,
    bars: [Option<Bar>; 6],
    last_cap: Option<usize>,
    next_cap: usize,
}

/// Identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct Ids {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

impl ConfigSpace {
    /// A type 0 header with the given identity, no BARs and no capabilities.
    pub fn new(ids: Ids) -> Self {
        let mut c = ConfigSpace {
            regs: Box::new([0; REGS]),
            wmask: Box::new([0; REGS]),
            bars: [None; 6],
            last_cap: None,
            next_cap: 0x40,
        };
        c.regs[0] = u32::from(ids.vendor) | (u32::from(ids.device) << 16);
        c.regs[2] = (ids.class << 8) | u32::from(ids.revision);
        c.regs[11] = u32::from(ids.subsystem_vendor) | (u32::from(ids.subsystem) << 16);
        c.wmask[1] = CMD_WMASK;
        c.wmask[INTERRUPT_LINE / 4] = 0xff;
        c
    }

    /// Add a 32-bit memory BAR of `size` bytes (a power of two, at least
    /// 16) at `addr`.
    pub fn add_bar(&mut self, bar: usize, addr: u32, size: u32) {
        debug_assert!(size.is_power_of_two() && size >= 16);
        self.bars[bar] = Some(Bar { size, addr });
        self.regs[BAR0 / 4 + bar] = addr;
        self.wmask[BAR0 / 4 + bar] = !(size - 1);
    }

    /// Current base address of a BAR.
    pub fn bar_addr(&self, bar: usize) -> Option<u64> {
        self.bars[bar].map(|b| u64::from(b.addr))
    }

    /// Append a capability: `body` starts with the ID byte and a placeholder
    /// for the next pointer. Returns its offset in configuration space.
    pub fn add_capability(&mut self, body: &[u8]) -> usize {
        let off = self.next_cap;
        for (i, b) in body.iter().enumerate() {
            self.set_byte(off + i, *b);
        }
        self.set_byte(off + 1, 0);
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, off as u8),
            None => self.set_byte(CAP_PTR, off as u8),
        }
        self.regs[1] |= STATUS_CAP_LIST << 16;
        self.last_cap = Some(off);
        self.next_cap = (off + body.len()).next_multiple_of(4);
        off
    }

    /// Let the guest write the bits of `mask` in the byte at `off`.
    pub fn set_byte_wmask(&mut self, off: usize, mask: u8) {
        let sh = (off % 4) * 8;
        self.wmask[off / 4] = (self.wmask[off / 4] & !(0xff << sh)) | (u32::from(mask) << sh);
    }

    fn set_byte(&mut self, off: usize, v: u8) {
        let sh = (off % 4) * 8;
        self.regs[off / 4] = (self.regs[off / 4] & !(0xff << sh)) | (u32::from(v) << sh);
    }

    /// A byte of configuration space.
    pub fn byte(&self, off: usize) -> u8 {
        (self.regs[off / 4] >> ((off % 4) * 8)) as u8
    }

    /// A little-endian 16-bit value.
    pub fn word(&self, off: usize) -> u16 {
        u16::from(self.byte(off)) | (u16::from(self.byte(off + 1)) << 8)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.word(COMMAND)
    }

    /// Read `data.len()` bytes at byte offset `off` (reads past 4 KiB return 0xff).
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if off + i < CONFIG_SIZE {
                self.byte(off + i)
            } else {
                0xff
            };
        }
    }

    /// Write `data` at byte offset `off`, honouring the write masks.
    /// Returns the BARs that moved.
    pub fn write(&mut self, off: usize, data: &[u8]) -> Vec<BarMove> {
        let mut moved = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let o = off + i;
            if o >= CONFIG_SIZE {
                break;
            }
            let sh = (o % 4) * 8;
            let m = (self.wmask[o / 4] >> sh) as u8;
            let cur = self.byte(o);
            self.set_byte(o, (cur & !m) | (b & m));
        }
        // A BAR register completed: see whether the guest moved it.
        let first = off / 4;
        let last = (off + data.len().max(1) - 1) / 4;
        for reg in first..=last {
            if !(BAR0 / 4..BAR0 / 4 + 6).contains(&reg) {
                continue;
            }
            let bar = reg - BAR0 / 4;
            let Some(b) = self.bars[bar] else { continue };
            let new = self.regs[reg] & !(b.size - 1);
            let sizing = !(b.size - 1);
            if new == b.addr || new == sizing {
                continue;
            }
            let (lo, hi) = (
                crate::boot::layout::PCI_MMIO_START,
                crate::boot::layout::PCI_MMCONFIG_START,
            );
            if u64::from(new) < lo || u64::from(new) + u64::from(b.size) > hi {
                // Outside the PCI window: keep decoding at the old place.
                continue;
            }
            moved.push(BarMove {
                bar,
                old: u64::from(b.addr),
                new: u64::from(new),
            });
            self.bars[bar] = Some(Bar { addr: new, ..b });
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Ids {
        Ids {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x010000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }
    }

    #[test]
    fn header_caps_and_bar_sizing() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(0, 0xc000_0000, 0x4000);
        let a = c.add_capability(&[0x11, 0, 1, 2, 3, 4, 5, 6]);
        let b = c.add_capability(&[0x09, 0, 7]);
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(c.byte(CAP_PTR), 0x40);
        assert_eq!(c.byte(0x41), 0x48);
        assert_eq!(c.byte(0x49), 0);
        assert_eq!(c.word(STATUS) & 0x10, 0x10);
        let mut d = [0u8; 4];
        c.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        // Sizing: all ones reads back the size mask and does not move.
        assert!(c.write(BAR0, &[0xff; 4]).is_empty());
        c.read(BAR0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_c000);
        assert!(c.write(BAR0, &0xc000_0000u32.to_le_bytes()).is_empty());
        // A real move.
        let m = c.write(BAR0, &0xc001_0000u32.to_le_bytes());
        assert_eq!(
            m,
            vec![BarMove {
                bar: 0,
                old: 0xc000_0000,
                new: 0xc001_0000
            }]
        );
        // Read-only fields stay.
        c.write(0, &[0; 4]);
        c.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(c.command(), 0x0547);
    }
}
