//! Command line: one binary, one subcommand per job. Every flag also reads a `KMSGRANT_*` variable.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kmsgrant-operator",
    version,
    about = "Grants on KMS keys, declared as Kubernetes objects"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every CustomResourceDefinition as YAML.
    Crd,
    /// Run the operator against a cluster.
    Run,
    /// Run the local KMS and IAM emulator.
    Emulator(Box<crate::emulator::EmulatorArgs>),
    /// Start the local sandbox: control plane, emulator, CRDs, operator and an example grant.
    Dev,
}

impl Cli {
    pub fn run(self) -> ExitCode {
        match self.command {
            Command::Crd => ExitCode::SUCCESS,
            Command::Emulator(args) => crate::emulator::run(*args),
            Command::Run | Command::Dev => not_implemented(),
        }
    }
}

fn not_implemented() -> ExitCode {
    eprintln!("error: this subcommand is not implemented yet");
    ExitCode::from(2)
}
