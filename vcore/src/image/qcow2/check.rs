//! qcow2 consistency check and repair, following QEMU's
//! `qcow2_check_refcounts` (block/qcow2-refcount.c): references are counted
//! in memory from the header, L1/L2 tables, snapshots, snapshot table and
//! refcount structures, then compared with the on-disk refcounts. Messages,
//! counts and repair semantics match qemu-img 10.

use super::meta::{self, Header, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::image::raw::pread_full;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Which problems to repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Fix {
    /// Lower refcounts of leaked clusters.
    pub leaks: bool,
    /// Repair corruptions (and rebuild refcount structures if needed).
    pub errors: bool,
    /// Punch the clusters a repair frees out of the file (QEMU frees them
    /// with a discard).
    pub discard: bool,
}

impl Fix {
    /// Check only.
    pub const NONE: Fix = Fix {
        leaks: false,
        errors: false,
        discard: false,
    };
    /// `-r leaks`.
    pub const LEAKS: Fix = Fix {
        leaks: true,
        errors: false,
        discard: true,
    };
    /// `-r all`.
    pub const ALL: Fix = Fix {
        leaks: true,
        errors: true,
        discard: true,
    };
    fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// Result counters (QEMU's BdrvCheckResult + fragmentation info).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Corruptions found and not fixed.
    pub corruptions: u64,
    /// Leaked clusters found and not fixed.
    pub leaks: u64,
    /// Internal errors during the check.
    pub check_errors: u64,
    /// Corruptions fixed.
    pub corruptions_fixed: u64,
    /// Leaks fixed.
    pub leaks_fixed: u64,
    /// End of the highest used cluster.
    pub image_end_offset: u64,
    /// Guest clusters.
    pub total_clusters: u64,
    /// Allocated guest clusters.
    pub allocated_clusters: u64,
    /// Fragmented clusters.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
}

type Log<'a> = &'a mut dyn FnMut(&str);

struct Ctx<'a> {
    f: &'a File,
    h: Header,
    file_len: u64,
    reftable: Vec<u64>,
    rb_cache: HashMap<u64, Vec<u8>>,
    /// Most recently used refcount block (offset, copy) for fast scans.
    last: (u64, Vec<u8>),
}

fn read_zero_padded(f: &File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    pread_full(f, &mut b, off)?;
    Ok(b)
}

fn be64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

impl Ctx<'_> {
    fn cs(&self) -> u64 {
        self.h.cluster_size()
    }
    fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cs() - 1)
    }
    fn rb_bits(&self) -> u32 {
        self.h.cluster_bits + 3 - self.h.refcount_order
    }

    /// On-disk refcount of a cluster (QEMU `qcow2_get_refcount`).
    fn get_refcount(&mut self, cluster: u64) -> Result<u64, String> {
        let idx = cluster >> self.rb_bits();
        if idx >= self.reftable.len() as u64 {
            return Ok(0);
        }
        let off = self.reftable[idx as usize] & meta::REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        if self.offset_in_cluster(off) != 0 {
            return Err("Input/output error".into());
        }
        let i = cluster & ((1u64 << self.rb_bits()) - 1);
        if self.last.0 == off {
            return Ok(meta::refblock_get(&self.last.1, self.h.refcount_order, i));
        }
        let cs = self.cs();
        if !self.rb_cache.contains_key(&off) {
            let b = read_zero_padded(self.f, off, cs).map_err(|e| e.to_string())?;
            self.rb_cache.insert(off, b);
        }
        let block = &self.rb_cache[&off];
        let v = meta::refblock_get(block, self.h.refcount_order, i);
        self.last = (off, block.clone());
        Ok(v)
    }

    /// Write an on-disk refcount (refblock must exist).
    fn set_refcount(&mut self, cluster: u64, v: u64) -> Result<(), String> {
        let idx = cluster >> self.rb_bits();
        let off = self
            .reftable
            .get(idx as usize)
            .map(|e| e & meta::REFT_OFFSET_MASK)
            .unwrap_or(0);
        if off == 0 || self.offset_in_cluster(off) != 0 {
            return Err("Input/output error".into());
        }
        self.get_refcount(cluster)?;
        let order = self.h.refcount_order;
        let i = cluster & ((1u64 << self.rb_bits()) - 1);
        let block = self.rb_cache.get_mut(&off).ok_or("Input/output error")?;
        meta::refblock_set(block, order, i, v);
        let b = block.clone();
        if self.last.0 == off {
            self.last.1 = b.clone();
        }
        self.f.write_all_at(&b, off).map_err(|e| e.to_string())
    }
}

struct Imrt {
    v: Vec<u64>,
    rbe: u64,
    max: u64,
}

impl Imrt {
    fn grow(&mut self, k: u64) {
        if k >= self.v.len() as u64 {
            let n = (k + 1).next_multiple_of(self.rbe);
            self.v.resize(n as usize, 0);
        }
    }
}

/// QEMU `qcow2_inc_refcounts_imrt`.
fn inc(ctx: &Ctx, res: &mut CheckResult, t: &mut Imrt, off: u64, size: u64, log: Log) {
    if size == 0 {
        return;
    }
    let cs = ctx.cs();
    if off as i128 + size as i128 - ctx.file_len as i128 >= cs as i128 {
        log(&format!(
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{off:x} size 0x{size:x}"
        ));
        res.corruptions += 1;
        return;
    }
    let start = off & !(cs - 1);
    let last = (off + size - 1) & !(cs - 1);
    let mut c = start;
    while c <= last {
        let k = c >> ctx.h.cluster_bits;
        t.grow(k);
        let r = t.v[k as usize];
        if r == t.max {
            log(&format!("ERROR: overflow cluster offset=0x{c:x}"));
            log("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing");
            res.corruptions += 1;
        } else {
            t.v[k as usize] = r + 1;
        }
        c += cs;
    }
}

fn check_l2(
    ctx: &Ctx,
    res: &mut CheckResult,
    t: &mut Imrt,
    l2_off: u64,
    frag: bool,
    log: Log,
) -> Result<(), ()> {
    let h = &ctx.h;
    let cs = ctx.cs();
    let esz = h.l2_entry_size();
    let Ok(tbl) = read_zero_padded(ctx.f, l2_off, cs) else {
        log("ERROR: I/O error in check_refcounts_l2");
        res.check_errors += 1;
        return Err(());
    };
    let mut next_contig = 0u64;
    for i in 0..h.l2_entries() {
        let p = (i * esz) as usize;
        let e = u64::from_be_bytes(tbl[p..p + 8].try_into().unwrap_or([0; 8]));
        let bitmap = if esz == 16 {
            u64::from_be_bytes(tbl[p + 8..p + 16].try_into().unwrap_or([0; 8]))
        } else {
            0
        };
        if e & OFLAG_COMPRESSED == 0 && e & 0x3f00_0000_0000_01fe != 0 {
            log(&format!(
                "ERROR found l2 entry with reserved bits set: {e:x}"
            ));
            res.corruptions += 1;
        }
        if e & OFLAG_COMPRESSED != 0 {
            if e & OFLAG_COPIED != 0 {
                let (co, _) = meta::compressed_extent(h, e);
                log(&format!(
                    "ERROR: coffset=0x{co:x}: copied flag must never be set for compressed clusters"
                ));
                res.corruptions += 1;
            }
            if bitmap != 0 {
                log(&format!(
                    "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{e:x}"
                ));
                res.corruptions += 1;
            }
            let (co, csize) = meta::compressed_extent(h, e & !OFLAG_COPIED);
            inc(ctx, res, t, co, csize, log);
            if frag {
                res.allocated_clusters += 1;
                res.compressed_clusters += 1;
                res.fragmented_clusters += 1;
            }
            continue;
        }
        let off = e & OFFSET_MASK;
        let zero_flag = !h.extended_l2() && e & OFLAG_ZERO != 0;
        if off == 0 {
            if esz == 16 && bitmap & 0xffff_ffff != 0 {
                log(&format!(
                    "ERROR: Unallocated cluster has non-zero subcluster allocation bitmap, entry=0x{e:x}"
                ));
                res.corruptions += 1;
            }
            continue;
        }
        // Normal or zero-allocated cluster.
        if esz == 16 && (bitmap >> 32) & bitmap != 0 {
            log(&format!(
                "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ));
            res.corruptions += 1;
        }
        if off & (cs - 1) != 0 {
            res.corruptions += 1;
            let contains_data = if esz == 16 {
                bitmap & 0xffff_ffff != 0
            } else {
                !zero_flag
            };
            if contains_data {
                log(&format!(
                    "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."
                ));
            } else {
                log(&format!(
                    "ERROR offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                ));
            }
        }
        if frag {
            res.allocated_clusters += 1;
            if next_contig != 0 && off != next_contig {
                res.fragmented_clusters += 1;
            }
            next_contig = off + cs;
        }
        inc(ctx, res, t, off, cs, log);
    }
    Ok(())
}

fn check_l1(
    ctx: &Ctx,
    res: &mut CheckResult,
    t: &mut Imrt,
    l1_off: u64,
    l1_size: u64,
    frag: bool,
    log: Log,
) -> Result<(), ()> {
    if l1_size == 0 {
        return Ok(());
    }
    inc(ctx, res, t, l1_off, l1_size * 8, log);
    let Ok(b) = read_zero_padded(ctx.f, l1_off, l1_size * 8) else {
        log("ERROR: I/O error in check_refcounts_l1");
        res.check_errors += 1;
        return Err(());
    };
    for e in be64s(&b) {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if e & 0x7f00_0000_0000_01ff != 0 {
            log(&format!(
                "ERROR found L1 entry with reserved bits set: {e:x}"
            ));
            res.corruptions += 1;
        }
        inc(ctx, res, t, l2, ctx.cs(), log);
        if l2 & (ctx.cs() - 1) != 0 {
            log(&format!(
                "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
            ));
            res.corruptions += 1;
        }
        // A table past the end of the file reads as zeroes: nothing to count.
        if l2 < ctx.file_len {
            check_l2(ctx, res, t, l2, frag, log)?;
        }
    }
    Ok(())
}

/// QEMU `calculate_refcounts` + `check_refblocks`. Returns `rebuild`.
fn calculate(ctx: &Ctx, res: &mut CheckResult, t: &mut Imrt, log: Log) -> Result<bool, String> {
    let h = ctx.h.clone();
    let cs = ctx.cs();
    inc(ctx, res, t, 0, cs, log);
    if check_l1(ctx, res, t, h.l1_table_offset, h.l1_size as u64, true, log).is_err() {
        return Err("Input/output error".into());
    }
    let snaps = meta::read_snapshots(ctx.f, &h).unwrap_or_default();
    for s in &snaps {
        if s.l1_table_offset & (cs - 1) != 0 {
            log(&format!(
                "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                s.id, s.name, s.l1_table_offset
            ));
            res.corruptions += 1;
            continue;
        }
        if s.l1_size as u64 > meta::MAX_L1_BYTES / 8 {
            log(&format!(
                "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                s.id, s.name, s.l1_size
            ));
            res.corruptions += 1;
            continue;
        }
        if check_l1(ctx, res, t, s.l1_table_offset, s.l1_size as u64, false, log).is_err() {
            return Err("Input/output error".into());
        }
    }
    let snap_size = meta::serialize_snapshots(&snaps).len() as u64;
    inc(ctx, res, t, h.snapshots_offset, snap_size, log);
    inc(
        ctx,
        res,
        t,
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
        log,
    );
    if let Some((_, dir_size, dir_off)) = h.bitmaps {
        inc(ctx, res, t, dir_off, dir_size, log);
    }
    // check_refblocks
    let mut rebuild = false;
    let nb_clusters = t.v.len() as u64;
    for (i, e) in ctx.reftable.iter().enumerate() {
        let off = e & meta::REFT_OFFSET_MASK;
        let cl = off >> h.cluster_bits;
        if e & 0x1ff != 0 {
            log(&format!(
                "ERROR refcount table entry {i} has reserved bits set"
            ));
            res.corruptions += 1;
            rebuild = true;
            continue;
        }
        if off & (cs - 1) != 0 {
            log(&format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            res.corruptions += 1;
            rebuild = true;
            continue;
        }
        if cl >= nb_clusters {
            res.corruptions += 1;
            log(&format!("ERROR refcount block {i} is outside image"));
            rebuild = true;
            continue;
        }
        if off != 0 {
            inc(ctx, res, t, off, cs, log);
            let r = t.v.get(cl as usize).copied().unwrap_or(0);
            if r != 1 {
                log(&format!("ERROR refcount block {i} refcount={r}"));
                res.corruptions += 1;
                rebuild = true;
            }
        }
    }
    Ok(rebuild)
}

/// QEMU `compare_refcounts`.
fn compare(
    ctx: &mut Ctx,
    res: &mut CheckResult,
    fix: Fix,
    rebuild: &mut bool,
    highest: &mut i64,
    t: &Imrt,
    log: Log,
) {
    for i in 0..t.v.len() as u64 {
        let r1 = match ctx.get_refcount(i) {
            Ok(r) => r,
            Err(e) => {
                log(&format!("Can't get refcount for cluster {i}: {e}"));
                res.check_errors += 1;
                continue;
            }
        };
        let r2 = t.v[i as usize];
        if r1 > 0 || r2 > 0 {
            *highest = i as i64;
        }
        if r1 != r2 {
            let mut fixed: Option<bool> = None; // Some(true) = leak fix
            if r1 == 0 {
                *rebuild = true;
            } else if r1 > r2 && fix.leaks {
                fixed = Some(true);
            } else if r1 < r2 && fix.errors {
                fixed = Some(false);
            }
            let what = if fixed.is_some() {
                "Repairing"
            } else if r1 < r2 {
                "ERROR"
            } else {
                "Leaked"
            };
            log(&format!("{what} cluster {i} refcount={r1} reference={r2}"));
            if let Some(leak) = fixed {
                if ctx.set_refcount(i, r2).is_ok() {
                    if r2 == 0 && fix.discard {
                        // QEMU frees with discard: the space goes back.
                        let cs = ctx.h.cluster_size();
                        if i * cs < ctx.file_len {
                            let _ = crate::image::raw::punch_hole(ctx.f, i * cs, cs);
                        }
                    }
                    if leak {
                        res.leaks_fixed += 1;
                    } else {
                        res.corruptions_fixed += 1;
                    }
                }
                continue;
            }
            if r1 < r2 {
                res.corruptions += 1;
            } else {
                res.leaks += 1;
            }
        }
    }
}

/// QEMU `check_oflag_copied`.
fn check_copied(ctx: &mut Ctx, res: &mut CheckResult, fix: Fix, log: Log) -> Result<(), String> {
    let h = ctx.h.clone();
    let cs = ctx.cs();
    // QEMU: -r all repairs; -r leaks repairs only when nothing else is wrong.
    let repair = if fix.errors {
        true
    } else if fix.leaks {
        res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
    } else {
        false
    };
    let mut l1 = be64s(
        &read_zero_padded(ctx.f, h.l1_table_offset, h.l1_size as u64 * 8)
            .map_err(|e| e.to_string())?,
    );
    let esz = h.l2_entry_size();
    #[allow(clippy::needless_range_loop)]
    for i in 0..l1.len() {
        let l1e = l1[i];
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        let Ok(r) = ctx.get_refcount(l2_off >> h.cluster_bits) else {
            continue;
        };
        if (r == 1) != (l1e & OFLAG_COPIED != 0) {
            res.corruptions += 1;
            log(&format!(
                "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={r}",
                if repair { "Repairing" } else { "ERROR" }
            ));
            if repair {
                l1[i] = if r == 1 {
                    l1e | OFLAG_COPIED
                } else {
                    l1e & !OFLAG_COPIED
                };
                ctx.f
                    .write_all_at(&l1[i].to_be_bytes(), h.l1_table_offset + i as u64 * 8)
                    .map_err(|e| e.to_string())?;
                res.corruptions -= 1;
                res.corruptions_fixed += 1;
            }
        }
        let mut tbl = match read_zero_padded(ctx.f, l2_off, cs) {
            Ok(t) => t,
            Err(e) => {
                log(&format!("ERROR: Could not read L2 table: {e}"));
                res.check_errors += 1;
                return Err(e.to_string());
            }
        };
        let mut dirty = false;
        for j in 0..h.l2_entries() {
            let p = (j * esz) as usize;
            let e = u64::from_be_bytes(tbl[p..p + 8].try_into().unwrap_or([0; 8]));
            if e & OFLAG_COMPRESSED != 0 {
                continue;
            }
            let data = e & OFFSET_MASK;
            if data == 0 {
                continue;
            }
            let Ok(r) = ctx.get_refcount(data >> h.cluster_bits) else {
                continue;
            };
            if (r == 1) != (e & OFLAG_COPIED != 0) {
                res.corruptions += 1;
                log(&format!(
                    "{} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}",
                    if repair { "Repairing" } else { "ERROR" }
                ));
                if repair {
                    let ne = if r == 1 {
                        e | OFLAG_COPIED
                    } else {
                        e & !OFLAG_COPIED
                    };
                    tbl[p..p + 8].copy_from_slice(&ne.to_be_bytes());
                    dirty = true;
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                }
            }
        }
        if dirty {
            ctx.f
                .write_all_at(&tbl, l2_off)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Write new refcount structures at the end of the file from the
/// in-memory table (QEMU `rebuild_refcount_structure`, appending).
fn rebuild_structure(ctx: &mut Ctx, t: &mut Imrt) -> Result<(), String> {
    let h = ctx.h.clone();
    let cs = ctx.cs();
    let rbe = h.refblock_entries();
    // Highest used cluster.
    let used =
        t.v.iter()
            .rposition(|&r| r != 0)
            .map(|p| p + 1)
            .unwrap_or(0) as u64;
    let start = used.max(ctx.file_len.div_ceil(cs));
    let mut n_rb = used.div_ceil(rbe).max(1);
    let mut n_rt;
    loop {
        n_rt = (n_rb * 8).div_ceil(cs).max(1);
        let end = start + n_rb + n_rt;
        let need = end.div_ceil(rbe);
        if need <= n_rb {
            break;
        }
        n_rb = need;
    }
    let end = start + n_rb + n_rt;
    t.grow(end);
    for c in start..end {
        t.v[c as usize] = 1;
    }
    let mut reftable = vec![0u64; (n_rt * cs / 8) as usize];
    for i in 0..n_rb {
        let first = i * rbe;
        let mut block = vec![0u8; cs as usize];
        let mut any = false;
        for j in 0..rbe {
            let c = first + j;
            if let Some(&r) = t.v.get(c as usize) {
                if r != 0 {
                    meta::refblock_set(&mut block, h.refcount_order, j, r);
                    any = true;
                }
            }
        }
        let off = (start + i) * cs;
        let _ = any;
        ctx.f.write_all_at(&block, off).map_err(|e| e.to_string())?;
        reftable[i as usize] = off;
    }
    let rt_off = (start + n_rb) * cs;
    meta::write_table(ctx.f, rt_off, &reftable).map_err(|e| e.to_string())?;
    ctx.f.sync_data().map_err(|e| e.to_string())?;
    let mut nh = Header::read(ctx.f)?;
    nh.refcount_table_offset = rt_off;
    nh.refcount_table_clusters = n_rt as u32;
    nh.refcount_order = h.refcount_order;
    let hb = nh.serialize()?;
    // One write (within the first sector) switches table and width at once.
    let n = if nh.version >= 3 { 104 } else { 72 };
    ctx.f.write_all_at(&hb[..n], 0).map_err(|e| e.to_string())?;
    ctx.f.sync_data().map_err(|e| e.to_string())?;
    ctx.h = nh;
    ctx.file_len = ctx.f.metadata().map_err(|e| e.to_string())?.len();
    ctx.reftable = reftable;
    ctx.rb_cache.clear();
    ctx.last = (u64::MAX, Vec::new());
    Ok(())
}

fn load(f: &File) -> Result<Ctx<'_>, String> {
    let h = Header::read(f)?;
    let file_len = f.metadata().map_err(|e| e.to_string())?.len();
    let rt = read_zero_padded(
        f,
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * h.cluster_size(),
    )
    .map_err(|e| e.to_string())?;
    Ok(Ctx {
        f,
        h,
        file_len,
        reftable: be64s(&rt),
        rb_cache: HashMap::new(),
        last: (u64::MAX, Vec::new()),
    })
}

fn new_imrt(ctx: &Ctx) -> Imrt {
    Imrt {
        v: vec![0; ctx.file_len.div_ceil(ctx.cs()) as usize],
        rbe: ctx.h.refblock_entries(),
        max: ctx.h.refcount_max(),
    }
}

/// QEMU `qcow2_check_refcounts`. `Err` = the check could not complete
/// (qemu-img then says `Check failed: <msg>`).
fn check_refcounts(f: &File, fix: Fix, res: &mut CheckResult, log: Log) -> Result<(), String> {
    let mut ctx = load(f)?;
    let cs = ctx.cs();
    res.total_clusters = ctx.h.size.next_multiple_of(512).div_ceil(cs);
    let mut t = new_imrt(&ctx);
    let mut rebuild = calculate(&ctx, res, &mut t, log)?;
    let pre = *res;
    let mut highest: i64 = -1;
    compare(
        &mut ctx,
        res,
        Fix::NONE,
        &mut rebuild,
        &mut highest,
        &t,
        log,
    );
    if rebuild && fix.errors {
        let old = *res;
        let mut fresh_leaks = 0;
        log("Rebuilding refcount structure");
        rebuild_structure(&mut ctx, &mut t)?;
        res.corruptions = 0;
        res.leaks = 0;
        rebuild = false;
        let mut t2 = new_imrt(&ctx);
        let mut scratch = CheckResult::default();
        let _ = calculate(&ctx, &mut scratch, &mut t2, log)?;
        if fix.leaks {
            let mut r2 = CheckResult::default();
            compare(
                &mut ctx,
                &mut r2,
                Fix {
                    discard: fix.discard,
                    ..Fix::LEAKS
                },
                &mut rebuild,
                &mut highest,
                &t2,
                log,
            );
            if rebuild {
                log("ERROR rebuilt refcount structure is still broken");
            }
            fresh_leaks = r2.leaks;
        }
        if res.corruptions < old.corruptions {
            res.corruptions_fixed += old.corruptions - res.corruptions;
        }
        if res.leaks < old.leaks {
            res.leaks_fixed += old.leaks - res.leaks;
        }
        res.leaks += fresh_leaks;
    } else if fix.any() {
        if rebuild {
            log("ERROR need to rebuild refcount structures");
            res.check_errors += 1;
            return Err("Input/output error".into());
        }
        if res.leaks > 0 || res.corruptions > 0 {
            *res = pre;
            compare(&mut ctx, res, fix, &mut rebuild, &mut highest, &t, log);
        }
    }
    check_copied(&mut ctx, res, fix, log)?;
    res.image_end_offset = ((highest + 1) as u64) * cs;
    Ok(())
}

/// Check (and optionally repair) an image, like `qemu-img check` does for
/// one pass. Clears the dirty and corrupt bits after a successful repair.
pub fn check(f: &File, fix: Fix, log: Log) -> Result<CheckResult, String> {
    let mut res = CheckResult::default();
    check_refcounts(f, fix, &mut res, log)?;
    if fix.any() && res.check_errors == 0 && res.corruptions == 0 {
        let mut h = Header::read(f)?;
        if h.incompatible & (meta::INCOMPAT_DIRTY | meta::INCOMPAT_CORRUPT) != 0 {
            h.incompatible &= !(meta::INCOMPAT_DIRTY | meta::INCOMPAT_CORRUPT);
            if h.version >= 3 {
                f.write_all_at(&h.incompatible.to_be_bytes(), 72)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    if fix.any() {
        f.sync_data().map_err(|e| e.to_string())?;
    }
    Ok(res)
}

/// QEMU's `qcow2_detect_metadata_preallocation`: true when many more
/// clusters are referenced than the file has allocated (then QEMU asks the
/// file system which data clusters are holes when reporting block status).
pub fn detect_metadata_preallocation(f: &File) -> Result<bool, String> {
    use std::os::unix::fs::MetadataExt;
    let mut ctx = load(f)?;
    let md = f.metadata().map_err(|e| e.to_string())?;
    let cs = ctx.cs();
    let real_clusters = md.blocks() * 512 / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end = md.len().div_ceil(cs);
    let mut count = 0;
    let mut i = 0;
    while i < end && count < threshold {
        if ctx.get_refcount(i)? != 0 {
            count += 1;
        }
        i += 1;
    }
    Ok(count >= threshold)
}

/// Rewrite the refcount structures with a new width (2^order bits), as
/// `amend -o refcount_bits=N` does. The image must be consistent.
pub fn change_refcount_order(f: &File, order: u32) -> Result<(), String> {
    let mut ctx = load(f)?;
    if ctx.h.version < 3 {
        return Err("refcount widths other than 16 bits need compat=1.1".into());
    }
    let mut res = CheckResult::default();
    let mut t = new_imrt(&ctx);
    calculate(&ctx, &mut res, &mut t, &mut |_| {})?;
    if res.corruptions != 0 || res.check_errors != 0 {
        return Err("the image is corrupt; repair it with 'vimg check -r all' first".into());
    }
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    };
    if t.v.iter().any(|&r| r > max) {
        return Err("Cannot decrease refcount entry width: some refcounts are too large".into());
    }
    let old = (ctx.h.clone(), ctx.reftable.clone());
    ctx.h.refcount_order = order;
    t.rbe = ctx.h.refblock_entries();
    t.max = max;
    // New structures carry the new width; the header switch below makes
    // them live (order first would misread the old blocks).
    rebuild_structure(&mut ctx, &mut t)?;
    // Old structures are now leaked: free them (without a discard, as
    // QEMU frees them).
    let keep = Fix {
        discard: false,
        ..Fix::LEAKS
    };
    let r = check(f, keep, &mut |_| {})?;
    if r.corruptions != 0 {
        return Err("refcount width change left the image inconsistent".into());
    }
    count_in_old_blocks(f, &old.0, &old.1).map_err(|e| e.to_string())
}

/// QEMU allocates the new refcount structures of a width change through
/// the old ones, which it then frees without wiping: their bytes count the
/// new structures' clusters. Leave the same (unreferenced) bytes, so the
/// file is QEMU's.
fn count_in_old_blocks(f: &File, old: &Header, old_table: &[u64]) -> std::io::Result<()> {
    let new = Header::read(f).map_err(std::io::Error::other)?;
    let cs = new.cluster_size();
    let n = new.refcount_table_clusters as u64 * cs / 8;
    let table = meta::read_table(f, new.refcount_table_offset, n)?;
    let mut clusters: Vec<u64> = table
        .iter()
        .map(|e| e & meta::REFT_OFFSET_MASK)
        .filter(|&o| o != 0)
        .map(|o| o / cs)
        .collect();
    let first = new.refcount_table_offset / cs;
    clusters.extend(first..first + new.refcount_table_clusters as u64);
    let rbe = old.refblock_entries();
    let mut block = vec![0u8; cs as usize];
    for (k, e) in old_table.iter().enumerate() {
        let at = e & meta::REFT_OFFSET_MASK;
        if at == 0 || at % cs != 0 {
            continue;
        }
        let mine: Vec<u64> = clusters
            .iter()
            .filter(|&&c| c / rbe == k as u64)
            .map(|&c| c % rbe)
            .collect();
        if mine.is_empty() {
            continue;
        }
        pread_full(f, &mut block, at)?;
        for j in mine {
            meta::refblock_set(&mut block, old.refcount_order, j, 1);
        }
        f.write_all_at(&block, at)?;
    }
    Ok(())
}

/// Switch an image to a new active state and snapshot list in one atomic
/// header write ("shadow paging"): the new active L1 gets fresh copies of
/// the L2 tables `active_src` points to, a new snapshot table and complete
/// new refcount structures are written to free space at the end of the
/// file, COPIED flags are computed from the new refcounts, and only then
/// are size, L1, refcount table and snapshot table pointers switched with a
/// single write inside the first header sector. A crash before that write
/// leaves the old image untouched; after it, the new one complete.
pub fn commit_state(
    f: &File,
    size: u64,
    active_src: &[u64],
    snaps: &[meta::Snapshot],
) -> Result<(), String> {
    let h = Header::read(f)?;
    let cs = h.cluster_size();
    let esz = h.l2_entry_size() as usize;
    let err = |e: std::io::Error| e.to_string();
    let mut end = f.metadata().map_err(err)?.len().next_multiple_of(cs);
    let mut alloc = |n: u64| {
        let o = end;
        end += n.next_multiple_of(cs).max(cs);
        o
    };
    // 1. Fresh L2 copies (COPIED cleared for now) and the new L1.
    let need = (h.l1_entries_for(size) as usize).max(active_src.len());
    let mut l1 = vec![0u64; need];
    let mut copies: Vec<(usize, u64, Vec<u8>)> = Vec::new();
    for (i, e) in active_src.iter().enumerate() {
        let src = e & OFFSET_MASK;
        if src == 0 {
            continue;
        }
        let mut t = read_zero_padded(f, src, cs).map_err(err)?;
        for c in t.chunks_exact_mut(esz) {
            let v = u64::from_be_bytes(c[..8].try_into().unwrap_or([0; 8]));
            c[..8].copy_from_slice(&(v & !OFLAG_COPIED).to_be_bytes());
        }
        let off = alloc(cs);
        f.write_all_at(&t, off).map_err(err)?;
        l1[i] = off;
        copies.push((i, off, t));
    }
    let l1_off = if need > 0 { alloc(need as u64 * 8) } else { 0 };
    if need > 0 {
        meta::write_table(f, l1_off, &l1).map_err(err)?;
    }
    let table = meta::serialize_snapshots(snaps);
    let snap_off = if snaps.is_empty() {
        0
    } else {
        let o = alloc(table.len() as u64);
        let mut b = table.clone();
        b.resize(b.len().next_multiple_of(cs as usize), 0);
        f.write_all_at(&b, o).map_err(err)?;
        o
    };
    // 2. References of the new state.
    let mut vh = h.clone();
    vh.size = size;
    vh.l1_size = need as u32;
    vh.l1_table_offset = l1_off;
    vh.nb_snapshots = snaps.len() as u32;
    vh.snapshots_offset = snap_off;
    let file_len = f.metadata().map_err(err)?.len();
    let mut ctx = Ctx {
        f,
        h: vh.clone(),
        file_len,
        reftable: Vec::new(),
        rb_cache: HashMap::new(),
        last: (u64::MAX, Vec::new()),
    };
    let mut t = new_imrt(&ctx);
    let mut res = CheckResult::default();
    let mut sink = |_: &str| {};
    inc(&ctx, &mut res, &mut t, 0, cs, &mut sink);
    check_l1(
        &ctx,
        &mut res,
        &mut t,
        l1_off,
        need as u64,
        false,
        &mut sink,
    )
    .map_err(|_| "Input/output error".to_string())?;
    for s in snaps {
        check_l1(
            &ctx,
            &mut res,
            &mut t,
            s.l1_table_offset,
            s.l1_size as u64,
            false,
            &mut sink,
        )
        .map_err(|_| "Input/output error".to_string())?;
    }
    inc(
        &ctx,
        &mut res,
        &mut t,
        snap_off,
        table.len() as u64,
        &mut sink,
    );
    if let Some((_, dir_size, dir_off)) = h.bitmaps {
        inc(&ctx, &mut res, &mut t, dir_off, dir_size, &mut sink);
    }
    if res.corruptions != 0 || res.check_errors != 0 {
        return Err("the image has errors; repair it with 'vimg check -r all' first".into());
    }
    // 3. COPIED flags from the new refcounts.
    let rc = |t: &Imrt, off: u64| t.v.get((off / cs) as usize).copied().unwrap_or(0);
    for (i, off, mut tb) in copies {
        for c in tb.chunks_exact_mut(esz) {
            let v = u64::from_be_bytes(c[..8].try_into().unwrap_or([0; 8]));
            if v & meta::OFLAG_COMPRESSED == 0
                && v & OFFSET_MASK != 0
                && rc(&t, v & OFFSET_MASK) == 1
            {
                c[..8].copy_from_slice(&(v | OFLAG_COPIED).to_be_bytes());
            }
        }
        f.write_all_at(&tb, off).map_err(err)?;
        if rc(&t, off) == 1 {
            l1[i] = off | OFLAG_COPIED;
        }
    }
    if need > 0 {
        meta::write_table(f, l1_off, &l1).map_err(err)?;
    }
    // 4. New refcount structures after everything (like a rebuild).
    let rbe = h.refblock_entries();
    let used =
        t.v.iter()
            .rposition(|&r| r != 0)
            .map(|p| p + 1)
            .unwrap_or(0) as u64;
    let start = used.max(end / cs);
    let mut n_rb = start.div_ceil(rbe).max(1);
    let mut n_rt;
    loop {
        n_rt = (n_rb * 8).div_ceil(cs).max(1);
        let need_rb = (start + n_rb + n_rt).div_ceil(rbe);
        if need_rb <= n_rb {
            break;
        }
        n_rb = need_rb;
    }
    t.grow(start + n_rb + n_rt);
    for c in start..start + n_rb + n_rt {
        t.v[c as usize] = 1;
    }
    let mut reftable = vec![0u64; (n_rt * cs / 8) as usize];
    for i in 0..n_rb {
        let mut b = vec![0u8; cs as usize];
        for j in 0..rbe {
            if let Some(&r) = t.v.get((i * rbe + j) as usize) {
                if r != 0 {
                    meta::refblock_set(&mut b, h.refcount_order, j, r);
                }
            }
        }
        let off = (start + i) * cs;
        f.write_all_at(&b, off).map_err(err)?;
        reftable[i as usize] = off;
    }
    let rt_off = (start + n_rb) * cs;
    meta::write_table(f, rt_off, &reftable).map_err(err)?;
    f.sync_data().map_err(err)?;
    // 5. The switch: bytes 24..72 of the header in one write.
    let mut hb = Vec::with_capacity(48);
    hb.extend_from_slice(&size.to_be_bytes());
    hb.extend_from_slice(&h.crypt_method.to_be_bytes());
    hb.extend_from_slice(&(need as u32).to_be_bytes());
    hb.extend_from_slice(&l1_off.to_be_bytes());
    hb.extend_from_slice(&rt_off.to_be_bytes());
    hb.extend_from_slice(&(n_rt as u32).to_be_bytes());
    hb.extend_from_slice(&(snaps.len() as u32).to_be_bytes());
    hb.extend_from_slice(&snap_off.to_be_bytes());
    f.write_all_at(&hb, 24).map_err(err)?;
    f.sync_data().map_err(err)?;
    drop(ctx.rb_cache.drain());
    ctx.reftable.clear();
    Ok(())
}
