//! Keeps prefix placement's timed rebuilds off the request path: computed on a timer, outside the placement lock.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::pool::state::{Shared, lock_placement};

/// The placement keeper actor.
pub struct PlacementKeeper {
    shared: Arc<Shared>,
    every: Duration,
}

impl PlacementKeeper {
    /// Switches the shared placement to background rebuilds; `every` is how often to look
    /// for a due one (the placement itself allows one a second).
    pub fn new(shared: Arc<Shared>, every: Duration) -> Self {
        lock_placement(&shared).set_background(true);
        Self { shared, every }
    }

    fn tick(&self) {
        let now = self.shared.epoch.elapsed().as_secs_f64();
        // The lock is held to copy the keys and to write the answers back, not to compute.
        let Some(job) = lock_placement(&self.shared).take_due(now) else {
            return;
        };
        let span = tracing::debug_span!("placement_rebuild", prefixes = job.len());
        let _entered = span.enter();
        let rebuilt = job.run();
        lock_placement(&self.shared).apply(rebuilt);
    }
}

impl Actor for PlacementKeeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.every, |a, _| a.tick());
    }
}
