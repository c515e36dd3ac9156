//! Growing a qcow2 image the way QEMU does it (`qcow2_co_truncate`), with
//! QEMU's layout: QEMU's cluster allocator is replayed over the image's
//! refcounts ([`super::allocator`]); the L1 table, when it must grow, is
//! replaced by one of exactly the needed entries in the first free
//! clusters (`qcow2_grow_l1_table(exact)`), the old one freed; then the
//! preallocation mode places L2 tables and data clusters as QEMU's
//! (`preallocate_co`, or the falloc/full branch of `qcow2_co_truncate`).
//! Write order keeps a crash at any point free of corruption (at worst
//! leaked clusters): new refcounts first (freed clusters still counted),
//! then the new tables, the header switch, and last the freed clusters'
//! refcounts.

use super::allocator::Allocator;
use super::create::Prealloc;
use super::meta::{self, Header};
use super::prealloc::{self, Plan};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Grow the image in `f` to `new_size` bytes with preallocation `mode`.
/// `Ok(false)` (nothing written) where this replay does not apply: a dirty
/// or corrupt image, extended L2 entries or an external data file, refcount
/// or L1 structures outside the file, preallocation from a size that is not
/// cluster aligned or into an L2 table shared with a snapshot.
pub fn grow(f: &File, new_size: u64, mode: Prealloc) -> Result<bool, String> {
    let h = Header::read(f)?;
    let cs = h.cluster_size();
    let io = |e: std::io::Error| e.to_string();
    if new_size < h.size
        || new_size % 512 != 0
        || h.dirty()
        || h.corrupt()
        || h.incompatible & (meta::INCOMPAT_EXTL2 | meta::INCOMPAT_DATA_FILE) != 0
        || (mode != Prealloc::Off && h.size % cs != 0)
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
    let from = h.size / cs;
    let plan = match mode {
        Prealloc::Off => Some(Plan::default()),
        Prealloc::Metadata => prealloc::metadata(&mut a, &h, &old_l1, from, new_size),
        Prealloc::Falloc | Prealloc::Full => {
            prealloc::allocated(&mut a, &h, &old_l1, from, new_size)
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
    // 2. Refcount tables: replaced ones as they were when replaced, then
    //    the current one.
    for (at, t) in &a.old_tables {
        let t: Vec<u64> = t.iter().map(|&c| c * cs).collect();
        meta::write_table(f, at * cs, &t).map_err(io)?;
    }
    let t: Vec<u64> = a.reftable.iter().map(|&c| c * cs).collect();
    meta::write_table(f, a.reftable_at * cs, &t).map_err(io)?;
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
    let mut fields = Vec::with_capacity(36);
    fields.extend_from_slice(&new_size.to_be_bytes());
    fields.extend_from_slice(&h.crypt_method.to_be_bytes());
    fields.extend_from_slice(&(need as u32).to_be_bytes());
    fields.extend_from_slice(&(l1_at * cs).to_be_bytes());
    fields.extend_from_slice(&(a.reftable_at * cs).to_be_bytes());
    fields.extend_from_slice(&((a.reftable.len() as u64 * 8 / cs) as u32).to_be_bytes());
    f.write_all_at(&fields, 24).map_err(io)?;
    f.sync_data().map_err(io)?;
    // 5. Freed clusters.
    prealloc::write_refblocks(f, &a, false).map_err(io)?;
    f.sync_data().map_err(io)?;
    Ok(true)
}
