//! The VM monitor: QEMU's human monitor (HMP) commands and the JSON QMP
//! protocol, over stdio or Unix sockets, so that scripts and existing QMP
//! clients work against vmrun.

pub mod hmp;
pub mod qmp;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cpuid::Topology;
use crate::vm::VmControl;

/// Memory facts shown by `info memory`.
#[derive(Clone, Debug)]
pub struct MemInfo {
    pub size: u64,
    pub backing: String,
    pub page_size: u64,
    pub prealloc: bool,
}

/// What the monitor can see and do.
pub struct MonitorCtx {
    pub control: Arc<VmControl>,
    pub name: Option<String>,
    pub topology: Topology,
    pub mem: MemInfo,
    pub version: String,
}

/// A thread of this process with its role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadInfo {
    pub tid: i32,
    pub name: String,
    pub role: String,
}

/// Every thread of this process: vCPU threads (`vcpuN`), I/O threads
/// (`io-*`) and the rest (emulator).
pub fn threads() -> Vec<ThreadInfo> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc/self/task") else {
        return v;
    };
    for e in rd.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let name = std::fs::read_to_string(e.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let role = if let Some(n) = name
            .strip_prefix("vcpu")
            .filter(|n| n.parse::<u32>().is_ok())
        {
            format!("vcpu{n}")
        } else if name.starts_with("io-") {
            "io".to_string()
        } else {
            "emulator".to_string()
        };
        v.push(ThreadInfo { tid, name, role });
    }
    v.sort_by_key(|t| t.tid);
    v
}

/// Which protocol a socket speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Hmp,
    Qmp,
}

/// A parsed `unix:PATH,server,nowait` (or `stdio`, `none`) chardev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chardev {
    Stdio,
    None,
    Unix(PathBuf),
}

impl Chardev {
    /// Parse QEMU's spelling. Only server sockets are supported.
    pub fn parse(s: &str) -> Result<Chardev, String> {
        let (first, kv) = crate::qemuopts::split(s);
        let first = first.unwrap_or_default();
        match first.as_str() {
            "stdio" | "mon:stdio" => Ok(Chardev::Stdio),
            "none" | "null" => Ok(Chardev::None),
            f if f.starts_with("unix:") => {
                let server = kv.iter().any(|(k, v)| k == "server" && v != "off");
                if !server {
                    return Err(format!(
                        "'{s}': only server sockets are supported (add ,server,nowait)"
                    ));
                }
                for (k, _) in &kv {
                    if !matches!(k.as_str(), "server" | "nowait" | "wait") {
                        return Err(format!("'{s}': unknown option '{k}'"));
                    }
                }
                Ok(Chardev::Unix(PathBuf::from(&f[5..])))
            }
            _ => Err(format!(
                "'{s}': expected stdio, none or unix:PATH,server,nowait"
            )),
        }
    }
}

/// Serve `proto` on a Unix socket at `path` (replacing a stale socket), one
/// client at a time, on a thread named `monitor`.
pub fn serve_unix(path: &Path, proto: Protocol, ctx: Arc<MonitorCtx>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("monitor".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let quit = match proto {
                    Protocol::Hmp => serve_hmp(conn, &ctx),
                    Protocol::Qmp => qmp::serve(conn, &ctx),
                };
                if quit {
                    return;
                }
            }
        })?;
    Ok(())
}

/// The banner QEMU prints when an HMP client connects.
pub fn banner(ctx: &MonitorCtx) -> String {
    format!(
        "vmrun {} monitor - type 'help' for more information\n",
        ctx.version
    )
}

fn serve_hmp(conn: UnixStream, ctx: &MonitorCtx) -> bool {
    let Ok(mut out) = conn.try_clone() else {
        return false;
    };
    let _ = write!(out, "{}(qemu) ", banner(ctx));
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return false };
        let r = hmp::execute(ctx, &line);
        if out.write_all(r.output.as_bytes()).is_err() {
            return false;
        }
        if r.quit {
            return true;
        }
        let _ = write!(out, "(qemu) ");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chardevs() {
        assert_eq!(Chardev::parse("stdio"), Ok(Chardev::Stdio));
        assert_eq!(Chardev::parse("none"), Ok(Chardev::None));
        assert_eq!(
            Chardev::parse("unix:/tmp/m.sock,server,nowait"),
            Ok(Chardev::Unix("/tmp/m.sock".into()))
        );
        assert!(Chardev::parse("unix:/tmp/m.sock")
            .unwrap_err()
            .contains("server"));
        assert!(Chardev::parse("tcp:1:2").is_err());
    }
}
