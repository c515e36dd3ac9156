//! virtio-net backend-path benchmark: the device model's queue path
//! ([`vcore::devices::virtio::serve`] with a [`NetHandler`]) over a real tap,
//! no guest. A driver-side ring in memory ([`DriverRing`]) stands in for the
//! guest's driver.
//!
//! ```text
//! netbench tx|tso|rx|gen [-i IFNAME] [-c COUNT] [-s SIZE]
//! netbench passt-tx|passt-rx [-c COUNT] [-s SIZE]
//! ```
//!
//! - `tx`: COUNT frames of SIZE bytes (Ethernet, without the virtio header)
//!   from a full 256-entry TX ring into the tap; frames the kernel took are
//!   read back from the tap's statistics (`stack_dropped`: frames the
//!   host stack then discarded, here all plain ones: no protocol takes
//!   ethertype 0x88b5).
//! - `tso`: like `tx` with 64 KiB TCP/IPv4 GSO frames (`NEEDS_CSUM`,
//!   `GSO_TCPV4`, MSS 1448) passed through to the tap (SIZE ignored).
//! - `rx`: a generator thread sends COUNT frames of SIZE bytes into the tap
//!   from a packet socket on its host side as fast as it can; the device
//!   puts them into 256 mergeable 1536-byte RX buffers that are reposted as
//!   they are used.
//! - `passt-tx`: the same TX path into passt (the `-netdev user` backend:
//!   a socket pair, QEMU's stream framing): IPv4/UDP frames to the gateway
//!   address, which passt maps to the host's loopback, where a UDP socket
//!   counts what arrives.
//! - `passt-rx`: a UDP sender on the host floods passt's forwarded port
//!   (`hostfwd=udp::5555-:5555`); passt turns each datagram into a frame
//!   for the guest, which the device puts into mergeable RX buffers.
//!   passt needs an interface with a default route (bench/net.sh makes one).
//! - `gen`: only the generator, on an existing interface IFNAME, COUNT
//!   frames (0: until killed); the packet source for a guest benchmark.
//!
//! Run it as root in a network namespace of its own (bench/net.sh does):
//! it creates tap IFNAME (default nbt0) and brings it up. Prints one line:
//! `MODE size=.. frames=.. secs=.. fps=.. gbit=..` plus counters.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vcore::devices::virtio::net::{
    NetHandler, F_CSUM, F_HOST_TSO4, F_MRG_RXBUF, GSO_TCPV4, HDR_F_NEEDS_CSUM, RXQ, TXQ,
};
use vcore::devices::virtio::ring::{Buf, DriverRing};
use vcore::devices::virtio::{serve, F_VERSION_1};
use vcore::net::{Backend, Tap, HDR_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RING: u64 = 0x10000;
const BUFS: u64 = 0x100000;
const SLOT: u64 = 0x11000; // 68 KiB: a GSO frame with its header
const QSIZE: u16 = 256;

struct Args {
    mode: String,
    ifname: String,
    count: u64,
    size: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        mode: String::new(),
        ifname: "nbt0".into(),
        count: 200_000,
        size: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = |o: &str| it.next().ok_or(format!("{o} needs a value"));
        match x.as_str() {
            "-i" => a.ifname = val("-i")?,
            "-c" => {
                let v = val("-c")?;
                a.count = v.parse().map_err(|_| format!("-c {v}: not a number"))?
            }
            "-s" => {
                let v = val("-s")?;
                a.size = v.parse().map_err(|_| format!("-s {v}: not a number"))?;
                if !(14..=1514).contains(&a.size) {
                    return Err(format!("-s {v}: a frame is 14 to 1514 bytes"));
                }
            }
            "tx" | "tso" | "rx" | "gen" | "passt-tx" | "passt-rx" if a.mode.is_empty() => {
                a.mode = x
            }
            o => return Err(format!("unknown argument '{o}'")),
        }
    }
    if a.mode.is_empty() {
        return Err(
            "usage: netbench tx|tso|rx|gen|passt-tx|passt-rx [-i IFNAME] [-c COUNT] [-s SIZE]"
                .into(),
        );
    }
    Ok(a)
}

fn stat(ifname: &str, name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/statistics/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// An Ethernet frame of `size` bytes: broadcast, ethertype 0x88b5.
fn eth_frame(size: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..size).map(|j| j as u8).collect();
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// Fill a 20-byte IPv4 header (TTL 64, no options, `df`: don't fragment)
/// with its checksum.
fn ipv4_header(ip: &mut [u8], len: usize, proto: u8, src: [u8; 4], dst: [u8; 4], df: bool) {
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    if df {
        ip[6] = 0x40;
    }
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let mut sum = 0u32;
    for c in ip[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// A 64 KiB TCP/IPv4 frame for segmentation by the host, with its header.
fn tso_frame() -> Vec<u8> {
    let payload = 65000usize;
    let ip_len = 20 + 20 + payload;
    let mut f = vec![0u8; HDR_LEN + 14 + ip_len];
    let h = &mut f[..HDR_LEN];
    h[0] = HDR_F_NEEDS_CSUM;
    h[1] = GSO_TCPV4;
    h[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    h[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    let e = &mut f[HDR_LEN..];
    e[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    e[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    e[12..14].copy_from_slice(&[0x08, 0x00]);
    ipv4_header(
        &mut e[14..34],
        ip_len,
        6,
        [10, 99, 0, 2],
        [10, 99, 0, 1],
        true,
    );
    let tcp = &mut e[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    f
}

fn report(mode: &str, size: usize, frames: u64, secs: f64, extra: &str) {
    let fps = frames as f64 / secs;
    let gbit = fps * size as f64 * 8.0 / 1e9;
    println!(
        "{mode} size={size} frames={frames} secs={secs:.3} fps={fps:.0} gbit={gbit:.3} {extra}"
    );
}

/// Keep a 256-entry TX ring full of `frame` (with its header) until the
/// device has used `count` of them: (frames, seconds).
fn drive_tx(
    mem: &GuestMemoryMmap,
    h: &mut NetHandler,
    frame: &[u8],
    count: u64,
) -> Result<(u64, f64), String> {
    let mut ring = DriverRing::new(mem, RING, QSIZE)?;
    let mut q = ring.queue();
    for i in 0..u64::from(QSIZE) {
        mem.write_slice(frame, GuestAddress(BUFS + i * SLOT))
            .map_err(|e| e.to_string())?;
    }
    let start = Instant::now();
    let (mut posted, mut done) = (0u64, 0u64);
    while done < count {
        while ring.free() > 0 && posted < count {
            let b = Buf {
                addr: BUFS + (posted % u64::from(QSIZE)) * SLOT,
                len: frame.len() as u32,
                write: false,
            };
            ring.add(mem, &[b]).ok_or("ring full")?;
            posted += 1;
        }
        serve(TXQ, &mut q, mem, h, None).map_err(|m| m.0)?;
        while ring.used(mem).is_some() {
            done += 1;
        }
    }
    Ok((done, start.elapsed().as_secs_f64()))
}

/// Post 256 mergeable 1536-byte RX buffers and repost each as the device
/// fills it, serving whenever the backend's `fd` polls readable, until
/// `count` frames arrived or the backend stays idle after `done()`:
/// (frames, seconds from the first to the last frame).
fn drive_rx(
    mem: &GuestMemoryMmap,
    h: &mut NetHandler,
    fd: std::os::fd::RawFd,
    count: u64,
    done: impl Fn() -> bool,
) -> Result<(u64, f64), String> {
    let mut ring = DriverRing::new(mem, RING, QSIZE)?;
    let mut q = ring.queue();
    let post = |ring: &mut DriverRing, i: u64| {
        ring.add(
            mem,
            &[Buf {
                addr: BUFS + (i % u64::from(QSIZE)) * 0x800,
                len: 1536,
                write: true,
            }],
        )
        .ok_or("ring full")
    };
    for i in 0..u64::from(QSIZE) {
        post(&mut ring, i)?;
    }
    let (mut got, mut reposted) = (0u64, u64::from(QSIZE));
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, 300) };
        if r == 0 && done() {
            break;
        }
        serve(RXQ, &mut q, mem, h, None).map_err(|m| m.0)?;
        let before = got;
        while ring.used(mem).is_some() {
            got += 1;
            post(&mut ring, reposted)?;
            reposted += 1;
        }
        if got > before {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
        }
        if got >= count {
            break;
        }
    }
    Ok((got, first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0)))
}

fn tx(a: &Args, tap: Arc<Tap>, mem: &GuestMemoryMmap, tso: bool) -> Result<(), String> {
    let acked = F_VERSION_1 | F_MRG_RXBUF | F_CSUM | F_HOST_TSO4;
    let mut h = NetHandler::new(tap, acked);
    let frame = if tso {
        tso_frame()
    } else {
        let mut f = vec![0u8; HDR_LEN];
        f.extend(eth_frame(a.size));
        f
    };
    let (rx0, drop0) = (stat(&a.ifname, "rx_packets"), stat(&a.ifname, "rx_dropped"));
    let (done, secs) = drive_tx(mem, &mut h, &frame, a.count)?;
    let took = stat(&a.ifname, "rx_packets") - rx0;
    let dropped = stat(&a.ifname, "rx_dropped") - drop0;
    let size = frame.len() - HDR_LEN;
    report(
        if tso { "tso" } else { "tx" },
        size,
        done,
        secs,
        &format!("tap_took={took} stack_dropped={dropped}"),
    );
    Ok(())
}

fn packet_socket(ifname: &str) -> Result<OwnedFd, String> {
    let c = std::ffi::CString::new(ifname).map_err(|_| "bad interface name")?;
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(format!("no interface {ifname}"));
    }
    // SAFETY: plain socket(2).
    let s = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(0x0003u16.to_be()),
        )
    };
    if s < 0 {
        return Err(format!(
            "packet socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `s` is a new fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: sockaddr_ll is plain data; zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = 0; // send only: receive nothing
    sa.sll_ifindex = idx as i32;
    // SAFETY: bind(2) reads a sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r != 0 {
        return Err(format!("bind: {}", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

fn rx(a: &Args, tap: Arc<Tap>, mem: &GuestMemoryMmap) -> Result<(), String> {
    let acked = F_VERSION_1 | F_MRG_RXBUF;
    let mut h = NetHandler::new(tap.clone(), acked);
    let sock = packet_socket(&a.ifname)?;
    let frame = eth_frame(a.size);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (stop2, sent2, count) = (stop.clone(), sent.clone(), a.count);
    let tap_drop0 = stat(&a.ifname, "tx_dropped");
    let generator = std::thread::spawn(move || {
        let t = Instant::now();
        let mut n = 0u64;
        while n < count && !stop2.load(Ordering::Relaxed) {
            // SAFETY: send(2) reads `frame` for its length.
            let r = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if r > 0 {
                n += 1;
            }
        }
        sent2.store(n, Ordering::SeqCst);
        t.elapsed().as_secs_f64()
    });
    let fd = tap.fd().ok_or("tap has no fd")?;
    let (got, secs) = drive_rx(mem, &mut h, fd, a.count, || generator.is_finished())?;
    stop.store(true, Ordering::Relaxed);
    let gsecs = generator.join().map_err(|_| "generator panicked")?;
    let sent = sent.load(Ordering::SeqCst);
    let dropped = stat(&a.ifname, "tx_dropped") - tap_drop0;
    report(
        "rx",
        a.size,
        got,
        secs.max(1e-9),
        &format!(
            "generator_sent={sent} generator_fps={:.0} tap_dropped={dropped} device_dropped={}",
            sent as f64 / gsecs.max(1e-9),
            h.rx_dropped
        ),
    );
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}

fn generate(a: &Args) -> Result<(), String> {
    let sock = packet_socket(&a.ifname)?;
    let frame = eth_frame(a.size);
    let mut n = 0u64;
    while a.count == 0 || n < a.count {
        // SAFETY: send(2) reads `frame` for its length.
        let r = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if r > 0 {
            n += 1;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {}
            // The interface went away (or down): the benchmark is over.
            _ => return Err(format!("send on {}: {e}", a.ifname)),
        }
    }
    Ok(())
}

/// The guest's IPv4/UDP frame to the gateway (passt maps it to the host's
/// loopback): `size` bytes of Ethernet frame, UDP port 40000 → `dport`.
fn udp_frame(size: usize, src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let size = size.max(42);
    let mut f = vec![0u8; size];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = size - 14;
    ipv4_header(&mut f[14..34], ip_len, 17, src, dst, false);
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&((ip_len - 20) as u16).to_be_bytes());
    // checksum 0: none (allowed for UDP over IPv4)
    f
}

/// This namespace's address on the interface with the default route, and
/// the gateway: what passt gives the guest.
fn passt_addrs() -> Result<([u8; 4], [u8; 4]), String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "route", "get", "192.0.2.1"])
        .output()
        .map_err(|e| format!("ip route get: {e}"))?;
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let w: Vec<&str> = s.split_whitespace().collect();
    let after = |k: &str| {
        w.iter()
            .position(|x| *x == k)
            .and_then(|i| w.get(i + 1))
            .and_then(|v| v.parse::<std::net::Ipv4Addr>().ok())
            .map(|a| a.octets())
    };
    match (after("src"), after("via")) {
        (Some(src), Some(gw)) => Ok((src, gw)),
        _ => Err(format!("no default route for passt here: {s}")),
    }
}

fn passt_tx(a: &Args, mem: &GuestMemoryMmap) -> Result<(), String> {
    use vcore::net::passt::{Passt, PasstConfig};
    let (src, gw) = passt_addrs()?;
    let sink = std::net::UdpSocket::bind("127.0.0.1:5001").map_err(|e| format!("sink: {e}"))?;
    sink.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let passt = Arc::new(Passt::start("bench", &PasstConfig::default())?);
    let acked = F_VERSION_1 | F_MRG_RXBUF;
    let mut h = NetHandler::new(passt, acked);
    let mut frame = vec![0u8; HDR_LEN];
    frame.extend(udp_frame(a.size, src, gw, 5001));
    let got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (got2, stop2) = (got.clone(), stop.clone());
    let counter = std::thread::spawn(move || {
        let mut b = [0u8; 2048];
        while !stop2.load(Ordering::Relaxed) {
            if sink.recv(&mut b).is_ok() {
                got2.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let start = Instant::now();
    let (done, secs) = drive_tx(mem, &mut h, &frame, a.count)?;
    // Let passt finish what it has read, then count.
    let mut last = got.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = got.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let host_secs = start.elapsed().as_secs_f64() - 0.3;
    stop.store(true, Ordering::Relaxed);
    let _ = counter.join();
    report(
        "passt-tx",
        frame.len() - HDR_LEN,
        done,
        secs,
        &format!(
            "host_got={last} host_fps={:.0}",
            last as f64 / host_secs.max(1e-9)
        ),
    );
    Ok(())
}

fn passt_rx(a: &Args, mem: &GuestMemoryMmap) -> Result<(), String> {
    use vcore::net::passt::{HostFwd, Passt, PasstConfig};
    let (src, gw) = passt_addrs()?;
    let cfg = PasstConfig {
        hostfwd: vec![HostFwd::parse("udp::5555-:5555")?],
        ..Default::default()
    };
    let passt = Arc::new(Passt::start("bench", &cfg)?);
    let acked = F_VERSION_1 | F_MRG_RXBUF;
    let mut h = NetHandler::new(passt.clone(), acked);
    // One frame from the guest first, so passt knows its MAC.
    let mut hello = vec![0u8; HDR_LEN];
    hello.extend(udp_frame(60, src, gw, 9));
    vcore::net::Backend::send(passt.as_ref(), &hello).map_err(|e| e.to_string())?;
    let payload = vec![0x5au8; a.size.saturating_sub(42).max(1)];
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (stop2, sent2, count) = (stop.clone(), sent.clone(), a.count);
    std::thread::sleep(Duration::from_millis(200));
    let generator = std::thread::spawn(move || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("sender");
        let t = Instant::now();
        let mut n = 0u64;
        while n < count * 2 && !stop2.load(Ordering::Relaxed) {
            if s.send_to(&payload, "127.0.0.1:5555").is_ok() {
                n += 1;
            }
        }
        sent2.store(n, Ordering::SeqCst);
        t.elapsed().as_secs_f64()
    });
    let fd = vcore::net::Backend::fd(passt.as_ref()).ok_or("passt has no fd")?;
    let (got, secs) = drive_rx(mem, &mut h, fd, a.count, || generator.is_finished())?;
    stop.store(true, Ordering::Relaxed);
    let gsecs = generator.join().map_err(|_| "generator panicked")?;
    let sent = sent.load(Ordering::SeqCst);
    report(
        "passt-rx",
        a.size.max(42),
        got,
        secs.max(1e-9),
        &format!(
            "host_sent={sent} host_fps={:.0}",
            sent as f64 / gsecs.max(1e-9)
        ),
    );
    Ok(())
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("netbench: {e}");
            std::process::exit(2);
        }
    };
    let r = (|| -> Result<(), String> {
        if a.mode == "gen" {
            return generate(&a);
        }
        if a.mode.starts_with("passt-") {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)])
                .map_err(|e| e.to_string())?;
            return if a.mode == "passt-tx" {
                passt_tx(&a, &mem)
            } else {
                passt_rx(&a, &mem)
            };
        }
        let tap = Arc::new(Tap::open(&a.ifname)?);
        tap.up()?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)])
            .map_err(|e| e.to_string())?;
        match a.mode.as_str() {
            "tx" => tx(&a, tap, &mem, false),
            "tso" => tx(&a, tap, &mem, true),
            _ => rx(&a, tap, &mem),
        }
    })();
    if let Err(e) = r {
        eprintln!("netbench: {e}");
        std::process::exit(1);
    }
}
