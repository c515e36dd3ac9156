mod cli;
mod console;
mod diskboot;
mod run;

fn main() {
    std::process::exit(run::main());
}
