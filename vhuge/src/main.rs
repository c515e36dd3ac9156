//! vhuge: hugepage pools and hugetlbfs mounts (see docs/vhuge.md).

mod cli;
mod mount;
mod persist;
mod plan;
mod pool;
mod status;

fn main() {
    std::process::exit(cli::main());
}
