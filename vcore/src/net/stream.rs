//! QEMU's stream network protocol over a connected `AF_UNIX` stream socket:
//! each Ethernet frame is sent as a 4-byte big-endian length followed by the
//! frame. It is what passt speaks (and QEMU's `-netdev stream`).
//!
//! Frames carry no virtio-net header on the wire; the backend adds a zeroed
//! 12-byte header on receive and strips it on send, so the peer must get
//! complete checksums (the device offers no offloads over this backend).

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Backend, HDR_LEN};

/// Largest frame accepted from the peer (passt's MTU is 65520).
pub const MAX_FRAME: usize = 65536;
/// How long a send may wait for the peer to take the rest of a frame whose
/// first bytes already went out (the stream must stay in sync).
const SEND_STALL: Duration = Duration::from_secs(5);
/// How long a send waits for room before the frame is dropped.
const FULL_WAIT_MS: i32 = 5;

/// Receive state: bytes read from the socket, not yet handed out.
struct Rx {
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    start: usize,
    /// End of valid bytes in `buf`.
    end: usize,
    /// The peer closed the stream, or sent a length beyond [`MAX_FRAME`].
    dead: bool,
}

/// A stream-socket backend.
pub struct Stream {
    sock: OwnedFd,
    rx: Mutex<Rx>,
    tx: Mutex<Vec<u8>>,
    peer: String,
}

fn would_block() -> std::io::Error {
    ErrorKind::WouldBlock.into()
}

impl Stream {
    /// Wrap a connected stream socket; `peer` names it in messages.
    pub fn new(sock: OwnedFd, peer: &str) -> std::io::Result<Stream> {
        set_nonblocking(sock.as_raw_fd())?;
        Ok(Stream {
            sock,
            rx: Mutex::new(Rx {
                buf: vec![0u8; 2 * (MAX_FRAME + 4)],
                start: 0,
                end: 0,
                dead: false,
            }),
            tx: Mutex::new(Vec::with_capacity(MAX_FRAME + 4)),
            peer: peer.to_string(),
        })
    }

    /// Connect to a listening unix socket (`-netdev stream,addr.type=unix`).
    pub fn connect(path: &Path) -> Result<Stream, String> {
        let s = UnixStream::connect(path).map_err(|e| {
            let hint = match e.kind() {
                ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
                    " (is the server, e.g. passt, running?)"
                }
                _ => "",
            };
            format!("cannot connect to {}: {e}{hint}", path.display())
        })?;
        Stream::new(s.into(), &path.display().to_string())
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// What the stream is connected to.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the peer closed the stream (or broke the protocol).
    pub fn is_dead(&self) -> bool {
        self.rx.lock().map(|r| r.dead).unwrap_or(true)
    }

    fn read_more(&self, rx: &mut Rx) -> std::io::Result<usize> {
        if rx.start > 0 && rx.start == rx.end {
            rx.start = 0;
            rx.end = 0;
        }
        if rx.end == rx.buf.len() {
            // Move the partial frame to the front to make room.
            rx.buf.copy_within(rx.start..rx.end, 0);
            rx.end -= rx.start;
            rx.start = 0;
        }
        let room = &mut rx.buf[rx.end..];
        // SAFETY: `room` is writable for its length; the fd is open.
        let r = unsafe { libc::read(self.sock.as_raw_fd(), room.as_mut_ptr().cast(), room.len()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r == 0 {
            rx.dead = true;
            return Ok(0);
        }
        rx.end += r as usize;
        Ok(r as usize)
    }

    fn write_all_stalling(&self, mut data: &[u8]) -> std::io::Result<()> {
        let first = data.len();
        let mut waited = false;
        let deadline = Instant::now() + SEND_STALL;
        while !data.is_empty() {
            // SAFETY: `data` is readable for its length; the fd is open.
            let r = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::Interrupted => continue,
                    ErrorKind::WouldBlock if data.len() == first => {
                        // The peer is behind: wait a little for room, as a
                        // NIC's queue would, before dropping the frame.
                        if waited {
                            return Err(e);
                        }
                        waited = true;
                        let mut p = libc::pollfd {
                            fd: self.sock.as_raw_fd(),
                            events: libc::POLLOUT,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        unsafe { libc::poll(&mut p, 1, FULL_WAIT_MS) };
                        continue;
                    }
                    ErrorKind::WouldBlock => {
                        // Part of the frame is out: finish it or the
                        // stream loses its framing.
                        if Instant::now() > deadline {
                            return Err(std::io::Error::new(
                                ErrorKind::TimedOut,
                                format!("{} stopped taking frames", self.peer),
                            ));
                        }
                        let mut p = libc::pollfd {
                            fd: self.sock.as_raw_fd(),
                            events: libc::POLLOUT,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        unsafe { libc::poll(&mut p, 1, 100) };
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            data = &data[r as usize..];
        }
        Ok(())
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an open fd.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Backend for Stream {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut rx = self.rx.lock().map_err(|_| would_block())?;
        loop {
            if rx.dead {
                return Err(would_block());
            }
            let avail = rx.end - rx.start;
            if avail >= 4 {
                let s = rx.start;
                let len =
                    u32::from_be_bytes([rx.buf[s], rx.buf[s + 1], rx.buf[s + 2], rx.buf[s + 3]])
                        as usize;
                if len > MAX_FRAME {
                    rx.dead = true;
                    return Err(std::io::Error::new(
                        ErrorKind::InvalidData,
                        format!("{} sent a {len}-byte frame", self.peer),
                    ));
                }
                if avail >= 4 + len {
                    if HDR_LEN + len > buf.len() {
                        // Cannot hand it out whole: drop it.
                        rx.start += 4 + len;
                        continue;
                    }
                    buf[..HDR_LEN].fill(0);
                    buf[HDR_LEN..HDR_LEN + len].copy_from_slice(&rx.buf[s + 4..s + 4 + len]);
                    rx.start += 4 + len;
                    return Ok(HDR_LEN + len);
                }
            }
            if self.read_more(&mut rx)? == 0 {
                return Err(would_block());
            }
        }
    }

    fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() < HDR_LEN {
            return Err(ErrorKind::InvalidInput.into());
        }
        let frame = &buf[HDR_LEN..];
        if frame.len() > MAX_FRAME {
            return Err(ErrorKind::InvalidInput.into());
        }
        let mut tx = self.tx.lock().map_err(|_| would_block())?;
        tx.clear();
        tx.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        tx.extend_from_slice(frame);
        self.write_all_stalling(&tx)?;
        Ok(buf.len())
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn pair() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::new(a.into(), "test peer").unwrap(), b)
    }

    #[test]
    fn send_prefixes_length_and_strips_header() {
        let (s, mut peer) = pair();
        let mut f = vec![0xaau8; HDR_LEN];
        f.extend_from_slice(&[1, 2, 3, 4, 5]);
        assert_eq!(s.send(&f).unwrap(), f.len());
        let mut got = [0u8; 9];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, [0, 0, 0, 5, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn recv_reassembles_frames_split_anyhow() {
        let (s, mut peer) = pair();
        let mut buf = vec![0u8; HDR_LEN + MAX_FRAME];
        assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
        // Two frames, written byte by byte across the length prefix.
        let mut wire = Vec::new();
        for f in [&[9u8, 8, 7][..], &[6u8; 1500][..]] {
            wire.extend_from_slice(&(f.len() as u32).to_be_bytes());
            wire.extend_from_slice(f);
        }
        peer.write_all(&wire[..2]).unwrap();
        assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
        peer.write_all(&wire[2..10]).unwrap();
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(n, HDR_LEN + 3);
        assert_eq!(&buf[..HDR_LEN], &[0u8; HDR_LEN]);
        assert_eq!(&buf[HDR_LEN..n], &[9, 8, 7]);
        peer.write_all(&wire[10..]).unwrap();
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(n, HDR_LEN + 1500);
        assert!(buf[HDR_LEN..n].iter().all(|&b| b == 6));
        assert!(!s.is_dead());
        drop(peer);
        assert!(s.recv(&mut buf).is_err());
        assert!(s.is_dead());
    }

    #[test]
    fn oversized_length_kills_the_stream_not_the_process() {
        let (s, mut peer) = pair();
        peer.write_all(&0x7fff_ffffu32.to_be_bytes()).unwrap();
        let mut buf = vec![0u8; HDR_LEN + MAX_FRAME];
        assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::InvalidData);
        assert!(s.is_dead());
    }

    #[test]
    fn many_frames_in_one_read() {
        let (s, mut peer) = pair();
        let mut wire = Vec::new();
        for i in 0..100u32 {
            wire.extend_from_slice(&60u32.to_be_bytes());
            wire.extend_from_slice(&[i as u8; 60]);
        }
        peer.write_all(&wire).unwrap();
        let mut buf = vec![0u8; HDR_LEN + MAX_FRAME];
        for i in 0..100u8 {
            let n = s.recv(&mut buf).unwrap();
            assert_eq!(n, HDR_LEN + 60);
            assert_eq!(buf[HDR_LEN], i);
        }
        assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    }

    #[test]
    fn connect_to_nothing_is_a_clear_error() {
        let e = Stream::connect(Path::new("/nonexistent/passt.socket"))
            .err()
            .unwrap();
        assert!(
            e.contains("cannot connect to /nonexistent/passt.socket"),
            "{e}"
        );
    }
}
