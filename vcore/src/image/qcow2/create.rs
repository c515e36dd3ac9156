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
    let mut a = Allocator::new(cs, h.refcount_order);
    // qcow2_co_create's truncate to the virtual size: an L1 table of
    // exactly the needed entries, written as far as its entries.
    let l1_size = h.l1_entries_for(o.size);
    let l1 = (l1_size > 0).then(|| {
        let at = a.alloc((l1_size * 8).div_ceil(cs));
        a.wrote(at * cs + l1_size * 8);
        (at, l1_size)
    });
    let plan = match o.prealloc {
        Prealloc::Off => Plan::default(),
        Prealloc::Metadata => metadata(&mut a, &h, o.size),
        Prealloc::Falloc | Prealloc::Full => allocated(&mut a, &h, o.size),
    };
    if a.reftable.len() as u64 > MAX_REFTABLE_ENTRIES {
        return Err(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                .into(),
        );
    }
    write(file, &mut h, &a, l1, &plan, o)
}

/// QEMU's limit on refcount table entries (`QCOW_MAX_REFTABLE_SIZE`).
const MAX_REFTABLE_ENTRIES: u64 = 8 << 20;

/// Where preallocation put the L2 tables and data clusters.
#[derive(Default)]
struct Plan {
    /// Host cluster of each L2 table, by L1 index.
    l2: Vec<u64>,
    /// Data runs: (first guest cluster, first host cluster, clusters).
    runs: Vec<(u64, u64, u64)>,
    /// Bytes of the file to allocate (falloc) or fill with zeroes (full).
    data: Option<(u64, u64)>,
}

/// `preallocation=metadata`, as QEMU's `preallocate_co` does it: requests
/// of at most `INT_MAX` bytes (cluster aligned); within one, L2 table by L2
/// table, the table first, then the table's data clusters, contiguous
/// with the request's previous ones where those clusters are free. The
/// data clusters stay unwritten.
fn metadata(a: &mut Allocator, h: &Header, size: u64) -> Plan {
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let guest = size.div_ceil(cs);
    let request = ((i32::MAX as u64) & !(cs - 1)) / cs;
    // handle_alloc's limit, BDRV_REQUEST_MAX_BYTES.
    let piece = ((1u64 << 31) - 512) / cs;
    let mut p = Plan::default();
    let mut g = 0;
    while g < guest {
        let mut left = (guest - g).min(request);
        let mut next = None;
        while left > 0 {
            if (g / l2e) as usize >= p.l2.len() {
                let t = a.alloc(1);
                a.wrote((t + 1) * cs);
                p.l2.push(t);
            }
            let n = left.min(l2e - g % l2e).min(piece);
            let (host, k) = match next {
                None => (a.alloc(n), n),
                Some(at) => (at, a.alloc_at(at, n)),
            };
            if k == 0 {
                break;
            }
            p.runs.push((g, host, k));
            g += k;
            left -= k;
            next = Some(host + k);
        }
    }
    // The request's end: the file reaches at least the last data cluster.
    if let Some(&(_, host, n)) = p.runs.last() {
        a.wrote((host + n) * cs);
    }
    p
}

/// `preallocation=falloc|full`, as QEMU's `qcow2_co_truncate` does it: a
/// new refcount table and blocks at the end of the file, sized exactly for
/// everything to come; the data clusters right after them, allocated in
/// the file; then the L2 tables (the first into the old refcount table's
/// place, the others past the data).
fn allocated(a: &mut Allocator, h: &Header, size: u64) -> Plan {
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let nb = size.div_ceil(cs);
    let end = (a.last_used() + 1) * cs;
    let tables = nb.div_ceil(l2e) + 1;
    let start = a.area(end / cs, nb + tables, true, None);
    let got = a.alloc_at(start, nb);
    debug_assert_eq!(got, nb);
    let from = a.file_len;
    a.wrote((start + nb) * cs);
    let mut p = Plan {
        data: Some((from, (start + nb) * cs)),
        ..Plan::default()
    };
    let mut g = 0;
    while g < nb {
        let t = a.alloc(1);
        a.wrote((t + 1) * cs);
        p.l2.push(t);
        let n = (nb - g).min(l2e - g % l2e);
        p.runs.push((g, start + g, n));
        g += n;
    }
    p
}

/// Write the image the allocator and plan describe, the header last (an
/// interrupted create leaves no qcow2 header pointing at missing tables).
fn write(
    file: &File,
    h: &mut Header,
    a: &Allocator,
    l1: Option<(u64, u64)>,
    p: &Plan,
    o: &CreateOptions,
) -> Result<(), String> {
    let cs = h.cluster_size();
    let bytes = |t: &[u64]| -> Vec<u64> { t.iter().map(|&c| c * cs).collect() };
    h.serialize()?;
    file.write_all_at(&vec![0u8; cs as usize], 0)
        .map_err(io_err)?;
    // Replaced refcount tables keep their bytes where nothing else goes.
    for (at, t) in &a.old_tables {
        meta::write_table(file, at * cs, &bytes(t)).map_err(io_err)?;
    }
    let rbe = a.refblock_entries();
    let mut block = vec![0u8; cs as usize];
    for (k, &b) in a.reftable.iter().enumerate() {
        if b == 0 {
            continue;
        }
        block.fill(0);
        let first = k as u64 * rbe;
        for j in 0..rbe {
            if a.used(first + j) {
                meta::refblock_set(&mut block, h.refcount_order, j, 1);
            }
        }
        file.write_all_at(&block, b * cs).map_err(io_err)?;
    }
    meta::write_table(file, a.reftable_at * cs, &bytes(&a.reftable)).map_err(io_err)?;
    let l2e = h.l2_entries() as usize;
    let mut table = vec![0u8; cs as usize];
    let mut run = p.runs.iter().peekable();
    for (i, t) in p.l2.iter().enumerate() {
        table.fill(0);
        let g0 = (i * l2e) as u64;
        while let Some(&&(g, host, n)) = run.peek() {
            if g >= g0 + l2e as u64 {
                break;
            }
            for c in 0..n {
                let e = ((host + c) * cs) | meta::OFLAG_COPIED;
                let at = (g + c - g0) as usize * 8;
                table[at..at + 8].copy_from_slice(&e.to_be_bytes());
            }
            run.next();
        }
        file.write_all_at(&table, t * cs).map_err(io_err)?;
    }
    if let Some((at, n)) = l1 {
        let entries: Vec<u64> = (0..n as usize)
            .map(|i| p.l2.get(i).map_or(0, |t| (t * cs) | meta::OFLAG_COPIED))
            .collect();
        meta::write_table(file, at * cs, &entries).map_err(io_err)?;
        h.l1_size = n as u32;
        h.l1_table_offset = at * cs;
    }
    match (o.prealloc, p.data) {
        (Prealloc::Falloc, Some((from, to))) if to > from => {
            crate::image::raw::fallocate(file, 0, from, to - from).map_err(|e| {
                format!(
                    "Failed to resize underlying file: Could not preallocate new data: {}",
                    io_err(e)
                )
            })?;
        }
        (Prealloc::Full, Some((from, to))) if to > from => {
            let zero = vec![0u8; (4 << 20).min(to - from) as usize];
            let mut at = from;
            while at < to {
                let n = (to - at).min(zero.len() as u64) as usize;
                file.write_all_at(&zero[..n], at).map_err(io_err)?;
                at += n as u64;
            }
        }
        _ => {}
    }
    // Metadata preallocation leaves the data clusters unwritten, but for
    // the part of the last one past the image's end when that is not
    // cluster aligned: QEMU's allocation covers only the request, so
    // copy-on-write writes zeroes over the rest of the cluster.
    let tail = (o.size % cs).next_multiple_of(512);
    if let (Prealloc::Metadata, true, Some(&(_, host, n))) =
        (o.prealloc, tail % cs != 0, p.runs.last())
    {
        let last = (host + n - 1) * cs;
        file.write_all_at(&vec![0u8; (cs - tail) as usize], last + tail)
            .map_err(io_err)?;
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
