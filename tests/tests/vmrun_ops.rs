//! vmrun around a running guest (tiny spinning guest): -daemonize with
//! -pidfile, the HMP and QMP monitors on Unix sockets, the thread map in the
//! run directory, -vcpu-affinity, and hugepage-backed memory (-mem-path,
//! -mem-prealloc, memfd) with the pool checked before mapping.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{bin, kvm_available};

fn wait_gone(pid: i32) {
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "vmrun {pid} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hmp(path: &Path, cmds: &[&str]) -> Vec<String> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = String::new();
    let read_prompt = |s: &mut UnixStream, got: &mut String| {
        let mut buf = [0u8; 4096];
        while !got.ends_with("(qemu) ") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "monitor closed");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    read_prompt(&mut s, &mut got);
    assert!(
        got.contains("monitor - type 'help' for more information"),
        "{got}"
    );
    let mut replies = Vec::new();
    for c in cmds {
        writeln!(s, "{c}").unwrap();
        if *c == "quit" {
            // The monitor closes without a prompt.
            break;
        }
        got.clear();
        read_prompt(&mut s, &mut got);
        replies.push(got.trim_end_matches("(qemu) ").to_string());
    }
    replies
}

fn taskset_list(tid: i32) -> String {
    let out = Command::new("taskset")
        .args(["-pc", &tid.to_string()])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    s.rsplit(": ").next().unwrap_or_default().trim().to_string()
}

#[test]
fn daemonized_guest_with_monitors_thread_map_and_affinity() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let name = format!("e2e-ops-{}", std::process::id());
    let pidfile = d.join("g.pid");
    let mon = d.join("g.mon");
    let qmp = d.join("g.qmp");
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let last = ncpu - 1;
    let status = Command::new(bin("vmrun"))
        .args([
            "-name",
            &name,
            "-smp",
            "2",
            "-m",
            "64",
            "-kernel",
            env!("TINY_SPIN"),
            "-daemonize",
        ])
        .arg("-pidfile")
        .arg(&pidfile)
        .arg("-monitor")
        .arg(format!("unix:{},server,nowait", mon.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", qmp.display()))
        .args(["-vcpu-affinity", &format!("0=0,1={last}")])
        .arg("-serial")
        .arg(format!("file:{}", d.join("serial.log").display()))
        .env("XDG_RUNTIME_DIR", d)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    // The parent returns once the guest runs.
    assert_eq!(status.code(), Some(0));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    // The pid file is locked by the daemon.
    let f = std::fs::File::open(&pidfile).unwrap();
    // SAFETY: flock on a descriptor we own.
    let r = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(r, -1, "pid file must be locked");

    // Thread map in $XDG_RUNTIME_DIR/vmrun/NAME/threads.json.
    let map_path = d.join("vmrun").join(&name).join("threads.json");
    let map: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&map_path).unwrap()).unwrap();
    assert_eq!(map["pid"], pid);
    assert_eq!(map["name"], name.as_str());
    assert_eq!(map["monitor"], mon.display().to_string());
    let tids: Vec<i32> = map["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["tid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(tids.len(), 2);
    for (i, tid) in tids.iter().enumerate() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        assert_eq!(comm.trim(), format!("vcpu{i}"));
    }
    // -vcpu-affinity took effect; taskset agrees.
    assert_eq!(taskset_list(tids[0]), "0");
    assert_eq!(taskset_list(tids[1]), last.to_string());

    // HMP.
    let r = hmp(
        &mon,
        &[
            "info kvm",
            "info cpus",
            "info status",
            "stop",
            "info status",
            "cont",
            "info status",
            "info name",
            "frob",
        ],
    );
    assert_eq!(r[0], "kvm support: enabled\n");
    assert_eq!(
        r[1],
        format!(
            "* CPU #0: thread_id={}\n  CPU #1: thread_id={}\n",
            tids[0], tids[1]
        )
    );
    assert_eq!(r[2], "VM status: running\n");
    assert_eq!(r[4], "VM status: paused\n");
    assert_eq!(r[6], "VM status: running\n");
    assert_eq!(r[7], format!("{name}\n"));
    assert_eq!(r[8], "unknown command: 'frob'\n");
    let r = hmp(&mon, &["info threads", "info memory"]);
    assert!(r[0].contains(&format!("{:<8} vcpu1", tids[1])), "{}", r[0]);
    assert!(
        r[1].contains("memory: 64 MiB (67108864 bytes)") && r[1].contains("backing: anonymous"),
        "{}",
        r[1]
    );

    // taskset on a vCPU thread, as in the seed's runbook.
    let st = Command::new("taskset")
        .args(["-cp", "0", &tids[1].to_string()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(taskset_list(tids[1]), "0");

    // QMP, then quit through it.
    let s = UnixStream::connect(&qmp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    let mut ask = |w: &mut UnixStream, msg: &str| -> serde_json::Value {
        if !msg.is_empty() {
            // One write: the server parses a JSON object as soon as its
            // closing brace arrives, and after `quit` it closes, so a
            // separate newline could meet a closed socket (EPIPE).
            w.write_all(format!("{msg}\n").as_bytes()).unwrap();
        }
        line.clear();
        rd.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let greeting = ask(&mut w, "");
    assert!(greeting["QMP"]["version"]["qemu"].is_object(), "{greeting}");
    let r = ask(&mut w, r#"{"execute":"query-status"}"#);
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(
        ask(&mut w, r#"{"execute":"qmp_capabilities"}"#),
        serde_json::json!({"return": {}})
    );
    let r = ask(&mut w, r#"{"execute":"query-cpus-fast","id":"x"}"#);
    assert_eq!(r["id"], "x");
    assert_eq!(r["return"][1]["thread-id"], tids[1]);
    assert_eq!(r["return"][1]["cpu-index"], 1);
    let r = ask(&mut w, r#"{"execute":"query-kvm"}"#);
    assert_eq!(r["return"]["enabled"], true);
    assert_eq!(
        ask(&mut w, r#"{"execute":"quit"}"#),
        serde_json::json!({"return": {}})
    );
    wait_gone(pid);
    assert!(!pidfile.exists(), "pid file removed on exit");
    assert!(!map_path.exists(), "thread map removed on exit");
}

#[test]
fn daemonize_reports_errors_before_detaching() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("vmrun"))
        .args([
            "-kernel",
            "/nonexistent/kernel",
            "-daemonize",
            "-serial",
            "null",
        ])
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if kvm_available() {
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr)
            .contains("could not read kernel '/nonexistent/kernel'"));
    }
    let out = Command::new(bin("vmrun"))
        .args(["-kernel", "k", "-daemonize", "-nographic"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("-nographic cannot be used with -daemonize")
    );
}

/// Restores the 2 MiB pool and unmounts when dropped, also on failure.
struct Pool {
    nr: String,
    over: String,
    mount: Option<PathBuf>,
    _lock: std::fs::File,
}

const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const OVER: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_overcommit_hugepages";

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some(m) = &self.mount {
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = std::fs::write(OVER, &self.over);
        let _ = std::fs::write(NR, &self.nr);
    }
}

fn free_2m() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn hugepage_backed_guest_takes_and_returns_the_pool() {
    if !kvm_available() {
        return;
    }
    if !e2e::is_root() || !Path::new(NR).exists() {
        eprintln!("SKIP: needs root and 2 MiB hugepages");
        return;
    }
    // Serialise with the other tests that change the pool (vhuge's).
    std::fs::create_dir_all("/run/lock").unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/vtools-hugepages.lock")
        .unwrap();
    // SAFETY: flock on a descriptor we own; blocks until the lock is free.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    let mut pool = Pool {
        nr: std::fs::read_to_string(NR).unwrap(),
        over: std::fs::read_to_string(OVER).unwrap(),
        mount: None,
        _lock: lock,
    };
    let base: u64 = pool.nr.trim().parse().unwrap();
    std::fs::write(OVER, "0").unwrap();
    std::fs::write(NR, (base + 160).to_string()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("huge");
    std::fs::create_dir(&mnt).unwrap();
    assert!(Command::new("mount")
        .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success());
    pool.mount = Some(mnt.clone());
    let free0 = free_2m();

    let pidfile = dir.path().join("h.pid");
    let mon = dir.path().join("h.mon");
    let st = Command::new(bin("vmrun"))
        .args([
            "-m",
            "256m",
            "-kernel",
            env!("TINY_SPIN"),
            "-serial",
            "null",
            "-daemonize",
            "-mem-prealloc",
            "-mem-path",
        ])
        .arg(&mnt)
        .arg("-pidfile")
        .arg(&pidfile)
        .arg("-monitor")
        .arg(format!("unix:{},server,nowait", mon.display()))
        .env("XDG_RUNTIME_DIR", dir.path())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(0));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        free0 - free_2m(),
        128,
        "256 MiB of 2 MiB pages taken up front"
    );
    let r = hmp(&mon, &["info memory", "quit"]);
    assert!(
        r[0].contains("page size: 2 MiB (2097152 bytes)") && r[0].contains("prealloc: on"),
        "{}",
        r[0]
    );
    assert!(
        r[0].contains(&format!("file in {}", mnt.display())),
        "{}",
        r[0]
    );
    wait_gone(pid);
    assert_eq!(free_2m(), free0, "pages returned after exit");

    // A pool of 100 free pages: refused before boot, with the numbers.
    std::fs::write(NR, (base + 100).to_string()).unwrap();
    let out = Command::new(bin("vmrun"))
        .args([
            "-m",
            "256m",
            "-kernel",
            env!("TINY_HELLO"),
            "-serial",
            "null",
            "-mem-path",
        ])
        .arg(&mnt)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("128") && err.contains("100") && err.contains("vhuge set"),
        "{err}"
    );

    // memfd with hugetlb pages works too.
    std::fs::write(NR, (base + 160).to_string()).unwrap();
    let out = Command::new(bin("vmrun"))
        .args([
            "-kernel",
            env!("TINY_HELLO"),
            "-serial",
            "null",
            "-object",
            "memory-backend-memfd,id=m,size=64M,hugetlb=on,prealloc=on",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(42),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
