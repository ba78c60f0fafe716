//! Lease-based leader election (coordination.k8s.io/v1) that cannot overlap: with several
//! replicas exactly one writes to KMS at a time.
//!
//! - **Expiry is judged from local observation**, as client-go does: a standby notes the local
//!   (monotonic) time at which it last saw the lease record change, and takes over only after a
//!   whole lease duration without a change. The holder's `renewTime` is never compared with the
//!   local wall clock, so skewed clocks change nothing.
//! - **Every renew is bounded** by the renew deadline (two thirds of the lease duration): a renew
//!   that hangs (the API server stalls) counts as failed.
//! - **Fencing:** the holder may start a KMS write only while its last successful renew *began*
//!   less than the renew deadline ago ([`Fence::check`]); a standby cannot take over before a full
//!   lease duration after that renew, which leaves the remaining third for the write in flight.
//!   When the lease is lost every reconcile fails its next check before it writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

/// The holder may not start a write: its lease is lost or was not renewed in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "not the leader (lease lost or not renewed within the renew deadline); no KMS write started"
)]
pub struct NotLeader;

/// Whether this process may write to KMS now. Clones share state.
#[derive(Clone)]
pub struct Fence {
    inner: Arc<FenceState>,
}

struct FenceState {
    /// `None`: no leader election, always allowed.
    valid_for: Option<Duration>,
    /// When the last successful renew began.
    renewed: Mutex<Option<Instant>>,
    lost: AtomicBool,
}

impl Fence {
    /// A fence that never closes (leader election off: a single replica).
    pub fn open() -> Self {
        Self {
            inner: Arc::new(FenceState {
                valid_for: None,
                renewed: Mutex::new(None),
                lost: AtomicBool::new(false),
            }),
        }
    }

    fn elected(valid_for: Duration) -> Self {
        Self {
            inner: Arc::new(FenceState {
                valid_for: Some(valid_for),
                renewed: Mutex::new(None),
                lost: AtomicBool::new(false),
            }),
        }
    }

    fn renewed_at(&self, at: Instant) {
        *self.inner.renewed.lock().expect("fence lock") = Some(at);
    }

    fn lose(&self) {
        self.inner.lost.store(true, Ordering::SeqCst);
    }

    /// `Ok` when a KMS write may start now.
    pub fn check(&self) -> Result<(), NotLeader> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Result<(), NotLeader> {
        let Some(valid_for) = self.inner.valid_for else {
            return Ok(());
        };
        if self.inner.lost.load(Ordering::SeqCst) {
            return Err(NotLeader);
        }
        match *self.inner.renewed.lock().expect("fence lock") {
            Some(at) if now.saturating_duration_since(at) < valid_for => Ok(()),
            _ => Err(NotLeader),
        }
    }
}

/// What identifies one version of the lease record: any change in it proves the holder alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<String>,
    resource_version: Option<String>,
}

/// A candidate's view of the lease: the record last seen and the local time it was first seen.
#[derive(Debug, Default)]
struct Observer {
    last: Option<(Record, Instant)>,
}

impl Observer {
    /// Records what the lease holds now; the clock starts again whenever it changed.
    fn observe(&mut self, record: Record, now: Instant) {
        if self.last.as_ref().is_none_or(|(seen, _)| *seen != record) {
            self.last = Some((record, now));
        }
    }

    /// Whether the holder has let a whole lease duration pass, by our own clock, without change.
    fn expired(&self, now: Instant, duration: Duration) -> bool {
        self.last
            .as_ref()
            .is_some_and(|(_, seen)| now.saturating_duration_since(*seen) >= duration)
    }
}

/// One candidate for one lease.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    observer: Mutex<Observer>,
    fence: Fence,
    /// Added to the wall clock written into `renewTime` (a test seam for clock skew; others
    /// never read it for expiry).
    skew: jiff::SignedDuration,
}

impl LeaderElection {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        let duration = duration.max(Duration::from_secs(3));
        let skew = std::env::var("KMSGRANT_TEST_CLOCK_SKEW_SECONDS")
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .map(jiff::SignedDuration::from_secs)
            .unwrap_or_default();
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observer: Mutex::new(Observer::default()),
            fence: Fence::elected(renew_deadline(duration)),
            skew,
        }
    }

    /// The fence every KMS write checks.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    fn retry_period(&self) -> Duration {
        self.duration / 5
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.attempt().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(lease = %self.name, error = %err, "cannot read or write the lease")
                }
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    /// Renews the lease until it cannot; returns when leadership is lost (the fence is closed
    /// first, so no new KMS write starts).
    pub async fn hold(&self) {
        let deadline = renew_deadline(self.duration);
        loop {
            tokio::time::sleep(self.retry_period()).await;
            let last = *self.fence.inner.renewed.lock().expect("fence lock");
            let left = last
                .map(|at| deadline.saturating_sub(at.elapsed()))
                .unwrap_or(deadline);
            match tokio::time::timeout(left.max(Duration::from_millis(1)), self.attempt()).await {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) => {
                    self.fence.lose();
                    tracing::error!(lease = %self.name, "another replica holds the lease");
                    return;
                }
                Ok(Err(err)) => {
                    tracing::warn!(lease = %self.name, error = %err, "cannot renew the lease")
                }
                Err(_) => tracing::warn!(lease = %self.name, "renewing the lease timed out"),
            }
            if self.fence.check().is_err() {
                self.fence.lose();
                tracing::error!(lease = %self.name, "lease not renewed within the renew deadline");
                return;
            }
        }
    }

    /// Gives the lease up so a standby takes over at once (on a clean shutdown).
    pub async fn release(&self) {
        self.fence.lose();
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
                tracing::info!(lease = %self.name, "released the lease");
            }
        }
    }

    /// Takes or renews the lease when it is ours, free or expired; true when we hold it now.
    async fn attempt(&self) -> Result<bool, kube::Error> {
        let started = Instant::now();
        let now = MicroTime(jiff::Timestamp::now() + self.skew);
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            let won = conflict_is_false(self.api.create(&PostParams::default(), &lease).await)?;
            if won {
                self.fence.renewed_at(started);
            }
            return Ok(won);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let record = Record {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            resource_version: lease.metadata.resource_version.clone(),
        };
        let held_for = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.duration);
        let expired = {
            let mut observer = self.observer.lock().expect("observer lock");
            observer.observe(record, started);
            observer.expired(started, held_for)
        };
        if !(ours || free || expired) {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(seconds);
        // The resourceVersion in the object makes a concurrent writer fail with 409.
        let won = conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )?;
        if won {
            self.fence.renewed_at(started);
        }
        Ok(won)
    }
}

/// How long after a renew began the holder may still start writes, and how long one renew may
/// take: two thirds of the lease, leaving a third for a write in flight.
fn renew_deadline(duration: Duration) -> Duration {
    duration * 2 / 3
}

fn conflict_is_false(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder whose wall clock is off by `skew` renews every 5 s, writing `renewTime` from that
    /// clock; a standby with a correct clock watches every 2 s.
    fn standby_takes_over_after(skew_seconds: i64) -> Duration {
        let duration = Duration::from_secs(15);
        let start = Instant::now();
        let wall = |at: Instant| {
            jiff::Timestamp::UNIX_EPOCH
                + jiff::SignedDuration::from_secs(1_800_000_000 + skew_seconds)
                + jiff::SignedDuration::try_from(at - start).unwrap()
        };
        let mut standby = Observer::default();
        let mut record = Record {
            holder: Some("leader".into()),
            renew_time: None,
            resource_version: Some("1".into()),
        };
        let holder_stops = Duration::from_secs(60);
        let mut version = 1;
        for tick in 0..200u64 {
            let now = start + Duration::from_secs(tick);
            let elapsed = now - start;
            if tick % 5 == 0 && elapsed < holder_stops {
                version += 1;
                record = Record {
                    renew_time: Some(wall(now).to_string()),
                    resource_version: Some(version.to_string()),
                    ..record.clone()
                };
            }
            if tick % 2 == 0 {
                standby.observe(record.clone(), now);
                if standby.expired(now, duration) {
                    return elapsed;
                }
            }
        }
        panic!("the standby never took over");
    }

    #[test]
    fn lease_expiry_tolerates_clock_skew() {
        for skew in [-30, -5, 0, 5, 30] {
            let took_over = standby_takes_over_after(skew);
            // The holder's last renew was at 55 s and the standby saw it at 56 s: it takes over
            // at its first look a whole lease later (72 s), never while the holder renews, and
            // neither earlier nor later because of the skew.
            assert_eq!(took_over, Duration::from_secs(72), "skew {skew} s");
        }
    }

    #[test]
    fn a_new_standby_never_takes_a_lease_at_first_sight_however_old_renew_time_looks() {
        let now = Instant::now();
        let mut observer = Observer::default();
        observer.observe(
            Record {
                holder: Some("leader".into()),
                renew_time: Some("2000-01-01T00:00:00Z".into()),
                resource_version: Some("7".into()),
            },
            now,
        );
        assert!(!observer.expired(now, Duration::from_secs(15)));
        assert!(!observer.expired(now + Duration::from_secs(14), Duration::from_secs(15)));
        assert!(observer.expired(now + Duration::from_secs(15), Duration::from_secs(15)));
    }

    #[test]
    fn the_fence_closes_before_a_standby_could_take_over_and_stays_closed_once_lost() {
        let duration = Duration::from_secs(15);
        let fence = Fence::elected(renew_deadline(duration));
        let renewed = Instant::now();
        assert!(fence.check_at(renewed).is_err(), "never renewed: closed");
        fence.renewed_at(renewed);
        assert!(fence.check_at(renewed + Duration::from_secs(9)).is_ok());
        // Closed at 10 s, a third of the lease before anyone may take over at 15 s.
        assert!(fence.check_at(renewed + Duration::from_secs(10)).is_err());
        fence.renewed_at(renewed + Duration::from_secs(10));
        assert!(fence.check_at(renewed + Duration::from_secs(11)).is_ok());
        fence.lose();
        assert!(fence.check_at(renewed + Duration::from_secs(11)).is_err());
        assert!(Fence::open().check().is_ok());
    }
}
