mod cli;
mod console;
mod diskboot;
mod drive;
mod net;
mod run;

fn main() {
    std::process::exit(run::main());
}
