//! What the emulator was asked: counters per operation and outcome, and an ordered call log.
use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use serde::Serialize;

/// The call log keeps this many most recent calls.
pub const CALL_LOG_CAPACITY: usize = 100_000;

/// One answered (or dropped) call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CallRecord {
    /// Increases by one per call, from 1; survives log truncation.
    pub seq: u64,
    /// KMS action (`create-grant`), IAM call (`iam:tokens`) or `unknown`.
    pub operation: String,
    /// HTTP status; 0 when the connection was dropped after the write took effect.
    pub status: u16,
    /// Error code of a failed call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'static str>,
    /// `true` when the write took effect and the connection was dropped instead of answering.
    pub dropped: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The `name` a `create-grant` asked for: what ties a call to a grant identity even when the
    /// call failed before a grant ID existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_name: Option<String>,
    /// User ID of the authenticated caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// Address the call came from (which pod, on a node cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<IpAddr>,
    pub at_ms: u64,
}

#[derive(Debug, Default)]
pub struct Stats {
    next_seq: u64,
    /// operation -> outcome (`"200"`, `"400"`, `"dropped"`) -> count
    by_status: BTreeMap<String, BTreeMap<String, u64>>,
    /// operation -> error code -> count
    by_error_code: BTreeMap<String, BTreeMap<String, u64>>,
    log: VecDeque<CallRecord>,
}

/// The counters as `GET /_emulator/stats` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub total: u64,
    pub by_status: BTreeMap<String, BTreeMap<String, u64>>,
    pub by_error_code: BTreeMap<String, BTreeMap<String, u64>>,
}

impl StatsSnapshot {
    /// How many calls of `operation` ended with `outcome` (`"200"`, `"429"`, `"dropped"`, ...).
    pub fn count(&self, operation: &str, outcome: &str) -> u64 {
        self.by_status
            .get(operation)
            .and_then(|m| m.get(outcome))
            .copied()
            .unwrap_or(0)
    }

    /// How many calls of `operation` there were in all.
    pub fn calls(&self, operation: &str) -> u64 {
        self.by_status
            .get(operation)
            .map(|m| m.values().sum())
            .unwrap_or(0)
    }
}

impl Stats {
    pub fn record(&mut self, mut record: CallRecord) {
        self.next_seq += 1;
        record.seq = self.next_seq;
        let outcome = if record.dropped {
            "dropped".to_owned()
        } else {
            record.status.to_string()
        };
        *self
            .by_status
            .entry(record.operation.clone())
            .or_default()
            .entry(outcome)
            .or_default() += 1;
        if let Some(code) = record.error_code {
            *self
                .by_error_code
                .entry(record.operation.clone())
                .or_default()
                .entry(code.to_owned())
                .or_default() += 1;
        }
        if self.log.len() == CALL_LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(record);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            total: self.next_seq,
            by_status: self.by_status.clone(),
            by_error_code: self.by_error_code.clone(),
        }
    }

    /// Calls with `seq > after`, oldest first.
    pub fn calls_after(&self, after: u64) -> Vec<CallRecord> {
        self.log
            .iter()
            .filter(|record| record.seq > after)
            .cloned()
            .collect()
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }
}
