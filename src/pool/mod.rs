//! The pool as the actors and the request path share it: the snapshot and endpoint handles, the configuration formats, metrics and labels.

pub mod config;
pub mod labels;
pub mod listing;
pub mod metrics;
pub mod stall;
pub mod state;
