//! MC146818 CMOS RTC and NVRAM at ports 0x70/0x71: the wall-clock time in
//! BCD, status registers, and the memory-size bytes firmware would leave.
//!
//! vm-superio has no x86 CMOS device (only the ARM PL031), so this is ours.

use std::time::{SystemTime, UNIX_EPOCH};

use super::bus::BusDevice;

/// Index port; the data port follows it.
pub const CMOS_PORT: u64 = 0x70;

/// CMOS RTC with 128 bytes of NVRAM.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// A CMOS whose NVRAM reports `below_4g` bytes of RAM under the 4 GiB
    /// boundary and `above_4g` above it, the way PC firmware does.
    pub fn new(below_4g: u64, above_4g: u64) -> Self {
        let mut nvram = [0u8; 128];
        // Extended memory between 1 MiB and 64 MiB, in KiB.
        let ext_kib = (below_4g.saturating_sub(1 << 20) >> 10).min(0xfc00) as u16;
        nvram[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        nvram[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        // Memory above 16 MiB (below 4 GiB), in 64 KiB units.
        let over16 = (below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        nvram[0x34..0x36].copy_from_slice(&over16.to_le_bytes());
        // Memory above 4 GiB, in 64 KiB units (24 bits).
        let high = (above_4g >> 16).min(0xff_ffff) as u32;
        nvram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
        nvram[0x0a] = 0x26; // 32.768 kHz divider, 1024 Hz rate
        nvram[0x0b] = 0x02; // 24-hour mode, BCD
        nvram[0x0d] = 0x80; // RAM and time valid
        Cmos { index: 0, nvram }
    }

    fn read_reg(&self, reg: u8) -> u8 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let secs = now % 86_400;
        let days = (now / 86_400) as i64;
        let (y, m, d) = civil_from_days(days);
        match reg {
            0x00 => bcd((secs % 60) as u32),
            0x02 => bcd((secs / 60 % 60) as u32),
            0x04 => bcd((secs / 3600) as u32),
            0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u32),
            0x07 => bcd(d),
            0x08 => bcd(m),
            0x09 => bcd((y % 100) as u32),
            0x32 => bcd((y / 100) as u32),
            0x0a => self.nvram[0x0a] & 0x7f, // never "update in progress"
            0x0c => 0,
            r => self.nvram[usize::from(r & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == 1 {
            self.read_reg(self.index)
        } else {
            0xff
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index masks NMIs; the register number is the rest.
            0 => self.index = v & 0x7f,
            1 => match self.index {
                0x00..=0x09 | 0x0c | 0x0d | 0x32 => {} // clock is the host's
                r => self.nvram[usize::from(r)] = v,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn memory_size_and_time_registers() {
        let mut c = Cmos::new(256 << 20, 0);
        let mut rd = |reg: u8| {
            c.write(0, &[reg | 0x80]);
            let mut b = [0u8];
            c.read(1, &mut b);
            b[0]
        };
        let lo = rd(0x34);
        let hi = rd(0x35);
        assert_eq!(
            u16::from_le_bytes([lo, hi]),
            ((256 - 16) << 20 >> 16) as u16
        );
        assert_eq!(rd(0x0b), 0x02);
        assert_eq!(rd(0x0d), 0x80);
        let month = rd(0x08);
        assert!((0x01..=0x12).contains(&month), "BCD month {month:#x}");
        assert_eq!(rd(0x32), 0x20);
    }
}
