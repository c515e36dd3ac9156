//! `-netdev`, `-nic` and `-device virtio-net-pci`: parse them into NICs,
//! then create the backends: taps (with QEMU's ifup/ifdown scripts, or
//! attached to bridges), passt for user mode, or a stream socket.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use vcore::devices::virtio::net::NetSpec;
use vcore::net::passt::{HostFwd, Passt, PasstConfig};
use vcore::net::stream::Stream;
use vcore::net::{default_mac, parse_mac, Tap};

/// QEMU's default tap scripts (run when present and not overridden).
pub const DEFAULT_IFUP: &str = "/etc/qemu-ifup";
/// QEMU's default tap down script.
pub const DEFAULT_IFDOWN: &str = "/etc/qemu-ifdown";

/// A tap script setting: QEMU's default, none, or a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// Not given: the QEMU default file, if it exists.
    Default,
    /// `script=no`.
    No,
    /// A file to run with the interface name.
    Path(PathBuf),
}

impl Script {
    fn parse(v: &str) -> Script {
        if v == "no" || v.is_empty() {
            Script::No
        } else {
            Script::Path(PathBuf::from(v))
        }
    }
    /// The file to run, if any.
    fn resolve(&self, default: &str) -> Option<PathBuf> {
        match self {
            Script::Default => Some(PathBuf::from(default)).filter(|p| p.exists()),
            Script::No => None,
            Script::Path(p) => Some(p.clone()),
        }
    }
}

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A tap device (`ifname` empty: the kernel picks tapN).
    Tap {
        ifname: String,
        script: Script,
        downscript: Script,
    },
    /// A new tap attached to bridge `br`.
    Bridge { br: String },
    /// User mode through passt.
    User(PasstConfig),
    /// A unix stream socket speaking QEMU's stream protocol (client).
    Stream { path: PathBuf },
}

/// One NIC to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub netdev: String,
    pub mac: [u8; 6],
    pub backend: Backend,
}

fn parse_netdev(
    s: &str,
    opt: &str,
    nic: bool,
) -> Result<(String, Backend, Option<[u8; 6]>), String> {
    let (first, kv) = vcore::qemuopts::split(s);
    let ty = first.unwrap_or_default();
    let mut id = None;
    let mut ifname = String::new();
    let mut script = Script::Default;
    let mut downscript = Script::Default;
    let mut br = None;
    let mut mac = None;
    let mut user = PasstConfig::default();
    let mut addr_type = None;
    let mut addr_path = None;
    match ty.as_str() {
        "tap" | "bridge" | "user" | "stream" => {}
        "" => {
            return Err(format!(
                "{opt} {s}: a backend type is needed (tap, bridge, user or stream)"
            ))
        }
        other => {
            return Err(format!(
                "{opt} {s}: network backend '{other}' is not supported \
                 (vmrun has tap, bridge, user and stream)"
            ))
        }
    }
    let onoff = |k: &str, v: &str| -> Result<bool, String> {
        match v {
            "on" | "yes" | "true" => Ok(true),
            "off" | "no" | "false" => Ok(false),
            _ => Err(format!("{opt} {s}: {k}={v}: expected 'on' or 'off'")),
        }
    };
    for (k, v) in kv {
        match (k.as_str(), ty.as_str()) {
            ("id", _) => id = Some(v),
            ("ifname", "tap") => ifname = v,
            ("br", "bridge") => br = Some(v),
            ("script", "tap") => script = Script::parse(&v),
            ("downscript", "tap") => downscript = Script::parse(&v),
            ("vhost", "tap") if v == "off" => {}
            ("vhost", "tap") => {
                return Err(format!(
                    "{opt} {s}: vhost={v}: vhost-net is not supported; use vhost=off"
                ))
            }
            ("helper", "bridge") => {}
            ("hostfwd", "user") => user
                .hostfwd
                .push(HostFwd::parse(&v).map_err(|e| format!("{opt} {s}: {e}"))?),
            ("ipv4", "user") => user.ipv6_only = !onoff(&k, &v)?,
            ("ipv6", "user") => user.ipv4_only = !onoff(&k, &v)?,
            ("net", "user") => {
                // QEMU's slirp layout inside the given network: the guest
                // is .15, the gateway (the host) .2, DNS .3.
                let (ip, bits) = parse_net(&v).map_err(|e| format!("{opt} {s}: net={v}: {e}"))?;
                let at = |n: u32| std::net::Ipv4Addr::from(ip | n).to_string();
                user.address.get_or_insert_with(|| at(15));
                user.gateway.get_or_insert_with(|| at(2));
                user.netmask = Some(bits.to_string());
            }
            ("dhcpstart", "user") => user.address = Some(v),
            ("host", "user") => user.gateway = Some(v),
            ("dns", "user") => user.dns = Some(v),
            ("passt", "user") => user.program = PathBuf::from(v),
            ("passt-log", "user") => user.log = Some(PathBuf::from(v)),
            ("server", "stream") => {
                if onoff(&k, &v)? {
                    return Err(format!(
                        "{opt} {s}: server=on: vmrun connects to a stream server; \
                         start the server (e.g. passt) yourself"
                    ));
                }
            }
            ("addr.type", "stream") => addr_type = Some(v),
            ("addr.path", "stream") => addr_path = Some(v),
            ("mac", _) if nic => {
                mac = Some(parse_mac(&v).map_err(|e| format!("{opt} {s}: mac: {e}"))?)
            }
            ("model", _) if nic => {
                if v != "virtio-net-pci" && v != "virtio" {
                    return Err(format!(
                        "{opt} {s}: model={v}: vmrun has virtio-net-pci only"
                    ));
                }
            }
            _ => return Err(format!("{opt} {s}: Invalid parameter '{k}'")),
        }
    }
    if user.ipv4_only && user.ipv6_only {
        return Err(format!("{opt} {s}: ipv4=off and ipv6=off leave nothing"));
    }
    let backend = match ty.as_str() {
        "bridge" => Backend::Bridge {
            br: br.ok_or_else(|| format!("{opt} {s}: br= is needed (the bridge to join)"))?,
        },
        "user" => Backend::User(user),
        "stream" => {
            if addr_type.as_deref().unwrap_or("unix") != "unix" {
                return Err(format!(
                    "{opt} {s}: addr.type={}: vmrun connects to unix sockets only",
                    addr_type.unwrap_or_default()
                ));
            }
            Backend::Stream {
                path: PathBuf::from(addr_path.ok_or_else(|| {
                    format!("{opt} {s}: addr.path= is needed (the socket to connect to)")
                })?),
            }
        }
        _ => Backend::Tap {
            ifname,
            script,
            downscript,
        },
    };
    let id = match id {
        Some(i) => i,
        None if nic => String::new(),
        None => return Err(format!("{opt} {s}: Parameter 'id' is missing")),
    };
    Ok((id, backend, mac))
}

/// `10.0.2.0/24` (or `10.0.2.0/255.255.255.0`): network and prefix bits.
fn parse_net(v: &str) -> Result<(u32, u32), String> {
    let (a, m) = v.split_once('/').unwrap_or((v, "24"));
    let ip: std::net::Ipv4Addr = a
        .parse()
        .map_err(|_| format!("'{a}' is not an IPv4 address"))?;
    let bits = match m.parse::<u32>() {
        Ok(b) if (1..=30).contains(&b) => b,
        Ok(_) => return Err(format!("prefix /{m} leaves no room for hosts")),
        Err(_) => {
            let mask: std::net::Ipv4Addr =
                m.parse().map_err(|_| format!("'{m}' is not a netmask"))?;
            let mb = u32::from(mask);
            if mb.leading_ones() + mb.trailing_zeros() != 32
                || !(1..=30).contains(&mb.leading_ones())
            {
                return Err(format!("'{m}' is not a usable netmask"));
            }
            mb.leading_ones()
        }
    };
    let mask = u32::MAX << (32 - bits);
    Ok((u32::from(ip) & mask, bits))
}

/// Parse the network options: every `-netdev` must be used by exactly one
/// `-device virtio-net-pci,netdev=ID`; each `-nic` is a netdev and its NIC.
pub fn parse(netdevs: &[String], nics: &[String], devices: &[String]) -> Result<Vec<Nic>, String> {
    let mut defs: Vec<(String, Backend, bool)> = Vec::new();
    for s in netdevs {
        let (id, b, _) = parse_netdev(s, "-netdev", false)?;
        if defs.iter().any(|d| d.0 == id) {
            return Err(format!("-netdev {s}: Duplicate ID '{id}' for netdev"));
        }
        defs.push((id, b, false));
    }
    let mut out = Vec::new();
    for s in devices {
        let (first, kv) = vcore::qemuopts::split(s);
        let driver = first.unwrap_or_default();
        if driver == "vfio-pci" {
            return Err(format!(
                "-device {s}: device passthrough is not supported (see docs/passthrough.md)"
            ));
        }
        if driver != "virtio-net-pci" && driver != "virtio-net" {
            continue;
        }
        let mut netdev = None;
        let mut mac = None;
        for (k, v) in kv {
            match k.as_str() {
                "netdev" => netdev = Some(v),
                "mac" => mac = Some(parse_mac(&v).map_err(|e| format!("-device {s}: mac: {e}"))?),
                "id" | "bootindex" => {}
                other => {
                    return Err(format!(
                        "-device {s}: Property '{driver}.{other}' not found"
                    ))
                }
            }
        }
        let netdev = netdev.ok_or_else(|| format!("-device {s}: netdev property not set"))?;
        let Some(d) = defs.iter_mut().find(|d| d.0 == netdev) else {
            return Err(format!(
                "-device {s}: Property '{driver}.netdev' can't find value '{netdev}'"
            ));
        };
        if d.2 {
            return Err(format!(
                "-device {s}: netdev '{netdev}' is already used by another NIC"
            ));
        }
        d.2 = true;
        let idx = out.len();
        out.push(Nic {
            netdev,
            mac: mac.unwrap_or_else(|| default_mac(idx)),
            backend: d.1.clone(),
        });
    }
    if let Some(d) = defs.iter().find(|d| !d.2) {
        eprintln!(
            "vmrun: warning: netdev {} has no NIC (add -device virtio-net-pci,netdev={})",
            d.0, d.0
        );
    }
    for s in nics {
        let (id, backend, mac) = parse_netdev(s, "-nic", true)?;
        let idx = out.len();
        out.push(Nic {
            netdev: if id.is_empty() {
                format!("nic{idx}")
            } else {
                id
            },
            mac: mac.unwrap_or_else(|| default_mac(idx)),
            backend,
        });
    }
    Ok(out)
}

/// Run a tap script with the interface name, like QEMU: it must exit 0.
fn run_script(script: &Path, ifname: &str) -> Result<(), String> {
    let st = Command::new(script)
        .arg(ifname)
        .status()
        .map_err(|e| format!("could not launch network script {}: {e}", script.display()))?;
    if !st.success() {
        return Err(format!(
            "network script {} failed with {st}",
            script.display()
        ));
    }
    Ok(())
}

/// What must happen when vmrun ends: the down scripts of the taps (run
/// while the taps still exist, like QEMU's).
#[derive(Default)]
pub struct NetGuard {
    down: Vec<(PathBuf, String)>,
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        for (script, ifname) in self.down.drain(..) {
            if let Err(e) = run_script(&script, &ifname) {
                eprintln!("vmrun: {e}");
            }
        }
    }
}

/// Create the backends: taps (running their scripts or joining their
/// bridges), passt children, stream connections.
pub fn open(nics: &[Nic]) -> Result<(Vec<NetSpec>, NetGuard), String> {
    let mut out = Vec::new();
    let mut guard = NetGuard::default();
    for (i, n) in nics.iter().enumerate() {
        let ctx = |e: String| format!("netdev {}: {e}", n.netdev);
        let backend: Arc<dyn vcore::net::Backend> = match &n.backend {
            Backend::Tap {
                ifname,
                script,
                downscript,
            } => {
                let t = Tap::open(ifname).map_err(ctx)?;
                if let Some(up) = script.resolve(DEFAULT_IFUP) {
                    run_script(&up, t.name()).map_err(ctx)?;
                }
                t.up().map_err(ctx)?;
                if let Some(down) = downscript.resolve(DEFAULT_IFDOWN) {
                    guard.down.push((down, t.name().to_string()));
                }
                Arc::new(t)
            }
            Backend::Bridge { br } => {
                let t = Tap::open("").map_err(ctx)?;
                t.attach_to_bridge(br).map_err(ctx)?;
                t.up().map_err(ctx)?;
                Arc::new(t)
            }
            Backend::User(cfg) => Arc::new(Passt::start(&n.netdev, cfg).map_err(ctx)?),
            Backend::Stream { path } => Arc::new(Stream::connect(path).map_err(ctx)?),
        };
        out.push(NetSpec {
            id: format!("net{i}"),
            mac: n.mac,
            backend,
        });
    }
    Ok((out, guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn netdev_and_device() {
        let n = parse(
            &v(&[
                "tap,id=n0,ifname=tap7,script=no,downscript=no,vhost=off",
                "bridge,id=n1,br=br0",
            ]),
            &[],
            &v(&[
                "virtio-rng-pci",
                "virtio-net-pci,netdev=n1",
                "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc",
            ]),
        )
        .unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].backend, Backend::Bridge { br: "br0".into() });
        assert_eq!(n[0].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(
            n[1].backend,
            Backend::Tap {
                ifname: "tap7".into(),
                script: Script::No,
                downscript: Script::No,
            }
        );
        assert_eq!(n[1].mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    }

    #[test]
    fn nic_shorthand_default_macs() {
        let n = parse(
            &[],
            &v(&["tap", "bridge,br=virbr0,mac=52:54:00:00:00:01"]),
            &[],
        )
        .unwrap();
        assert_eq!(n[0].mac[5], 0x56);
        assert_eq!(n[1].mac, [0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(
            n[1].backend,
            Backend::Bridge {
                br: "virbr0".into()
            }
        );
    }

    #[test]
    fn errors() {
        let e = parse(&[], &[], &v(&["vfio-pci,host=01:00.0"])).unwrap_err();
        assert!(e.contains("device passthrough is not supported"), "{e}");
        assert!(parse(&v(&["tap"]), &[], &[])
            .unwrap_err()
            .contains("'id' is missing"));
        assert!(parse(&v(&["bridge,id=b"]), &[], &[])
            .unwrap_err()
            .contains("br="));
        assert!(parse(&[], &[], &v(&["virtio-net-pci,netdev=x"]))
            .unwrap_err()
            .contains("can't find"));
        assert!(parse(&v(&["user,id=u,hostfwd=tcp:22"]), &[], &[])
            .unwrap_err()
            .contains("invalid host forwarding rule 'tcp:22'"));
        assert!(parse(&v(&["user,id=u,net=10.0.2.0/31"]), &[], &[])
            .unwrap_err()
            .contains("no room"));
        assert!(parse(&v(&["stream,id=s"]), &[], &[])
            .unwrap_err()
            .contains("addr.path= is needed"));
        assert!(parse(&v(&["user,id=u,ifname=x"]), &[], &[])
            .unwrap_err()
            .contains("Invalid parameter 'ifname'"));
        assert!(parse(&v(&["tap,id=a,vhost=on"]), &[], &[])
            .unwrap_err()
            .contains("vhost"));
        assert!(parse(
            &v(&["tap,id=a"]),
            &[],
            &v(&["virtio-net-pci,netdev=a,mac=01:00:00:00:00:01"])
        )
        .unwrap_err()
        .contains("multicast"));
        assert!(parse(&v(&["tap,id=a", "tap,id=a"]), &[], &[])
            .unwrap_err()
            .contains("Duplicate"));
    }

    #[test]
    fn user_and_stream() {
        let n = parse(
            &v(&["user,id=u0,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53,ipv6=off"]),
            &v(&[
                "user,net=10.0.2.0/24,dns=10.0.2.3",
                "stream,addr.type=unix,addr.path=/run/p.sock",
            ]),
            &v(&["virtio-net-pci,netdev=u0"]),
        )
        .unwrap();
        let Backend::User(c) = &n[0].backend else {
            panic!("{:?}", n[0].backend)
        };
        assert_eq!(c.hostfwd.len(), 2);
        assert!(c.ipv4_only && !c.ipv6_only);
        assert_eq!(c.hostfwd[1].passt_spec(), "127.0.0.1/5353:53");
        let Backend::User(c) = &n[1].backend else {
            panic!("{:?}", n[1].backend)
        };
        assert_eq!(c.address.as_deref(), Some("10.0.2.15"));
        assert_eq!(c.gateway.as_deref(), Some("10.0.2.2"));
        assert_eq!(c.netmask.as_deref(), Some("24"));
        assert_eq!(c.dns.as_deref(), Some("10.0.2.3"));
        assert_eq!(
            n[2].backend,
            Backend::Stream {
                path: "/run/p.sock".into()
            }
        );
        assert_eq!(
            parse_net("192.168.7.9/255.255.0.0").unwrap(),
            (0xc0a8_0000, 16)
        );
    }

    #[test]
    fn scripts_run_with_the_interface_name() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let sc = d.path().join("ifup");
        std::fs::write(
            &sc,
            format!("#!/bin/sh\necho \"$1\" >> {}\n", out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&sc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        run_script(&sc, "tap9").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "tap9\n");
        {
            let _g = NetGuard {
                down: vec![(sc.clone(), "tap10".into())],
            };
        }
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "tap9\ntap10\n");
        let bad = d.path().join("bad");
        std::fs::write(&bad, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = run_script(&bad, "tap9").unwrap_err();
        assert!(e.contains("network script") && e.contains("failed"), "{e}");
        let e = run_script(Path::new("/nonexistent/ifup"), "tap9").unwrap_err();
        assert!(
            e.contains("could not launch network script /nonexistent/ifup"),
            "{e}"
        );
        assert_eq!(Script::Default.resolve("/nonexistent/qemu-ifup"), None);
        assert_eq!(Script::parse("no"), Script::No);
    }
}
