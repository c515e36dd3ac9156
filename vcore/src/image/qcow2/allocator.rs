//! QEMU's qcow2 cluster allocator, replayed in memory so that a new image
//! is laid out exactly as `qemu-img create` lays it out, and a grown or
//! shrunk one as `qemu-img resize` leaves it, then written in one pass (a
//! 200 GiB image with metadata preallocation has 3.2 million clusters;
//! mapping them one by one through a generic writer is what made this
//! slow).
//!
//! The rules are QEMU's (`block/qcow2-refcount.c`), written down here from
//! what they do:
//! - Clusters are handed out from a moving index: the first run of free
//!   clusters at or past it; the index ends past the run (a gap too small
//!   for the run is skipped for good).
//! - Counting a run may need a refcount block that does not exist yet. The
//!   block goes into the first free cluster (past the run), describes
//!   itself if it falls into its own range (else is counted by a further
//!   block), is entered in the refcount table, and the allocation restarts
//!   from the run's first cluster.
//! - When the refcount table has no entry for the block, a new table and
//!   the refcount blocks it needs are built past everything counted so far
//!   (at the next refcount-block boundary), with half as many entries
//!   again to spare; the old table's clusters are freed, and the index
//!   goes back to them.
//!
//! Allocation only asks whether a refcount is 0, so one bit per cluster
//! holds the state. Counts an existing image already has (snapshots share
//! clusters) are kept: refcount blocks are written back as they were, with
//! only the clusters this replay allocated or freed changed.

use super::meta::{self, Header};
use crate::image::raw::pread_full;
use std::fs::File;

/// One bit per cluster: whether its refcount is not 0.
#[derive(Default, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    /// Set `[a, b)` to `v`.
    fn put(&mut self, a: u64, b: u64, v: bool) {
        if a >= b {
            return;
        }
        let words = b.div_ceil(64) as usize;
        if self.0.len() < words {
            if !v {
                return self.put(a, b.min(self.0.len() as u64 * 64), v);
            }
            self.0.resize(words, 0);
        }
        let mut i = a;
        while i < b {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (b - w as u64 * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if v {
                self.0[w] |= mask;
            } else {
                self.0[w] &= !mask;
            }
            i = (w as u64 + 1) * 64;
        }
    }

    /// The first set bit in `[a, b)`.
    fn first_set(&self, a: u64, b: u64) -> Option<u64> {
        let mut i = a;
        while i < b {
            let w = (i / 64) as usize;
            let word = *self.0.get(w)? >> (i % 64);
            if word != 0 {
                let at = i + word.trailing_zeros() as u64;
                return (at < b).then_some(at);
            }
            i = (w as u64 + 1) * 64;
        }
        None
    }

    /// The last set bit below `b`, if any.
    fn last_set_below(&self, b: u64) -> Option<u64> {
        let mut words = &self.0[..self.0.len().min(b.div_ceil(64) as usize)];
        while let Some((&w, rest)) = words.split_last() {
            let i = rest.len() as u64;
            let mask = if (i + 1) * 64 <= b {
                u64::MAX
            } else {
                (1u64 << (b - i * 64)) - 1
            };
            if w & mask != 0 {
                return Some(i * 64 + 63 - (w & mask).leading_zeros() as u64);
            }
            words = rest;
        }
        None
    }
}

/// The allocation had to place a refcount block (or a new refcount
/// table) first; QEMU's `-EAGAIN`: the caller searches again.
struct Again;

/// QEMU's cluster allocator over an image.
pub(super) struct Allocator {
    cs: u64,
    /// Refcount entries per refcount block.
    rbe: u64,
    refcount_order: u32,
    used: Bits,
    /// `used` as loaded from an existing image (empty for a new one).
    base: Bits,
    /// The refcount table as loaded (empty for a new image).
    base_table: Vec<u64>,
    /// QEMU's `free_cluster_index`.
    free: u64,
    /// Refcount table: the refcount block cluster of each entry (0: none);
    /// as many entries as the table's clusters hold.
    pub reftable: Vec<u64>,
    /// Cluster of the refcount table.
    pub reftable_at: u64,
    /// Replaced refcount tables (cluster, entries) in the order they were
    /// replaced: their clusters are freed but keep their bytes unless
    /// something is written over them.
    pub old_tables: Vec<(u64, Vec<u64>)>,
    /// Refcount blocks entered into a table in place: (table cluster,
    /// index, block cluster); QEMU writes just that entry.
    pub hooked: Vec<(u64, usize, u64)>,
    /// Length of the file so far: everything written ends before it.
    pub file_len: u64,
    /// Whether the image as loaded has a refcount above 1 (snapshots).
    pub shared: bool,
}

impl Allocator {
    /// The image as `qcow2_co_create` first writes it: the header in
    /// cluster 0, the refcount table in cluster 1, its first refcount
    /// block in cluster 2, each written whole.
    pub fn new(cs: u64, refcount_order: u32) -> Allocator {
        let mut a = Allocator {
            cs,
            rbe: (cs * 8) >> refcount_order,
            refcount_order,
            used: Bits::default(),
            base: Bits::default(),
            base_table: Vec::new(),
            free: 0,
            reftable: vec![0; (cs / 8) as usize],
            reftable_at: 1,
            old_tables: Vec::new(),
            hooked: Vec::new(),
            file_len: 3 * cs,
            shared: false,
        };
        a.reftable[0] = 2;
        a.used.put(0, 3, true);
        a
    }

    /// The allocator over an existing image: which clusters its refcount
    /// blocks count, its refcount table, the free index at 0 (as QEMU
    /// opens an image). Refcount structures that point outside the file or
    /// are misaligned, and refcounts for clusters past the file's end, are
    /// refused (they also bound the memory used here).
    pub fn load(f: &File, h: &Header) -> Result<Allocator, String> {
        let cs = h.cluster_size();
        let io = |e: std::io::Error| e.to_string();
        let file_len = f.metadata().map_err(io)?.len();
        let n = h.refcount_table_clusters as u64 * cs / 8;
        if h.refcount_table_offset % cs != 0
            || h.refcount_table_offset + n * 8 > file_len
            || n * 8 > meta::MAX_REFTABLE_BYTES
        {
            return Err("refcount table outside the file".into());
        }
        let raw = meta::read_table(f, h.refcount_table_offset, n).map_err(io)?;
        let mut a = Allocator::new(cs, h.refcount_order);
        a.used = Bits::default();
        a.reftable = vec![0; n as usize];
        a.reftable_at = h.refcount_table_offset / cs;
        a.file_len = file_len;
        let mut block = vec![0u8; cs as usize];
        for (k, e) in raw.iter().enumerate() {
            let off = e & meta::REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 || off + cs > file_len.next_multiple_of(cs) {
                return Err(format!("refcount block {k} outside the file"));
            }
            a.reftable[k] = off / cs;
            pread_full(f, &mut block, off).map_err(io)?;
            let first = k as u64 * a.rbe;
            for j in 0..a.rbe {
                let r = meta::refblock_get(&block, h.refcount_order, j);
                if r != 0 && first + j >= file_len.div_ceil(cs) {
                    return Err(format!("refcount for cluster {} past the file", first + j));
                }
                if r != 0 {
                    a.used.put(first + j, first + j + 1, true);
                    a.shared |= r > 1;
                }
            }
        }
        // The header, refcount table and blocks must be counted: else the
        // replay would hand their clusters out (QEMU would refuse to write
        // over them; leave such images to the repair path).
        let table_clusters = (n * 8).div_ceil(cs);
        if !a.counted(0, 1)
            || !a.counted(a.reftable_at, table_clusters)
            || a.reftable.iter().any(|&b| b != 0 && !a.counted(b, 1))
        {
            return Err("refcount structures are not counted".into());
        }
        a.base = a.used.clone();
        a.base_table = a.reftable.clone();
        Ok(a)
    }

    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// Write a refcount table `t` (refcount block clusters) whole at
    /// cluster `at`, as byte offsets.
    pub fn write_table(&self, f: &File, at: u64, t: &[u64]) -> std::io::Result<()> {
        let t: Vec<u64> = t.iter().map(|&c| c * self.cs).collect();
        meta::write_table(f, at * self.cs, &t)
    }

    /// Write the current refcount table whole.
    pub fn write_reftable(&self, f: &File) -> std::io::Result<()> {
        self.write_table(f, self.reftable_at, &self.reftable)
    }

    /// Whether the replay allocated or freed a cluster that refcount block
    /// `k` counts.
    pub fn refblock_changed(&self, k: usize) -> bool {
        let first = k as u64 * self.rbe;
        (first..first + self.rbe).any(|c| self.used.get(c) != self.base.get(c))
    }

    /// Bring refcount block `k` (its bytes as they were: read from the
    /// file, or zeroes for a new block) up to date: clusters allocated by
    /// the replay get 1, freed ones 0 unless `keep_freed` (a first pass
    /// that must not free anything still referenced), others keep their
    /// count.
    pub fn fill_refblock(&self, k: usize, block: &mut [u8], keep_freed: bool) {
        let first = k as u64 * self.rbe;
        for j in 0..self.rbe {
            let c = first + j;
            match (self.used.get(c), self.base.get(c)) {
                (true, false) => meta::refblock_set(block, self.refcount_order, j, 1),
                (false, true) if !keep_freed => {
                    meta::refblock_set(block, self.refcount_order, j, 0)
                }
                _ => {}
            }
        }
    }

    /// Whether refcount table entry `k` was a refcount block of the image
    /// as loaded (then it is updated in place, not written from zeroes).
    pub fn had_refblock(&self, k: usize, cluster: u64) -> bool {
        cluster != 0 && self.base_table.get(k) == Some(&cluster)
    }

    /// `qcow2_get_last_cluster`: the last cluster in use within the file.
    pub fn last_used(&self) -> Option<u64> {
        self.used.last_set_below(self.file_len.div_ceil(self.cs))
    }

    /// Whether cluster `c` is in use.
    pub fn is_used(&self, c: u64) -> bool {
        self.used.get(c)
    }

    /// Whether all `n` clusters from `start` are in use.
    pub fn counted(&self, start: u64, n: u64) -> bool {
        (start..start + n).all(|c| self.used.get(c))
    }

    /// `qcow2_shrink_reftable`: drop the refcount blocks that count
    /// nothing but (possibly) themselves, and free their clusters; the
    /// dropped blocks' clusters.
    pub fn drop_unused_refblocks(&mut self) -> Vec<u64> {
        let unused: Vec<(usize, u64)> = (0..self.reftable.len())
            .filter_map(|k| {
                let b = self.reftable[k];
                let first = k as u64 * self.rbe;
                let mut at = first;
                while let Some(u) = self.used.first_set(at, first + self.rbe) {
                    if u != b {
                        return None;
                    }
                    at = u + 1;
                }
                (b != 0).then_some((k, b))
            })
            .collect();
        for &(k, b) in &unused {
            self.reftable[k] = 0;
            self.release(b, 1);
        }
        unused.into_iter().map(|(_, b)| b).collect()
    }

    /// `qcow2_free_clusters`: `n` clusters from `start` are no longer used;
    /// the free index goes back to them.
    pub fn release(&mut self, start: u64, n: u64) {
        self.used.put(start, start + n, false);
        if n > 0 {
            self.free = self.free.min(start);
        }
    }

    /// Note that `[.., end)` (bytes) has been written.
    pub fn wrote(&mut self, end: u64) {
        self.file_len = self.file_len.max(end);
    }

    /// `qcow2_alloc_clusters`: `n` contiguous clusters, counted; the first.
    pub fn alloc(&mut self, n: u64) -> u64 {
        loop {
            let s = self.search(n);
            if self.count(s, n).is_ok() {
                return s;
            }
        }
    }

    /// `qcow2_alloc_clusters_at`: count the free clusters of `[at, at + n)`
    /// up to the first one in use; how many.
    pub fn alloc_at(&mut self, at: u64, n: u64) -> u64 {
        loop {
            let k = self.used.first_set(at, at + n).unwrap_or(at + n) - at;
            if self.count(at, k).is_ok() {
                return k;
            }
        }
    }

    /// `alloc_clusters_noref` for one cluster: the first free cluster at or
    /// past the free index, not counted yet.
    pub fn search_one(&mut self) -> u64 {
        self.search(1)
    }

    /// `update_refcount(+1)` over `n` clusters from `start`, some of which
    /// may be in use already (compressed data sharing a cluster): `false`
    /// when a refcount block had to be placed first (the caller retries);
    /// then only the clusters this call counted are undone.
    pub fn count_shared(&mut self, start: u64, n: u64) -> bool {
        let was: Vec<bool> = (start..start + n).map(|c| self.used.get(c)).collect();
        if self.count(start, n).is_ok() {
            return true;
        }
        for (i, w) in was.into_iter().enumerate() {
            if w {
                let c = start + i as u64;
                self.used.put(c, c + 1, true);
            }
        }
        false
    }

    /// `alloc_clusters_noref`: the first run of `n` free clusters at or
    /// past the free index, not counted yet; the index moves past it.
    fn search(&mut self, n: u64) -> u64 {
        loop {
            let s = self.free;
            match self.used.first_set(s, s + n) {
                Some(u) => self.free = u + 1,
                None => {
                    self.free = s + n;
                    return s;
                }
            }
        }
    }

    /// `update_refcount(+1)` over `[start, start + n)`, refcount block by
    /// refcount block; undone when a block had to be placed first.
    fn count(&mut self, start: u64, n: u64) -> Result<(), Again> {
        let end = start + n;
        let mut c = start;
        while c < end {
            let e = end.min((c / self.rbe + 1) * self.rbe);
            if let Err(again) = self.refblock_for(c) {
                self.free = self.free.min(start);
                self.used.put(start, c, false);
                return Err(again);
            }
            self.used.put(c, e, true);
            c = e;
        }
        Ok(())
    }

    /// `alloc_refcount_block` for cluster `c`: `Ok` if its block exists;
    /// else place it (and grow the table if needed) and ask for a retry.
    fn refblock_for(&mut self, c: u64) -> Result<(), Again> {
        let k = (c / self.rbe) as usize;
        if self.reftable.get(k).is_some_and(|&b| b != 0) {
            return Ok(());
        }
        let b = self.search(1);
        if b / self.rbe == k as u64 {
            self.used.put(b, b + 1, true);
        } else {
            self.count(b, 1)?;
        }
        self.wrote((b + 1) * self.cs);
        if k < self.reftable.len() {
            self.reftable[k] = b;
            self.hooked.push((self.reftable_at, k, b));
            return Err(Again);
        }
        let blocks_used = (c + 1).max(b + 1).div_ceil(self.rbe);
        self.area(blocks_used * self.rbe, 0, false, Some((k, b)));
        Err(Again)
    }

    /// `qcow2_refcount_area`: at cluster `start` (past everything in use),
    /// a new refcount table and the refcount blocks that, with the existing
    /// ones, cover everything up to `start + extra` clusters and
    /// themselves; the table has 50% spare entries unless `exact`; `new`
    /// is a block to enter at an index. The old table is freed. Returns
    /// the first cluster past the new structures.
    pub fn area(&mut self, start: u64, extra: u64, exact: bool, new: Option<(usize, u64)>) -> u64 {
        let per = self.cs / 8;
        let total = refcount_metadata(start + extra, self.cs, self.refcount_order, !exact).0;
        let mut size = if exact {
            total
        } else {
            total + total.div_ceil(2)
        };
        size = size.next_multiple_of(per);
        let mut table = vec![0u64; size as usize];
        let keep = self.reftable.len().min(table.len());
        table[..keep].copy_from_slice(&self.reftable[..keep]);
        if let Some((k, b)) = new {
            table[k] = b;
        }
        let first = start / self.rbe;
        let missing = (first..total).filter(|&i| table[i as usize] == 0).count() as u64;
        let table_at = start + missing;
        let end = table_at + size / per;
        let mut next = start;
        for i in first..total {
            if table[i as usize] == 0 {
                table[i as usize] = next;
                next += 1;
            }
            let lo = i * self.rbe;
            if lo < end {
                self.used.put(lo.max(start), end.min(lo + self.rbe), true);
            }
        }
        self.wrote(end * self.cs);
        let old_at = std::mem::replace(&mut self.reftable_at, table_at);
        let old = std::mem::replace(&mut self.reftable, table);
        let old_clusters = (old.len() as u64 * 8).div_ceil(self.cs);
        self.old_tables.push((old_at, old));
        self.release(old_at, old_clusters);
        end
    }
}

/// `qcow2_refcount_metadata_size`: the refcount blocks and refcount table
/// clusters that count `clusters` and themselves, the fixed point of the
/// two (`generous`: the table counted with 50% spare, as a growing table
/// is).
pub fn refcount_metadata(
    clusters: u64,
    cs: u64,
    refcount_order: u32,
    generous: bool,
) -> (u64, u64) {
    let rbe = (cs * 8) >> refcount_order;
    let per = cs / 8;
    let (mut clusters, mut generous) = (clusters, generous);
    let (mut blocks, mut table, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(rbe);
        table = blocks.div_ceil(per);
        n = clusters + blocks + table;
        if n == last {
            if !generous {
                return (blocks, table);
            }
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let mut b = Bits::default();
        b.put(3, 130, true);
        assert!(!b.get(2) && b.get(3) && b.get(129) && !b.get(130));
        assert_eq!(b.first_set(0, 10), Some(3));
        assert_eq!(b.first_set(130, 1000), None);
        b.put(64, 128, false);
        assert_eq!(b.first_set(10, 200), Some(10));
        assert_eq!(b.first_set(64, 200), Some(128));
        assert_eq!(b.last_set_below(1000), Some(129));
        assert_eq!(b.last_set_below(129), Some(128));
        assert_eq!(b.last_set_below(128), Some(63));
        assert_eq!(b.last_set_below(3), None);
        b.put(0, 10_000, false);
        assert_eq!(b.last_set_below(1000), None);
    }

    #[test]
    fn first_allocations_follow_the_first_refblock() {
        let mut a = Allocator::new(65536, 4);
        assert_eq!(a.alloc(1), 3);
        assert_eq!(a.alloc(10), 4);
        assert_eq!(a.free, 14);
    }

    #[test]
    fn a_refblock_goes_past_the_run_that_needs_it() {
        // 512-byte clusters, 64-bit refcounts: 64 clusters per block.
        let mut a = Allocator::new(512, 6);
        assert_eq!(a.alloc(61), 3);
        assert_eq!(a.alloc(10), 64);
        assert_eq!(a.reftable[1], 74);
        assert!(a.is_used(63) && a.is_used(74) && !a.is_used(75));
    }

    #[test]
    fn refblock_count_is_a_fixed_point() {
        assert_eq!(refcount_metadata(3, 65536, 4, false), (1, 1));
        assert_eq!(refcount_metadata(32768, 65536, 4, false), (2, 1));
        // 512 B clusters, 16-bit: 256 per block, 64 per table cluster.
        let (b, t) = refcount_metadata(100_000, 512, 4, false);
        assert_eq!(t, b.div_ceil(64));
        assert!(b * 256 >= 100_000 + b + t);
    }
}
