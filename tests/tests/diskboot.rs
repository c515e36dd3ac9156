//! `vmrun IMAGE`: booting a Linux disk image without firmware. Disk images
//! (raw and qcow2, MBR and GPT, extlinux/grub/BLS/bare vmlinuz) are built by
//! scripts/build-disk.sh from the minimal test guest; `--print-boot` checks
//! what vmrun finds on each (sfdisk and the script's fixed UUIDs are the
//! oracle), every error case checks its message and exit status, and one
//! image really boots.
//!
//! Without build/guest (scripts/build-guest.sh) the `--print-boot` tests use
//! a synthetic bzImage header; the boot test then fails, unless
//! `VTOOLS_SKIP_LINUX=1` (it prints SKIP).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use e2e::{bin, vmrun};

const FS_UUID: &str = "5a0c7e11-d15c-4b00-8000-00000000b007";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Run a bash script (set -e); panics with its output on failure.
fn sh(script: &str) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "script failed: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The guest files: build/guest when built, else a synthetic bzImage header
/// (enough for --print-boot) in a temporary directory.
fn guest() -> &'static Path {
    static G: OnceLock<PathBuf> = OnceLock::new();
    G.get_or_init(|| {
        let real = root().join("build/guest");
        if real.join("bzImage").exists()
            && (real.join("initramfs.cpio").exists() || real.join("initramfs.cpio.gz").exists())
        {
            return real;
        }
        eprintln!("note: build/guest is missing; --print-boot tests use a synthetic bzImage");
        let dir = std::env::temp_dir().join(format!("diskboot-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut k = vec![0u8; 0x2000];
        k[0x1f1] = 1; // setup_sects
        k[0x1fe] = 0x55;
        k[0x1ff] = 0xaa;
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        k[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        k[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        k[0x300..0x30c].copy_from_slice(b"6.1.0-synth ");
        std::fs::write(dir.join("bzImage"), k).unwrap();
        sh(&format!(
            "cd {d} && mkdir -p ird/bin && echo '#!/bin/sh' > ird/init && \
             (cd ird && find . | cpio -o -H newc --quiet) | gzip > initramfs.cpio.gz",
            d = dir.display()
        ));
        dir
    })
}

/// The initramfs build-disk.sh -i installs (uncompressed when built).
fn initramfs() -> PathBuf {
    let g = guest().join("initramfs.cpio");
    if g.exists() {
        g
    } else {
        guest().join("initramfs.cpio.gz")
    }
}

fn kernel_release() -> String {
    let k = std::fs::read(guest().join("bzImage")).unwrap();
    let off = u16::from_le_bytes([k[0x20e], k[0x20f]]) as usize + 0x200;
    let s: Vec<u8> = k[off..]
        .iter()
        .take_while(|&&c| c != 0 && c != b' ')
        .copied()
        .collect();
    String::from_utf8(s).unwrap()
}

/// Build a disk with scripts/build-disk.sh.
fn build_disk(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let st = Command::new(root().join("scripts/build-disk.sh"))
        .args(args)
        .arg("-o")
        .arg(&out)
        .env("GUEST", guest())
        .output()
        .expect("run build-disk.sh");
    assert!(
        st.status.success(),
        "build-disk.sh {args:?} failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

/// PARTUUID of partition `n` per sfdisk (qcow2 converted to raw first).
fn sfdisk_partuuid(img: &Path, n: u32) -> String {
    let raw = if img.extension().is_some_and(|e| e == "qcow2") {
        let r = img.with_extension("oracle.raw");
        sh(&format!(
            "qemu-img convert -O raw {} {}",
            img.display(),
            r.display()
        ));
        r
    } else {
        img.to_path_buf()
    };
    let label = sh(&format!(
        "sfdisk --dump {} | sed -n 's/^label: //p'",
        raw.display()
    ));
    if label.trim() == "dos" {
        let id = sh(&format!("sfdisk --disk-id {}", raw.display()));
        let id = u32::from_str_radix(id.trim().trim_start_matches("0x"), 16).unwrap();
        return format!("{id:08x}-{n:02x}");
    }
    sh(&format!("sfdisk --part-uuid {} {n}", raw.display()))
        .trim()
        .to_lowercase()
}

fn print_boot_json(img: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--print-boot", "--output", "json"];
    args.extend_from_slice(extra);
    let p = img.to_str().unwrap();
    args.push(p);
    let (code, out, err) = vmrun(&args);
    assert_eq!(code, 0, "vmrun {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

struct Case {
    name: &'static str,
    args: &'static [&'static str],
    method: &'static str,
    part: u64,
    fs: &'static str,
    table: &'static str,
    /// Kernel path with `V` for the release.
    kernel: &'static str,
    initrd: Option<&'static str>,
    /// Marker in the entry's command line (None: the bare vmlinuz entry).
    marker: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        name: "gpt-extlinux.qcow2",
        args: &["-t", "gpt", "-c", "extlinux", "-f", "qcow2"],
        method: "extlinux",
        part: 1,
        fs: "ext4",
        table: "gpt",
        kernel: "/boot/vmlinuz-V",
        initrd: None,
        marker: Some("vtools.entry=extlinux"),
    },
    Case {
        name: "mbr-extlinux.img",
        args: &["-t", "mbr", "-c", "extlinux", "-f", "raw", "-i"],
        method: "extlinux",
        part: 1,
        fs: "ext4",
        table: "mbr",
        kernel: "/boot/vmlinuz-V",
        initrd: Some("/boot/initrd.img-V"),
        marker: Some("vtools.entry=extlinux"),
    },
    Case {
        name: "gpt-grub.img",
        args: &["-t", "gpt", "-c", "grub", "-f", "raw", "-i"],
        method: "grub",
        part: 1,
        fs: "ext4",
        table: "gpt",
        kernel: "/boot/vmlinuz-V",
        initrd: Some("/boot/initrd.img-V"),
        marker: Some("vtools.entry=grub-default"),
    },
    Case {
        name: "mbr-grub.qcow2",
        args: &["-t", "mbr", "-c", "grub", "-f", "qcow2"],
        method: "grub",
        part: 1,
        fs: "ext4",
        table: "mbr",
        kernel: "/boot/vmlinuz-V",
        initrd: None,
        marker: Some("vtools.entry=grub-default"),
    },
    Case {
        name: "gpt-bls.qcow2",
        args: &["-t", "gpt", "-c", "bls", "-f", "qcow2", "-i"],
        method: "bls",
        part: 1,
        fs: "vfat",
        table: "gpt",
        kernel: "/vmlinuz-V",
        initrd: Some("/initrd.img-V"),
        marker: Some("vtools.entry=bls"),
    },
    Case {
        name: "mbr-bls.img",
        args: &["-t", "mbr", "-c", "bls", "-f", "raw"],
        method: "bls",
        part: 1,
        fs: "vfat",
        table: "mbr",
        kernel: "/vmlinuz-V",
        initrd: None,
        marker: Some("vtools.entry=bls"),
    },
    Case {
        name: "gpt-vmlinuz.img",
        args: &["-t", "gpt", "-c", "vmlinuz", "-f", "raw", "-i"],
        method: "vmlinuz",
        part: 1,
        fs: "ext4",
        table: "gpt",
        kernel: "/boot/vmlinuz-V",
        initrd: Some("/boot/initrd.img-V"),
        marker: None,
    },
    Case {
        name: "mbr-vmlinuz.qcow2",
        args: &["-t", "mbr", "-c", "vmlinuz", "-f", "qcow2"],
        method: "vmlinuz",
        part: 1,
        fs: "ext4",
        table: "mbr",
        kernel: "/boot/vmlinuz-V",
        initrd: None,
        marker: None,
    },
];

#[test]
fn print_boot_finds_the_default_entry_on_every_image_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let rel = kernel_release();
    let ksize = std::fs::metadata(guest().join("bzImage")).unwrap().len();
    let isize = std::fs::metadata(initramfs()).unwrap().len();
    for c in CASES {
        let img = build_disk(tmp.path(), c.name, c.args);
        let before = std::fs::read(&img).unwrap();
        let j = print_boot_json(&img, &[]);
        let ctx = format!("{}: {j:#}", c.name);
        assert_eq!(j["method"], c.method, "{ctx}");
        assert_eq!(
            j["format"],
            if c.name.ends_with("qcow2") {
                "qcow2"
            } else {
                "raw"
            },
            "{ctx}"
        );
        assert_eq!(j["partition"]["number"], c.part, "{ctx}");
        assert_eq!(j["partition"]["table"], c.table, "{ctx}");
        assert_eq!(j["partition"]["fs"], c.fs, "{ctx}");
        let partuuid = sfdisk_partuuid(&img, c.part as u32);
        assert_eq!(j["partition"]["partuuid"], partuuid.as_str(), "{ctx}");
        if c.fs == "ext4" {
            assert_eq!(j["partition"]["uuid"], FS_UUID, "{ctx}");
        } else {
            assert_eq!(j["partition"]["uuid"], "1234-ABCD", "{ctx}");
        }
        assert_eq!(j["kernel_path"], c.kernel.replace('V', &rel), "{ctx}");
        assert_eq!(j["kernel_format"], "bzImage", "{ctx}");
        assert_eq!(j["kernel_size"], ksize, "{ctx}");
        match c.initrd {
            Some(i) => {
                assert_eq!(j["initrd_paths"][0], i.replace('V', &rel), "{ctx}");
                assert_eq!(j["initrd_size"], isize, "{ctx}");
            }
            None => assert_eq!(j["initrd_paths"].as_array().unwrap().len(), 0, "{ctx}"),
        }
        let cmdline = j["cmdline"].as_str().unwrap();
        match c.marker {
            Some(m) => {
                let root = if c.method == "bls" { "vda2" } else { "vda1" };
                let want =
                    format!("root=/dev/{root} rw init=/init panic=-1 reboot=k {m} console=ttyS0");
                assert_eq!(cmdline, want, "{ctx}");
                assert_eq!(j["entry_cmdline"], want.trim_end_matches(" console=ttyS0"));
            }
            None => assert_eq!(
                cmdline,
                format!("root=PARTUUID={partuuid} ro console=ttyS0"),
                "{ctx}"
            ),
        }
        // Looking never writes.
        assert!(std::fs::read(&img).unwrap() == before, "{} changed", c.name);
    }
}

#[test]
fn print_boot_human_output_append_console_and_backing_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let rel = kernel_release();
    let img = build_disk(tmp.path(), "base.qcow2", &["-c", "extlinux", "-i"]);
    let p = img.to_str().unwrap();
    let partuuid = sfdisk_partuuid(&img, 1);
    let (code, out, err) = vmrun(&["-print-boot", p]);
    assert_eq!(code, 0, "{err}");
    let ksize = std::fs::metadata(guest().join("bzImage")).unwrap().len();
    let isize = std::fs::metadata(initramfs()).unwrap().len();
    assert_eq!(
        out,
        format!(
            "image:     {p} (qcow2)\n\
             partition: 1 (gpt, ext4, UUID={FS_UUID}, PARTUUID={partuuid})\n\
             config:    extlinux /boot/extlinux/extlinux.conf on partition 1 (ext4)\n\
             entry:     vtools\n\
             kernel:    /boot/vmlinuz-{rel} (bzImage, {ksize} bytes)\n\
             initrd:    /boot/initrd.img-{rel} ({isize} bytes)\n\
             cmdline:   root=/dev/vda1 rw init=/init panic=-1 reboot=k vtools.entry=extlinux console=ttyS0\n"
        )
    );
    // -append adds to the entry; a console= given anywhere is kept as is;
    // no serial port, no console=ttyS0.
    let j = print_boot_json(&img, &["-append", "quiet"]);
    assert!(
        j["cmdline"]
            .as_str()
            .unwrap()
            .ends_with("vtools.entry=extlinux quiet console=ttyS0"),
        "{j}"
    );
    let j = print_boot_json(&img, &["-append", "console=hvc0"]);
    assert!(
        j["cmdline"]
            .as_str()
            .unwrap()
            .ends_with("vtools.entry=extlinux console=hvc0"),
        "{j}"
    );
    let j = print_boot_json(&img, &["-serial", "none"]);
    assert!(
        j["cmdline"]
            .as_str()
            .unwrap()
            .ends_with("vtools.entry=extlinux"),
        "{j}"
    );

    // The boot disk can also be -hda, or the -drive with index=0.
    let j = print_boot_json(Path::new(p), &["-hda"]);
    assert_eq!(j["kernel_path"], format!("/boot/vmlinuz-{rel}"));
    let drive0 = format!("file={p},format=qcow2,index=0");
    let (code, out, err) = vmrun(&[
        "--print-boot",
        "-drive",
        "file=/nonexistent/data.img,format=raw",
        "-drive",
        &drive0,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("image:     {p} (qcow2)\n")), "{out}");
    let drive_b = format!("file={p},if=none,id=b");
    let (code, out, err) = vmrun(&[
        "--print-boot",
        "-drive",
        "file=/nonexistent/a.img,if=none,id=a",
        "-drive",
        &drive_b,
        "-device",
        "virtio-blk-pci,drive=a,bootindex=1",
        "-device",
        "virtio-blk-pci,drive=b,bootindex=0",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("image:     {p} (qcow2)\n")), "{out}");
    let (code, _, err) = vmrun(&[
        "--print-boot",
        "-drive",
        &drive_b,
        "-device",
        "virtio-blk-pci,drive=b,bootindex=first",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bootindex expects a non-negative number, not 'first'"),
        "{err}"
    );
    let (code, _, err) = vmrun(&["--print-boot", "-hda", p, p]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("name the first disk; give one"), "{err}");

    // A qcow2 overlay reads through to its backing file.
    let over = tmp.path().join("overlay.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 -b {p} -F qcow2 {}",
        over.display()
    ));
    let j = print_boot_json(&over, &[]);
    assert_eq!(j["kernel_path"], format!("/boot/vmlinuz-{rel}"));
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["kernel_size"], ksize);
}

/// A raw disk with one partition (type per table) of `mib` MiB at 1 MiB,
/// filled by `fill` (a shell snippet writing $PART, a file of that size).
fn disk_with(dir: &Path, name: &str, table: &str, fill: &str) -> PathBuf {
    let img = dir.join(name);
    let d = dir.join(format!("{name}.d"));
    sh(&format!(
        "d={d}; img={img}; mkdir -p $d; PART=$d/part.img; truncate -s 32M $PART
         {fill}
         truncate -s 34M $img
         printf 'label: {table}\\nstart=2048, size=65536\\n' | sfdisk -q $img >/dev/null
         dd if=$PART of=$img bs=1M seek=1 conv=notrunc status=none",
        d = d.display(),
        img = img.display()
    ));
    img
}

fn expect_error(img: &Path, code: i32, needles: &[&str]) -> String {
    let (c, out, err) = vmrun(&["--print-boot", img.to_str().unwrap()]);
    assert_eq!(c, code, "{}: stdout {out}\nstderr {err}", img.display());
    assert!(out.is_empty(), "{out}");
    for n in needles {
        assert!(
            err.contains(n),
            "{}: expected {n:?} in:\n{err}",
            img.display()
        );
    }
    err
}

#[test]
fn errors_say_what_is_wrong_and_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    // No partition table: zeroes, and a bare ext4 filesystem.
    let blank = t.join("blank.img");
    sh(&format!("truncate -s 8M {}", blank.display()));
    let err = expect_error(
        &blank,
        1,
        &[
            "cannot boot",
            "blank.img",
            "has no partition table (MBR or GPT)",
        ],
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let bare = t.join("bare.img");
    sh(&format!(
        "truncate -s 8M {b}; mkfs.ext4 -q {b}",
        b = bare.display()
    ));
    expect_error(
        &bare,
        1,
        &["no partition table", "bare ext4 filesystem", "-kernel"],
    );

    let fat = t.join("fat.img");
    sh(&format!(
        "truncate -s 40M {b}; mkfs.vfat {b} >/dev/null",
        b = fat.display()
    ));
    expect_error(
        &fat,
        1,
        &["no partition table (MBR or GPT); it holds a bare FAT filesystem"],
    );

    // A partition with nothing recognisable on it.
    let empty = disk_with(t, "empty.img", "gpt", "");
    expect_error(
        &empty,
        1,
        &[
            "no readable filesystem",
            "ext2/3/4 and FAT",
            "partition 1 (gpt, 32 MiB): no filesystem recognised",
        ],
    );

    // Recognised but unsupported: swap.
    let swap = disk_with(t, "swap.img", "dos", "mkswap -q $PART >/dev/null");
    expect_error(
        &swap,
        1,
        &[
            "unsupported filesystem swap on partition 1",
            "partition 1 (mbr, 32 MiB): unsupported filesystem swap",
        ],
    );

    // A readable filesystem without a kernel: the list of what was looked at.
    let nok = disk_with(
        t,
        "nokernel.img",
        "gpt",
        "mkdir -p $d/root/etc $d/root/boot/extlinux; echo x > $d/root/etc/hostname
         printf 'DEFAULT a\\nLABEL a\\n LINUX /boot/vmlinuz-gone\\n APPEND root=/dev/vda1\\n' > $d/root/boot/extlinux/extlinux.conf
         mkfs.ext4 -q -F -d $d/root $PART >/dev/null",
    );
    expect_error(
        &nok,
        1,
        &[
            "no Linux kernel found; looked at:",
            "/boot/extlinux/extlinux.conf on partition 1 (ext4): entry 'a' names kernel /boot/vmlinuz-gone, not found",
            "partition 1 (ext4): no loader/entries/*.conf, grub.cfg, extlinux.conf or vmlinuz-* in / or /boot",
        ],
    );

    // A 32-bit kernel (boot protocol 2.12+ header without XLF_KERNEL_64).
    let k32 = disk_with(
        t,
        "k32.img",
        "dos",
        &format!(
            "mkdir -p $d/root/boot; cp {k} $d/root/boot/vmlinuz-6.1-i686
             printf '\\x00' | dd of=$d/root/boot/vmlinuz-6.1-i686 bs=1 seek=$((0x236)) conv=notrunc status=none
             mkfs.ext4 -q -F -d $d/root $PART >/dev/null",
            k = guest().join("bzImage").display()
        ),
    );
    expect_error(&k32, 1, &["/boot/vmlinuz-6.1-i686 on partition 1 is a 32-bit kernel; vmrun boots 64-bit guests only"]);

    // A 32-bit ELF vmlinux (the ELF class byte says so), named by extlinux.
    let e32 = disk_with(
        t,
        "elf32.img",
        "gpt",
        "mkdir -p $d/root/boot/extlinux
         printf '\\177ELF\\001\\001\\001' > $d/root/boot/vmlinux-i386
         head -c 4096 /dev/zero >> $d/root/boot/vmlinux-i386
         printf 'LABEL l\n LINUX /boot/vmlinux-i386\n' > $d/root/boot/extlinux/extlinux.conf
         mkfs.ext4 -q -F -d $d/root $PART >/dev/null",
    );
    expect_error(
        &e32,
        1,
        &["/boot/vmlinux-i386 on partition 1 is a 32-bit kernel; vmrun boots 64-bit guests only"],
    );

    // Something that is not a kernel where the config says one is.
    let junk = disk_with(
        t,
        "junk.img",
        "gpt",
        "mkdir -p $d/root/boot; echo 'not a kernel' > $d/root/boot/vmlinuz-1.0
         mkfs.ext4 -q -F -d $d/root $PART >/dev/null",
    );
    expect_error(
        &junk,
        1,
        &["/boot/vmlinuz-1.0 on partition 1 is not a Linux kernel"],
    );

    // Damaged GPT (primary and backup headers).
    let bad = disk_with(t, "badgpt.img", "gpt", "");
    sh(&format!(
        "b={}; printf 'XX' | dd of=$b bs=1 seek=$((512+20)) conv=notrunc status=none
         printf 'XX' | dd of=$b bs=1 seek=$(( $(stat -c %s $b) - 512 + 20 )) conv=notrunc status=none",
        bad.display()
    ));
    expect_error(
        &bad,
        1,
        &[
            "partition table is invalid",
            "GPT headers (primary and backup) fail their checksums",
        ],
    );

    // Missing image, -bios, usage errors.
    let (c, _, err) = vmrun(&["--print-boot", "/nonexistent/disk.qcow2"]);
    assert_eq!(c, 1, "{err}");
    assert!(
        err.contains("Could not open '/nonexistent/disk.qcow2'"),
        "{err}"
    );
    let (c, _, err) = vmrun(&["-bios", "OVMF.fd", "-m", "64", blank.to_str().unwrap()]);
    assert_eq!(c, 1, "{err}");
    assert!(
        err.contains("-bios OVMF.fd: firmware boot is not supported yet"),
        "{err}"
    );
    let (c, _, err) = vmrun(&["--print-boot"]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("--print-boot needs a disk IMAGE"), "{err}");
    let (c, _, err) = vmrun(&["-initrd", "x.img", blank.to_str().unwrap()]);
    assert_eq!(c, 2, "{err}");
    assert!(
        err.contains("-initrd x.img: an initrd needs -kernel"),
        "{err}"
    );
    let (c, _, err) = vmrun(&["-m", "64"]);
    assert_eq!(c, 2, "{err}");
    assert!(
        err.contains("no kernel given: use -kernel FILE, or give a disk IMAGE"),
        "{err}"
    );
}

/// The one real boot: a qcow2 GPT disk with extlinux.conf. The kernel gets
/// the entry's command line and, the image being the guest's virtio-blk
/// vda, mounts vda1 and runs the disk's /init. Where user space runs, init
/// reboots and vmrun exits by itself (-no-reboot); on nested PVM hosts it
/// cannot run, so vmrun is stopped with SIGTERM (exit 0) 15 s after
/// `Run /init`. Afterwards the image, left with a journal to recover,
/// still boots.
#[test]
fn linux_boots_from_a_qcow2_gpt_extlinux_disk() {
    let real = root().join("build/guest/bzImage");
    if !real.exists() {
        if std::env::var("VTOOLS_SKIP_LINUX").as_deref() == Ok("1") {
            eprintln!(
                "SKIP: {} is missing and VTOOLS_SKIP_LINUX=1",
                real.display()
            );
            return;
        }
        panic!(
            "{} is missing: run scripts/build-guest.sh (or set VTOOLS_SKIP_LINUX=1 to skip the Linux boot)",
            real.display()
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = build_disk(
        tmp.path(),
        "disk.qcow2",
        &["-t", "gpt", "-c", "extlinux", "-f", "qcow2"],
    );
    let log_path = tmp.path().join("serial.log");
    let start = Instant::now();
    let mut child = Command::new(bin("vmrun"))
        .args(["-m", "256m", "-nographic", "-no-reboot", "-serial"])
        .arg(format!("file:{}", log_path.display()))
        .arg(&img)
        .env("VMRUN_CACHE_DIR", tmp.path().join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmrun");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut ended_at = None;
    let mut signalled = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        let log = read_log();
        if log.contains("Run /init as init process") && ended_at.is_none() {
            ended_at = Some(Instant::now());
        }
        let waited_after_end = ended_at.is_some_and(|t| t.elapsed().as_secs() > 15);
        if !signalled && (waited_after_end || start.elapsed().as_secs() > 480) {
            eprintln!(
                "vmrun still running {:.0?} after start; stopping it with SIGTERM",
                start.elapsed()
            );
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            signalled = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let mut err = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let log = read_log();
    eprintln!("boot took {:.1?}; stderr:\n{err}", start.elapsed());
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let tail = tail.join("\n");
    assert_eq!(status.code(), Some(0), "log tail:\n{tail}");
    assert!(
        log.contains(
            "Command line: root=/dev/vda1 rw init=/init panic=-1 reboot=k vtools.entry=extlinux console=ttyS0"
        ),
        "log tail:\n{tail}"
    );
    assert!(
        log.contains("EXT4-fs (vda1): mounted filesystem"),
        "log tail:\n{tail}"
    );
    assert!(
        log.contains("Run /init as init process"),
        "log tail:\n{tail}"
    );

    // The guest mounted vda1 read-write and did not unmount it.
    let p = img.to_str().unwrap();
    let (code, out, err) = vmrun(&["--print-boot", p]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kernel:    /boot/vmlinuz-"), "{out}");
    if out.contains("journal needs recovery") {
        assert!(out.contains("read as last checkpointed"), "{out}");
    }
}

/// GRUB legacy on a separate ext2 /boot partition (an older distribution's
/// layout): menu.lst's `root (hd0,0)` and paths relative to /boot; the bare
/// vmlinuz fallback on the same layout picks the root partition by /etc/fstab.
#[test]
fn grub_legacy_on_a_separate_boot_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let k = guest().join("bzImage");
    let build = |name: &str, menu: bool| -> PathBuf {
        let img = d.join(name);
        sh(&format!(
            "d={d}/{name}.d; img={img}; mkdir -p $d/boot/grub $d/root/etc
             cp {k} $d/boot/vmlinuz-6.1.0-2-amd64
             echo initrd > $d/boot/initrd.img-6.1.0-2-amd64
             {menu}
             echo '/dev/vda2 / ext4 defaults 0 1' > $d/root/etc/fstab
             truncate -s 16M $d/boot.img $d/root.img
             mkfs.ext2 -q -F -d $d/boot $d/boot.img >/dev/null
             mkfs.ext4 -q -F -d $d/root $d/root.img >/dev/null
             truncate -s 34M $img
             printf 'label: dos\\nlabel-id: 0x12345678\\nstart=2048, size=32768, bootable\\nstart=34816, size=32768\\n' | sfdisk -q $img >/dev/null
             dd if=$d/boot.img of=$img bs=1M seek=1 conv=notrunc status=none
             dd if=$d/root.img of=$img bs=1M seek=17 conv=notrunc status=none",
            d = d.display(),
            img = img.display(),
            k = k.display(),
            menu = if menu {
                "printf 'default 0\\ntimeout 5\\n\\ntitle Debian GNU/Linux, kernel 6.1.0-2-amd64\\nroot (hd0,0)\\nkernel /vmlinuz-6.1.0-2-amd64 root=/dev/vda2 ro quiet\\ninitrd /initrd.img-6.1.0-2-amd64\\n' > $d/boot/grub/menu.lst"
            } else {
                ""
            }
        ));
        img
    };
    let j = print_boot_json(&build("legacy.img", true), &[]);
    assert_eq!(j["method"], "grub-legacy", "{j}");
    assert_eq!(j["config"], "/grub/menu.lst on partition 1 (ext2)", "{j}");
    assert_eq!(j["partition"]["fs"], "ext2", "{j}");
    assert_eq!(j["kernel_path"], "/vmlinuz-6.1.0-2-amd64", "{j}");
    assert_eq!(j["initrd_paths"][0], "/initrd.img-6.1.0-2-amd64", "{j}");
    assert_eq!(j["initrd_size"], 7, "{j}");
    assert_eq!(j["cmdline"], "root=/dev/vda2 ro quiet console=ttyS0", "{j}");

    let j = print_boot_json(&build("bare.img", false), &[]);
    assert_eq!(j["method"], "vmlinuz", "{j}");
    assert_eq!(j["kernel_path"], "/vmlinuz-6.1.0-2-amd64", "{j}");
    assert_eq!(j["partition"]["number"], 1, "{j}");
    assert_eq!(
        j["cmdline"], "root=PARTUUID=12345678-02 ro console=ttyS0",
        "{j}"
    );
}

/// Partition-table corners: a root in a logical partition of an MBR
/// extended partition (Linux numbers it 5), and a GPT whose primary header
/// is damaged (the backup at the end of the disk is used).
#[test]
fn logical_partitions_and_backup_gpt() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let k = guest().join("bzImage");
    let img = d.join("logical.img");
    sh(&format!(
        "d={d}; img={img}; mkdir -p $d/root/boot
         cp {k} $d/root/boot/vmlinuz-6.1.0
         truncate -s 16M $d/root.img; mkfs.ext4 -q -F -d $d/root $d/root.img >/dev/null
         truncate -s 40M $img
         printf 'label: dos\\nlabel-id: 0xcafe0001\\nstart=2048, size=4096, type=83\\nstart=8192, size=65536, type=5\\nstart=10240, size=32768, type=83\\n' | sfdisk -q $img >/dev/null
         dd if=$d/root.img of=$img bs=512 seek=10240 conv=notrunc status=none",
        d = d.display(),
        img = img.display(),
        k = k.display()
    ));
    // The oracle: sfdisk numbers the logical partition 5.
    let dump = sh(&format!("sfdisk --dump {}", img.display()));
    assert!(dump.contains("logical.img5 : start=       10240"), "{dump}");
    let j = print_boot_json(&img, &[]);
    assert_eq!(j["partition"]["number"], 5, "{j}");
    assert_eq!(j["partition"]["partuuid"], "cafe0001-05", "{j}");
    assert_eq!(
        j["cmdline"], "root=PARTUUID=cafe0001-05 ro console=ttyS0",
        "{j}"
    );
    let notes = j["looked_at"].to_string();
    assert!(
        notes.contains("partition 1 (mbr, 2 MiB): no filesystem recognised"),
        "{j}"
    );

    // Damage the primary GPT header: the backup still describes the disk.
    let gpt = build_disk(d, "gpt.img", &["-t", "gpt", "-c", "extlinux", "-f", "raw"]);
    let want = print_boot_json(&gpt, &[]);
    sh(&format!(
        "printf 'XXXX' | dd of={} bs=1 seek=$((512+24)) conv=notrunc status=none",
        gpt.display()
    ));
    let j = print_boot_json(&gpt, &[]);
    assert_eq!(j["partition"], want["partition"], "{j}");
    assert_eq!(j["cmdline"], want["cmdline"], "{j}");
}

/// A Fedora-style layout: an ESP with a GRUB stub, a separate ext4 /boot
/// with BLS entries whose options are `$kernelopts` from grub2/grubenv.
#[test]
fn fedora_style_bls_with_kernelopts_in_grubenv() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("fedora.img");
    sh(&format!(
        "d={d}; img={img}; mkdir -p $d/esp/EFI/fedora $d/boot/grub2 $d/boot/loader/entries $d/root/etc
         printf 'search --no-floppy --fs-uuid --set=dev 1c0f-b007\\nset prefix=($dev)/grub2\\nexport $prefix\\nconfigfile $prefix/grub.cfg\\n' > $d/esp/EFI/fedora/grub.cfg
         printf 'set default=\"${{saved_entry}}\"\\nload_env\\nblscfg\\n' > $d/boot/grub2/grub.cfg
         printf '# GRUB Environment Block\\nsaved_entry=abc-6.1.0-1.fc38.x86_64\\nkernelopts=root=UUID=1c0f-r00t ro rhgb quiet\\n' > $d/boot/grub2/grubenv
         printf 'title Fedora Linux (6.1.0-1.fc38.x86_64)\\nversion 6.1.0-1.fc38.x86_64\\nlinux /vmlinuz-6.1.0-1.fc38.x86_64\\ninitrd /initramfs-6.1.0-1.fc38.x86_64.img\\noptions $kernelopts\\n' > $d/boot/loader/entries/abc-6.1.0-1.fc38.x86_64.conf
         cp {k} $d/boot/vmlinuz-6.1.0-1.fc38.x86_64
         echo initramfs > $d/boot/initramfs-6.1.0-1.fc38.x86_64.img
         echo 'UUID=1c0f-r00t / ext4 defaults 1 1' > $d/root/etc/fstab
         truncate -s 16M $d/esp.img $d/boot.img $d/root.img
         mkfs.vfat $d/esp.img >/dev/null; mcopy -s -i $d/esp.img $d/esp/EFI ::/
         mkfs.ext4 -q -F -d $d/boot $d/boot.img >/dev/null
         mkfs.ext4 -q -F -d $d/root $d/root.img >/dev/null
         truncate -s 50M $img
         printf 'label: gpt\\nstart=2048, size=32768, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\\nsize=32768\\nsize=32768\\n' | sfdisk -q $img >/dev/null
         dd if=$d/esp.img of=$img bs=1M seek=1 conv=notrunc status=none
         dd if=$d/boot.img of=$img bs=1M seek=17 conv=notrunc status=none
         dd if=$d/root.img of=$img bs=1M seek=33 conv=notrunc status=none",
        d = d.display(),
        img = img.display(),
        k = guest().join("bzImage").display()
    ));
    let j = print_boot_json(&img, &[]);
    assert_eq!(j["method"], "bls", "{j}");
    assert_eq!(
        j["config"], "/loader/entries/abc-6.1.0-1.fc38.x86_64.conf on partition 2 (ext4)",
        "{j}"
    );
    assert_eq!(j["kernel_path"], "/vmlinuz-6.1.0-1.fc38.x86_64", "{j}");
    assert_eq!(
        j["initrd_paths"][0], "/initramfs-6.1.0-1.fc38.x86_64.img",
        "{j}"
    );
    assert_eq!(
        j["cmdline"], "root=UUID=1c0f-r00t ro rhgb quiet console=ttyS0",
        "{j}"
    );
}
