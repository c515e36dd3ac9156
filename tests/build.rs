//! Assemble the tiny test guests (guests/tiny/*.S) into PVH ELF kernels with
//! GNU as and ld, and tell the tests where they are: `env!("TINY_HELLO")`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../guests/tiny");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", root.display());
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .expect("guests/tiny")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".S") && n != "common.S")
        .collect();
    names.sort();
    for n in names {
        let stem = n.trim_end_matches(".S");
        let obj = out.join(format!("{stem}.o"));
        let elf = out.join(format!("{stem}.elf"));
        let ok = Command::new("as")
            .args(["--64", "-I"])
            .arg(&root)
            .arg("-o")
            .arg(&obj)
            .arg(root.join(&n))
            .status()
            .expect("GNU as (binutils) is needed to build the tiny test guests")
            .success();
        assert!(ok, "assembling guests/tiny/{n} failed");
        let ok = Command::new("ld")
            .args(["-m", "elf_x86_64", "--no-warn-rwx-segments", "-T"])
            .arg(root.join("link.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&obj)
            .status()
            .expect("GNU ld (binutils) is needed to build the tiny test guests")
            .success();
        assert!(ok, "linking guests/tiny/{n} failed");
        println!(
            "cargo:rustc-env=TINY_{}={}",
            stem.to_uppercase(),
            elf.display()
        );
    }
}
