//! Creating qcow2 images with QEMU's exact layout, for every preallocation
//! mode: QEMU's cluster allocator is replayed in memory
//! ([`super::allocator`]) — cluster 0 header (v3: header_length 112,
//! backing-format extension, feature name table, end marker, backing
//! name), cluster 1 refcount table, cluster 2 refcount block, then the L1
//! table (written only as far as its entries) and whatever preallocation
//! places, refcount blocks and refcount table growth included — and the
//! file is then written in one pass.

use super::allocator::Allocator;
use super::meta::{self, Header};
use super::prealloc::{self, Plan};
use imago::format::PreallocateMode;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Preallocation modes (QEMU names: off, metadata, falloc, full).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Nothing allocated.
    #[default]
    Off,
    /// L2 tables and data clusters mapped, file sparse.
    Metadata,
    /// Metadata plus fallocate.
    Falloc,
    /// Metadata plus zeroes written.
    Full,
}

impl Prealloc {
    /// Parse QEMU's name.
    pub fn from_name(s: &str) -> Option<Prealloc> {
        match s {
            "off" => Some(Prealloc::Off),
            "metadata" => Some(Prealloc::Metadata),
            "falloc" => Some(Prealloc::Falloc),
            "full" => Some(Prealloc::Full),
            _ => None,
        }
    }
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
    /// imago's mode.
    pub fn imago(self) -> PreallocateMode {
        match self {
            Prealloc::Off => PreallocateMode::None,
            Prealloc::Metadata => PreallocateMode::FormatAllocate,
            Prealloc::Falloc => PreallocateMode::FullAllocate,
            Prealloc::Full => PreallocateMode::WriteData,
        }
    }
}

/// Options of a new qcow2 image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size (power of two, 512..=2 MiB).
    pub cluster_size: u64,
    /// Version 3 (compat=1.1) rather than 2 (compat=0.10).
    pub v3: bool,
    /// Lazy refcounts (v3 only).
    pub lazy_refcounts: bool,
    /// Refcount width in bits (power of two, 1..=64).
    pub refcount_bits: u64,
    /// zstd instead of zlib.
    pub zstd: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Preallocation.
    pub prealloc: Prealloc,
    /// Backing file name to record.
    pub backing_file: Option<String>,
    /// Backing format to record.
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            v3: true,
            lazy_refcounts: false,
            refcount_bits: 16,
            zstd: false,
            extended_l2: false,
            prealloc: Prealloc::Off,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Validate options with QEMU's messages (without the file name prefix).
pub fn validate(o: &CreateOptions) -> Result<(), String> {
    if !o.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&o.cluster_size) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    if !o.v3 && o.refcount_bits != 16 {
        return Err(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
                .into(),
        );
    }
    if !o.v3 && o.lazy_refcounts {
        return Err("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
    }
    if !o.v3 && o.zstd {
        return Err(
            "Compression type can only be specified for compatibility level 1.1 and above (use compat=1.1 or greater)"
                .into(),
        );
    }
    if !o.v3 && o.extended_l2 {
        return Err("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into());
    }
    if o.extended_l2 && o.cluster_size < 16384 {
        return Err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        );
    }
    if o.backing_file.is_some() && o.prealloc != Prealloc::Off && !o.extended_l2 {
        return Err(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
                .into(),
        );
    }
    let h = base_header(o);
    if h.l1_entries_for(o.size) * 8 > meta::MAX_L1_BYTES {
        return Err(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                .into(),
        );
    }
    Ok(())
}

fn base_header(o: &CreateOptions) -> Header {
    let cs = o.cluster_size;
    let mut h = Header {
        version: if o.v3 { 3 } else { 2 },
        cluster_bits: cs.trailing_zeros(),
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        refcount_order: o.refcount_bits.trailing_zeros(),
        header_length: if o.v3 { 112 } else { 72 },
        // QEMU writes the feature name table only with clusters of 8 KiB or more.
        has_feature_table: o.v3 && cs >= 8192,
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_format.clone(),
        ..Default::default()
    };
    if o.v3 {
        h.extra_fields = vec![0; 8];
        if o.lazy_refcounts {
            h.compatible |= meta::COMPAT_LAZY_REFCOUNTS;
        }
        if o.zstd {
            h.incompatible |= meta::INCOMPAT_COMPRESSION;
            h.compression_type = 1;
        }
        if o.extended_l2 {
            h.incompatible |= meta::INCOMPAT_EXTL2;
        }
    }
    h
}

fn io_err(e: std::io::Error) -> String {
    super::os_msg(&e)
}

/// Create (or overwrite) a qcow2 image at `path`. Errors are QEMU-style
/// messages without the file name prefix.
pub fn create(path: &Path, o: &CreateOptions) -> Result<(), String> {
    validate(o)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("Could not create '{}': {}", path.display(), io_err(e)))?;
    let r = create_in(&file, o);
    if r.is_err() {
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Write a fresh image into an empty, writable file.
pub fn create_in(file: &File, o: &CreateOptions) -> Result<(), String> {
    let mut h = base_header(o);
    let cs = o.cluster_size;
    let mut a = Allocator::new(cs, h.refcount_order);
    // qcow2_co_create's truncate to the virtual size: an L1 table of
    // exactly the needed entries, written as far as its entries.
    let l1_size = h.l1_entries_for(o.size);
    let l1_at = (l1_size > 0).then(|| {
        let at = a.alloc((l1_size * 8).div_ceil(cs));
        a.wrote(at * cs + l1_size * 8);
        at
    });
    let plan = match o.prealloc {
        Prealloc::Off => Some(Plan::default()),
        Prealloc::Metadata => prealloc::metadata(&mut a, &h, &[], 0, None, o.size),
        Prealloc::Falloc | Prealloc::Full => prealloc::allocated(&mut a, &h, &[], 0, None, o.size),
    }
    .ok_or("preallocation found an L2 table in a new image")?;
    if a.reftable.len() as u64 * 8 > meta::MAX_REFTABLE_BYTES {
        return Err(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                .into(),
        );
    }
    // Cluster 0 stays zero (no magic) until every table is in place: an
    // interrupted create never leaves a qcow2 header pointing at missing
    // tables.
    h.serialize()?;
    file.write_all_at(&vec![0u8; cs as usize], 0)
        .map_err(io_err)?;
    // Replaced refcount tables keep their bytes where nothing else goes.
    for (at, t) in &a.old_tables {
        a.write_table(file, *at, t).map_err(io_err)?;
    }
    prealloc::write_refblocks(file, &a, false).map_err(io_err)?;
    a.write_reftable(file).map_err(io_err)?;
    prealloc::write(file, &h, &plan, o.prealloc, o.size)?;
    if let Some(at) = l1_at {
        let l1 = prealloc::l1_entries(&[], l1_size, &plan, cs);
        meta::write_table(file, at * cs, &l1).map_err(io_err)?;
        h.l1_size = l1_size as u32;
        h.l1_table_offset = at * cs;
    }
    if file.metadata().map_err(io_err)?.len() < a.file_len {
        file.set_len(a.file_len).map_err(io_err)?;
    }
    h.refcount_table_offset = a.reftable_at * cs;
    h.refcount_table_clusters = (a.reftable.len() as u64 * 8 / cs) as u32;
    h.size = o.size;
    h.write(file).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    Ok(())
}
