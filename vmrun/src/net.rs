//! `-netdev`, `-nic` and `-device virtio-net-pci`: parse them into NICs,
//! then create the taps (and attach them to bridges).

use std::sync::Arc;

use vcore::devices::virtio::net::NetSpec;
use vcore::net::{default_mac, parse_mac, Tap};

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A tap device (`ifname` empty: the kernel picks tapN).
    Tap { ifname: String },
    /// A new tap attached to bridge `br`.
    Bridge { br: String },
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
    let mut br = None;
    let mut mac = None;
    match ty.as_str() {
        "tap" | "bridge" => {}
        "user" => {
            return Err(format!(
            "{opt} {s}: user-mode networking is not available yet (needs passt); use tap or bridge"
        ))
        }
        "" => {
            return Err(format!(
                "{opt} {s}: a backend type is needed (tap or bridge)"
            ))
        }
        other => {
            return Err(format!(
                "{opt} {s}: network backend '{other}' is not supported (vmrun has tap and bridge)"
            ))
        }
    }
    for (k, v) in kv {
        match (k.as_str(), ty.as_str()) {
            ("id", _) => id = Some(v),
            ("ifname", "tap") => ifname = v,
            ("br", "bridge") => br = Some(v),
            ("script" | "downscript", "tap") if v == "no" || v.is_empty() => {}
            ("script" | "downscript", "tap") => {
                return Err(format!(
                    "{opt} {s}: {k}={v}: vmrun runs no scripts; use {k}=no (or bridge mode)"
                ))
            }
            ("vhost", "tap") if v == "off" => {}
            ("vhost", "tap") => {
                return Err(format!(
                    "{opt} {s}: vhost={v}: vhost-net is not supported; use vhost=off"
                ))
            }
            ("helper", "bridge") => {}
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
    let backend = if ty == "bridge" {
        Backend::Bridge {
            br: br.ok_or_else(|| format!("{opt} {s}: br= is needed (the bridge to join)"))?,
        }
    } else {
        Backend::Tap { ifname }
    };
    let id = match id {
        Some(i) => i,
        None if nic => String::new(),
        None => return Err(format!("{opt} {s}: Parameter 'id' is missing")),
    };
    Ok((id, backend, mac))
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

/// Create the taps and attach them.
pub fn open(nics: &[Nic]) -> Result<Vec<NetSpec>, String> {
    let mut out = Vec::new();
    for (i, n) in nics.iter().enumerate() {
        let tap = match &n.backend {
            Backend::Tap { ifname } => {
                let t = Tap::open(ifname).map_err(|e| format!("netdev {}: {e}", n.netdev))?;
                t.up().map_err(|e| format!("netdev {}: {e}", n.netdev))?;
                t
            }
            Backend::Bridge { br } => {
                let t = Tap::open("").map_err(|e| format!("netdev {}: {e}", n.netdev))?;
                t.attach_to_bridge(br)
                    .map_err(|e| format!("netdev {}: {e}", n.netdev))?;
                t.up().map_err(|e| format!("netdev {}: {e}", n.netdev))?;
                t
            }
        };
        out.push(NetSpec {
            id: format!("net{i}"),
            mac: n.mac,
            backend: Arc::new(tap),
        });
    }
    Ok(out)
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
                ifname: "tap7".into()
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
        let e = parse(&v(&["user,id=u"]), &[], &[]).unwrap_err();
        assert!(
            e.contains("user-mode networking is not available yet (needs passt)"),
            "{e}"
        );
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
        assert!(parse(&v(&["tap,id=a,script=/etc/qemu-ifup"]), &[], &[])
            .unwrap_err()
            .contains("no scripts"));
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
}
