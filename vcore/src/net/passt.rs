//! User-mode networking through passt (<https://passt.top>): no root, no
//! tap. vmrun starts `passt` with one end of a socket pair (`--fd`), and
//! moves frames over it with QEMU's stream protocol ([`super::stream`]).
//! passt gives the guest the host's address by DHCP, maps the gateway
//! address to the host, and forwards host ports (`hostfwd`) into the guest.
//!
//! passt runs in the foreground as vmrun's child, dies with vmrun
//! (`PR_SET_PDEATHSIG`), and is stopped when the backend is dropped.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::stream::Stream;
use super::Backend;

/// A port forward: host port → guest port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    /// `true` for UDP, `false` for TCP.
    pub udp: bool,
    /// Host address to bind ("" = all).
    pub host_addr: String,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl HostFwd {
    /// Parse QEMU's `hostfwd=[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`.
    pub fn parse(s: &str) -> Result<HostFwd, String> {
        let bad = || {
            format!(
                "invalid host forwarding rule '{s}' (expected \
                 [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport)"
            )
        };
        let (proto, rest) = match s.split_once(':') {
            Some((p, r)) if p == "tcp" || p == "udp" || p.is_empty() => (p, r),
            _ => return Err(bad()),
        };
        let (host, guest) = rest.split_once('-').ok_or_else(bad)?;
        let (host_addr, hp) = host.rsplit_once(':').ok_or_else(bad)?;
        let (_guest_addr, gp) = guest.rsplit_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|&n| n != 0);
        Ok(HostFwd {
            udp: proto == "udp",
            host_addr: host_addr.to_string(),
            host_port: port(hp).ok_or_else(bad)?,
            guest_port: port(gp).ok_or_else(bad)?,
        })
    }

    /// passt's `-t`/`-u` SPEC: `[addr/]hostport:guestport`.
    pub fn passt_spec(&self) -> String {
        let addr = if self.host_addr.is_empty() {
            String::new()
        } else {
            format!("{}/", self.host_addr)
        };
        format!("{addr}{}:{}", self.host_port, self.guest_port)
    }
}

/// What to ask passt for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasstConfig {
    /// The passt binary ("" = `passt` from PATH).
    pub program: PathBuf,
    /// Port forwards.
    pub hostfwd: Vec<HostFwd>,
    /// Address given to the guest (`-a`), else the host's.
    pub address: Option<String>,
    /// Netmask in bits or dotted (`-n`).
    pub netmask: Option<String>,
    /// Gateway (`-g`).
    pub gateway: Option<String>,
    /// DNS server (`-D`).
    pub dns: Option<String>,
    /// IPv4 only (`-4`) / IPv6 only (`-6`).
    pub ipv4_only: bool,
    /// IPv6 only.
    pub ipv6_only: bool,
    /// A log file for passt (`--debug -l`); without it passt's messages go
    /// to a private file read back if passt fails to start.
    pub log: Option<PathBuf>,
}

impl PasstConfig {
    /// passt's arguments (after the program), for a socket at fd 3.
    pub fn args(&self, log: &Path) -> Vec<String> {
        let mut a: Vec<String> = vec!["--foreground".into(), "--fd".into(), "3".into()];
        if self.log.is_some() {
            a.push("--debug".into());
        } else {
            a.push("--quiet".into());
        }
        a.push("--log-file".into());
        a.push(log.display().to_string());
        if self.ipv4_only {
            a.push("--ipv4-only".into());
        }
        if self.ipv6_only {
            a.push("--ipv6-only".into());
        }
        for (flag, v) in [
            ("--address", &self.address),
            ("--netmask", &self.netmask),
            ("--gateway", &self.gateway),
            ("--dns", &self.dns),
        ] {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v.clone());
            }
        }
        for f in &self.hostfwd {
            a.push(if f.udp { "--udp-ports" } else { "--tcp-ports" }.into());
            a.push(f.passt_spec());
        }
        a
    }
}

/// A running passt and the stream to it.
pub struct Passt {
    stream: Stream,
    child: Mutex<Child>,
    log: PathBuf,
    own_log: bool,
}

/// Find `name` in PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn read_log(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

impl Passt {
    /// Start passt. `id` names the netdev in messages and the log file.
    pub fn start(id: &str, cfg: &PasstConfig) -> Result<Passt, String> {
        let program = if cfg.program.as_os_str().is_empty() {
            which("passt").ok_or_else(|| {
                "user-mode networking needs passt, which is not installed \
                 (Debian/Ubuntu: apt install passt; Fedora: dnf install passt)"
                    .to_string()
            })?
        } else {
            cfg.program.clone()
        };
        let (own_log, log) = match &cfg.log {
            Some(l) => (false, l.clone()),
            None => (
                true,
                std::env::temp_dir().join(format!("vmrun-passt-{}-{id}.log", std::process::id())),
            ),
        };
        let _ = std::fs::remove_file(&log);
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| format!("socketpair for passt: {e}"))?;
        let theirs: OwnedFd = theirs.into();
        let tfd = theirs.as_raw_fd();
        let mut cmd = Command::new(&program);
        cmd.args(cfg.args(&log))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe calls (dup2, fcntl, prctl).
        unsafe {
            cmd.pre_exec(move || {
                if tfd == 3 {
                    let fl = libc::fcntl(3, libc::F_GETFD);
                    if fl < 0 || libc::fcntl(3, libc::F_SETFD, fl & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(tfd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        drop(theirs);
        // passt reads its configuration and exits at once on a bad one: give
        // it a moment, so the error reaches the user before the guest runs.
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                let msg = read_log(&log);
                if own_log {
                    let _ = std::fs::remove_file(&log);
                }
                let hint = if msg.contains("External interface not usable") {
                    " (passt needs a host interface with a default route, and this host or \
                     network namespace has none)"
                } else {
                    ""
                };
                return Err(format!(
                    "passt exited at start ({st}){}{hint}",
                    if msg.is_empty() {
                        String::new()
                    } else {
                        format!(": {msg}")
                    }
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let stream = Stream::new(ours.into(), "passt").map_err(|e| format!("passt socket: {e}"))?;
        Ok(Passt {
            stream,
            child: Mutex::new(child),
            log,
            own_log,
        })
    }

    /// passt's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().ok().map(|c| c.id())
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            // SAFETY: kill(2) with our child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let _ = c.wait();
        }
        if self.own_log {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

impl Backend for Passt {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.recv(buf)
    }
    fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.send(buf)
    }
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.stream.fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfwd_rules() {
        let f = HostFwd::parse("tcp::2222-:22").unwrap();
        assert_eq!(
            f,
            HostFwd {
                udp: false,
                host_addr: String::new(),
                host_port: 2222,
                guest_port: 22
            }
        );
        assert_eq!(f.passt_spec(), "2222:22");
        let f = HostFwd::parse("udp:127.0.0.1:5353-10.0.2.15:53").unwrap();
        assert!(f.udp);
        assert_eq!(f.passt_spec(), "127.0.0.1/5353:53");
        assert_eq!(
            HostFwd::parse(":127.0.0.1:80-:8080").unwrap().guest_port,
            8080
        );
        for bad in [
            "",
            "tcp:2222-:22",
            "sctp::1-:2",
            "tcp::0-:22",
            "tcp::22-:x",
            "tcp::70000-:1",
        ] {
            let e = HostFwd::parse(bad).unwrap_err();
            assert!(e.contains("invalid host forwarding rule"), "{bad}: {e}");
        }
    }

    #[test]
    fn passt_arguments() {
        let c = PasstConfig {
            hostfwd: vec![
                HostFwd::parse("tcp::2222-:22").unwrap(),
                HostFwd::parse("udp::5000-:5000").unwrap(),
            ],
            address: Some("10.0.2.15".into()),
            ipv4_only: true,
            ..Default::default()
        };
        let a = c.args(Path::new("/tmp/p.log"));
        assert_eq!(
            a.join(" "),
            "--foreground --fd 3 --quiet --log-file /tmp/p.log --ipv4-only --address 10.0.2.15 \
             --tcp-ports 2222:22 --udp-ports 5000:5000"
        );
    }

    #[test]
    fn missing_passt_is_named() {
        let c = PasstConfig {
            program: "/nonexistent/passt".into(),
            ..Default::default()
        };
        let e = Passt::start("n0", &c).err().unwrap();
        assert!(e.contains("cannot start /nonexistent/passt"), "{e}");
    }

    /// A real passt, when installed: it must take the socket and stay up,
    /// and answer a DHCP discover with an offer.
    #[test]
    fn real_passt_answers_dhcp() {
        if which("passt").is_none() {
            eprintln!("SKIP: passt is not installed");
            return;
        }
        let p = match Passt::start("t0", &PasstConfig::default()) {
            Ok(p) => p,
            // passt needs an interface with a default route to take its
            // addresses from; a build sandbox may have none.
            Err(e) if e.contains("exited at start") => {
                eprintln!("SKIP: passt cannot run here: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(p.pid().is_some());
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let mut f = vec![0u8; super::super::HDR_LEN];
        f.extend_from_slice(&dhcp_discover(&mac));
        p.send(&f).unwrap();
        let mut buf = vec![0u8; 70000];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match p.recv(&mut buf) {
                Ok(n) => {
                    let fr = &buf[super::super::HDR_LEN..n];
                    // An IPv4 UDP frame to the guest's MAC from port 67.
                    if fr.len() > 42
                        && fr[..6] == mac
                        && fr[12..14] == [8, 0]
                        && fr[23] == 17
                        && fr[34..36] == 67u16.to_be_bytes()
                    {
                        break;
                    }
                }
                Err(_) => {
                    assert!(Instant::now() < deadline, "no DHCP offer from passt");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// A minimal DHCPDISCOVER in an Ethernet frame.
    fn dhcp_discover(mac: &[u8; 6]) -> Vec<u8> {
        let mut bootp = vec![0u8; 240];
        bootp[0] = 1; // BOOTREQUEST
        bootp[1] = 1; // Ethernet
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        bootp[28..34].copy_from_slice(mac);
        bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
        bootp.extend_from_slice(&[53, 1, 1, 255]);
        let udp_len = 8 + bootp.len();
        let mut udp = Vec::new();
        udp.extend_from_slice(&68u16.to_be_bytes());
        udp.extend_from_slice(&67u16.to_be_bytes());
        udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]); // no UDP checksum (allowed in IPv4)
        udp.extend_from_slice(&bootp);
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
        let mut sum = 0u32;
        for c in ip.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let ck = !(sum as u16);
        ip[10..12].copy_from_slice(&ck.to_be_bytes());
        ip.extend_from_slice(&udp);
        let mut eth = vec![0xff; 6];
        eth.extend_from_slice(mac);
        eth.extend_from_slice(&[8, 0]);
        eth.extend_from_slice(&ip);
        eth
    }
}
