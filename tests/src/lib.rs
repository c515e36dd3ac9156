//! Helpers for the end-to-end tests: locate the built binaries and run them.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a workspace binary built by cargo (`target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop(); // deps/
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Run a workspace binary with arguments and return its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

/// Whether this host can run guests: /dev/kvm opens read-write. Prints the
/// skip reason when it cannot, so a skipped test says why.
pub fn kvm_available() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    eprintln!("SKIP: /dev/kvm cannot be opened read-write on this host");
    false
}

/// Run `vmrun` with `args` and stdin from /dev/null: (exit status, stdout,
/// stderr); -1 when it died of a signal.
pub fn vmrun(args: &[&str]) -> (i32, String, String) {
    let b = bin("vmrun");
    assert!(
        b.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        b.display()
    );
    let out = Command::new(b)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vmrun");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The minimal Linux guest built by scripts/build-guest.sh (`build/guest`
/// with bzImage and initramfs.cpio). Missing, it fails the test with what
/// to run, or returns `None` with a printed reason when VTOOLS_SKIP_LINUX
/// is set.
pub fn guest_dir() -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/guest");
    if dir.join("bzImage").exists() && dir.join("initramfs.cpio").exists() {
        return Some(dir);
    }
    if std::env::var_os("VTOOLS_SKIP_LINUX").is_some() {
        eprintln!("SKIP: build/guest is missing and VTOOLS_SKIP_LINUX is set");
        return None;
    }
    panic!(
        "build/guest/bzImage or initramfs.cpio is missing: run scripts/build-guest.sh (CI does)"
    );
}

/// The last `n` lines of `text` (for failure messages about guest logs).
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether the tests run as root (taps, namespaces, hugepage pools).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
