//! Misbehaviour on purpose: latency, injected errors, a per-credential throttle and
//! "commit, then drop the connection". Settable by flags at start and at run time via
//! `PUT /_emulator/faults`.
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::errors::ErrorCode;

/// Which error an injection answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectedError {
    /// 500 KMS.0100
    Internal,
    /// 503 KMS.0104
    Unavailable,
    /// 429 APIG.0308
    Throttled,
    /// 403 KMS.0306: the caller's IAM policy lacks the action.
    Forbidden,
}

impl InjectedError {
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Internal => ErrorCode::Internal,
            Self::Unavailable => ErrorCode::Unavailable,
            Self::Throttled => ErrorCode::Throttled,
            Self::Forbidden => ErrorCode::NoPermission,
        }
    }
}

impl std::str::FromStr for InjectedError {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "internal" | "500" | "KMS.0100" => Ok(Self::Internal),
            "unavailable" | "503" | "KMS.0104" => Ok(Self::Unavailable),
            "throttled" | "429" | "APIG.0308" => Ok(Self::Throttled),
            "forbidden" | "403" | "KMS.0306" => Ok(Self::Forbidden),
            other => Err(format!(
                "{other:?} is not internal|unavailable|throttled|forbidden"
            )),
        }
    }
}

/// Answer `error` instead of running the operation, with probability `rate` (0..=1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorInjection {
    pub rate: f64,
    pub error: InjectedError,
}

/// All fault settings. Operation names are the KMS actions (`create-grant`, ...); `*` means every
/// KMS operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSettings {
    /// Fixed delay before every KMS call is answered.
    pub latency_ms: u64,
    /// Extra uniformly random delay, 0..=jitter_ms.
    pub jitter_ms: u64,
    pub errors: BTreeMap<String, ErrorInjection>,
    /// Requests per second allowed per credential (access key, or the user behind a token);
    /// more are answered 429 APIG.0308. Bursts of up to one second's worth pass.
    pub throttle_per_second: Option<f64>,
    /// For `create-grant` and `revoke-grant`: with this probability the write takes effect and
    /// the connection is then closed without an answer.
    pub drop_after_commit: BTreeMap<String, f64>,
    /// For `create-grant`, `revoke-grant` and `retire-grant`: with this probability the write
    /// takes effect and is then answered `500 KMS.0100` (as a gateway that times out after the
    /// backend committed).
    pub error_after_commit: BTreeMap<String, f64>,
    /// The emulator's clock runs this many seconds off the machine's: its `Date` header and the
    /// time it checks signatures against (more than 15 minutes off: 401 APIGW.0303), as a client
    /// whose clock is wrong sees it.
    pub clock_offset_seconds: i64,
    /// `list-grants` and `list-retirable-grants` answer every grant without its `name`, as an
    /// account whose service leaves out the optional field would (the API page lists `name` as
    /// optional in answers): what grant identity, `check --write-probe` and `live-test` must
    /// notice.
    pub omit_grant_names: bool,
}

impl FaultSettings {
    pub fn validate(&self) -> Result<(), String> {
        for (operation, injection) in &self.errors {
            check_rate(operation, injection.rate)?;
        }
        for (operation, rate) in &self.drop_after_commit {
            if !matches!(operation.as_str(), "create-grant" | "revoke-grant") {
                return Err(format!(
                    "drop_after_commit applies to create-grant and revoke-grant, not {operation:?}"
                ));
            }
            check_rate(operation, *rate)?;
        }
        for (operation, rate) in &self.error_after_commit {
            if !matches!(
                operation.as_str(),
                "create-grant" | "revoke-grant" | "retire-grant"
            ) {
                return Err(format!(
                    "error_after_commit applies to create-grant, revoke-grant and retire-grant, not {operation:?}"
                ));
            }
            check_rate(operation, *rate)?;
        }
        match self.throttle_per_second {
            Some(rate) if !(rate > 0.0 && rate.is_finite()) => {
                Err(format!("throttle_per_second {rate} must be > 0"))
            }
            _ => Ok(()),
        }
    }

    /// The emulator's idea of now (the machine's clock plus `clock_offset_seconds`).
    pub fn now(&self) -> std::time::SystemTime {
        let offset = Duration::from_secs(self.clock_offset_seconds.unsigned_abs());
        if self.clock_offset_seconds >= 0 {
            std::time::SystemTime::now() + offset
        } else {
            std::time::SystemTime::now() - offset
        }
    }

    pub fn delay(&self) -> Duration {
        let jitter = if self.jitter_ms > 0 {
            fastrand::u64(0..=self.jitter_ms)
        } else {
            0
        };
        Duration::from_millis(self.latency_ms + jitter)
    }

    /// The error to answer for `operation` this time, if any.
    pub fn injected_error(&self, operation: &str) -> Option<ErrorCode> {
        let injection = self
            .errors
            .get(operation)
            .or_else(|| self.errors.get("*"))?;
        (fastrand::f64() < injection.rate).then(|| injection.error.code())
    }

    /// Whether to drop the connection after committing `operation` this time.
    pub fn drops_after_commit(&self, operation: &str) -> bool {
        self.drop_after_commit
            .get(operation)
            .is_some_and(|&rate| fastrand::f64() < rate)
    }
}

impl FaultSettings {
    /// Whether to answer 500 after committing `operation` this time.
    pub fn errs_after_commit(&self, operation: &str) -> bool {
        self.error_after_commit
            .get(operation)
            .is_some_and(|&rate| fastrand::f64() < rate)
    }
}

fn check_rate(operation: &str, rate: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err(format!("rate {rate} for {operation:?} is not within 0..=1"))
    }
}

/// Token buckets per credential.
#[derive(Debug, Default)]
pub struct Throttle {
    buckets: HashMap<String, (f64, Instant)>,
}

impl Throttle {
    /// Takes one request's token for `credential`; false when the bucket is empty.
    pub fn admit(&mut self, credential: &str, per_second: f64, now: Instant) -> bool {
        let capacity = per_second.max(1.0);
        let (tokens, last) = self
            .buckets
            .entry(credential.to_owned())
            .or_insert((capacity, now));
        let refilled = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * per_second)
            .min(capacity);
        *last = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            true
        } else {
            *tokens = refilled;
            false
        }
    }

    pub fn clear(&mut self) {
        self.buckets.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_admits_a_burst_then_refills_at_the_rate() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        let admitted = (0..20).filter(|_| throttle.admit("ak", 5.0, start)).count();
        assert_eq!(admitted, 5);
        assert!(!throttle.admit("ak", 5.0, start));
        assert!(
            throttle.admit("other", 5.0, start),
            "buckets are per credential"
        );
        let later = start + Duration::from_millis(400);
        assert_eq!(
            (0..20).filter(|_| throttle.admit("ak", 5.0, later)).count(),
            2
        );
    }

    #[test]
    fn settings_reject_rates_outside_zero_to_one_and_drops_on_other_operations() {
        let mut settings = FaultSettings::default();
        settings.errors.insert(
            "list-grants".into(),
            ErrorInjection {
                rate: 1.5,
                error: InjectedError::Internal,
            },
        );
        assert!(settings.validate().is_err());
        let mut settings = FaultSettings::default();
        settings.drop_after_commit.insert("list-grants".into(), 0.5);
        assert!(settings.validate().is_err());
    }
}
