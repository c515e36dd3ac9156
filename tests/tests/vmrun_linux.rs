//! vmrun boots the minimal Linux guest (scripts/build-guest.sh) once and
//! checks many facts from its serial log: CPUs brought up, memory, the CPU
//! model asked for, the initramfs reaching `Run /init`, the exit status. On
//! hosts with hardware KVM the init script's own output is checked too; on
//! nested PVM hosts user space cannot run (its first syscall faults), which
//! the test asserts instead.

use std::process::{Command, Stdio};
use std::time::Instant;

use e2e::bin;

#[test]
fn linux_guest_boots_to_init_with_two_cpus() {
    let Some(dir) = e2e::guest_dir() else { return };
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("serial.log");
    let start = Instant::now();
    // A hung guest must not hang CI: give up after 15 minutes.
    let out = Command::new("timeout")
        .args(["--signal=KILL", "900"])
        .arg(bin("vmrun"))
        .args([
            "-name",
            "e2e-linux",
            "-smp",
            "2",
            "-m",
            "256m",
            "-cpu",
            "qemu64",
            "-kernel",
        ])
        .arg(dir.join("bzImage"))
        .arg("-initrd")
        .arg(dir.join("initramfs.cpio"))
        .args([
            "-append",
            "console=ttyS0 panic=-1 reboot=k",
            "-no-reboot",
            "-serial",
        ])
        .arg(format!("file:{}", log.display()))
        .env("VMRUN_CACHE_DIR", tmp.path().join("cache"))
        .stdin(Stdio::null())
        .output()
        .expect("run vmrun");
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("boot took {elapsed:.1?}; stderr:\n{stderr}");
    let tail = e2e::tail_lines(&log, 40);
    assert_eq!(
        out.status.code(),
        Some(0),
        "vmrun failed; log tail:\n{tail}"
    );

    // The kernel got the command line, with the PVM workarounds on such hosts.
    assert!(
        log.contains("Command line: console=ttyS0 panic=-1 reboot=k"),
        "{tail}"
    );
    if pvm {
        assert!(
            log.contains("nofsgsbase clearcpuid=cx16"),
            "PVM parameters missing:\n{tail}"
        );
        assert_eq!(
            stderr.matches("kvm_pvm").count(),
            1,
            "one line about the PVM host: {stderr}"
        );
    } else {
        assert!(
            !log.contains("clearcpuid"),
            "workarounds applied on a hardware KVM host"
        );
    }
    // The CPU model asked for, every vCPU up, the memory size.
    assert!(log.contains("smpboot: CPU0: AMD QEMU Virtual CPU version 2.5+ (family: 0xf, model: 0x6b, stepping: 0x1)"), "{tail}");
    assert!(log.contains("smp: Brought up 1 node, 2 CPUs"), "{tail}");
    let mem = log
        .lines()
        .find(|l| l.contains("Memory: "))
        .expect("Memory: line");
    let total_k: u64 = mem
        .split('/')
        .nth(1)
        .and_then(|s| s.split('K').next())
        .and_then(|s| s.parse().ok())
        .expect("total memory in the Memory: line");
    assert!((250 * 1024..=256 * 1024).contains(&total_k), "{mem}");
    // MP table: the IOAPIC and both processors were found without ACPI.
    assert!(
        log.contains("Processor #0 (Bootup-CPU)") && log.contains("Processor #1"),
        "{tail}"
    );
    assert!(log.contains("IOAPIC[0]: apic_id 2"), "{tail}");
    // The serial console and the initramfs.
    assert!(log.contains("ttyS0 at I/O 0x3f8 (irq = 4"), "{tail}");
    assert!(log.contains("Run /init as init process"), "{tail}");
    if pvm {
        // User space faults on its first syscall on this kind of host; the
        // kernel panics and panic=-1 reboot=k resets, which ends vmrun.
        assert!(log.contains("Attempted to kill init"), "{tail}");
    } else {
        assert!(log.contains("VMRUN-INIT: started"), "{tail}");
        assert!(log.contains("VMRUN-INIT: cpus=2"), "{tail}");
        assert!(
            log.contains("VMRUN-INIT: model= QEMU Virtual CPU version 2.5+"),
            "{tail}"
        );
        assert!(log.contains("VMRUN-INIT: done"), "{tail}");
    }
}
