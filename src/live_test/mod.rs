//! `kmsgrant-operator live-test`: the documented behaviours the emulator is built on, checked on
//! a real account that `KMSGRANT_LIVE_*` variables name. Never part of CI here.
//!
//! The cases are the API-level rows of the emulator's conformance table
//! (`crates/kms-emulator/tests/conformance.rs`) and the operator's grant lifecycle as KMS sees it,
//! sent through the operator's own client. The first is what grant identity stands on: a grant
//! created with a name lists with that name.
//!
//! What it touches: grants it creates on the one key it is given, each named
//! `kmsgrant-live-test/<run>/<case>`. A cleanup runs after the cases whatever became of them (a
//! failed case, a panic, Ctrl-C): it lists the key and revokes every grant carrying this run's
//! prefix and every grant ID this run created (an account that lists grants without names is
//! still cleaned up), and nothing else. A grant it did not name is never revoked; grants of
//! earlier runs are reported, not touched.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;

use futures::FutureExt;

use crate::api::SigningVariant;
use kmsgrant_kms::{ExposeSecret, SecretString};

mod cases;
mod kit;
mod report;

use cases::Case;
use kit::Kit;
use report::{CaseReport, footer, render, summarise};
pub use report::{Report, Verdict};

/// How every grant name of the kit starts; a run adds `<run>/`.
pub const NAME_PREFIX: &str = "kmsgrant-live-test/";

/// Options of `kmsgrant-operator live-test`. Every account setting is required: nothing has a
/// default that points anywhere.
#[derive(Debug, clap::Args)]
pub struct LiveTestArgs {
    /// KMS endpoint of the account, e.g. https://kms.eu-de.otc.t-systems.com.
    #[arg(long, env = "KMSGRANT_LIVE_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,
    /// IAM endpoint (optional: AK/SK signing needs none).
    #[arg(long, env = "KMSGRANT_LIVE_IAM_ENDPOINT", value_name = "URL")]
    pub iam_endpoint: Option<String>,
    /// Region, e.g. eu-de (the Open Telekom Cloud signature names it).
    #[arg(long, env = "KMSGRANT_LIVE_REGION")]
    pub region: Option<String>,
    /// The project the key lives in (its ID).
    #[arg(long, env = "KMSGRANT_LIVE_PROJECT_ID")]
    pub project_id: Option<String>,
    /// Access key (AK) of the identity the kit acts as; it must have created the key (only a
    /// key's creator may revoke its grants).
    #[arg(long, env = "KMSGRANT_LIVE_ACCESS_KEY")]
    pub access_key: Option<String>,
    /// Secret key (SK). Prefer the variable: a flag's value shows in the process list.
    #[arg(long, env = "KMSGRANT_LIVE_SECRET_KEY", hide_env_values = true, value_parser = secret)]
    pub secret_key: Option<SecretString>,
    /// The signature format: Huawei (`Access=`) or OpenTelekomCloud (`Credential=`).
    #[arg(
        long,
        env = "KMSGRANT_LIVE_SIGNING",
        value_parser = signing_variant,
        value_name = "Huawei|OpenTelekomCloud"
    )]
    pub signing: Option<SigningVariant>,
    /// The key the kit creates its grants on: a customer master key of its own, which no
    /// KmsGrant, KmsKeyPolicy or other tool writes on while the kit runs.
    #[arg(long, env = "KMSGRANT_LIVE_KEY_ID", value_name = "KEY_ID")]
    pub key_id: Option<String>,
    /// The grantee of the kit's grants (a user ID of the account; it holds describe-key,
    /// create-datakey and encrypt-datakey on the key for seconds at a time).
    #[arg(long, env = "KMSGRANT_LIVE_PRINCIPAL", value_name = "USER_ID")]
    pub principal: Option<String>,
    /// `text` or `json`.
    #[arg(
        short = 'o',
        long,
        env = "KMSGRANT_LIVE_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: crate::check::Output,
    /// Accept a plain http:// endpoint (local emulators only).
    #[arg(long, env = "KMSGRANT_ALLOW_HTTP_ENDPOINTS")]
    pub allow_http_endpoints: bool,
}

fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value.to_owned()))
}

fn signing_variant(value: &str) -> Result<SigningVariant, String> {
    match value.to_ascii_lowercase().as_str() {
        "huawei" => Ok(SigningVariant::Huawei),
        "opentelekomcloud" => Ok(SigningVariant::OpenTelekomCloud),
        _ => Err(format!("{value:?} is not Huawei or OpenTelekomCloud")),
    }
}

/// The account the kit runs against.
#[derive(Clone, Debug)]
pub struct Account {
    pub endpoint: String,
    pub iam_endpoint: Option<String>,
    pub region: String,
    pub project_id: String,
    pub access_key: String,
    pub secret_key: SecretString,
    pub signing: SigningVariant,
    pub key_id: String,
    pub principal: String,
    pub allow_http: bool,
}

impl LiveTestArgs {
    /// The account, or what is missing or malformed, each naming its variable and flag.
    pub fn account(&self) -> Result<Account, Vec<String>> {
        let mut problems = Vec::new();
        let mut required = |value: &Option<String>, variable: &str, flag: &str| match value
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            Some(value) => value.to_owned(),
            None => {
                problems.push(format!("{variable} (--{flag}) is not set"));
                String::new()
            }
        };
        let endpoint = required(&self.endpoint, "KMSGRANT_LIVE_ENDPOINT", "endpoint");
        let region = required(&self.region, "KMSGRANT_LIVE_REGION", "region");
        let project_id = required(&self.project_id, "KMSGRANT_LIVE_PROJECT_ID", "project-id");
        let access_key = required(&self.access_key, "KMSGRANT_LIVE_ACCESS_KEY", "access-key");
        let key_id = required(&self.key_id, "KMSGRANT_LIVE_KEY_ID", "key-id");
        let principal = required(&self.principal, "KMSGRANT_LIVE_PRINCIPAL", "principal");
        let secret_key = self
            .secret_key
            .clone()
            .filter(|s| !s.expose_secret().is_empty());
        if secret_key.is_none() {
            problems.push("KMSGRANT_LIVE_SECRET_KEY (--secret-key) is not set".into());
        }
        if self.signing.is_none() {
            problems.push(
                "KMSGRANT_LIVE_SIGNING (--signing) is not set: Huawei or OpenTelekomCloud".into(),
            );
        }
        if !key_id.is_empty() && !is_key_id(&key_id) {
            problems.push(format!(
                "KMSGRANT_LIVE_KEY_ID {key_id:?} is not a key ID (8-4-4-4-12 lower-case letters and digits)"
            ));
        }
        if !principal.is_empty() && !is_principal(&principal) {
            problems.push(format!(
                "KMSGRANT_LIVE_PRINCIPAL {principal:?} is not a user ID (1-64 letters and digits)"
            ));
        }
        let (Some(secret_key), Some(signing), true) =
            (secret_key, self.signing, problems.is_empty())
        else {
            return Err(problems);
        };
        Ok(Account {
            endpoint,
            iam_endpoint: self.iam_endpoint.clone().filter(|e| !e.trim().is_empty()),
            region,
            project_id,
            access_key,
            secret_key,
            signing,
            key_id,
            principal,
            allow_http: self.allow_http_endpoints,
        })
    }

    pub fn run(self) -> ExitCode {
        let account = match self.account() {
            Ok(account) => account,
            Err(problems) => {
                eprintln!(
                    "error: live-test runs only against an account you name in full:\n  {}\nSee docs/live-test.md.",
                    problems.join("\n  ")
                );
                return ExitCode::from(2);
            }
        };
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let report = match runtime.block_on(run(account)) {
            Ok(report) => report,
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::from(2);
            }
        };
        match self.output {
            crate::check::Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("the report serialises")
            ),
            crate::check::Output::Text => print!("{}", render(&report)),
        }
        if report.all_match() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

fn is_key_id(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| {
            p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

fn is_principal(value: &str) -> bool {
    (1..=64).contains(&value.len()) && value.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Runs the kit: the preflight, every case, then the cleanup (always, once the preflight passed).
pub async fn run(account: Account) -> Result<Report, String> {
    let kit = Kit::new(account)?;
    let preflight = kit.preflight().await?;
    let mut cases = Vec::new();
    let interrupted = tokio::select! {
        () = run_cases(&kit, &mut cases) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        eprintln!(
            "interrupted: revoking the grants of run {} before the report",
            kit.run
        );
    }
    let mut cleanup = kit.cleanup().await;
    cleanup.earlier_runs = preflight.earlier_runs;
    let summary = summarise(&cases);
    let mut report = Report {
        kit: "kmsgrant-operator live-test",
        version: env!("CARGO_PKG_VERSION"),
        run: kit.run.clone(),
        endpoint: kit.account.endpoint.clone(),
        project_id: kit.account.project_id.clone(),
        key_id: kit.account.key_id.clone(),
        signing: format!("{:?}", kit.account.signing),
        cases,
        cleanup,
        interrupted,
        summary,
        footer: String::new(),
    };
    report.footer = footer(summary, report.all_match());
    Ok(report)
}

async fn run_cases(kit: &Kit, cases: &mut Vec<CaseReport>) {
    for case in Case::ALL {
        let verdict = guarded(case.run(kit)).await;
        cases.push(CaseReport {
            case: case.name(),
            documented: case.documented(),
            verdict,
        });
    }
}

/// A case's verdict, or an error when it panicked: the run goes on, and the cleanup still
/// finds what the case created.
pub async fn guarded(case: impl Future<Output = Verdict>) -> Verdict {
    match AssertUnwindSafe(case).catch_unwind().await {
        Ok(verdict) => verdict,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "no message".into());
            Verdict::Error {
                message: format!("the case panicked (a bug of the kit: {why}); the cleanup ran"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    #[command(args_override_self = true)]
    struct Command {
        #[command(flatten)]
        args: LiveTestArgs,
    }

    fn args(argv: &[&str]) -> LiveTestArgs {
        let mut all = vec!["live-test"];
        all.extend_from_slice(argv);
        Command::try_parse_from(all).unwrap().args
    }

    const FULL: &[&str] = &[
        "--endpoint",
        "https://kms.eu-de.otc.t-systems.com",
        "--region",
        "eu-de",
        "--project-id",
        "0123456789abcdef0123456789abcdef",
        "--access-key",
        "AK",
        "--secret-key",
        "very-secret",
        "--signing",
        "OpenTelekomCloud",
        "--key-id",
        "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e",
        "--principal",
        "13gg44z4g2sglzk0egw0u726zoyzvrs8",
    ];
    #[test]
    fn every_missing_setting_is_named_by_its_variable_and_flag() {
        let problems = args(&[]).account().unwrap_err();
        for variable in [
            "KMSGRANT_LIVE_ENDPOINT (--endpoint)",
            "KMSGRANT_LIVE_REGION (--region)",
            "KMSGRANT_LIVE_PROJECT_ID (--project-id)",
            "KMSGRANT_LIVE_ACCESS_KEY (--access-key)",
            "KMSGRANT_LIVE_SECRET_KEY (--secret-key)",
            "KMSGRANT_LIVE_SIGNING (--signing)",
            "KMSGRANT_LIVE_KEY_ID (--key-id)",
            "KMSGRANT_LIVE_PRINCIPAL (--principal)",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(variable)),
                "{variable} missing from {problems:?}"
            );
        }
        assert_eq!(
            problems.len(),
            8,
            "the IAM endpoint is optional: {problems:?}"
        );
        let account = args(FULL).account().unwrap();
        assert_eq!(account.signing, SigningVariant::OpenTelekomCloud);
        assert!(account.iam_endpoint.is_none());
    }

    #[test]
    fn malformed_key_ids_and_principals_are_refused_before_any_call() {
        let mut argv = FULL.to_vec();
        argv.extend(["--key-id", "alias/app", "--principal", "not-a-user"]);
        let problems = args(&argv).account().unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("KMSGRANT_LIVE_KEY_ID"));
        assert!(problems[1].contains("KMSGRANT_LIVE_PRINCIPAL"));
    }

    #[test]
    fn the_secret_key_never_shows_in_debug_output() {
        let parsed = args(FULL);
        assert!(!format!("{parsed:?}").contains("very-secret"));
        assert!(!format!("{:?}", parsed.account().unwrap()).contains("very-secret"));
    }
}
