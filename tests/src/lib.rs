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
