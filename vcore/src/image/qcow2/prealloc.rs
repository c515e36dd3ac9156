//! QEMU's preallocation of the clusters an image grows by (`create` and
//! `resize` with `preallocation=metadata|falloc|full`), planned on the
//! replayed allocator ([`super::allocator`]) and then written: which L2
//! tables are new, where each run of data clusters goes, which bytes of
//! the file to allocate.

use super::allocator::Allocator;
use super::create::Prealloc;
use super::meta::{self, Header};
use crate::image::raw::pread_full;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Where preallocation puts the L2 tables and data clusters.
#[derive(Default)]
pub(super) struct Plan {
    /// L2 tables the runs go into: (L1 index, host cluster, new).
    pub l2: Vec<(usize, u64, bool)>,
    /// Data runs: (first guest cluster, first host cluster, clusters).
    pub runs: Vec<(u64, u64, u64)>,
    /// Bytes of the file to allocate (falloc) or fill with zeroes (full).
    pub data: Option<(u64, u64)>,
    /// Zeroes QEMU's copy-on-write writes at the start of a new cluster
    /// whose first bytes lie before the preallocated range: (host
    /// cluster, bytes).
    pub cow_head: Option<(u64, u64)>,
    /// falloc/full from a size inside a cluster: that cluster moves to a
    /// new host cluster and its head is copied there (QEMU's
    /// copy-on-write): (guest cluster, old host cluster if mapped, new
    /// host cluster, bytes).
    pub moved: Option<(u64, Option<u64>, u64, u64)>,
}

impl Plan {
    /// The L2 table for L1 index `i`: the image's own (`l1` entries) if it
    /// has one, else a new one from the allocator. `None` for a table
    /// shared with a snapshot (QEMU would copy it first; not replayed) or
    /// one outside the file.
    fn table(&mut self, a: &mut Allocator, l1: &[u64], i: usize, cs: u64) -> Option<()> {
        if self.l2.last().is_some_and(|t| t.0 == i) {
            return Some(());
        }
        let e = l1.get(i).copied().unwrap_or(0);
        if e & meta::OFFSET_MASK != 0 {
            let at = e & meta::OFFSET_MASK;
            if e & meta::OFLAG_COPIED == 0 || at % cs != 0 || at + cs > a.file_len {
                return None;
            }
            self.l2.push((i, (e & meta::OFFSET_MASK) / cs, false));
        } else {
            let t = a.alloc(1);
            a.wrote((t + 1) * cs);
            self.l2.push((i, t, true));
        }
        Some(())
    }
}

/// `preallocation=metadata` from guest cluster `from` to `size` bytes, as
/// QEMU's `preallocate_co` does it: requests of at most `INT_MAX` bytes
/// (cluster aligned); within one, L2 table by L2 table, the table first,
/// then the table's data clusters, contiguous with the request's previous
/// ones where those clusters are free. The data clusters stay unwritten.
///
/// `start` (bytes) may fall inside a cluster: then `kept` is that
/// cluster's host cluster if the image maps it (the request continues
/// after it), or the cluster is allocated with the rest and its head
/// zeroed by copy-on-write. Only where the growth is one request.
pub(super) fn metadata(
    a: &mut Allocator,
    h: &Header,
    l1: &[u64],
    start: u64,
    kept: Option<u64>,
    size: u64,
) -> Option<Plan> {
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let guest = size.div_ceil(cs);
    let request = ((i32::MAX as u64) & !(cs - 1)) / cs;
    // handle_alloc's limit, BDRV_REQUEST_MAX_BYTES.
    let piece = ((1u64 << 31) - 512) / cs;
    let head = start % cs;
    if head != 0 && (size - start > request * cs || h.l2_entry_size() != 8) {
        return None;
    }
    let mut p = Plan::default();
    let mut g = start / cs;
    let mut first = true;
    while g < guest {
        let mut left = (guest - g).min(request);
        let mut next = None;
        if std::mem::take(&mut first) && head != 0 {
            if let Some(host) = kept {
                p.table(a, l1, (g / l2e) as usize, cs)?;
                next = Some(host + 1);
                g += 1;
                left -= 1;
            }
        }
        while left > 0 {
            p.table(a, l1, (g / l2e) as usize, cs)?;
            let n = left.min(l2e - g % l2e).min(piece);
            let (host, k) = match next {
                None => (a.alloc(n), n),
                Some(at) => (at, a.alloc_at(at, n)),
            };
            if k == 0 {
                break;
            }
            if head != 0 && kept.is_none() && g == start / cs {
                p.cow_head = Some((host, head));
            }
            p.runs.push((g, host, k));
            g += k;
            left -= k;
            next = Some(host + k);
        }
    }
    // The last request's end: the file reaches at least the end of the
    // last data cluster's copy-on-write.
    if let Some(&(_, host, n)) = p.runs.last() {
        a.wrote((host + n - 1) * cs + cow_end(h, size));
    }
    Some(p)
}

/// `preallocation=falloc|full` from guest cluster `from` to `size` bytes,
/// as QEMU's `qcow2_co_truncate` does it: a new refcount table and blocks
/// past the last cluster in use, sized exactly for everything to come; the
/// data clusters right after them, allocated in the file; then the L2
/// tables (the first new one into the old refcount table's place, the
/// others past the data).
///
/// `start` (bytes) may fall inside a cluster: QEMU then allocates that
/// cluster anew with the rest, copies its head there and frees the old
/// one (`kept`: its host cluster, if mapped).
pub(super) fn allocated(
    a: &mut Allocator,
    h: &Header,
    l1: &[u64],
    start_bytes: u64,
    kept: Option<u64>,
    size: u64,
) -> Option<Plan> {
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let from = start_bytes / cs;
    let nb = size.div_ceil(cs).saturating_sub(from);
    let end = a.last_used().map_or(a.file_len.div_ceil(cs), |c| c + 1);
    let tables = nb.div_ceil(l2e) + 1;
    let start = a.area(end, nb + tables, true, None);
    if a.alloc_at(start, nb) != nb {
        return None;
    }
    let data_from = a.file_len;
    a.wrote((start + nb) * cs);
    let mut p = Plan {
        data: Some((data_from, (start + nb) * cs)),
        ..Plan::default()
    };
    let mut g = from;
    while g < from + nb {
        p.table(a, l1, (g / l2e) as usize, cs)?;
        let n = (from + nb - g).min(l2e - g % l2e);
        p.runs.push((g, start + g - from, n));
        if g == from && start_bytes % cs != 0 {
            p.moved = Some((from, kept, start, start_bytes % cs));
            if let Some(old) = kept {
                a.release(old, 1);
            }
        }
        g += n;
    }
    Some(p)
}

/// Whether the image's own L2 tables in the plan have nothing mapped
/// where the runs go (else the plan would overwrite mappings).
pub(super) fn fits(f: &File, h: &Header, p: &Plan) -> std::io::Result<bool> {
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let mut buf = vec![0u8; cs as usize];
    for &(i, t, new) in &p.l2 {
        if new {
            continue;
        }
        pread_full(f, &mut buf, t * cs)?;
        for &(g, _, n) in p.runs.iter().filter(|r| r.0 / l2e == i as u64) {
            // A moved cluster's old mapping is replaced on purpose.
            let (g, n) = match p.moved {
                Some((m, ..)) if m == g => (g + 1, n - 1),
                _ => (g, n),
            };
            let esz = h.l2_entry_size();
            let at = ((g % l2e) * esz) as usize;
            if buf[at..at + (n * esz) as usize].iter().any(|&b| b != 0) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Write the plan: preallocated data and copy-on-write heads first (no
/// table maps a cluster before its bytes are in place), then the L2 tables
/// (new ones whole, the image's own ones updated); for metadata
/// preallocation of a size that is not cluster aligned, zero the rest of
/// the last cluster as QEMU's copy-on-write does.
pub(super) fn write(
    f: &File,
    h: &Header,
    p: &Plan,
    mode: Prealloc,
    size: u64,
) -> Result<(), String> {
    let io = |e: std::io::Error| super::os_msg(&e);
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    // Extended L2 entries: the allocation bitmap stays 0 (QEMU links
    // preallocated clusters without marking subclusters allocated).
    let esz = h.l2_entry_size() as usize;
    match (mode, p.data) {
        (Prealloc::Falloc, Some((from, to))) if to > from => {
            crate::image::raw::allocate(f, from, to - from).map_err(|e| {
                format!(
                    "Failed to resize underlying file: Could not preallocate new data: {}",
                    io(e)
                )
            })?;
        }
        (Prealloc::Full, Some((from, to))) if to > from => {
            crate::image::raw::write_zeros(f, from, to - from).map_err(io)?;
        }
        _ => {}
    }
    // The moved cluster's head, before any table maps the new cluster.
    if let Some((_, old, new, n)) = p.moved {
        let mut head = vec![0u8; n as usize];
        if let Some(old) = old {
            pread_full(f, &mut head, old * cs).map_err(io)?;
        }
        f.write_all_at(&head, new * cs).map_err(io)?;
    }
    if let (Prealloc::Metadata, Some((host, n))) = (mode, p.cow_head) {
        f.write_all_at(&vec![0u8; n as usize], host * cs)
            .map_err(io)?;
    }
    let slice = l2_slice(h);
    let mut table = vec![0u8; cs as usize];
    let mut was = vec![0u8; cs as usize];
    for &(i, t, new) in &p.l2 {
        if new {
            table.fill(0);
        } else {
            pread_full(f, &mut table, t * cs).map_err(io)?;
            was.copy_from_slice(&table);
        }
        for &(g, host, n) in p.runs.iter().filter(|r| r.0 / l2e == i as u64) {
            for c in 0..n {
                let e = ((host + c) * cs) | meta::OFLAG_COPIED;
                let at = ((g + c) % l2e) as usize * esz;
                table[at..at + 8].copy_from_slice(&e.to_be_bytes());
            }
        }
        if new {
            f.write_all_at(&table, t * cs).map_err(io)?;
        } else {
            write_changed(f, t * cs, &was, &table, slice).map_err(io)?;
        }
    }
    let tail = (size % cs).next_multiple_of(512);
    let end = cow_end(h, size);
    if let (Prealloc::Metadata, true, Some(&(_, host, n))) =
        (mode, tail % cs != 0 && end > tail, p.runs.last())
    {
        let last = (host + n - 1) * cs;
        f.write_all_at(&vec![0u8; (end - tail) as usize], last + tail)
            .map_err(io)?;
    }
    Ok(())
}

/// QEMU's L2 cache entry ("slice") size for the image `h` describes: the
/// cluster, or 4 KiB when the default 32 MiB L2 cache cannot hold every L2
/// table. QEMU writes back only the slices it changed.
pub(super) fn l2_slice(h: &Header) -> u64 {
    let cs = h.cluster_size();
    let need = (h.size.div_ceil(cs) * h.l2_entry_size()).next_multiple_of(cs);
    if need > 32 << 20 {
        cs.min(4096)
    } else {
        cs
    }
}

/// Write the slices of a table at `at` that differ between `was` and
/// `now`.
pub(super) fn write_changed(
    f: &File,
    at: u64,
    was: &[u8],
    now: &[u8],
    slice: u64,
) -> std::io::Result<()> {
    let slice = slice as usize;
    for (k, (a, b)) in was.chunks(slice).zip(now.chunks(slice)).enumerate() {
        if a != b {
            f.write_all_at(b, at + (k * slice) as u64)?;
        }
    }
    Ok(())
}

/// Where, in the last cluster of an image of `size` bytes, the
/// copy-on-write of an allocation up to the image's end stops: the cluster's
/// end, or with extended L2 entries the subcluster's.
fn cow_end(h: &Header, size: u64) -> u64 {
    let cs = h.cluster_size();
    let tail = (size % cs).next_multiple_of(512);
    if tail == 0 {
        return cs;
    }
    let unit = if h.l2_entry_size() == 16 { cs / 32 } else { cs };
    tail.next_multiple_of(unit).min(cs)
}

/// L1 entries after the plan: `old` with the new L2 tables entered, `n`
/// entries.
pub(super) fn l1_entries(old: &[u64], n: u64, p: &Plan, cs: u64) -> Vec<u64> {
    let mut l1 = old.to_vec();
    l1.resize(n as usize, 0);
    for &(i, t, new) in &p.l2 {
        if new {
            l1[i] = (t * cs) | meta::OFLAG_COPIED;
        }
    }
    l1
}

/// Write every refcount block of the allocator's table (the image's own
/// ones updated in place, new ones from zeroes); see
/// [`Allocator::fill_refblock`] for `keep_freed`.
pub(super) fn write_refblocks(f: &File, a: &Allocator, keep_freed: bool) -> std::io::Result<()> {
    let cs = a.cluster_size();
    let mut block = vec![0u8; cs as usize];
    for (k, &b) in a.reftable.iter().enumerate() {
        if b == 0 {
            continue;
        }
        if a.had_refblock(k, b) {
            if !a.refblock_changed(k) {
                continue;
            }
            pread_full(f, &mut block, b * cs)?;
        } else {
            block.fill(0);
        }
        a.fill_refblock(k, &mut block, keep_freed);
        f.write_all_at(&block, b * cs)?;
    }
    Ok(())
}
