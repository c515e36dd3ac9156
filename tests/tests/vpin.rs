//! End-to-end tests of vpin: CLI conventions, fixture trees, a real paused
//! QEMU guest and a stand-in vmrun process (threads named vcpu0/vcpu1/io-blk0
//! plus a thread map), each checked against the real `taskset`.
//!
//! Build the binary first: `cargo build -p vpin && cargo test -p e2e --test vpin`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vpin(args: &[&str]) -> Output {
    vpin_env(args, &[])
}

fn vpin_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(e2e::bin("vpin"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", e2e::bin("vpin").display()))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vcore/tests/fixtures/vpin/host")
}

/// `taskset -pc TID` output.
fn taskset_get(tid: i32) -> String {
    let o = Command::new("taskset")
        .args(["-pc", &tid.to_string()])
        .output()
        .expect("run taskset");
    assert!(o.status.success(), "taskset -pc {tid}: {}", stderr(&o));
    stdout(&o)
}

/// `taskset -pc LIST TID` output.
fn taskset_set(list: &str, tid: i32) -> String {
    let o = Command::new("taskset")
        .args(["-pc", list, &tid.to_string()])
        .output()
        .expect("run taskset");
    assert!(
        o.status.success(),
        "taskset -pc {list} {tid}: {}",
        stderr(&o)
    );
    stdout(&o)
}

/// Online CPUs from sysfs (`0-3,8` syntax, no strides there).
fn online_cpus() -> Vec<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("online");
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap());
    }
    cpus
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Every thread's affinity as taskset prints it, by TID.
fn all_affinities(pid: i32) -> Vec<(i32, String)> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort();
    tids.into_iter().map(|t| (t, taskset_get(t))).collect()
}

/// The TIDs of vcpu0 and vcpu1 from `vpin list --json`.
fn vcpu_tids(list_json: &str) -> (i32, i32) {
    let v: serde_json::Value = serde_json::from_str(list_json).expect("list --json");
    let threads = v[0]["threads"].as_array().expect("threads");
    let tid = |role: &str| {
        threads
            .iter()
            .find(|t| t["role"] == role)
            .unwrap_or_else(|| panic!("no {role} in {list_json}"))["tid"]
            .as_i64()
            .unwrap() as i32
    };
    (tid("vcpu0"), tid("vcpu1"))
}

/// Pins both vCPUs with vpin, checks every printed line against taskset,
/// then asks for a CPU outside the allowed set and checks the rollback.
fn pin_and_check(target: &[&str], pid: i32, v0: i32, v1: i32, env: &[(&str, &Path)]) {
    let online = online_cpus();
    let (first, last) = (online[0], *online.last().unwrap());
    let all = {
        let o = taskset_get(pid);
        o.rsplit(": ").next().unwrap().trim().to_string()
    };
    // Start from unpinned vCPUs (an earlier round may have pinned them).
    taskset_set(&all, v0);
    taskset_set(&all, v1);

    // The taskset-style mode prints exactly what taskset prints for the same
    // change: make the change with taskset, undo it, make it with vpin.
    let by_taskset = taskset_set(&last.to_string(), v0);
    taskset_set(&all, v0);
    let mut args = vec!["pin"];
    args.extend_from_slice(target);
    let a0 = format!("vcpu0={last}");
    args.push(&a0);
    let o = vpin_env(&args, env);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    assert_eq!(stdout(&o), by_taskset);

    // Both vCPUs; then taskset -pc TID agrees with the new lines.
    let mut args = vec!["pin"];
    args.extend_from_slice(target);
    let (a0, a1) = (format!("vcpu0={first}"), format!("vcpu1={last}"));
    args.extend([a0.as_str(), a1.as_str()]);
    let o = vpin_env(&args, env);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[0],
        format!("pid {v0}'s current affinity list: {last}")
    );
    assert_eq!(lines[1], format!("pid {v0}'s new affinity list: {first}"));
    assert_eq!(lines[2], format!("pid {v1}'s current affinity list: {all}"));
    assert_eq!(lines[3], format!("pid {v1}'s new affinity list: {last}"));
    assert_eq!(taskset_get(v0), lines[1].replace("new", "current") + "\n");
    assert_eq!(taskset_get(v1), lines[3].replace("new", "current") + "\n");

    // A CPU outside the allowed set: exit 1, the error names the thread and
    // the errno, and nothing is left changed (vcpu0 was set first, then
    // restored).
    let before = all_affinities(pid);
    let bad = last + 1;
    let mut args = vec!["pin"];
    args.extend_from_slice(target);
    let (a0, a1) = (format!("vcpu0={last}"), format!("vcpu1={bad}"));
    args.extend([a0.as_str(), a1.as_str()]);
    let o = vpin_env(&args, env);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("thread {v1} (")) && err.contains("(EINVAL)"),
        "{err}"
    );
    assert!(err.contains("restored 1 thread"), "{err}");
    assert_eq!(stdout(&o), "");
    assert_eq!(all_affinities(pid), before);

    // --dry-run changes nothing.
    let mut args = vec!["pin"];
    args.extend_from_slice(target);
    args.extend(["--dry-run", "--all", "0"]);
    let o = vpin_env(&args, env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("would be: 0"), "{}", stdout(&o));
    assert_eq!(all_affinities(pid), before);
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn help_version_and_usage_errors() {
    let o = vpin(&["--help"]);
    assert!(o.status.success());
    let help = stdout(&o);
    assert!(
        help.trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("vpin plan"),
        "{help}"
    );
    assert!(help.contains("Examples:"));
    for sub in ["list", "pin", "cpus", "plan"] {
        let o = vpin(&[sub, "--help"]);
        assert!(o.status.success());
        assert!(stdout(&o).contains("Examples:"), "{sub}");
    }
    let o = vpin(&["--version"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("vpin "));
    let o = vpin(&["list", "--frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--frobnicate"));
    let o = vpin(&["pin", "1", "vcpu0=3-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "vpin: vcpu0=3-1: failed to parse CPU list: 3-1 (range 3-1 ends before it starts)\n"
    );
    let o = vpin(&["pin", "1", "cpu0=3"]);
    assert_eq!(o.status.code(), Some(2));
    let o = vpin(&["plan", "1", "--cpus", "0,,1"]);
    assert_eq!(o.status.code(), Some(2));
    let o = vpin(&["list", "2147483647"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "vpin: no such process: 2147483647\n");
}

#[test]
fn fixture_tree_every_vmm() {
    let root = fixture_root();
    let root = root.to_str().unwrap();
    let o = vpin(&["--root", root, "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let vmms: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["vmm"].as_str().unwrap())
        .collect();
    assert_eq!(
        vmms,
        [
            "qemu",
            "qemu",
            "firecracker",
            "cloud-hypervisor",
            "crosvm",
            "lkvm",
            "vmrun"
        ]
    );
    assert!(stderr(&o).contains("unknown"), "{}", stderr(&o));
    let o = vpin(&["--root", root, "list", "db"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("7003  io-blk0    io        1    0-7"),
        "{}",
        stdout(&o)
    );
    let o = vpin(&["--root", root, "plan", "web"]);
    assert_eq!(
        stdout(&o),
        "vpin pin 4242 vcpu0=2 vcpu1=3 emulator=0,1,4,5 io=0,1,4,5\n"
    );
    let o = vpin(&["--root", root, "pin", "plain", "vcpu0=1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("debug-threads=on"), "{}", stderr(&o));
    let o = vpin(&["--root", root, "list", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no guest named nosuch"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn qemu_guest_live() {
    if !have("qemu-system-x86_64") || !Path::new("/dev/kvm").exists() || !have("taskset") {
        eprintln!("skipped: needs qemu-system-x86_64, /dev/kvm and taskset");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let name = format!("vpin-e2e-{}", std::process::id());
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-enable-kvm",
            "-smp",
            "2",
            "-S",
            "-m",
            "64",
            "-display",
            "none",
        ])
        .args(["-name", &format!("{name},debug-threads=on")])
        .args(["-qmp", &format!("unix:{},server,nowait", qmp.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let mut qemu = KillOnDrop(child);
    let pid = qemu.0.id() as i32;
    let start = Instant::now();
    while !qmp.exists() {
        if let Ok(Some(status)) = qemu.0.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(qemu.0.stderr.as_mut().unwrap(), &mut err);
            panic!("QEMU exited with {status}: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "QEMU did not create {qmp:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // vCPU threads are named once they start; wait for them.
    let start = Instant::now();
    let list = loop {
        let o = vpin(&["list", &name, "--json"]);
        let out = stdout(&o);
        if o.status.success() && out.contains("\"vcpu1\"") {
            break out;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{out} {}",
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (v0, v1) = vcpu_tids(&list);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["pid"], pid);
    assert_eq!(v[0]["vmm"], "qemu");
    assert_eq!(v[0]["source"], "thread-names");

    // QMP query-cpus-fast names the same threads.
    let qmp_s = qmp.to_str().unwrap();
    let o = vpin(&["list", "--qmp", qmp_s, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(vcpu_tids(&stdout(&o)), (v0, v1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["source"], "qmp");

    // The table lists each thread's name and role.
    let o = vpin(&["list", &pid.to_string()]);
    let table = stdout(&o);
    assert!(table.starts_with("PID"), "{table}");
    assert!(table.contains(&format!("{v0}  CPU 0/KVM")), "{table}");

    pin_and_check(&[&pid.to_string()], pid, v0, v1, &[]);
    pin_and_check(&["--qmp", qmp_s], pid, v0, v1, &[]);

    // vpin cpus shows the pinned vCPUs.
    let last = *online_cpus().last().unwrap();
    let o = vpin(&["pin", &name, &format!("vcpus={last}")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vpin(&["cpus"]);
    assert!(o.status.success(), "{}", stderr(&o));
    if online_cpus().len() > 1 {
        assert!(
            stdout(&o).contains(&format!("{name}:vcpu0")),
            "{}",
            stdout(&o)
        );
    }
}

/// The real vmrun with the tiny spinning guest (`guests/tiny/spin.S`),
/// `-smp 2`: found by name (`-name`) and by thread names `vcpu0`/`vcpu1`.
#[test]
fn vmrun_real_guest_live() {
    if !have("taskset") || !e2e::bin("vmrun").exists() {
        eprintln!("skipped: needs taskset and a built vmrun (cargo build -p vmrun)");
        return;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm cannot be opened read-write on this host");
        return;
    }
    let name = format!("vp{}", std::process::id());
    let child = Command::new(e2e::bin("vmrun"))
        .args(["-kernel", env!("TINY_SPIN"), "-m", "32", "-smp", "2"])
        .args(["-serial", "null", "-name", &name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmrun");
    let mut vmrun = KillOnDrop(child);
    let pid = vmrun.0.id() as i32;
    let start = Instant::now();
    let list = loop {
        if let Ok(Some(status)) = vmrun.0.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(vmrun.0.stderr.as_mut().unwrap(), &mut err);
            panic!("vmrun exited with {status}: {err}");
        }
        let o = vpin(&["list", &name, "--json"]);
        let out = stdout(&o);
        if o.status.success() && out.contains("\"vcpu1\"") {
            break out;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{out} {}",
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["pid"], pid);
    assert_eq!(v[0]["vmm"], "vmrun");
    assert_eq!(v[0]["name"], name.as_str());
    let (v0, v1) = vcpu_tids(&list);
    pin_and_check(&[&name], pid, v0, v1, &[]);
}

/// The stand-in vmrun: run by `vmrun_guest_live` as a child of this test
/// binary. Names the process "vmrun" and three threads vcpu0, vcpu1 and
/// io-blk0, writes the thread map, says READY and waits for stdin to close.
#[test]
fn fake_vmrun_child() {
    let Some(xdg) = std::env::var_os("VPIN_FAKE_VMRUN") else {
        return; // Only meaningful as the child of vmrun_guest_live.
    };
    std::fs::write("/proc/self/comm", "vmrun").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for name in ["vcpu0", "vcpu1", "io-blk0"] {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                tx.send((name, tid)).unwrap();
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
            .unwrap();
    }
    let mut tids = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let (n, t) = rx.recv().unwrap();
        tids.insert(n, t);
    }
    let map = serde_json::json!({
        "pid": std::process::id(),
        "name": "e2eguest",
        "vcpus": [{"index": 0, "tid": tids["vcpu0"]}, {"index": 1, "tid": tids["vcpu1"]}],
        "io_threads": [{"name": "blk0", "tid": tids["io-blk0"]}],
        "monitor": null
    });
    let dir = PathBuf::from(xdg).join("vmrun/e2eguest");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("threads.json"), map.to_string()).unwrap();
    println!("VPIN-FAKE-READY {}", std::process::id());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn vmrun_guest_live() {
    if !have("taskset") {
        eprintln!("skipped: needs taskset");
        return;
    }
    let xdg = tempfile::tempdir().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fake_vmrun_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VPIN_FAKE_VMRUN", xdg.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the stand-in vmrun");
    let mut fake = KillOnDrop(child);
    let mut lines = BufReader::new(fake.0.stdout.take().unwrap()).lines();
    let pid: i32 = loop {
        let line = lines.next().expect("stand-in vmrun exited").unwrap();
        // libtest may print "test fake_vmrun_child ... " before it.
        if let Some((_, p)) = line.split_once("VPIN-FAKE-READY ") {
            break p.trim().parse().unwrap();
        }
    };
    let env = [("XDG_RUNTIME_DIR", xdg.path())];

    // By name: the thread map in $XDG_RUNTIME_DIR/vmrun/NAME/threads.json.
    let o = vpin_env(&["list", "e2eguest", "--json"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let list = stdout(&o);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["pid"], pid);
    assert_eq!(v[0]["source"], "thread-map");
    assert_eq!(v[0]["name"], "e2eguest");
    let (v0, v1) = vcpu_tids(&list);
    let io = v[0]["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "io-blk0")
        .unwrap();
    assert_eq!(io["role"], "io");

    pin_and_check(&["e2eguest"], pid, v0, v1, &env);

    // Without the thread map, by PID: thread names, VMM detected from the
    // process name.
    std::fs::remove_file(xdg.path().join("vmrun/e2eguest/threads.json")).unwrap();
    let o = vpin_env(&["list", &pid.to_string(), "--json"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["vmm"], "vmrun");
    assert_eq!(v[0]["source"], "thread-names");
    assert_eq!(vcpu_tids(&stdout(&o)), (v0, v1));

    // A stale thread map (process gone) is an error naming the file.
    let stale = xdg.path().join("vmrun/old/threads.json");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(
        &stale,
        r#"{"pid": 2147483647, "name": "old", "vcpus": [], "io_threads": [], "monitor": null}"#,
    )
    .unwrap();
    let o = vpin_env(&["list", "old"], &env);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("stale thread map"), "{}", stderr(&o));
    drop(fake.0.stdin.take());
}
