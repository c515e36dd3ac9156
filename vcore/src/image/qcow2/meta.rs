//! qcow2 metadata on the spec (docs/interop/qcow2.txt): header, header
//! extensions, snapshot table, L1/L2 and refcount entries. Every offset,
//! size and count read from the file is validated before use; parsing
//! errors carry QEMU's wording.

use crate::image::raw::pread_full;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Image marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// External data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Compression type field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit QEMU 10 knows.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear: bitmaps extension consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear: external data file is raw.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// L1/L2 offset mask (bits 9..55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount table entry offset mask.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// COPIED flag (refcount exactly 1).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Compressed cluster flag.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Reads-as-zero flag (v3 standard clusters).
pub const OFLAG_ZERO: u64 = 1;
/// QEMU's maximum L1 table size in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's maximum refcount table size in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's maximum number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// A parsed qcow2 header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Backing file name offset in cluster 0 (0 = none).
    pub backing_file_offset: u64,
    /// Backing file name length.
    pub backing_file_size: u32,
    /// log2(cluster size), 9..=21.
    pub cluster_bits: u32,
    /// Virtual size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Active L1 entries.
    pub l1_size: u32,
    /// Active L1 offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Snapshot count.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// v3 incompatible features.
    pub incompatible: u64,
    /// v3 compatible features.
    pub compatible: u64,
    /// v3 autoclear features.
    pub autoclear: u64,
    /// log2(refcount bits), 0..=6.
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// Header bytes after the fields we know (preserved on rewrite).
    pub extra_fields: Vec<u8>,
    /// Header extensions other than backing format and feature table, in order.
    pub other_extensions: Vec<(u32, Vec<u8>)>,
    /// Whether a feature name table was present.
    pub has_feature_table: bool,
    /// Feature names from the table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format from the extension.
    pub backing_format: Option<String>,
    /// External data file name.
    pub data_file: Option<String>,
    /// Bitmaps extension: (nb_bitmaps, directory size, directory offset).
    pub bitmaps: Option<(u32, u64, u64)>,
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    /// Whether L2 entries are 16 bytes with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1u64 << self.refcount_order
    }
    /// Refcount entries per refcount block.
    pub fn refblock_entries(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }
    /// Largest representable refcount.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }
    /// Refcount table entries.
    pub fn reftable_entries(&self) -> u64 {
        self.refcount_table_clusters as u64 * self.cluster_size() / 8
    }
    /// L1 entries needed for `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.cluster_size() * self.l2_entries())
    }
    /// Lazy refcounts enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }
    /// Whether the image is marked corrupt.
    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }
    /// Whether the image is marked dirty.
    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }
    /// Compression type name.
    pub fn compression_name(&self) -> &'static str {
        if self.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        }
    }

    /// Read and validate the header of an open qcow2 file. Errors use
    /// QEMU's messages.
    pub fn read(f: &File) -> Result<Header, String> {
        let file_len = f.metadata().map_err(|e| e.to_string())?.len();
        if file_len < 72 {
            return Err("Could not read qcow2 header: Invalid argument".into());
        }
        let mut b = vec![0u8; 104];
        pread_full(f, &mut b, 0).map_err(|e| format!("Could not read qcow2 header: {e}"))?;
        if b[0..4] != crate::image::QCOW2_MAGIC {
            return Err("Image is not in qcow2 format".into());
        }
        let mut h = Header {
            version: be32(&b, 4),
            backing_file_offset: be64(&b, 8),
            backing_file_size: be32(&b, 16),
            cluster_bits: be32(&b, 20),
            size: be64(&b, 24),
            crypt_method: be32(&b, 32),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            snapshots_offset: be64(&b, 64),
            ..Default::default()
        };
        if h.version < 2 || h.version > 3 {
            return Err(format!("Unsupported qcow2 version {}", h.version));
        }
        if !(9..=21).contains(&h.cluster_bits) {
            return Err(format!("Unsupported cluster size: 2^{}", h.cluster_bits));
        }
        let cs = h.cluster_size();
        if h.version == 2 {
            h.refcount_order = 4;
            h.header_length = 72;
        } else {
            h.incompatible = be64(&b, 72);
            h.compatible = be64(&b, 80);
            h.autoclear = be64(&b, 88);
            h.refcount_order = be32(&b, 96);
            h.header_length = be32(&b, 100);
            if h.header_length < 104 {
                return Err("qcow2 header too short".into());
            }
            if h.header_length as u64 > cs {
                return Err("qcow2 header exceeds cluster size".into());
            }
            if h.header_length > 104 {
                let mut extra = vec![0u8; h.header_length as usize - 104];
                pread_full(f, &mut extra, 104).map_err(|e| e.to_string())?;
                h.compression_type = extra[0];
                h.extra_fields = extra;
            }
        }
        if h.backing_file_offset > cs {
            return Err("Invalid backing file offset".into());
        }
        // Extensions.
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cs
        };
        let off = h.header_length as u64;
        if h.version == 3 || off < ext_end {
            h.read_extensions(f, off, ext_end)?;
        }
        if h.incompatible & !INCOMPAT_KNOWN != 0 {
            let unknown = h.incompatible & !INCOMPAT_KNOWN;
            let mut parts = Vec::new();
            for bit in 0..64 {
                if unknown & (1 << bit) == 0 {
                    continue;
                }
                match h
                    .feature_names
                    .iter()
                    .find(|(t, b, _)| *t == 0 && *b as u64 == bit)
                {
                    Some((_, _, n)) => parts.push(n.clone()),
                    None => parts.push(format!("Unknown incompatible feature: {:x}", 1u64 << bit)),
                }
            }
            return Err(format!(
                "Unsupported qcow2 feature(s): {}",
                parts.join(", ")
            ));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 && h.data_file.is_none() {
            return Err("Missing external data file name".into());
        }
        if h.refcount_order > 6 {
            return Err("Reference count entry width too large; may not exceed 64 bits".into());
        }
        if h.crypt_method > 2 {
            return Err(format!("Unsupported encryption method: {}", h.crypt_method));
        }
        if h.compression_type > 1 {
            return Err(format!("Unknown compression type '{}'", h.compression_type));
        }
        if h.compression_type != 0 && h.incompatible & INCOMPAT_COMPRESSION == 0 {
            return Err(
                "Compression type incompatible feature bit must be set for non-zlib compression"
                    .into(),
            );
        }
        if h.extended_l2() && h.cluster_bits < 14 {
            return Err(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            );
        }
        // Refcount table.
        if h.refcount_table_clusters as u64 > MAX_REFTABLE_BYTES / cs {
            return Err("Reference count table too large".into());
        }
        if h.refcount_table_clusters == 0 {
            return Err("Image does not contain a reference count table".into());
        }
        if h.refcount_table_offset % cs != 0 {
            return Err("Invalid reference count table offset".into());
        }
        if h.refcount_table_offset
            .saturating_add(h.refcount_table_clusters as u64 * cs)
            > file_len.next_multiple_of(cs).max(file_len)
            && h.refcount_table_offset >= file_len
        {
            return Err("Invalid reference count table offset".into());
        }
        // Snapshots.
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err("Too many snapshots".into());
        }
        if h.snapshots_offset % cs != 0 {
            return Err("Invalid snapshot table offset".into());
        }
        // L1.
        if h.l1_size as u64 > MAX_L1_BYTES / 8 {
            return Err("Active L1 table too large".into());
        }
        if h.l1_size as u64 > 0 && h.l1_table_offset % cs != 0 {
            return Err("Invalid L1 table offset".into());
        }
        if h.size > i64::MAX as u64 {
            return Err("Image is too big".into());
        }
        if (h.l1_size as u64) < h.l1_entries_for(h.size) {
            return Err("L1 table is too small".into());
        }
        if h.l1_size > 0 && h.l1_table_offset.saturating_add(h.l1_size as u64 * 8) > file_len {
            return Err("Invalid L1 table offset".into());
        }
        // Backing file name.
        if h.backing_file_offset != 0 {
            if h.backing_file_size > 1023 || h.backing_file_offset + h.backing_file_size as u64 > cs
            {
                return Err("Backing file name too long".into());
            }
            let mut name = vec![0u8; h.backing_file_size as usize];
            pread_full(f, &mut name, h.backing_file_offset).map_err(|e| e.to_string())?;
            h.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
        }
        Ok(h)
    }

    fn read_extensions(&mut self, f: &File, mut off: u64, end: u64) -> Result<(), String> {
        loop {
            if off + 8 > end {
                if self.version == 2 {
                    return Ok(());
                }
                return Err("qcow2_read_extension: ERROR: pread fail from offset".into());
            }
            let mut hb = [0u8; 8];
            pread_full(f, &mut hb, off).map_err(|e| e.to_string())?;
            let ty = be32(&hb, 0);
            let len = be32(&hb, 4) as u64;
            off += 8;
            if ty == 0 {
                return Ok(());
            }
            if len > end - off {
                return Err("Header extension too large".into());
            }
            let mut data = vec![0u8; len as usize];
            pread_full(f, &mut data, off).map_err(|e| e.to_string())?;
            match ty {
                EXT_BACKING_FORMAT => {
                    if len > 15 {
                        return Err(format!(
                            "ERROR: ext_backing_format: len={len} too large (>=16)"
                        ));
                    }
                    self.backing_format = Some(String::from_utf8_lossy(&data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    self.has_feature_table = true;
                    for e in data.chunks_exact(48) {
                        let name = e[2..].split(|&c| c == 0).next().unwrap_or_default();
                        self.feature_names.push((
                            e[0],
                            e[1],
                            String::from_utf8_lossy(name).into_owned(),
                        ));
                    }
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(String::from_utf8_lossy(&data).into_owned());
                    self.other_extensions.push((ty, data));
                }
                EXT_BITMAPS => {
                    if len >= 24 {
                        self.bitmaps = Some((be32(&data, 0), be64(&data, 8), be64(&data, 16)));
                    }
                    self.other_extensions.push((ty, data));
                }
                _ => self.other_extensions.push((ty, data)),
            }
            off += len.next_multiple_of(8);
        }
    }

    /// Serialize the header (and extensions, backing name) as QEMU writes
    /// it. Returns the bytes for the start of cluster 0. Fails when it does
    /// not fit in one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>, String> {
        match self.serialize_inner() {
            Err(_) if self.has_feature_table => {
                let mut h = self.clone();
                h.has_feature_table = false;
                h.serialize_inner()
            }
            r => r,
        }
    }

    fn serialize_inner(&self) -> Result<Vec<u8>, String> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; 72];
        b[0..4].copy_from_slice(&crate::image::QCOW2_MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            let mut extra = self.extra_fields.clone();
            if extra.len() < 8 {
                extra.resize(8, 0);
            }
            extra[0] = self.compression_type;
            let hl = 104 + extra.len() as u32;
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&hl.to_be_bytes());
            b.extend_from_slice(&extra);
            let push_ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
                b.extend_from_slice(&ty.to_be_bytes());
                b.extend_from_slice(&(data.len() as u32).to_be_bytes());
                b.extend_from_slice(data);
                b.resize(b.len().next_multiple_of(8), 0);
            };
            if let Some(fmt) = &self.backing_format {
                push_ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
            }
            for (ty, data) in &self.other_extensions {
                if *ty == EXT_DATA_FILE {
                    push_ext(&mut b, *ty, data);
                }
            }
            if self.has_feature_table {
                push_ext(&mut b, EXT_FEATURE_TABLE, &feature_table());
            }
            for (ty, data) in &self.other_extensions {
                if *ty != EXT_DATA_FILE {
                    push_ext(&mut b, *ty, data);
                }
            }
            b.extend_from_slice(&[0u8; 8]);
        } else if let Some(fmt) = &self.backing_format {
            // v2 images may carry extensions too (QEMU writes the backing format).
            b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            b.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
            b.extend_from_slice(fmt.as_bytes());
            b.resize(b.len().next_multiple_of(8), 0);
            b.extend_from_slice(&[0u8; 8]);
        }
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() > cs {
            return Err("Header extensions too large".into());
        }
        Ok(b)
    }

    /// Write the serialized header as cluster 0, zero-padded to the whole
    /// cluster, as QEMU's `qcow2_update_header` does (which also clears the
    /// stale bytes of a previous, longer header).
    pub fn write(&self, f: &File) -> std::io::Result<()> {
        let mut b = self
            .serialize()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        b.resize(b.len().max(self.cluster_size() as usize), 0);
        f.write_all_at(&b, 0)
    }
}

/// QEMU's feature name table (8 entries of 48 bytes).
pub fn feature_table() -> Vec<u8> {
    let feats: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut v = Vec::with_capacity(8 * 48);
    for (t, bit, name) in feats {
        let mut e = [0u8; 48];
        e[0] = t;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&e);
    }
    v
}

/// One internal snapshot.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// L1 table offset.
    pub l1_table_offset: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds.
    pub date_nsec: u32,
    /// Guest clock in ns.
    pub vm_clock_nsec: u64,
    /// VM state size.
    pub vm_state_size: u64,
    /// Disk size at snapshot time (v3 extra data).
    pub disk_size: Option<u64>,
    /// Instruction count (extra data), if present.
    pub icount: Option<u64>,
    /// Extra data bytes beyond what we know (preserved).
    pub extra_unknown: Vec<u8>,
}

/// Read the snapshot table.
pub fn read_snapshots(f: &File, h: &Header) -> Result<Vec<Snapshot>, String> {
    let file_len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        if off.saturating_add(40) > file_len {
            return Err("Snapshot table entry is beyond the end of the file".into());
        }
        let mut e = [0u8; 40];
        pread_full(f, &mut e, off).map_err(|e| e.to_string())?;
        let mut s = Snapshot {
            l1_table_offset: be64(&e, 0),
            l1_size: be32(&e, 8),
            date_sec: be32(&e, 16),
            date_nsec: be32(&e, 20),
            vm_clock_nsec: be64(&e, 24),
            vm_state_size: be32(&e, 32) as u64,
            ..Default::default()
        };
        let id_len = be16(&e, 12) as u64;
        let name_len = be16(&e, 14) as u64;
        let extra_len = be32(&e, 36) as u64;
        if extra_len > 1024 {
            return Err("Too much extra metadata in snapshot table entry 0".into());
        }
        off += 40;
        let total = extra_len + id_len + name_len;
        if off.saturating_add(total) > file_len {
            return Err("Snapshot table entry is beyond the end of the file".into());
        }
        let mut rest = vec![0u8; total as usize];
        pread_full(f, &mut rest, off).map_err(|e| e.to_string())?;
        let ex = &rest[..extra_len as usize];
        if ex.len() >= 8 {
            s.vm_state_size = be64(ex, 0);
        }
        if ex.len() >= 16 {
            s.disk_size = Some(be64(ex, 8));
        }
        if ex.len() >= 24 {
            s.icount = Some(be64(ex, 16));
        }
        if ex.len() > 24 {
            s.extra_unknown = ex[24..].to_vec();
        }
        let ids = &rest[extra_len as usize..(extra_len + id_len) as usize];
        let nm = &rest[(extra_len + id_len) as usize..];
        s.id = String::from_utf8_lossy(ids).into_owned();
        s.name = String::from_utf8_lossy(nm).into_owned();
        off += total;
        off = off.next_multiple_of(8);
        out.push(s);
    }
    Ok(out)
}

/// Serialize a snapshot table.
pub fn serialize_snapshots(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        let mut extra = Vec::new();
        extra.extend_from_slice(&s.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        if let Some(ic) = s.icount {
            extra.extend_from_slice(&ic.to_be_bytes());
            extra.extend_from_slice(&s.extra_unknown);
        }
        b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
        b.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&extra);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b
}

/// Read `n` big-endian u64 entries at `offset`, refusing ranges past EOF.
pub fn read_table(f: &File, offset: u64, n: u64) -> std::io::Result<Vec<u64>> {
    let len = f.metadata()?.len();
    let bytes = n
        .checked_mul(8)
        .filter(|b| offset.checked_add(*b).is_some_and(|e| e <= len))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("table at {offset:#x} with {n} entries is beyond the end of the file"),
            )
        })?;
    let mut buf = vec![0u8; bytes as usize];
    pread_full(f, &mut buf, offset)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// Write big-endian u64 entries at `offset`.
pub fn write_table(f: &File, offset: u64, t: &[u64]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(t.len() * 8);
    for e in t {
        buf.extend_from_slice(&e.to_be_bytes());
    }
    f.write_all_at(&buf, offset)
}

/// Get entry `i` of a refcount block with `order` = log2(bits).
pub fn refblock_get(block: &[u8], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let byte = block[(i * bits / 8) as usize];
            let shift = (i * bits) % 8;
            ((byte >> shift) as u64) & ((1 << bits) - 1)
        }
        3 => block[i as usize] as u64,
        4 => be16(block, (i * 2) as usize) as u64,
        5 => be32(block, (i * 4) as usize) as u64,
        _ => be64(block, (i * 8) as usize),
    }
}

/// Set entry `i` of a refcount block.
pub fn refblock_set(block: &mut [u8], order: u32, i: u64, v: u64) {
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let idx = (i * bits / 8) as usize;
            let shift = (i * bits) % 8;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            block[idx] = (block[idx] & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[i as usize] = v as u8,
        4 => {
            block[(i * 2) as usize..(i * 2 + 2) as usize].copy_from_slice(&(v as u16).to_be_bytes())
        }
        5 => {
            block[(i * 4) as usize..(i * 4 + 4) as usize].copy_from_slice(&(v as u32).to_be_bytes())
        }
        _ => block[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&v.to_be_bytes()),
    }
}

/// Location of a compressed cluster: (host offset, byte length covering
/// the compressed data's sectors), as QEMU's `qcow2_parse_compressed_l2_entry`.
pub fn compressed_extent(h: &Header, l2e: u64) -> (u64, u64) {
    let csize_shift = 62 - (h.cluster_bits - 8);
    let offset_mask = (1u64 << csize_shift) - 1;
    let csize_mask = (1u64 << (h.cluster_bits - 8)) - 1;
    let coffset = l2e & offset_mask;
    let nb_csectors = ((l2e >> csize_shift) & csize_mask) + 1;
    let csize = nb_csectors * 512 - (coffset & 511);
    (coffset, csize)
}
