//! Sequential writer for a freshly created qcow2 image (what `convert`
//! produces): data clusters are appended (compressed ones packed byte by
//! byte, zlib raw deflate or zstd), L2 tables are kept in memory, and
//! `finish` appends the L2 tables and new refcount structures, switches the
//! header to them, and fills the L1 table last. Until then the image reads as
//! empty and everything appended is merely leaked, so a crash never leaves a
//! corrupt image. Supports v2/v3, zstd and extended L2 targets.

use super::meta::{self, Header, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::image::raw::pread_full;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Appending writer (see module docs).
pub struct SeqWriter {
    f: File,
    h: Header,
    /// L2 tables by L1 index (entries: (descriptor, bitmap)).
    l2: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Next free byte at the end of the file.
    end: u64,
    /// Host refcounts by cluster index.
    refs: Vec<u64>,
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
        let len = f.metadata().map_err(io)?.len();
        let cs = h.cluster_size();
        let mut refs = vec![0u64; len.div_ceil(cs) as usize];
        refs[0] = 1;
        let l1_first = h.l1_table_offset / cs;
        let l1_n = (h.l1_size as u64 * 8).div_ceil(cs);
        for c in l1_first..l1_first + l1_n {
            if let Some(r) = refs.get_mut(c as usize) {
                *r = 1;
            }
        }
        Ok(SeqWriter {
            end: len.next_multiple_of(cs),
            f,
            h,
            l2: BTreeMap::new(),
            refs,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.h
    }

    fn inc(&mut self, off: u64, len: u64) {
        let cs = self.h.cluster_size();
        let first = off / cs;
        let last = (off + len - 1) / cs;
        for c in first..=last {
            if self.refs.len() <= c as usize {
                self.refs.resize(c as usize + 1, 0);
            }
            self.refs[c as usize] += 1;
        }
    }

    fn set_l2(&mut self, guest_cluster: u64, desc: u64, bitmap: u64) -> Result<(), String> {
        let n = self.h.l2_entries();
        let l1i = guest_cluster / n;
        if l1i >= self.h.l1_size as u64 {
            return Err("write beyond the end of the image".into());
        }
        let t = self
            .l2
            .entry(l1i)
            .or_insert_with(|| vec![(0, 0); n as usize]);
        t[(guest_cluster % n) as usize] = (desc, bitmap);
        Ok(())
    }

    /// Store a whole cluster uncompressed (`data.len()` ≤ cluster size;
    /// shorter data is zero padded).
    pub fn write_cluster(&mut self, guest_cluster: u64, data: &[u8]) -> Result<(), String> {
        let cs = self.h.cluster_size();
        let off = self.end.next_multiple_of(cs);
        if data.len() as u64 == cs {
            self.f.write_all_at(data, off).map_err(io)?;
        } else {
            let mut b = vec![0u8; cs as usize];
            b[..data.len()].copy_from_slice(data);
            self.f.write_all_at(&b, off).map_err(io)?;
        }
        self.end = off + cs;
        self.inc(off, cs);
        let bitmap = if self.h.extended_l2() { 0xffff_ffff } else { 0 };
        self.set_l2(guest_cluster, off | OFLAG_COPIED, bitmap)
    }

    /// Store consecutive whole clusters uncompressed with one write
    /// (`data.len()` a multiple of the cluster size, or shorter at the end
    /// of the image: zero padded).
    pub fn write_clusters(&mut self, first_guest_cluster: u64, data: &[u8]) -> Result<(), String> {
        let cs = self.h.cluster_size();
        let n = (data.len() as u64).div_ceil(cs);
        let off = self.end.next_multiple_of(cs);
        self.f.write_all_at(data, off).map_err(io)?;
        let tail = n * cs - data.len() as u64;
        if tail > 0 {
            self.f
                .write_all_at(&vec![0u8; tail as usize], off + data.len() as u64)
                .map_err(io)?;
        }
        self.end = off + n * cs;
        let bitmap = if self.h.extended_l2() { 0xffff_ffff } else { 0 };
        for i in 0..n {
            self.inc(off + i * cs, cs);
            self.set_l2(
                first_guest_cluster + i,
                (off + i * cs) | OFLAG_COPIED,
                bitmap,
            )?;
        }
        Ok(())
    }

    /// Allocate `n` consecutive host clusters at the end of the file for
    /// guest clusters `first_guest_cluster..+n` and map them, without
    /// writing: the caller fills `[host, host + n * cluster size)` (with
    /// `pwrite` or `copy_file_range` on [`SeqWriter::file`]) before
    /// [`SeqWriter::finish`]. Bytes it leaves unwritten read as zeroes.
    /// Returns the host offset.
    pub fn reserve_clusters(&mut self, first_guest_cluster: u64, n: u64) -> Result<u64, String> {
        let cs = self.h.cluster_size();
        let off = self.end.next_multiple_of(cs);
        let bitmap = if self.h.extended_l2() { 0xffff_ffff } else { 0 };
        for i in 0..n {
            self.set_l2(
                first_guest_cluster + i,
                (off + i * cs) | OFLAG_COPIED,
                bitmap,
            )?;
        }
        let last = (off + n * cs).div_ceil(cs) as usize;
        if self.refs.len() < last {
            self.refs.resize(last, 0);
        }
        for r in &mut self.refs[(off / cs) as usize..last] {
            *r += 1;
        }
        self.end = off + n * cs;
        Ok(off)
    }

    /// The image file (for filling reserved clusters).
    pub fn file(&self) -> &File {
        &self.f
    }

    /// Store a compressed cluster (output of [`compress`]).
    pub fn write_compressed(&mut self, guest_cluster: u64, comp: &[u8]) -> Result<(), String> {
        let h = &self.h;
        let csize_shift = 62 - (h.cluster_bits - 8);
        let off = self.end;
        let len = comp.len() as u64;
        let nb_csectors = ((off + len - 1) >> 9) - (off >> 9);
        if nb_csectors >= (1u64 << (h.cluster_bits - 8)) || off >= (1u64 << csize_shift) {
            return Err("compressed cluster does not fit".into());
        }
        self.f.write_all_at(comp, off).map_err(io)?;
        self.end = off + len;
        let (co, csz) = meta::compressed_extent(h, off | (nb_csectors << csize_shift));
        self.inc(co, csz);
        self.set_l2(
            guest_cluster,
            off | (nb_csectors << csize_shift) | OFLAG_COMPRESSED,
            0,
        )
    }

    /// Write the metadata and make the data visible.
    /// With `sync`, the refcount structures, the header switch and the L1
    /// table are each made durable before the next step (power-loss
    /// safe); without it (qemu-img's `cache=unsafe` for convert) the write
    /// order alone keeps a killed process from leaving corruption.
    pub fn finish(mut self, sync: bool) -> Result<(), String> {
        let cs = self.h.cluster_size();
        // Reserved clusters the caller left unwritten at the very end.
        if self.f.metadata().map_err(io)?.len() < self.end {
            self.f.set_len(self.end).map_err(io)?;
        }
        // Pad the file so that sector-rounded compressed extents stay inside.
        let data_end = self.end.next_multiple_of(512);
        let mut pos = self.end.next_multiple_of(cs);
        if data_end > self.end {
            let pad = vec![0u8; (data_end - self.end) as usize];
            self.f.write_all_at(&pad, self.end).map_err(io)?;
        }
        // L2 tables.
        let esz = self.h.l2_entry_size() as usize;
        let mut l1 = vec![0u64; self.h.l1_size as usize];
        let tables: Vec<(u64, Vec<(u64, u64)>)> =
            std::mem::take(&mut self.l2).into_iter().collect();
        for (l1i, t) in tables {
            let mut b = vec![0u8; cs as usize];
            for (i, (d, bm)) in t.iter().enumerate() {
                b[i * esz..i * esz + 8].copy_from_slice(&d.to_be_bytes());
                if esz == 16 {
                    b[i * esz + 8..i * esz + 16].copy_from_slice(&bm.to_be_bytes());
                }
            }
            self.f.write_all_at(&b, pos).map_err(io)?;
            self.inc(pos, cs);
            l1[l1i as usize] = pos | OFLAG_COPIED;
            pos += cs;
        }
        // New refcount structures after everything else.
        let rbe = self.h.refblock_entries();
        let start = pos / cs;
        let mut n_rb = (start.div_ceil(rbe)).max(1);
        let mut n_rt;
        loop {
            n_rt = (n_rb * 8).div_ceil(cs).max(1);
            let need = (start + n_rb + n_rt).div_ceil(rbe);
            if need <= n_rb {
                break;
            }
            n_rb = need;
        }
        for c in start..start + n_rb + n_rt {
            if self.refs.len() <= c as usize {
                self.refs.resize(c as usize + 1, 0);
            }
            self.refs[c as usize] = 1;
        }
        // The creation-time refcount table and block (clusters 1 and 2 in
        // QEMU's layout) are no longer used: refcount 0.
        let mut reftable = vec![0u64; (n_rt * cs / 8) as usize];
        for i in 0..n_rb {
            let mut b = vec![0u8; cs as usize];
            for j in 0..rbe {
                if let Some(&r) = self.refs.get((i * rbe + j) as usize) {
                    if r > self.h.refcount_max() {
                        return Err("refcount overflow".into());
                    }
                    if r != 0 {
                        meta::refblock_set(&mut b, self.h.refcount_order, j, r);
                    }
                }
            }
            let off = (start + i) * cs;
            self.f.write_all_at(&b, off).map_err(io)?;
            reftable[i as usize] = off;
        }
        let rt_off = (start + n_rb) * cs;
        meta::write_table(&self.f, rt_off, &reftable).map_err(io)?;
        if sync {
            self.f.sync_data().map_err(io)?;
        }
        let mut fields = Vec::with_capacity(12);
        fields.extend_from_slice(&rt_off.to_be_bytes());
        fields.extend_from_slice(&(n_rt as u32).to_be_bytes());
        self.f.write_all_at(&fields, 48).map_err(io)?;
        if sync {
            self.f.sync_data().map_err(io)?;
        }
        if !l1.is_empty() {
            meta::write_table(&self.f, self.h.l1_table_offset, &l1).map_err(io)?;
        }
        // The refcount table is the last cluster in use: a caller that
        // grew the file ahead of its data leaves no tail behind.
        let file_end = rt_off + n_rt * cs;
        if self.f.metadata().map_err(io)?.len() > file_end {
            self.f.set_len(file_end).map_err(io)?;
        }
        if sync {
            self.f.sync_data().map_err(io)?;
        }
        Ok(())
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

    /// Reserved clusters filled by the caller after reservation (out of
    /// order), a plain cluster, and a reserved cluster left unwritten at
    /// the very end: the result reads back right and checks clean.
    #[test]
    fn reserved_clusters_filled_later_read_back_and_check_clean() {
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
        let a = w.reserve_clusters(2, 3).unwrap();
        w.write_cluster(10, &[7u8; 100]).unwrap();
        let b = w.reserve_clusters(200, 1).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(b >= a + 3 * 4096 + 4096);
        f.write_all_at(&vec![9u8; 3 * 4096], a).unwrap();
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
