//! The serial console on the terminal: raw mode, input to the UART, and
//! QEMU's `Ctrl-a` escapes when `-nographic` multiplexes stdio.

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use vcore::devices::serial::SerialDevice;
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

const HELP: &str =
    "\r\nC-a h    print this help\r\nC-a x    exit emulator\r\nC-a C-a  sends C-a\r\n";

fn feed(serial: &Arc<Mutex<SerialDevice>>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
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

/// Forward stdin to the UART on a thread named `console`. With `mux`,
/// `Ctrl-a x` quits and `Ctrl-a h` prints help.
pub fn spawn_stdin(serial: Arc<Mutex<SerialDevice>>, stop: Sender<VmExit>, mux: bool) {
    let _ = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            let mut escape = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if !mux {
                        out.push(b);
                    } else if escape {
                        escape = false;
                        match b {
                            b'x' | b'X' => {
                                eprint!("QEMU: Terminated\r\n");
                                let _ = stop.send(VmExit::Quit);
                                return;
                            }
                            b'h' | b'?' => eprint!("{HELP}"),
                            0x01 => out.push(0x01),
                            _ => {}
                        }
                    } else if b == 0x01 {
                        escape = true;
                    } else {
                        out.push(b);
                    }
                }
                feed(&serial, &out);
            }
        });
}
