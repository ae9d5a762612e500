//! Pure LoRA-sync domain: config schema, validation, reconcile planning and answer classification (no I/O).

pub mod classify;
pub mod config;
pub mod links;
pub mod models;
pub mod placed;
pub mod plan;
pub mod source;
pub mod version;

pub use classify::{Outcome, classify_load, classify_unload};
pub use config::{AdapterSpec, ConfigError, LoraConfig, Problem, parse};
pub use plan::{Actual, AdapterOp, plan};
pub use source::{SourcePolicy, SourceRefused};
