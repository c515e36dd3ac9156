//! vimg: qemu-img compatible disk image tool for raw and qcow2.

mod check;
mod cli;
mod common;
mod compare;
mod compress;
mod convert;
mod create;
mod fastcopy;
mod info;
mod map;
mod qjson;
mod resize;
mod snapshot;

fn main() {
    std::process::exit(cli::main());
}
