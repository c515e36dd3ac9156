//! The serial console on the terminal: raw mode, input to the UART, and
//! QEMU's `Ctrl-a` escapes when `-nographic` multiplexes the console and the
//! monitor on stdio.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use vcore::devices::serial::SerialDevice;
use vcore::monitor::{banner, hmp, MonitorCtx};
use vcore::vm::VmExit;

/// Raw mode on stdin for as long as this lives.
pub struct RawTerminal {
    saved: Option<Termios>,
}

impl RawTerminal {
    /// Put stdin in raw mode (keeping Ctrl-C as a signal, as QEMU does) if it
    /// is a terminal.
    pub fn enable() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return RawTerminal { saved: None };
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        raw.local_flags |= LocalFlags::ISIG;
        raw.output_flags = saved.output_flags; // keep \n → \r\n on output
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawTerminal { saved: None };
        }
        RawTerminal { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, t);
        }
    }
}

const HELP: &str = "\r\nC-a h    print this help\r\nC-a x    exit emulator\r\n\
C-a c    switch between console and monitor\r\nC-a C-a  sends C-a\r\n";

/// The UART of the VM that runs now (replaced when the guest reboots).
pub type SerialSlot = Arc<Mutex<Option<Arc<Mutex<SerialDevice>>>>>;

fn feed(slot: &SerialSlot, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let serial = slot.lock().ok().and_then(|s| s.clone());
        let Some(serial) = serial else { return };
        let n = serial
            .lock()
            .map(|mut s| s.enqueue_input(bytes))
            .unwrap_or(bytes.len());
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// What stdin drives.
pub struct StdinTargets {
    /// The UART, when the serial console is on stdio.
    pub serial: Option<SerialSlot>,
    /// The monitor, when it is on stdio.
    pub monitor: Option<Arc<MonitorCtx>>,
    /// `-nographic`: Ctrl-a escapes switch between the two.
    pub mux: bool,
}

fn print(s: &str) {
    let mut o = std::io::stdout();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

/// Forward stdin to the UART and/or the monitor, on a thread named `console`.
pub fn spawn_stdin(t: StdinTargets) {
    let _ = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            let mut escape = false;
            // Without a serial console on stdio, stdin is the monitor's.
            let mut in_monitor = t.serial.is_none();
            let mut line = String::new();
            if in_monitor {
                if let Some(m) = &t.monitor {
                    print(&format!("{}(qemu) ", banner(m)));
                }
            }
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut to_guest = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if t.mux && escape {
                        escape = false;
                        match b {
                            b'x' | b'X' => {
                                print("QEMU: Terminated\r\n");
                                if let Some(m) = &t.monitor {
                                    m.control().request_exit(VmExit::Quit);
                                }
                                return;
                            }
                            b'h' | b'?' => print(HELP),
                            b'c' | b'C' if t.monitor.is_some() && t.serial.is_some() => {
                                in_monitor = !in_monitor;
                                if in_monitor {
                                    if let Some(m) = &t.monitor {
                                        print(&format!("\r\n{}(qemu) ", banner(m)));
                                    }
                                }
                            }
                            0x01 if !in_monitor => to_guest.push(0x01),
                            _ => {}
                        }
                        continue;
                    }
                    if t.mux && b == 0x01 {
                        escape = true;
                        continue;
                    }
                    if !in_monitor {
                        to_guest.push(b);
                        continue;
                    }
                    // Monitor line editing (raw mode: we echo).
                    match b {
                        b'\r' | b'\n' => {
                            if b == b'\n' && line.is_empty() && t.mux {
                                continue;
                            }
                            if t.mux {
                                print("\r\n");
                            }
                            if let Some(m) = &t.monitor {
                                let r = hmp::execute(m, &line);
                                print(&r.output);
                                if r.quit {
                                    return;
                                }
                                print("(qemu) ");
                            }
                            line.clear();
                        }
                        0x7f | 0x08 => {
                            let erased = line.pop().is_some();
                            if erased && t.mux {
                                print("\x08 \x08");
                            }
                        }
                        c if c >= 0x20 => {
                            line.push(c as char);
                            if t.mux {
                                print(&(c as char).to_string());
                            }
                        }
                        _ => {}
                    }
                }
                if let Some(s) = &t.serial {
                    feed(s, &to_guest);
                }
            }
        });
}

/// The serial port on a Unix socket (`-serial unix:PATH,server,nowait`):
/// output goes to the connected client (dropped while none is), the
/// client's input goes to the UART. One client at a time; a new one
/// replaces the old.
#[derive(Clone, Default)]
pub struct UnixSerial {
    client: Arc<Mutex<Option<std::os::unix::net::UnixStream>>>,
}

impl Write for UnixSerial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = c.as_mut() {
            if s.write_all(buf).is_err() {
                *c = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Listen on `path`; with `wait`, block until the first client connects
/// (QEMU's default without `nowait`).
pub fn serve_serial_unix(
    path: &std::path::Path,
    slot: SerialSlot,
    wait: bool,
) -> std::io::Result<UnixSerial> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    let out = UnixSerial::default();
    let attach = |conn: std::os::unix::net::UnixStream, out: &UnixSerial, slot: SerialSlot| {
        if let Ok(w) = conn.try_clone() {
            *out.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
        }
        let _ = std::thread::Builder::new()
            .name("serial-in".into())
            .spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 256];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    feed(&slot, &buf[..n]);
                }
            });
    };
    if wait {
        let (conn, _) = listener.accept()?;
        attach(conn, &out, slot.clone());
    }
    let o = out.clone();
    std::thread::Builder::new()
        .name("serial-accept".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                attach(conn, &o, slot.clone());
            }
        })?;
    Ok(out)
}
