//! vpin's command line on the fixture /proc and /sys tree
//! (vcore/tests/fixtures/vpin/host): output formats and exit codes.

use std::process::{Command, Output};

fn vpin(args: &[&str]) -> Output {
    let root = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../vcore/tests/fixtures/vpin/host"
    );
    Command::new(env!("CARGO_BIN_EXE_vpin"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("run vpin")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn list_by_name_pid_and_pidfile() {
    let o = vpin(&["list", "web"]);
    assert!(o.status.success(), "{}", err(&o));
    let table = out(&o);
    assert!(table.starts_with("PID   TID   NAME             ROLE      PSR  AFFINITY\n"));
    assert!(
        table.contains("4242  4247  CPU 1/KVM        vcpu1     3    3\n"),
        "{table}"
    );
    assert_eq!(out(&vpin(&["list", "4242"])), table);
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("web.pid");
    std::fs::write(&pidfile, "4242\n").unwrap();
    assert_eq!(
        out(&vpin(&["list", "--pidfile", pidfile.to_str().unwrap()])),
        table
    );
    std::fs::write(&pidfile, "junk\n").unwrap();
    let o = vpin(&["list", "--pidfile", pidfile.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("does not hold a process id"),
        "{}",
        err(&o)
    );
}

#[test]
fn every_vmm_and_forced_vmm() {
    let o = vpin(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 7);
    let fc = &v[2];
    assert_eq!(fc["vmm"], "firecracker");
    assert_eq!(fc["threads"][2]["role"], "vcpu0");
    // --vmm filters the host-wide list.
    let o = vpin(&["list", "--vmm", "crosvm", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let o = vpin(&["list", "--vmm", "xen"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("unknown VMM \"xen\""), "{}", err(&o));
}

#[test]
fn unknown_vcpu_order_is_said() {
    let o = vpin(&["list", "plain"]);
    assert!(o.status.success());
    assert!(
        err(&o).contains("which thread runs which vCPU is unknown"),
        "{}",
        err(&o)
    );
    let o = vpin(&["plan", "plain"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn plan_and_cpus() {
    let o = vpin(&["plan", "db"]);
    assert_eq!(
        out(&o),
        "vpin pin 7000 vcpu0=2 vcpu1=3 emulator=0,1,4,5 io=0,1,4,5\n"
    );
    let o = vpin(&["plan", "db", "--cpus", "6-7", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["assignments"][0]["cpus"], "6");
    assert_eq!(v["assignments"][1]["cpus"], "7");
    let o = vpin(&["plan", "db", "--cpus", "6-"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        err(&o),
        "vpin: --cpus 6-: failed to parse CPU list: 6- (missing number)\n"
    );
    let o = vpin(&["cpus"]);
    assert!(out(&o).contains("isolated:    2,3,6,7\n"), "{}", out(&o));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["list", "--nope"][..],
        &["pin", "web", "vcpu0"],
        &["pin", "web", "gpu=1"],
        &["pin", "vcpu0=1"],
        &["pin", "web"],
        &["bogus"],
        &[],
    ] {
        let o = vpin(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", err(&o));
    }
    let o = vpin(&["pin", "web", "vcpu7=1"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        err(&o),
        "vpin: guest web (4242) has no vcpu7: its vCPUs are 0,1\n"
    );
}
