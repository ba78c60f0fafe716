//! The listener: one task per connection so that a handler can drop its own connection
//! ("commit, then drop"), state-file persistence, and shutdown.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::ConnectInfo;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tower_service::Service;

use super::auth::unix_ms;
use super::config::EmulatorConfig;
use super::faults::{FaultSettings, Throttle};
use super::state::{Account, KeysAndGrants, User, World};
use super::stats::Stats;

/// Everything the handlers share. One mutex over the world keeps every call atomic.
#[derive(Debug)]
pub struct Shared {
    pub config: EmulatorConfig,
    pub local_addr: SocketAddr,
    pub world: Mutex<World>,
    pub stats: Mutex<Stats>,
    faults: RwLock<Arc<FaultSettings>>,
    pub throttle: Mutex<Throttle>,
    /// Set by every write; the persister saves and clears it.
    pub dirty: AtomicBool,
}

impl Shared {
    pub fn new(config: EmulatorConfig, local_addr: SocketAddr) -> Self {
        let account = Account {
            region: config.region.clone(),
            project_id: config.project_id.clone(),
            project_name: config.project_name.clone(),
            domain_id: config.domain_id.clone(),
            domain_name: config.domain_name.clone(),
            grants_per_key: config.grants_per_key,
            keys_per_project: config.keys_per_project,
        };
        let user = User {
            name: config.username.clone(),
            user_id: config.user_id.clone(),
            domain_id: config.domain_id.clone(),
            password: config.password.clone(),
            access_key: Some(config.access_key.clone()),
            secret_key: Some(config.secret_key.clone()),
        };
        let world = World::new(account, vec![user], unix_ms(SystemTime::now()));
        Self {
            faults: RwLock::new(Arc::new(config.faults.clone())),
            config,
            local_addr,
            world: Mutex::new(world),
            stats: Mutex::new(Stats::default()),
            throttle: Mutex::new(Throttle::default()),
            dirty: AtomicBool::new(false),
        }
    }

    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().expect("world lock")
    }

    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    pub fn faults(&self) -> Arc<FaultSettings> {
        self.faults.read().expect("faults lock").clone()
    }

    pub fn set_faults(&self, faults: FaultSettings) {
        *self.faults.write().expect("faults lock") = Arc::new(faults);
        self.throttle.lock().expect("throttle lock").clear();
    }
}

/// Put into every request's extensions: lets a handler close its own connection without answering.
#[derive(Clone, Debug)]
pub struct ConnectionAbort(Arc<Notify>);

impl ConnectionAbort {
    pub fn abort(&self) {
        self.0.notify_one();
    }
}

pub fn load_state_file(path: &Path) -> std::io::Result<Option<KeysAndGrants>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(std::io::Error::other),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Writes the state file if anything changed since the last save (write to a temporary file,
/// then rename, so a crash never leaves half a file).
pub fn save_if_dirty(shared: &Shared, path: &Path) -> std::io::Result<()> {
    if !shared.dirty.swap(false, Ordering::AcqRel) {
        return Ok(());
    }
    let snapshot = shared.world().keys_and_grants();
    let bytes = serde_json::to_vec_pretty(&snapshot).map_err(std::io::Error::other)?;
    let temporary = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

/// Accepts connections until `shutdown` turns true; each connection is served on its own task.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let persister = shared.config.state_file.clone().map(|path| {
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = shutdown.changed() => break,
                }
                if let Err(error) = save_if_dirty(&shared, &path) {
                    eprintln!(
                        "emulator: cannot write state file {}: {error}",
                        path.display()
                    );
                }
            }
            if let Err(error) = save_if_dirty(&shared, &path) {
                eprintln!(
                    "emulator: cannot write state file {}: {error}",
                    path.display()
                );
            }
        })
    });
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let abort = ConnectionAbort(Arc::new(Notify::new()));
            let notify = abort.0.clone();
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(abort.clone());
                    request.extensions_mut().insert(ConnectInfo(peer));
                    let mut router = router.clone();
                    async move { router.call(request).await }
                },
            );
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = notify.notified() => {}
                _ = shutdown.changed() => {}
            }
        });
    }
    if let Some(persister) = persister {
        let _ = persister.await;
    }
}
