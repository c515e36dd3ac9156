//! Creating qcow2 images with QEMU's exact layout: cluster 0 header (v3:
//! header_length 112, backing-format extension, feature name table, end
//! marker, backing name), cluster 1 refcount table, cluster 2 refcount
//! block, cluster 3 L1 table (written only as far as its entries, like
//! QEMU). Preallocation goes through imago (whose metadata layout matches
//! QEMU's), after which the header is rewritten in QEMU's form.

use super::meta::{self, Header};
use imago::format::PreallocateMode;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder};
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
    if o.backing_file.is_some() && o.prealloc != Prealloc::Off {
        return Err(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
                .into(),
        );
    }
    if o.extended_l2 && o.prealloc != Prealloc::Off {
        return Err(
            "preallocation with extended L2 entries is not supported by this version".into(),
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
    let rbe = h.refblock_entries();
    let l1_size = h.l1_entries_for(o.size);
    let direct_l1 = o.prealloc == Prealloc::Off || o.extended_l2;
    let l1_clusters = if direct_l1 {
        (l1_size * 8).div_ceil(cs)
    } else {
        0
    };
    // Clusters: header, reftable, refblock(s), L1; the refcount table lives
    // in cluster 1 and the first refblock in cluster 2 (as QEMU). Extra
    // refblocks (tiny clusters, big L1) follow the L1 table.
    let mut n_rb = 1u64;
    loop {
        let total = 2 + n_rb + l1_clusters;
        let need = total.div_ceil(rbe);
        if need <= n_rb {
            break;
        }
        n_rb = need;
    }
    if n_rb > cs / 8 {
        return Err(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                .into(),
        );
    }
    let total = 2 + n_rb + l1_clusters;
    // Refcount table.
    let mut rb_offsets = vec![2 * cs];
    for i in 1..n_rb {
        rb_offsets.push((3 + l1_clusters + i - 1) * cs);
    }
    let mut reftable = vec![0u64; (cs / 8) as usize];
    for (i, off) in rb_offsets.iter().enumerate() {
        reftable[i] = *off;
    }
    // Cluster 0 is zero (no magic) until every table is in place: an
    // interrupted create never leaves a qcow2 header pointing at missing
    // tables.
    h.serialize()?;
    let c0 = vec![0u8; cs as usize];
    file.write_all_at(&c0, 0).map_err(io_err)?;
    meta::write_table(file, cs, &reftable).map_err(io_err)?;
    for (i, off) in rb_offsets.iter().enumerate() {
        let mut block = vec![0u8; cs as usize];
        for j in 0..rbe {
            let cl = i as u64 * rbe + j;
            if cl < total {
                meta::refblock_set(&mut block, h.refcount_order, j, 1);
            }
        }
        file.write_all_at(&block, *off).map_err(io_err)?;
    }
    if direct_l1 {
        if l1_size > 0 {
            h.l1_size = l1_size as u32;
            h.l1_table_offset = 3 * cs;
            file.write_all_at(&vec![0u8; (l1_size * 8) as usize], 3 * cs)
                .map_err(io_err)?;
            if n_rb > 1 {
                // Keep the extra refblocks inside the file.
                let end = total * cs;
                if file.metadata().map_err(io_err)?.len() < end {
                    file.set_len(end).map_err(io_err)?;
                }
            }
        }
        h.size = o.size;
        h.write(file).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        return Ok(());
    }
    // Preallocation through imago, on a header without the flags imago
    // does not know; then write the final header.
    let mut plain = h.clone();
    plain.incompatible = 0;
    plain.compression_type = 0;
    plain.write(file).map_err(io_err)?;
    {
        let dup = file.try_clone().map_err(io_err)?;
        let f =
            imago::file::File::from_open_file(dup, imago::StorageOpenOptions::new().write(true))
                .map_err(io_err)?;
        let q = imago::qcow2::Qcow2::<imago::file::File>::builder(f)
            .write(true)
            .backing(None)
            .open(DenyImplicitOpenGate::default())
            .map_err(|e| e.to_string())?;
        let a = FormatAccess::new(q);
        a.resize_grow(o.size, o.prealloc.imago())
            .map_err(|e| e.to_string())?;
        a.flush().map_err(|e| e.to_string())?;
    }
    let mut fin = Header::read(file)?;
    // imago sizes the L1 table generously; QEMU uses exactly what the size
    // needs and writes only those entries. Shrink it and give the unused,
    // all-zero tail of the cluster back to the file system.
    let need = fin.l1_entries_for(o.size);
    if (fin.l1_size as u64) > need {
        let used_end = fin.l1_table_offset + need * 8;
        let tbl_end = fin.l1_table_offset + (fin.l1_size as u64 * 8).next_multiple_of(cs);
        fin.l1_size = need as u32;
        let start = used_end.next_multiple_of(4096);
        if tbl_end > start {
            let _ = crate::image::raw::fallocate(
                file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                tbl_end - start,
            );
        }
    }
    fin.compatible = h.compatible;
    fin.incompatible = h.incompatible;
    fin.compression_type = h.compression_type;
    fin.has_feature_table = h.has_feature_table;
    fin.backing_file = h.backing_file.clone();
    fin.backing_format = h.backing_format.clone();
    fin.extra_fields = h.extra_fields.clone();
    fin.other_extensions.clear();
    fin.write(file).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    Ok(())
}
