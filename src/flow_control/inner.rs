//! Flow control's locked state: the queues, the held requests' waiters, and requests in flight per band and flow (for the over-share ceiling).

use std::collections::HashMap;
use std::time::Instant;

use inferlane_epp::flow::{FlowQueues, Item, ItemId};
use tokio::sync::oneshot;

use crate::pool::metrics::FlowQueueLabels;

/// What a held request is told.
pub(super) enum Verdict {
    Dispatched,
    Expired,
    Displaced,
}

pub(super) struct Waiter {
    pub(super) tx: oneshot::Sender<Verdict>,
    pub(super) labels: FlowQueueLabels,
    pub(super) bytes: u64,
    pub(super) since: Instant,
}

pub(super) struct Inner {
    pub(super) queues: FlowQueues,
    pub(super) waiting: HashMap<ItemId, Waiter>,
    /// Admitted requests not finished, per band and flow (for the over-share ceiling).
    pub(super) in_flight: HashMap<i32, BandInFlight>,
}

/// One band's admitted requests in flight, per flow and in total (so a flow's share is O(1)).
#[derive(Default)]
pub(super) struct BandInFlight {
    pub(super) per_flow: HashMap<String, u32>,
    pub(super) total: u64,
}

impl Inner {
    pub(super) fn started(&mut self, priority: i32, flow: &str) {
        let band = self.in_flight.entry(priority).or_default();
        band.total += 1;
        match band.per_flow.get_mut(flow) {
            Some(n) => *n += 1,
            None => {
                band.per_flow.insert(flow.to_string(), 1);
            }
        }
    }

    pub(super) fn finished(&mut self, priority: i32, flow: &str) {
        let Some(band) = self.in_flight.get_mut(&priority) else {
            return;
        };
        if let Some(n) = band.per_flow.get_mut(flow) {
            *n = n.saturating_sub(1);
            band.total = band.total.saturating_sub(1);
            if *n == 0 {
                band.per_flow.remove(flow);
            }
        }
        if band.per_flow.is_empty() {
            self.in_flight.remove(&priority);
        }
    }

    /// `flow` holds more than its share of its band's requests in flight while other flows
    /// of the band have some.
    pub(super) fn over_share(&self, priority: i32, flow: &str) -> bool {
        let Some(band) = self.in_flight.get(&priority) else {
            return false;
        };
        let mine = band.per_flow.get(flow).copied().unwrap_or(0);
        let others = band.per_flow.len() - usize::from(mine > 0);
        if others == 0 {
            return false;
        }
        u64::from(mine) * (others as u64 + 1) > band.total
    }

    /// The next item to release at `saturation`: the head band's flows in their policy's
    /// turn, passing over a flow above its share while saturation is at the over-share
    /// ceiling (so the tenants the ceiling protects are served, not held behind it).
    pub(super) fn next_release(
        &mut self,
        saturation: f64,
        limits: impl Fn(i32) -> (f64, f64),
    ) -> Option<Item> {
        let (priority, flow) = {
            let (priority, mut turn) = self.queues.in_turn()?;
            let (limit, over) = limits(priority);
            if saturation >= limit {
                return None;
            }
            let flow = if over < limit && saturation >= over {
                turn.find(|f| !self.over_share(priority, f))?
            } else {
                turn.next()?
            };
            (priority, flow.to_string())
        };
        self.queues.pop_flow(priority, &flow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inferlane_epp::flow::{BandConfig, Fairness, FlowConfig, Ordering as Order};

    fn inner(fairness: Fairness) -> Inner {
        let band = BandConfig {
            priority: 0,
            max_bytes: u64::MAX,
            max_requests: usize::MAX,
            fairness,
            ordering: Order::Fcfs,
            usage_limit: 1.0,
            over_share_usage_limit: 0.8,
        };
        Inner {
            queues: FlowQueues::new(FlowConfig {
                max_bytes: u64::MAX,
                max_requests: usize::MAX,
                bands: vec![],
                default_band: band,
                vtc_input_weight: 1.0,
                vtc_output_weight: 2.0,
            }),
            waiting: HashMap::new(),
            in_flight: HashMap::new(),
        }
    }

    fn item(id: u64, flow: &str, arrival: u64) -> Item {
        Item {
            id,
            flow: flow.into(),
            priority: 0,
            bytes: 1,
            prompt_tokens: 1.0,
            arrival_ms: arrival,
            deadline_ms: u64::MAX,
        }
    }

    /// Between the over-share ceiling and the band's limit, a flow over its share waits, and
    /// the flows it would crowd out go ahead of it, under every fairness policy (global
    /// strict held them behind the over-share flow's earlier items).
    #[test]
    fn over_share_flows_wait_and_the_others_go_ahead() {
        for fairness in [Fairness::GlobalStrict, Fairness::RoundRobin, Fairness::Vtc] {
            let mut i = inner(fairness);
            for n in 0..4 {
                i.started(0, "heavy");
                i.queues.enqueue(item(n, "heavy", n)).unwrap();
            }
            i.started(0, "light");
            i.queues.enqueue(item(10, "light", 10)).unwrap();
            let limits = |_| (1.0, 0.8);
            // At the over-share ceiling: heavy (4 in flight of 5) waits, light goes.
            let got = i.next_release(0.9, limits).map(|it| it.flow);
            assert_eq!(got.as_deref(), Some("light"), "{fairness:?}");
            // Only heavy is left: it waits until saturation drops below the ceiling.
            assert!(i.next_release(0.9, limits).is_none(), "{fairness:?}");
            assert!(i.next_release(1.0, limits).is_none());
            // Below the ceiling: the policy's own order again.
            assert_eq!(i.next_release(0.7, limits).map(|it| it.id), Some(0));
        }
    }

    #[test]
    fn shares_are_counted_in_constant_time_per_band() {
        let mut i = inner(Fairness::Vtc);
        for f in 0..1000 {
            i.started(0, &format!("f{f}"));
        }
        i.started(0, "f0");
        assert!(i.over_share(0, "f0"));
        assert!(!i.over_share(0, "f1"));
        assert_eq!(i.in_flight[&0].total, 1001);
        for f in 0..1000 {
            i.finished(0, &format!("f{f}"));
        }
        i.finished(0, "f0");
        assert!(i.in_flight.is_empty());
    }
}
