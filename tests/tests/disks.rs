//! Disks: vmrun's PCI bus, virtio-pci transport, virtio-blk and virtio-rng.
//!
//! Tiny guests (guests/tiny/virtioblk.S, blkwrite.S) drive the virtio-blk
//! queue directly and run in a second; the minimal Linux guest
//! (build/guest/bzImage from scripts/build-guest.sh) boots twice: a qcow2
//! root with a read-only raw second disk, and a read-only root. Images are
//! made by vimg and mkfs.ext4 and checked with qemu-img and dumpe2fs.
//! `VTOOLS_SKIP_LINUX=1` skips the Linux boots (with a printed reason).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{bin, kvm_available};

/// A scratch directory on the target's file system (O_DIRECT works there,
/// unlike on tmpfs).
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("disks-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch dir")
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("run command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn vmrun(args: &[&str]) -> (i32, String, String) {
    run(Command::new(bin("vmrun")).args(args))
}

fn tool(name: &str, args: &[&str]) -> (i32, String, String) {
    let path = if name == "vimg" {
        bin("vimg")
    } else {
        PathBuf::from(name)
    };
    run(Command::new(path).args(args))
}

fn ok(name: &str, args: &[&str]) -> String {
    let (c, o, e) = tool(name, args);
    assert_eq!(c, 0, "{name} {args:?} failed: {o}{e}");
    o
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A qcow2 image of `size` made by vimg.
fn qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    ok("vimg", &["create", "-f", "qcow2", s(&p), size]);
    p
}

/// A raw image of `size` made by vimg.
fn raw(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    ok("vimg", &["create", "-f", "raw", s(&p), size]);
    p
}

/// The first bytes of the guest-visible disk (qcow2 read through qemu-img).
fn disk_head(img: &Path, n: usize) -> Vec<u8> {
    let out = img.with_extension("head.raw");
    ok(
        "qemu-img",
        &[
            "dd",
            "-O",
            "raw",
            &format!("if={}", s(img)),
            &format!("of={}", s(&out)),
            "bs=512",
            "count=1",
        ],
    );
    let v = std::fs::read(&out).expect("read head");
    let _ = std::fs::remove_file(&out);
    v[..n].to_vec()
}

const TINY_LINES: &[&str] = &[
    "write ok\n",
    "read back ok\n",
    "read past the end: IOERR ok\n",
    "loop chain: NEEDS_RESET ok\n",
    "address outside RAM: NEEDS_RESET ok\n",
    "oversized length: NEEDS_RESET ok\n",
    "next index past the queue: NEEDS_RESET ok\n",
    "read after reset ok\n",
];

#[test]
fn tiny_guest_drives_virtio_blk_and_survives_malformed_chains() {
    if !kvm_available() {
        return;
    }
    let d = scratch();
    let img = raw(d.path(), "t.raw", "1M");
    let drive = format!("file={},format=raw,serial=TINYSERIAL01", s(&img));
    let (code, out, err) = vmrun(&[
        "-kernel",
        env!("TINY_VIRTIOBLK"),
        "-m",
        "64",
        "-drive",
        &drive,
    ]);
    for l in TINY_LINES {
        assert!(out.contains(l), "missing {l:?} in:\n{out}\nstderr: {err}");
    }
    assert!(out.contains("serial=TINYSERIAL01\n"), "{out}");
    assert_eq!(code, 100, "{out}\n{err}");
    // Each malformed chain is reported once, and the VMM went on.
    assert_eq!(
        err.matches("io-blk0: malformed request on queue 0").count(),
        4,
        "{err}"
    );
    assert!(err.contains("outside guest RAM"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !err.contains("WARNING: Image format"),
        "format was given: {err}"
    );
    let data = std::fs::read(&img).unwrap();
    assert_eq!(
        &data[..8],
        b"DISKEISK",
        "the guest's write reached the image"
    );
}

#[test]
fn tiny_guest_on_qcow2_in_every_cache_mode() {
    if !kvm_available() {
        return;
    }
    let d = scratch();
    for mode in ["writeback", "none", "writethrough", "directsync", "unsafe"] {
        let img = qcow2(d.path(), &format!("{mode}.qcow2"), "4M");
        let aio = if mode == "none" { ",aio=native" } else { "" };
        let drive = format!("file={},if=virtio,cache={mode}{aio}", s(&img));
        let (code, out, err) = vmrun(&[
            "-kernel",
            env!("TINY_VIRTIOBLK"),
            "-m",
            "64",
            "-drive",
            &drive,
        ]);
        assert_eq!(code, 100, "cache={mode}: {out}\n{err}");
        let (c, o, e) = tool("qemu-img", &["check", s(&img)]);
        assert_eq!(c, 0, "cache={mode}: qemu-img check: {o}{e}");
        assert!(o.contains("No errors were found on the image."), "{o}");
        assert_eq!(disk_head(&img, 8), b"DISKEISK", "cache={mode}");
    }
}

#[test]
fn snapshot_leaves_images_unchanged() {
    if !kvm_available() {
        return;
    }
    let d = scratch();
    let tmp = d.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    for img in [
        qcow2(d.path(), "s.qcow2", "4M"),
        raw(d.path(), "s.raw", "4M"),
    ] {
        let before = std::fs::read(&img).unwrap();
        let drive = format!("file={}", s(&img));
        let (code, out, err) = run(Command::new(bin("vmrun")).env("TMPDIR", &tmp).args([
            "-kernel",
            env!("TINY_VIRTIOBLK"),
            "-m",
            "64",
            "-snapshot",
            "-drive",
            &drive,
        ]));
        // The guest read its own write back (from the overlay).
        assert_eq!(code, 100, "{out}\n{err}");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "{} changed",
            img.display()
        );
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "overlay left behind: {left:?}");
    }
}

#[test]
fn readonly_drive_and_hda_probe_warning() {
    if !kvm_available() {
        return;
    }
    let d = scratch();
    let img = raw(d.path(), "ro.raw", "1M");
    let drive = format!("file={},format=raw,readonly=on", s(&img));
    let (code, out, err) = vmrun(&[
        "-kernel",
        env!("TINY_VIRTIOBLK"),
        "-m",
        "64",
        "-drive",
        &drive,
    ]);
    // The write (check 3) fails with an error status; the image is untouched.
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(out.contains("FAILED check 00000003"), "{out}");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
    // -hda with a probed raw image: QEMU's warning, and the disk works.
    let (code, out, err) = vmrun(&[
        "-kernel",
        env!("TINY_VIRTIOBLK"),
        "-m",
        "64",
        "-hda",
        s(&img),
    ]);
    assert_eq!(code, 100, "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.",
            s(&img)
        )),
        "{err}"
    );
}

#[test]
fn drive_option_errors() {
    let d = scratch();
    let img = raw(d.path(), "e.raw", "1M");
    let k = env!("TINY_VIRTIOBLK");
    let cases: &[(String, i32, &str)] = &[
        (
            format!("file={},if=ide", s(&img)),
            2,
            "if=ide is not supported, use if=virtio",
        ),
        (
            format!("file={},if=scsi", s(&img)),
            2,
            "if=scsi is not supported, use if=virtio",
        ),
        (
            format!("file={},format=raw,aio=native", s(&img)),
            2,
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ),
        (
            format!("file={},cache=fast", s(&img)),
            2,
            "invalid cache option",
        ),
        (
            format!("file={},format=vmdk", s(&img)),
            2,
            "Unknown driver 'vmdk'",
        ),
        (
            format!("file={},bogus=1", s(&img)),
            2,
            "Invalid parameter 'bogus'",
        ),
        (
            format!("file={}/missing.qcow2", s(d.path())),
            1,
            "missing.qcow2': No such file or directory",
        ),
    ];
    for (drive, want, msg) in cases {
        let (code, out, err) = vmrun(&["-kernel", k, "-m", "64", "-drive", drive]);
        assert_eq!(code, *want, "-drive {drive}: {out}{err}");
        assert!(err.contains(msg), "-drive {drive}: {err}");
        assert!(
            err.contains(&format!("-drive {drive}")),
            "names the option: {err}"
        );
    }
    let (code, _, err) = vmrun(&["-kernel", k, "-device", "e1000"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("device 'e1000' is not supported"), "{err}");
}

/// Start vmrun and wait until the guest printed `line` on stdout.
fn start_until(args: &[&str], line: &str) -> (Child, u32) {
    let mut child = Command::new(bin("vmrun"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmrun");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let want = line.to_string();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if l == want {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("guest did not print {line:?}"));
    (child, pid)
}

fn thread_names(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|s| s.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn images_are_locked_like_qemu_and_io_threads_are_named() {
    if !kvm_available() {
        return;
    }
    let d = scratch();
    let img = qcow2(d.path(), "l.qcow2", "4M");
    let drive = format!("file={},id=sys", s(&img));
    let (mut child, pid) = start_until(
        &[
            "-kernel",
            env!("TINY_BLKWRITE"),
            "-m",
            "64",
            "-drive",
            &drive,
            "-device",
            "virtio-rng-pci",
        ],
        "writing",
    );
    let names = thread_names(pid);
    // I/O threads exist only once the driver starts a device: the disk is
    // live; the rng's driver never ran.
    assert!(names.contains(&"io-sys".to_string()), "{names:?}");
    // QEMU's tools see the lock.
    let (c, o, e) = tool("qemu-img", &["info", s(&img)]);
    assert_ne!(c, 0, "qemu-img info succeeded on a busy image: {o}");
    assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
    // So does vimg.
    let (c, _, e) = tool("vimg", &["info", s(&img)]);
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
    // vpin sees the I/O thread with its role.
    let (c, o, e) = run(Command::new(bin("vpin")).args(["list", &pid.to_string()]));
    assert_eq!(c, 0, "{e}");
    assert!(
        o.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2) == Some(&"io-sys") && f.get(3) == Some(&"io")
        }),
        "{o}"
    );
    // vmrun refuses to open it a second time.
    let (c, _, e) = vmrun(&[
        "-kernel",
        env!("TINY_VIRTIOBLK"),
        "-m",
        "64",
        "-drive",
        &drive,
    ]);
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("Is another process using the image"), "{e}");
    // SIGTERM: clean stop, image consistent, lock released.
    // SAFETY-free: kill(1) by pid of our own child.
    assert!(Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success());
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    let (c, o, e) = tool("qemu-img", &["check", s(&img)]);
    assert_eq!(c, 0, "{o}{e}");
}

#[test]
fn kill_9_during_writethrough_writes_leaves_qcow2_consistent() {
    if !kvm_available() {
        return;
    }
    let d = scratch();
    let img = qcow2(d.path(), "crash.qcow2", "1G");
    let drive = format!("file={},cache=writethrough", s(&img));
    let (mut child, pid) = start_until(
        &[
            "-kernel",
            env!("TINY_BLKWRITE"),
            "-m",
            "64",
            "-drive",
            &drive,
        ],
        "writing",
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let _ = child.wait();
    let (c, o, e) = tool("qemu-img", &["check", s(&img)]);
    // 0: clean; 3: leaked clusters only (allowed after a crash, like QEMU).
    assert!(c == 0 || c == 3, "qemu-img check exit {c}: {o}{e}");
    assert!(!o.contains("ERROR") && !e.contains("ERROR"), "{o}{e}");
    let map = ok("qemu-img", &["map", "--output=json", s(&img)]);
    assert!(
        map.contains("\"data\": true"),
        "the guest wrote before the kill: {map}"
    );
}

// ---------------------------------------------------------------- Linux

fn linux_kernel() -> Option<PathBuf> {
    let k = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest/bzImage");
    if k.exists() {
        return Some(k);
    }
    if std::env::var("VTOOLS_SKIP_LINUX").as_deref() == Ok("1") {
        eprintln!("SKIP: {} is missing and VTOOLS_SKIP_LINUX=1", k.display());
        return None;
    }
    panic!(
        "{} is missing: build the test guest with scripts/build-guest.sh \
         (or set VTOOLS_SKIP_LINUX=1 to skip the Linux boots)",
        k.display()
    );
}

/// An ext4 file system in a raw image made by vimg.
fn ext4_raw(dir: &Path, name: &str) -> PathBuf {
    let p = raw(dir, name, "64M");
    let (c, o, e) = tool("mkfs.ext4", &["-q", "-F", "-L", "vtools", s(&p)]);
    assert_eq!(c, 0, "mkfs.ext4: {o}{e}");
    p
}

/// (mount count, last mount time) of the ext4 file system in an image.
fn ext4_mounts(img: &Path) -> (u64, String) {
    let r = img.with_extension("fsck.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(img), s(&r)]);
    let o = ok("dumpe2fs", &["-h", s(&r)]);
    let _ = std::fs::remove_file(&r);
    let field = |k: &str| {
        o.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    (
        field("Mount count:").parse().unwrap_or(0),
        field("Last mount time:"),
    )
}

/// Boot Linux; return the serial log and vmrun's stderr, and the I/O
/// thread names seen while it ran.
fn boot_linux(kernel: &Path, dir: &Path, args: &[&str]) -> (String, String, Vec<String>) {
    let log = dir.join("serial.log");
    let mut cmd = Command::new(bin("vmrun"));
    cmd.args(["-smp", "1", "-m", "256m", "-kernel", s(kernel)])
        .args(args)
        .args([
            "-serial",
            &format!("file:{}", s(&log)),
            "-display",
            "none",
            "-no-reboot",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start vmrun");
    let pid = child.id();
    let start = Instant::now();
    let mut io_threads = Vec::new();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        for n in thread_names(pid) {
            if n.starts_with("io-") && !io_threads.contains(&n) {
                io_threads.push(n);
            }
        }
        if start.elapsed() > Duration::from_secs(900) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "Linux did not finish in 15 minutes; serial log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut err = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("Linux boot took {:.0?}, vmrun {status}", start.elapsed());
    io_threads.sort();
    (serial, err, io_threads)
}

#[test]
fn linux_mounts_qcow2_root_rw_with_readonly_raw_second_disk() {
    if !kvm_available() {
        return;
    }
    let Some(kernel) = linux_kernel() else { return };
    let d = scratch();
    // With hardware KVM, user space runs: the root gets busybox and an init
    // that reads a file the host wrote and writes one the host reads. On
    // nested PVM hosts guest user space cannot run; the check stops at the
    // mount (the kernel then panics for want of init).
    let user_space =
        !Path::new("/sys/module/kvm_pvm").exists() && Path::new("/bin/busybox").exists();
    if !user_space {
        eprintln!(
            "NOTE: no guest user space on this host (nested PVM or no /bin/busybox): \
             file checks skipped"
        );
    }
    let base = if user_space {
        let tree = d.path().join("rootfs");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
        std::fs::write(tree.join("host.txt"), "host-wrote-this\n").unwrap();
        let init = "#!/bin/busybox sh\n\
                    /bin/busybox echo \"VTOOLS-DISK: $(/bin/busybox cat /host.txt)\"\n\
                    /bin/busybox echo guest-wrote-this > /guest.txt\n\
                    /bin/busybox sync\n\
                    /bin/busybox reboot -f\n";
        std::fs::write(tree.join("init"), init).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tree.join("init"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let p = raw(d.path(), "root.raw", "64M");
        let (c, o, e) = tool("mkfs.ext4", &["-q", "-F", "-d", s(&tree), s(&p)]);
        assert_eq!(c, 0, "mkfs.ext4 -d: {o}{e}");
        p
    } else {
        ext4_raw(d.path(), "root.raw")
    };
    let root = d.path().join("root.qcow2");
    ok("vimg", &["convert", "-O", "qcow2", s(&base), s(&root)]);
    let data = ext4_raw(d.path(), "data.raw");
    let data_before = std::fs::read(&data).unwrap();
    assert_eq!(ext4_mounts(&root).0, 0);
    let (serial, err, io) = boot_linux(
        &kernel,
        d.path(),
        &[
            "-append",
            if user_space {
                "console=ttyS0 root=/dev/vda rw panic=-1 reboot=t init=/init"
            } else {
                "console=ttyS0 root=/dev/vda rw panic=-1 reboot=t"
            },
            "-drive",
            &format!("file={},if=virtio,cache=writeback", s(&root)),
            "-drive",
            &format!("file={},format=raw,readonly=on,serial=DATA-DISK", s(&data)),
            "-device",
            "virtio-rng-pci",
        ],
    );
    let ctx = format!("serial log:\n{serial}\nstderr:\n{err}");
    assert!(
        serial.contains("PCI: Using configuration type 1 for base access"),
        "{ctx}"
    );
    assert!(
        serial.contains("[1af4:1042] type 00 class 0x010000"),
        "{ctx}"
    );
    assert!(
        serial.contains("[1af4:1044] type 00 class 0xff0000"),
        "{ctx}"
    );
    assert!(
        serial.contains(
            "virtio_blk virtio0: [vda] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)"
        ),
        "{ctx}"
    );
    assert!(
        serial.contains(
            "virtio_blk virtio1: [vdb] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)"
        ),
        "{ctx}"
    );
    assert!(
        serial.contains("EXT4-fs (vda): mounted filesystem"),
        "{ctx}"
    );
    assert!(
        serial.contains("VFS: Mounted root (ext4 filesystem) on device 254:0."),
        "{ctx}"
    );
    assert!(!err.contains("malformed"), "{ctx}");
    assert_eq!(io, ["io-blk0", "io-blk1", "io-rng0"], "{ctx}");
    // The guest wrote its superblock: mount count and time changed.
    let (count, when) = ext4_mounts(&root);
    assert_eq!(count, 1, "{ctx}");
    assert_ne!(when, "n/a", "{ctx}");
    let (c, o, e) = tool("qemu-img", &["check", s(&root)]);
    assert_eq!(c, 0, "{o}{e}");
    assert_eq!(
        std::fs::read(&data).unwrap(),
        data_before,
        "read-only disk changed"
    );
    if user_space {
        assert!(serial.contains("VTOOLS-DISK: host-wrote-this"), "{ctx}");
        let r = d.path().join("after.raw");
        ok("qemu-img", &["convert", "-O", "raw", s(&root), s(&r)]);
        let got = ok("debugfs", &["-R", "cat /guest.txt", s(&r)]);
        assert_eq!(got.trim(), "guest-wrote-this", "{ctx}");
    }
}

#[test]
fn linux_sees_a_readonly_root_as_read_only() {
    if !kvm_available() {
        return;
    }
    let Some(kernel) = linux_kernel() else { return };
    let d = scratch();
    let root = ext4_raw(d.path(), "ro.raw");
    let before = std::fs::read(&root).unwrap();
    let (serial, err, _) = boot_linux(
        &kernel,
        d.path(),
        &[
            "-append",
            "console=ttyS0 root=/dev/vda rw panic=-1 reboot=t",
            "-drive",
            &format!("file={},format=raw,readonly=on,cache=none", s(&root)),
        ],
    );
    let ctx = format!("serial log:\n{serial}\nstderr:\n{err}");
    assert!(
        serial.contains("[vda] 131072 512-byte logical blocks"),
        "{ctx}"
    );
    // The rw mount is refused (EACCES) and the kernel retries read-only.
    assert!(
        serial.contains("VFS: Mounted root (ext4 filesystem) readonly on device 254:0."),
        "{ctx}"
    );
    assert_eq!(
        std::fs::read(&root).unwrap(),
        before,
        "read-only image changed"
    );
}
