//! Command line: one binary, one subcommand per job. Every flag also reads a `KMSGRANT_*` variable.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
// A flag given twice takes the last value, as people expect when overriding a default.
#[command(
    name = "kmsgrant-operator",
    version,
    args_override_self = true,
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
    Run(Box<crate::run::RunArgs>),
    /// Print KmsGrant manifests that import a key's existing grants by ID.
    Import(Box<crate::import::ImportArgs>),
    /// Tell what is wrong with the install and the cloud side of each provider config, and how
    /// to fix it (exit 1 when a check failed).
    Check(Box<crate::check::CheckArgs>),
    /// Rewrite manifests (and, in later work, the cluster's stored objects) from
    /// kmsgrant.io/v1alpha1 to v1beta1.
    Migrate(Box<crate::migrate::MigrateArgs>),
    /// Check the documented KMS behaviours the operator relies on against a real account named
    /// by KMSGRANT_LIVE_* variables, cleaning up every grant it made; prints a report to attach
    /// to a bug report (exit 1 when the account differs from the emulator, 2 when a setting is
    /// missing).
    LiveTest(Box<crate::live_test::LiveTestArgs>),
    /// Start the local sandbox: control plane, emulator, CRDs, operator and an example grant.
    #[cfg(feature = "dev")]
    Dev(Box<crate::dev::DevArgs>),
}

impl Cli {
    pub fn run(self) -> ExitCode {
        match self.command {
            Command::Crd(args) => args.run(),
            Command::Run(args) => args.run(),
            #[cfg(feature = "dev")]
            Command::Dev(args) => args.run(),
            Command::Import(args) => args.run(),
            Command::Check(args) => args.run(),
            Command::Migrate(args) => args.run(),
            Command::LiveTest(args) => args.run(),
        }
    }
}

/// Options of `kmsgrant-operator crd`.
#[derive(Debug, clap::Args)]
pub struct CrdArgs {
    /// Write one file per CRD into this directory instead of printing them.
    #[arg(long, env = "KMSGRANT_CRD_OUTPUT_DIR", value_name = "DIR")]
    pub output_dir: Option<std::path::PathBuf>,
    /// The step of the v1alpha1 -> v1beta1 graduation to generate the CRDs for (default: the one
    /// this release ships). The other steps are for testing upgrades and rollbacks.
    #[arg(
        long,
        env = "KMSGRANT_CRD_API_STAGE",
        value_enum,
        default_value = "stored"
    )]
    pub api_stage: crate::api::ApiStage,
}

impl CrdArgs {
    fn run(self) -> ExitCode {
        let crds = crate::api::crds_at(self.api_stage);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_also_reads_a_kmsgrant_environment_variable() {
        fn check(command: &clap::Command, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                let named = arg.get_long().is_some() || arg.get_short().is_some();
                let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
                if named && !builtin && !env.starts_with("KMSGRANT_") {
                    missing.push(format!("{} --{}", command.get_name(), arg.get_id()));
                }
            }
            command
                .get_subcommands()
                .for_each(|sub| check(sub, missing));
        }
        let mut missing = Vec::new();
        check(&Cli::command(), &mut missing);
        assert!(
            missing.is_empty(),
            "flags without a KMSGRANT_* variable: {missing:?}"
        );
    }

    #[test]
    fn durations_parse_with_units_and_name_the_problem_otherwise() {
        assert_eq!(
            crate::process::parse_duration("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(
            crate::process::parse_duration("30s"),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(
            crate::process::parse_duration("5m"),
            Ok(Duration::from_secs(300))
        );
        assert_eq!(
            crate::process::parse_duration("2"),
            Ok(Duration::from_secs(2))
        );
        assert_eq!(
            crate::process::parse_duration("1m30s"),
            Ok(Duration::from_secs(90))
        );
        assert!(
            crate::process::parse_duration("-5s")
                .unwrap_err()
                .contains("negative")
        );
        assert!(
            crate::process::parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }
}
