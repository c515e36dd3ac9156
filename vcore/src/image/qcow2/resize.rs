//! Growing and shrinking a qcow2 image the way QEMU does it
//! (`qcow2_co_truncate`), with QEMU's layout: QEMU's cluster allocator is
//! replayed over the image's refcounts ([`super::allocator`]). Growing:
//! the L1 table, when it must grow, is replaced by one of exactly the
//! needed entries in the first free clusters (`qcow2_grow_l1_table`), the
//! old one freed; then the preallocation mode places L2 tables and data
//! clusters as QEMU's (`preallocate_co`, or the falloc/full branch).
//! Shrinking: see [`shrink`]. Write order keeps a crash at any point free
//! of corruption (at worst leaked clusters): new refcounts first (freed
//! clusters still counted), then the new tables, the header switch, and
//! last the freed clusters' refcounts.

use super::allocator::Allocator;
use super::create::Prealloc;
use super::meta::{self, Header};
use super::prealloc::{self, Plan};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Grow the image in `f` to `new_size` bytes with preallocation `mode`.
/// `Ok(false)` (nothing written) where this replay does not apply: a dirty
/// or corrupt image, an external data file, refcount or L1 structures
/// outside the file or not counted, preallocation from a size that is not
/// cluster aligned or into an L2 table shared with a snapshot.
pub fn grow(f: &File, new_size: u64, mode: Prealloc) -> Result<bool, String> {
    let h = Header::read(f)?;
    let cs = h.cluster_size();
    let io = |e: std::io::Error| e.to_string();
    if new_size < h.size
        || new_size % 512 != 0
        || h.dirty()
        || h.corrupt()
        || h.incompatible & meta::INCOMPAT_DATA_FILE != 0
    {
        return Ok(false);
    }
    let need = h.l1_entries_for(new_size).max(h.l1_size as u64);
    if need * 8 > meta::MAX_L1_BYTES {
        return Ok(false);
    }
    let Ok(mut a) = Allocator::load(f, &h) else {
        return Ok(false);
    };
    if h.l1_table_offset % cs != 0 || h.l1_table_offset + h.l1_size as u64 * 8 > a.file_len {
        return Ok(false);
    }
    let old_l1 = meta::read_table(f, h.l1_table_offset, h.l1_size as u64).map_err(io)?;
    if !tables_counted(&a, &h, &old_l1) {
        return Ok(false);
    }
    let grown = need > h.l1_size as u64;
    let l1_at = if grown {
        let at = a.alloc((need * 8).div_ceil(cs));
        a.wrote(at * cs + need * 8);
        if h.l1_size > 0 {
            a.release(h.l1_table_offset / cs, (h.l1_size as u64 * 8).div_ceil(cs));
        }
        at
    } else {
        h.l1_table_offset / cs
    };
    // From a size inside a cluster: QEMU keeps (metadata) or moves
    // (falloc, full) that cluster if it is mapped, else allocates it with
    // the rest; a backing file would be copied into its head (not
    // replayed; nor is metadata preallocation's subcluster copy-on-write
    // with extended L2 entries, see prealloc::metadata).
    let kept = match mode {
        Prealloc::Off => None,
        _ => {
            let Some(kept) = mapped_cluster(f, &h, &old_l1, h.size).map_err(io)? else {
                return Ok(false);
            };
            if h.size % cs != 0 && kept.is_none() && h.backing_file.is_some() {
                return Ok(false);
            }
            kept
        }
    };
    let plan = match mode {
        Prealloc::Off => Some(Plan::default()),
        Prealloc::Metadata => prealloc::metadata(&mut a, &h, &old_l1, h.size, kept, new_size),
        Prealloc::Falloc | Prealloc::Full => {
            prealloc::allocated(&mut a, &h, &old_l1, h.size, kept, new_size)
        }
    };
    let Some(plan) = plan else { return Ok(false) };
    if a.reftable.len() as u64 * 8 > meta::MAX_REFTABLE_BYTES
        || !prealloc::fits(f, &h, &plan).map_err(io)?
    {
        return Ok(false);
    }
    // 1. Refcounts of everything new; freed clusters keep theirs.
    prealloc::write_refblocks(f, &a, true).map_err(io)?;
    // 2. Refcount tables: the entries of blocks entered in place, and a
    //    new table whole.
    write_reftable_changes(f, &a, h.refcount_table_offset / cs).map_err(io)?;
    // 3. L2 tables and data, then the L1 table.
    prealloc::write(f, &h, &plan, mode, new_size)?;
    let l1 = prealloc::l1_entries(&old_l1, need, &plan, cs);
    if grown {
        meta::write_table(f, l1_at * cs, &l1).map_err(io)?;
    } else {
        for &(i, _, new) in &plan.l2 {
            if new {
                f.write_all_at(&l1[i].to_be_bytes(), h.l1_table_offset + i as u64 * 8)
                    .map_err(io)?;
            }
        }
    }
    if f.metadata().map_err(io)?.len() < a.file_len {
        f.set_len(a.file_len).map_err(io)?;
    }
    f.sync_data().map_err(io)?;
    // 4. The header switches size, L1 and refcount tables in one write.
    write_header_fields(f, &h, new_size, need, l1_at * cs, &a).map_err(io)?;
    f.sync_data().map_err(io)?;
    // 5. Freed clusters.
    prealloc::write_refblocks(f, &a, false).map_err(io)?;
    f.sync_data().map_err(io)?;
    Ok(true)
}

/// Shrink the image in `f` to `new_size` bytes as QEMU's
/// `qcow2_co_truncate` does: the clusters past the new end are discarded
/// L2 slice by L2 slice (an L2 range without a table gets one first, as
/// QEMU's `get_cluster_table` allocates it), freed clusters are punched
/// out of the file, the L1 entries past the new end are zeroed and their
/// L2 tables freed (the L1 table keeps its size), refcount blocks left
/// counting nothing are dropped, and the file is cut after the last
/// cluster in use. `Ok(false)` (nothing written) where this replay does
/// not apply: snapshots or other shared clusters, compressed clusters in
/// the discarded range, lazy refcounts, dirty or corrupt images, or an
/// external data file.
pub fn shrink(f: &File, new_size: u64) -> Result<bool, String> {
    let h = Header::read(f)?;
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let io = |e: std::io::Error| e.to_string();
    let stride = h.l2_entry_size() / 8;
    let start = new_size.div_ceil(cs);
    let end = h.size.div_ceil(cs);
    if new_size >= h.size
        || new_size % 512 != 0
        || start * cs > h.size
        || h.dirty()
        || h.corrupt()
        || h.nb_snapshots != 0
        || h.compatible & meta::COMPAT_LAZY_REFCOUNTS != 0
        || h.incompatible & meta::INCOMPAT_DATA_FILE != 0
    {
        return Ok(false);
    }
    let Ok(mut a) = Allocator::load(f, &h) else {
        return Ok(false);
    };
    if a.shared
        || h.l1_table_offset % cs != 0
        || h.l1_table_offset + h.l1_size as u64 * 8 > a.file_len
    {
        return Ok(false);
    }
    let mut l1 = meta::read_table(f, h.l1_table_offset, h.l1_size as u64).map_err(io)?;
    if !tables_counted(&a, &h, &l1) {
        return Ok(false);
    }
    // 1. Discard [start, end), one L2 table at a time.
    // (L1 index, offset, table as read, table after the discard, new)
    type Table = (usize, u64, Vec<u64>, Vec<u64>, bool);
    let mut tables: Vec<Table> = Vec::new();
    // Freed data clusters in QEMU's discard batches: queued, merged with
    // adjacent ones, and sent when the discard ends or before the next
    // allocation (a punch frees only the whole file-system blocks it
    // covers, so the batches matter with clusters smaller than a block).
    let mut batches: Vec<Vec<u64>> = vec![Vec::new()];
    let mut freed_tables: Vec<u64> = Vec::new();
    let mut g = start;
    while g < end {
        let i = (g / l2e) as usize;
        let n = (end - g).min(l2e - g % l2e);
        let Some(&e) = l1.get(i) else {
            return Ok(false);
        };
        let (was, new) = if e & meta::OFFSET_MASK == 0 {
            if batches.last().is_some_and(|b| !b.is_empty()) {
                batches.push(Vec::new());
            }
            let t = a.alloc(1);
            a.wrote((t + 1) * cs);
            l1[i] = (t * cs) | meta::OFLAG_COPIED;
            (vec![0u64; (cs / 8) as usize], true)
        } else if e & meta::OFLAG_COPIED == 0
            || (e & meta::OFFSET_MASK) % cs != 0
            || (e & meta::OFFSET_MASK) + cs > a.file_len
        {
            return Ok(false);
        } else {
            (
                meta::read_table(f, e & meta::OFFSET_MASK, cs / 8).map_err(io)?,
                false,
            )
        };
        let mut t = was.clone();
        for j in (g % l2e)..(g % l2e + n) {
            // Extended L2 entries: the entry, then its subcluster bitmap;
            // a full discard clears both.
            let j = (j * stride) as usize;
            let x = t[j];
            if x & meta::OFLAG_COMPRESSED != 0 {
                return Ok(false);
            }
            let host = x & meta::OFFSET_MASK;
            if host != 0 {
                if host % cs != 0 || !a.is_used(host / cs) {
                    return Ok(false);
                }
                a.release(host / cs, 1);
                if let Some(b) = batches.last_mut() {
                    b.push(host / cs);
                }
            }
            t[j..j + stride as usize].fill(0);
        }
        tables.push((i, l1[i] & meta::OFFSET_MASK, was, t, new));
        g += n;
    }
    // 2. The L1 entries past the new end: zeroed, their tables freed.
    let keep = h.l1_entries_for(new_size) as usize;
    for i in (keep..l1.len()).rev() {
        let t = l1[i] & meta::OFFSET_MASK;
        if t != 0 {
            if t % cs != 0 || !a.is_used(t / cs) {
                return Ok(false);
            }
            a.release(t / cs, 1);
            freed_tables.push(t / cs);
        }
        l1[i] = 0;
    }
    // 3. Refcount blocks left counting nothing.
    let dropped = a.drop_unused_refblocks();
    // 4. The file ends after the last cluster in use.
    let len = match a.last_used() {
        Some(c) if (c + 1) * cs < a.file_len => (c + 1) * cs,
        _ => a.file_len,
    };
    // Writes: refcounts of new L2 tables first; the image's L2 tables with
    // their entries cleared before anything they pointed to is punched;
    // the new L2 tables (QEMU writes them all, also those it frees again)
    // and their L1 entries; the L1 tail; the freed clusters' refcounts,
    // the refcount table; length, and the size last. Holes are punched in
    // QEMU's batches, in its order.
    prealloc::write_refblocks(f, &a, true).map_err(io)?;
    // The new L2 tables can need refcount blocks, even a new refcount
    // table (tiny clusters).
    write_reftable_changes(f, &a, h.refcount_table_offset / cs).map_err(io)?;
    let slice = prealloc::l2_slice(&h);
    let bytes = |t: &[u64]| -> Vec<u8> { t.iter().flat_map(|e| e.to_be_bytes()).collect() };
    for (_, at, was, t, new) in &tables {
        if !new {
            prealloc::write_changed(f, *at, &bytes(was), &bytes(t), slice).map_err(io)?;
        }
    }
    f.sync_data().map_err(io)?;
    for b in &batches {
        punch(f, b, cs).map_err(io)?;
    }
    for (i, at, _, t, new) in &tables {
        if *new {
            meta::write_table(f, *at, t).map_err(io)?;
            if *i < keep {
                f.write_all_at(&l1[*i].to_be_bytes(), h.l1_table_offset + *i as u64 * 8)
                    .map_err(io)?;
            }
        }
    }
    if keep < l1.len() {
        let from = h.l1_table_offset + keep as u64 * 8;
        let n = (l1.len() - keep) as u64 * 8;
        zero_range(f, from, n).map_err(io)?;
    }
    f.sync_data().map_err(io)?;
    for &c in &freed_tables {
        punch(f, &[c], cs).map_err(io)?;
    }
    prealloc::write_refblocks(f, &a, false).map_err(io)?;
    // QEMU rewrites the whole refcount table when it drops blocks.
    a.write_reftable(f).map_err(io)?;
    punch(f, &dropped, cs).map_err(io)?;
    if f.metadata().map_err(io)?.len() != len {
        f.set_len(len).map_err(io)?;
    }
    f.sync_data().map_err(io)?;
    // The size, and the refcount table if it moved, in one write.
    write_header_fields(f, &h, new_size, h.l1_size as u64, h.l1_table_offset, &a).map_err(io)?;
    f.sync_data().map_err(io)?;
    Ok(true)
}

/// Header fields from the size to the refcount table (bytes 24..60) in one
/// write: size, L1 table and refcount table switch together.
fn write_header_fields(
    f: &File,
    h: &Header,
    size: u64,
    l1_size: u64,
    l1_offset: u64,
    a: &Allocator,
) -> std::io::Result<()> {
    let cs = h.cluster_size();
    let mut fields = Vec::with_capacity(36);
    fields.extend_from_slice(&size.to_be_bytes());
    fields.extend_from_slice(&h.crypt_method.to_be_bytes());
    fields.extend_from_slice(&(l1_size as u32).to_be_bytes());
    fields.extend_from_slice(&l1_offset.to_be_bytes());
    fields.extend_from_slice(&(a.reftable_at * cs).to_be_bytes());
    fields.extend_from_slice(&((a.reftable.len() as u64 * 8 / cs) as u32).to_be_bytes());
    f.write_all_at(&fields, 24)
}

/// Punch one discard batch out of the file: the clusters merged into runs
/// of adjacent ones, one hole per run (as QEMU merges queued discards).
fn punch(f: &File, clusters: &[u64], cs: u64) -> std::io::Result<()> {
    let mut c = clusters.to_vec();
    c.sort_unstable();
    c.dedup();
    let mut i = 0;
    while i < c.len() {
        let mut j = i + 1;
        while j < c.len() && c[j] == c[j - 1] + 1 {
            j += 1;
        }
        let _ = crate::image::raw::punch_hole(f, c[i] * cs, (j - i) as u64 * cs);
        i = j;
    }
    Ok(())
}

/// `bdrv_co_pwrite_zeroes` on a file as QEMU's file driver does it: the
/// file system zeroes the range (whole blocks become unwritten extents);
/// written zeroes where it cannot.
fn zero_range(f: &File, at: u64, n: u64) -> std::io::Result<()> {
    if crate::image::raw::fallocate(f, libc::FALLOC_FL_ZERO_RANGE, at, n).is_ok() {
        return Ok(());
    }
    f.write_all_at(&vec![0u8; n as usize], at)
}

/// Whether the L1 table and the L2 tables it points to are counted (else
/// the replay could hand their clusters out).
fn tables_counted(a: &Allocator, h: &Header, l1: &[u64]) -> bool {
    let cs = h.cluster_size();
    let l1_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
    a.counted(h.l1_table_offset / cs, l1_clusters)
        && l1.iter().all(|&e| {
            let t = e & meta::OFFSET_MASK;
            t == 0 || (t % cs == 0 && a.counted(t / cs, 1))
        })
}

/// Write what the replay changed in the refcount tables, as QEMU writes it:
/// a refcount block entered into the image's own table (`was`: its
/// cluster) as one entry; tables the replay made, whole (QEMU writes a new
/// table whole; one replaced again keeps its last entries).
fn write_reftable_changes(f: &File, a: &Allocator, was: u64) -> std::io::Result<()> {
    let cs = a.cluster_size();
    for (at, t) in a.old_tables.iter().filter(|(at, _)| *at != was) {
        a.write_table(f, *at, t)?;
    }
    for &(at, k, b) in a.hooked.iter().filter(|h| h.0 == was) {
        f.write_all_at(&(b * cs).to_be_bytes(), at * cs + k as u64 * 8)?;
    }
    if a.reftable_at != was {
        a.write_reftable(f)?;
    }
    Ok(())
}

/// How the image maps the cluster holding byte `at` when `at` falls inside
/// a cluster: `Some(Some(host cluster))` for a plain allocated cluster
/// that is not shared, `Some(None)` for an unmapped one (or when `at` is
/// cluster aligned), `None` for anything else (zero, compressed, shared).
fn mapped_cluster(
    f: &File,
    h: &Header,
    l1: &[u64],
    at: u64,
) -> std::io::Result<Option<Option<u64>>> {
    let cs = h.cluster_size();
    if at % cs == 0 {
        return Ok(Some(None));
    }
    let c = at / cs;
    let l2e = h.l2_entries();
    let t = l1
        .get((c / l2e) as usize)
        .map_or(0, |e| e & meta::OFFSET_MASK);
    if t == 0 {
        return Ok(Some(None));
    }
    let e = meta::read_table(f, t + (c % l2e) * h.l2_entry_size(), 1)?[0];
    Ok(if e == 0 {
        Some(None)
    } else if e & (meta::OFLAG_COMPRESSED | meta::OFLAG_ZERO) == 0
        && e & meta::OFLAG_COPIED != 0
        && e & meta::OFFSET_MASK != 0
    {
        Some(Some((e & meta::OFFSET_MASK) / cs))
    } else {
        None
    })
}
