//! The account's throttle, carried from one leader to the next.
//!
//! A KMS client learns the cloud's real rate from its 429 answers (see the `kmsgrant-kms` token
//! bucket); a new process would start again at the provider config's `spec.rateLimit` and meet the
//! throttle in its first second, at the moment a failover or a rollout has every object to look at.
//! So the leader writes what its client learned into the config's
//! `status.learnedRateLimit` when the cloud throttles it — never in steady state: at once when the
//! cloud throttles lower than recorded, else when a cut comes [`SETTLE`] or more after the
//! recorded one — and a client built for the config starts from it while it is younger than
//! [`RECORD_VALID`]. Every write is caused by a cut: once the cloud stops throttling, nothing is
//! written, however long after.
//!
//! A stale record costs little either way: a limit that was raised since is found again by the
//! bucket's rise once its memory of the cut fades (seconds), a lowered one by one 429.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kmsgrant_kms::LearnedRate;

use super::Context;
use crate::api::LearnedRateLimit;

/// A record is a starting rate for a new client while younger than this.
pub const RECORD_VALID: Duration = Duration::from_secs(3600);
/// A cut that does not lower the record is written only when it comes this long or more after
/// the recorded cut: while the cloud keeps throttling, a write a minute at most, and the record is
/// never more than a minute of cuts behind. The cut that ends a throttled converge is not chased
/// by a write afterwards (a steady operator writes nothing): the record keeps an earlier rate
/// within 5 % above it (a lower one is written at once) or below it (a seed that starts low finds
/// the rest by the bucket's rise).
pub const SETTLE: Duration = Duration::from_secs(60);
/// A record the cloud keeps confirming is rewritten when this old, so that it stays valid
/// (see [`RECORD_VALID`]) while the throttling goes on.
const REFRESH_AFTER: Duration = Duration::from_secs(1800);
/// A cut that lowers the record by more than this fraction is written at once: the first cut of
/// a burst overestimates the cloud's rate (one second's window holds the cloud's own burst), the
/// next ones find it.
const LOWER: f64 = 0.05;
/// How often the leader looks at its clients' last cuts (no call: it reads memory).
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// A failed write of a config's record is tried again after this.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// The rate a new client for a config whose status says `recorded` starts from, at `now`: the
/// record when it is younger than [`RECORD_VALID`] (and not from the future), else none.
pub fn seed(recorded: Option<&LearnedRateLimit>, now: jiff::Timestamp) -> Option<LearnedRate> {
    let recorded = recorded?;
    let at: jiff::Timestamp = recorded.last_throttle_time.parse().ok()?;
    let age = now.duration_since(at);
    let valid = jiff::SignedDuration::try_from(RECORD_VALID).ok()?;
    if age.is_negative() || age >= valid {
        return None;
    }
    Some(LearnedRate {
        requests_per_second: f64::from(recorded.requests_per_second),
        throttled_requests_per_second: f64::from(recorded.throttled_requests_per_second),
    })
}

/// The record of a cut made at `at`: whole requests per second, the paced rate rounded down and
/// the throttled one up, so a seed never starts above what the cloud took.
pub fn record_of(learned: LearnedRate, at: jiff::Timestamp) -> LearnedRateLimit {
    let whole = |rate: f64| rate.clamp(1.0, f64::from(u32::MAX)) as u32;
    LearnedRateLimit {
        requests_per_second: whole(learned.requests_per_second.floor()),
        throttled_requests_per_second: whole(learned.throttled_requests_per_second.ceil()),
        last_throttle_time: at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    }
}

/// Whether a cut, recorded as `new`, is worth a write over what the status holds: nothing
/// recorded (or unreadable), a rate lower by more than [`LOWER`], other rates [`SETTLE`] or more
/// after the recorded cut, or the same rates [`REFRESH_AFTER`] or more after it. A record as new
/// as the cut or newer (another leader's, written since) is kept. Decided from the two cuts'
/// times alone, not the clock: a write always follows a cut, never the passing of time.
pub fn worth_recording(recorded: Option<&LearnedRateLimit>, new: &LearnedRateLimit) -> bool {
    let Some(recorded) = recorded else {
        return true;
    };
    let (Ok(old_at), Ok(new_at)) = (
        recorded.last_throttle_time.parse::<jiff::Timestamp>(),
        new.last_throttle_time.parse::<jiff::Timestamp>(),
    ) else {
        return true;
    };
    if new_at <= old_at {
        return false;
    }
    let lower = f64::from(new.requests_per_second)
        < f64::from(recorded.requests_per_second) * (1.0 - LOWER);
    let since = |duration: Duration| jiff::SignedDuration::try_from(duration).unwrap_or_default();
    let rates = |r: &LearnedRateLimit| (r.requests_per_second, r.throttled_requests_per_second);
    let apart = new_at.duration_since(old_at);
    if rates(recorded) == rates(new) {
        return apart >= since(REFRESH_AFTER);
    }
    lower || apart >= since(SETTLE)
}

/// The leader's recorder: looks at every provider's client each [`LOOK_EVERY`] and writes a cut
/// worth recording into its config's status (fenced: a replica that lost the lease writes
/// nothing). Ends with `shutdown`.
pub async fn recorder(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown.fuse());
    // Per config: the last cut written or tried, and when a failed write may be tried again.
    let mut written: HashMap<String, LearnedRateLimit> = HashMap::new();
    let mut retry_at: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(LOOK_EVERY) => {}
        }
        let now = jiff::Timestamp::now();
        for (name, provider) in ctx.providers.all() {
            let Some((learned, ago)) = provider.client.last_cut() else {
                continue;
            };
            let Ok(ago) = jiff::SignedDuration::try_from(ago) else {
                continue;
            };
            let Ok(at) = now.checked_sub(ago) else {
                continue;
            };
            let record = record_of(learned, at);
            // Compared with the cut's time at second precision: the same cut, looked at again.
            if written.get(&name) == Some(&record)
                || retry_at
                    .get(&name)
                    .is_some_and(|t| tokio::time::Instant::now() < *t)
            {
                continue;
            }
            let Some(status) = ctx.providers.cached_status(&name, &provider.uid) else {
                // The config is gone or was re-created: its new client has its own cuts.
                continue;
            };
            if !worth_recording(status.learned_rate_limit.as_ref(), &record) {
                continue;
            }
            if ctx.fence.check().is_err() {
                continue;
            }
            match super::provider::patch_status(
                &ctx,
                &name,
                serde_json::json!({"status": {"learnedRateLimit": record}}),
            )
            .await
            {
                Ok(()) => {
                    tracing::info!(provider = %name, requests_per_second = record.requests_per_second, throttled_requests_per_second = record.throttled_requests_per_second, "recorded the account's throttle in the provider config's status for the next leader");
                    retry_at.remove(&name);
                    written.insert(name, record);
                }
                Err(err) => {
                    tracing::warn!(provider = %name, error = %err, retry_in = ?RETRY_AFTER, "cannot record the learned rate limit in the provider config's status");
                    retry_at.insert(name, tokio::time::Instant::now() + RETRY_AFTER);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(time: &str) -> jiff::Timestamp {
        time.parse().unwrap()
    }

    fn recorded(rate: u32, throttled: u32, time: &str) -> LearnedRateLimit {
        LearnedRateLimit {
            requests_per_second: rate,
            throttled_requests_per_second: throttled,
            last_throttle_time: time.into(),
        }
    }

    #[test]
    fn a_recent_record_seeds_a_new_client_and_an_old_future_or_unreadable_one_does_not() {
        let record = recorded(47, 50, "2026-12-07T10:00:00Z");
        let seeded = seed(Some(&record), at("2026-12-07T10:59:00Z")).unwrap();
        assert_eq!(seeded.requests_per_second, 47.0);
        assert_eq!(seeded.throttled_requests_per_second, 50.0);
        assert_eq!(seed(Some(&record), at("2026-12-07T11:00:00Z")), None);
        assert_eq!(seed(Some(&record), at("2026-12-07T09:59:59Z")), None);
        assert_eq!(seed(None, at("2026-12-07T10:00:01Z")), None);
        let unreadable = recorded(47, 50, "yesterday");
        assert_eq!(seed(Some(&unreadable), at("2026-12-07T10:00:01Z")), None);
    }

    #[test]
    fn a_record_never_starts_a_client_above_what_the_cloud_took() {
        let learned = LearnedRate {
            requests_per_second: 47.9,
            throttled_requests_per_second: 50.2,
        };
        let record = record_of(learned, at("2026-12-07T10:00:00.250Z"));
        assert_eq!(record, recorded(47, 51, "2026-12-07T10:00:00Z"));
        // Below one request per second the record still says one (the bucket's own floor).
        let slow = LearnedRate {
            requests_per_second: 0.4,
            throttled_requests_per_second: 0.5,
        };
        let record = record_of(slow, at("2026-12-07T10:00:00Z"));
        assert_eq!(
            (
                record.requests_per_second,
                record.throttled_requests_per_second
            ),
            (1, 1)
        );
    }

    #[test]
    fn a_cut_is_written_when_first_lower_or_a_minute_after_the_recorded_one_and_never_over_a_newer_one()
     {
        let old = recorded(47, 50, "2026-12-07T10:00:00Z");
        let worth = |new: &LearnedRateLimit| worth_recording(Some(&old), new);
        // Nothing recorded yet.
        assert!(worth_recording(None, &old));
        // A cut within the minute at about the same rate, or higher: not written ...
        assert!(!worth(&recorded(46, 50, "2026-12-07T10:00:30Z")));
        assert!(!worth(&recorded(60, 64, "2026-12-07T10:00:59Z")));
        // ... a cut a minute or more after the recorded one is: while the cloud keeps throttling,
        // the record follows it a minute behind at most.
        assert!(worth(&recorded(46, 50, "2026-12-07T10:01:00Z")));
        assert!(worth(&recorded(60, 64, "2026-12-07T10:03:00Z")));
        // The same rates later: nothing to tell, until the record needs refreshing to stay valid.
        assert!(!worth(&recorded(47, 50, "2026-12-07T10:20:00Z")));
        assert!(worth(&recorded(47, 50, "2026-12-07T10:30:00Z")));
        // A lower rate at once: the first cut of a burst overestimated the cloud.
        assert!(worth(&recorded(44, 47, "2026-12-07T10:00:02Z")));
        // Another leader recorded a later cut: ours is older news.
        assert!(!worth(&recorded(10, 12, "2026-12-07T09:59:00Z")));
        // An unreadable record is replaced.
        assert!(worth_recording(
            Some(&recorded(47, 50, "soon")),
            &recorded(47, 50, "2026-12-07T10:01:00Z"),
        ));
    }

    #[test]
    fn no_write_follows_the_last_cut_of_a_throttled_converge_however_long_after() {
        // The recorder looks again every second with the same last cut: the decision does not
        // depend on when it looks, so a steady operator writes nothing once the throttling ends.
        let old = recorded(47, 50, "2026-12-07T10:00:00Z");
        let last_cut = recorded(48, 51, "2026-12-07T10:00:40Z");
        assert!(!worth_recording(Some(&old), &last_cut));
    }
}
