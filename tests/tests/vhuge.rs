//! End-to-end tests for vhuge: fixture /proc and /sys trees (no root needed)
//! and, as root, a live run against the host's 2 MiB pool that leaves the
//! host exactly as found.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

fn vhuge(args: &[&str]) -> Output {
    e2e::run("vhuge", args)
}

fn vhuge_root(root: &Path, args: &[&str]) -> Output {
    let mut a = vec!["--root", root.to_str().unwrap()];
    a.extend_from_slice(args);
    vhuge(&a)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn json(o: &Output) -> Value {
    assert_eq!(code(o), 0, "stderr: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", stdout(o)))
}

/// A fixture /proc + /sys tree.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Empty tree with a meminfo for `default` and the given mounts text.
    fn new(default: u64, mounts: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("proc/sys/vm")).unwrap();
        fs::write(dir.path().join("proc/sys/vm/compact_memory"), "").unwrap();
        fs::write(dir.path().join("proc/mounts"), mounts).unwrap();
        fs::create_dir_all(dir.path().join("sys/kernel/mm/hugepages")).unwrap();
        let f = Fixture { dir };
        f.meminfo(default, 0, 0, 0, 0);
        f
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn meminfo(&self, default: u64, total: u64, free: u64, rsvd: u64, surp: u64) {
        fs::write(
            self.root().join("proc/meminfo"),
            format!(
                "MemTotal:       24576000 kB\nMemFree:        20000000 kB\nAnonHugePages:         0 kB\n\
                 ShmemHugePages:        0 kB\nHugePages_Total:   {total:5}\nHugePages_Free:    {free:5}\n\
                 HugePages_Rsvd:    {rsvd:5}\nHugePages_Surp:    {surp:5}\nHugepagesize:   {:8} kB\n\
                 Hugetlb:        {:8} kB\n",
                default / 1024,
                total * default / 1024
            ),
        )
        .unwrap();
    }

    fn pool_dir(&self, size: u64) -> PathBuf {
        self.root().join(format!(
            "sys/kernel/mm/hugepages/hugepages-{}kB",
            size / 1024
        ))
    }

    fn node_dir(&self, node: u32, size: u64) -> PathBuf {
        self.root().join(format!(
            "sys/devices/system/node/node{node}/hugepages/hugepages-{}kB",
            size / 1024
        ))
    }

    fn pool(&self, size: u64, total: u64, free: u64, resv: u64, surp: u64, over: u64) {
        let d = self.pool_dir(size);
        fs::create_dir_all(&d).unwrap();
        for (n, v) in [
            ("nr_hugepages", total),
            ("nr_hugepages_mempolicy", total),
            ("free_hugepages", free),
            ("resv_hugepages", resv),
            ("surplus_hugepages", surp),
            ("nr_overcommit_hugepages", over),
        ] {
            fs::write(d.join(n), format!("{v}\n")).unwrap();
        }
    }

    fn node(&self, node: u32, size: u64, total: u64, free: u64, surp: u64) {
        let d = self.node_dir(node, size);
        fs::create_dir_all(&d).unwrap();
        for (n, v) in [
            ("nr_hugepages", total),
            ("free_hugepages", free),
            ("surplus_hugepages", surp),
        ] {
            fs::write(d.join(n), format!("{v}\n")).unwrap();
        }
    }

    fn read(&self, rel: &Path) -> String {
        fs::read_to_string(rel).unwrap().trim().to_string()
    }
}

const MOUNTS_2M: &str = "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n\
hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n";

/// One node, 2 MiB default pool with 64 pages, 16 in use, 4 reserved.
fn one_node() -> Fixture {
    let f = Fixture::new(M2, MOUNTS_2M);
    f.pool(M2, 64, 48, 4, 0, 0);
    f.pool(G1, 0, 0, 0, 0, 0);
    f.node(0, M2, 64, 48, 0);
    f.node(0, G1, 0, 0, 0);
    f.meminfo(M2, 64, 48, 4, 0);
    f
}

#[test]
fn fixture_one_node_status() {
    let f = one_node();
    let v = json(&vhuge_root(f.root(), &["status", "--json"]));
    assert_eq!(v["default_size"], M2);
    let pools = v["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 2);
    assert_eq!(pools[0]["size"], M2);
    assert_eq!(pools[0]["total"], 64);
    assert_eq!(pools[0]["free"], 48);
    assert_eq!(pools[0]["reserved"], 4);
    assert_eq!(pools[0]["available"], 44);
    assert_eq!(pools[0]["default"], true);
    assert_eq!(pools[1]["size"], G1);
    assert_eq!(pools[1]["default"], false);
    assert_eq!(v["meminfo"]["HugePages_Total"], 64);
    assert_eq!(v["meminfo"]["Hugepagesize"], 2048);
    assert_eq!(v["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(v["mounts"][0]["target"], "/dev/hugepages");
    assert_eq!(v["mounts"][0]["page_size"], M2);

    let o = vhuge_root(f.root(), &["status"]);
    assert_eq!(code(&o), 0);
    let s = stdout(&o);
    // hugeadm --pool-list columns, then ours.
    assert!(
        s.contains(
            "      Size  Minimum  Current  Maximum  Default     Free Reserved  Surplus Overcommit\n\
             \x20  2097152       64       64       64        *       48        4        0          0\n\
             1073741824        0        0        0                 0        0        0          0\n"
        ),
        "{s}"
    );
    assert!(s.contains("HugePages_Total:      64\n"), "{s}");
    assert!(s.contains("Hugepagesize:       2048 kB\n"), "{s}");
    assert!(
        s.contains("/dev/hugepages  2 MiB      rw,relatime,pagesize=2M"),
        "{s}"
    );
    assert!(s.contains("No process holds hugetlbfs memory."), "{s}");
}

#[test]
fn fixture_two_nodes() {
    let f = Fixture::new(M2, MOUNTS_2M);
    f.pool(M2, 96, 96, 0, 0, 0);
    f.node(0, M2, 64, 64, 0);
    f.node(1, M2, 32, 32, 0);
    let v = json(&vhuge_root(f.root(), &["status", "--json"]));
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(
        (nodes[1]["node"].as_u64(), nodes[1]["total"].as_u64()),
        (Some(1), Some(32))
    );
    let s = stdout(&vhuge_root(f.root(), &["status"]));
    assert!(
        s.contains("   0    2097152       64       64        0\n"),
        "{s}"
    );
    assert!(
        s.contains("   1    2097152       32       32        0\n"),
        "{s}"
    );

    // Per-node write goes to the node's file only.
    let o = vhuge_root(f.root(), &["set", "--node", "1", "+8"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(f.read(&f.node_dir(1, M2).join("nr_hugepages")), "40");
    assert_eq!(f.read(&f.node_dir(0, M2).join("nr_hugepages")), "64");
    assert_eq!(f.read(&f.pool_dir(M2).join("nr_hugepages")), "96");
    let o = vhuge_root(f.root(), &["set", "--node", "2", "8"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("NUMA node 2 does not exist"),
        "{}",
        stderr(&o)
    );

    // Uneven nodes need the node form of the boot parameter.
    let o = vhuge_root(f.root(), &["persist", "--dry-run"]);
    assert_eq!(code(&o), 0);
    let s = stdout(&o);
    assert!(s.contains("vm.nr_hugepages = 96\n"), "{s}");
    assert!(s.contains("hugepagesz=2M hugepages=0:64,1:40"), "{s}");
}

#[test]
fn fixture_1g_pages_plan() {
    let mounts = "none /mnt/huge1g hugetlbfs rw,relatime,pagesize=1024M 0 0\n";
    let f = Fixture::new(M2, mounts);
    f.pool(M2, 0, 0, 0, 0, 0);
    f.pool(G1, 4, 3, 1, 0, 0);
    f.node(0, G1, 4, 3, 0);
    let o = vhuge_root(
        f.root(),
        &["plan", "--mem", "1.5G", "--size", "1G", "--guests", "2"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("Pages needed:  4 (2 per guest)"), "{s}");
    assert!(
        s.contains("each guest rounds up to 2 pages (512 MiB unused)"),
        "{s}"
    );
    assert!(
        s.contains("Pool now:      4 total, 3 free, 1 reserved: 2 available"),
        "{s}"
    );
    assert!(s.contains("Verdict:       short by 2 pages"), "{s}");
    assert!(s.contains("Run:           vhuge set --size 1G 6"), "{s}");
    assert!(s.contains("Mount:         /mnt/huge1g"), "{s}");

    let v = json(&vhuge_root(
        f.root(),
        &["plan", "--mem", "2048", "--size", "1G", "--json"],
    ));
    assert_eq!(v["pages_needed"], 2);
    assert_eq!(v["fits"], true);
    assert_eq!(v["command"], Value::Null);

    // verify without --path finds the 1G mount; 2 GiB fits, 3 GiB does not.
    let o = vhuge_root(f.root(), &["verify", "--mem", "2G", "--size", "1G"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("ok: 2 GiB of guest memory needs 2 pages of 1 GiB on /mnt/huge1g")
    );
    let o = vhuge_root(f.root(), &["verify", "--mem", "3G", "--size", "1G"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("short by 1 pages; run `vhuge set --size 1G 5`"),
        "{}",
        stderr(&o)
    );
    // No 2 MiB mount: verify fails and says how to get one.
    let o = vhuge_root(f.root(), &["verify", "--mem", "2M"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("no hugetlbfs mount with 2 MiB pages"),
        "{}",
        stderr(&o)
    );

    // 1G pages are not the default: persist points to the kernel command line.
    let s = stdout(&vhuge_root(f.root(), &["persist", "--dry-run"]));
    assert!(s.contains("# hugepagesz=1G hugepages=4"), "{s}");
    assert!(
        s.contains("hugetlbfs /mnt/huge1g hugetlbfs pagesize=1024M 0 0"),
        "{s}"
    );
}

#[test]
fn fixture_surplus_and_reserved() {
    let f = Fixture::new(M2, MOUNTS_2M);
    // 10 persistent + 6 surplus pages, overcommit 20, 5 reserved.
    f.pool(M2, 16, 8, 5, 6, 20);
    f.node(0, M2, 16, 8, 6);
    let v = json(&vhuge_root(f.root(), &["status", "--json"]));
    let p = &v["pools"][0];
    assert_eq!(p["minimum"], 10);
    assert_eq!(p["maximum"], 30);
    assert_eq!(p["available"], 3);
    assert_eq!(p["surplus"], 6);
    let s = stdout(&vhuge_root(f.root(), &["status"]));
    assert!(
        s.contains(
            "   2097152       10       16       30        *        8        5        6         20"
        ),
        "{s}"
    );
    // 3 available: 6 MiB fits, 8 MiB does not.
    assert_eq!(code(&vhuge_root(f.root(), &["verify", "--mem", "6M"])), 0);
    let o = vhuge_root(f.root(), &["verify", "--mem", "8M"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("(16 total, 8 free - 5 reserved)"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("overcommit"), "{}", stderr(&o));
    // sysctl keeps the persistent part only.
    let s = stdout(&vhuge_root(f.root(), &["persist", "--dry-run"]));
    assert!(
        s.contains("vm.nr_hugepages = 10\nvm.nr_overcommit_hugepages = 20\n"),
        "{s}"
    );
}

#[test]
fn fixture_set_forms_and_errors() {
    let f = one_node();
    let nr = f.pool_dir(M2).join("nr_hugepages");
    let o = vhuge_root(f.root(), &["set", "128"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(f.read(&nr), "128");
    assert!(
        stdout(&o).contains("2 MiB pages: 128 (was 64)"),
        "{}",
        stdout(&o)
    );
    assert_eq!(code(&vhuge_root(f.root(), &["set", "8G"])), 0);
    assert_eq!(f.read(&nr), "4096");
    assert_eq!(code(&vhuge_root(f.root(), &["set", "--", "-96"])), 0);
    assert_eq!(f.read(&nr), "4000");
    assert_eq!(code(&vhuge_root(f.root(), &["set", "-1G"])), 0);
    assert_eq!(f.read(&nr), "3488");
    assert_eq!(
        code(&vhuge_root(f.root(), &["set", "+3M"])),
        0,
        "sizes round up"
    );
    assert_eq!(f.read(&nr), "3490");
    let o = vhuge_root(f.root(), &["set", "-5000"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("cannot remove 5000 pages: the pool has 3490"),
        "{}",
        stderr(&o)
    );
    // 1G pool, overcommit.
    assert_eq!(
        code(&vhuge_root(f.root(), &["set", "--size", "1G", "2"])),
        0
    );
    assert_eq!(f.read(&f.pool_dir(G1).join("nr_hugepages")), "2");
    let o = vhuge_root(f.root(), &["set", "--overcommit", "7"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(f.read(&f.pool_dir(M2).join("nr_overcommit_hugepages")), "7");
    // --compact is only used on a shortfall: a fixture never falls short.
    assert_eq!(code(&vhuge_root(f.root(), &["set", "--compact", "10"])), 0);
    assert_eq!(f.read(&f.root().join("proc/sys/vm/compact_memory")), "");
    // Unsupported size: EINVAL, names the sysfs file and the sizes there are.
    let o = vhuge_root(f.root(), &["set", "--size", "16M", "1"]);
    assert_eq!(code(&o), 1);
    let e = stderr(&o);
    assert!(e.contains("hugepages-16384kB"), "{e}");
    assert!(e.contains("EINVAL"), "{e}");
    assert!(e.contains("supported sizes: 2M, 1G"), "{e}");
    // Usage errors exit 2.
    assert_eq!(code(&vhuge_root(f.root(), &["set"])), 2);
    assert_eq!(code(&vhuge_root(f.root(), &["set", "1KiB"])), 2);
    assert_eq!(
        code(&vhuge_root(f.root(), &["set", "--size", "3M", "1"])),
        2
    );
    assert_eq!(code(&vhuge_root(f.root(), &["plan", "--mem", "1e3"])), 2);
}

#[test]
fn fixture_holders_in_status() {
    let f = one_node();
    let pd = f.root().join("proc/4242");
    fs::create_dir_all(&pd).unwrap();
    fs::write(
        pd.join("maps"),
        "7f0000000000-7f0040000000 rw-s 00000000 00:2e 4567 /dev/hugepages/vm1 (deleted)\n\
         7f5000000000-7f5000001000 r--p 00000000 fd:01 1 /usr/lib/libc.so.6\n",
    )
    .unwrap();
    fs::write(pd.join("comm"), "vmrun\n").unwrap();
    fs::write(pd.join("cmdline"), "vmrun\x00-m\x001G\x00").unwrap();
    let v = json(&vhuge_root(f.root(), &["status", "--json"]));
    let h = &v["holders"][0];
    assert_eq!(h["pid"], 4242);
    assert_eq!(h["kind"], "vmrun");
    assert_eq!(h["mapped"], G1);
    assert_eq!(h["files"][0], "/dev/hugepages/vm1 (deleted)");
    let s = stdout(&vhuge_root(f.root(), &["status"]));
    assert!(
        s.contains("   4242  vmrun  vmrun                 1 GiB  /dev/hugepages/vm1 (deleted)"),
        "{s}"
    );
}

#[test]
fn fixture_persist_writes_once() {
    let f = one_node();
    fs::create_dir_all(f.root().join("etc")).unwrap();
    fs::write(
        f.root().join("etc/fstab"),
        "/dev/vda1 / ext4 defaults 0 1\n",
    )
    .unwrap();
    let o = vhuge_root(f.root(), &["persist"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let sysctl = fs::read_to_string(f.root().join("etc/sysctl.d/80-vhuge.conf")).unwrap();
    assert!(sysctl.contains("vm.nr_hugepages = 64\n"), "{sysctl}");
    let fstab = fs::read_to_string(f.root().join("etc/fstab")).unwrap();
    assert_eq!(
        fstab,
        "/dev/vda1 / ext4 defaults 0 1\nhugetlbfs /dev/hugepages hugetlbfs pagesize=2M 0 0\n"
    );
    let o = vhuge_root(f.root(), &["persist"]);
    assert_eq!(code(&o), 0);
    assert!(stderr(&o).contains("already has an entry for /dev/hugepages"));
    assert_eq!(
        fs::read_to_string(f.root().join("etc/fstab")).unwrap(),
        fstab
    );
    // Under systemd, a mount unit instead of fstab; /dev/hugepages with
    // default options is systemd's own.
    fs::create_dir_all(f.root().join("run/systemd/system")).unwrap();
    fs::write(
        f.root().join("proc/mounts"),
        format!("{MOUNTS_2M}none /mnt/huge-1g hugetlbfs rw,relatime,mode=770,pagesize=1024M 0 0\n"),
    )
    .unwrap();
    let s = stdout(&vhuge_root(f.root(), &["persist", "--dry-run"]));
    assert!(
        s.contains("etc/systemd/system/mnt-huge\\x2d1g.mount\n"),
        "{s}"
    );
    assert!(s.contains("Options=mode=770,pagesize=1024M\n"), "{s}");
    assert!(!s.contains("dev-hugepages.mount"), "{s}");
}

#[test]
fn cli_help_version_usage() {
    let o = vhuge(&["--help"]);
    assert_eq!(code(&o), 0);
    let h = stdout(&o);
    // Help ends with the examples (whatever the terminal width wraps).
    let ex = h.rfind("Examples:").expect("examples in --help");
    assert!(ex > h.find("Options:").unwrap(), "{h}");
    assert!(h[ex..].contains("vhuge persist --dry-run"), "{h}");
    assert!(h[ex..].contains("vhuge set 1024"), "{h}");
    for sub in [
        "status", "set", "mount", "umount", "plan", "verify", "persist",
    ] {
        assert!(h.contains(sub), "{sub}");
        let o = vhuge(&[sub, "--help"]);
        assert_eq!(code(&o), 0, "{sub}");
        assert!(stdout(&o).contains("Examples:"), "{sub}");
    }
    let o = vhuge(&["--version"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).starts_with("vhuge "));
    let o = vhuge(&["--bogus"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("unexpected argument '--bogus'"));
    assert_eq!(code(&vhuge(&["status", "--nope"])), 2);
    assert_eq!(code(&vhuge(&[])), 2);
}

/// hugeadm (libhugetlbfs) as the oracle for the pool-list columns.
fn assert_pool_list_matches_hugeadm(context: &str) {
    let Ok(h) = Command::new("hugeadm").arg("--pool-list").output() else {
        eprintln!("skipping hugeadm comparison ({context}): hugeadm not installed");
        return;
    };
    assert!(h.status.success(), "hugeadm --pool-list: {h:?}");
    let ours = stdout(&vhuge(&["status"]));
    for line in String::from_utf8_lossy(&h.stdout).lines() {
        let want = line.trim_end();
        assert!(
            ours.lines().any(|l| l.starts_with(want)),
            "{context}: hugeadm line {want:?} not in vhuge status:\n{ours}"
        );
    }
}

#[test]
fn host_pool_list_like_hugeadm() {
    let _lock = lock_pool();
    assert_pool_list_matches_hugeadm("host as found");
}

// ---------------------------------------------------------------------------
// Live test (root): the host's 2 MiB pool and a real hugetlbfs mount.

const LOCK: &str = "/run/lock/vtools-hugepages.lock";

fn sysfs_2m(name: &str) -> PathBuf {
    PathBuf::from("/sys/kernel/mm/hugepages/hugepages-2048kB").join(name)
}

fn read_num(p: &Path) -> u64 {
    fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

fn is_mounted(dir: &Path) -> bool {
    let d = dir.to_string_lossy();
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(d.as_ref()))
}

/// Restores the 2 MiB pool and removes the mount, also on panic.
struct HostGuard {
    nr: u64,
    overcommit: u64,
    dir: PathBuf,
    _lock: fs::File,
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.dir.to_string_lossy().as_bytes()).unwrap();
        for _ in 0..3 {
            if !is_mounted(&self.dir) {
                break;
            }
            // SAFETY: c is a valid NUL-terminated path; umount2 does not keep it.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::write(
            sysfs_2m("nr_overcommit_hugepages"),
            format!("{}\n", self.overcommit),
        );
        let _ = fs::write(sysfs_2m("nr_hugepages"), format!("{}\n", self.nr));
        let now = read_num(&sysfs_2m("nr_hugepages"));
        if now != self.nr {
            eprintln!(
                "WARNING: could not restore 2 MiB pool to {} (now {now})",
                self.nr
            );
        }
    }
}

fn lock_pool() -> fs::File {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an fd we own; it is released when the file closes.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock {LOCK}");
    f
}

fn status_2m() -> Value {
    let v = json(&vhuge(&["status", "--json"]));
    v["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["size"] == M2)
        .cloned()
        .expect("2 MiB pool in status")
}

struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
    fd: i32,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap; fd from open.
        unsafe {
            libc::munmap(self.ptr, self.len);
            libc::close(self.fd);
        }
    }
}

fn map_hugetlbfs_file(path: &Path, len: usize) -> Mapping {
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: valid path; the returned fd is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o600) };
    assert!(
        fd >= 0,
        "open {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is open; the length is a multiple of the page size.
    let r = unsafe { libc::ftruncate(fd, len as libc::off_t) };
    assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
    // SAFETY: fd is open; a shared RW mapping of len bytes, checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    Mapping { ptr, len, fd }
}

#[test]
fn live_pool_mount_map_restore() {
    if !e2e::is_root() {
        eprintln!("skipping live_pool_mount_map_restore: needs root");
        return;
    }
    if !sysfs_2m("nr_hugepages").exists()
        || !fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .contains("hugetlbfs")
    {
        eprintln!("skipping live_pool_mount_map_restore: kernel without 2 MiB hugetlbfs");
        return;
    }
    let lock = lock_pool();
    let dir = std::env::temp_dir().join(format!("vhuge-live-{}", std::process::id()));
    let guard = HostGuard {
        nr: read_num(&sysfs_2m("nr_hugepages")),
        overcommit: read_num(&sysfs_2m("nr_overcommit_hugepages")),
        dir: dir.clone(),
        _lock: lock,
    };
    let orig = guard.nr;

    // Without root the write fails with the file and errno named.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(e2e::bin("vhuge"))
        .args(["set", "--size", "2M", "+64"])
        .output();
    match o {
        Ok(o) if o.status.code() != Some(127) && o.status.code() != Some(126) => {
            assert_eq!(code(&o), 1, "{}", stderr(&o));
            let e = stderr(&o);
            assert!(
                e.contains("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
                "{e}"
            );
            assert!(e.contains("EACCES") || e.contains("EPERM"), "{e}");
            assert!(e.contains("run as root"), "{e}");
        }
        _ => eprintln!("note: setpriv unavailable, unprivileged write not checked"),
    }
    assert_eq!(read_num(&sysfs_2m("nr_hugepages")), orig);

    // Raise the pool by 64 pages (to 64 on an empty host).
    let o = vhuge(&["set", "--size", "2M", "+64"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let p = status_2m();
    assert_eq!(p["total"], orig + 64);
    assert_pool_list_matches_hugeadm("pool raised");
    let free0 = p["free"].as_u64().unwrap();
    let resv0 = p["reserved"].as_u64().unwrap();

    // Mount hugetlbfs in a temp dir; a second mount is a no-op.
    let ds = dir.to_str().unwrap();
    let o = vhuge(&["mount", ds, "--size", "2M", "--mode", "0700"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&vhuge(&["mount", ds, "--size", "2M"])), 0);
    let o = vhuge(&["mount", ds, "--size", "1G"]);
    assert_eq!(
        code(&o),
        1,
        "a different page size on the same dir is refused"
    );
    let v = json(&vhuge(&["status", "--json"]));
    let m = v["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["target"] == ds)
        .expect("mount listed");
    assert_eq!(m["page_size"], M2);
    assert!(m["options"].as_str().unwrap().contains("mode=700"), "{m}");

    // verify against the real mount: statfs gives the page size.
    let o = vhuge(&["verify", "--mem", "64M", "--path", ds]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = vhuge(&["verify", "--mem", "64G", "--path", ds]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("run `vhuge set --size 2M "),
        "{}",
        stderr(&o)
    );
    let o = vhuge(&["verify", "--mem", "64M", "--path", "/tmp"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("is not on hugetlbfs"), "{}", stderr(&o));

    // Map 32 MiB: 16 pages are reserved at mmap, then faulted in.
    let file = dir.join("guest-ram");
    {
        let map = map_hugetlbfs_file(&file, 32 << 20);
        let p = status_2m();
        assert_eq!(p["reserved"].as_u64().unwrap(), resv0 + 16, "{p}");
        assert_eq!(p["free"].as_u64().unwrap(), free0);
        for off in (0..map.len).step_by(M2 as usize) {
            // SAFETY: off < len, inside the mapping.
            unsafe { *(map.ptr as *mut u8).add(off) = 0xa5 };
        }
        let p = status_2m();
        assert_eq!(
            p["free"].as_u64().unwrap(),
            free0 - 16,
            "free drops by 16: {p}"
        );
        assert_eq!(p["reserved"].as_u64().unwrap(), resv0, "{p}");

        // This process shows up as a holder with 32 MiB mapped.
        let v = json(&vhuge(&["status", "--json"]));
        let me = std::process::id();
        let h = v["holders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["pid"] == me)
            .expect("test process listed as holder");
        assert_eq!(h["mapped"], 32u64 << 20);
        assert!(
            h["files"][0].as_str().unwrap().ends_with("guest-ram"),
            "{h}"
        );

        // Busy mount: umount says who holds it.
        let o = vhuge(&["umount", ds]);
        assert_eq!(code(&o), 1);
        let e = stderr(&o);
        assert!(e.contains("EBUSY"), "{e}");
        assert!(e.contains(&format!("in use by PID {me}")), "{e}");

        // Shrinking below what is in use leaves surplus pages.
        let o = vhuge(&["set", "--size", "2M", "0"]);
        if orig == 0 {
            assert_eq!(code(&o), 1);
            assert!(
                stderr(&o).contains("got 16: 16 pages are in use"),
                "{}",
                stderr(&o)
            );
            assert_eq!(
                code(&vhuge(&["set", "--size", "2M", &(orig + 64).to_string()])),
                0
            );
        }
    }
    fs::remove_file(&file).unwrap();
    assert_eq!(status_2m()["free"].as_u64().unwrap(), free0);

    // A hugetlb memfd (QEMU memory-backend-memfd,hugetlb=on) is found too.
    {
        let name = c"vhuge-e2e";
        // SAFETY: valid NUL-terminated name; the fd is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_HUGETLB) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, 4 << 20) }, 0);
        // SAFETY: fd is open; shared RW mapping of 4 MiB, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let map = Mapping {
            ptr,
            len: 4 << 20,
            fd,
        };
        // SAFETY: inside the mapping.
        unsafe { *(map.ptr as *mut u8) = 1 };
        let v = json(&vhuge(&["status", "--json"]));
        let me = std::process::id();
        let h = v["holders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["pid"] == me)
            .expect("memfd holder listed");
        assert_eq!(h["mapped"], 4u64 << 20, "{h}");
        assert!(
            h["files"][0]
                .as_str()
                .unwrap()
                .starts_with("/memfd:vhuge-e2e"),
            "{h}"
        );
    }
    assert_eq!(status_2m()["free"].as_u64().unwrap(), free0);

    let o = vhuge(&["umount", ds]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!is_mounted(&dir));
    let o = vhuge(&["umount", "/proc"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("not hugetlbfs"), "{}", stderr(&o));

    // Restore the original pool through vhuge, then the guard checks again.
    let o = vhuge(&["set", "--size", "2M", &orig.to_string()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(read_num(&sysfs_2m("nr_hugepages")), orig);
    drop(guard);
    assert_eq!(read_num(&sysfs_2m("nr_hugepages")), orig);
    assert!(!dir.exists());
}
