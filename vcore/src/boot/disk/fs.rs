//! Filesystems on a partition, read-only: ext2/3/4 through `ext4-view`, FAT
//! through `fatfs`. [`probe`] also names filesystems we recognise but cannot
//! read, so the error can say which one it was.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use crate::image::BlockDevice;

/// A byte range of a block device (one partition), read-only.
#[derive(Clone)]
pub struct Slice {
    dev: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
    pos: u64,
    /// A superblock (bytes 1024..2048) shown instead of the one on disk.
    sb_patch: Option<Arc<Vec<u8>>>,
}

impl Slice {
    pub fn new(dev: Arc<dyn BlockDevice>, start: u64, len: u64) -> Slice {
        let len = len.min(dev.size().saturating_sub(start));
        Slice {
            dev,
            start,
            len,
            pos: 0,
            sb_patch: None,
        }
    }

    /// Read exactly `buf.len()` bytes at `off` within the slice.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match off.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at {off} is past the end of the partition ({} bytes)",
                        buf.len(),
                        self.len
                    ),
                ))
            }
        }
        self.dev
            .read_at(buf, self.start + off)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl ext4_view::Ext4Read for Slice {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_exact_at(dst, start_byte)?;
        if let Some(sb) = &self.sb_patch {
            // Overlay bytes 1024..2048 with the patched superblock.
            let end = start_byte + dst.len() as u64;
            let (lo, hi) = (start_byte.max(1024), end.min(2048));
            if lo < hi {
                let d = &mut dst[(lo - start_byte) as usize..(hi - start_byte) as usize];
                d.copy_from_slice(&sb[(lo - 1024) as usize..(hi - 1024) as usize]);
            }
        }
        Ok(())
    }
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        self.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Slice {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| io::Error::other("seek before the start of the partition"))?;
        Ok(self.pos)
    }
}

/// `fatfs` wants `Write`; we never write while looking for a kernel.
impl Write for Slice {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the disk is read-only while looking for a kernel",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a partition holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// ext2, ext3 or ext4 (name as `blkid` gives it).
    Ext(&'static str),
    /// FAT12/16/32.
    Fat,
    /// Recognised but not readable here.
    Unsupported(&'static str),
    /// Nothing recognised.
    Unknown,
}

fn at(s: &Slice, off: u64, len: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; len];
    s.read_exact_at(&mut b, off).ok().map(|_| b)
}

/// Identify the filesystem on a partition.
pub fn probe(s: &Slice) -> Probe {
    if let Some(sb) = at(s, 1024, 1024) {
        if sb[56] == 0x53 && sb[57] == 0xef {
            let compat = u32::from_le_bytes([sb[92], sb[93], sb[94], sb[95]]);
            let incompat = u32::from_le_bytes([sb[96], sb[97], sb[98], sb[99]]);
            let ro_compat = u32::from_le_bytes([sb[100], sb[101], sb[102], sb[103]]);
            let journal = compat & 0x4 != 0;
            // extents, 64bit, flex_bg, huge_file, gdt_csum, metadata_csum...
            let ext4 = incompat & !0x6 != 0 || ro_compat & !0x3 != 0;
            return Probe::Ext(match (ext4, journal) {
                (true, _) => "ext4",
                (false, true) => "ext3",
                (false, false) => "ext2",
            });
        }
    }
    let b0 = at(s, 0, 4096).unwrap_or_default();
    if b0.len() == 4096 {
        if b0[510] == 0x55 && b0[511] == 0xaa {
            if &b0[3..11] == b"NTFS    " {
                return Probe::Unsupported("ntfs");
            }
            if &b0[3..11] == b"EXFAT   " {
                return Probe::Unsupported("exfat");
            }
            let fat = &b0[54..59] == b"FAT12" || &b0[54..59] == b"FAT16" || &b0[82..87] == b"FAT32";
            let bps = u16::from_le_bytes([b0[11], b0[12]]);
            if fat || (matches!(bps, 512 | 1024 | 2048 | 4096) && b0[13] != 0 && b0[16] != 0) {
                return Probe::Fat;
            }
        }
        if &b0[0..4] == b"XFSB" {
            return Probe::Unsupported("xfs");
        }
        if &b0[0..4] == b"hsqs" {
            return Probe::Unsupported("squashfs");
        }
        if &b0[0..6] == b"LUKS\xba\xbe" {
            return Probe::Unsupported("crypto_LUKS (encrypted)");
        }
        if &b0[512..520] == b"LABELONE" {
            return Probe::Unsupported("LVM2_member");
        }
        if &b0[4086..4096] == b"SWAPSPACE2" || &b0[4086..4096] == b"SWAP-SPACE" {
            return Probe::Unsupported("swap");
        }
    }
    if let Some(b) = at(s, 0x10040, 8) {
        if b == b"_BHRfS_M" {
            return Probe::Unsupported("btrfs");
        }
    }
    if let Some(b) = at(s, 0x400, 4) {
        if b == [0x10, 0x20, 0xf5, 0xf2] {
            return Probe::Unsupported("f2fs");
        }
    }
    if let Some(b) = at(s, 0x8001, 5) {
        if b == b"CD001" {
            return Probe::Unsupported("iso9660");
        }
    }
    if let Some(b) = at(s, 0x10000 + 0x34, 8) {
        if &b[..6] == b"ReIsEr" {
            return Probe::Unsupported("reiserfs");
        }
    }
    if let Some(b) = at(s, 0x8000, 4) {
        if b == b"JFS1" {
            return Probe::Unsupported("jfs");
        }
    }
    if let Some(b) = at(s, 0x20000 - 0x100 + 8, 8) {
        if b == b"ZFS" as &[u8] {
            return Probe::Unsupported("zfs_member");
        }
    }
    Probe::Unknown
}

/// CRC32C as ext4 stores it (no final inversion).
fn crc32c_raw(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    c
}

/// The superblock with `needs_recovery` cleared (checksum updated), so the
/// filesystem reads as last checkpointed, like `mount -o ro,noload`.
/// `None` when the flag is not set.
fn noload_superblock(s: &Slice) -> Option<Vec<u8>> {
    let mut sb = at(s, 1024, 1024)?;
    if sb[0x60] & 0x4 == 0 {
        return None;
    }
    sb[0x60] &= !0x4;
    let ro_compat = u32::from_le_bytes([sb[0x64], sb[0x65], sb[0x66], sb[0x67]]);
    if ro_compat & 0x400 != 0 {
        let c = crc32c_raw(&sb[..0x3fc]);
        sb[0x3fc..].copy_from_slice(&c.to_le_bytes());
    }
    Some(sb)
}

/// A mounted (read-only) filesystem.
pub enum Fs {
    Ext {
        fs: ext4_view::Ext4,
        kind: &'static str,
    },
    Fat(Box<fatfs::FileSystem<Slice>>),
}

/// Result of reading a file: `Ok(None)` when it does not exist.
pub type ReadResult = Result<Option<Vec<u8>>, String>;

impl Fs {
    /// Open the filesystem the probe found.
    /// The note says when the ext journal could not be replayed and the
    /// filesystem is read as last checkpointed.
    pub fn open(s: &Slice, probe: &Probe) -> Result<(Fs, Option<String>), String> {
        match probe {
            Probe::Ext(kind) => match ext4_view::Ext4::load(Box::new(s.clone())) {
                Ok(fs) => Ok((Fs::Ext { fs, kind }, None)),
                Err(e) => {
                    let err = format!("cannot read the {kind} filesystem: {e}");
                    // A guest that stopped without unmounting leaves a
                    // journal to replay; ext4-view replays only 64-bit,
                    // checksum-v3 journals. Read without it.
                    let Some(sb) = noload_superblock(s) else {
                        return Err(err);
                    };
                    let mut s2 = s.clone();
                    s2.sb_patch = Some(Arc::new(sb));
                    ext4_view::Ext4::load(Box::new(s2))
                        .map(|fs| {
                            let note = format!(
                                "the {kind} journal needs recovery and cannot be replayed \
                                 ({e}); read as last checkpointed (like mount -o noload)"
                            );
                            (Fs::Ext { fs, kind }, Some(note))
                        })
                        .map_err(|_| err)
                }
            },
            Probe::Fat => {
                let mut s = s.clone();
                s.pos = 0;
                fatfs::FileSystem::new(s, fatfs::FsOptions::new())
                    .map(|f| (Fs::Fat(Box::new(f)), None))
                    .map_err(|e| format!("cannot read the FAT filesystem: {e}"))
            }
            Probe::Unsupported(n) => Err(format!("unsupported filesystem {n}")),
            Probe::Unknown => Err("no filesystem recognised".into()),
        }
    }

    /// `ext4`, `vfat`...
    pub fn kind(&self) -> &'static str {
        match self {
            Fs::Ext { kind, .. } => kind,
            Fs::Fat(_) => "vfat",
        }
    }

    /// Filesystem UUID as blkid prints it (`1234-ABCD` for FAT).
    pub fn uuid(&self) -> String {
        match self {
            Fs::Ext { fs, .. } => fs.uuid().to_string(),
            Fs::Fat(f) => {
                let id = f.volume_id();
                format!("{:04X}-{:04X}", id >> 16, id & 0xffff)
            }
        }
    }

    /// Filesystem label.
    pub fn label(&self) -> String {
        match self {
            Fs::Ext { fs, .. } => fs.label().to_str().unwrap_or("").to_string(),
            Fs::Fat(f) => f.volume_label().trim().to_string(),
        }
    }

    /// Read a whole regular file (symlinks followed on ext).
    pub fn read(&self, path: &str) -> ReadResult {
        match self {
            Fs::Ext { fs, .. } => match fs.read(path) {
                Ok(d) => Ok(Some(d)),
                Err(ext4_view::Ext4Error::NotFound)
                | Err(ext4_view::Ext4Error::NotADirectory)
                | Err(ext4_view::Ext4Error::IsADirectory) => Ok(None),
                Err(e) => Err(format!("{path}: {e}")),
            },
            Fs::Fat(f) => {
                let p = path.trim_start_matches('/');
                match f.root_dir().open_file(p) {
                    Ok(mut file) => {
                        let mut d = Vec::new();
                        file.read_to_end(&mut d)
                            .map_err(|e| format!("{path}: {e}"))?;
                        Ok(Some(d))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(None),
                    Err(e) => Err(format!("{path}: {e}")),
                }
            }
        }
    }

    /// Whether a file exists (anything at `path`).
    pub fn exists(&self, path: &str) -> bool {
        match self {
            Fs::Ext { fs, .. } => fs.exists(path).unwrap_or(false),
            Fs::Fat(f) => {
                let p = path.trim_start_matches('/');
                p.is_empty()
                    || f.root_dir().open_file(p).is_ok()
                    || f.root_dir().open_dir(p).is_ok()
            }
        }
    }

    /// Names in a directory (regular files and symlinks; empty when absent).
    pub fn list(&self, dir: &str) -> Vec<String> {
        match self {
            Fs::Ext { fs, .. } => {
                let Ok(rd) = fs.read_dir(dir) else {
                    return Vec::new();
                };
                rd.filter_map(|e| e.ok())
                    .filter(|e| {
                        e.file_type()
                            .map(|t| t.is_regular_file() || t.is_symlink())
                            .unwrap_or(false)
                    })
                    .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
                    .collect()
            }
            Fs::Fat(f) => {
                let p = dir.trim_start_matches('/').trim_end_matches('/');
                let d = if p.is_empty() {
                    f.root_dir()
                } else {
                    match f.root_dir().open_dir(p) {
                        Ok(d) => d,
                        Err(_) => return Vec::new(),
                    }
                };
                d.iter()
                    .filter_map(|e| e.ok())
                    .filter(|e| !e.is_dir())
                    .map(|e| e.file_name())
                    .collect()
            }
        }
    }

    /// Subdirectory names of `dir` (FAT only needs this for /EFI).
    pub fn subdirs(&self, dir: &str) -> Vec<String> {
        match self {
            Fs::Ext { fs, .. } => {
                let Ok(rd) = fs.read_dir(dir) else {
                    return Vec::new();
                };
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
                    .filter(|n| n != "." && n != "..")
                    .collect()
            }
            Fs::Fat(f) => {
                let p = dir.trim_start_matches('/').trim_end_matches('/');
                let d = if p.is_empty() {
                    f.root_dir()
                } else {
                    match f.root_dir().open_dir(p) {
                        Ok(d) => d,
                        Err(_) => return Vec::new(),
                    }
                };
                d.iter()
                    .filter_map(|e| e.ok())
                    .filter(|e| e.is_dir())
                    .map(|e| e.file_name())
                    .filter(|n| n != "." && n != "..")
                    .collect()
            }
        }
    }
}
