//! Fair shares of KMS work across accounts and namespaces, in the spirit of API Priority and
//! Fairness: one tenant applying thousands of objects must not make another tenant's new grant
//! wait behind its whole queue.
//!
//! The queue that matters is the controller's: objects are reconciled in the order they became
//! due, by a fixed number of workers. So a reconcile that has KMS writes to make asks the gate
//! first, and a request over its share is not made to wait in a worker (which would keep the
//! queue behind it standing still): it is *deferred*, handed back to the queue to come again
//! when its turn is estimated to be near. Only half of the workers may hold KMS work at once; the
//! others keep walking the queue, so a newcomer's object is reached within moments and admitted
//! at the next free slot.
//!
//! Shares are hierarchical: the admitted work is split evenly among the provider configs
//! (accounts) that have work waiting, and each config's share among the namespaces that do. A
//! lone tenant gets everything; nobody is limited while nobody else asks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A namespace or config that asked within this window still counts as competing.
const ACTIVE_WINDOW: Duration = Duration::from_secs(3);
/// Deferred objects not seen again for this long are forgotten (deleted, or admitted elsewhere).
const FORGET_AFTER: Duration = Duration::from_secs(300);
/// Bounds of a deferral.
const MIN_DEFERRAL: Duration = Duration::from_millis(50);
const MAX_DEFERRAL: Duration = Duration::from_secs(30);

/// What the gate says to a reconcile that has KMS work.
pub enum Admission {
    /// Go ahead; the slot is held until the ticket is dropped.
    Admitted(Ticket),
    /// Over its share now: come back after this long.
    Deferred(Duration),
    /// Within its share, but every slot is taken (by others over theirs, who will not get them
    /// back): a slot frees within moments, so wait for it ([`FairGate::released`]) and ask again,
    /// rather than go to the back of a queue others keep filling.
    Wait,
}

/// The gate: one per operator.
#[derive(Clone)]
pub struct FairGate {
    inner: Arc<Mutex<State>>,
    /// Woken at every release.
    released: Arc<tokio::sync::Notify>,
    /// Work admitted at once, across every config.
    capacity: usize,
}

#[derive(Default)]
struct State {
    total: usize,
    lanes: HashMap<String, Lane>,
}

/// One provider config's work.
#[derive(Default)]
struct Lane {
    admitted: usize,
    last_asked: Option<Instant>,
    namespaces: HashMap<String, Flow>,
    /// How long a slot is held, on average lately (`None`: none released yet).
    hold: Option<Duration>,
}

/// One namespace's work on one config.
#[derive(Default)]
struct Flow {
    admitted: usize,
    last_asked: Option<Instant>,
    /// Objects deferred and not admitted since: their place in the line (kept when deferred
    /// again) and when they were last deferred.
    waiting: HashMap<String, (u64, Instant)>,
    /// The next place in the line.
    next_place: u64,
}

impl FairGate {
    /// A gate admitting `capacity` reconciles' KMS work at once (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::default(),
            released: Arc::default(),
            capacity: capacity.max(1),
        }
    }

    /// The reconcile of `object` (a stable key, e.g. its UID) in `namespace`, using provider
    /// config `lane`, has KMS writes to make.
    pub fn ask(&self, lane: &str, namespace: &str, object: &str) -> Admission {
        let now = Instant::now();
        let mut state = self.inner.lock().expect("fair gate lock");
        let lanes_active = state
            .lanes
            .iter()
            .filter(|(name, l)| name.as_str() == lane || l.is_active(now))
            .count()
            .max(1);
        let lane_share = (self.capacity / lanes_active).max(1);
        let total = state.total;
        let capacity = self.capacity;
        let entry = state.lanes.entry(lane.to_owned()).or_default();
        entry.last_asked = Some(now);
        let namespaces_active = entry
            .namespaces
            .iter()
            .filter(|(name, f)| name.as_str() == namespace || f.is_active(now))
            .count()
            .max(1);
        let flow_share = (lane_share / namespaces_active).max(1);
        let lane_admitted = entry.admitted;
        // What the lane can serve: its share of slots over how long one is held. Not what it
        // served lately, which is low exactly when deferred objects came back too late.
        let throughput = lane_share as f64 / entry.hold_seconds();
        let flow = entry.namespaces.entry(namespace.to_owned()).or_default();
        flow.last_asked = Some(now);
        flow.waiting
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < FORGET_AFTER);
        if total < capacity && lane_admitted < lane_share && flow.admitted < flow_share {
            flow.waiting.remove(object);
            flow.admitted += 1;
            entry.admitted += 1;
            state.total += 1;
            return Admission::Admitted(Ticket {
                gate: self.clone(),
                lane: lane.to_owned(),
                namespace: namespace.to_owned(),
                admitted_at: now,
            });
        }
        // Over the share (or every slot taken by others over theirs, who will not get them
        // back): come again about when the objects deferred before this one have had their turn.
        let place = match flow.waiting.get(object) {
            Some((place, _)) => *place,
            None => {
                flow.next_place += 1;
                flow.next_place
            }
        };
        flow.waiting.insert(object.to_owned(), (place, now));
        // First come, first served within the namespace: the objects deferred before this one,
        // and still waiting, go first.
        let ahead = flow.waiting.values().filter(|(p, _)| *p < place).count() as f64;
        if flow.admitted < flow_share {
            // Within its share, only waiting for a slot to free.
            return Admission::Wait;
        }
        let delay = {
            // A little early: better deferred again than late with idle slots.
            Duration::from_secs_f64(0.8 * ahead / throughput.max(1.0) / namespaces_active as f64)
                .clamp(MIN_DEFERRAL, MAX_DEFERRAL)
        };
        Admission::Deferred(delay + jitter(object, delay))
    }

    fn release(&self, lane: &str, namespace: &str, held: Duration) {
        let now = Instant::now();
        let mut state = self.inner.lock().expect("fair gate lock");
        state.total = state.total.saturating_sub(1);
        let mut drop_lane = false;
        if let Some(entry) = state.lanes.get_mut(lane) {
            entry.admitted = entry.admitted.saturating_sub(1);
            entry.hold = Some(match entry.hold {
                Some(average) => average.mul_f64(0.8) + held.mul_f64(0.2),
                None => held,
            });
            if let Some(flow) = entry.namespaces.get_mut(namespace) {
                flow.admitted = flow.admitted.saturating_sub(1);
            }
            entry
                .namespaces
                .retain(|_, f| f.admitted > 0 || f.is_active(now) || !f.waiting.is_empty());
            drop_lane = entry.admitted == 0 && entry.namespaces.is_empty();
        }
        if drop_lane {
            state.lanes.remove(lane);
        }
        drop(state);
        self.released.notify_waiters();
    }

    /// Resolves at the next release of a slot.
    pub async fn released(&self) {
        self.released.notified().await;
    }

    /// Reconciles admitted now (for tests and metrics).
    pub fn admitted(&self) -> usize {
        self.inner.lock().expect("fair gate lock").total
    }
}

impl Lane {
    fn is_active(&self, now: Instant) -> bool {
        self.admitted > 0
            || self
                .last_asked
                .is_some_and(|at| now.saturating_duration_since(at) < ACTIVE_WINDOW)
    }

    /// How long a slot is held, in seconds: a tenth of a second before any was released.
    fn hold_seconds(&self) -> f64 {
        self.hold.map_or(0.1, |hold| hold.as_secs_f64()).max(0.001)
    }
}

impl Flow {
    fn is_active(&self, now: Instant) -> bool {
        self.admitted > 0
            || self
                .last_asked
                .is_some_and(|at| now.saturating_duration_since(at) < ACTIVE_WINDOW)
    }
}

/// Up to a tenth of `delay`, fixed per object: deferred objects do not come back in a crowd.
fn jitter(object: &str, delay: Duration) -> Duration {
    let hash = object.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    delay.mul_f64((hash % 1000) as f64 / 10_000.0)
}

/// A slot of KMS work; released when dropped.
pub struct Ticket {
    gate: FairGate,
    lane: String,
    namespace: String,
    admitted_at: Instant,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate
            .release(&self.lane, &self.namespace, self.admitted_at.elapsed());
    }
}

/// The objects deferred and not admitted since, for tests.
#[cfg(test)]
fn waiting(gate: &FairGate, lane: &str, namespace: &str) -> std::collections::HashSet<String> {
    gate.inner
        .lock()
        .unwrap()
        .lanes
        .get(lane)
        .and_then(|l| l.namespaces.get(namespace))
        .map(|f| f.waiting.keys().cloned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(gate: &FairGate, lane: &str, ns: &str, object: &str) -> Option<Ticket> {
        match gate.ask(lane, ns, object) {
            Admission::Admitted(ticket) => Some(ticket),
            Admission::Deferred(_) | Admission::Wait => None,
        }
    }

    #[test]
    fn a_lone_tenant_gets_every_slot_and_no_more() {
        let gate = FairGate::new(4);
        let held: Vec<Ticket> = (0..4)
            .map(|i| admit(&gate, "acct", "a", &format!("a{i}")).unwrap())
            .collect();
        assert!(admit(&gate, "acct", "a", "a4").is_none());
        assert_eq!(waiting(&gate, "acct", "a").len(), 1);
        drop(held);
        assert_eq!(gate.admitted(), 0);
        assert!(admit(&gate, "acct", "a", "a4").is_some());
        assert!(waiting(&gate, "acct", "a").is_empty());
    }

    #[test]
    fn a_newcomer_gets_the_next_free_slot_while_the_busy_tenant_waits_its_share() {
        let gate = FairGate::new(4);
        let mut a: Vec<Ticket> = (0..4)
            .map(|i| admit(&gate, "acct", "a", &format!("a{i}")).unwrap())
            .collect();
        // B asks while A holds every slot: within its share, it waits for the next free one.
        assert!(matches!(gate.ask("acct", "b", "b0"), Admission::Wait));
        // One of A's finishes: A is over its share (2 of 4 with B competing), B gets the slot.
        a.pop();
        assert!(admit(&gate, "acct", "a", "a9").is_none());
        let b = admit(&gate, "acct", "b", "b0").expect("B's turn");
        // A gets slots back only down to its share.
        a.pop();
        assert!(
            admit(&gate, "acct", "a", "a10").is_none(),
            "A holds 2 = its share"
        );
        drop(b);
        drop(a);
    }

    #[test]
    fn accounts_share_the_slots_too() {
        let gate = FairGate::new(4);
        let mut one: Vec<Ticket> = (0..4)
            .map(|i| admit(&gate, "one", "a", &format!("a{i}")).unwrap())
            .collect();
        assert!(admit(&gate, "two", "c", "c0").is_none());
        one.pop();
        assert!(admit(&gate, "one", "a", "a5").is_none());
        assert!(admit(&gate, "two", "c", "c0").is_some());
    }

    #[test]
    fn deferrals_grow_with_the_tenants_own_backlog() {
        let gate = FairGate::new(2);
        let _held: Vec<Ticket> = (0..2)
            .map(|i| admit(&gate, "acct", "a", &format!("a{i}")).unwrap())
            .collect();
        let delays: Vec<Duration> = (0..200)
            .map(|i| match gate.ask("acct", "a", &format!("w{i}")) {
                Admission::Deferred(d) => d,
                _ => panic!("over its share: deferred"),
            })
            .collect();
        assert!(
            delays[199] > delays[0] * 5,
            "{:?} vs {:?}",
            delays[0],
            delays[199]
        );
        assert!(
            delays
                .iter()
                .all(|d| *d <= MAX_DEFERRAL + MAX_DEFERRAL / 10)
        );
    }
}
