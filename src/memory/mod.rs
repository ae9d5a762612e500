//! One memory budget for the whole process: streams, bodies still arriving and held requests are charged against it, so load past it gets a 429, never an OOM kill.
//!
//! Per-request limits (`--max-body-bytes`, flow control's caps) bound one request or one
//! band; only a process-wide count bounds their sum. The budget is an atomic counter: a
//! request's [`Charge`] grows as its body arrives and while it is held, and gives everything
//! back when its stream ends. What a charge covers is what a request really costs, measured
//! (docs/benchmarks.md, "Holding at scale"), not its body alone.

mod limit;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use limit::{BudgetError, BudgetSource, MEMORY_BUDGET_FLAG, derive_budget, parse_quantity};

/// An open ext_proc stream, before any body: h2 stream state, tonic's decode and encode
/// buffers (8 KiB each), the stream's task and channel. Measured at ~18 KiB per idle stream.
pub const STREAM_COST: u64 = 20 * 1024;
/// A held request beyond its stream and body: queue entry, waiter, labels, timers.
pub const HELD_COST: u64 = 2 * 1024;
/// Part of the budget held requests may fill: the rest is kept for requests being read and
/// routed, so a Critical request can still arrive (and displace held ones) when the queues
/// are full of sheddable work.
pub const HELD_SHARE: f64 = 0.8;

/// What a stream reading a body costs in all: the stream, the body's buffer, and the gRPC
/// decoder's buffer, which keeps the size of the largest message it decoded.
pub fn body_stream_cost(buffer_capacity: usize, largest_message: usize) -> u64 {
    STREAM_COST + (buffer_capacity + largest_message) as u64
}

/// The process's memory budget.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
}

/// Refused: the budget has no room for `wanted` more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the memory budget is full ({used} of {limit} bytes in use, {wanted} more wanted; --memory-budget); retry later"
)]
pub struct OverBudget {
    pub used: u64,
    pub limit: u64,
    pub wanted: u64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// A budget that never refuses (tests, tools).
    pub fn unlimited() -> Arc<Self> {
        Self::new(u64::MAX)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// A new charge of `bytes`, if they fit in the budget.
    pub fn charge(self: &Arc<Self>, bytes: u64) -> Result<Charge, OverBudget> {
        let mut c = Charge {
            budget: Some(self.clone()),
            bytes: 0,
        };
        c.grow(bytes)?;
        Ok(c)
    }

    fn take(&self, bytes: u64, ceiling: u64) -> Result<(), OverBudget> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|n| *n <= ceiling)
            })
            .map(|_| ())
            .map_err(|used| OverBudget {
                used,
                limit: self.limit,
                wanted: bytes,
            })
    }

    fn give_back(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    fn held_ceiling(&self) -> u64 {
        (self.limit as f64 * HELD_SHARE) as u64
    }
}

/// What one request has charged; given back when dropped. The default charge belongs to no
/// budget: it never refuses and counts nothing (a request state not yet charged).
#[derive(Debug, Default)]
pub struct Charge {
    budget: Option<Arc<MemoryBudget>>,
    bytes: u64,
}

impl Charge {
    /// Charges `bytes` more, within the whole budget.
    pub fn grow(&mut self, bytes: u64) -> Result<(), OverBudget> {
        if let Some(b) = &self.budget {
            b.take(bytes, b.limit)?;
        }
        self.bytes += bytes;
        Ok(())
    }

    /// Charges `bytes` more for holding the request, within the held share of the budget.
    pub fn grow_held(&mut self, bytes: u64) -> Result<(), OverBudget> {
        if let Some(b) = &self.budget {
            b.take(bytes, b.held_ceiling())?;
        }
        self.bytes += bytes;
        Ok(())
    }

    /// Charges `bytes` more whatever the budget says: for a request that displaced held
    /// ones, whose memory is on its way back.
    pub fn force(&mut self, bytes: u64) {
        if let Some(b) = &self.budget {
            b.used.fetch_add(bytes, Ordering::AcqRel);
        }
        self.bytes += bytes;
    }

    /// Grows the charge to `total` if it is below it (a body's capacity as it grows).
    pub fn grow_to(&mut self, total: u64) -> Result<(), OverBudget> {
        match total.checked_sub(self.bytes) {
            Some(more) if more > 0 => self.grow(more),
            _ => Ok(()),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.give_back(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fit_the_budget_and_come_back_when_dropped() {
        let b = MemoryBudget::new(1000);
        let mut a = b.charge(600).unwrap();
        let e = b.charge(500).unwrap_err();
        assert_eq!((e.used, e.limit, e.wanted), (600, 1000, 500));
        assert!(e.to_string().contains("--memory-budget"), "{e}");
        a.grow_to(900).unwrap();
        assert_eq!(b.used(), 900);
        assert!(a.grow_to(1001).is_err());
        assert_eq!(a.bytes(), 900, "a refused growth charges nothing");
        drop(a);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn holding_stops_at_its_share_and_forcing_goes_past_it() {
        let b = MemoryBudget::new(1000);
        let mut a = b.charge(100).unwrap();
        a.grow_held(700).unwrap();
        assert!(a.grow_held(1).is_err(), "800 is the held ceiling");
        a.grow(200).unwrap();
        a.force(50);
        assert_eq!(b.used(), 1050);
        drop(a);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_charge_of_no_budget_never_refuses() {
        let mut c = Charge::default();
        c.grow(u64::MAX / 2).unwrap();
        c.grow_held(1).unwrap();
        assert_eq!(c.bytes(), u64::MAX / 2 + 1);
    }

    #[test]
    fn concurrent_charges_never_exceed_the_limit() {
        let b = MemoryBudget::new(10_000);
        let peak = std::sync::Mutex::new(0u64);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..2_000 {
                        if let Ok(c) = b.charge(3_000) {
                            let mut p = peak.lock().unwrap();
                            *p = (*p).max(b.used());
                            drop(p);
                            drop(c);
                        }
                    }
                });
            }
        });
        assert!(*peak.lock().unwrap() <= 10_000);
        assert_eq!(b.used(), 0);
    }
}
