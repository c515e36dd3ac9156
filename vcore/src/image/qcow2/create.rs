//! Creating qcow2 images with QEMU's exact layout: cluster 0 header (v3:
//! header_length 112, backing-format extension, feature name table, end
//! marker, backing name), cluster 1 refcount table, cluster 2 refcount
//! block, cluster 3 L1 table (written only as far as its entries, like
//! QEMU). Metadata preallocation is laid out here as QEMU does it
//! ([`MetadataPlan`]); the other preallocation modes go through imago
//! (whose metadata layout matches QEMU's), after which the header is
//! rewritten in QEMU's form.

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
    if o.prealloc == Prealloc::Metadata {
        if let Some(plan) = MetadataPlan::new(&h, o.size, l1_clusters_for(&h, o.size)) {
            return plan.write(file, h, o.size);
        }
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

fn l1_clusters_for(h: &Header, size: u64) -> u64 {
    (h.l1_entries_for(size) * 8).div_ceil(h.cluster_size())
}

/// QEMU's layout of `preallocation=metadata`, computed instead of mapped
/// cluster by cluster (a 200 GiB image has 3.2 million clusters): after
/// the header, refcount table, first refcount block and L1 table, QEMU's
/// `preallocate_co` allocates, L2 table by L2 table, the table and then
/// one run of data clusters for its entries (at most `INT_MAX` bytes per
/// run). Clusters are handed out in order from the first free one; when a
/// run first uses a cluster no refcount block covers yet, the block is
/// allocated right after the run (it then describes itself, or, with tiny
/// clusters, a further block after it describes it). Nothing is freed, so
/// every cluster below `free` has refcount 1.
struct MetadataPlan {
    /// Host cluster of each L2 table.
    l2: Vec<u64>,
    /// Host cluster of each refcount block.
    rb: Vec<u64>,
    /// Data runs: (first guest cluster, first host cluster, clusters).
    runs: Vec<(u64, u64, u64)>,
    /// First cluster past everything allocated.
    free: u64,
    rbe: u64,
}

impl MetadataPlan {
    /// The plan, or `None` where QEMU would have to grow the refcount
    /// table past its first cluster (not modelled: imago does it).
    fn new(h: &Header, size: u64, l1_clusters: u64) -> Option<MetadataPlan> {
        let cs = h.cluster_size();
        let l2e = h.l2_entries();
        let guest = size.div_ceil(cs);
        // qcow2_alloc_host_offset's request: INT_MAX aligned down to a
        // cluster, and BDRV_REQUEST_MAX_BYTES.
        let cap = (((i32::MAX as u64) & !(cs - 1)) / cs).min(((1u64 << 31) - 512) / cs);
        let mut p = MetadataPlan {
            l2: Vec::with_capacity(guest.div_ceil(l2e) as usize),
            rb: vec![2],
            runs: Vec::new(),
            free: 3,
            rbe: h.refblock_entries(),
        };
        let l1 = p.alloc(l1_clusters.max(1));
        debug_assert_eq!(l1, 3);
        let mut g = 0;
        while g < guest {
            if (g / l2e) as usize >= p.l2.len() {
                let t = p.alloc(1);
                p.l2.push(t);
            }
            let n = (guest - g).min(l2e - g % l2e).min(cap);
            let host = p.alloc(n);
            p.runs.push((g, host, n));
            g += n;
            if p.rb.len() as u64 > cs / 8 {
                return None;
            }
        }
        Some(p)
    }

    /// Allocate `n` clusters at the first free one, then count them
    /// (allocating refcount blocks); the first cluster.
    fn alloc(&mut self, n: u64) -> u64 {
        let start = self.free;
        self.free += n;
        self.cover(start, n);
        start
    }

    /// Make sure refcount blocks cover `[start, start + n)`, in order.
    fn cover(&mut self, start: u64, n: u64) {
        let (first, last) = (start / self.rbe, (start + n - 1) / self.rbe);
        for k in first..=last {
            let k = k as usize;
            if self.rb.len() <= k {
                self.rb.resize(k + 1, 0);
            }
            if self.rb[k] == 0 {
                let b = self.free;
                self.free += 1;
                if (b / self.rbe) as usize != k {
                    self.cover(b, 1);
                }
                self.rb[k] = b;
            }
        }
    }

    /// Write the image: tables first, cluster 0's header last.
    fn write(self, file: &File, mut h: Header, size: u64) -> Result<(), String> {
        let cs = h.cluster_size();
        let l2e = h.l2_entries() as usize;
        let mut reftable = vec![0u64; (cs / 8) as usize];
        for (k, b) in self.rb.iter().enumerate() {
            reftable[k] = b * cs;
        }
        meta::write_table(file, cs, &reftable).map_err(io_err)?;
        for (k, b) in self.rb.iter().enumerate() {
            let mut block = vec![0u8; cs as usize];
            let first = k as u64 * self.rbe;
            for j in 0..self.rbe.min(self.free.saturating_sub(first)) {
                meta::refblock_set(&mut block, h.refcount_order, j, 1);
            }
            file.write_all_at(&block, b * cs).map_err(io_err)?;
        }
        let mut table = vec![0u8; cs as usize];
        let mut run = self.runs.iter().peekable();
        for (i, t) in self.l2.iter().enumerate() {
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
        let l1: Vec<u64> = self
            .l2
            .iter()
            .map(|t| (t * cs) | meta::OFLAG_COPIED)
            .collect();
        meta::write_table(file, 3 * cs, &l1).map_err(io_err)?;
        // The data clusters stay a hole, but for the part of the last one
        // past the image's end when that is not cluster aligned: QEMU's
        // allocation covers only the request, so copy-on-write writes
        // zeroes over the rest of the cluster.
        let tail = (size % cs).next_multiple_of(512);
        if let (true, Some(&(_, host, n))) = (tail % cs != 0, self.runs.last()) {
            let last = (host + n - 1) * cs;
            file.write_all_at(&vec![0u8; (cs - tail) as usize], last + tail)
                .map_err(io_err)?;
        }
        if file.metadata().map_err(io_err)?.len() < self.free * cs {
            file.set_len(self.free * cs).map_err(io_err)?;
        }
        h.l1_size = l1.len() as u32;
        h.l1_table_offset = 3 * cs;
        h.size = size;
        h.write(file).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        Ok(())
    }
}
