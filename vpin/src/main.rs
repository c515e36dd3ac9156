//! vpin: taskset for guests.

mod cli;
mod hostview;
mod pin;
mod plan;
mod qmp;
mod target;

fn main() {
    // Die quietly on a closed pipe (`vpin list | head -1`), as taskset and
    // ps do, instead of panicking in println!.
    // SAFETY: restoring the default disposition of SIGPIPE before any other
    // thread exists has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(cli::main());
}
