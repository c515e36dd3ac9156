//! The driver's side of a split virtqueue in guest memory: lay the rings
//! out, make chains available, collect used ones. For tests and harnesses
//! that drive a device's [`super::QueueHandler`] through the real queue
//! path ([`super::serve`]) without a guest.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (a receive buffer) rather than device-readable.
    pub write: bool,
}

/// A split virtqueue as the driver sees it.
pub struct DriverRing {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    free: Vec<u16>,
}

impl DriverRing {
    /// Lay out a ring of `size` entries (a power of two) at `base`
    /// (16-byte aligned): descriptors, then the available ring, then the
    /// used ring 4-byte aligned. Zeroes it. Needs `DriverRing::bytes(size)`
    /// of guest memory.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Result<DriverRing, String> {
        if !size.is_power_of_two() {
            return Err(format!("queue size {size} is not a power of two"));
        }
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let zero = vec![0u8; Self::bytes(size) as usize];
        mem.write_slice(&zero, GuestAddress(base))
            .map_err(|e| format!("ring at {base:#x}: {e}"))?;
        Ok(DriverRing {
            desc,
            avail,
            used,
            size,
            avail_idx: 0,
            used_seen: 0,
            free: (0..size).rev().collect(),
        })
    }

    /// Guest memory a ring of `size` entries needs.
    pub fn bytes(size: u16) -> u64 {
        let s = u64::from(size);
        ((16 * s + 6 + 2 * s + 3) & !3) + 6 + 8 * s
    }

    /// The device's view: a ready [`Queue`] over these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("power-of-two size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Make a chain of `bufs` available; returns its head, or None when
    /// the descriptor table is full.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let idx: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= F_NEXT;
                idx[i + 1]
            } else {
                0
            };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.write(mem, self.desc + 16 * u64::from(idx[i]), &d);
        }
        self.publish(mem, idx[0]);
        Some(idx[0])
    }

    /// Make an arbitrary descriptor (index `i`, raw fields) the head of an
    /// available chain, bypassing the free list: for malformed chains.
    pub fn add_raw(
        &mut self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(mem, self.desc + 16 * u64::from(i % self.size), &d);
        self.publish(mem, i % self.size);
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.write(mem, slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.write(mem, self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    /// The next used chain: (head, length written), its descriptors freed.
    pub fn used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let idx = self.read16(mem, self.used + 2);
        if idx == self.used_seen {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(e)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        let head = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u16;
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        // Free the chain.
        let mut i = head;
        for _ in 0..self.size {
            self.free.push(i);
            let d = self.desc + 16 * u64::from(i);
            let flags = self.read16(mem, d + 12);
            if flags & F_NEXT == 0 {
                break;
            }
            i = self.read16(mem, d + 14);
        }
        Some((head, len))
    }

    /// Whether the device wants a kick for new chains
    /// (`VRING_USED_F_NO_NOTIFY` clear).
    pub fn kick_wanted(&self, mem: &GuestMemoryMmap) -> bool {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.read16(mem, self.used) & 1 == 0
    }

    fn read16(&self, mem: &GuestMemoryMmap, a: u64) -> u16 {
        let mut b = [0u8; 2];
        let _ = mem.read_slice(&mut b, GuestAddress(a));
        u16::from_le_bytes(b)
    }

    fn write(&self, mem: &GuestMemoryMmap, a: u64, data: &[u8]) {
        mem.write_slice(data, GuestAddress(a))
            .expect("ring inside guest memory");
    }
}
