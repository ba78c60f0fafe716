//! kmsgrant-operator: grants on KMS customer master keys, declared as Kubernetes objects.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod check;
pub mod cli;
pub mod controller;
#[cfg(feature = "dev")]
pub mod dev;
pub mod import;
pub mod leader;
pub mod live_test;
pub mod metrics;
pub mod migrate;
pub mod process;
pub mod run;
pub mod storage_migration;
pub mod telemetry;
