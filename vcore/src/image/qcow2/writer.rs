//! Writer for a freshly created qcow2 image (what `convert` produces),
//! laying the file out as `qemu-img convert` does: QEMU's cluster
//! allocator ([`Allocator`]) is replayed for every write request in guest
//! order, so L2 tables land right before the first data cluster they map,
//! refcount blocks right after the run that needs them, compressed data is
//! packed as `qcow2_alloc_bytes` packs it, and a refcount table that must
//! grow (tiny clusters) moves as QEMU moves it. Data goes to its final
//! host offset at once (the caller may copy it there itself); the L2
//! tables, refcount blocks and tables are kept in memory and written by
//! [`SeqWriter::finish`], the L1 table last. Until then the image reads as
//! empty and everything written is merely leaked, so a crash leaves no
//! corruption (but see [`SeqWriter::finish`] for a moved refcount table).

use super::allocator::Allocator;
use super::meta::{self, Header, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::prealloc;
use crate::image::raw::{fallocate, pread_full};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Where a piece of a write goes: guest bytes `[guest, guest + len)` are
/// stored at host offset `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Guest offset.
    pub guest: u64,
    /// Host offset.
    pub host: u64,
    /// Bytes.
    pub len: u64,
}

/// What the target's backing file reads (`convert -B`): QEMU copies it
/// into the rest of a new cluster a write covers in part (copy-on-write),
/// and asks whether it reads as zeroes where it writes zeroes.
pub trait Backing {
    /// Whether guest bytes `[off, off + len)` read as zeroes by block
    /// status (zero past the backing file's end).
    fn is_zero(&mut self, off: u64, len: u64) -> Result<bool, String>;
    /// Guest bytes at `off` (zeroes past the end).
    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// Writer over a fresh image (see module docs).
pub struct SeqWriter {
    f: File,
    h: Header,
    a: Allocator,
    /// Entries of an L2 slice (QEMU's allocations stop at slice ends).
    slice: u64,
    /// L2 tables by L1 index: host cluster, entries (descriptor, bitmap).
    l2: BTreeMap<u64, (u64, Vec<(u64, u64)>)>,
    /// Refcounts of the clusters holding compressed data (several
    /// compressed clusters can share one host cluster).
    counts: BTreeMap<u64, u64>,
    /// QEMU's `free_byte_offset` (0: none).
    free_byte: u64,
    /// Bytes of clusters that belonged to a replaced refcount table (the
    /// image's own table is live until `finish`): written after the switch.
    held: BTreeMap<u64, Vec<u8>>,
    /// End of everything QEMU would have written so far (its file length).
    end: u64,
    /// Copy offloading (`convert -C`): QEMU's `qcow2_co_copy_range_to`
    /// copies the zeroes around a write into a new cluster as data, where
    /// a plain write zeroes them with `fallocate`.
    copy_range: bool,
    /// The image's backing file (`convert -B`).
    backing: Option<Box<dyn Backing>>,
}

fn io(e: std::io::Error) -> String {
    e.to_string()
}

impl SeqWriter {
    /// Start writing into a fresh image (empty L1, no snapshots).
    pub fn new(f: File) -> Result<SeqWriter, String> {
        let h = Header::read(&f)?;
        if h.nb_snapshots != 0 {
            return Err("the target image has snapshots".into());
        }
        let a = Allocator::load(&f, &h)?;
        let end = f.metadata().map_err(io)?.len();
        Ok(SeqWriter {
            slice: prealloc::l2_slice(&h) / h.l2_entry_size(),
            f,
            h,
            a,
            l2: BTreeMap::new(),
            counts: BTreeMap::new(),
            free_byte: 0,
            held: BTreeMap::new(),
            end,
            copy_range: false,
            backing: None,
        })
    }

    /// The image has this backing file (`convert -B`): see [`Backing`].
    pub fn set_backing(&mut self, b: Box<dyn Backing>) {
        self.backing = Some(b);
    }

    /// Requests are copy offloading's (`convert -C`, see the field).
    pub fn set_copy_range(&mut self, on: bool) {
        self.copy_range = on;
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.h
    }

    /// The image file (for copying data to the host offsets of [`Seg`]s
    /// that are not [`SeqWriter::held`]).
    pub fn file(&self) -> &File {
        &self.f
    }

    fn entry(&self, c: u64) -> (u64, u64) {
        let n = self.h.l2_entries();
        self.l2
            .get(&(c / n))
            .map_or((0, 0), |(_, t)| t[(c % n) as usize])
    }

    fn set_entry(&mut self, c: u64, desc: u64, bitmap: u64) {
        let n = self.h.l2_entries();
        if let Some((_, t)) = self.l2.get_mut(&(c / n)) {
            t[(c % n) as usize] = (desc, bitmap);
        }
    }

    /// Host offset of guest cluster `c` if it is a plain allocated one.
    fn mapped(&self, c: u64) -> Option<u64> {
        let (d, _) = self.entry(c);
        (d & OFLAG_COMPRESSED == 0 && d & meta::OFFSET_MASK != 0).then_some(d & meta::OFFSET_MASK)
    }

    /// `get_cluster_table`: the L2 table for guest cluster `c`, allocated
    /// if it has none yet.
    fn table_for(&mut self, c: u64) -> Result<(), String> {
        let n = self.h.l2_entries();
        let l1i = c / n;
        if l1i >= self.h.l1_size as u64 {
            return Err("write beyond the end of the image".into());
        }
        if !self.l2.contains_key(&l1i) {
            let t = self.a.alloc(1);
            let cs = self.h.cluster_size();
            self.end = self.end.max((t + 1) * cs);
            self.l2.insert(l1i, (t, vec![(0, 0); n as usize]));
        }
        Ok(())
    }

    /// Extended L2: mark the subclusters `[guest, guest + len)` touches in
    /// guest cluster `c` allocated.
    fn mark(&mut self, c: u64, guest: u64, len: u64) {
        if !self.h.extended_l2() {
            return;
        }
        let cs = self.h.cluster_size();
        let sc = cs / 32;
        let lo = guest.max(c * cs) - c * cs;
        let hi = (guest + len).min((c + 1) * cs) - c * cs;
        if lo >= hi {
            return;
        }
        let (first, last) = (lo / sc, (hi - 1) / sc);
        let bits = (u64::MAX >> (63 - last)) & !((1u64 << first) - 1) & 0xffff_ffff;
        let (d, b) = self.entry(c);
        self.set_entry(c, d, (b | bits) & !(bits << 32));
    }

    /// Place a write request of `len` bytes at `guest` as QEMU's
    /// `qcow2_co_pwritev_part` does: clusters already mapped are written in
    /// place, the others allocated (L2 tables first where needed), run by
    /// run, each run at most to the end of an L2 slice. Requests must come
    /// in guest order without overlapping, as qemu-img convert issues them.
    /// The caller writes the data to the returned pieces (through
    /// [`SeqWriter::write_at`] for pieces that are [`SeqWriter::held`]).
    ///
    /// `then`: the end of the next request when it starts right where this
    /// one ends (else 0). QEMU zeroes the rest of a new cluster a request
    /// writes in part, then the next request fills it; when it is known to
    /// fill all of it, the zeroing is skipped (the file ends up the same:
    /// all of it written).
    pub fn place(&mut self, guest: u64, len: u64, then: u64) -> Result<Vec<Seg>, String> {
        let mut out: Vec<Seg> = Vec::new();
        let (mut off, mut left) = (guest, len);
        while left > 0 {
            let (host, n) = self.alloc_host_offset(off, left, then)?;
            match out.last_mut() {
                Some(l) if l.guest + l.len == off && l.host + l.len == host => l.len += n,
                _ => out.push(Seg {
                    guest: off,
                    host,
                    len: n,
                }),
            }
            off += n;
            left -= n;
        }
        Ok(out)
    }

    /// `qcow2_alloc_host_offset`: host offset for `start` and how many of
    /// `bytes` are contiguous there.
    fn alloc_host_offset(
        &mut self,
        start: u64,
        bytes: u64,
        then: u64,
    ) -> Result<(u64, u64), String> {
        let cs = self.h.cluster_size();
        let (mut start, mut remaining) = (start, bytes);
        let mut cluster_offset: Option<u64> = None;
        let mut host: Option<u64> = None;
        let mut cur = 0u64;
        loop {
            if host.is_none() && cluster_offset.is_some() {
                host = cluster_offset;
            }
            start += cur;
            remaining -= cur;
            if let Some(c) = cluster_offset.as_mut() {
                *c += cur;
            }
            if remaining == 0 {
                break;
            }
            cur = remaining;
            let c = start / cs;
            let in_slice = self.slice - c % self.slice;
            let nb = (start % cs + cur).div_ceil(cs).min(in_slice);
            // handle_copied: clusters already allocated, kept.
            self.table_for(c)?;
            if let Some(hc) = self.mapped(c) {
                if cluster_offset.is_none_or(|co| co == hc + start % cs) {
                    let mut k = 1;
                    while k < nb && self.mapped(c + k) == Some(hc + k * cs) {
                        k += 1;
                    }
                    cur = cur.min(k * cs - start % cs);
                    cluster_offset = Some(hc + start % cs);
                    // Subclusters written in part that were not allocated
                    // get the copy-on-write of new clusters.
                    if self.h.extended_l2() {
                        let sc = cs / 32;
                        let unalloc =
                            |w: &Self, g: u64| w.entry(g / cs).1 >> ((g % cs) / sc) & 1 == 0;
                        let (g1, mut gs, mut ge) = (start + cur, start, start + cur);
                        if start % sc != 0 && unalloc(self, start) {
                            gs = start - start % sc;
                        }
                        if g1 % sc != 0 && unalloc(self, g1) {
                            ge = g1.next_multiple_of(sc);
                        }
                        let last = cur == remaining;
                        self.cow_around(hc, c * cs, gs, start, g1, ge, last, then)?;
                    }
                    for i in 0..k {
                        self.mark(c + i, start, cur);
                    }
                    self.end = self.end.max(hc + start % cs + cur);
                    continue;
                }
                break;
            }
            // handle_alloc: a run of unallocated clusters.
            let mut k = 1;
            while k < nb && self.mapped(c + k).is_none() {
                k += 1;
            }
            let first = match cluster_offset {
                None => self.a.alloc(k),
                Some(co) => {
                    let got = self.a.alloc_at(co / cs, k);
                    if got == 0 {
                        break;
                    }
                    k = got;
                    co / cs
                }
            };
            cur = cur.min(k * cs - start % cs);
            // The rest of the new clusters: what they read as before (zero
            // clusters, the backing file), see `cow_around`.
            let (ws, we) = (first * cs + start % cs, first * cs + start % cs + cur);
            let (zs, ze) = if self.h.extended_l2() {
                let sc = cs / 32;
                (ws - ws % sc, we.next_multiple_of(sc))
            } else {
                (first * cs, (first + k) * cs)
            };
            let (gs, ge) = (start - (ws - zs), start + cur + (ze - we));
            for i in 0..k {
                if self.old_table(first + i).is_some() {
                    self.held.insert(first + i, vec![0u8; cs as usize]);
                }
            }
            self.cow_around(
                first * cs,
                c * cs,
                gs,
                start,
                start + cur,
                ge,
                cur == remaining,
                then,
            )?;
            let bitmap_all = !self.h.extended_l2();
            for i in 0..k {
                let keep_zero = self.entry(c + i).1 & 0xffff_ffff_0000_0000;
                self.set_entry(c + i, ((first + i) * cs) | OFLAG_COPIED, keep_zero);
                if bitmap_all {
                    continue;
                }
                self.mark(c + i, start, cur);
            }
            self.end = self.end.max(ze);
            cluster_offset = Some(first * cs + start % cs);
        }
        let done = bytes - remaining;
        match host {
            Some(h) if done > 0 => Ok((h, done)),
            _ => Err("no cluster could be allocated".into()),
        }
    }

    /// Copy-on-write around a write of guest `[g0, g1)` into clusters at
    /// host `hbase` (for guest `gbase`) whose `[gs, g0)` and `[g1, ge)` it
    /// does not cover and which did not hold data: zeroed first with
    /// `fallocate`, as QEMU's `handle_alloc_space` zeroes them, where they
    /// read as zeroes (not past the image's end, where block status is not
    /// "zero", nor for `-C`); else their old contents (the backing file's)
    /// are written. Zeroing the gaps alone after the data would leave other
    /// extents (ext4 zeroes out small unwritten pieces when data splits a
    /// zeroed range). Skipped when the next request (`then`, `last`: this
    /// write ends the request) fills the rest: the file is the same.
    #[allow(clippy::too_many_arguments)]
    fn cow_around(
        &mut self,
        hbase: u64,
        gbase: u64,
        gs: u64,
        g0: u64,
        g1: u64,
        ge: u64,
        last: bool,
        then: u64,
    ) -> Result<(), String> {
        let host = |g: u64| hbase + g - gbase;
        let (zs, ze) = (host(gs), host(ge));
        let filled = gs == g0 && last && then >= ge;
        if (gs == g0 && g1 == ge) || filled {
            return Ok(());
        }
        let past_end = ge > self.h.size.next_multiple_of(512);
        let zero = !past_end
            && !self.copy_range
            && self.target_zero(gs, g0 - gs)?
            && self.target_zero(g1, ge - g1)?;
        // (Held clusters start as zeroes.)
        if zero
            && (self.held(zs, ze - zs)
                || fallocate(&self.f, libc::FALLOC_FL_ZERO_RANGE, zs, ze - zs).is_ok())
        {
            return Ok(());
        }
        for (a, b) in [(gs, g0), (g1, ge)] {
            let mut v = vec![0u8; (b - a) as usize];
            if !zero {
                self.old_bytes(a, &mut v)?;
            }
            self.write_at(host(a), &v)?;
        }
        Ok(())
    }

    /// Whether guest `[off, off + len)` reads as zeroes by block status
    /// (QEMU's `is_zero` on the image being written): zero clusters and
    /// subclusters do, data does not, the rest asks the backing file.
    fn target_zero(&mut self, off: u64, len: u64) -> Result<bool, String> {
        let cs = self.h.cluster_size();
        let ext = self.h.extended_l2();
        let unit = if ext { cs / 32 } else { cs };
        let end = (off + len).min(self.h.size.next_multiple_of(512));
        let mut at = off;
        while at < end {
            let n = (unit - at % unit).min(end - at);
            let (d, b) = self.entry(at / cs);
            let sc = (at % cs) / unit;
            let zero = if d & OFLAG_COMPRESSED != 0 {
                Some(false)
            } else if ext {
                if b >> (32 + sc) & 1 == 1 {
                    Some(true)
                } else if b >> sc & 1 == 1 {
                    Some(false)
                } else {
                    None
                }
            } else if d & meta::OFLAG_ZERO != 0 {
                Some(true)
            } else if d & meta::OFFSET_MASK != 0 {
                Some(false)
            } else {
                None
            };
            let z = match zero {
                Some(z) => z,
                None => match self.backing.as_mut() {
                    Some(bk) => bk.is_zero(at, n)?,
                    None => true,
                },
            };
            if !z {
                return Ok(false);
            }
            at += n;
        }
        Ok(true)
    }

    /// What guest `[off, off + buf.len())` of clusters about to be
    /// allocated read as: zeroes for zero clusters, else the backing file.
    fn old_bytes(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        buf.fill(0);
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.h.cluster_size();
        let (d, b) = self.entry(off / cs);
        let zero = if self.h.extended_l2() {
            b >> (32 + (off % cs) / (cs / 32)) & 1 == 1
        } else {
            d & meta::OFLAG_ZERO != 0
        };
        // Also past the image's end, up to the cluster's: QEMU reads the
        // copy-on-write through the image, which reads the backing file.
        match self.backing.as_mut() {
            Some(bk) if !zero => bk.read(off, buf),
            _ => Ok(()),
        }
    }

    /// A zero write request (`blk_co_pwrite_zeroes` with `MAY_UNMAP`), as
    /// QEMU's block layer and qcow2 driver carry it out: split at
    /// subcluster boundaries; whole (sub)clusters become zero clusters
    /// (their L2 table allocated where it has none); a partial one too if
    /// the rest of it reads as zeroes, else zeroes are written as data, at
    /// most 16 MiB at a time (its bounce buffer). Compat 0.10 images have
    /// no zero clusters: with a backing file zeroes are written as data,
    /// without one only the L2 tables are allocated.
    pub fn zero(&mut self, guest: u64, len: u64) -> Result<(), String> {
        let cs = self.h.cluster_size();
        let sc = if self.h.extended_l2() { cs / 32 } else { cs };
        let max = (i32::MAX as u64) / sc * sc;
        let (mut off, mut bytes) = (guest, len);
        let mut head = off % sc;
        let tail = (off + bytes) % sc;
        while bytes > 0 {
            let mut num = bytes;
            if head != 0 {
                num = bytes.min(16 << 20).min(sc - head);
                head = (head + num) % sc;
            } else if tail != 0 && num > sc {
                num -= tail;
            }
            num = num.min(max);
            if !self.zero_piece(off, num)? {
                num = num.min(16 << 20);
                self.write(off, &vec![0u8; num as usize])?;
            }
            off += num;
            bytes -= num;
        }
        Ok(())
    }

    /// `qcow2_co_pwrite_zeroes`: `false` for QEMU's `-ENOTSUP`.
    fn zero_piece(&mut self, off: u64, bytes: u64) -> Result<bool, String> {
        let cs = self.h.cluster_size();
        let ext = self.h.extended_l2();
        let sc = if ext { cs / 32 } else { cs };
        let total = self.h.size.next_multiple_of(512);
        let head = off % sc;
        let mut tail = (off + bytes).next_multiple_of(sc) - (off + bytes);
        if off + bytes == total {
            tail = 0;
        }
        let (mut off, mut bytes) = (off, bytes);
        if head != 0 || tail != 0 {
            if !(self.target_zero(off - head, head)? && self.target_zero(off + bytes, tail)?) {
                return Ok(false);
            }
            off -= head;
            bytes = sc;
            let (d, b) = self.entry(off / cs);
            let allocated = if ext {
                d & OFLAG_COMPRESSED != 0 || b >> ((off % cs) / sc) & 1 == 1
            } else {
                d & (OFLAG_COMPRESSED | meta::OFFSET_MASK) != 0
            };
            if allocated {
                return Ok(false);
            }
        }
        self.zeroize(off, bytes)
    }

    /// `qcow2_subcluster_zeroize` with `MAY_UNMAP` over clusters without
    /// data (those a convert zeroes); `false` for QEMU's `-ENOTSUP`.
    fn zeroize(&mut self, off: u64, bytes: u64) -> Result<bool, String> {
        let cs = self.h.cluster_size();
        if self.h.version < 3 {
            if self.backing.is_some() {
                return Ok(false);
            }
            // No zero clusters, but no backing file either: QEMU discards
            // (`qcow2_cluster_discard`), which leaves unallocated clusters
            // as they are but allocates their L2 tables.
            let (mut c, end) = (off / cs, (off + bytes).div_ceil(cs));
            while c < end {
                self.table_for(c)?;
                c += (self.slice - c % self.slice).min(end - c);
            }
            return Ok(true);
        }
        let ext = self.h.extended_l2();
        let sc = if ext { cs / 32 } else { cs };
        let total = self.h.size.next_multiple_of(512);
        let end = off + bytes;
        let head = end.min(off.next_multiple_of(cs)) - off;
        let mut o = off + head;
        let tail = if end >= total {
            0
        } else {
            end - o.max(end / cs * cs)
        };
        let end = end - tail;
        if head > 0 {
            self.zero_subclusters(off, head.div_ceil(sc))?;
        }
        let mut nb = end.saturating_sub(o).div_ceil(cs);
        while nb > 0 {
            let c = o / cs;
            self.table_for(c)?;
            let n = nb.min(self.slice - c % self.slice);
            for i in c..c + n {
                let (d, b) = self.entry(i);
                if ext {
                    let _ = b;
                    self.set_entry(i, d, 0xffff_ffff_0000_0000);
                } else {
                    self.set_entry(i, d | meta::OFLAG_ZERO, b);
                }
            }
            nb -= n;
            o += n * cs;
        }
        if tail > 0 {
            self.zero_subclusters(end, tail.div_ceil(sc))?;
        }
        Ok(true)
    }

    /// `zero_l2_subclusters`: `n` subclusters from `off` read as zeroes.
    fn zero_subclusters(&mut self, off: u64, n: u64) -> Result<(), String> {
        let cs = self.h.cluster_size();
        let sc = cs / 32;
        let c = off / cs;
        self.table_for(c)?;
        let first = (off % cs) / sc;
        let bits = (u64::MAX >> (64 - n)) << first & 0xffff_ffff;
        let (d, b) = self.entry(c);
        self.set_entry(c, d, (b | bits << 32) & !bits);
        Ok(())
    }

    /// The bytes of the replaced refcount table that covers cluster `c`,
    /// if it does (see [`SeqWriter::held`]).
    fn held_cluster(&self, c: u64) -> Option<Vec<u8>> {
        let cs = self.h.cluster_size();
        let (at, t) = self.old_table(c)?;
        let per = (cs / 8) as usize;
        let i = ((c - at) * cs / 8) as usize;
        let mut b = vec![0u8; cs as usize];
        for (j, e) in t[i..(i + per).min(t.len())].iter().enumerate() {
            b[j * 8..j * 8 + 8].copy_from_slice(&(e * cs).to_be_bytes());
        }
        Some(b)
    }

    /// The replaced refcount table (cluster, entries) cluster `c` belongs
    /// to, the latest if several.
    fn old_table(&self, c: u64) -> Option<(u64, &[u64])> {
        let cs = self.h.cluster_size();
        self.a.old_tables.iter().rev().find_map(|(at, t)| {
            let n = (t.len() as u64 * 8).div_ceil(cs);
            (c >= *at && c < at + n).then_some((*at, t.as_slice()))
        })
    }

    /// Whether `[host, host + len)` touches a cluster of a replaced
    /// refcount table (the image's own table stays in use until
    /// [`SeqWriter::finish`], a table replaced later is written there):
    /// such bytes must go through [`SeqWriter::write_at`]. (Every cluster
    /// kept in `held` is one.)
    pub fn held(&self, host: u64, len: u64) -> bool {
        let cs = self.h.cluster_size();
        len > 0
            && !self.a.old_tables.is_empty()
            && (host / cs..=(host + len - 1) / cs).any(|c| self.old_table(c).is_some())
    }

    /// Write `data` at host offset `host` (a [`Seg`]'s), keeping the parts
    /// that fall into [`SeqWriter::held`] clusters for `finish`.
    pub fn write_at(&mut self, host: u64, data: &[u8]) -> Result<(), String> {
        let cs = self.h.cluster_size();
        if !self.held(host, data.len() as u64) {
            return self.f.write_all_at(data, host).map_err(io);
        }
        let mut pos = 0usize;
        while pos < data.len() {
            let h = host + pos as u64;
            let c = h / cs;
            let n = ((cs - h % cs) as usize).min(data.len() - pos);
            let init = self.held_cluster(c);
            match (self.held.get_mut(&c), init) {
                (Some(b), _) => b[(h % cs) as usize..][..n].copy_from_slice(&data[pos..pos + n]),
                (None, Some(mut b)) => {
                    b[(h % cs) as usize..][..n].copy_from_slice(&data[pos..pos + n]);
                    self.held.insert(c, b);
                }
                (None, None) => self.f.write_all_at(&data[pos..pos + n], h).map_err(io)?,
            }
            pos += n;
        }
        Ok(())
    }

    /// Place and write a request (see [`SeqWriter::place`]).
    pub fn write(&mut self, guest: u64, data: &[u8]) -> Result<(), String> {
        for s in self.place(guest, data.len() as u64, 0)? {
            let a = (s.guest - guest) as usize;
            self.write_at(s.host, &data[a..a + s.len as usize])?;
        }
        Ok(())
    }

    /// Store a compressed cluster (output of `compress`) as
    /// `qcow2_alloc_compressed_cluster_offset` does: its L2 table first,
    /// then the bytes packed after the previous compressed cluster when
    /// they fit or continue into the next cluster.
    pub fn write_compressed(&mut self, guest_cluster: u64, comp: &[u8]) -> Result<(), String> {
        let cs = self.h.cluster_size();
        self.table_for(guest_cluster)?;
        if self.entry(guest_cluster).0 & !meta::OFLAG_ZERO != 0 {
            return Err("compressed write into an allocated cluster".into());
        }
        let size = comp.len() as u64;
        if size == 0 || size > cs {
            return Err("compressed cluster does not fit".into());
        }
        // qcow2_alloc_bytes
        let mut offset = self.free_byte;
        if offset != 0 && self.refcount(offset / cs) == self.h.refcount_max() {
            offset = 0;
        }
        let mut free_in = cs - offset % cs;
        loop {
            if offset == 0 || free_in < size {
                let new = self.a.search_one() * cs;
                if offset == 0 || offset.next_multiple_of(cs) != new {
                    offset = new;
                    free_in = cs;
                } else {
                    free_in += cs;
                }
            }
            let (first, last) = (offset / cs, (offset + size - 1) / cs);
            if self.a.count_shared(first, last - first + 1) {
                for c in first..=last {
                    let r = self.refcount(c);
                    self.counts.insert(
                        c,
                        if self.counts.contains_key(&c) {
                            r + 1
                        } else {
                            1
                        },
                    );
                }
                break;
            }
            // A refcount block was placed first: QEMU starts over in a
            // new cluster.
            offset = 0;
        }
        self.free_byte = if (offset + size) % cs == 0 {
            0
        } else {
            offset + size
        };
        let csize_shift = 62 - (self.h.cluster_bits - 8);
        let nb_csectors = ((offset + size - 1) >> 9) - (offset >> 9);
        if nb_csectors >= (1u64 << (self.h.cluster_bits - 8)) || offset >= (1u64 << csize_shift) {
            return Err("compressed cluster does not fit".into());
        }
        self.write_at(offset, comp)?;
        self.end = self.end.max(offset + size);
        self.set_entry(
            guest_cluster,
            offset | (nb_csectors << csize_shift) | OFLAG_COMPRESSED,
            0,
        );
        Ok(())
    }

    /// Refcount of host cluster `c` so far.
    fn refcount(&self, c: u64) -> u64 {
        match self.counts.get(&c) {
            Some(&r) => r,
            None => self.a.is_used(c) as u64,
        }
    }

    /// Every refcount block of the table, brought up to date (see
    /// `Allocator::fill_refblock` for `keep_freed`), with the counts of
    /// clusters shared by compressed data.
    fn refblocks(&self, keep_freed: bool) -> Result<Vec<(u64, Vec<u8>)>, String> {
        let cs = self.h.cluster_size();
        let rbe = self.h.refblock_entries();
        let mut out = Vec::new();
        for (k, &b) in self.a.reftable.iter().enumerate() {
            if b == 0 {
                continue;
            }
            let mut block = vec![0u8; cs as usize];
            if self.a.had_refblock(k, b) {
                pread_full(&self.f, &mut block, b * cs).map_err(io)?;
            }
            self.a.fill_refblock(k, &mut block, keep_freed);
            let first = k as u64 * rbe;
            for (&c, &r) in self.counts.range(first..first + rbe) {
                if r > self.h.refcount_max() {
                    return Err("refcount overflow".into());
                }
                meta::refblock_set(&mut block, self.h.refcount_order, c - first, r);
            }
            out.push((b, block));
        }
        Ok(out)
    }

    /// Write the metadata and make the data visible: L2 tables and
    /// refcount blocks, the refcount table entries QEMU added in place or
    /// the tables it built whole, the header switch when the table moved,
    /// what was held back for the replaced table's clusters, and the L1
    /// table last; the file then ends where QEMU's ends. With `sync`, each
    /// step is made durable before the next (power-loss safe); without it
    /// (qemu-img's `cache=unsafe` for convert) the write order alone keeps
    /// a killed process from leaving corruption, except in one case: when
    /// the refcount table had to move (clusters of 512 bytes beyond about
    /// 8 MiB of image, and other tiny-cluster, wide-refcount images) and
    /// QEMU put metadata into the old table's clusters, the image is
    /// inconsistent between the header switch and the writes into them.
    pub fn finish(mut self, sync: bool) -> Result<(), String> {
        let cs = self.h.cluster_size();
        let esz = self.h.l2_entry_size() as usize;
        let flush = |f: &File| {
            if sync {
                f.sync_data().map_err(io)
            } else {
                Ok(())
            }
        };
        let mut l1 = vec![0u64; self.h.l1_size as usize];
        let mut meta_end = 0u64;
        let tables = std::mem::take(&mut self.l2);
        for (l1i, (at, t)) in tables {
            let mut b = vec![0u8; cs as usize];
            for (i, (d, bm)) in t.iter().enumerate() {
                b[i * esz..i * esz + 8].copy_from_slice(&d.to_be_bytes());
                if esz == 16 {
                    b[i * esz + 8..i * esz + 16].copy_from_slice(&bm.to_be_bytes());
                }
            }
            self.write_at(at * cs, &b)?;
            l1[l1i as usize] = (at * cs) | OFLAG_COPIED;
            meta_end = meta_end.max((at + 1) * cs);
        }
        for (b, block) in self.refblocks(true)? {
            self.write_at(b * cs, &block)?;
            meta_end = meta_end.max((b + 1) * cs);
        }
        let was = self.h.refcount_table_offset / cs;
        let moved = self.a.reftable_at != was;
        for (at, t) in self.a.old_tables.iter().filter(|(at, _)| *at != was) {
            self.a.write_table(&self.f, *at, t).map_err(io)?;
            meta_end = meta_end.max(at * cs + t.len() as u64 * 8);
        }
        for &(at, k, b) in self.a.hooked.iter().filter(|h| h.0 == was) {
            self.f
                .write_all_at(&(b * cs).to_be_bytes(), at * cs + k as u64 * 8)
                .map_err(io)?;
        }
        if moved {
            self.a.write_reftable(&self.f).map_err(io)?;
            meta_end = meta_end.max(self.a.reftable_at * cs + self.a.reftable.len() as u64 * 8);
        }
        flush(&self.f)?;
        if moved {
            let mut fields = Vec::with_capacity(12);
            fields.extend_from_slice(&(self.a.reftable_at * cs).to_be_bytes());
            let clusters = (self.a.reftable.len() as u64 * 8).div_ceil(cs) as u32;
            fields.extend_from_slice(&clusters.to_be_bytes());
            self.f.write_all_at(&fields, 48).map_err(io)?;
            flush(&self.f)?;
            for (c, b) in std::mem::take(&mut self.held) {
                self.f.write_all_at(&b, c * cs).map_err(io)?;
                meta_end = meta_end.max((c + 1) * cs);
            }
            // The old table's clusters no longer counted.
            for (b, block) in self.refblocks(false)? {
                self.f.write_all_at(&block, b * cs).map_err(io)?;
            }
            flush(&self.f)?;
        }
        if !l1.is_empty() {
            meta::write_table(&self.f, self.h.l1_table_offset, &l1).map_err(io)?;
        }
        // qemu-img ends a compressed convert by growing the file to a
        // whole sector; anything else ends on a (sub)cluster already.
        let len = self.end.max(meta_end).next_multiple_of(512);
        if self.f.metadata().map_err(io)?.len() != len {
            self.f.set_len(len).map_err(io)?;
        }
        flush(&self.f)
    }
}

/// Whether an image is a fresh one [`SeqWriter`] may fill: no snapshots
/// and an all-zero L1 table.
pub fn is_fresh(f: &File) -> Result<bool, String> {
    let h = Header::read(f)?;
    if h.nb_snapshots != 0 {
        return Ok(false);
    }
    let mut b = vec![0u8; h.l1_size as usize * 8];
    pread_full(f, &mut b, h.l1_table_offset).map_err(io)?;
    Ok(b.iter().all(|&x| x == 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::qcow2::create::{create, CreateOptions};
    use crate::image::qcow2::{check, Qcow2Device};
    use crate::image::{BlockDevice, OpenOptions};

    /// Placed clusters filled by the caller afterwards (out of order), a
    /// partial cluster, and a placed cluster left unwritten at the very
    /// end: the result reads back right and checks clean.
    #[test]
    fn placed_clusters_filled_later_read_back_and_check_clean() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.qcow2");
        let o = CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..Default::default()
        };
        create(&p, &o).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut w = SeqWriter::new(f.try_clone().unwrap()).unwrap();
        let a = w.place(2 * 4096, 3 * 4096, 0).unwrap();
        w.write(10 * 4096, &[7u8; 100]).unwrap();
        let b = w.place(200 * 4096, 4096, 0).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].host % 4096, 0);
        // The L2 table first, then the data; a cluster left for the next
        // write's data and its new L2 table.
        assert!(b[0].host >= a[0].host + 3 * 4096 + 4096);
        assert!(!w.held(a[0].host, a[0].len));
        f.write_all_at(&vec![9u8; 3 * 4096], a[0].host).unwrap();
        w.finish(true).unwrap();
        let r = check::check(&f, check::Fix::NONE, &mut |_| {}).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
        drop(f);
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let file = crate::image::open_file(&p, &ro).unwrap();
        let d = Qcow2Device::open_file(&p, file, &ro, 0).unwrap();
        let mut buf = vec![1u8; 1 << 20];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf[..2 * 4096].iter().all(|&x| x == 0));
        assert!(buf[2 * 4096..5 * 4096].iter().all(|&x| x == 9));
        assert!(buf[10 * 4096..10 * 4096 + 100].iter().all(|&x| x == 7));
        assert!(buf[10 * 4096 + 100..].iter().all(|&x| x == 0));
    }
}
