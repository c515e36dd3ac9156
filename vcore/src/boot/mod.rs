//! Loading a Linux kernel (ELF vmlinux or bzImage), its initrd and command
//! line into guest memory, with the tables the kernel reads at boot: the
//! PVH `hvm_start_info` or the zero page (`boot_params`), the e820 map and
//! the MP table.

pub mod decompress;
pub mod disk;
pub mod layout;
pub mod mptable;
pub mod regs;

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use layout::*;

/// How a bzImage is unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Decompress {
    /// On the host, then the ELF is entered directly (default).
    #[default]
    Host,
    /// By the kernel's own decompressor in the guest.
    Guest,
}

/// Errors from loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("could not read kernel '{path}': {source}")]
    ReadKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not read initrd '{path}': {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel '{path}' is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat { path: PathBuf },
    #[error("kernel '{path}' is a 32-bit image; only 64-bit guests are supported")]
    Elf32 { path: PathBuf },
    #[error("could not unpack bzImage '{path}': {source}")]
    Decompress {
        path: PathBuf,
        source: decompress::DecompressError,
    },
    #[error("could not load kernel '{path}': {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("initrd '{path}' ({size} bytes) does not fit in guest memory above the kernel; use a larger -m")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("kernel command line is {0} bytes, more than the {CMDLINE_MAX}-byte limit")]
    CmdlineTooLong(usize),
    #[error("could not write boot data to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh { rip: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64 { rip: u64, boot_params: u64 },
}

/// What was loaded.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub entry: Entry,
    /// End of the kernel image in guest memory.
    pub kernel_end: u64,
    /// Guest address and size of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// The bzImage was unpacked on the host: `Some(true)` when the cache had it.
    pub decompressed: Option<bool>,
    /// Compression of the bzImage payload.
    pub compression: Option<&'static str>,
}

/// What to boot.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    pub decompress: Decompress,
    /// Directory for the decompressed-kernel cache; `None` disables it.
    pub cache: Option<PathBuf>,
}

fn setup_header_of(image: &[u8]) -> setup_header {
    let mut hdr = setup_header::default();
    let n = std::mem::size_of::<setup_header>();
    if image.len() >= 0x1f1 + n {
        hdr.as_mut_slice().copy_from_slice(&image[0x1f1..0x1f1 + n]);
    }
    hdr
}

/// Load the kernel, initrd and command line described by `spec`.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<Loaded, BootError> {
    let kpath = spec.kernel.to_path_buf();
    let image = fs::read(spec.kernel).map_err(|source| BootError::ReadKernel {
        path: kpath.clone(),
        source,
    })?;
    let mut header: Option<setup_header> = None;
    let mut decompressed = None;
    let mut compression = None;
    let himem = Some(GuestAddress(HIMEM_START));

    let (result, bz_entry) = if decompress::is_bzimage(&image) {
        let hdr = setup_header_of(&image);
        header = Some(hdr);
        let method = decompress::payload(&image).map(decompress::method).ok();
        compression = method;
        match spec.decompress {
            Decompress::Host => {
                let (elf, hit) =
                    decompress::unpack_cached(&image, spec.cache.as_deref()).map_err(|source| {
                        BootError::Decompress {
                            path: kpath.clone(),
                            source,
                        }
                    })?;
                decompressed = Some(hit);
                let r = Elf::load(mem, None, &mut Cursor::new(elf), himem).map_err(|source| {
                    BootError::Load {
                        path: kpath.clone(),
                        source,
                    }
                })?;
                (r, None)
            }
            Decompress::Guest => {
                let r = BzImage::load(mem, None, &mut Cursor::new(&image), himem).map_err(
                    |source| BootError::Load {
                        path: kpath.clone(),
                        source,
                    },
                )?;
                // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
                let rip = r.kernel_load.raw_value() + 0x200;
                (r, Some(rip))
            }
        }
    } else if image.starts_with(b"\x7fELF") {
        if image.get(4) == Some(&1) {
            return Err(BootError::Elf32 { path: kpath });
        }
        let r = Elf::load(mem, None, &mut Cursor::new(&image), himem).map_err(|source| {
            BootError::Load {
                path: kpath.clone(),
                source,
            }
        })?;
        (r, None)
    } else {
        return Err(BootError::UnknownFormat { path: kpath });
    };

    // linux-loader reports the end as an absolute guest address.
    let kernel_end = result.kernel_end;

    // Command line.
    let cmdline = spec.cmdline.as_bytes();
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    mem.write_slice(cmdline, GuestAddress(CMDLINE_START))?;
    mem.write_slice(&[0], GuestAddress(CMDLINE_START + cmdline.len() as u64))?;

    // Initrd at the top of low memory, page aligned, above the kernel.
    let low_end = spec.mem_size.min(MMIO_HOLE_START);
    let mut initrd = None;
    if let Some(ipath) = spec.initrd {
        let data = fs::read(ipath).map_err(|source| BootError::ReadInitrd {
            path: ipath.to_path_buf(),
            source,
        })?;
        let size = data.len() as u64;
        let max = header
            .map(|h| u64::from(h.initrd_addr_max))
            .filter(|&m| m > 0)
            .unwrap_or(u64::MAX);
        let top = low_end.min(max.saturating_add(1));
        let addr = top.checked_sub(size).map(|a| a & !0xfff);
        match addr {
            Some(a) if a >= kernel_end => {
                mem.write_slice(&data, GuestAddress(a))?;
                initrd = Some((a, size));
            }
            _ => {
                return Err(BootError::InitrdTooLarge {
                    path: ipath.to_path_buf(),
                    size,
                })
            }
        }
    }

    let e820 = layout::e820(spec.mem_size);
    let entry = match (result.pvh_boot_cap, bz_entry) {
        (PvhBootCapability::PvhEntryPresent(addr), None) => {
            write_pvh(mem, &e820, initrd, cmdline.len())?;
            Entry::Pvh {
                rip: addr.raw_value(),
                start_info: PVH_INFO_START,
            }
        }
        (_, rip) => {
            write_zero_page(mem, header, &e820, initrd, cmdline.len(), rip.is_some())?;
            Entry::Linux64 {
                rip: rip.unwrap_or(result.kernel_load.raw_value()),
                boot_params: ZERO_PAGE_START,
            }
        }
    };
    Ok(Loaded {
        entry,
        kernel_end,
        initrd,
        decompressed,
        compression,
    })
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    _cmdline_len: usize,
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at))?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
    guest_decompress: bool,
) -> Result<(), BootError> {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    } else {
        p.hdr.boot_flag = 0xaa55;
        p.hdr.header = 0x5372_6448; // "HdrS"
        p.hdr.kernel_alignment = 0x100_0000;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_len as u32 + 1;
    if guest_decompress {
        p.hdr.loadflags |= 0x01 | 0x80; // LOADED_HIGH, CAN_USE_HEAP
        p.hdr.heap_end_ptr = 0xfe00;
        p.hdr.code32_start = HIMEM_START as u32;
    }
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    for (i, &(addr, size, type_)) in e820.iter().enumerate().take(p.e820_table.len()) {
        p.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
        p.e820_entries = i as u8 + 1;
    }
    mem.write_obj(p, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// Write the MP table for vCPUs with these APIC IDs.
pub fn write_mptable(mem: &GuestMemoryMmap, apic_ids: &[u32]) -> Result<(), BootError> {
    let t = mptable::build(MPTABLE_START, apic_ids);
    mem.write_slice(&t, GuestAddress(MPTABLE_START))?;
    Ok(())
}

/// Whether `path` holds a Linux kernel image we can boot (ELF or bzImage).
pub fn looks_like_kernel(image: &[u8]) -> bool {
    decompress::is_bzimage(image) || image.starts_with(b"\x7fELF")
}
