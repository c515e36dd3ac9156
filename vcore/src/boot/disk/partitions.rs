//! Partition tables: MBR (primary and logical partitions) and GPT (primary
//! header checked by CRC, the backup header when the primary is damaged).
//!
//! Hand-written: the crates for this (`gpt`, `mbrman`) want a `Read + Seek`
//! over the whole disk and bring writing code; the read side is ~200 lines.

use crate::image::BlockDevice;

const SECTOR: u64 = 512;

/// Which partition table a disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Mbr,
    Gpt,
}

impl TableKind {
    pub fn name(self) -> &'static str {
        match self {
            TableKind::Mbr => "mbr",
            TableKind::Gpt => "gpt",
        }
    }
}

/// One partition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Partition {
    /// Number as Linux gives it (`vda1`): MBR primaries 1-4, logicals from 5;
    /// GPT entry index + 1.
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// MBR type byte as hex (`83`) or GPT type GUID.
    pub type_id: String,
    /// PARTUUID as the kernel understands it (`root=PARTUUID=...`).
    pub partuuid: String,
    /// GPT partition name.
    pub name: String,
    /// Marked bootable (MBR active flag, GPT legacy BIOS bootable attribute).
    pub bootable: bool,
    /// EFI system partition (MBR type ef, GPT C12A7328-...).
    pub esp: bool,
}

/// A partition table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Table {
    pub kind: TableKind,
    pub partitions: Vec<Partition>,
}

/// Problems reading the table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{0}")]
    Io(#[from] crate::image::Error),
    #[error("{0}")]
    Invalid(String),
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// Format a mixed-endian GUID as text (upper case, like sfdisk).
pub fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

const ESP_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

fn read(dev: &dyn BlockDevice, off: u64, len: usize) -> Result<Vec<u8>, TableError> {
    let mut b = vec![0u8; len];
    if off.saturating_add(len as u64) > dev.size() {
        return Err(TableError::Invalid(format!(
            "the table points past the end of the disk (offset {off})"
        )));
    }
    dev.read_at(&mut b, off)?;
    Ok(b)
}

/// Read the partition table; `Ok(None)` when the disk has none.
pub fn read_table(dev: &dyn BlockDevice) -> Result<Option<Table>, TableError> {
    if dev.size() < SECTOR {
        return Ok(None);
    }
    let mbr = read(dev, 0, SECTOR as usize)?;
    let has_sig = mbr[510] == 0x55 && mbr[511] == 0xaa;
    if has_sig && (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xee) {
        if let Some(t) = read_gpt(dev)? {
            return Ok(Some(t));
        }
    }
    // A GPT without a protective MBR (rare, but sfdisk can leave one).
    if !has_sig {
        return read_gpt(dev);
    }
    read_mbr(dev, &mbr).map(Some)
}

fn read_mbr(dev: &dyn BlockDevice, mbr: &[u8]) -> Result<Table, TableError> {
    let sig = le32(mbr, 440);
    let mut parts = Vec::new();
    let disk_sectors = dev.size() / SECTOR;
    for i in 0..4 {
        let e = &mbr[446 + i * 16..446 + (i + 1) * 16];
        let (boot, ty) = (e[0], e[4]);
        let (lba, n) = (u64::from(le32(e, 8)), u64::from(le32(e, 12)));
        if ty == 0 || n == 0 {
            continue;
        }
        if boot & 0x7f != 0 {
            // Not an MBR: a FAT boot sector or garbage with 55aa at the end.
            return Err(TableError::Invalid(format!(
                "MBR entry {} has an invalid boot flag {boot:#04x}",
                i + 1
            )));
        }
        if lba + n > disk_sectors.max(1) + 1 {
            return Err(TableError::Invalid(format!(
                "MBR partition {} (sectors {lba}..{}) ends past the end of the disk ({disk_sectors} sectors)",
                i + 1,
                lba + n
            )));
        }
        if matches!(ty, 0x05 | 0x0f | 0x85) {
            logical(dev, lba, sig, &mut parts)?;
            continue;
        }
        parts.push(mbr_part(i as u32 + 1, lba, n, ty, sig, boot == 0x80));
    }
    parts.sort_by_key(|p| p.number);
    Ok(Table {
        kind: TableKind::Mbr,
        partitions: parts,
    })
}

fn mbr_part(number: u32, lba: u64, n: u64, ty: u8, sig: u32, bootable: bool) -> Partition {
    Partition {
        number,
        start: lba * SECTOR,
        size: n * SECTOR,
        type_id: format!("{ty:02x}"),
        partuuid: format!("{sig:08x}-{number:02x}"),
        name: String::new(),
        bootable,
        esp: ty == 0xef,
    }
}

/// Walk the chain of extended boot records.
fn logical(
    dev: &dyn BlockDevice,
    ext_lba: u64,
    sig: u32,
    parts: &mut Vec<Partition>,
) -> Result<(), TableError> {
    let mut ebr_lba = ext_lba;
    let mut number = 5;
    for _ in 0..128 {
        let ebr = read(dev, ebr_lba * SECTOR, SECTOR as usize)?;
        if ebr[510] != 0x55 || ebr[511] != 0xaa {
            break;
        }
        let e = &ebr[446..462];
        let (ty, rel, n) = (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)));
        if ty != 0 && n != 0 {
            parts.push(mbr_part(number, ebr_lba + rel, n, ty, sig, e[0] == 0x80));
            number += 1;
        }
        let next = &ebr[462..478];
        let next_rel = u64::from(le32(next, 8));
        if next[4] == 0 || next_rel == 0 {
            break;
        }
        ebr_lba = ext_lba + next_rel;
    }
    Ok(())
}

fn read_gpt(dev: &dyn BlockDevice) -> Result<Option<Table>, TableError> {
    let last = dev.size() / SECTOR - 1;
    let primary = read(dev, SECTOR, SECTOR as usize)?;
    let hdr = if gpt_header_ok(&primary) {
        primary
    } else {
        let backup = read(dev, last * SECTOR, SECTOR as usize)?;
        if !gpt_header_ok(&backup) {
            if &primary[0..8] == b"EFI PART" {
                return Err(TableError::Invalid(
                    "the GPT headers (primary and backup) fail their checksums".into(),
                ));
            }
            return Ok(None);
        }
        backup
    };
    let entries_lba = le64(&hdr, 72);
    let count = le32(&hdr, 80) as usize;
    let esize = le32(&hdr, 84) as usize;
    if !(128..=4096).contains(&esize) || count > 1024 {
        return Err(TableError::Invalid(format!(
            "GPT header has {count} entries of {esize} bytes"
        )));
    }
    let table = read(dev, entries_lba * SECTOR, count * esize)?;
    let mut crc = flate2::Crc::new();
    crc.update(&table);
    if crc.sum() != le32(&hdr, 88) {
        return Err(TableError::Invalid(
            "the GPT partition entries fail their checksum".into(),
        ));
    }
    let mut parts = Vec::new();
    for i in 0..count {
        let e = &table[i * esize..(i + 1) * esize];
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, lastlba) = (le64(e, 32), le64(e, 40));
        if lastlba < first || lastlba > last {
            return Err(TableError::Invalid(format!(
                "GPT partition {} (sectors {first}..{lastlba}) ends past the end of the disk",
                i + 1
            )));
        }
        let name: Vec<u16> = (0..36)
            .map(|k| le16(e, 56 + 2 * k))
            .take_while(|&c| c != 0)
            .collect();
        let type_id = guid(&e[0..16]);
        parts.push(Partition {
            number: i as u32 + 1,
            start: first * SECTOR,
            size: (lastlba - first + 1) * SECTOR,
            esp: type_id == ESP_GUID,
            type_id,
            partuuid: guid(&e[16..32]).to_lowercase(),
            name: String::from_utf16_lossy(&name),
            bootable: le64(e, 48) & 4 != 0,
        });
    }
    Ok(Some(Table {
        kind: TableKind::Gpt,
        partitions: parts,
    }))
}

fn gpt_header_ok(h: &[u8]) -> bool {
    if &h[0..8] != b"EFI PART" {
        return false;
    }
    let size = le32(h, 12) as usize;
    if !(92..=512).contains(&size) {
        return false;
    }
    let mut b = h[..size].to_vec();
    b[16..20].fill(0);
    let mut crc = flate2::Crc::new();
    crc.update(&b);
    crc.sum() == le32(h, 16)
}
