//! kmsgrant-operator: grants on KMS customer master keys, declared as Kubernetes objects.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod cli;
pub mod controller;
pub mod dev;
pub mod emulator;
pub mod import;
pub mod kms;
pub mod leader;
pub mod metrics;
pub mod run;
pub mod telemetry;
