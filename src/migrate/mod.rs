//! `kmsgrant-operator migrate`: moves manifests from `kmsgrant.io/v1alpha1` to `v1beta1`.

pub mod manifests;
