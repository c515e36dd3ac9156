//! vpin: taskset for guests.

mod cli;
mod hostview;
mod pin;
mod plan;
mod qmp;
mod target;

fn main() {
    std::process::exit(cli::main());
}
