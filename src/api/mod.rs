//! The custom resource types: data and schema only, no I/O.
