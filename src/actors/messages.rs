//! Typed messages the actors exchange: commands (imperative names) and facts (past tense).

use std::sync::Arc;

use actix::Message;

/// Fact: a new valid config is on disk (`generation` counts distinct valid versions).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ConfigChanged<C: 'static> {
    pub config: Arc<C>,
    pub generation: u64,
}

impl<C> Clone for ConfigChanged<C> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            generation: self.generation,
        }
    }
}

/// Why a reconcile was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    ConfigChanged,
    Periodic,
    Retry,
}

/// Command: bring the server to the desired state now (coalesced while one runs).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct ReconcileNow {
    pub trigger: Trigger,
}

/// Fact: something changed in the watched config directory.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct FileEvent;
