//! Command line: one binary, one subcommand per job. Every flag also reads a `KMSGRANT_*` variable.
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    /// Print the completion script for a shell (see the README for where to put it).
    Completions(CompletionsArgs),
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
            Command::Completions(args) => args.run(),
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

/// Options of `kmsgrant-operator completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to print the script for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

impl CompletionsArgs {
    fn run(self) -> ExitCode {
        print_completions(self.shell, &mut std::io::stdout().lock());
        ExitCode::SUCCESS
    }
}

/// The completion script of this binary's command line (every subcommand and flag) for `shell`.
pub fn print_completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut command = Cli::command();
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, &name, &mut script);
    if shell == clap_complete::Shell::Bash {
        script = fix_bash_state_names(&script, &name);
    }
    // Writing to a closed pipe (`... completions bash | head`) is not an error worth a panic.
    let _ = out.write_all(&script);
}

/// clap_complete's bash script (4.6.12) tracks the subcommand typed so far as
/// `kmsgrant__operator__subcmd__run` but labels its branches `kmsgrant__subcmd__operator__subcmd__run`
/// when the binary's name has a hyphen, so no subcommand's flags would ever complete
/// (clap-rs/clap#6421). Relabel the branches the way the state is spelled; once clap_complete
/// is fixed the wrong spelling no longer occurs and this changes nothing.
fn fix_bash_state_names(script: &[u8], name: &str) -> Vec<u8> {
    let script = String::from_utf8_lossy(script);
    let wrong = format!("{}__subcmd__", name.replace('-', "__subcmd__"));
    let right = format!("{}__subcmd__", name.replace('-', "__"));
    script.replace(&wrong, &right).into_bytes()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use clap::{CommandFactory, Parser};
    use clap_complete::Shell;

    use super::Cli;

    fn completions(shell: Shell) -> String {
        let mut script = Vec::new();
        super::print_completions(shell, &mut script);
        String::from_utf8(script).unwrap()
    }

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

    #[test]
    fn completions_for_bash_zsh_and_fish_offer_every_subcommand_and_the_run_flags() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = completions(shell);
            for word in [
                "kmsgrant-operator",
                "run",
                "crd",
                "import",
                "check",
                "migrate",
                "completions",
                "resync-interval",
                "leader-election",
                "output-dir",
            ] {
                assert!(script.contains(word), "the {shell} script lacks {word}");
            }
        }
        // Where the shell's syntax spells flags out (fish names them `-l resync-interval`).
        for shell in [Shell::Bash, Shell::Zsh] {
            assert!(completions(shell).contains("--resync-interval"), "{shell}");
        }
    }

    #[test]
    fn completions_subcommand_takes_the_supported_shells_and_refuses_others() {
        for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
            let parsed = Cli::try_parse_from(["kmsgrant-operator", "completions", shell]);
            assert!(parsed.is_ok(), "{shell}: {parsed:?}");
            assert!(!completions(shell.parse().unwrap()).is_empty(), "{shell}");
        }
        assert!(Cli::try_parse_from(["kmsgrant-operator", "completions", "tcsh"]).is_err());
        assert!(Cli::try_parse_from(["kmsgrant-operator", "completions"]).is_err());
    }

    /// What bash offers for `line` (the last word is the one being completed), as the user would
    /// see it after pressing Tab: the script is sourced and its completion function called the
    /// way bash's programmable completion calls it.
    fn bash_completes(line: &[&str]) -> Vec<String> {
        const PROGRAM: &str = r#"
            source /dev/stdin
            COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
            function=$(complete -p kmsgrant-operator); function=${function##*-F }; function=${function%% *}
            "$function" kmsgrant-operator "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
            printf '%s\n' "${COMPREPLY[@]}"
        "#;
        let mut bash = Command::new("bash")
            .args(["-c", PROGRAM, "bash"])
            .args(line)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bash runs");
        bash.stdin
            .take()
            .unwrap()
            .write_all(completions(Shell::Bash).as_bytes())
            .unwrap();
        let output = bash.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn bash_completes_subcommands_and_the_flags_of_a_subcommand() {
        assert_eq!(
            bash_completes(&["kmsgrant-operator", "c"]),
            ["crd", "check", "completions"]
        );
        assert_eq!(
            bash_completes(&["kmsgrant-operator", "run", "--resync"]),
            ["--resync-interval"]
        );
        assert_eq!(
            bash_completes(&["kmsgrant-operator", "completions", "z"]),
            ["zsh"]
        );
    }

    #[test]
    fn bash_completion_script_passes_bash_syntax_check() {
        let mut bash = Command::new("bash")
            .arg("-n")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bash runs");
        bash.stdin
            .take()
            .unwrap()
            .write_all(completions(Shell::Bash).as_bytes())
            .unwrap();
        let checked = bash.wait_with_output().unwrap();
        assert!(
            checked.status.success(),
            "bash -n: {}",
            String::from_utf8_lossy(&checked.stderr)
        );
    }
}
