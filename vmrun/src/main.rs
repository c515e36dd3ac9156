mod cli;
mod console;
mod drive;
mod run;

fn main() {
    std::process::exit(run::main());
}
