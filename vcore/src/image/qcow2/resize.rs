//! Growing a qcow2 image without preallocation, the way QEMU does it
//! (`qcow2_co_truncate` + `qcow2_grow_l1_table(exact)`): when the L1 table
//! must grow, a new one of exactly the needed entries is written (rounded to
//! 512 bytes) into the first free clusters, the header is switched to it,
//! and the old table's clusters are freed. Works on every image the header
//! parser accepts (zstd, extended L2). Write order keeps a crash at any
//! point free of corruption (at worst a leaked cluster).

use super::meta::{self, Header};
use crate::image::raw::pread_full;
use std::fs::File;
use std::os::unix::fs::FileExt;

struct Refs<'a> {
    f: &'a File,
    h: Header,
    reftable: Vec<u64>,
}

impl Refs<'_> {
    fn rb_bits(&self) -> u32 {
        self.h.cluster_bits + 3 - self.h.refcount_order
    }
    fn block_of(&self, cluster: u64) -> Option<u64> {
        let idx = (cluster >> self.rb_bits()) as usize;
        let off = self.reftable.get(idx)? & meta::REFT_OFFSET_MASK;
        (off != 0 && off % self.h.cluster_size() == 0).then_some(off)
    }
    fn get(&self, cluster: u64) -> std::io::Result<u64> {
        let Some(off) = self.block_of(cluster) else {
            return Ok(0);
        };
        let mut b = vec![0u8; self.h.cluster_size() as usize];
        pread_full(self.f, &mut b, off)?;
        let i = cluster & ((1u64 << self.rb_bits()) - 1);
        Ok(meta::refblock_get(&b, self.h.refcount_order, i))
    }
    fn set(&self, cluster: u64, v: u64) -> Result<(), String> {
        let off = self
            .block_of(cluster)
            .ok_or("no refcount block covers the new L1 table")?;
        let mut b = vec![0u8; self.h.cluster_size() as usize];
        pread_full(self.f, &mut b, off).map_err(|e| e.to_string())?;
        let i = cluster & ((1u64 << self.rb_bits()) - 1);
        meta::refblock_set(&mut b, self.h.refcount_order, i, v);
        self.f.write_all_at(&b, off).map_err(|e| e.to_string())
    }
}

/// Whether [`grow`] can handle this image (the new L1 table fits in
/// clusters already covered by refcount blocks).
pub fn grow(f: &File, new_size: u64) -> Result<(), String> {
    let h = Header::read(f)?;
    if new_size < h.size {
        return Err("grow: new size is smaller".into());
    }
    let need = h.l1_entries_for(new_size);
    if need * 8 > meta::MAX_L1_BYTES {
        return Err("File too large".into());
    }
    let cs = h.cluster_size();
    if need > h.l1_size as u64 {
        let mut rt = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
        pread_full(f, &mut rt, h.refcount_table_offset).map_err(|e| e.to_string())?;
        let refs = Refs {
            f,
            h: h.clone(),
            reftable: rt
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        };
        let bytes = (need * 8).next_multiple_of(512);
        let n = bytes.div_ceil(cs);
        // First run of n free clusters (like qcow2_alloc_clusters).
        let mut start = 0u64;
        let mut run = 0u64;
        let mut c = 0u64;
        while run < n {
            if refs.get(c).map_err(|e| e.to_string())? == 0 {
                if run == 0 {
                    start = c;
                }
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
            if c > (1u64 << 40) {
                return Err("no free clusters".into());
            }
        }
        for i in 0..n {
            if refs.block_of(start + i).is_none() {
                return Err("refcount structures must grow".into());
            }
        }
        // 1. refcounts of the new table, 2. the table, 3. header, 4. free old.
        for i in 0..n {
            refs.set(start + i, 1)?;
        }
        f.sync_data().map_err(|e| e.to_string())?;
        let mut l1 = vec![0u8; bytes as usize];
        pread_full(f, &mut l1[..h.l1_size as usize * 8], h.l1_table_offset)
            .map_err(|e| e.to_string())?;
        let new_off = start * cs;
        f.write_all_at(&l1, new_off).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        let mut fields = Vec::with_capacity(12);
        fields.extend_from_slice(&(need as u32).to_be_bytes());
        fields.extend_from_slice(&new_off.to_be_bytes());
        f.write_all_at(&fields, 36).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        if h.l1_size > 0 {
            let old_first = h.l1_table_offset / cs;
            let old_n = (h.l1_size as u64 * 8).div_ceil(cs);
            for i in 0..old_n {
                let r = refs.get(old_first + i).map_err(|e| e.to_string())?;
                if r > 0 {
                    refs.set(old_first + i, r - 1)?;
                }
            }
        }
    }
    f.write_all_at(&new_size.to_be_bytes(), 24)
        .map_err(|e| e.to_string())?;
    f.sync_data().map_err(|e| e.to_string())?;
    Ok(())
}
