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
    /// Print every CustomResourceDefinition as YAML (or write them into a directory).
    Crd(CrdArgs),
    /// Run the operator against a cluster.
    Run,
    /// Run the local KMS and IAM emulator.
    Emulator,
    /// Start the local sandbox: control plane, emulator, CRDs, operator and an example grant.
    Dev,
}

impl Cli {
    pub fn run(self) -> ExitCode {
        match self.command {
            Command::Crd(args) => args.run(),
            Command::Run | Command::Emulator | Command::Dev => not_implemented(),
        }
    }
}

fn not_implemented() -> ExitCode {
    eprintln!("error: this subcommand is not implemented yet");
    ExitCode::from(2)
}

/// Options of `kmsgrant-operator crd`.
#[derive(Debug, clap::Args)]
pub struct CrdArgs {
    /// Write one file per CRD into this directory instead of printing them.
    #[arg(long, env = "KMSGRANT_CRD_OUTPUT_DIR", value_name = "DIR")]
    pub output_dir: Option<std::path::PathBuf>,
}

impl CrdArgs {
    fn run(self) -> ExitCode {
        let crds = crate::api::crds();
        let Some(dir) = self.output_dir else {
            let docs: Vec<String> = crds.iter().map(crate::api::crd_yaml).collect();
            print!("---\n{}", docs.join("---\n"));
            return ExitCode::SUCCESS;
        };
        for crd in &crds {
            let path = dir.join(crate::api::crd_file_name(crd));
            if let Err(err) = std::fs::write(&path, crate::api::crd_yaml(crd)) {
                eprintln!("error: cannot write {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
        }
        ExitCode::SUCCESS
    }
}
