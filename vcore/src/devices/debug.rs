//! Ports for test guests and benchmarks.
//!
//! * Debug exit (port 0x501, like QEMU's `isa-debug-exit` address): a write
//!   of value `v` stops the VM and vmrun exits with status `v & 0xff`.
//!   (QEMU's device exits with `(v << 1) | 1`; ours gives the guest the
//!   whole status range, including 0.)
//! * Boot-time markers (port 0x80, like Cloud Hypervisor's debug port):
//!   every write is recorded with the time since the VM started, so a
//!   benchmark can ask when the guest reached a point. Linux also writes
//!   this port for I/O delays; those writes are recorded like any other.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bus::BusDevice;

/// Port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u64 = 0x501;
/// Port of the boot-time marker device.
pub const MARKER_PORT: u64 = 0x80;
/// At most this many markers are kept.
const MAX_MARKERS: usize = 4096;

/// Called with the guest's exit status.
pub type ExitFn = Box<dyn Fn(u8) + Send>;

/// The debug-exit device.
pub struct DebugExit {
    on_exit: ExitFn,
}

impl DebugExit {
    /// A device calling `on_exit` with the status the guest wrote.
    pub fn new(on_exit: ExitFn) -> Self {
        DebugExit { on_exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            (self.on_exit)(v);
        }
    }
}

/// The boot-time marker device; clones share the record.
#[derive(Clone)]
pub struct Markers {
    start: Instant,
    seen: Arc<Mutex<Vec<(Duration, u8)>>>,
}

impl Markers {
    /// A marker record starting now.
    pub fn new() -> Self {
        Markers {
            start: Instant::now(),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Every marker so far: (time since start, value).
    pub fn snapshot(&self) -> Vec<(Duration, u8)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Default for Markers {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for Markers {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() < MAX_MARKERS {
                seen.push((self.start.elapsed(), v));
            }
        }
    }
}
