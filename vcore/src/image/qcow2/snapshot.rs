//! Internal snapshots (create, apply, delete) and metadata amendments.
//!
//! Table and L1 changes are written to fresh clusters at the end of the
//! file first; the header is then switched with one small write; finally
//! the refcounts and COPIED flags are brought in line by the same code that
//! `check -r all` uses (so the result always passes `qemu-img check`).

use super::check::{self, Fix};
use super::meta::{self, Header, Snapshot, OFFSET_MASK, OFLAG_COPIED};
use crate::image::raw::pread_full;
use std::fs::File;
use std::os::unix::fs::FileExt;

fn io(e: std::io::Error) -> String {
    e.to_string()
}

fn append(f: &File, h: &Header, data: &[u8]) -> Result<u64, String> {
    let cs = h.cluster_size();
    let off = f.metadata().map_err(io)?.len().next_multiple_of(cs);
    let mut b = data.to_vec();
    b.resize((data.len() as u64).next_multiple_of(cs).max(cs) as usize, 0);
    f.write_all_at(&b, off).map_err(io)?;
    Ok(off)
}

fn read_l1(f: &File, off: u64, n: u32) -> Result<Vec<u64>, String> {
    let mut b = vec![0u8; n as usize * 8];
    pread_full(f, &mut b, off).map_err(io)?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

fn l1_bytes(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_be_bytes()).collect()
}

fn fixup(f: &File) -> Result<(), String> {
    let r = check::check(f, Fix::ALL, &mut |_| {})?;
    if r.corruptions != 0 || r.check_errors != 0 {
        return Err(format!(
            "refcount update failed ({} corruptions left)",
            r.corruptions
        ));
    }
    Ok(())
}

/// Find a snapshot by ID, then by name (like QEMU).
pub fn find(snaps: &[Snapshot], key: &str) -> Option<usize> {
    snaps
        .iter()
        .position(|s| s.id == key)
        .or_else(|| snaps.iter().position(|s| s.name == key))
}

/// Create a snapshot of the current state named `name`.
pub fn create(f: &File, name: &str) -> Result<(), String> {
    let h = Header::read(f)?;
    let mut snaps = meta::read_snapshots(f, &h)?;
    if snaps.len() as u32 >= meta::MAX_SNAPSHOTS {
        return Err("Too many snapshots".into());
    }
    let l1 = read_l1(f, h.l1_table_offset, h.l1_size)?;
    // The snapshot keeps the current L2 tables through its own L1 copy;
    // the active state gets fresh copies (see check::commit_state).
    let copy: Vec<u64> = l1.iter().map(|e| e & !OFLAG_COPIED).collect();
    let l1_off = if copy.is_empty() {
        0
    } else {
        append(f, &h, &l1_bytes(&copy))?
    };
    let id = snaps
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    snaps.push(Snapshot {
        l1_table_offset: l1_off,
        l1_size: h.l1_size,
        id: id.to_string(),
        name: name.to_string(),
        date_sec: now.as_secs() as u32,
        date_nsec: now.subsec_micros() * 1000,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: Some(h.size),
        icount: Some(0),
        extra_unknown: Vec::new(),
    });
    check::commit_state(f, h.size, &l1, &snaps)
}

/// Revert the active state to a snapshot.
pub fn apply(f: &File, key: &str) -> Result<(), String> {
    let h = Header::read(f)?;
    let snaps = meta::read_snapshots(f, &h)?;
    let i = find(&snaps, key).ok_or("Failed to load snapshot: No such file or directory")?;
    let sn = &snaps[i];
    let sl1 = read_l1(f, sn.l1_table_offset, sn.l1_size)?;
    let size = sn.disk_size.unwrap_or(h.size);
    check::commit_state(f, size, &sl1, &snaps)
}

/// Delete a snapshot.
pub fn delete(f: &File, key: &str) -> Result<(), String> {
    let h = Header::read(f)?;
    let mut snaps = meta::read_snapshots(f, &h)?;
    let i = find(&snaps, key).ok_or("snapshot not found")?;
    snaps.remove(i);
    let l1 = read_l1(f, h.l1_table_offset, h.l1_size)?;
    check::commit_state(f, h.size, &l1, &snaps)
}

/// `amend`: change compat level, lazy refcounts and refcount width.
pub fn amend(
    f: &File,
    v3: Option<bool>,
    lazy: Option<bool>,
    refcount_bits: Option<u64>,
) -> Result<(), String> {
    let mut h = Header::read(f)?;
    if v3 == Some(true) && h.version == 2 {
        h.version = 3;
        h.header_length = 112;
        h.extra_fields = vec![0; 8];
        h.has_feature_table = h.cluster_size() >= 8192;
        h.write(f).map_err(io)?;
        f.sync_data().map_err(io)?;
    }
    if let Some(bits) = refcount_bits {
        if !bits.is_power_of_two() || bits > 64 {
            return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
        }
        let want_v3 = v3.unwrap_or(h.version >= 3);
        if bits != 16 && !want_v3 {
            return Err("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into());
        }
        let order = bits.trailing_zeros();
        if order != h.refcount_order {
            check::change_refcount_order(f, order)?;
            h = Header::read(f)?;
        }
    }
    match v3 {
        Some(false) if h.version >= 3 => {
            if lazy == Some(true) || (lazy.is_none() && h.lazy_refcounts()) {
                return Err("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into());
            }
            if h.refcount_order != 4 {
                return Err("compat=0.10 requires refcount_bits=16".into());
            }
            if h.incompatible & !(meta::INCOMPAT_DIRTY) != 0 {
                return Err("Cannot downgrade an image with incompatible features set".into());
            }
            downgrade_zero_clusters(f, &h)?;
            h.version = 2;
            h.header_length = 72;
            h.compatible = 0;
            h.autoclear = 0;
            h.incompatible = 0;
            h.extra_fields.clear();
            h.has_feature_table = false;
            h.other_extensions.clear();
        }
        _ => {}
    }
    if let Some(l) = lazy {
        if h.version < 3 && l {
            return Err("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into());
        }
        if l {
            h.compatible |= meta::COMPAT_LAZY_REFCOUNTS;
        } else {
            h.compatible &= !meta::COMPAT_LAZY_REFCOUNTS;
        }
    }
    h.write(f).map_err(io)?;
    f.sync_data().map_err(io)
}

/// v2 has no zero flag: turn zero clusters into unallocated ones when no
/// backing file shows through, else refuse.
fn downgrade_zero_clusters(f: &File, h: &Header) -> Result<(), String> {
    let cs = h.cluster_size();
    let l1 = read_l1(f, h.l1_table_offset, h.l1_size)?;
    let mut changed = false;
    for e in l1 {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let mut t = vec![0u8; cs as usize];
        pread_full(f, &mut t, l2).map_err(io)?;
        let mut dirty = false;
        for c in t.chunks_exact_mut(8) {
            let v = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
            if v & meta::OFLAG_COMPRESSED == 0 && v & 1 != 0 {
                if h.backing_file.is_some() {
                    return Err(
                        "Cannot downgrade an image with zero clusters and a backing file".into(),
                    );
                }
                c.copy_from_slice(&0u64.to_be_bytes());
                dirty = true;
            }
        }
        if dirty {
            f.write_all_at(&t, l2).map_err(io)?;
            changed = true;
        }
    }
    if changed {
        fixup(f)?;
    }
    Ok(())
}
