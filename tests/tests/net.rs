//! vmrun networking: option errors, bridge errors, and a Linux guest that
//! gets its address by DHCP from dnsmasq over a virtio-net NIC attached to a
//! bridge, all inside a network namespace of its own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use e2e::{bin, vmrun};

#[test]
fn netdev_user_and_vfio_are_clear_usage_errors() {
    let (rc, _, err) = vmrun(&["-kernel", "/nonexistent", "-netdev", "user,id=n0"]);
    assert_eq!(rc, 2, "{err}");
    assert!(
        err.contains("user-mode networking is not available yet (needs passt)"),
        "{err}"
    );
    let (rc, _, err) = vmrun(&[
        "-kernel",
        "/nonexistent",
        "-device",
        "vfio-pci,host=01:00.0",
    ]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("device passthrough is not supported"), "{err}");
    let (rc, _, err) = vmrun(&[
        "-kernel",
        "/nonexistent",
        "-netdev",
        "tap,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0,mac=zz:00:00:00:00:00",
    ]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("is not a MAC address"), "{err}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A network namespace, deleted (with what runs in it) on drop.
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn new() -> Option<Netns> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("vtnet{}-{n}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Netns {
            name,
            children: Vec::new(),
        })
    }
    fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .status()
            .expect("run ip");
        assert!(st.success(), "ip -n {} {args:?} failed", self.name);
    }
    fn exec(&self, prog: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
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
    if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: needs root and /dev/net/tun");
        return;
    }
    let Some(ns) = Netns::new() else {
        eprintln!("SKIP: cannot create a network namespace (ip netns add)");
        return;
    };
    let out = ns
        .exec(&bin("vmrun"))
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
fn linux_guest_gets_dhcp_address_over_bridge() {
    if !e2e::kvm_available() {
        return;
    }
    let Some(dir) = e2e::guest_dir() else { return };
    if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: needs root and /dev/net/tun");
        return;
    }
    let Some(dnsmasq) = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        panic!("dnsmasq is missing: run scripts/install-deps.sh (package dnsmasq-base)");
    };
    let Some(mut ns) = Netns::new() else {
        eprintln!("SKIP: cannot create a network namespace (ip netns add)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let br = "vbr0";
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["link", "add", br, "type", "bridge"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", br]);
    ns.ip(&["link", "set", br, "up"]);
    let dlog = tmp.path().join("dnsmasq.log");
    let d = ns
        .exec(&dnsmasq)
        .args([
            "--no-daemon",
            "--port=0",
            "--interface=vbr0",
            "--bind-interfaces",
            "--dhcp-range=10.77.0.50,10.77.0.50,1h",
            "--log-dhcp",
        ])
        .arg(format!(
            "--dhcp-leasefile={}",
            tmp.path().join("leases").display()
        ))
        .arg(format!("--pid-file={}", tmp.path().join("pid").display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&dlog).unwrap())
        .spawn()
        .expect("start dnsmasq");
    ns.children.push(d);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let serial = tmp.path().join("serial.log");
    let mut c = Command::new("timeout");
    c.args(["--signal=KILL", "600", "ip", "netns", "exec", &ns.name])
        .arg(bin("vmrun"))
        .args(["-m", "256m", "-kernel"])
        .arg(dir.join("bzImage"))
        .arg("-initrd")
        .arg(dir.join("initramfs.cpio"))
        .args([
            "-append",
            "console=ttyS0 ip=dhcp panic=-1 reboot=k",
            "-no-reboot",
            "-display",
            "none",
            "-netdev",
            "bridge,id=n0,br=vbr0",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:99",
            "-serial",
        ])
        .arg(format!("file:{}", serial.display()))
        .env("VMRUN_CACHE_DIR", tmp.path().join("cache"))
        .stdin(Stdio::null());
    let out = c.output().expect("run vmrun");
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    let dl = std::fs::read_to_string(&dlog).unwrap_or_default();
    let ctx = format!(
        "vmrun status {:?}\nstderr:\n{}\nserial:\n{log}\ndnsmasq:\n{dl}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        log.contains("virtio_net") || log.contains("eth0"),
        "no NIC seen: {ctx}"
    );
    assert!(log.contains("IP-Config: Complete"), "{ctx}");
    assert!(log.contains("my address is 10.77.0.50"), "{ctx}");
    assert!(
        log.contains("hwaddr=52:54:00:12:34:99, ipaddr=10.77.0.50"),
        "{ctx}"
    );
    assert!(dl.contains("52:54:00:12:34:99"), "{ctx}");
}
