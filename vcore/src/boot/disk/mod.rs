//! Booting a disk image without firmware: find the partition table, read
//! the filesystems we can (ext2/3/4, FAT), find the boot loader's default
//! entry (systemd-boot/BLS, GRUB 2, extlinux/syslinux) or the newest
//! `/boot/vmlinuz-*`, and return the kernel, initrd and command line it
//! names. The image is only read (see docs/boot.md).

pub mod config;
pub mod fs;
pub mod partitions;

use std::sync::Arc;

use crate::image::BlockDevice;
use config::{Entry, Parsed, RootHint};
use fs::{Fs, Probe, Slice};
pub use partitions::{Partition, Table, TableKind};

/// Errors from looking for a kernel on a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskBootError {
    #[error("could not read the disk: {0}")]
    Io(String),
    #[error("the disk has no partition table (MBR or GPT){}", hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    NoPartitionTable { hint: Option<String> },
    #[error("the partition table is invalid: {0}")]
    BadTable(String),
    #[error("no readable filesystem on the disk (vmrun reads ext2/3/4 and FAT); looked at:\n{}", list(.looked))]
    NoReadableFs { looked: Vec<String> },
    #[error("unsupported filesystem {kind} on partition {number} and nothing vmrun can read elsewhere (it reads ext2/3/4 and FAT; boot such a disk with -kernel, or with firmware later); looked at:\n{}", list(.looked))]
    UnsupportedFs {
        kind: String,
        number: u32,
        looked: Vec<String>,
    },
    #[error("no Linux kernel found; looked at:\n{}", list(.looked))]
    NoKernel { looked: Vec<String> },
    #[error("{path} on partition {number} is a 32-bit kernel; vmrun boots 64-bit guests only")]
    Kernel32 { path: String, number: u32 },
    #[error(
        "{path} on partition {number} is not a Linux kernel (neither a bzImage nor an ELF vmlinux)"
    )]
    NotKernel { path: String, number: u32 },
}

fn list(v: &[String]) -> String {
    v.iter()
        .map(|s| format!("  {s}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where a file was found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PartInfo {
    pub number: u32,
    pub table: TableKind,
    pub fs: String,
    pub uuid: String,
    pub partuuid: String,
    pub size: u64,
}

/// What to boot.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BootEntry {
    /// How it was found: `extlinux`, `grub`, `bls`, `vmlinuz`.
    pub method: String,
    /// The configuration file (with its partition), when one was used.
    pub config: Option<String>,
    /// Entry title or label.
    pub title: String,
    /// Kernel path on its partition.
    pub kernel_path: String,
    /// `bzImage` or `ELF`.
    pub kernel_format: String,
    /// Initrd paths (concatenated when more than one).
    pub initrd_paths: Vec<String>,
    /// Command line from the entry.
    pub cmdline: String,
    /// Partition holding the kernel.
    pub partition: PartInfo,
    /// What was examined on the way.
    pub looked_at: Vec<String>,
    #[serde(skip)]
    pub kernel: Vec<u8>,
    #[serde(skip)]
    pub initrd: Option<Vec<u8>>,
}

struct Part {
    p: Partition,
    fs: Option<Fs>,
}

impl Part {
    fn info(&self, table: TableKind) -> PartInfo {
        PartInfo {
            number: self.p.number,
            table,
            fs: self
                .fs
                .as_ref()
                .map(|f| f.kind().to_string())
                .unwrap_or_default(),
            uuid: self.fs.as_ref().map(Fs::uuid).unwrap_or_default(),
            partuuid: self.p.partuuid.clone(),
            size: self.p.size,
        }
    }
}

fn mib(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", n >> 20)
    }
}

const EXTLINUX: &[&str] = &[
    "/boot/extlinux/extlinux.conf",
    "/extlinux/extlinux.conf",
    "/boot/extlinux.conf",
    "/extlinux.conf",
    "/boot/syslinux/syslinux.cfg",
    "/syslinux/syslinux.cfg",
    "/syslinux.cfg",
];
const GRUB: &[&str] = &[
    "/boot/grub/grub.cfg",
    "/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/grub2/grub.cfg",
];

const GRUB_LEGACY: &[&str] = &[
    "/boot/grub/menu.lst",
    "/grub/menu.lst",
    "/boot/grub/grub.conf",
    "/grub/grub.conf",
];

/// Find what to boot on `dev`.
pub fn find_boot(dev: Arc<dyn BlockDevice>) -> Result<BootEntry, DiskBootError> {
    // A filesystem on the whole disk (a FAT boot sector also ends in 55aa
    // and can pass for an empty MBR).
    let whole = Slice::new(dev.clone(), 0, dev.size());
    let bare = match fs::probe(&whole) {
        Probe::Ext(k) => Some(format!(
            "it holds a bare {k} filesystem: boot it with -kernel and root=/dev/vda"
        )),
        Probe::Fat => Some("it holds a bare FAT filesystem".into()),
        Probe::Unsupported(k) => Some(format!("it holds a bare {k} filesystem")),
        Probe::Unknown => None,
    };
    let table = match partitions::read_table(&*dev) {
        Ok(Some(t)) if !(t.partitions.is_empty() && bare.is_some()) => t,
        Ok(_) => return Err(DiskBootError::NoPartitionTable { hint: bare }),
        Err(partitions::TableError::Io(e)) => return Err(DiskBootError::Io(e.to_string())),
        Err(partitions::TableError::Invalid(_)) if bare.is_some() => {
            return Err(DiskBootError::NoPartitionTable { hint: bare })
        }
        Err(partitions::TableError::Invalid(m)) => return Err(DiskBootError::BadTable(m)),
    };
    let kind = table.kind;
    let mut looked = Vec::new();
    let mut parts = Vec::new();
    let mut unsupported: Option<(String, u32)> = None;
    if table.partitions.is_empty() {
        looked.push(format!("{} partition table: no partitions", kind.name()));
    }
    for p in &table.partitions {
        let s = Slice::new(dev.clone(), p.start, p.size);
        let probe = fs::probe(&s);
        let what = format!(
            "partition {} ({}, {}{})",
            p.number,
            kind.name(),
            mib(p.size),
            if p.esp { ", EFI system" } else { "" }
        );
        match Fs::open(&s, &probe) {
            Ok((f, note)) => {
                if let Some(n) = note {
                    looked.push(format!("{what}: {n}"));
                }
                parts.push(Part {
                    p: p.clone(),
                    fs: Some(f),
                });
            }
            Err(e) => {
                if let Probe::Unsupported(k) = probe {
                    unsupported.get_or_insert((k.to_string(), p.number));
                }
                looked.push(format!("{what}: {e}"));
            }
        }
    }
    if parts.is_empty() {
        return Err(match unsupported {
            Some((kind, number)) => DiskBootError::UnsupportedFs {
                kind,
                number,
                looked,
            },
            None => DiskBootError::NoReadableFs { looked },
        });
    }
    let mut ctx = Ctx {
        parts: &parts,
        kind,
        looked,
    };
    ctx.search()
}

struct Ctx<'a> {
    parts: &'a [Part],
    kind: TableKind,
    looked: Vec<String>,
}

struct Found {
    method: &'static str,
    config: Option<String>,
    entry: Entry,
    /// Partition index (into parts) whose filesystem the paths refer to.
    part: usize,
    /// Directory relative paths are taken from.
    base: String,
}

impl Ctx<'_> {
    fn fs(&self, i: usize) -> &Fs {
        // Only readable partitions are kept.
        self.parts[i].fs.as_ref().expect("readable partition")
    }

    fn label(&self, i: usize) -> String {
        format!(
            "partition {} ({})",
            self.parts[i].p.number,
            self.fs(i).kind()
        )
    }

    fn read_text(&mut self, i: usize, path: &str) -> Option<String> {
        match self.fs(i).read(path) {
            Ok(Some(d)) => Some(String::from_utf8_lossy(&d).into_owned()),
            Ok(None) => None,
            Err(e) => {
                let l = self.label(i);
                self.looked.push(format!("{l}: {e}"));
                None
            }
        }
    }

    fn search(&mut self) -> Result<BootEntry, DiskBootError> {
        let n = self.parts.len();
        // 1. systemd-boot entries on an ESP / XBOOTLDR partition.
        for i in 0..n {
            if let Some(f) = self.bls(i, "/loader") {
                if let Some(e) = self.finish(f)? {
                    return Ok(e);
                }
            }
        }
        // 2. GRUB (BIOS layout, then EFI/<vendor>/grub.cfg on an ESP).
        for i in 0..n {
            let mut paths: Vec<String> = GRUB.iter().map(|s| s.to_string()).collect();
            for d in self.fs(i).subdirs("/EFI") {
                paths.push(format!("/EFI/{d}/grub.cfg"));
            }
            for path in paths {
                if let Some(f) = self.grub(i, &path, 0) {
                    if let Some(e) = self.finish(f)? {
                        return Ok(e);
                    }
                }
            }
        }
        // 2b. GRUB legacy.
        for i in 0..n {
            for path in GRUB_LEGACY {
                let Some(text) = self.read_text(i, path) else {
                    continue;
                };
                let where_ = format!("{} on {}", path, self.label(i));
                match config::grub_legacy(&text) {
                    Parsed::Entry(entry) => {
                        let part = self.root_part(i, entry.root.as_ref());
                        let f = Found {
                            method: "grub-legacy",
                            config: Some(where_),
                            entry,
                            part,
                            base: String::new(),
                        };
                        if let Some(e) = self.finish(f)? {
                            return Ok(e);
                        }
                    }
                    Parsed::None(why) => self.looked.push(format!("{where_}: {why}")),
                    _ => {}
                }
            }
        }
        // 3. extlinux / syslinux.
        for i in 0..n {
            for path in EXTLINUX {
                let Some(text) = self.read_text(i, path) else {
                    continue;
                };
                let where_ = format!("{} on {}", path, self.label(i));
                match config::extlinux(&text) {
                    Parsed::Entry(entry) => {
                        let base = path.rsplit_once('/').map(|x| x.0).unwrap_or("").to_string();
                        let f = Found {
                            method: "extlinux",
                            config: Some(where_),
                            entry,
                            part: i,
                            base,
                        };
                        if let Some(e) = self.finish(f)? {
                            return Ok(e);
                        }
                    }
                    Parsed::None(why) => self.looked.push(format!("{where_}: {why}")),
                    _ => {}
                }
            }
        }
        // 4. BLS entries in /boot of a root filesystem.
        for i in 0..n {
            if let Some(f) = self.bls(i, "/boot/loader") {
                if let Some(e) = self.finish(f)? {
                    return Ok(e);
                }
            }
        }
        // 5. The newest vmlinuz-*.
        if let Some(e) = self.newest_vmlinuz()? {
            return Ok(e);
        }
        for i in 0..n {
            let l = self.label(i);
            self.looked.push(format!(
                "{l}: no loader/entries/*.conf, grub.cfg, extlinux.conf or vmlinuz-* in / or /boot"
            ));
        }
        Err(DiskBootError::NoKernel {
            looked: std::mem::take(&mut self.looked),
        })
    }

    fn bls(&mut self, i: usize, dir: &str) -> Option<Found> {
        let edir = format!("{dir}/entries");
        let mut files: Vec<String> = self
            .fs(i)
            .list(&edir)
            .into_iter()
            .filter(|f| f.to_ascii_lowercase().ends_with(".conf"))
            .collect();
        if files.is_empty() {
            return None;
        }
        files.sort();
        let mut entries = Vec::new();
        for f in &files {
            if let Some(t) = self.read_text(i, &format!("{edir}/{f}")) {
                let e = config::bls_entry(f, &t);
                if e.entry.kernel.is_empty() {
                    let l = self.label(i);
                    self.looked
                        .push(format!("{edir}/{f} on {l}: no linux line"));
                } else {
                    entries.push(e);
                }
            }
        }
        let loader = self.read_text(i, &format!("{dir}/loader.conf"));
        let mut chosen = config::bls_default(entries, loader.as_deref())?;
        // Fedora's `options $kernelopts`: GRUB's blscfg expands it from grubenv.
        if chosen.entry.options.contains('$') {
            for env in [
                "/grub2/grubenv",
                "/boot/grub2/grubenv",
                "/grub/grubenv",
                "/boot/grub/grubenv",
            ] {
                if let Some(e) = self.read_text(i, env) {
                    chosen.entry.options = config::expand_grubenv(&chosen.entry.options, &e);
                    break;
                }
            }
        }
        // Paths in entries are relative to the partition holding them; on a
        // root filesystem (/boot/loader) that is /boot.
        let base = dir.trim_end_matches("/loader").to_string();
        Some(Found {
            method: "bls",
            config: Some(format!("{edir}/{} on {}", chosen.file, self.label(i))),
            entry: chosen.entry,
            part: i,
            base,
        })
    }

    fn grub(&mut self, i: usize, path: &str, depth: u32) -> Option<Found> {
        let text = self.read_text(i, path)?;
        let where_ = format!("{path} on {}", self.label(i));
        let env_path = format!(
            "{}/grubenv",
            path.rsplit_once('/').map(|x| x.0).unwrap_or("")
        );
        let env = self.read_text(i, &env_path).unwrap_or_default();
        match config::grub_with_env(&text, &env) {
            Parsed::Entry(entry) => {
                let part = self.root_part(i, entry.root.as_ref());
                Some(Found {
                    method: "grub",
                    config: Some(where_),
                    entry,
                    part,
                    base: String::new(),
                })
            }
            Parsed::ConfigFile(p, root) if depth < 4 => {
                let (hint, p) = config::split_device(&p);
                let j = self.root_part(i, hint.as_ref().or(root.as_ref()));
                self.looked
                    .push(format!("{where_}: configfile {p} on {}", self.label(j)));
                self.grub(j, &p, depth + 1)
            }
            Parsed::Bls(root) => {
                let j = self.root_part(i, root.as_ref());
                self.looked.push(format!("{where_}: blscfg"));
                self.bls(j, "/boot/loader")
                    .or_else(|| self.bls(j, "/loader"))
            }
            Parsed::None(why) => {
                self.looked.push(format!("{where_}: {why}"));
                None
            }
            Parsed::ConfigFile(..) => None,
        }
    }

    /// The partition a GRUB root hint names (default: `i`).
    fn root_part(&mut self, i: usize, hint: Option<&RootHint>) -> usize {
        let Some(h) = hint else { return i };
        let found = self.parts.iter().position(|p| {
            let Some(f) = &p.fs else { return false };
            match h {
                RootHint::Uuid(u) => f.uuid().eq_ignore_ascii_case(u),
                RootHint::Label(l) => f.label() == *l,
                RootHint::Part(n) => p.p.number == *n,
            }
        });
        match found {
            Some(j) => j,
            None => {
                self.looked.push(format!(
                    "GRUB root {h:?} matches no readable partition; using {}",
                    self.label(i)
                ));
                i
            }
        }
    }

    /// Resolve a path of an entry on partition `i`: as written (relative
    /// ones against `base`), then without or with a leading `/boot` (for a
    /// separate /boot partition).
    fn resolve(&mut self, i: usize, base: &str, path: &str) -> Option<(String, Vec<u8>)> {
        let (hint, path) = config::split_device(path);
        let i = if hint.is_some() {
            self.root_part(i, hint.as_ref())
        } else {
            i
        };
        let abs = normalize(&if path.starts_with('/') {
            path.clone()
        } else {
            format!("{base}/{path}")
        });
        let mut cands = vec![abs.clone()];
        match abs.strip_prefix("/boot/") {
            Some(r) => cands.push(format!("/{r}")),
            None => cands.push(format!("/boot{abs}")),
        }
        for c in cands {
            match self.fs(i).read(&c) {
                Ok(Some(d)) => return Some((c, d)),
                Ok(None) => {}
                Err(e) => {
                    let l = self.label(i);
                    self.looked.push(format!("{l}: {e}"));
                }
            }
        }
        None
    }

    fn finish(&mut self, f: Found) -> Result<Option<BootEntry>, DiskBootError> {
        let cfg = f.config.clone().unwrap_or_default();
        let Some((kpath, kernel)) = self.resolve(f.part, &f.base, &f.entry.kernel) else {
            let l = self.label(f.part);
            self.looked.push(format!(
                "{cfg}: entry '{}' names kernel {}, not found on {l}",
                f.entry.title, f.entry.kernel
            ));
            return Ok(None);
        };
        let mut initrd = Vec::new();
        let mut ipaths = Vec::new();
        for ip in &f.entry.initrds {
            match self.resolve(f.part, &f.base, ip) {
                Some((p, d)) => {
                    ipaths.push(p);
                    initrd.extend_from_slice(&d);
                }
                None => {
                    let l = self.label(f.part);
                    self.looked.push(format!(
                        "{cfg}: entry '{}' names initrd {ip}, not found on {l}",
                        f.entry.title
                    ));
                    return Ok(None);
                }
            }
        }
        let format = kernel_format(&kernel, &kpath, self.parts[f.part].p.number)?;
        Ok(Some(BootEntry {
            method: f.method.into(),
            config: f.config,
            title: f.entry.title,
            kernel_path: kpath,
            kernel_format: format.into(),
            initrd_paths: ipaths,
            cmdline: f.entry.options,
            partition: self.parts[f.part].info(self.kind),
            looked_at: std::mem::take(&mut self.looked),
            kernel,
            initrd: (!initrd.is_empty()).then_some(initrd),
        }))
    }

    fn newest_vmlinuz(&mut self) -> Result<Option<BootEntry>, DiskBootError> {
        let mut best: Option<(usize, String, String)> = None; // part, dir, version
        for i in 0..self.parts.len() {
            for dir in ["/boot", ""] {
                let listing = self.fs(i).list(if dir.is_empty() { "/" } else { dir });
                for name in listing {
                    let Some(v) = name.strip_prefix("vmlinuz-") else {
                        continue;
                    };
                    let newer = match &best {
                        None => true,
                        Some((_, _, bv)) => config::version_cmp(v, bv).is_gt(),
                    };
                    if newer {
                        best = Some((i, dir.to_string(), v.to_string()));
                    }
                }
            }
        }
        let Some((i, dir, ver)) = best else {
            return Ok(None);
        };
        let kpath = format!("{dir}/vmlinuz-{ver}");
        let initrds: Vec<String> = [
            format!("initrd.img-{ver}"),
            format!("initramfs-{ver}.img"),
            format!("initrd-{ver}.img"),
            format!("initrd-{ver}"),
        ]
        .into_iter()
        .map(|n| format!("{dir}/{n}"))
        .filter(|p| self.fs(i).exists(p))
        .take(1)
        .collect();
        // Root: this partition when the kernel is in its /boot; for a
        // separate /boot partition, the first one that looks like a root.
        let root = if dir == "/boot" {
            i
        } else {
            (0..self.parts.len())
                .find(|&j| j != i && self.fs(j).exists("/etc/fstab"))
                .unwrap_or(i)
        };
        let rp = &self.parts[root].p;
        let root_arg = if rp.partuuid.starts_with("00000000-") {
            format!("/dev/vda{}", rp.number)
        } else {
            format!("PARTUUID={}", rp.partuuid)
        };
        let l = self.label(i);
        let f = Found {
            method: "vmlinuz",
            config: None,
            entry: Entry {
                title: format!("newest kernel vmlinuz-{ver} on {l}"),
                kernel: kpath,
                initrds,
                options: format!("root={root_arg} ro"),
                root: None,
            },
            part: i,
            base: String::new(),
        };
        self.finish(f)
    }
}

/// Resolve `.` and `..` lexically (`/boot/extlinux/../vmlinuz` is
/// `/boot/vmlinuz`).
fn normalize(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    format!("/{}", out.join("/"))
}

/// `bzImage` or `ELF`; errors for 32-bit and non-kernels.
fn kernel_format(k: &[u8], path: &str, number: u32) -> Result<&'static str, DiskBootError> {
    if super::decompress::is_bzimage(k) {
        let word = |o: usize| {
            u16::from_le_bytes([
                k.get(o).copied().unwrap_or(0),
                k.get(o + 1).copied().unwrap_or(0),
            ])
        };
        let (version, xloadflags) = (word(0x206), word(0x236));
        // Before boot protocol 2.12 the header does not say; look at the
        // ELF class of the compressed kernel.
        let elf32 = if version >= 0x020c {
            xloadflags & 1 == 0
        } else {
            super::decompress::payload(k)
                .ok()
                .and_then(|p| super::decompress::decompress(p).ok())
                .is_some_and(|elf| elf.starts_with(b"\x7fELF") && elf.get(4) == Some(&1))
        };
        if elf32 {
            return Err(DiskBootError::Kernel32 {
                path: path.into(),
                number,
            });
        }
        return Ok("bzImage");
    }
    if k.starts_with(b"\x7fELF") {
        if k.get(4) == Some(&1) {
            return Err(DiskBootError::Kernel32 {
                path: path.into(),
                number,
            });
        }
        return Ok("ELF");
    }
    Err(DiskBootError::NotKernel {
        path: path.into(),
        number,
    })
}

/// Kernel and initrd of a [`BootEntry`] in anonymous memory files, with
/// paths (`/proc/self/fd/N`) that [`crate::boot::load`] can read. Nothing
/// is written to disk; the files go away with this value.
pub struct Staged {
    _fds: Vec<std::os::fd::OwnedFd>,
    pub kernel: std::path::PathBuf,
    pub initrd: Option<std::path::PathBuf>,
}

fn memfd(name: &str, data: &[u8]) -> std::io::Result<(std::os::fd::OwnedFd, std::path::PathBuf)> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: valid NUL-terminated name; the returned fd is checked and owned below.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(owned.try_clone()?);
    f.write_all(data)?;
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", owned.as_raw_fd()));
    Ok((owned, path))
}

impl BootEntry {
    /// Put the kernel and initrd where the loader can read them.
    pub fn stage(&self) -> std::io::Result<Staged> {
        let (kfd, kernel) = memfd("vmrun-kernel", &self.kernel)?;
        let mut fds = vec![kfd];
        let initrd = match &self.initrd {
            Some(d) => {
                let (ifd, p) = memfd("vmrun-initrd", d)?;
                fds.push(ifd);
                Some(p)
            }
            None => None,
        };
        Ok(Staged {
            _fds: fds,
            kernel,
            initrd,
        })
    }
}
