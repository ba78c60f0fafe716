use clap::Parser;

fn main() -> std::process::ExitCode {
    kmsgrant::cli::Cli::parse().run()
}
