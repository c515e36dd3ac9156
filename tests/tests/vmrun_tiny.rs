//! vmrun with tiny purpose-built guests (guests/tiny/*.S): fast checks of
//! serial output, exit codes, memory layout, CPUID, unknown ports, signals
//! and command-line errors, on the real KVM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{bin, kvm_available, vmrun};

#[test]
fn hello_prints_and_exits_with_the_guest_status() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmrun(&["-kernel", env!("TINY_HELLO"), "-m", "64", "-nographic"]);
    assert_eq!(out, "Hello from the tiny guest\n", "stderr: {err}");
    assert_eq!(code, 42, "stderr: {err}");
}

#[test]
fn qemu64_and_kvm64_identity_from_guest_cpuid() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmrun(&["-kernel", env!("TINY_CPUID"), "-m", "32", "-smp", "4"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("vendor=AuthenticAMD\n"), "{out}");
    assert!(
        out.contains("brand=QEMU Virtual CPU version 2.5+\n"),
        "{out}"
    );
    // family 0xf model 0x6b stepping 1; BSP APIC ID 0, 4 logical CPUs, 64-byte clflush.
    assert!(out.contains("leaf1=00060fb1 00040800"), "{out}");

    let (code, out, err) = vmrun(&["-kernel", env!("TINY_CPUID"), "-m", "32", "-cpu", "kvm64"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("vendor=GenuineIntel\n"), "{out}");
    assert!(out.contains("brand=Common KVM processor\n"), "{out}");
    assert!(out.contains("leaf1=00000f61 00010800"), "{out}");
}

#[test]
fn memory_map_and_command_line_reach_the_guest() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmrun(&[
        "-kernel",
        env!("TINY_MEM"),
        "-m",
        "256",
        "-append",
        "hello=world",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("magic=336ec578"), "{out}");
    // 256 MiB minus the 385 KiB reserved below 1 MiB, in whole MiB per entry.
    assert!(out.contains("ram_mib=000000ff"), "{out}");
    assert!(out.contains("cmdline=hello=world"), "{out}");

    // Above 3 GiB the RAM is split around the 32-bit MMIO hole.
    let (code, out, err) = vmrun(&["-kernel", env!("TINY_MEM"), "-m", "4G"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("e820=00000005"), "{out}");
    assert!(out.contains("ram_mib=00000fff"), "{out}");
}

#[test]
fn unknown_ports_read_as_all_ones() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmrun(&["-kernel", env!("TINY_PORTS"), "-m", "32"]);
    assert_eq!(code, 7, "{err}");
    assert!(out.contains("unmapped=000000ff"), "{out}");
    assert!(out.contains("lsr=00000060"), "{out}");
}

#[test]
fn sigterm_stops_the_guest_cleanly() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let serial = format!("file:{}", log.display());
    let child = Command::new(bin("vmrun"))
        .args([
            "-kernel",
            env!("TINY_SPIN"),
            "-m",
            "32",
            "-smp",
            "2",
            "-serial",
            &serial,
            "-name",
            "spinner",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(&log).unwrap_or_default() != "spinning\n" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "guest did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // vCPU threads are named vcpuN, the process after -name.
    let pid = child.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "spinner");
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .filter(|n| n.starts_with("vcpu"))
        .collect();
    names.sort();
    assert_eq!(names, vec!["vcpu0", "vcpu1"]);
    // SAFETY: kill has no memory-safety preconditions; pid is our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("terminating on signal 15"));
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    let (code, _, err) = vmrun(&["-kernel", "/nonexistent/bzImage"]);
    if kvm_available() {
        assert_eq!(code, 1);
        assert!(
            err.contains("could not read kernel '/nonexistent/bzImage'"),
            "{err}"
        );
    }
    for (args, needle) in [
        (
            &["-smp", "0", "-kernel", "k"][..],
            "-smp: cpus must be greater than 0",
        ),
        (
            &["-smp", "4,sockets=3", "-kernel", "k"][..],
            "sockets (3) * cores (1) * threads (1) != maxcpus (4)",
        ),
        (&["-m", "1KiB", "-kernel", "k"][..], "-m 1KiB"),
        (
            &["-cpu", "pentium9", "-kernel", "k"][..],
            "unable to find CPU model 'pentium9'",
        ),
        (
            &["-cpu", "qemu64,+bogus", "-kernel", "k"][..],
            "property 'bogus' not found",
        ),
        (
            &["-serial", "tcp:1234", "-kernel", "k"][..],
            "-serial tcp:1234",
        ),
        (&["-bogus-option"][..], "unexpected argument"),
        (&["-m", "64"][..], "no kernel given"),
    ] {
        let (code, _, err) = vmrun(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn help_version_cpu_help_and_check_host() {
    let (code, out, _) = vmrun(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Examples:") && out.contains("-smp"), "{out}");
    let (code, out, _) = vmrun(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("vmrun "), "{out}");
    let (code, out, _) = vmrun(&["-cpu", "help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("qemu64") && out.contains("kvm64") && out.contains("host"),
        "{out}"
    );
    let (code, out, _) = vmrun(&["--check-host", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(v["nested_pvm"], serde_json::Value::Bool(pvm));
    assert_eq!(code == 0, v["problems"].as_array().unwrap().is_empty());
    if kvm_available() {
        assert_eq!(code, 0, "{out}");
        assert_eq!(v["api_version"], 12);
    }
}

#[test]
fn i8042_reset_ends_the_vm_with_no_reboot_and_reboots_without() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmrun(&["-kernel", env!("TINY_RESET"), "-m", "32", "-no-reboot"]);
    assert_eq!((code, out.as_str()), (0, "booting\n"), "{err}");
    // Without -no-reboot the guest boots again (and again): stop it after
    // a few boots with SIGTERM.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let child = Command::new(bin("vmrun"))
        .args(["-kernel", env!("TINY_RESET"), "-m", "32", "-serial"])
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("booting")
        .count()
        < 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the guest did not reboot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
}

#[test]
fn serial_on_a_unix_socket_waits_for_its_client() {
    if !kvm_available() {
        return;
    }
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("serial.sock");
    let child = Command::new(bin("vmrun"))
        .args(["-kernel", env!("TINY_HELLO"), "-m", "32", "-serial"])
        .arg(format!("unix:{},server", sock.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut conn = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(_) => {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "no serial socket"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "Hello from the tiny guest\n");
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(42));
}

/// The CPUID tables vmrun hands to KVM, read back with KVM_GET_CPUID2: the
/// guest-visible identity, topology and KVM leaves of every vCPU (feature
/// flags leak from the host on nested PVM hosts, so the tables are the
/// place to check them there).
#[test]
fn cpuid_tables_read_back_from_kvm() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = vmrun(&[
        "-kernel",
        env!("TINY_HELLO"),
        "-m",
        "32",
        "-smp",
        "4,sockets=2,cores=2",
        "-cpu",
        "qemu64,-svm,+popcnt",
        "--print-cpuid",
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Vec<u64>> = out
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            vec![
                f[0].parse().unwrap(),
                u64::from_str_radix(f[1], 16).unwrap(),
                f[2].parse().unwrap(),
                u64::from_str_radix(f[3], 16).unwrap(),
                u64::from_str_radix(f[4], 16).unwrap(),
                u64::from_str_radix(f[5], 16).unwrap(),
                u64::from_str_radix(f[6], 16).unwrap(),
            ]
        })
        .collect();
    let get = |vcpu: u64, leaf: u64, index: u64| {
        rows.iter()
            .find(|r| r[0] == vcpu && r[1] == leaf && r[2] == index)
            .unwrap_or_else(|| panic!("vCPU {vcpu} leaf {leaf:#x}.{index} missing:\n{out}"))
            .clone()
    };
    for vcpu in 0..4u64 {
        let l0 = get(vcpu, 0, 0);
        assert_eq!(l0[3], 0xd, "max basic leaf of qemu64");
        // "AuthenticAMD": EBX, EDX, ECX.
        assert_eq!(
            (l0[4], l0[5], l0[6]),
            (0x6874_7541, 0x444d_4163, 0x6974_6e65)
        );
        let l1 = get(vcpu, 1, 0);
        assert_eq!(l1[3], 0x0006_0fb1, "family 0xf model 0x6b stepping 1");
        // APIC ID: socket << 1 | core (2 cores, 1 thread); 2 logical CPUs per package.
        assert_eq!(l1[4] >> 24, vcpu, "APIC ID of vCPU {vcpu}");
        assert_eq!((l1[4] >> 16) & 0xff, 2);
        assert_ne!(l1[5] & (1 << 31), 0, "hypervisor bit");
        assert_ne!(l1[5] & (1 << 23), 0, "+popcnt");
        let e1 = get(vcpu, 0x8000_0001, 0);
        assert_eq!(e1[5] & (1 << 2), 0, "-svm");
        assert_ne!(e1[6] & (1 << 29), 0, "long mode");
        let k = get(vcpu, 0x4000_0000, 0);
        // "KVMKVMKVM"
        assert_eq!((k[4], k[5], k[6]), (0x4b4d_564b, 0x564b_4d56, 0x0000_004d));
        let brand: String = (0x8000_0002..=0x8000_0004u64)
            .flat_map(|leaf| {
                let r = get(vcpu, leaf, 0);
                r[3..7]
                    .iter()
                    .flat_map(|w| (*w as u32).to_le_bytes())
                    .collect::<Vec<u8>>()
            })
            .map(char::from)
            .collect();
        assert!(
            brand.starts_with("QEMU Virtual CPU version 2.5+"),
            "{brand:?}"
        );
    }
}
