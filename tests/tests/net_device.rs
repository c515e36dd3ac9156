//! The virtio-net device through the real queue path: a tiny guest
//! (guests/tiny/virtionet.S) drives the rings of vmrun's virtio-net-pci NIC,
//! whose tap lives in a network namespace of the test's own; the test sits
//! on the tap's host side with a packet socket, sends the frames the guest
//! asks for and catches the one it transmits. Checks mergeable RX buffers,
//! TX, the offered offloads and the tap's offloads following what the guest
//! took (TUNSETOFFLOAD), and DEVICE_NEEDS_RESET for a TX chain past RAM
//! and an RX buffer shorter than the header, with the VMM running on and the
//! device working again after a reset.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::bin;

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Option<Netns> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("vtdev{}-{n}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Netns { name })
    }

    /// Move the calling thread (only) into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("netns file");
        // SAFETY: setns(2) on an open namespace fd; it affects this thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A kills-on-drop vmrun.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const ETH_P_ALL: u16 = 0x0003;
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const PACKET_OUTGOING: u8 = 4;

/// A packet socket bound to an interface of the current thread's namespace.
fn packet_socket(ifname: &str) -> OwnedFd {
    let c = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {ifname}");
    // SAFETY: plain socket(2).
    let s = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    assert!(s >= 0, "packet socket: {}", std::io::Error::last_os_error());
    // SAFETY: `s` is a new fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: sockaddr_ll is plain data; zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_ALL.to_be();
    sa.sll_ifindex = idx as i32;
    // SAFETY: bind(2) reads a sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

/// An ethtool "get" value of an interface (`ETHTOOL_GTXCSUM`, ...), read
/// with the SIOCETHTOOL ioctl (no ethtool binary needed).
fn ethtool_get(ifname: &str, cmd: u32) -> u32 {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut u32,
        _pad: [u8; 16],
    }
    let mut val = [cmd, 0u32];
    let mut r = IfReq {
        name: [0; 16],
        data: val.as_mut_ptr(),
        _pad: [0; 16],
    };
    r.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: plain socket(2).
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(s >= 0);
    // SAFETY: `s` is a new fd owned by nobody else.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: SIOCETHTOOL reads the ifreq and reads/writes the
    // ethtool_value it points to, which outlives the call.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), 0x8946, &mut r) };
    assert_eq!(rc, 0, "SIOCETHTOOL: {}", std::io::Error::last_os_error());
    val[1]
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_GTSO: u32 = 0x1e;

/// The 600-byte test frame: broadcast, ethertype 0x88b5, byte j = 7*j.
fn test_frame() -> Vec<u8> {
    let mut f: Vec<u8> = (0..600usize).map(|j| (j * 7) as u8).collect();
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    f[12..14].copy_from_slice(&ETHERTYPE);
    f
}

fn send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: send(2) reads `frame` for its length.
    let r = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        r,
        frame.len() as isize,
        "send: {}",
        std::io::Error::last_os_error()
    );
}

/// Incoming frames of our ethertype seen by the socket so far.
fn received(fd: &OwnedFd) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: sockaddr_ll is plain data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: recvfrom(2) writes at most buf.len() bytes and a
        // sockaddr_ll of at most `sl` bytes.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut sa as *mut libc::sockaddr_ll).cast(),
                &mut sl,
            )
        };
        if n < 0 {
            // A gone interface reports ENETDOWN once before the queue.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENETDOWN) {
                continue;
            }
            return out;
        }
        let f = &buf[..n as usize];
        if sa.sll_pkttype != PACKET_OUTGOING && f.len() >= 14 && f[12..14] == ETHERTYPE {
            out.push(f.to_vec());
        }
    }
}

#[test]
fn tiny_guest_drives_virtio_net_through_a_tap_and_survives_bad_buffers() {
    if !e2e::kvm_available() {
        return;
    }
    if !e2e::is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: needs root and /dev/net/tun");
        return;
    }
    let Some(ns) = Netns::new() else {
        eprintln!("SKIP: cannot create a network namespace (ip netns add)");
        return;
    };
    // No IPv6 on the tap: the kernel would send its own frames (router
    // solicitations, MLD) into the guest's buffers.
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg(
            "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; \
             echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
        )
        .status()
        .expect("run ip netns exec");
    assert!(st.success(), "cannot disable IPv6 in {}", ns.name);
    // This test's thread (and vmrun, its child) in the namespace.
    ns.enter();
    let mut child = Command::new(bin("vmrun"))
        .args([
            "-kernel",
            env!("TINY_VIRTIONET"),
            "-m",
            "64",
            "-netdev",
            "tap,id=n0,ifname=vtt0,script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmrun");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut vm = Vm(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    let mut sock: Option<OwnedFd> = None;
    let mut got = Vec::new();
    let mut offloads = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let frame = test_frame();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = vm.0.kill();
                panic!("the guest stalled; output so far:\n{out}");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        out.push_str(&l);
        out.push('\n');
        if let Some(s) = &sock {
            got.extend(received(s));
        }
        if l == "rx posted" {
            // The guest took CSUM and GUEST_CSUM, no TSO: the tap's
            // offloads (TUNSETOFFLOAD) follow.
            offloads = Some((
                ethtool_get("vtt0", ETHTOOL_GTXCSUM),
                ethtool_get("vtt0", ETHTOOL_GTSO),
            ));
        }
        if matches!(
            l.as_str(),
            "rx posted" | "short rx posted" | "rx posted again"
        ) {
            let s = sock.get_or_insert_with(|| packet_socket("vtt0"));
            send(s, &frame);
        }
    }
    let status = vm.0.wait().expect("wait for vmrun");
    let err = err_thread.join().unwrap();
    let ctx = format!("stdout:\n{out}\nstderr:\n{err}");
    for l in [
        "rx merged 3 buffers ok\n",
        "tx ok\n",
        "tx chain past RAM: NEEDS_RESET ok\n",
        "short rx buffer: NEEDS_RESET ok\n",
        "rx after reset ok\n",
    ] {
        assert!(out.contains(l), "missing {l:?} in {ctx}");
    }
    assert_eq!(status.code(), Some(100), "{ctx}");
    assert!(out.contains("mac=52:54:00:12:34:56\n"), "{ctx}");
    // Offered: CSUM, GUEST_CSUM, MAC, TSO4/6, ECN, MRG_RXBUF, STATUS
    // (low word), VERSION_1 (high word).
    let feats = out
        .lines()
        .find_map(|l| l.strip_prefix("features="))
        .unwrap_or_else(|| panic!("no features line: {ctx}"));
    let (lo, hi) = feats.split_once(' ').expect("two words");
    let lo = u32::from_str_radix(lo, 16).unwrap();
    let hi = u32::from_str_radix(hi, 16).unwrap();
    let want = 1 | 2 | (1 << 5) | (0x7 << 7) | (0x7 << 11) | (1 << 15) | (1 << 16);
    assert_eq!(lo & want, want, "offered {lo:#x}: {ctx}");
    assert_eq!(hi & 1, 1, "VERSION_1: {ctx}");
    assert_eq!(
        offloads,
        Some((1, 0)),
        "tap (tx-checksumming, TSO) while the guest ran: {ctx}"
    );
    // Both faults reported once each, and the VMM went on.
    assert_eq!(
        err.matches("io-net0: malformed request on queue 1").count(),
        1,
        "{ctx}"
    );
    assert_eq!(
        err.matches("io-net0: malformed request on queue 0").count(),
        1,
        "{ctx}"
    );
    assert!(err.contains("outside guest RAM"), "{ctx}");
    assert!(err.contains("shorter than the 12-byte header"), "{ctx}");
    assert!(!err.contains("panicked"), "{ctx}");
    // The guest's frame came out of the tap, header stripped.
    let s = sock.expect("socket opened");
    got.extend(received(&s));
    let mut want = vec![0xffu8; 6];
    want.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    want.extend_from_slice(&ETHERTYPE);
    want.extend_from_slice(b"vmrun-tiny");
    want.resize(60, 0);
    assert!(
        got.contains(&want),
        "the guest's frame did not reach the tap; got {got:02x?}\n{ctx}"
    );
}
