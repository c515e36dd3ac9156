//! vmrun networking: option errors, a missing passt, a missing bridge, and
//! one run that boots three Linux guests at once, each in a network mode of
//! its own, all inside network namespaces this test creates:
//!
//! - **bridge**: guest A on a bridge (`-netdev bridge`),
//! - **tap + script**: guest B on a tap that the test's `script=` hook puts
//!   on the same bridge (the `downscript=` runs when vmrun ends),
//! - **NAT**: the bridge is made by `docs/examples/vmrun-nat.sh` (dnsmasq,
//!   nftables masquerade) in namespace "nat"; a second namespace plays the
//!   outside world,
//! - **user**: guest C through passt (`-nic user,hostfwd=...`) in a third
//!   namespace.
//!
//! On this nested KVM host Linux user space cannot run, so the guests prove
//! the data path from the kernel: DHCP by kernel IP autoconfiguration
//! (`ip=dhcp`) and the kernel's own log sent over UDP by netconsole — to the
//! outside namespace through the NAT (the listener sees the masqueraded
//! source), and to the host's loopback through passt. tcpdump on the bridge
//! counts each guest's DHCP frames. With hardware KVM the init script also
//! pings and fetches a file over HTTP, and that is checked too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{bin, vmrun};

#[test]
fn netdev_usage_errors() {
    let (rc, _, err) = vmrun(&[
        "-kernel",
        "/nonexistent",
        "-device",
        "vfio-pci,host=01:00.0",
    ]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("device passthrough is not supported"), "{err}");
    for (args, want) in [
        (
            &[
                "-netdev",
                "tap,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,mac=zz:00:00:00:00:00",
            ][..],
            "is not a MAC address",
        ),
        (
            &["-nic", "user,hostfwd=tcp:22"][..],
            "invalid host forwarding rule",
        ),
        (
            &["-netdev", "slirp,id=n0"][..],
            "network backend 'slirp' is not supported",
        ),
        (&["-nic", "user,ipv4=off,ipv6=off"][..], "leave nothing"),
    ] {
        let mut a = vec!["-kernel", "/nonexistent"];
        a.extend_from_slice(args);
        let (rc, _, err) = vmrun(&a);
        assert_eq!(rc, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn missing_passt_is_a_clear_error() {
    if !e2e::kvm_available() {
        return;
    }
    let out = Command::new(bin("vmrun"))
        .args(["-kernel", env!("TINY_HELLO"), "-m", "32", "-nic", "user"])
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("user-mode networking needs passt, which is not installed"),
        "{err}"
    );
    let (rc, _, err) = vmrun(&[
        "-kernel",
        env!("TINY_HELLO"),
        "-m",
        "32",
        "-netdev",
        "stream,id=s0,addr.type=unix,addr.path=/nonexistent/passt.socket",
        "-device",
        "virtio-net-pci,netdev=s0",
    ]);
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains("netdev s0: cannot connect to /nonexistent/passt.socket"),
        "{err}"
    );
}

fn tool(names: &[&str]) -> Option<PathBuf> {
    for n in names {
        for d in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
            let p = Path::new(d).join(n);
            if p.exists() {
                return Some(p);
            }
        }
    }
    None
}

/// A network namespace, deleted (with what runs in it) on drop.
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("vt{tag}{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        if ok {
            ns.ip(&["link", "set", "lo", "up"]);
        }
        ok.then_some(ns)
    }
    fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .status()
            .expect("run ip");
        assert!(st.success(), "ip -n {} {args:?} failed", self.name);
    }
    fn exec(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }
    fn spawn(&mut self, mut c: Command) {
        self.children
            .push(c.spawn().expect("start a helper in the namespace"));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: kill(2) on our child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(300));
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn bridge_that_does_not_exist_is_named() {
    if !e2e::is_root() || !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: needs root and /dev/net/tun");
        return;
    }
    let Some(ns) = Netns::new("nb") else {
        eprintln!("SKIP: cannot create a network namespace (ip netns add)");
        return;
    };
    let out = ns
        .exec(bin("vmrun"))
        .args([
            "-kernel",
            "/nonexistent",
            "-netdev",
            "bridge,id=n0,br=nosuchbr0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bridge 'nosuchbr0' does not exist"), "{err}");
}

#[test]
fn tap_without_privileges_says_what_is_needed() {
    if !e2e::is_root() || tool(&["setpriv"]).is_none() {
        eprintln!("SKIP: needs root and setpriv to run vmrun as nobody");
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("vmrun"))
        .args([
            "-kernel",
            "/nonexistent",
            "-netdev",
            "tap,id=n0,script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Permission denied") && err.contains(&bin("vmrun").display().to_string()) {
        eprintln!("SKIP: nobody cannot execute {}", bin("vmrun").display());
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("netdev n0: "), "{err}");
    assert!(err.contains("(needs root or CAP_NET_ADMIN)"), "{err}");
}

/// A UDP (and optional HTTP) listener run by python3: writes one line per
/// datagram, `PORT SRCIP TEXT`, to `log`.
fn listener(ns: &mut Netns, addr: &str, ports: &[u16], log: &Path, http_dir: Option<&Path>) {
    let script = format!(
        r#"
import socket, select, sys, threading, http.server, functools, os
socks = []
for p in {ports:?}:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("{addr}", p))
    socks.append((p, s))
http_dir = {http:?}
if http_dir:
    h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=http_dir)
    srv = http.server.ThreadingHTTPServer(("{addr}", 8000), h)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
out = open("{log}", "a", buffering=1)
out.write("ready\n")
while True:
    r, _, _ = select.select([s for _, s in socks], [], [])
    for p, s in socks:
        if s in r:
            data, src = s.recvfrom(65536)
            for line in data.decode("utf-8", "replace").splitlines():
                out.write("%d %s %s\n" % (p, src[0], line))
"#,
        log = log.display(),
        http = http_dir
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
    );
    let mut c = ns.exec("python3");
    c.args(["-u", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    ns.spawn(c);
    let t = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("ready")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "listener did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Guest {
    name: &'static str,
    child: Child,
    serial: PathBuf,
    stderr: PathBuf,
}

impl Guest {
    fn start(
        name: &'static str,
        ns: &Netns,
        dir: &Path,
        tmp: &Path,
        append: &str,
        net: &[&str],
    ) -> Guest {
        let serial = tmp.join(format!("{name}.serial"));
        let stderr = tmp.join(format!("{name}.stderr"));
        let mut c = Command::new("timeout");
        c.args(["--signal=TERM", "1500", "ip", "netns", "exec", &ns.name])
            .arg(bin("vmrun"))
            .args(["-m", "256m", "-kernel"])
            .arg(dir.join("bzImage"))
            .arg("-initrd")
            .arg(dir.join("initramfs.cpio"))
            .args([
                "-append",
                &format!("console=ttyS0 vmrun.hold {append}"),
                "-no-reboot",
                "-display",
                "none",
                "-serial",
            ])
            .arg(format!("file:{}", serial.display()))
            .args(net)
            .env("VMRUN_CACHE_DIR", tmp.join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        Guest {
            name,
            child: c.spawn().expect("start vmrun"),
            serial,
            stderr,
        }
    }

    /// Whether vmrun still runs.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Once the guest kernel has panicked (here, after init's fault), its
    /// panic loop spins in emulated kernel code and would take CPU from
    /// the guests still booting, slowing them past their DHCP timeouts: it
    /// stays up (its port stays on the bridge), at the lowest priority.
    /// Whether it did (once).
    fn yield_when_panicked(&self) -> bool {
        let log = std::fs::read_to_string(&self.serial).unwrap_or_default();
        if !log.contains("end Kernel panic") {
            return false;
        }
        // vmrun is the child of `timeout`; nice values are per thread.
        let kids = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string()])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&kids.stdout).split_whitespace() {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let tid: libc::id_t = t.file_name().to_string_lossy().parse().unwrap_or(0);
                // SAFETY: setpriority(2) on a thread id read from /proc.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) };
            }
        }
        true
    }

    /// Stop vmrun with SIGTERM (it exits 0 and runs its downscripts) if it
    /// still runs; (exit status, serial log, context for failure messages).
    fn stop(mut self) -> (Option<i32>, String, String) {
        if self.running() {
            // vmrun is the child of `timeout` (`ip netns exec` execs it).
            let kids = Command::new("pgrep")
                .args(["-P", &self.child.id().to_string()])
                .output()
                .unwrap();
            for pid in String::from_utf8_lossy(&kids.stdout).split_whitespace() {
                // SAFETY: kill(2) on a pid read from pgrep.
                unsafe { libc::kill(pid.parse().unwrap_or(0), libc::SIGTERM) };
            }
        }
        let st = self.child.wait().expect("wait for vmrun");
        let log = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let tail = e2e::tail_lines(&log, 40);
        let ctx = format!(
            "guest {}: vmrun {st}\nstderr:\n{err}\nserial (tail):\n{tail}",
            self.name
        );
        (st.code(), log, ctx)
    }
}

fn write_script(path: &Path, body: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    writeln!(f, "#!/bin/sh\n{body}").unwrap();
    drop(f);
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

const GW_MAC: &str = "02:00:0a:4e:00:01";
const MAC_A: &str = "52:54:00:12:34:a1";
const MAC_B: &str = "52:54:00:12:34:b2";
const MAC_C: &str = "52:54:00:12:34:c3";

#[test]
fn bridge_tap_nat_and_user_modes_with_real_guests() {
    if !e2e::kvm_available() {
        return;
    }
    let Some(dir) = e2e::guest_dir() else { return };
    if !e2e::is_root() || !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: needs root and /dev/net/tun");
        return;
    }
    let kconfig = std::fs::read_to_string(dir.join("kernel.config")).unwrap_or_default();
    assert!(
        kconfig.contains("CONFIG_NETCONSOLE=y"),
        "build/guest has no netconsole: rebuild it with scripts/build-guest.sh"
    );
    for (t, pkg) in [
        (&["dnsmasq"][..], "dnsmasq-base"),
        (&["nft"][..], "nftables"),
        (&["tcpdump"][..], "tcpdump"),
        (&["passt"][..], "passt"),
        (&["python3"][..], "python3"),
    ] {
        assert!(
            tool(t).is_some(),
            "{} is missing: run scripts/install-deps.sh (package {pkg})",
            t[0]
        );
    }
    let hw = !Path::new("/sys/module/kvm_pvm").exists();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");

    // "nat": the host side, with the NAT network made by the helper script.
    let Some(mut nat) = Netns::new("nat") else {
        eprintln!("SKIP: cannot create a network namespace (ip netns add)");
        return;
    };
    let mut out = Netns::new("out").expect("second namespace");
    let mut user = Netns::new("usr").expect("third namespace");
    let br = format!("vbr{}", std::process::id() % 100000);
    nat.ip(&["link", "add", "vout", "type", "veth", "peer", "name", "vin"]);
    nat.ip(&["link", "set", "vin", "netns", &out.name]);
    nat.ip(&["addr", "add", "192.0.2.1/24", "dev", "vout"]);
    nat.ip(&["link", "set", "vout", "up"]);
    out.ip(&["addr", "add", "192.0.2.2/24", "dev", "vin"]);
    out.ip(&["link", "set", "vin", "up"]);
    let up = nat
        .exec(root.join("docs/examples/vmrun-nat.sh"))
        .args([
            "up",
            "-b",
            &br,
            "-a",
            "10.78.0.1/24",
            "-r",
            "10.78.0.50,10.78.0.60",
        ])
        .args(["-H", &format!("{MAC_A},10.78.0.51")])
        .args(["-H", &format!("{MAC_B},10.78.0.52"), "-o", "vout"])
        .output()
        .unwrap();
    let nat_down = |nat: &Netns| {
        let _ = nat
            .exec(root.join("docs/examples/vmrun-nat.sh"))
            .args(["down", "-b", &br])
            .output();
    };
    assert!(
        up.status.success(),
        "vmrun-nat.sh up: {}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    nat.ip(&["link", "set", &br, "address", GW_MAC]);
    let pcap = t.join("bridge.pcap");
    let mut c = nat.exec(tool(&["tcpdump"]).unwrap());
    c.args(["-i", &br, "-U", "-n", "-w"])
        .arg(&pcap)
        .arg("udp port 67 or udp port 68")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    nat.spawn(c);
    let www = t.join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello-from-outside").unwrap();
    let out_log = t.join("outside.log");
    listener(&mut out, "192.0.2.2", &[6666, 6667], &out_log, Some(&www));

    // "usr": an interface with a default route for passt to copy.
    user.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"]);
    user.ip(&["addr", "add", "10.79.0.2/24", "dev", "u0"]);
    user.ip(&["link", "set", "u0", "up"]);
    user.ip(&["link", "set", "u1", "up"]);
    user.ip(&["route", "add", "default", "via", "10.79.0.1"]);
    let user_log = t.join("user.log");
    listener(&mut user, "127.0.0.1", &[6668], &user_log, Some(&www));

    let ifup = t.join("ifup");
    let ifdown = t.join("ifdown");
    let marks = t.join("scripts.log");
    write_script(
        &ifup,
        &format!(
            "echo \"up $1\" >> {m}\nip link set \"$1\" master {br} && ip link set \"$1\" up",
            m = marks.display()
        ),
    );
    write_script(&ifdown, &format!("echo \"down $1\" >> {}", marks.display()));

    let checks = |gw: &str| {
        if hw {
            format!("vmrun.ping={gw} vmrun.fetch=http://{gw}:8000/hello.txt")
        } else {
            String::new()
        }
    };
    let a = Guest::start(
        "A (bridge)",
        &nat,
        &dir,
        t,
        &format!(
            "ip=dhcp netconsole=6665@10.78.0.51/eth0,6666@192.0.2.2/{GW_MAC} {}",
            checks("192.0.2.2")
        ),
        &[
            "-netdev",
            &format!("bridge,id=n0,br={br}"),
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={MAC_A}"),
        ],
    );
    let b = Guest::start(
        "B (tap + script)",
        &nat,
        &dir,
        t,
        &format!(
            "ip=dhcp netconsole=6665@10.78.0.52/eth0,6667@192.0.2.2/{GW_MAC} {}",
            checks("192.0.2.2")
        ),
        &[
            "-netdev",
            &format!(
                "tap,id=n0,ifname=vtapb,script={},downscript={}",
                ifup.display(),
                ifdown.display()
            ),
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={MAC_B}"),
        ],
    );
    let passt_log = t.join("passt.log");
    let c = Guest::start(
        "C (user, passt)",
        &user,
        &dir,
        t,
        &format!(
            "ip=dhcp netconsole=6665@10.79.0.2/eth0,6668@10.79.0.1/ {}",
            checks("10.79.0.1")
        ),
        &[
            "-nic",
            &format!(
                "user,mac={MAC_C},hostfwd=tcp::2222-:22,passt-log={}",
                passt_log.display()
            ),
        ],
    );
    // Each guest's own port of the bridge: what reaches it from the other
    // guest is what that guest sees.
    let mut port_caps = Vec::new();
    let t0 = Instant::now();
    while port_caps.len() < 2 && t0.elapsed() < Duration::from_secs(30) {
        let links = nat.exec("ip").args(["-o", "link"]).output().unwrap();
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        let tap_a = links
            .split(|c: char| c == ':' || c.is_whitespace() || c == '@')
            .find(|w| {
                w.starts_with("tap") && w[3..].chars().all(|c| c.is_ascii_digit()) && w.len() > 3
            })
            .map(str::to_string);
        if let (Some(tap_a), true) = (tap_a, links.contains("vtapb")) {
            for (ifc, who) in [(tap_a, "a"), ("vtapb".to_string(), "b")] {
                let f = t.join(format!("port-{who}.pcap"));
                let mut c = nat.exec(tool(&["tcpdump"]).unwrap());
                c.args(["-i", &ifc, "-U", "-n", "-w"])
                    .arg(&f)
                    .arg("udp port 67 or udp port 68")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                nat.spawn(c);
                port_caps.push((who, f));
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(port_caps.len(), 2, "the guests' taps did not appear");
    // While C runs, passt listens on the forwarded host port.
    let t0 = Instant::now();
    let mut fwd = String::new();
    while t0.elapsed() < Duration::from_secs(20) {
        let ss = user.exec("ss").args(["-ltnp"]).output().unwrap();
        fwd = String::from_utf8_lossy(&ss.stdout).into_owned();
        if fwd.contains(":2222") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // The guests stay up (here the kernel waits after init's fault; with
    // hardware KVM init holds after its checks), so each guest's port stays
    // on the bridge while the others do DHCP. Stop them all once every
    // guest has shown what it can: its address and netconsole log through
    // (with hardware KVM, init's checks done).
    let logged = |file: &Path, port: u16| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("{port} ")) && l.contains("IP-Config: Complete"))
    };
    let init_done = |g: &Guest| {
        std::fs::read_to_string(&g.serial)
            .unwrap_or_default()
            .contains("VMRUN-INIT: done")
    };
    let mut guests = [a, b, c];
    // A deadline, so that a guest that never gets its address (its DHCP
    // timed out, say, on a host too loaded for the emulated kernel) fails
    // the checks below instead of holding the test forever.
    let t0 = Instant::now();
    let mut yielded = [false; 3];
    loop {
        for (g, y) in guests.iter().zip(yielded.iter_mut()) {
            if !*y {
                *y = g.yield_when_panicked();
            }
        }
        let all = if hw {
            guests.iter().all(init_done)
        } else {
            logged(&out_log, 6666) && logged(&out_log, 6667) && logged(&user_log, 6668)
        };
        if all || !guests.iter_mut().all(Guest::running) || t0.elapsed() > Duration::from_secs(900)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Let the last log lines out.
    std::thread::sleep(Duration::from_secs(2));
    let [a, b, c] = guests;
    let (rc_a, log_a, ctx_a) = a.stop();
    let (rc_b, log_b, ctx_b) = b.stop();
    let (rc_c, log_c, ctx_c) = c.stop();
    std::thread::sleep(Duration::from_millis(500));
    let outside = std::fs::read_to_string(&out_log).unwrap_or_default();
    let inside = std::fs::read_to_string(&user_log).unwrap_or_default();
    let passt = std::fs::read_to_string(&passt_log).unwrap_or_default();
    let leases = std::fs::read_to_string(format!("/run/vmrun-nat/{br}.leases")).unwrap_or_default();
    let read_pcap = |f: &Path| {
        let d = Command::new(tool(&["tcpdump"]).unwrap())
            .args(["-r"])
            .arg(f)
            .args(["-e", "-n"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&d.stdout).into_owned()
    };
    let dump = read_pcap(&pcap);
    let port_a = read_pcap(&port_caps[0].1);
    let port_b = read_pcap(&port_caps[1].1);
    let ps = Command::new("pgrep")
        .args(["-f", "--fd 3"])
        .output()
        .unwrap();
    nat_down(&nat);
    let marks = std::fs::read_to_string(&marks).unwrap_or_default();
    let ctx = format!(
        "{ctx_a}\n\n{ctx_b}\n\n{ctx_c}\n\noutside listener:\n{outside}\nuser listener:\n{inside}\n\
         leases:\n{leases}\nbridge capture:\n{dump}\npasst log:\n{passt}"
    );

    // Every guest ran until the test stopped it (SIGTERM ends vmrun with 0).
    for rc in [rc_a, rc_b, rc_c] {
        assert_eq!(rc, Some(0), "{ctx}");
    }
    // DHCP: the kernel configured the address it was given.
    for (log, mac, ip) in [
        (&log_a, MAC_A, "10.78.0.51"),
        (&log_b, MAC_B, "10.78.0.52"),
        (&log_c, MAC_C, "10.79.0.2"),
    ] {
        assert!(log.contains("IP-Config: Complete"), "{mac}: {ctx}");
        assert!(
            log.contains(&format!("hwaddr={mac}, ipaddr={ip}")),
            "{mac}: {ctx}"
        );
        assert!(log.contains("netconsole: network logging started"), "{ctx}");
    }
    // The DHCP server on the bridge handed out both leases...
    assert!(leases.contains(MAC_A) && leases.contains(MAC_B), "{ctx}");
    // ...and the bridge carried each guest's DHCP frames: two guests on
    // one bridge, each seen by the capture.
    for mac in [MAC_A, MAC_B] {
        let n = dump.lines().filter(|l| l.contains(mac)).count();
        assert!(n >= 2, "{n} DHCP frames from/to {mac} on the bridge: {ctx}");
    }
    // Each guest's port carried the other guest's DHCP broadcasts: the two
    // guests see each other's traffic.
    let from = |dump: &str, mac: &str| {
        dump.lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(mac))
            .count()
    };
    assert!(
        from(&port_b, MAC_A) >= 1,
        "B's port never carried A's frames: {port_b}\n{ctx}"
    );
    assert!(
        from(&port_a, MAC_B) >= 1,
        "A's port never carried B's frames: {port_a}\n{ctx}"
    );
    // NAT: the kernel logs crossed into the outside namespace from the
    // masquerading address, never from the private ones.
    for port in [6666, 6667] {
        let lines: Vec<&str> = outside
            .lines()
            .filter(|l| l.starts_with(&format!("{port} ")))
            .collect();
        assert!(
            lines.iter().any(|l| l.contains("IP-Config: Complete")),
            "port {port}: {ctx}"
        );
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with(&format!("{port} 192.0.2.1 "))),
            "port {port} not masqueraded: {ctx}"
        );
    }
    // User mode: passt carried the kernel log to the host's loopback...
    assert!(
        inside
            .lines()
            .any(|l| l.starts_with("6668 ") && l.contains("IP-Config: Complete")),
        "{ctx}"
    );
    // ...saw the guest's MAC, forwarded the host port, and ended with vmrun.
    assert!(
        passt.to_lowercase().contains(MAC_C),
        "passt log lacks {MAC_C}: {ctx}"
    );
    assert!(
        fwd.contains(":2222") && fwd.contains("passt"),
        "hostfwd: {fwd}"
    );
    assert!(
        String::from_utf8_lossy(&ps.stdout).trim().is_empty(),
        "passt outlived vmrun"
    );
    // script= ran before the guest, downscript= after, with the tap name.
    assert_eq!(marks, "up vtapb\ndown vtapb\n", "{ctx}");
    if hw {
        for log in [&log_a, &log_b] {
            assert!(log.contains("VMRUN-INIT: ping 192.0.2.2 ok"), "{ctx}");
            assert!(
                log.contains("VMRUN-INIT: fetched hello-from-outside"),
                "{ctx}"
            );
        }
        assert!(
            log_c.contains("VMRUN-INIT: fetched hello-from-outside"),
            "{ctx}"
        );
    } else {
        eprintln!(
            "note: kvm_pvm host: guest user space cannot run, so ping/HTTP from the \
             guests are checked only on hardware KVM"
        );
    }
}
