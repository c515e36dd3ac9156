//! Intel MultiProcessor Specification 1.4 tables, so that Linux finds every
//! vCPU, the IOAPIC and the ISA interrupt routing without ACPI.

use super::layout::{IOAPIC_START, LAPIC_START};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Pins on the in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;

fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)).wrapping_neg()
}

/// Build the floating pointer and configuration table to be placed at
/// guest address `addr`, for vCPUs with the given APIC IDs (the first is
/// the boot processor).
pub fn build(addr: u64, apic_ids: &[u32]) -> Vec<u8> {
    let ioapic_id = apic_ids.iter().max().map(|m| m + 1).unwrap_or(0).min(0xfe) as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for (i, &id) in apic_ids.iter().enumerate() {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = id as u8;
        e[2] = APIC_VERSION;
        e[3] = 1 | if i == 0 { 2 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    for (id, name) in [(0u8, b"PCI   "), (1u8, b"ISA   ")] {
        let mut e = [0u8; 8];
        e[0] = 1; // bus
        e[1] = id;
        e[2..8].copy_from_slice(name);
        entries.extend_from_slice(&e);
        count += 1;
    }
    let mut e = [0u8; 8];
    e[0] = 2; // I/O APIC
    e[1] = ioapic_id;
    e[2] = IOAPIC_VERSION;
    e[3] = 1; // enabled
    e[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&e);
    count += 1;
    for irq in 0..IOAPIC_PINS {
        let mut e = [0u8; 8];
        e[0] = 3; // I/O interrupt assignment
        e[1] = 0; // INT
        e[4] = 1; // ISA bus
        e[5] = irq;
        e[6] = ioapic_id;
        e[7] = irq;
        entries.extend_from_slice(&e);
        count += 1;
    }
    for (kind, lint) in [(3u8, 0u8), (1u8, 1u8)] {
        let mut e = [0u8; 8];
        e[0] = 4; // local interrupt assignment
        e[1] = kind; // ExtINT → LINT0, NMI → LINT1
        e[4] = 1;
        e[5] = 0;
        e[6] = 0xff; // every local APIC
        e[7] = lint;
        entries.extend_from_slice(&e);
        count += 1;
    }

    let table_addr = addr + 16;
    let mut table = vec![0u8; 44];
    table[0..4].copy_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[6] = 4; // spec 1.4
    table[8..16].copy_from_slice(b"VMRUN   ");
    table[16..28].copy_from_slice(b"VMRUN-MPTBL ");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = vec![0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4;
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(0xf0000, &[0, 1, 2, 3]);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let table = &t[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 2 + 1 + 24 + 2);
        // The first processor entry is the BSP, the others are not.
        assert_eq!(table[44 + 3], 3);
        assert_eq!(table[64 + 3], 1);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0xf0010);
    }
}
