//! vimg against the real qemu-img 10 (the oracle): same stdout, same
//! stderr (modulo the `qemu-img:`/`vimg:` prefix), same exit codes; and
//! everything vimg writes passes `qemu-img check` and reads back the
//! expected bytes (`qemu-img compare`, `qemu-io -c 'read -P'`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Out {
    rc: i32,
    stdout: String,
    stderr: String,
}

fn run_in(dir: &Path, prog: &Path, args: &[&str]) -> Out {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", prog.display()));
    Out {
        rc: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// qemu-img and qemu-io, or None (with the reason printed) when missing.
fn oracle() -> Option<(PathBuf, PathBuf)> {
    let (Some(qi), Some(_)) = (which("qemu-img"), which("qemu-io")) else {
        eprintln!("SKIP: qemu-img/qemu-io not installed; the vimg oracle tests need them");
        return None;
    };
    let v = run_in(Path::new("."), &qi, &["--version"]);
    eprintln!("oracle: {}", v.stdout.lines().next().unwrap_or(""));
    // Run them by name so that their messages say `qemu-img`, not a path.
    Some((PathBuf::from("qemu-img"), PathBuf::from("qemu-io")))
}

fn vimg() -> PathBuf {
    e2e::bin("vimg")
}

struct Env {
    qi: PathBuf,
    qio: PathBuf,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Option<Env> {
        let (qi, qio) = oracle()?;
        Some(Env {
            qi,
            qio,
            dir: tempfile::tempdir().unwrap(),
        })
    }
    fn p(&self) -> &Path {
        self.dir.path()
    }
    fn q(&self, args: &[&str]) -> Out {
        run_in(self.p(), &self.qi, args)
    }
    fn v(&self, args: &[&str]) -> Out {
        run_in(self.p(), &vimg(), args)
    }
    fn io(&self, img: &str, cmds: &[&str]) {
        let mut a: Vec<&str> = Vec::new();
        for c in cmds {
            a.push("-c");
            a.push(c);
        }
        a.push(img);
        let o = run_in(self.p(), &self.qio, &a);
        assert_eq!(o.rc, 0, "qemu-io {a:?}: {}", o.stderr);
        assert!(!o.stdout.contains("fail"), "qemu-io {a:?}: {}", o.stdout);
    }
    /// Run the same command with both tools; assert identical results.
    fn same(&self, args: &[&str]) {
        let q = self.q(args);
        let v = self.v(args);
        let qerr = q
            .stderr
            .replace("qemu-img:", "vimg:")
            .replace("Try 'qemu-img", "Try 'vimg");
        assert_eq!(
            (q.rc, &q.stdout, &qerr),
            (v.rc, &v.stdout, &v.stderr),
            "vimg {args:?} differs from qemu-img"
        );
    }
    /// Run qemu-img (preparing test images); it must succeed.
    fn q_ok(&self, args: &[&str]) {
        let o = self.q(args);
        assert_eq!(o.rc, 0, "qemu-img {args:?}: {}", o.stderr);
    }
    fn check_clean(&self, img: &str) {
        let o = self.q(&["check", img]);
        assert_eq!(o.rc, 0, "qemu-img check {img}: {}{}", o.stdout, o.stderr);
    }
    fn identical(&self, a: &str, b: &str) {
        let o = self.q(&["compare", a, b]);
        assert_eq!(
            o.rc, 0,
            "qemu-img compare {a} {b}: {}{}",
            o.stdout, o.stderr
        );
    }
}

/// Images made by qemu-img covering the format matrix.
fn make_matrix(e: &Env) -> Vec<String> {
    let mut imgs = Vec::new();
    let specs: &[(&str, &str, &str)] = &[
        ("v3.qcow2", "", "64M"),
        ("v2.qcow2", "compat=0.10", "64M"),
        ("c512.qcow2", "cluster_size=512,refcount_bits=1", "8M"),
        ("c2m.qcow2", "cluster_size=2M,refcount_bits=64", "64M"),
        ("rc8.qcow2", "refcount_bits=8,cluster_size=4k", "16M"),
        ("meta.qcow2", "preallocation=metadata", "64M"),
        (
            "falloc.qcow2",
            "preallocation=falloc,cluster_size=16k",
            "8M",
        ),
        ("full.qcow2", "preallocation=full,cluster_size=8k", "4M"),
        ("lazy.qcow2", "lazy_refcounts=on", "16M"),
        ("zstd.qcow2", "compression_type=zstd", "16M"),
        ("ext.qcow2", "extended_l2=on,cluster_size=64k", "16M"),
    ];
    for (name, o, size) in specs {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !o.is_empty() {
            args.push("-o");
            args.push(o);
        }
        args.push(name);
        args.push(size);
        assert_eq!(e.q(&args).rc, 0);
        e.io(
            name,
            &[
                "write -P 0x11 0 192k",
                "write -P 0x22 1M 64k",
                "write -z 2M 64k",
            ],
        );
        imgs.push(name.to_string());
    }
    // Backing chain, snapshots, compressed (zlib and zstd), raw.
    assert_eq!(
        e.q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "v3.qcow2",
            "-F",
            "qcow2",
            "over.qcow2"
        ])
        .rc,
        0
    );
    e.io(
        "over.qcow2",
        &["write -P 0x33 64k 64k", "write -P 0x44 5M 4k"],
    );
    assert_eq!(e.q(&["snapshot", "-c", "first", "over.qcow2"]).rc, 0);
    e.io("over.qcow2", &["write -P 0x55 128k 64k"]);
    assert_eq!(e.q(&["snapshot", "-c", "second one", "over.qcow2"]).rc, 0);
    imgs.push("over.qcow2".into());
    std::fs::write(
        e.p().join("text.raw"),
        "line of some fairly compressible text data\n".repeat(50_000),
    )
    .unwrap();
    for (name, o) in [
        ("cz.qcow2", "compression_type=zlib"),
        ("cs.qcow2", "compression_type=zstd"),
    ] {
        assert_eq!(
            e.q(&["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", o, "text.raw", name])
                .rc,
            0
        );
        imgs.push(name.to_string());
    }
    assert_eq!(e.q(&["create", "-q", "-f", "raw", "r.raw", "8M"]).rc, 0);
    e.io("r.raw", &["write -P 0x66 1M 4k"]);
    imgs.push("r.raw".into());
    // Dirty image: lazy refcounts, killed by abort.
    assert_eq!(
        e.q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "dirty.qcow2",
            "1M"
        ])
        .rc,
        0
    );
    let _ = run_in(
        e.p(),
        &e.qio,
        &["-c", "write 0 4k", "-c", "abort", "dirty.qcow2"],
    );
    imgs.push("dirty.qcow2".into());
    imgs
}

#[test]
fn info_map_check_measure_match_qemu_img() {
    let Some(e) = Env::new() else { return };
    let imgs = make_matrix(&e);
    for img in &imgs {
        let fmt = if img.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        e.same(&["info", img]);
        e.same(&["info", "--output=json", img]);
        e.same(&["info", "--output", "json", "--backing-chain", img]);
        e.same(&["info", "--backing-chain", img]);
        e.same(&["info", "-f", fmt, "-U", img]);
        e.same(&["map", "-f", fmt, img]);
        e.same(&["map", "-f", fmt, "--output=json", img]);
        e.same(&["check", img]);
        e.same(&["check", "--output=json", img]);
        e.same(&["measure", "-O", "qcow2", img]);
        e.same(&[
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            img,
        ]);
        e.same(&["measure", "-O", "raw", img]);
        e.same(&["snapshot", "-l", img]);
    }
    for args in [
        &["measure", "-O", "qcow2", "--size", "20G"][..],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
            "--size",
            "100G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on",
            "--size",
            "7G",
        ],
        &["measure", "-O", "qcow2"],
        &["info", "nonexistent.qcow2"],
        &["info", "-f", "foo", "v3.qcow2"],
        &["info", "--output=xml", "v3.qcow2"],
        &["check", "r.raw"],
        &["check", "-r", "bogus", "v3.qcow2"],
        &["check", "-U", "-r", "all", "v3.qcow2"],
    ] {
        e.same(args);
    }
}

#[test]
fn create_matches_qemu_img() {
    let Some(e) = Env::new() else { return };
    std::fs::create_dir(e.p().join("q")).unwrap();
    std::fs::create_dir(e.p().join("v")).unwrap();
    let qd = e.p().join("q");
    let vd = e.p().join("v");
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "a.qcow2", "1G"],
        &["-f", "qcow2", "-o", "compat=0.10", "a.qcow2", "1G"],
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
            "a.qcow2",
            "100M",
        ],
        &["-f", "qcow2", "-o", "cluster_size=2M", "a.qcow2", "50G"],
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "a.qcow2",
            "2G",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=falloc",
            "a.qcow2",
            "64M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=full,cluster_size=4k",
            "a.qcow2",
            "8M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,compression_type=zstd",
            "a.qcow2",
            "1G",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "a.qcow2",
            "10G",
        ],
        &["-f", "qcow2", "-o", "refcount_bits=64", "a.qcow2", "1.5G"],
        &["-f", "qcow2", "-o", "size=1.1k", "a.qcow2"],
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "a.qcow2",
            "20G",
        ],
        &["a.raw", "1000"],
        &["-f", "raw", "-o", "preallocation=falloc", "a.raw", "4M"],
        &["-f", "raw", "-o", "preallocation=full", "a.raw", "1M"],
        // Errors.
        &["-f", "qcow2", "a.qcow2", "1KiB"],
        &["-f", "qcow2", "a.qcow2", "8E"],
        &["-f", "qcow2", "a.qcow2", "1E"],
        &["-f", "qcow2", "a.qcow2"],
        &["-f", "qcow2", "-o", "cluster_size=3000", "a.qcow2", "1M"],
        &["-f", "qcow2", "-o", "preallocation=bogus", "a.qcow2", "1M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "a.qcow2",
            "1M",
        ],
        &["-f", "qcow2", "-o", "refcount_bits=3", "a.qcow2", "1M"],
        &["-f", "qcow2", "-o", "compat=2", "a.qcow2", "1M"],
        &["-f", "qcow2", "-o", "compression_type=lz", "a.qcow2", "1M"],
        &["-f", "qcow2", "-o", "lazy_refcounts=maybe", "a.qcow2", "1M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
            "a.qcow2",
            "1M",
        ],
        &["-f", "qcow2", "-o", "size=1G,foo=1", "a.qcow2"],
        &["-f", "raw", "-o", "preallocation=metadata", "a.raw", "1M"],
        &["-f", "raw", "-o", "cluster_size=4k", "a.raw", "1M"],
        &[
            "-f",
            "qcow2",
            "-b",
            "nonexist.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
        ],
    ];
    for c in cases {
        let mut args = vec!["create"];
        args.extend_from_slice(c);
        let q = run_in(&qd, &e.qi, &args);
        let v = run_in(&vd, &vimg(), &args);
        assert_eq!(
            (q.rc, &q.stdout, &q.stderr.replace("qemu-img:", "vimg:")),
            (v.rc, &v.stdout, &v.stderr),
            "create {c:?}"
        );
        let f = c.iter().rev().find(|a| a.starts_with("a.")).unwrap();
        assert_eq!(
            qd.join(f).exists(),
            vd.join(f).exists(),
            "create {c:?}: file left"
        );
        if vd.join(f).exists() {
            let qi = run_in(&qd, &e.qi, &["info", f]);
            let vi = run_in(&vd, &e.qi, &["info", f]);
            assert_eq!(qi.stdout, vi.stdout, "info after create {c:?}");
            if f.ends_with(".qcow2") {
                let ck = run_in(&vd, &e.qi, &["check", f]);
                assert_eq!(ck.rc, 0, "check after create {c:?}: {}", ck.stdout);
            }
            std::fs::remove_file(qd.join(f)).unwrap();
            std::fs::remove_file(vd.join(f)).unwrap();
        }
    }
    // Backing file: same line, same info.
    for d in [&qd, &vd] {
        assert_eq!(
            run_in(d, &e.qi, &["create", "-q", "-f", "qcow2", "b.qcow2", "64M"]).rc,
            0
        );
    }
    for c in [
        &[
            "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2",
        ][..],
        &["create", "-f", "qcow2", "-b", "b.qcow2", "o2.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "none.qcow2",
            "-F",
            "qcow2",
            "o3.qcow2",
            "1G",
        ],
    ] {
        let q = run_in(&qd, &e.qi, c);
        let v = run_in(&vd, &vimg(), c);
        assert_eq!(
            (q.rc, &q.stdout, q.stderr.replace("qemu-img:", "vimg:")),
            (v.rc, &v.stdout, v.stderr.clone()),
            "{c:?}"
        );
    }
    let qi = run_in(&qd, &e.qi, &["info", "--output=json", "o.qcow2"]);
    let vi = run_in(&vd, &e.qi, &["info", "--output=json", "o.qcow2"]);
    assert_eq!(qi.stdout, vi.stdout);
}

/// Edit a qcow2 image: (L1 offset, first L2 offset, first refblock offset).
fn layout(path: &Path) -> (u64, u64, u64) {
    let b = std::fs::read(path).unwrap();
    let be = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let l1 = be(40);
    let l2 = be(l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let rt = be(48);
    let rb = be(rt as usize);
    (l1, l2, rb)
}

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

#[test]
fn check_and_repair_match_qemu_img() {
    let Some(e) = Env::new() else { return };
    let mk = |name: &str| {
        assert_eq!(e.q(&["create", "-q", "-f", "qcow2", name, "16M"]).rc, 0);
        e.io(name, &["write -P 0x11 0 256k", "write -P 0x22 1M 64k"]);
        e.p().join(name)
    };
    // Leaks: drop two L2 entries.
    let p = mk("leak.qcow2");
    let (_, l2, rb) = layout(&p);
    poke(&p, l2 + 8, &[0; 16]);
    // Corruption: data cluster refcount 0; refcount 2.
    let p = mk("cor.qcow2");
    poke(&p, rb + 2 * 5, &0u16.to_be_bytes());
    let p = mk("rc2.qcow2");
    poke(&p, rb + 2 * 5, &2u16.to_be_bytes());
    // Missing COPIED flag; reserved bits; data beyond EOF; L1 reserved bits.
    let p = mk("copied.qcow2");
    let (l1, l2, _) = layout(&p);
    poke(&p, l2, &0x50000u64.to_be_bytes());
    let p = mk("resv.qcow2");
    poke(&p, l2, &0x8000_0000_0005_0100u64.to_be_bytes());
    let p = mk("beyond.qcow2");
    poke(&p, l2, &0x8000_0001_0000_0000u64.to_be_bytes());
    let p = mk("l1resv.qcow2");
    poke(&p, l1, &0x8000_0000_0004_0100u64.to_be_bytes());
    // Dirty (lazy refcounts, aborted).
    assert_eq!(
        e.q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "dirty.qcow2",
            "1M"
        ])
        .rc,
        0
    );
    let _ = run_in(
        e.p(),
        &e.qio,
        &["-c", "write 0 4k", "-c", "abort", "dirty.qcow2"],
    );
    for img in [
        "leak.qcow2",
        "cor.qcow2",
        "rc2.qcow2",
        "copied.qcow2",
        "resv.qcow2",
        "beyond.qcow2",
        "l1resv.qcow2",
        "dirty.qcow2",
    ] {
        e.same(&["check", img]);
        e.same(&["check", "--output=json", img]);
        for r in ["leaks", "all"] {
            for json in [false, true] {
                let qc = format!("q-{r}-{json}-{img}");
                let vc = format!("v-{r}-{json}-{img}");
                std::fs::copy(e.p().join(img), e.p().join(&qc)).unwrap();
                std::fs::copy(e.p().join(img), e.p().join(&vc)).unwrap();
                let mut qa = vec!["check", "-r", r];
                if json {
                    qa.push("--output=json");
                }
                let mut va = qa.clone();
                qa.push(&qc);
                va.push(&vc);
                let q = e.q(&qa);
                let v = e.v(&va);
                assert_eq!(q.rc, v.rc, "check -r {r} {img}: {}{}", v.stdout, v.stderr);
                assert_eq!(
                    q.stdout.replace(&qc, &vc),
                    v.stdout,
                    "check -r {r} {img} stdout"
                );
                assert_eq!(
                    q.stderr.replace("qemu-img:", "vimg:"),
                    v.stderr,
                    "check -r {r} {img} stderr"
                );
                // What qemu-img thinks of the repaired image is the same.
                let qa2 = e.q(&["check", &qc]);
                let va2 = e.q(&["check", &vc]);
                assert_eq!(qa2.rc, va2.rc, "after -r {r} {img}");
                if va2.rc == 0 || va2.rc == 3 {
                    e.identical(&qc, &vc);
                }
            }
        }
    }
}

#[test]
fn resize_matches_qemu_img() {
    let Some(e) = Env::new() else { return };
    let cases: &[(&str, &str, &[&str])] = &[
        ("qcow2", "1G", &["+1G"]),
        ("qcow2", "20G", &["+5G"]),
        ("qcow2", "64M", &["+100G"]),
        ("qcow2", "1G", &["--shrink", "--", "-512M"]),
        ("qcow2", "1G", &["--", "-512M"]),
        ("qcow2", "1G", &["1000"]),
        ("qcow2", "1G", &["+0"]),
        ("raw", "1G", &["+1000"]),
        ("raw", "1G", &["--shrink", "1000"]),
        ("qcow2", "1G", &["--preallocation=metadata", "+1G"]),
        ("qcow2", "1G", &["--preallocation=falloc", "+100M"]),
        ("raw", "1G", &["--preallocation=metadata", "+1G"]),
        ("raw", "1G", &["--preallocation=bogus", "+1G"]),
        ("qcow2", "1G", &["--shrink", "--", "-2G"]),
        ("qcow2", "1G", &["--shrink", "--", "-1G"]),
        ("raw", "1G", &["0"]),
        ("qcow2", "1G", &["abc"]),
        ("qcow2", "1G", &[]),
        (
            "qcow2",
            "1G",
            &["--preallocation=full", "--shrink", "--", "-1M"],
        ),
    ];
    for (i, (fmt, size, args)) in cases.iter().enumerate() {
        let qn = format!("q{i}.img");
        let vn = format!("v{i}.img");
        for n in [&qn, &vn] {
            assert_eq!(e.q(&["create", "-q", "-f", fmt, n, size]).rc, 0);
            let mut a = vec![
                "-f",
                fmt,
                "-c",
                "write -P 7 0 1M",
                "-c",
                "write -P 8 60M 64k",
            ];
            a.push(n);
            assert_eq!(run_in(e.p(), &e.qio, &a).rc, 0);
        }
        let mut qa = vec!["resize", "-f", fmt, &qn];
        qa.extend_from_slice(args);
        let mut va = vec!["resize", "-f", fmt, &vn];
        va.extend_from_slice(args);
        let q = e.q(&qa);
        let v = e.v(&va);
        assert_eq!(
            (q.rc, q.stdout.clone(), q.stderr.replace("qemu-img", "vimg")),
            (v.rc, v.stdout.clone(), v.stderr.clone()),
            "resize {args:?}"
        );
        let qi = e.q(&["info", "--output=json", &qn]);
        let vi = e.q(&["info", "--output=json", &vn]);
        let vs = |s: &str| {
            s.lines()
                .find(|l| l.starts_with("    \"virtual-size\""))
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(vs(&qi.stdout), vs(&vi.stdout), "resize {args:?}: size");
        e.identical(&qn, &vn);
        if *fmt == "qcow2" {
            e.check_clean(&vn);
            // Grows (any preallocation) and shrinks produce QEMU's exact
            // layout: the same `info` (file length included); the disk
            // size compared apart, within the ext4 extent-tree blocks that
            // depend on fragmentation (see same_file).
            if q.rc == 0 {
                let info = |n: &str| {
                    e.q(&["info", n])
                        .stdout
                        .replace(n, "X")
                        .lines()
                        .filter(|l| !l.trim_start().starts_with("disk size:"))
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                assert_eq!(info(&qn), info(&vn), "resize {args:?}: layout");
                let (_, qb, _) = sparse_layout(&e.p().join(&qn));
                let (_, vb, _) = sparse_layout(&e.p().join(&vn));
                assert!(
                    qb.abs_diff(vb) <= 64,
                    "resize {args:?}: allocated 512-byte blocks: qemu-img {qb}, vimg {vb}"
                );
            }
        }
    }
}

#[test]
fn convert_compare_snapshot_amend_produce_valid_images() {
    let Some(e) = Env::new() else { return };
    let imgs = make_matrix(&e);
    // convert every image to raw and to qcow2 variants; qemu-img compares.
    for img in &imgs {
        if img == "dirty.qcow2" {
            continue;
        }
        for (i, extra) in [
            &["-O", "raw"][..],
            &["-O", "qcow2"],
            &["-O", "qcow2", "-o", "compat=0.10,cluster_size=4k"],
            &["-c", "-O", "qcow2"],
            &["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
            &["-O", "qcow2", "-o", "extended_l2=on"],
            &["-S", "0", "-O", "qcow2"],
        ]
        .iter()
        .enumerate()
        {
            let out = format!("conv{i}-{img}");
            let mut a = vec!["convert"];
            a.extend_from_slice(extra);
            a.push(img);
            a.push(&out);
            let v = e.v(&a);
            assert_eq!(v.rc, 0, "{a:?}: {}", v.stderr);
            e.identical(img, &out);
            if extra.contains(&"qcow2") {
                e.check_clean(&out);
            }
            std::fs::remove_file(e.p().join(&out)).unwrap();
        }
    }
    // Repeats further apart than QEMU's 4 KiB inflate window (windowBits
    // -12): a compressor using a larger window would produce clusters
    // qemu-img cannot read.
    let mut far = Vec::new();
    let block = random_bytes(8192, 0x2545_f491_4f6c_dd1d);
    for _ in 0..64 {
        far.extend_from_slice(&block);
        far.extend_from_slice(&[0x5a; 100]);
        far.extend_from_slice(&block[..4000]);
    }
    far.resize(far.len().next_multiple_of(65536), 0);
    std::fs::write(e.p().join("far.raw"), &far).unwrap();
    for o in ["compression_type=zlib", "compression_type=zstd"] {
        let v = e.v(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            o,
            "far.raw",
            "far.qcow2",
        ]);
        assert_eq!(v.rc, 0, "{}", v.stderr);
        e.identical("far.raw", "far.qcow2");
        e.check_clean("far.qcow2");
    }
    // -B keeps the backing file.
    let v = e.v(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "v3.qcow2",
        "-F",
        "qcow2",
        "over.qcow2",
        "ob.qcow2",
    ]);
    assert_eq!(v.rc, 0, "{}", v.stderr);
    e.identical("over.qcow2", "ob.qcow2");
    e.check_clean("ob.qcow2");
    let i = e.q(&["info", "ob.qcow2"]);
    assert!(
        i.stdout.contains("backing file: v3.qcow2\n"),
        "{}",
        i.stdout
    );
    // compare: same messages and exit codes.
    assert_eq!(
        e.q(&["convert", "-O", "qcow2", "v3.qcow2", "v3b.qcow2"]).rc,
        0
    );
    e.io("v3b.qcow2", &["write -P 0x77 1000 1"]);
    for args in [
        &["compare", "v3.qcow2", "v3.qcow2"][..],
        &["compare", "v3.qcow2", "v3b.qcow2"],
        &["compare", "over.qcow2", "v3.qcow2"],
        &["compare", "-s", "over.qcow2", "v3.qcow2"],
        &["compare", "-f", "raw", "-F", "qcow2", "r.raw", "v3.qcow2"],
        &["compare", "v3.qcow2", "missing.qcow2"],
        &["compare", "cz.qcow2", "cs.qcow2"],
    ] {
        e.same(args);
    }
    // Snapshots: create, apply, delete; qemu-img reads the result.
    assert_eq!(
        e.q(&["create", "-q", "-f", "qcow2", "s.qcow2", "16M"]).rc,
        0
    );
    e.io("s.qcow2", &["write -P 1 0 1M"]);
    assert_eq!(e.v(&["snapshot", "-c", "first", "s.qcow2"]).rc, 0);
    e.io("s.qcow2", &["write -P 2 512k 1M"]);
    assert_eq!(e.v(&["snapshot", "-c", "second", "s.qcow2"]).rc, 0);
    e.check_clean("s.qcow2");
    e.same(&["snapshot", "-l", "s.qcow2"]);
    assert_eq!(e.v(&["snapshot", "-a", "first", "s.qcow2"]).rc, 0);
    e.check_clean("s.qcow2");
    e.io("s.qcow2", &["read -P 1 0 1M", "read -P 0 1M 1M"]);
    assert_eq!(e.v(&["snapshot", "-a", "2", "s.qcow2"]).rc, 0);
    e.io("s.qcow2", &["read -P 1 0 512k", "read -P 2 512k 1M"]);
    assert_eq!(e.v(&["snapshot", "-d", "first", "s.qcow2"]).rc, 0);
    e.check_clean("s.qcow2");
    e.same(&["snapshot", "-d", "nope", "s.qcow2"]);
    assert_eq!(e.q(&["snapshot", "-a", "second", "s.qcow2"]).rc, 0);
    e.io("s.qcow2", &["read -P 2 512k 1M"]);
    // Snapshots made by vimg can be applied by qemu-img and vice versa.
    assert_eq!(e.q(&["snapshot", "-c", "byqemu", "s.qcow2"]).rc, 0);
    e.io("s.qcow2", &["write -P 9 0 64k"]);
    assert_eq!(e.v(&["snapshot", "-a", "byqemu", "s.qcow2"]).rc, 0);
    e.io("s.qcow2", &["read -P 1 0 512k"]);
    e.check_clean("s.qcow2");
    // amend.
    for o in [
        "compat=0.10",
        "compat=1.1,lazy_refcounts=on,refcount_bits=8",
        "refcount_bits=64",
        "lazy_refcounts=off,refcount_bits=16",
    ] {
        let v = e.v(&["amend", "-o", o, "s.qcow2"]);
        assert_eq!(v.rc, 0, "amend {o}: {}", v.stderr);
        e.check_clean("s.qcow2");
        e.io("s.qcow2", &["read -P 1 0 512k"]);
    }
    let i = e.q(&["info", "s.qcow2"]).stdout;
    assert!(
        i.contains("refcount bits: 16") && i.contains("lazy refcounts: false"),
        "{i}"
    );
    for args in [
        &["amend", "-o", "cluster_size=4k", "s.qcow2"][..],
        &["amend", "-o", "foo=1", "s.qcow2"],
        &["amend", "-f", "raw", "-o", "size=1M", "r.raw"],
    ] {
        e.same(args);
    }
}

#[test]
fn cli_help_version_and_usage_errors() {
    let v = run_in(Path::new("."), &vimg(), &["--help"]);
    assert_eq!(v.rc, 0);
    assert!(
        v.stdout
            .trim_end()
            .lines()
            .last()
            .unwrap_or("")
            .contains("compare: 1 images differ"),
        "{}",
        v.stdout
    );
    assert!(v.stdout.contains("Examples:"));
    let v = run_in(Path::new("."), &vimg(), &["create", "--help"]);
    assert!(v.stdout.contains("Examples:") && v.rc == 0);
    let v = run_in(Path::new("."), &vimg(), &["--version"]);
    assert_eq!(v.rc, 0);
    assert!(v.stdout.starts_with("vimg "), "{}", v.stdout);
    let v = run_in(Path::new("."), &vimg(), &["info", "--bogus", "x"]);
    assert_eq!(v.rc, 2);
    assert!(v.stderr.contains("--bogus"), "{}", v.stderr);
    let v = run_in(Path::new("."), &vimg(), &["frobnicate"]);
    assert_eq!(v.rc, 2);
}

#[test]
fn locking_like_qemu() {
    let Some(e) = Env::new() else { return };
    assert_eq!(
        e.q(&["create", "-q", "-f", "qcow2", "l.qcow2", "16M"]).rc,
        0
    );
    // qemu-io keeps the image open read-write (with QEMU's locks) while it
    // waits for commands on stdin.
    let mut child = Command::new(&e.qio)
        .arg("l.qcow2")
        .current_dir(e.p())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until qemu-io holds its locks (up to 30 s: the other tests load
    // the host). Watched in /proc/locks, not by probing with `qemu-img
    // info`: a probe's own lock, taken while qemu-io opens the image, makes
    // qemu-io fail with "Failed to get "write" lock" (that raced before).
    let ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(e.p().join("l.qcow2")).unwrap().ino()
    };
    let mut held = false;
    for _ in 0..300 {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if locks
            .lines()
            .any(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
        {
            held = true;
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("qemu-io ended ({st}) before it locked the image: {err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(held, "qemu-io did not lock the image within 30 s");
    e.same(&["info", "l.qcow2"]);
    e.same(&["info", "-U", "l.qcow2"]);
    e.same(&["check", "l.qcow2"]);
    let v = e.v(&["resize", "l.qcow2", "+1G"]);
    assert_eq!(v.rc, 1);
    assert!(
        v.stderr.contains("Failed to get \"write\" lock"),
        "{}",
        v.stderr
    );
    assert!(v
        .stderr
        .contains("Is another process using the image [l.qcow2]?"));
    let v = e.v(&["snapshot", "-c", "x", "l.qcow2"]);
    assert_eq!(v.rc, 1, "{}", v.stderr);
    drop(child.stdin.take());
    let _ = child.wait();
    // And qemu-img refuses while vimg holds it (vmrun uses the same code):
    // a long convert keeps the target locked.
    let v = e.v(&["resize", "l.qcow2", "+1G"]);
    assert_eq!(v.rc, 0, "{}", v.stderr);
}

/// Deterministic xorshift generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn malformed_images_give_clear_errors_never_panics() {
    let Some(e) = Env::new() else { return };
    // Base images with data, snapshots, backing, compression.
    assert_eq!(
        e.q(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]).rc,
        0
    );
    e.io("base.qcow2", &["write -P 1 0 256k", "write -P 2 1M 64k"]);
    assert_eq!(e.q(&["snapshot", "-c", "s", "base.qcow2"]).rc, 0);
    e.io("base.qcow2", &["write -P 3 64k 64k"]);
    std::fs::write(e.p().join("t.raw"), "compressible text\n".repeat(20000)).unwrap();
    assert_eq!(
        e.q(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "t.raw",
            "comp.qcow2"
        ])
        .rc,
        0
    );
    let bases: Vec<Vec<u8>> = ["base.qcow2", "comp.qcow2"]
        .iter()
        .map(|b| std::fs::read(e.p().join(b)).unwrap())
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Header fields (offset, width) worth mutating.
    let fields: &[(usize, usize)] = &[
        (4, 4),
        (8, 8),
        (16, 4),
        (20, 4),
        (24, 8),
        (32, 4),
        (36, 4),
        (40, 8),
        (48, 8),
        (56, 4),
        (60, 4),
        (64, 8),
        (72, 8),
        (80, 8),
        (88, 8),
        (96, 4),
        (100, 4),
        (104, 1),
        (112, 4),
        (116, 4),
    ];
    let mut n = 0;
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for (bi, base) in bases.iter().enumerate() {
        let be = |o: usize| u64::from_be_bytes(base[o..o + 8].try_into().unwrap());
        let l1 = be(40) as usize;
        let rt = be(48) as usize;
        let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
        let rb = be(rt) as usize;
        let snap = be(64) as usize;
        let len = base.len() as u64;
        let interesting = [
            0u64,
            511,
            len + 0x10000,
            u32::MAX as u64,
            i64::MAX as u64,
            u64::MAX,
        ];
        // Header field × interesting values.
        for &(off, w) in fields.iter().filter(|_| bi == 0) {
            for &val in &interesting {
                let mut b = base.clone();
                let bytes = val.to_be_bytes();
                b[off..off + w].copy_from_slice(&bytes[8 - w..]);
                cases.push((format!("b{bi}-h{off}-{val:x}"), b));
            }
        }
        // Table entries: L1, L2, reftable, refblock, snapshot table.
        for (name, at, w) in [
            ("l1", l1, 8usize),
            ("l2", l2, 8),
            ("rt", rt, 8),
            ("rb", rb, 2),
            ("sn", snap, 8),
            ("sn8", snap + 8, 4),
            ("sn12", snap + 12, 4),
            ("sn36", snap + 36, 4),
        ] {
            if at == 0 || at + w > base.len() {
                continue;
            }
            for &val in &interesting {
                let mut b = base.clone();
                let bytes = val.to_be_bytes();
                b[at..at + w].copy_from_slice(&bytes[8 - w..]);
                cases.push((format!("b{bi}-{name}-{val:x}"), b));
            }
        }
        // Truncations.
        for cut in [
            0usize,
            3,
            4,
            71,
            72,
            103,
            104,
            200,
            0x10000,
            0x20008,
            0x30000,
            base.len() - 1,
        ] {
            if cut < base.len() {
                cases.push((format!("b{bi}-cut{cut}"), base[..cut].to_vec()));
            }
        }
        // Random byte flips in the first 4 clusters.
        for k in 0..(if bi == 0 { 20 } else { 10 }) {
            let mut b = base.clone();
            for _ in 0..4 {
                let at = (rng.next() % (0x40000.min(b.len()) as u64)) as usize;
                b[at] ^= (rng.next() & 0xff) as u8 | 1;
            }
            cases.push((format!("b{bi}-rand{k}"), b));
        }
    }
    // Backing loops: an image backed by itself, and a two-image cycle.
    for (name, backing) in [
        ("loop1.qcow2", "loopz.qcow2"),
        ("loopa.qcow2", "loopb.qcow2"),
        ("loopb.qcow2", "loopa.qcow2"),
    ] {
        let o = e.q(&[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", name, "1M",
        ]);
        assert_eq!(o.rc, 0, "{}", o.stderr);
    }
    // qemu-img refuses a self-reference: patch the name in.
    let p1 = e.p().join("loop1.qcow2");
    let mut b = std::fs::read(&p1).unwrap();
    let at = b.windows(11).position(|w| w == b"loopz.qcow2").unwrap();
    b[at..at + 11].copy_from_slice(b"loop1.qcow2");
    std::fs::write(&p1, b).unwrap();
    for (name, data) in &cases {
        std::fs::write(e.p().join(name), data).unwrap();
        n += 1;
    }
    assert!(n >= 200, "only {n} malformed images");
    let mut names: Vec<String> = cases.iter().map(|c| c.0.clone()).collect();
    names.extend(["loop1.qcow2", "loopa.qcow2"].map(String::from));
    let slowest = std::sync::Mutex::new((0u128, String::new()));
    std::thread::scope(|sc| {
        for part in names.chunks(names.len().div_ceil(2)) {
            let e = &e;
            let slowest = &slowest;
            sc.spawn(move || {
                for name in part {
                    // Resizes run on copies: the repair pass below wants
                    // the images as made.
                    let grown = format!("{name}.grown");
                    let shrunk = format!("{name}.shrunk");
                    for copy in [&grown, &shrunk] {
                        let _ = std::fs::copy(e.p().join(name), e.p().join(copy));
                    }
                    for args in [
                        vec!["info", "--backing-chain", name.as_str()],
                        vec!["check", "-f", "qcow2", name.as_str()],
                        vec!["map", "-f", "qcow2", "--output=json", name.as_str()],
                        vec![
                            "resize",
                            "-q",
                            "-f",
                            "qcow2",
                            "--preallocation=metadata",
                            &grown,
                            "+1M",
                        ],
                        vec!["resize", "-q", "-f", "qcow2", "--shrink", &shrunk, "1M"],
                    ] {
                        let t0 = std::time::Instant::now();
                        let v = e.v(&args);
                        let dt = t0.elapsed().as_millis();
                        {
                            let mut s = slowest.lock().unwrap();
                            if dt > s.0 {
                                *s = (dt, format!("{args:?}"));
                            }
                        }
                        assert!(
                            !v.stderr.contains("panicked") && v.rc != 101,
                            "vimg {args:?} panicked: {}",
                            v.stderr
                        );
                        assert!(v.rc >= 0, "vimg {args:?} was killed");
                        if v.rc != 0 && v.rc != 2 && v.rc != 3 {
                            assert!(
                                v.stderr.starts_with("vimg: ") || v.stderr.contains("\nvimg: "),
                                "vimg {args:?}: unclear error: {:?}",
                                v.stderr
                            );
                        }
                    }
                }
            });
        }
    });
    eprintln!(
        "{n} malformed images; slowest run: {:?}",
        slowest.lock().unwrap()
    );
    // Repair must never make things worse: check -r all then qemu-img check.
    for name in names.iter().step_by(13) {
        let v = e.v(&["check", "-r", "all", "-f", "qcow2", name]);
        assert!(
            !v.stderr.contains("panicked") && v.rc != 101,
            "{name}: {}",
            v.stderr
        );
    }
}

/// kill -9 at random points of convert / convert -c / convert -B / resize (also with
/// preallocation, and shrinking) / snapshot:
/// qemu-img check must never find corruption (leaks are allowed), and the
/// data written before the operation stays readable.
#[test]
fn killed_operations_leave_no_corruption() {
    let Some(e) = Env::new() else { return };
    // 12 MiB source: random data, text-like data and holes.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut src = vec![0u8; 12 << 20];
    for (i, chunk) in src.chunks_mut(1 << 20).enumerate() {
        if i % 3 != 2 {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = if i % 3 == 0 {
                    x as u8
                } else {
                    (x % 4) as u8 + b'a'
                };
            }
        }
    }
    std::fs::write(e.p().join("src.raw"), &src).unwrap();
    assert_eq!(
        e.q(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "src.raw",
            "base.qcow2"
        ])
        .rc,
        0
    );
    std::fs::copy(e.p().join("base.qcow2"), e.p().join("ref-5a.qcow2")).unwrap();
    e.io("ref-5a.qcow2", &["write -P 0x5a 0 3M"]);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let ops: &[(&str, &[&str])] = &[
        (
            "convert",
            &["convert", "-f", "raw", "-O", "qcow2", "src.raw", "T"],
        ),
        (
            "convert-c",
            &["convert", "-c", "-f", "raw", "-O", "qcow2", "src.raw", "T"],
        ),
        (
            "convert-qcow2",
            &["convert", "-O", "qcow2", "base.qcow2", "T"],
        ),
        (
            "convert-B",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "src.raw",
                "T",
            ],
        ),
        ("resize", &["resize", "T", "+3G"]),
        (
            "resize-metadata",
            &["resize", "--preallocation=metadata", "T", "+3G"],
        ),
        (
            "resize-falloc",
            &["resize", "--preallocation=falloc", "T", "+200M"],
        ),
        ("resize-shrink", &["resize", "--shrink", "T", "--", "-5M"]),
        ("snapshot-c", &["snapshot", "-c", "snap", "T"]),
        ("snapshot-d", &["snapshot", "-d", "old", "T"]),
        ("snapshot-a", &["snapshot", "-a", "old", "T"]),
    ];
    let mut kills = 0;
    for (name, args) in ops {
        let target = format!("crash-{name}.qcow2");
        let prepare = |e: &Env| {
            let _ = std::fs::remove_file(e.p().join(&target));
            if !name.starts_with("convert") {
                std::fs::copy(e.p().join("base.qcow2"), e.p().join(&target)).unwrap();
                if name.starts_with("snapshot-") && *name != "snapshot-c" {
                    assert_eq!(e.q(&["snapshot", "-c", "old", &target]).rc, 0);
                    e.io(&target, &["write -P 0x5a 0 3M"]);
                }
            }
        };
        let argv: Vec<&str> = args
            .iter()
            .map(|a| if *a == "T" { target.as_str() } else { a })
            .collect();
        // How long does the operation take undisturbed?
        prepare(&e);
        let t0 = std::time::Instant::now();
        let v = e.v(&argv);
        assert_eq!(v.rc, 0, "{name}: {}", v.stderr);
        let dur = t0.elapsed().as_micros().max(1000) as u64;
        for _ in 0..15 {
            prepare(&e);
            let mut child = Command::new(vimg())
                .args(&argv)
                .current_dir(e.p())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_micros(rng.next() % dur));
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
            kills += 1;
            if !e.p().join(&target).exists() {
                continue;
            }
            let c = e.q(&["check", &target]);
            let no_header_yet = c.rc == 63 || c.stderr.contains("Image is not in qcow2 format");
            assert!(
                c.rc == 0 || c.rc == 3 || (name.starts_with("convert") && no_header_yet),
                "{name} killed: qemu-img check rc {}: {}{}",
                c.rc,
                c.stdout,
                c.stderr
            );
            // The guest-visible data is the old or the new state, never a mix.
            let same_as = |other: &str| e.q(&["compare", other, &target]).rc == 0;
            match *name {
                "resize" | "snapshot-c" => assert!(same_as("base.qcow2"), "{name}: data changed"),
                "snapshot-d" => assert!(same_as("ref-5a.qcow2"), "{name}: data changed"),
                "snapshot-a" => assert!(
                    same_as("base.qcow2") || same_as("ref-5a.qcow2"),
                    "{name}: data is neither the old nor the new state"
                ),
                _ => {}
            }
        }
    }
    eprintln!("{kills} kills, no corruption");
}

/// Data segments (SEEK_DATA/SEEK_HOLE) of a file, their bytes, its length
/// and its allocated blocks: what two sparse files must share to be the
/// same file on disk.
fn sparse_layout(path: &Path) -> (u64, u64, Vec<(u64, Vec<u8>)>) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, MetadataExt};
    let f = std::fs::File::open(path).unwrap();
    // Written back and out of the page cache first: ext4 reports an
    // unwritten extent as data while pages of it are cached, so what the
    // tools happened to leave cached would change the answer.
    f.sync_all().unwrap();
    // SAFETY: posix_fadvise on an open descriptor with integer arguments.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let md = f.metadata().unwrap();
    let mut segs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut off = 0i64;
    while (off as u64) < md.len() {
        // SAFETY: lseek on an open descriptor with integer arguments.
        let d = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(f.as_raw_fd(), d, libc::SEEK_HOLE) };
        let mut b = vec![0u8; (h - d) as usize];
        f.read_exact_at(&mut b, d as u64).unwrap();
        // ext4 can answer a hole at h and data at h again (an extent
        // boundary whose pages it still holds): one segment.
        match segs.last_mut() {
            Some((o, prev)) if *o + prev.len() as u64 == d as u64 => prev.extend_from_slice(&b),
            _ => segs.push((d as u64, b)),
        }
        off = h;
    }
    (md.len(), md.blocks(), segs)
}

/// `create` lays out exactly QEMU's file (same bytes, same holes, same
/// allocated blocks) in every preallocation mode: cluster sizes and
/// refcount widths where the L2 tables and refcount blocks interleave
/// differently with the data runs, a run longer than a request (2 MiB
/// clusters), images whose refcount table QEMU has to grow (tiny clusters:
/// during metadata preallocation, or for the L1 table alone), falloc and
/// full, where QEMU moves the refcount table past the L1 table, and
/// extended L2 entries (16-byte entries, the last cluster's copy-on-write
/// ending at its subcluster).
#[test]
fn create_lays_out_qemus_file() {
    let Some(e) = Env::new() else { return };
    for (opts, size) in [
        ("preallocation=metadata", "20G"),
        ("preallocation=metadata", "1"),
        ("preallocation=metadata", "104857601"),
        ("preallocation=metadata,compat=0.10", "3G"),
        ("preallocation=metadata,cluster_size=512", "4M"),
        (
            "preallocation=metadata,cluster_size=4k,refcount_bits=1",
            "1G",
        ),
        (
            "preallocation=metadata,cluster_size=8k,refcount_bits=64",
            "700M",
        ),
        ("preallocation=metadata,cluster_size=2M", "3T"),
        (
            "preallocation=metadata,lazy_refcounts=on,compression_type=zstd",
            "5G",
        ),
        ("preallocation=metadata,cluster_size=512", "33M"),
        (
            "preallocation=metadata,cluster_size=512,refcount_bits=64",
            "9M",
        ),
        (
            "preallocation=metadata,cluster_size=1k,refcount_bits=64",
            "100M",
        ),
        ("cluster_size=512", "100G"),
        ("preallocation=falloc", "3M"),
        ("preallocation=falloc", "0"),
        (
            "preallocation=falloc,cluster_size=4k,refcount_bits=64",
            "33M",
        ),
        ("preallocation=full,cluster_size=512", "9M"),
        ("preallocation=full,compat=0.10", "1000000"),
        ("preallocation=metadata,extended_l2=on", "1000000"),
        (
            "preallocation=metadata,extended_l2=on,cluster_size=2M",
            "3M",
        ),
        ("preallocation=falloc,extended_l2=on", "3M"),
    ] {
        let args = ["create", "-q", "-f", "qcow2", "-o", opts];
        let q = e.q(&[&args[..], &["q.qcow2", size]].concat());
        let v = e.v(&[&args[..], &["v.qcow2", size]].concat());
        assert_eq!((q.rc, v.rc), (0, 0), "{opts} {size}: {}", v.stderr);
        same_file(&e, &format!("create {opts} {size}"));
    }
}

/// q.qcow2 and v.qcow2 are the same file: length, data segments, bytes,
/// allocated blocks (which also tells falloc's unwritten extents, holes to
/// SEEK_DATA); and v.qcow2 checks clean.
fn same_file(e: &Env, what: &str) {
    let (ql, qb, qs) = sparse_layout(&e.p().join("q.qcow2"));
    let (vl, vb, vs) = sparse_layout(&e.p().join("v.qcow2"));
    assert_eq!(ql, vl, "{what}: file length");
    assert_eq!(
        qs.iter().map(|(o, b)| (*o, b.len())).collect::<Vec<_>>(),
        vs.iter().map(|(o, b)| (*o, b.len())).collect::<Vec<_>>(),
        "{what}: data segments"
    );
    assert!(qs == vs, "{what}: bytes differ");
    // st_blocks also counts ext4's extent-tree blocks, which depend on how
    // fragmented the free space was: allow 32 KiB of those.
    assert!(
        qb.abs_diff(vb) <= 64,
        "{what}: allocated 512-byte blocks: qemu-img {qb}, vimg {vb}"
    );
    e.check_clean("v.qcow2");
}

/// `convert -o preallocation=...` writes the data into the clusters the
/// target's creation mapped, as qemu-img does (not into new ones, which
/// would leave the preallocated clusters unused): the same file.
#[test]
fn convert_into_preallocated_target_is_qemus_file() {
    let Some(e) = Env::new() else { return };
    let mut src = vec![0u8; 20 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for range in [0..3 << 20, 13 << 20..(13 << 20) + 196_608] {
        for b in &mut src[range] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(e.p().join("s.raw"), &src).unwrap();
    for opts in [
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full,cluster_size=4k",
    ] {
        let args = ["convert", "-f", "raw", "-O", "qcow2", "-o", opts, "s.raw"];
        let q = e.q(&[&args[..], &["q.qcow2"]].concat());
        let v = e.v(&[&args[..], &["v.qcow2"]].concat());
        assert_eq!((q.rc, v.rc), (0, 0), "{opts}: {}", v.stderr);
        same_file(&e, &format!("convert -o {opts}"));
        e.identical("s.raw", "v.qcow2");
    }
}

/// `convert` into a new qcow2 image writes qemu-img's file: its requests
/// (2 MiB from each block-status extent, cut at zero blocks of `-S`) are
/// placed by a replay of QEMU's allocator, so L2 tables, refcount blocks,
/// a refcount table that grows (tiny clusters), zero-filled partial
/// clusters and packed compressed clusters (QEMU's zlib parameters, zstd)
/// all land where qemu-img puts them; with `-B` as qemu-img writes an
/// image with a backing file. Sources: a raw file of random data,
/// text, explicit zeroes, zero 2 KiB pieces inside data and holes, with a
/// size that is not cluster aligned; qcow2 images qemu-img made from it
/// (4 KiB clusters, compressed, extended L2, an overlay with zero clusters).
#[test]
fn convert_lays_out_qemus_file() {
    let Some(e) = Env::new() else { return };
    use std::os::unix::fs::FileExt;
    let size = (24 << 20) + 3 * 512;
    let rnd = random_bytes(4 << 20, 0x5eed_1234_abcd_0001);
    let text = b"line of some fairly compressible text, ".repeat(1 << 17);
    let f = std::fs::File::create(e.p().join("s.raw")).unwrap();
    f.set_len(size as u64).unwrap();
    let (mut at, mut k) = (0usize, 0usize);
    while at < size {
        let n = [512usize, 65536, 1 << 20, 8192, 300_000, 4096, 3 << 20][k % 7].min(size - at);
        let mut piece = match k % 6 {
            0 | 3 => rnd[at % (1 << 20)..][..n].to_vec(),
            1 => text[..n].to_vec(),
            2 => {
                let mut p = rnd[..n].to_vec();
                for i in (0..n).step_by(4096) {
                    p[i..(i + 2048).min(n)].fill(0);
                }
                p
            }
            4 => vec![0u8; n], // explicit zeroes
            _ => Vec::new(),   // a hole
        };
        if !piece.is_empty() {
            piece.truncate(n);
            f.write_all_at(&piece, at as u64).unwrap();
        }
        at += n;
        k += 1;
    }
    drop(f);
    for (args, out) in [
        (
            &["-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", "s.raw"][..],
            "s4k.qcow2",
        ),
        (&["-f", "raw", "-O", "qcow2", "-c", "s.raw"][..], "sz.qcow2"),
        (
            &[
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=128k",
                "s.raw",
            ][..],
            "se.qcow2",
        ),
        (&["-f", "raw", "-O", "qcow2", "s.raw"][..], "s.qcow2"),
    ] {
        e.q_ok(&[&["convert"][..], args, &[out]].concat());
    }
    e.q_ok(&[
        "create", "-f", "qcow2", "-b", "s.qcow2", "-F", "qcow2", "ov.qcow2",
    ]);
    // A backing file larger than the sources, with data past their end
    // in their last cluster (copied into it, as QEMU's copy-on-write reads
    // through the image).
    std::fs::write(e.p().join("big.raw"), rnd.repeat(7)).unwrap();
    std::fs::write(e.p().join("tail.raw"), &rnd[4096..(1 << 20) + 5632]).unwrap();
    e.q_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "big.raw",
        "big.qcow2",
    ]);
    e.io(
        "ov.qcow2",
        &[
            "write -P 0x11 1M 3M",
            "write -z 20M 2M",
            "write -P 0x22 23M 512k",
        ],
    );
    let raw = ["-f", "raw", "s.raw"];
    let cases: &[(&[&str], &[&str])] = &[
        (&[], &raw),
        (&["-o", "cluster_size=512"], &raw),
        (&["-o", "cluster_size=4k,refcount_bits=1"], &raw),
        (&["-o", "cluster_size=8k,refcount_bits=64"], &raw),
        (&["-o", "cluster_size=2M"], &raw),
        (&["-o", "extended_l2=on"], &raw),
        (&["-o", "extended_l2=on,cluster_size=2M"], &raw),
        (&["-o", "compat=0.10,lazy_refcounts=off"], &raw),
        (&["-S", "0"], &raw),
        (&["-S", "64k", "-o", "cluster_size=4k"], &raw),
        (&["-S", "12k"], &raw),
        (&["-C"], &raw),
        (&["-U"], &raw),
        (&["-t", "none"], &raw),
        (&[], &["s4k.qcow2"]),
        (&["-o", "cluster_size=512"], &["s4k.qcow2"]),
        (&[], &["sz.qcow2"]),
        (&["-o", "extended_l2=on"], &["se.qcow2"]),
        (&[], &["ov.qcow2"]),
        (&["-S", "0"], &["ov.qcow2"]),
        (&["-c"], &raw),
        (&["-c", "-o", "cluster_size=512"], &raw),
        (&["-c", "-o", "cluster_size=4k,refcount_bits=1"], &raw),
        (&["-c", "-o", "compression_type=zstd"], &raw),
        (&["-c", "-o", "extended_l2=on"], &raw),
        (&["-c"], &["ov.qcow2"]),
        // -B: the source's top layer allocation; zero extents and zero
        // blocks become zero clusters (written as data on compat 0.10);
        // partly written clusters take the backing file's bytes.
        (&["-B", "s.qcow2", "-F", "qcow2"], &["ov.qcow2"]),
        (&["-B", "s.qcow2", "-F", "qcow2"], &raw),
        (&["-B", "s.qcow2", "-F", "qcow2", "-c"], &["ov.qcow2"]),
        (&["-B", "s.qcow2", "-F", "qcow2", "-c"], &raw),
        (
            &["-B", "s.qcow2", "-F", "qcow2", "-o", "compat=0.10"],
            &["ov.qcow2"],
        ),
        (
            &["-B", "s.qcow2", "-F", "qcow2", "-o", "extended_l2=on"],
            &["ov.qcow2"],
        ),
        (&["-B", "s.qcow2", "-F", "qcow2", "-S", "0"], &["ov.qcow2"]),
        (
            &["-B", "s4k.qcow2", "-F", "qcow2", "-o", "cluster_size=512"],
            &raw,
        ),
        (
            &["-B", "big.qcow2", "-F", "qcow2"],
            &["-f", "raw", "tail.raw"],
        ),
        (
            &["-B", "big.qcow2", "-F", "qcow2", "-c"],
            &["-f", "raw", "tail.raw"],
        ),
        // -o backing_file/backing_fmt: a target with a backing file, as -B.
        (
            &["-o", "backing_file=s.qcow2,backing_fmt=qcow2"],
            &["ov.qcow2"],
        ),
    ];
    for (opts, from) in cases {
        let args = [&["convert", "-O", "qcow2"][..], opts, from].concat();
        let q = e.q(&[&args[..], &["q.qcow2"]].concat());
        let v = e.v(&[&args[..], &["v.qcow2"]].concat());
        assert_eq!((q.rc, v.rc), (0, 0), "{args:?}: {}", v.stderr);
        same_file(&e, &format!("{args:?}"));
        let _ = std::fs::remove_file(e.p().join("q.qcow2"));
        let _ = std::fs::remove_file(e.p().join("v.qcow2"));
    }
    // qemu-img's refusals around backing files, before anything is made.
    e.same(&[
        "convert", "-f", "raw", "-O", "qcow2", "-B", "s.qcow2", "s.raw", "x.qcow2",
    ]);
    e.same(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "backing_file=s.qcow2",
        "s.raw",
        "x.qcow2",
    ]);
    e.same(&[
        "convert", "-f", "raw", "-O", "qcow2", "-B", "s.qcow2", "-F", "qcow2", "s.raw", "s.raw",
        "x.qcow2",
    ]);
    assert!(!e.p().join("x.qcow2").exists());
    // -n into an empty image qemu-img created (larger than the source):
    // zeroes written as zero clusters (compat 0.10: only L2 tables).
    let n_cases: &[(&str, &[&str], &[&str])] = &[
        ("cluster_size=64k", &[], &raw),
        ("compat=0.10", &[], &raw),
        ("extended_l2=on", &[], &raw),
        ("cluster_size=4k", &["-S", "0"], &raw),
        ("cluster_size=64k", &["--target-is-zero"], &raw),
        ("cluster_size=64k", &[], &["ov.qcow2"]),
    ];
    for (create, opts, from) in n_cases {
        for t in ["q.qcow2", "v.qcow2"] {
            e.q_ok(&["create", "-q", "-f", "qcow2", "-o", create, t, "40M"]);
        }
        let args = [&["convert", "-n", "-O", "qcow2"][..], opts, from].concat();
        let q = e.q(&[&args[..], &["q.qcow2"]].concat());
        let v = e.v(&[&args[..], &["v.qcow2"]].concat());
        assert_eq!((q.rc, v.rc), (0, 0), "{create} {args:?}: {}", v.stderr);
        same_file(&e, &format!("{create} {args:?}"));
    }
}

/// `convert --salvage` as qemu-img: a compressed cluster whose data is
/// garbage cannot be read; every sector of it is reported (a warning each,
/// none with -q) and written as zeroes, the convert succeeds, and the
/// target is qemu-img's file (raw, qcow2, -c, -B). Without --salvage it
/// fails; with -C it is refused with qemu-img's message.
#[test]
fn convert_salvage_like_qemu_img() {
    let Some(e) = Env::new() else { return };
    let mut src = random_bytes(2 << 20, 0x5a1_7a9e);
    src.extend(b"some compressible text ".repeat(1 << 16));
    src.resize(6 << 20, 0);
    std::fs::write(e.p().join("s.raw"), &src).unwrap();
    e.q_ok(&[
        "convert", "-c", "-f", "raw", "-O", "qcow2", "s.raw", "z.qcow2",
    ]);
    // The first compressed cluster of the first L2 table: its bytes
    // overwritten.
    let mut img = std::fs::read(e.p().join("z.qcow2")).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let cluster_bits = u32::from_be_bytes(img[20..24].try_into().unwrap()) as u64;
    let l1 = be(&img, 40) as usize;
    let l2 = (be(&img, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let shift = 62 - (cluster_bits - 8);
    let entry = (0..(1usize << cluster_bits) / 8)
        .map(|i| be(&img, l2 + i * 8))
        .find(|d| d >> 62 & 1 == 1)
        .expect("a compressed cluster");
    let at = (entry & ((1u64 << shift) - 1)) as usize;
    img[at..at + 64].fill(0xff);
    std::fs::write(e.p().join("bad.qcow2"), &img).unwrap();
    let bad = e.v(&["convert", "-O", "raw", "bad.qcow2", "v.raw"]);
    assert_eq!(bad.rc, 1, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("error while reading at byte"),
        "{}",
        bad.stderr
    );
    for (opts, out) in [
        (&["-O", "raw"][..], "raw"),
        (&["-O", "qcow2"][..], "qcow2"),
        (&["-O", "qcow2", "-c"][..], "qcow2"),
        (
            &["-O", "qcow2", "-B", "z.qcow2", "-F", "qcow2"][..],
            "qcow2",
        ),
    ] {
        let (qf, vf) = (format!("q.{out}"), format!("v.{out}"));
        let args = [&["convert", "--salvage"][..], opts, &["bad.qcow2"]].concat();
        let q = e.q(&[&args[..], &[qf.as_str()]].concat());
        let v = e.v(&[&args[..], &[vf.as_str()]].concat());
        assert_eq!((q.rc, v.rc), (0, 0), "{args:?}: {}", v.stderr);
        let warnings = |s: &str| {
            s.lines()
                .filter(|l| l.contains("warning: error while reading offset"))
                .count()
        };
        assert!(warnings(&q.stderr) > 0);
        assert_eq!(
            warnings(&q.stderr),
            warnings(&v.stderr),
            "{args:?}: {}",
            v.stderr
        );
        assert_eq!(
            std::fs::read(e.p().join(&qf)).unwrap(),
            std::fs::read(e.p().join(&vf)).unwrap(),
            "{args:?}: not qemu-img's file"
        );
        let _ = std::fs::remove_file(e.p().join(&qf));
        let _ = std::fs::remove_file(e.p().join(&vf));
    }
    let quiet = e.v(&[
        "convert",
        "-q",
        "--salvage",
        "-O",
        "raw",
        "bad.qcow2",
        "v.raw",
    ]);
    assert_eq!((quiet.rc, quiet.stderr.as_str()), (0, ""));
    e.same(&[
        "convert",
        "-C",
        "--salvage",
        "-O",
        "raw",
        "bad.qcow2",
        "x.raw",
    ]);
}

/// `check -r` leaves QEMU's file: leaked clusters freed with a discard
/// (their space goes back, as QEMU's `DISCARD_ALWAYS`), a missing refcount
/// rebuilt into new structures, a refcount too high lowered.
#[test]
fn repair_leaves_qemus_file() {
    let Some(e) = Env::new() else { return };
    e.q(&["create", "-q", "-f", "qcow2", "b.qcow2", "100M"]);
    e.io("b.qcow2", &["write -P 1 0 3M", "write -P 2 50M 1M"]);
    let base = std::fs::read(e.p().join("b.qcow2")).unwrap();
    let be = |o: usize| u64::from_be_bytes(base[o..o + 8].try_into().unwrap()) as usize;
    let l2 = be(be(40)) & 0x00ff_ffff_ffff_fe00;
    let rb = be(be(48));
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // Guest cluster 3's mapping dropped: its host cluster leaks.
    let mut b = base.clone();
    b[l2 + 24..l2 + 32].fill(0);
    cases.push(("leaked data cluster", b));
    // Cluster 5 (data) counted 0: refcount structures rebuilt.
    let mut b = base.clone();
    b[rb + 10..rb + 12].copy_from_slice(&0u16.to_be_bytes());
    cases.push(("refcount 0", b));
    // Cluster 5 counted 2.
    let mut b = base.clone();
    b[rb + 10..rb + 12].copy_from_slice(&2u16.to_be_bytes());
    cases.push(("refcount 2", b));
    for (what, img) in &cases {
        for mode in ["leaks", "all"] {
            for f in ["q.qcow2", "v.qcow2"] {
                std::fs::write(e.p().join(f), img).unwrap();
            }
            let q = e.q(&["check", "-r", mode, "q.qcow2"]);
            let v = e.v(&["check", "-r", mode, "v.qcow2"]);
            assert_eq!(
                (q.rc, q.stdout, q.stderr.replace("qemu-img", "vimg")),
                (v.rc, v.stdout, v.stderr.clone()),
                "{what}, -r {mode}"
            );
            if q.rc == 0 {
                same_file(&e, &format!("{what}, -r {mode}"));
            }
        }
    }
}

/// `amend` leaves QEMU's file: the header rewritten as a whole cluster, and
/// for a refcount width change the new structures where QEMU puts them,
/// with the old (freed) blocks holding the counts QEMU leaves in them.
#[test]
fn amend_leaves_qemus_file() {
    let Some(e) = Env::new() else { return };
    for (create, amend) in [
        ("cluster_size=64k", "compat=0.10"),
        ("cluster_size=64k", "lazy_refcounts=on"),
        ("cluster_size=64k", "refcount_bits=4"),
        ("cluster_size=4k", "refcount_bits=64"),
        ("cluster_size=512", "refcount_bits=1"),
    ] {
        let what = format!("{create}: amend -o {amend}");
        e.q(&[
            "create", "-q", "-f", "qcow2", "-o", create, "b.qcow2", "100M",
        ]);
        e.io("b.qcow2", &["write -P 1 0 3M", "write -P 2 50M 1M"]);
        for img in ["q.qcow2", "v.qcow2"] {
            std::fs::copy(e.p().join("b.qcow2"), e.p().join(img)).unwrap();
        }
        let q = e.q(&["amend", "-o", amend, "q.qcow2"]);
        let v = e.v(&["amend", "-o", amend, "v.qcow2"]);
        assert_eq!((q.rc, v.rc), (0, 0), "{what}: {}", v.stderr);
        same_file(&e, &what);
        e.io("v.qcow2", &["read -P 1 0 3M", "read -P 2 50M 1M"]);
    }
}

/// `resize` grows an image into exactly QEMU's file in every preallocation
/// mode: the L1 table replaced by one of exactly the needed entries (also
/// where that needs a new refcount block), metadata preallocation into the
/// image's own last L2 table and new ones, refcount table growth (tiny
/// clusters), falloc and full with the refcount table moved. The image
/// holds data and, in one case, a snapshot (refcounts of 2 kept). And
/// `resize --shrink` leaves QEMU's file too.
#[test]
fn resize_lays_out_qemus_file() {
    let Some(e) = Env::new() else { return };
    for (opts, base, mode, delta) in [
        ("cluster_size=512", "1M", "off", "+1G"),
        ("cluster_size=4k,refcount_bits=64", "100M", "off", "+50M"),
        ("cluster_size=64k", "1M", "metadata", "+50M"),
        ("cluster_size=2k,refcount_bits=64", "1M", "metadata", "+40M"),
        ("cluster_size=64k,refcount_bits=1", "100M", "falloc", "+1M"),
        ("cluster_size=512,refcount_bits=64", "1M", "full", "+9M"),
        ("cluster_size=4k", "8M", "metadata", "+8M"),
        ("cluster_size=16k,extended_l2=on", "1M", "metadata", "+40M"),
        ("extended_l2=on", "100M", "falloc", "+3M"),
        // From a size inside a cluster: the last cluster kept (mapped) or
        // allocated with its head zeroed (not mapped).
        ("cluster_size=2M", "43M", "metadata", "+36M"),
        ("cluster_size=2M", "43M", "metadata", "+1M"),
        // falloc/full move that cluster (its head copied, the old one freed).
        ("cluster_size=2M", "43M", "falloc", "+1M"),
        ("cluster_size=64k", "1000000", "full", "+1M"),
        ("cluster_size=2M,extended_l2=on", "43M", "falloc", "+1M"),
    ] {
        let what = format!("{opts} {base} --preallocation={mode} {delta}");
        e.q(&["create", "-q", "-f", "qcow2", "-o", opts, "b.qcow2", base]);
        e.io("b.qcow2", &["write -P 0x5a 0 64k", "write -P 0x33 300k 8k"]);
        if (base, delta) == ("43M", "+1M") {
            // The cluster holding the old end is mapped: QEMU keeps it.
            e.io("b.qcow2", &["write -P 0x77 42M 64k"]);
        }
        if base == "8M" {
            assert_eq!(e.q(&["snapshot", "-c", "s1", "b.qcow2"]).rc, 0);
            e.io("b.qcow2", &["write -P 0x44 0 4k"]);
        }
        // Two copies made the same way (a copy does not keep which zeroes
        // QEMU had allocated, so both tools start from a copy).
        for img in ["q.qcow2", "v.qcow2"] {
            std::fs::copy(e.p().join("b.qcow2"), e.p().join(img)).unwrap();
        }
        let pm = format!("--preallocation={mode}");
        let q = e.q(&["resize", "-q", &pm, "q.qcow2", delta]);
        let v = e.v(&["resize", "-q", &pm, "v.qcow2", delta]);
        assert_eq!((q.rc, v.rc), (0, 0), "{what}: {}", v.stderr);
        same_file(&e, &what);
        e.io("v.qcow2", &["read -P 0x5a 4k 60k", "read -P 0x33 300k 8k"]);
    }
    // Shrinks: discarded clusters punched out, L2 tables past the end freed
    // (and those QEMU allocates on the way), empty refcount blocks dropped,
    // the file cut after the last cluster in use.
    // The tail's data written first: its clusters sit early in the file,
    // so the shrink frees (and punches) clusters inside it.
    let tail_first: &[&str] = &[
        "write -P 0x11 90M 2M",
        "write -P 0x5a 0 64k",
        "write -P 0x33 30M 8M",
    ];
    // Tiny clusters, scattered data: the L2 tables QEMU allocates while
    // discarding need a bigger refcount table.
    let scattered: &[&str] = &[
        "write -P 0x5a 0 64k",
        "write -P 1 138M 428k",
        "write -P 2 61M 61k",
        "write -P 3 42M 177k",
    ];
    for (opts, base, writes, delta) in [
        ("cluster_size=512", "100M", tail_first, "-50M"),
        (
            "cluster_size=4k,refcount_bits=64",
            "100M",
            tail_first,
            "-99M",
        ),
        (
            "cluster_size=64k,refcount_bits=1",
            "100M",
            tail_first,
            "-99M",
        ),
        ("cluster_size=64k", "100M", tail_first, "-70M"),
        ("cluster_size=2M", "100M", tail_first, "-1M"),
        (
            "cluster_size=16k,extended_l2=on",
            "100M",
            tail_first,
            "-99M",
        ),
        (
            "cluster_size=512,refcount_bits=32",
            "100M",
            tail_first,
            "-89M",
        ),
        (
            "cluster_size=512,refcount_bits=64",
            "158M",
            scattered,
            "-152M",
        ),
    ] {
        let what = format!("{opts} {base} --shrink {delta}");
        e.q(&["create", "-q", "-f", "qcow2", "-o", opts, "b.qcow2", base]);
        e.io("b.qcow2", writes);
        for img in ["q.qcow2", "v.qcow2"] {
            std::fs::copy(e.p().join("b.qcow2"), e.p().join(img)).unwrap();
        }
        let q = e.q(&["resize", "-q", "--shrink", "q.qcow2", "--", delta]);
        let v = e.v(&["resize", "-q", "--shrink", "v.qcow2", "--", delta]);
        assert_eq!((q.rc, v.rc), (0, 0), "{what}: {}", v.stderr);
        same_file(&e, &what);
        e.io("v.qcow2", &["read -P 0x5a 0 64k"]);
    }
}

/// The README runbook: create with metadata preallocation, info, resize,
/// check — identical output to qemu-img's.
#[test]
fn readme_runbook_matches_qemu_img() {
    let Some(e) = Env::new() else { return };
    for d in ["q", "v"] {
        std::fs::create_dir(e.p().join(d)).unwrap();
    }
    let steps: &[&[&str]] = &[
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "size=20G,preallocation=metadata",
            "disk.qcow2",
        ],
        &["info", "disk.qcow2"],
        &["resize", "disk.qcow2", "+5G"],
        &["info", "--output=json", "disk.qcow2"],
        &["check", "disk.qcow2"],
        &["map", "disk.qcow2"],
        &["snapshot", "-l", "disk.qcow2"],
    ];
    for s in steps {
        let q = run_in(&e.p().join("q"), &e.qi, s);
        let v = run_in(&e.p().join("v"), &vimg(), s);
        assert_eq!(
            (q.rc, q.stdout, q.stderr.replace("qemu-img:", "vimg:")),
            (v.rc, v.stdout, v.stderr),
            "{s:?}"
        );
    }
    // Probing a raw image for writing warns like qemu-img.
    for d in ["q", "v"] {
        std::fs::write(e.p().join(d).join("r.img"), vec![0u8; 1 << 20]).unwrap();
    }
    let q = run_in(&e.p().join("q"), &e.qi, &["resize", "r.img", "+1M"]);
    let v = run_in(&e.p().join("v"), &vimg(), &["resize", "r.img", "+1M"]);
    assert_eq!((q.rc, q.stdout, q.stderr), (v.rc, v.stdout, v.stderr));
}

/// The allocation map of an image as qemu-img sees it, without host
/// offsets (layouts of qcow2 files differ; what is allocated must not).
fn alloc_map(e: &Env, img: &str) -> String {
    let o = e.q(&["map", "--output=json", img]);
    assert_eq!(o.rc, 0, "qemu-img map {img}: {}", o.stderr);
    o.stdout
        .lines()
        .map(|l| match l.find(", \"offset\"") {
            Some(i) => format!("{}}}", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// convert's file-to-file fast path (data extents copied with
/// copy_file_range and direct writes, zero blocks found through a mapping,
/// or with pread under -U, or copied whole with -C) leaves the same
/// allocation as qemu-img: zero data blocks become holes (raw) or
/// unallocated clusters (qcow2), partial clusters at extent edges and at
/// the end are kept; compare finds the same first mismatch in mapped data.
#[test]
fn convert_fast_path_allocation_and_compare_match_qemu_img() {
    let Some(e) = Env::new() else { return };
    // 3 MiB + 1.5 KiB: data, a 64 KiB zero cluster written as data, a
    // 4 KiB zero block inside data, a hole, data up to an unaligned end.
    assert_eq!(
        e.q(&["create", "-q", "-f", "raw", "z.raw", "3147264"]).rc,
        0
    );
    e.io(
        "z.raw",
        &[
            "write -P 0x11 0 1M",
            "write -P 0 256k 64k",
            "write -P 0 324k 4k",
            "write -P 0x22 2M 1M",
            "write -P 0x33 3M 1536",
        ],
    );
    let m = alloc_map(&e, "z.raw");
    assert!(m.contains("\"zero\": true"), "{m}");
    // Sources: the raw file, qcow2 made by qemu-img with 512-byte clusters
    // (extents not aligned to the target's clusters), with a backing file
    // (data from two layers), and compressed.
    assert_eq!(
        e.q(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-S",
            "0",
            "-o",
            "cluster_size=512",
            "z.raw",
            "z512.qcow2"
        ])
        .rc,
        0
    );
    assert_eq!(
        e.q(&["convert", "-f", "raw", "-O", "qcow2", "-S", "0", "z.raw", "zb.qcow2"])
            .rc,
        0
    );
    assert_eq!(
        e.q(&["create", "-q", "-f", "qcow2", "-b", "zb.qcow2", "-F", "qcow2", "zo.qcow2"])
            .rc,
        0
    );
    e.io("zo.qcow2", &["write -P 0x44 60k 8k", "write -P 0 2M 64k"]);
    assert_eq!(
        e.q(&["convert", "-c", "-f", "raw", "-O", "qcow2", "z.raw", "zc.qcow2"])
            .rc,
        0
    );
    for src in ["z.raw", "z512.qcow2", "zo.qcow2", "zc.qcow2"] {
        for (i, extra) in [
            &["-O", "raw"][..],
            &["-O", "raw", "-S", "64k"],
            &["-O", "qcow2"],
            &["-O", "qcow2", "-o", "cluster_size=4k"],
            // -U: the sources are not locked, so they are read with pread
            // instead of being mapped.
            &["-U", "-O", "raw"],
            &["-U", "-O", "qcow2"],
            // -C: data extents copied whole, zero blocks in them included.
            &["-C", "-O", "raw"],
            &["-C", "-O", "qcow2"],
        ]
        .iter()
        .enumerate()
        {
            let (qo, vo) = (format!("q{i}-{src}"), format!("v{i}-{src}"));
            for (out, vimg_run) in [(&qo, false), (&vo, true)] {
                let mut a = vec!["convert"];
                a.extend_from_slice(extra);
                a.push(src);
                a.push(out);
                let r = if vimg_run { e.v(&a) } else { e.q(&a) };
                assert_eq!(r.rc, 0, "{a:?} (vimg: {vimg_run}): {}", r.stderr);
            }
            e.identical(src, &vo);
            if extra.contains(&"qcow2") {
                e.check_clean(&vo);
            }
            assert_eq!(
                alloc_map(&e, &qo),
                alloc_map(&e, &vo),
                "allocation after convert {extra:?} {src}"
            );
        }
    }
    // -C refused with -c and -S, with qemu-img's messages.
    e.same(&["convert", "-C", "-c", "-O", "qcow2", "z.raw", "e.qcow2"]);
    e.same(&["convert", "-C", "-S", "4k", "-O", "raw", "z.raw", "e.raw"]);
    // compare through mappings: first mismatch in data, data against
    // zeroes, past a hole.
    std::fs::copy(e.p().join("z.raw"), e.p().join("y.raw")).unwrap();
    e.same(&["compare", "-f", "raw", "-F", "qcow2", "y.raw", "zb.qcow2"]);
    e.io("y.raw", &["write -P 0x55 2500001 1"]);
    e.same(&["compare", "-f", "raw", "-F", "qcow2", "y.raw", "zb.qcow2"]);
    e.same(&["compare", "-f", "raw", "-F", "qcow2", "y.raw", "z512.qcow2"]);
    e.io("y.raw", &["write -P 0x55 326000 1"]);
    e.same(&["compare", "-F", "raw", "zo.qcow2", "y.raw"]);
    e.same(&["compare", "-f", "raw", "y.raw", "zc.qcow2"]);
}

/// `-o` lists are checked and split as qemu-img does: `Invalid option
/// list` for empty lists, a leading comma or an odd trailing one; no
/// escapes in names; `noflag` means `flag=off`.
#[test]
fn option_lists_match_qemu_img() {
    let Some(e) = Env::new() else { return };
    assert_eq!(e.q(&["create", "-q", "-f", "qcow2", "s.qcow2", "1M"]).rc, 0);
    for o in [
        ",cluster_size=4k",
        "cluster_size=4k,",
        "",
        ",,",
        "nolazy_refcounts",
        "lazy_refcounts",
        "nocow",
        "a,,b=1",
        "=on",
    ] {
        let _ = std::fs::remove_file(e.p().join("x.qcow2"));
        e.same(&["create", "-f", "qcow2", "-o", o, "x.qcow2", "1M"]);
        let _ = std::fs::remove_file(e.p().join("x.qcow2"));
        e.same(&["amend", "-o", o, "s.qcow2"]);
        e.check_clean("s.qcow2");
    }
    for o in [",cluster_size=4k", "cluster_size=4k,", ""] {
        e.same(&["convert", "-O", "qcow2", "-o", o, "s.qcow2", "y.qcow2"]);
        e.same(&["measure", "-O", "qcow2", "-o", o, "--size", "1G"]);
    }
    // amend's option help, with and without an image.
    e.same(&["amend", "-o", "help", "s.qcow2"]);
    e.same(&["amend", "-o", "?", "s.qcow2"]);
    e.same(&["amend", "-f", "qcow2", "-o", "help"]);
    e.same(&["amend", "-o", "help"]);
    // measure takes the format's and the file protocol's options only.
    for (fmt, o) in [
        ("qcow2", "foo=bar"),
        ("raw", "foo=bar"),
        ("raw", "cluster_size=64k"),
        ("raw", "preallocation=full"),
        ("raw", "nocow=on"),
        ("qcow2", "nocow=on,extent_size_hint=1M"),
        ("qcow2", "lazy_refcounts=on,cluster_size=64k"),
    ] {
        e.same(&["measure", "-O", fmt, "-o", o, "--size", "1G"]);
    }
    // Bad option values: convert words what the driver refuses as "FILE:
    // error while converting FMT:", syntax and type errors alone; amend
    // and measure have their own words for a bad compat level.
    for (fmt, o) in [
        ("qcow2", "cluster_size=3000"),
        ("qcow2", "cluster_size=abc"),
        ("qcow2", "bogus=1"),
        ("qcow2", "compat=0.5"),
        ("qcow2", "lazy_refcounts=maybe"),
        ("qcow2", "refcount_bits=3"),
        ("qcow2", "refcount_bits=x"),
        ("qcow2", "compression_type=lz"),
        ("qcow2", "compat=0.10,lazy_refcounts=on"),
        ("raw", "preallocation=metadata"),
        ("raw", "cluster_size=4k"),
    ] {
        let args = ["convert", "-O", fmt, "-o", o, "s.qcow2", "z.img"];
        let mut left = Vec::new();
        for tool in [&e.qi, &vimg()] {
            let _ = std::fs::remove_file(e.p().join("z.img"));
            let r = run_in(e.p(), tool, &args);
            left.push((r.rc, r.stderr.replace("qemu-img:", "vimg:"), r.stdout));
            left.push((0, e.p().join("z.img").exists().to_string(), String::new()));
        }
        assert_eq!(left[..2], left[2..], "convert -o {o} (output, file left)");
    }
    for c in ["0.5", "2", "v3", "1.1", "0.10"] {
        let o = format!("compat={c}");
        e.same(&["measure", "-O", "qcow2", "-o", &o, "--size", "1G"]);
    }
    for c in ["0.5", "2"] {
        e.same(&["amend", "-o", &format!("compat={c}"), "s.qcow2"]);
    }
}

/// `n` pseudo-random bytes (xorshift64 from `seed`).
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Bytes of `file` in the page cache (util-linux `fincore`), if it runs.
fn cached_bytes(file: &Path) -> Option<u64> {
    let o = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    String::from_utf8_lossy(&o.stdout).trim().parse().ok()
}

#[test]
fn convert_cache_modes_like_qemu_img() {
    let Some(e) = Env::new() else { return };
    // 40 MiB: random data with a zero stretch (several copier jobs).
    let mut src = random_bytes(40 << 20, 0x2545_f491_4f6c_dd1d);
    src[(9 << 20)..(12 << 20)].fill(0);
    std::fs::write(e.p().join("src.raw"), &src).unwrap();
    for (fmt, args) in [
        ("raw", &["-t", "none"][..]),
        ("qcow2", &["-t", "none"]),
        ("raw", &["-t", "directsync", "-T", "none"]),
        ("qcow2", &["-t", "writeback", "-W", "-m", "8"]),
        ("raw", &["-t", "writethrough", "-m", "0x10"]),
        ("qcow2", &["-t", "unsafe", "-T", "unsafe"]),
    ] {
        let dst = format!("c-{}.{fmt}", args.join(""));
        let mut argv = vec!["convert", "-f", "raw", "-O", fmt];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["src.raw", &dst]);
        let v = e.v(&argv);
        assert_eq!(v.rc, 0, "vimg {argv:?}: {}", v.stderr);
        // -t none: the data went to the disk around the page cache.
        if args[1] == "none" {
            match cached_bytes(&e.p().join(&dst)) {
                Some(b) => assert!(b < 4 << 20, "{argv:?}: {b} bytes of the target cached"),
                None => eprintln!("fincore not available: page cache not checked"),
            }
        }
        if fmt == "qcow2" {
            e.check_clean(&dst);
        }
        let o = e.q(&["compare", "-f", "raw", "-F", fmt, "src.raw", &dst]);
        assert_eq!(o.rc, 0, "{argv:?}: {}{}", o.stdout, o.stderr);
    }
    // Bad values: qemu-img's messages and exit codes.
    for args in [
        &["-t", "bogus"][..],
        &["-T", "bogus"],
        &["-m", "0"],
        &["-m", "17"],
        &["-m", "-1"],
        &["-m", "4x"],
        &["-m", ""],
        &["-m", "99999999999999999999"],
    ] {
        let _ = std::fs::remove_file(e.p().join("bad.qcow2"));
        let mut argv = vec!["convert", "-O", "qcow2"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["src.raw", "bad.qcow2"]);
        e.same(&argv);
    }
}

#[test]
fn convert_onto_zeroed_target_like_qemu_img() {
    let Some(e) = Env::new() else { return };
    let mut src = vec![0x5au8; 24 << 20];
    src[(4 << 20)..(12 << 20)].fill(0);
    std::fs::write(e.p().join("src.raw"), &src).unwrap();
    for fmt in ["raw", "qcow2"] {
        // The same existing, zeroed target converted into by both tools:
        // the data and the allocation map come out the same.
        let mut maps = Vec::new();
        for (tool, name) in [("q", "zq"), ("v", "zv")] {
            let t = format!("{name}.{fmt}");
            assert_eq!(e.q(&["create", "-q", "-f", fmt, &t, "24M"]).rc, 0);
            let argv = [
                "convert",
                "-n",
                "--target-is-zero",
                "-f",
                "raw",
                "-O",
                fmt,
                "src.raw",
                &t,
            ];
            let o = if tool == "q" { e.q(&argv) } else { e.v(&argv) };
            assert_eq!(o.rc, 0, "{tool} {argv:?}: {}", o.stderr);
            e.identical("src.raw", &t);
            maps.push(e.q(&["map", "--output=json", "-f", fmt, &t]).stdout);
        }
        assert_eq!(
            maps[0], maps[1],
            "{fmt}: allocation differs from qemu-img's"
        );
        assert!(
            maps[1].contains("\"zero\": true"),
            "{fmt}: the zero range was written"
        );
    }
    for argv in [
        &[
            "convert",
            "--target-is-zero",
            "-O",
            "raw",
            "src.raw",
            "t.raw",
        ][..],
        &[
            "convert",
            "-n",
            "-o",
            "cluster_size=4k",
            "-O",
            "qcow2",
            "src.raw",
            "zq.qcow2",
        ],
    ] {
        e.same(argv);
    }
    // With a backing file: qemu-img prints the error but exits 0 (it
    // leaves through a path that keeps its success status); vimg says the
    // same and exits 1.
    assert_eq!(e.q(&["create", "-q", "-f", "raw", "b.raw", "24M"]).rc, 0);
    let argv = [
        "convert",
        "-n",
        "--target-is-zero",
        "-B",
        "b.raw",
        "-F",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "zq.qcow2",
    ];
    let (q, v) = (e.q(&argv), e.v(&argv));
    assert_eq!(q.stderr.replace("qemu-img:", "vimg:"), v.stderr);
    assert!(
        v.stderr.contains("Cannot use --target-is-zero"),
        "{}",
        v.stderr
    );
    assert_eq!((q.rc, v.rc), (0, 1));
}

#[test]
fn convert_rate_limit_like_qemu_img() {
    let Some(e) = Env::new() else { return };
    std::fs::write(e.p().join("src.raw"), random_bytes(8 << 20, 0x9e37_79b9)).unwrap();
    // 8 MiB at 4 MiB/s: the first 2 MiB go at once, the rest is held to
    // the rate: about 1.5 s (qemu-img: about 1.4 s).
    for fmt in ["raw", "qcow2"] {
        let t = format!("r.{fmt}");
        let t0 = std::time::Instant::now();
        let v = e.v(&["convert", "-r", "4M", "-f", "raw", "-O", fmt, "src.raw", &t]);
        let took = t0.elapsed().as_secs_f64();
        assert_eq!(v.rc, 0, "{}", v.stderr);
        assert!((1.2..6.0).contains(&took), "-r 4M -O {fmt}: {took:.2} s");
        let o = e.q(&["compare", "-f", "raw", "-F", fmt, "src.raw", &t]);
        assert_eq!(o.rc, 0, "{}{}", o.stdout, o.stderr);
    }
    for r in ["x", "-1", "1.5x", "", "99999999999999999999999"] {
        e.same(&[
            "convert", "-r", r, "-f", "raw", "-O", "raw", "src.raw", "bad.raw",
        ]);
    }
}
