//! Emulator settings: the library's [`EmulatorConfig`] and the CLI's [`EmulatorArgs`]
//! (every flag also a `KMSGRANT_EMULATOR_*` variable).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::faults::{ErrorInjection, FaultSettings, InjectedError};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8480";
pub const DEFAULT_REGION: &str = "eu-de";
pub const DEFAULT_PROJECT_ID: &str = "0a1b2c3d4e5f40718293a4b5c6d7e8f9";
pub const DEFAULT_DOMAIN_ID: &str = "d0e1f2a3b4c54d6e7f8091a2b3c4d5e6";
pub const DEFAULT_DOMAIN_NAME: &str = "emulator-domain";
pub const DEFAULT_USERNAME: &str = "emulator-user";
pub const DEFAULT_USER_ID: &str = "u0e1f2a3b4c54d6e7f8091a2b3c4d5e6";
pub const DEFAULT_PASSWORD: &str = "emulator-password";
pub const DEFAULT_ACCESS_KEY: &str = "EMULATORACCESSKEY000";
pub const DEFAULT_SECRET_KEY: &str = "emulator-secret-key-0000000000000000000";

/// Everything the emulator needs to start. `Default` is the documented defaults.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Where to listen; port 0 picks a free port (what tests use).
    pub listen: SocketAddr,
    pub region: String,
    pub project_id: String,
    /// On Open Telekom Cloud the default project's name equals the region.
    pub project_name: String,
    pub domain_id: String,
    pub domain_name: String,
    pub username: String,
    pub user_id: String,
    pub password: String,
    pub access_key: String,
    pub secret_key: String,
    /// Validity of password tokens (and of tokens the admin API issues by default).
    pub token_ttl: Duration,
    /// Validity of federated tokens (`/v3.0/OS-AUTH/id-token/tokens` and the protocol `auth`).
    pub federation_token_ttl: Duration,
    /// Validity of agency tokens (`POST /v3/auth/tokens`, method `assume_role`).
    pub agency_token_ttl: Duration,
    /// When set, temporary AK/SK last this long whatever `duration_seconds` asked for (which is
    /// still checked against 900..=86400): lets tests watch them expire.
    pub security_token_ttl: Option<Duration>,
    pub grants_per_key: usize,
    pub keys_per_project: usize,
    /// Keys and grants are loaded from here at start and written back shortly after each change.
    pub state_file: Option<PathBuf>,
    pub faults: FaultSettings,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            region: DEFAULT_REGION.into(),
            project_id: DEFAULT_PROJECT_ID.into(),
            project_name: DEFAULT_REGION.into(),
            domain_id: DEFAULT_DOMAIN_ID.into(),
            domain_name: DEFAULT_DOMAIN_NAME.into(),
            username: DEFAULT_USERNAME.into(),
            user_id: DEFAULT_USER_ID.into(),
            password: DEFAULT_PASSWORD.to_owned(),
            access_key: DEFAULT_ACCESS_KEY.into(),
            secret_key: DEFAULT_SECRET_KEY.to_owned(),
            token_ttl: Duration::from_secs(24 * 3600),
            federation_token_ttl: Duration::from_secs(24 * 3600),
            agency_token_ttl: Duration::from_secs(24 * 3600),
            security_token_ttl: None,
            grants_per_key: 100,
            keys_per_project: 100,
            state_file: None,
            faults: FaultSettings::default(),
        }
    }
}

impl EmulatorConfig {
    /// The defaults on `127.0.0.1:0`, for in-process tests.
    pub fn for_tests() -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            ..Self::default()
        }
    }
}

/// `kms-emulator`: a local DEW/KMS v1.0 and IAM v3 for tests, benchmarks and `kmsgrant-operator dev`.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "kms-emulator", version, args_override_self = true)]
pub struct EmulatorArgs {
    /// Address to listen on. Only loopback addresses unless --allow-non-loopback: the
    /// emulator's credentials are well known and its admin path `/_emulator/` is unguarded.
    #[arg(long, env = "KMSGRANT_EMULATOR_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Listen on a non-loopback address anyway (for a test network you control: anyone who
    /// reaches it can read and change every key and grant, and inject faults).
    #[arg(long, env = "KMSGRANT_EMULATOR_ALLOW_NON_LOOPBACK")]
    pub allow_non_loopback: bool,
    /// Region name (catalog endpoints, key realm, alias URNs).
    #[arg(long, env = "KMSGRANT_EMULATOR_REGION", default_value = DEFAULT_REGION)]
    pub region: String,
    /// Project ID used in `/v1.0/{project_id}/kms/...`.
    #[arg(long, env = "KMSGRANT_EMULATOR_PROJECT_ID", default_value = DEFAULT_PROJECT_ID)]
    pub project_id: String,
    /// Project name (defaults to the region, as on Open Telekom Cloud).
    #[arg(long, env = "KMSGRANT_EMULATOR_PROJECT_NAME")]
    pub project_name: Option<String>,
    /// Domain (account) ID.
    #[arg(long, env = "KMSGRANT_EMULATOR_DOMAIN_ID", default_value = DEFAULT_DOMAIN_ID)]
    pub domain_id: String,
    /// Domain (account) name used in password authentication.
    #[arg(long, env = "KMSGRANT_EMULATOR_DOMAIN_NAME", default_value = DEFAULT_DOMAIN_NAME)]
    pub domain_name: String,
    /// IAM user name for password authentication.
    #[arg(long, env = "KMSGRANT_EMULATOR_USERNAME", default_value = DEFAULT_USERNAME)]
    pub username: String,
    /// IAM user ID (the principal recorded as key creator and grant issuer).
    #[arg(long, env = "KMSGRANT_EMULATOR_USER_ID", default_value = DEFAULT_USER_ID)]
    pub user_id: String,
    /// IAM user password.
    #[arg(long, env = "KMSGRANT_EMULATOR_PASSWORD", default_value = DEFAULT_PASSWORD, hide_default_value = true)]
    pub password: String,
    /// Access key ID of the user.
    #[arg(long, env = "KMSGRANT_EMULATOR_ACCESS_KEY", default_value = DEFAULT_ACCESS_KEY)]
    pub access_key: String,
    /// Secret access key of the user.
    #[arg(long, env = "KMSGRANT_EMULATOR_SECRET_KEY", default_value = DEFAULT_SECRET_KEY, hide_default_value = true)]
    pub secret_key: String,
    /// Token validity in seconds.
    #[arg(long, env = "KMSGRANT_EMULATOR_TOKEN_TTL", default_value_t = 86_400)]
    pub token_ttl: u64,
    /// Federated token (OpenID Connect ID-token exchange) validity in seconds.
    #[arg(
        long,
        env = "KMSGRANT_EMULATOR_FEDERATION_TOKEN_TTL",
        default_value_t = 86_400
    )]
    pub federation_token_ttl: u64,
    /// Agency token (`assume_role`) validity in seconds.
    #[arg(
        long,
        env = "KMSGRANT_EMULATOR_AGENCY_TOKEN_TTL",
        default_value_t = 86_400
    )]
    pub agency_token_ttl: u64,
    /// Temporary AK/SK validity in seconds, overriding the requested `duration_seconds` (which
    /// must still be 900..86400); unset, they last `duration_seconds` (default 900).
    #[arg(long, env = "KMSGRANT_EMULATOR_SECURITY_TOKEN_TTL")]
    pub security_token_ttl: Option<u64>,
    /// Most grants one key may have (KMS.2404 beyond).
    #[arg(long, env = "KMSGRANT_EMULATOR_GRANTS_PER_KEY", default_value_t = 100)]
    pub grants_per_key: usize,
    /// Most customer keys in the project (KMS.1105 beyond).
    #[arg(
        long,
        env = "KMSGRANT_EMULATOR_KEYS_PER_PROJECT",
        default_value_t = 100
    )]
    pub keys_per_project: usize,
    /// Persist keys and grants in this JSON file.
    #[arg(long, env = "KMSGRANT_EMULATOR_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Fixed latency added to every KMS call, in milliseconds.
    #[arg(long, env = "KMSGRANT_EMULATOR_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra random latency, 0..=N milliseconds.
    #[arg(long, env = "KMSGRANT_EMULATOR_JITTER_MS", default_value_t = 0)]
    pub jitter_ms: u64,
    /// Inject errors: OPERATION=RATE:KIND, KIND internal (500 KMS.0100), unavailable (503 KMS.0104)
    /// or throttled (429 APIG.0308); OPERATION `*` for all. Repeatable or comma-separated.
    #[arg(long = "inject-error", env = "KMSGRANT_EMULATOR_INJECT_ERRORS", value_delimiter = ',', value_parser = parse_injection)]
    pub inject_errors: Vec<(String, ErrorInjection)>,
    /// Requests per second allowed per credential; more get 429 APIG.0308.
    #[arg(long, env = "KMSGRANT_EMULATOR_THROTTLE_PER_SECOND")]
    pub throttle_per_second: Option<f64>,
    /// Commit, then drop the connection: OPERATION=RATE for create-grant / revoke-grant.
    #[arg(long = "drop-after-commit", env = "KMSGRANT_EMULATOR_DROP_AFTER_COMMIT", value_delimiter = ',', value_parser = parse_drop)]
    pub drop_after_commit: Vec<(String, f64)>,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .map_err(|_| format!("{text:?} is not a rate"))
}

fn parse_injection(text: &str) -> Result<(String, ErrorInjection), String> {
    let (operation, rest) = text.split_once('=').ok_or("expected OPERATION=RATE:KIND")?;
    let (rate, kind) = rest.split_once(':').unwrap_or((rest, "internal"));
    Ok((
        operation.to_owned(),
        ErrorInjection {
            rate: parse_rate(rate)?,
            error: kind.parse::<InjectedError>()?,
        },
    ))
}

fn parse_drop(text: &str) -> Result<(String, f64), String> {
    let (operation, rate) = text.split_once('=').ok_or("expected OPERATION=RATE")?;
    Ok((operation.to_owned(), parse_rate(rate)?))
}

impl EmulatorArgs {
    pub fn into_config(self) -> Result<EmulatorConfig, String> {
        let Self {
            listen,
            allow_non_loopback,
            region,
            project_id,
            project_name,
            domain_id,
            domain_name,
            username,
            user_id,
            password,
            access_key,
            secret_key,
            token_ttl,
            federation_token_ttl,
            agency_token_ttl,
            security_token_ttl,
            grants_per_key,
            keys_per_project,
            state_file,
            latency_ms,
            jitter_ms,
            inject_errors,
            throttle_per_second,
            drop_after_commit,
        } = self;
        let faults = FaultSettings {
            latency_ms,
            jitter_ms,
            errors: inject_errors.into_iter().collect(),
            throttle_per_second,
            drop_after_commit: drop_after_commit.into_iter().collect(),
            error_after_commit: Default::default(),
            clock_offset_seconds: 0,
            omit_grant_names: false,
        };
        faults.validate()?;
        if !listen.ip().is_loopback() && !allow_non_loopback {
            return Err(format!(
                "refusing to listen on {listen}: the emulator's credentials are public and its admin path /_emulator/ is unguarded; listen on a loopback address (127.0.0.1) or pass --allow-non-loopback"
            ));
        }
        Ok(EmulatorConfig {
            listen,
            project_name: project_name.unwrap_or_else(|| region.clone()),
            region,
            project_id,
            domain_id,
            domain_name,
            username,
            user_id,
            password,
            access_key,
            secret_key,
            token_ttl: Duration::from_secs(token_ttl),
            federation_token_ttl: Duration::from_secs(federation_token_ttl),
            agency_token_ttl: Duration::from_secs(agency_token_ttl),
            security_token_ttl: security_token_ttl.map(Duration::from_secs),
            grants_per_key,
            keys_per_project,
            state_file,
            faults,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: EmulatorArgs,
    }

    fn config(args: &[&str]) -> Result<EmulatorConfig, String> {
        let mut argv = vec!["emulator"];
        argv.extend_from_slice(args);
        Command::try_parse_from(argv).unwrap().args.into_config()
    }

    #[test]
    fn a_non_loopback_listen_address_is_refused_without_the_explicit_flag() {
        let err = config(&["--listen", "0.0.0.0:8480"]).unwrap_err();
        assert!(err.contains("--allow-non-loopback"), "{err}");
        assert!(config(&["--listen", "10.1.2.3:8480"]).is_err());
        let allowed = config(&["--listen", "0.0.0.0:8480", "--allow-non-loopback"]).unwrap();
        assert_eq!(allowed.listen.to_string(), "0.0.0.0:8480");
        for loopback in ["127.0.0.1:8480", "[::1]:8480"] {
            assert!(config(&["--listen", loopback]).is_ok(), "{loopback}");
        }
        assert!(config(&[]).is_ok(), "the default listens on loopback");
    }
}
