//! Run control shared by the vCPU threads, the monitor and the VMM: pause
//! and resume, stop requests, and which thread runs each vCPU.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::VmExit;

/// Whether the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

impl RunState {
    /// QEMU's name for the state (`query-status`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        }
    }
}

/// Shared run control of one VM.
pub struct VmControl {
    state: Mutex<RunState>,
    cv: Condvar,
    stop: AtomicBool,
    parked: AtomicUsize,
    threads: Mutex<Vec<Option<(i32, libc::pthread_t)>>>,
    events: Mutex<Sender<VmExit>>,
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

impl VmControl {
    pub(crate) fn new(vcpus: usize, events: Sender<VmExit>) -> Self {
        VmControl {
            state: Mutex::new(RunState::Running),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            threads: Mutex::new(vec![None; vcpus]),
            events: Mutex::new(events),
        }
    }

    /// Current state.
    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Thread ids of the vCPUs, by index (0 until a thread has started).
    pub fn vcpu_tids(&self) -> Vec<i32> {
        let t = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        t.iter()
            .map(|x| x.map(|(tid, _)| tid).unwrap_or(0))
            .collect()
    }

    /// Ask the VM to stop with `exit` (monitor `quit`, `system_reset`, Ctrl-a x).
    pub fn request_exit(&self, exit: VmExit) {
        let _ = self.events.lock().map(|tx| tx.send(exit));
    }

    pub(crate) fn register(&self, index: u32, tid: i32) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut t = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = t.get_mut(index as usize) {
            *slot = Some((tid, me));
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn kick_all(&self) {
        let t = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for (_, th) in t.iter().flatten() {
            // SAFETY: the thread was registered by itself and stays alive
            // until the VM's threads are joined after `stop`; the kick
            // signal has a no-op handler.
            unsafe { libc::pthread_kill(*th, kick_signal()) };
        }
    }

    /// Called by a vCPU thread before entering the guest: blocks while the
    /// VM is paused. Returns false when the VM is stopping.
    pub(crate) fn wait_runnable(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *st == RunState::Paused && !self.stopping() {
            self.parked.fetch_add(1, Ordering::SeqCst);
            while *st == RunState::Paused && !self.stopping() {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
        !self.stopping()
    }

    /// Pause every vCPU and wait (up to 2 s) until all are out of the guest.
    pub fn pause(&self) {
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if *st == RunState::Paused {
                return;
            }
            *st = RunState::Paused;
        }
        let n = self
            .threads
            .lock()
            .map(|t| t.iter().flatten().count())
            .unwrap_or(0);
        let start = Instant::now();
        while self.parked.load(Ordering::SeqCst) < n && start.elapsed() < Duration::from_secs(2) {
            self.kick_all();
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Resume the vCPUs.
    pub fn resume(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *st = RunState::Running;
        self.cv.notify_all();
    }

    /// Stop for good: wake paused vCPUs and kick the running ones.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        {
            let _st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
        self.kick_all();
    }
}

#[cfg(test)]
impl VmControl {
    /// A control for monitor tests, with no vCPU threads.
    pub(crate) fn new_for_test(vcpus: usize, events: Sender<VmExit>) -> Self {
        Self::new(vcpus, events)
    }
}
