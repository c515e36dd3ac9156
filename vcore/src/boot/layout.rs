//! Guest physical memory layout: RAM below and above the 32-bit MMIO hole,
//! fixed addresses of boot structures, and the e820 map.

/// Start of the 32-bit MMIO hole (PCI BARs, MMCONFIG, IOAPIC, LAPIC).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// PCI MMCONFIG (ECAM) window: 256 buses × 1 MiB.
pub const PCI_MMCONFIG_START: u64 = 0xe000_0000;
/// Size of the MMCONFIG window.
pub const PCI_MMCONFIG_SIZE: u64 = 0x1000_0000;
/// 32-bit PCI BAR window.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// Size of the 32-bit PCI BAR window.
pub const PCI_MMIO_SIZE: u64 = PCI_MMCONFIG_START - MMIO_HOLE_START;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Start of the extended BIOS data area; up to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table (BIOS area scanned by Linux).
pub const MPTABLE_START: u64 = 0xf0000;
/// GDT for the 64-bit entry.
pub const GDT_START: u64 = 0x500;
/// IDT for the 64-bit entry.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by the module list and the memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapped page tables for the 64-bit entry: PML4, PDPT, 4 PDs.
pub const PML4_START: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line.
pub const CMDLINE_MAX: usize = 0x10000;
/// Where a kernel is loaded when its image does not say (16 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The RAM of a guest of `size` bytes: (guest address, length) ranges.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// The e820 map: (address, length, type).
pub fn e820(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = size.min(MMIO_HOLE_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    map.push((PCI_MMCONFIG_START, PCI_MMCONFIG_SIZE, E820_RESERVED));
    if size > MMIO_HOLE_START {
        map.push((MMIO_HOLE_END, size - MMIO_HOLE_START, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hole_splits_large_guests() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        let m = e820(4 << 30);
        assert_eq!(m.last(), Some(&(4 << 30, 1 << 30, E820_RAM)));
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
    }
}
