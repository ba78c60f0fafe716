//! A local DEW/KMS v1.0 and IAM v3 that behaves like the documented service: same paths, fields,
//! string-typed pagination, error codes and HTTP statuses (`shared/design/kms-api.md`), both
//! token and AK/SK (`SDK-HMAC-SHA256`, both variants) authentication, quotas, and faults on
//! purpose. See `README.md` of this crate.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use kms_emulator::{Emulator, EmulatorConfig};
//! let emulator = Emulator::start(EmulatorConfig::for_tests()).await?;
//! let kms = emulator.kms_endpoint(); // http://127.0.0.1:PORT/v1.0/{project_id}
//! emulator.admin().grant_counts();
//! emulator.shutdown().await;
//! # Ok(()) }
//! ```
pub mod admin;
mod auth;
pub mod config;
pub mod errors;
pub mod faults;
pub mod federation;
mod federation_api;
mod routes;
mod server;
pub mod state;
pub mod stats;
pub mod validation;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use admin::{EmulatorAdmin, NewAgency, NewKey, NewUser, StateDump, UserSummary};
pub use config::{EmulatorArgs, EmulatorConfig};
pub use errors::ErrorCode;
pub use faults::{ErrorInjection, FaultSettings, InjectedError};
pub use federation_api::federated_user_id;
pub use state::{Agency, Domain, Grant, Key, KeyState, TokenScope};
pub use stats::{CallRecord, StatsSnapshot};

/// Starts emulators.
pub struct Emulator;

impl Emulator {
    /// Binds `config.listen` (port 0 picks a free port), loads the state file if any, and serves
    /// until [`RunningEmulator::shutdown`].
    pub async fn start(config: EmulatorConfig) -> std::io::Result<RunningEmulator> {
        config.faults.validate().map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(server::Shared::new(config, addr));
        if let Some(path) = &shared.config.state_file
            && let Some(saved) = server::load_state_file(path)?
        {
            shared
                .world()
                .restore(saved, auth::unix_ms(SystemTime::now()));
        }
        let router = routes::router(shared.clone());
        let (shutdown, receiver) = watch::channel(false);
        let task = tokio::spawn(server::serve(listener, router, shared.clone(), receiver));
        Ok(RunningEmulator {
            addr,
            shared,
            shutdown,
            task,
        })
    }
}

/// A started emulator. Dropping it without [`RunningEmulator::shutdown`] leaves it serving until
/// the runtime ends.
#[derive(Debug)]
pub struct RunningEmulator {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningEmulator {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1.0/{project_id}`: append `/kms/{action}`.
    pub fn kms_endpoint(&self) -> String {
        format!("{}/v1.0/{}", self.base_url(), self.shared.config.project_id)
    }

    /// `http://127.0.0.1:PORT/v3`
    pub fn iam_endpoint(&self) -> String {
        format!("{}/v3", self.base_url())
    }

    pub fn config(&self) -> &EmulatorConfig {
        &self.shared.config
    }

    pub fn admin(&self) -> EmulatorAdmin {
        EmulatorAdmin::new(self.shared.clone())
    }

    /// Stops accepting, closes open connections and writes the state file.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// What a person needs to use the emulator right away (its credentials are not secrets).
pub fn startup_banner(emulator: &RunningEmulator) -> String {
    let c = emulator.config();
    format!(
        "KMS emulator listening on {base}\n\
         \x20 KMS endpoint   {kms}/kms/<action>\n\
         \x20 IAM endpoint   {iam}   (POST /auth/tokens, GET /auth/catalog, /auth/domains, /projects)\n\
         \x20 admin          {base}/_emulator/   (faults, stats, calls, state, reset)\n\
         \x20 region         {region}\n\
         \x20 project        {project_name} ({project_id})\n\
         \x20 domain         {domain_name} ({domain_id})\n\
         \x20 user           {username} ({user_id}), password {password}\n\
         \x20 access key     {ak}\n\
         \x20 secret key     {sk}\n\
         \x20 limits         {grants} grants per key, {keys} keys per project\n\
         \x20 state file     {state}",
        base = emulator.base_url(),
        kms = emulator.kms_endpoint(),
        iam = emulator.iam_endpoint(),
        region = c.region,
        project_name = c.project_name,
        project_id = c.project_id,
        domain_name = c.domain_name,
        domain_id = c.domain_id,
        username = c.username,
        user_id = c.user_id,
        password = c.password,
        ak = c.access_key,
        sk = c.secret_key,
        grants = c.grants_per_key,
        keys = c.keys_per_project,
        state = c
            .state_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none (in memory)".into()),
    )
}
