//! virtio-blk (virtio 1.x §5.2) over a [`crate::image::BlockDevice`]:
//! read, write, flush, get-id, discard and write-zeroes requests, with the
//! cache modes of QEMU's `-drive cache=`.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::{gather, scatter, Chain, DiskSpec, Malformed, QueueHandler, VirtioDevice};
use super::{F_INDIRECT_DESC, F_VERSION_1};
use crate::image::BlockDevice;

/// Feature bits.
pub const F_SEG_MAX: u64 = 1 << 2;
/// Read-only device.
pub const F_RO: u64 = 1 << 5;
/// `blk_size` is valid.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// Flush command.
pub const F_FLUSH: u64 = 1 << 9;
/// Discard command.
pub const F_DISCARD: u64 = 1 << 13;
/// Write-zeroes command.
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const SECTOR: u64 = 512;
/// Largest piece of a request copied through the bounce buffer at once.
const CHUNK: u64 = 1 << 20;
const QUEUE_SIZE: u16 = 256;
/// Longest discard / write-zeroes range, in sectors (2 GiB - 512).
const MAX_RANGE_SECTORS: u32 = (1 << 22) - 1;
/// Length of the GET_ID string.
pub const ID_LEN: usize = 20;

/// QEMU's `cache=` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Host page cache, guest flushes honoured (the default).
    Writeback,
    /// O_DIRECT, guest flushes honoured.
    None,
    /// Host page cache, every write flushed before completing.
    Writethrough,
    /// O_DIRECT and every write flushed.
    Directsync,
    /// Host page cache, guest flushes ignored.
    Unsafe,
}

impl CacheMode {
    /// Parse QEMU's name.
    pub fn from_name(s: &str) -> Option<CacheMode> {
        Some(match s {
            "writeback" => CacheMode::Writeback,
            "none" => CacheMode::None,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }

    /// Whether the image is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether each write is flushed before it completes.
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
}

/// The virtio-blk device model.
pub struct Blk {
    id: String,
    disk: Arc<dyn BlockDevice>,
    serial: String,
    cache: CacheMode,
    discard: bool,
    restrict_block0: bool,
}

impl Blk {
    /// A device for a disk.
    pub fn new(spec: &DiskSpec) -> Self {
        Blk {
            id: spec.id.clone(),
            disk: spec.disk.clone(),
            serial: spec.serial.clone(),
            cache: spec.cache,
            discard: spec.discard,
            restrict_block0: spec.restrict_block0,
        }
    }

    /// The virtio_blk_config structure.
    pub fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&(self.disk.size() / SECTOR).to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = u8::from(self.discard); // write_zeroes_may_unmap
        c
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u16 {
        2
    }
    fn pci_class(&self) -> u32 {
        0x010000 // mass storage, SCSI (what QEMU reports for virtio-blk)
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_INDIRECT_DESC | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.disk.read_only() {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn read_config(&self, off: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, d) in data.iter_mut().enumerate() {
            *d = c.get(off as usize + i).copied().unwrap_or(0);
        }
    }
    fn handler(&self, _acked: u64) -> Box<dyn QueueHandler> {
        Box::new(BlkHandler {
            disk: self.disk.clone(),
            serial: self.serial.clone(),
            cache: self.cache,
            discard: self.discard,
            restrict_block0: self.restrict_block0,
            buf: AlignedBuf::default(),
        })
    }
}

/// A page-aligned bounce buffer (O_DIRECT needs aligned memory).
#[derive(Default)]
struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
}

impl AlignedBuf {
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.v.len() < len + 4096 {
            self.v = vec![0u8; len + 4096];
            self.off = self.v.as_ptr().align_offset(4096);
        }
        &mut self.v[self.off..self.off + len]
    }
}

/// The I/O-thread side of a virtio-blk device.
pub struct BlkHandler {
    disk: Arc<dyn BlockDevice>,
    serial: String,
    cache: CacheMode,
    discard: bool,
    restrict_block0: bool,
    buf: AlignedBuf,
}

impl BlkHandler {
    fn flush_if_write_through(&self) -> crate::image::Result<()> {
        if self.cache.write_through() {
            self.disk.flush()
        } else {
            Ok(())
        }
    }

    /// Serve a request; returns (status, bytes written before the status).
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        c: &Chain,
        ty: u32,
        sector: u64,
    ) -> Result<(u8, u32), Malformed> {
        let in_len = c.writable_len() - 1;
        let out_len = c.readable_len() - 16;
        let io = |r: crate::image::Result<()>| if r.is_ok() { S_OK } else { S_IOERR };
        Ok(match ty {
            T_IN | T_OUT => {
                let len = if ty == T_IN { in_len } else { out_len };
                let Some(off) = sector.checked_mul(SECTOR) else {
                    return Ok((S_IOERR, 0));
                };
                if len % SECTOR != 0
                    || off.checked_add(len).is_none_or(|e| e > self.disk.size())
                    || len > usize::MAX as u64
                {
                    return Ok((S_IOERR, 0));
                }
                // Through the bounce buffer in chunks: the host memory used
                // per request stays bounded whatever length the guest asks.
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let buf = self.buf.get(n as usize);
                    if ty == T_IN {
                        if self.disk.read_at(buf, off + done).is_err() {
                            return Ok((S_IOERR, 0));
                        }
                        scatter(mem, &c.writable, done, buf)?;
                    } else {
                        if self.disk.read_only() {
                            return Ok((S_IOERR, 0));
                        }
                        gather(mem, &c.readable, 16 + done, buf)?;
                        if self.restrict_block0
                            && off + done == 0
                            && buf.starts_with(&crate::image::QCOW2_MAGIC)
                        {
                            return Ok((S_IOERR, 0));
                        }
                        if self.disk.write_at(buf, off + done).is_err() {
                            return Ok((S_IOERR, 0));
                        }
                    }
                    done += n;
                }
                if ty == T_IN {
                    (S_OK, len as u32)
                } else {
                    (io(self.flush_if_write_through()), 0)
                }
            }
            T_FLUSH => {
                if self.cache == CacheMode::Unsafe {
                    (S_OK, 0)
                } else {
                    (io(self.disk.flush()), 0)
                }
            }
            T_GET_ID => {
                let mut id = [0u8; ID_LEN];
                let s = self.serial.as_bytes();
                let n = s.len().min(ID_LEN);
                id[..n].copy_from_slice(&s[..n]);
                let n = (in_len as usize).min(ID_LEN);
                scatter(mem, &c.writable, 0, &id[..n])?;
                (S_OK, n as u32)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.disk.read_only() {
                    return Ok((S_IOERR, 0));
                }
                if out_len < 16 || out_len % 16 != 0 {
                    return Ok((S_UNSUPP, 0));
                }
                let mut st = S_OK;
                for k in 0..out_len / 16 {
                    let mut seg = [0u8; 16];
                    gather(mem, &c.readable, 16 + k * 16, &mut seg)?;
                    let s = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                    let n = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                    let (Some(off), len) = (s.checked_mul(SECTOR), u64::from(n) * SECTOR) else {
                        st = S_IOERR;
                        break;
                    };
                    if n > MAX_RANGE_SECTORS
                        || off.checked_add(len).is_none_or(|e| e > self.disk.size())
                    {
                        st = S_IOERR;
                        break;
                    }
                    let r = if ty == T_DISCARD {
                        if flags != 0 {
                            st = S_UNSUPP;
                            break;
                        }
                        if self.discard {
                            self.disk.discard(off, len)
                        } else {
                            Ok(()) // discard=ignore
                        }
                    } else if flags & 1 != 0 && self.discard {
                        // unmap allowed: discard when that reads back as zeroes,
                        // which write_zeroes already does for holes.
                        self.disk.write_zeroes(off, len)
                    } else {
                        self.disk.write_zeroes(off, len)
                    };
                    if r.is_err() {
                        st = S_IOERR;
                        break;
                    }
                }
                if st == S_OK {
                    st = io(self.flush_if_write_through());
                }
                (st, 0)
            }
            _ => (S_UNSUPP, 0),
        })
    }
}

impl QueueHandler for BlkHandler {
    fn handle(&mut self, _q: usize, mem: &GuestMemoryMmap, c: &Chain) -> Result<u32, Malformed> {
        if c.readable_len() < 16 {
            return Err(Malformed(format!(
                "request header needs 16 device-readable bytes, the chain has {}",
                c.readable_len()
            )));
        }
        if c.writable_len() < 1 {
            return Err(Malformed(
                "request has no device-writable status byte".into(),
            ));
        }
        let mut hdr = [0u8; 16];
        gather(mem, &c.readable, 0, &mut hdr)?;
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let (st, n) = self.serve(mem, c, ty, sector)?;
        scatter(mem, &c.writable, c.writable_len() - 1, &[st])?;
        Ok(n + 1)
    }

    fn stop(&mut self) {
        if self.cache != CacheMode::Unsafe {
            let _ = self.disk.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{self, OpenOptions};
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const ST: u64 = 0x3000;

    fn setup(
        read_only: bool,
        cache: CacheMode,
    ) -> (GuestMemoryMmap, BlkHandler, tempfile::NamedTempFile) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(64 * 1024).unwrap();
        let disk = image::open(
            f.path(),
            &OpenOptions {
                format: Some(image::Format::Raw),
                read_only,
                no_lock: true,
                ..Default::default()
            },
        )
        .unwrap();
        let blk = Blk::new(&DiskSpec {
            id: "blk0".into(),
            disk: Arc::from(disk),
            serial: "SERIAL-0123456789-ABCDEF".into(),
            cache,
            discard: true,
            restrict_block0: false,
        });
        let h = BlkHandler {
            disk: blk.disk.clone(),
            serial: blk.serial.clone(),
            cache,
            discard: true,
            restrict_block0: false,
            buf: AlignedBuf::default(),
        };
        (mem, h, f)
    }

    fn req(
        mem: &GuestMemoryMmap,
        h: &mut BlkHandler,
        ty: u32,
        sector: u64,
        data: (u32, bool),
    ) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let mut c = Chain::default();
        c.readable.push((GuestAddress(HDR), 16));
        if data.0 > 0 {
            if data.1 {
                c.writable.push((GuestAddress(DATA), data.0));
            } else {
                c.readable.push((GuestAddress(DATA), data.0));
            }
        }
        c.writable.push((GuestAddress(ST), 1));
        let n = h.handle(0, mem, &c).unwrap();
        (mem.read_obj::<u8>(GuestAddress(ST)).unwrap(), n)
    }

    #[test]
    fn requests_and_errors() {
        let (mem, mut h, f) = setup(false, CacheMode::Writethrough);
        mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(req(&mem, &mut h, T_OUT, 2, (1024, false)), (S_OK, 1));
        let on_disk = std::fs::read(f.path()).unwrap();
        assert!(on_disk[1024..2048].iter().all(|&b| b == 0xab));
        mem.write_slice(&[0; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(req(&mem, &mut h, T_IN, 2, (512, true)), (S_OK, 513));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(), 0xab);
        // Past the end, misaligned length, unknown type.
        assert_eq!(req(&mem, &mut h, T_IN, 128, (512, true)).0, S_IOERR);
        assert_eq!(
            req(&mem, &mut h, T_IN, u64::MAX / 2, (512, true)).0,
            S_IOERR
        );
        assert_eq!(req(&mem, &mut h, T_IN, 0, (100, true)).0, S_IOERR);
        assert_eq!(req(&mem, &mut h, 99, 0, (0, false)).0, S_UNSUPP);
        assert_eq!(req(&mem, &mut h, T_FLUSH, 0, (0, false)).0, S_OK);
        // GET_ID: 20 bytes of the serial.
        assert_eq!(req(&mem, &mut h, T_GET_ID, 0, (20, true)), (S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"SERIAL-0123456789-AB");
        // WRITE_ZEROES over sectors 2-3.
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&2u64.to_le_bytes());
        seg[8..12].copy_from_slice(&2u32.to_le_bytes());
        mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        assert_eq!(req(&mem, &mut h, T_WRITE_ZEROES, 0, (16, false)).0, S_OK);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert!(on_disk[1024..2048].iter().all(|&b| b == 0));
        // DISCARD past the end fails; with flags it is unsupported.
        seg[0..8].copy_from_slice(&127u64.to_le_bytes());
        mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        assert_eq!(req(&mem, &mut h, T_DISCARD, 0, (16, false)).0, S_IOERR);
        seg[0..8].copy_from_slice(&0u64.to_le_bytes());
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        assert_eq!(req(&mem, &mut h, T_DISCARD, 0, (16, false)).0, S_UNSUPP);
    }

    #[test]
    fn read_only_and_malformed() {
        let (mem, mut h, _f) = setup(true, CacheMode::Writeback);
        assert_eq!(req(&mem, &mut h, T_OUT, 0, (512, false)).0, S_IOERR);
        assert_eq!(req(&mem, &mut h, T_IN, 0, (512, true)).0, S_OK);
        let blk_feats = {
            let b = Blk {
                id: "x".into(),
                disk: h.disk.clone(),
                serial: String::new(),
                cache: CacheMode::Writeback,
                discard: false,
                restrict_block0: false,
            };
            b.features()
        };
        assert_ne!(blk_feats & F_RO, 0);
        assert_eq!(blk_feats & F_DISCARD, 0);
        // No status byte / short header: malformed, not a panic.
        let mut c = Chain::default();
        c.readable.push((GuestAddress(HDR), 8));
        assert!(h.handle(0, &mem, &c).is_err());
        c.readable[0].1 = 16;
        assert!(h.handle(0, &mem, &c).is_err());
        // Chain checks: buffer outside RAM, readable after writable.
        use virtio_queue::desc::split::Descriptor;
        let d = |a, l, f, n| Descriptor::new(a, l, f, n);
        assert!(Chain::check(&mem, &[d(0xf000_0000, 16, 0, 0)]).is_err());
        assert!(Chain::check(&mem, &[d(0x1000, 0xffff_0000, 0, 0)]).is_err());
        assert!(Chain::check(&mem, &[d(0x1000, 16, 1, 1)]).is_err());
        assert!(Chain::check(&mem, &[d(0x1000, 16, 3, 1), d(0x2000, 16, 0, 0)]).is_err());
        assert!(Chain::check(&mem, &[]).is_err());
        let ok = Chain::check(&mem, &[d(0x1000, 16, 1, 1), d(0x2000, 1, 2, 0)]).unwrap();
        assert_eq!((ok.readable_len(), ok.writable_len()), (16, 1));
    }

    #[test]
    fn large_requests_go_through_in_chunks() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8 << 20).unwrap();
        let disk: Arc<dyn BlockDevice> = Arc::from(
            image::open(
                f.path(),
                &OpenOptions {
                    format: Some(image::Format::Raw),
                    no_lock: true,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let mut h = BlkHandler {
            disk,
            serial: String::new(),
            cache: CacheMode::Writeback,
            discard: false,
            restrict_block0: false,
            buf: AlignedBuf::default(),
        };
        let len: u32 = (3 << 20) + 512;
        let pattern: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x10_0000)).unwrap();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        hdr[8..16].copy_from_slice(&1u64.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        // Two data buffers, split in the middle of a chunk.
        let a = 1_500_000u32 / 512 * 512;
        let mut c = Chain::default();
        c.readable.push((GuestAddress(HDR), 16));
        c.readable.push((GuestAddress(0x10_0000), a));
        c.readable
            .push((GuestAddress(0x10_0000 + u64::from(a)), len - a));
        c.writable.push((GuestAddress(ST), 1));
        assert_eq!(h.handle(0, &mem, &c).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(ST)).unwrap(), S_OK);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[512..512 + len as usize], &pattern[..]);
        // Read it back into one buffer elsewhere.
        hdr[0..4].copy_from_slice(&T_IN.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let mut c = Chain::default();
        c.readable.push((GuestAddress(HDR), 16));
        c.writable.push((GuestAddress(0x80_0000), len));
        c.writable.push((GuestAddress(ST), 1));
        assert_eq!(h.handle(0, &mem, &c).unwrap(), len + 1);
        let mut back = vec![0u8; len as usize];
        mem.read_slice(&mut back, GuestAddress(0x80_0000)).unwrap();
        assert_eq!(back, pattern);
    }
}
