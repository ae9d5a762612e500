//! Flow-control core: held requests queued per (priority band, fairness flow), dispatched by strict priority, a fairness policy and an ordering policy.
//!
//! Pure and clock-free (times are milliseconds passed in): the EPP's I/O shell will hold each
//! request's ext_proc answer while it waits here. Between bands, strict priority. Within a
//! band, a fairness policy picks the flow: `RoundRobin`, `GlobalStrict` (the band's earliest
//! item first, whatever its flow, as upstream's global-strict) or `Vtc` (virtual token
//! counters: each flow is charged the tokens it consumed, prompt tokens at dispatch and output
//! tokens as they are reported, and the least-charged backlogged flow goes next; a flow that
//! becomes active starts at the band's current minimum, so idle time is not banked). Within a
//! flow, FCFS or EDF (deadline = arrival + TTL). Memory is bounded by the caps: a full band
//! or pool refuses the item, and a flow's state goes when it holds no items and no charge
//! above the band's minimum.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Idle flows (no items) whose VTC charge a band keeps at most; beyond it they are forgotten.
pub const IDLE_FLOW_CAP: usize = 4096;

/// A held request's handle.
pub type ItemId = u64;

/// How a band picks the next flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fairness {
    RoundRobin,
    GlobalStrict,
    Vtc,
}

/// How a flow orders its own items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    Fcfs,
    Edf,
}

/// One priority band's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BandConfig {
    pub priority: i32,
    pub max_bytes: u64,
    pub max_requests: usize,
    pub fairness: Fairness,
    pub ordering: Ordering,
    /// Saturation at or above which this band is not dispatched (upstream's usage-limit
    /// ceiling, 1.0): a lower ceiling for low bands keeps room free for higher ones.
    pub usage_limit: f64,
    /// The ceiling for a flow that holds more than its share of the band's requests in
    /// flight while other flows have some (ours; default `usage_limit`): below it, room is
    /// kept for the tenants under their share, who then start at once.
    pub over_share_usage_limit: f64,
}

/// The whole layer's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowConfig {
    pub max_bytes: u64,
    pub max_requests: usize,
    /// Bands by priority; a priority without one gets `default_band` (with its priority).
    pub bands: Vec<BandConfig>,
    pub default_band: BandConfig,
    /// VTC charge per prompt token (at dispatch) and per output token (as reported).
    pub vtc_input_weight: f64,
    pub vtc_output_weight: f64,
}

/// A request waiting to be dispatched.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: ItemId,
    /// Fairness id (`x-gateway-inference-fairness-id`, default `default-flow`).
    pub flow: String,
    pub priority: i32,
    /// Bytes held for it (its body), counted against the caps.
    pub bytes: u64,
    /// Prompt tokens (estimated), charged to its flow at dispatch.
    pub prompt_tokens: f64,
    pub arrival_ms: u64,
    /// When it expires (arrival + TTL): 503 if still waiting then.
    pub deadline_ms: u64,
}

/// Why an item was not queued (answered 429 upstream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    #[error("priority band {0} is full")]
    BandFull(i32),
    #[error("the flow-control queues are full")]
    PoolFull,
    #[error("item {0} is already queued")]
    Duplicate(ItemId),
}

/// An `f64` charge ordered by `total_cmp`, so charges can key ordered sets.
#[derive(Debug, Clone, Copy)]
struct Charge(f64);

impl PartialEq for Charge {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}

impl Eq for Charge {}

impl PartialOrd for Charge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Charge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// An item's place: (order key, arrival sequence).
type Key = (u64, u64);

#[derive(Debug, Default)]
struct Flow {
    items: BTreeMap<Key, Item>,
    charge: f64,
    /// In the round-robin ring (possibly emptied since: the ring drops it lazily).
    in_ring: bool,
}

/// One band: its flows, and an index per fairness policy kept in step with them so that the
/// next flow is found in O(log n) whatever the number of flows (a scan per dispatch made a
/// drain of n one-request flows quadratic).
#[derive(Debug)]
struct Band {
    cfg: BandConfig,
    flows: HashMap<String, Flow>,
    /// Round robin: flows in turn; an emptied flow leaves when it reaches the front.
    ring: VecDeque<String>,
    /// Global strict: each active flow by its first item.
    heads: BTreeSet<(Key, String)>,
    /// VTC: each active flow by (charge, backlog, first item).
    vtc: BTreeSet<(Charge, usize, Key, String)>,
    /// VTC: idle flows whose charge is above the floor (forgotten once it reaches them).
    idle: BTreeSet<(Charge, String)>,
    bytes: u64,
    count: usize,
}

impl Band {
    fn new(cfg: BandConfig) -> Self {
        Self {
            cfg,
            flows: HashMap::new(),
            ring: VecDeque::new(),
            heads: BTreeSet::new(),
            vtc: BTreeSet::new(),
            idle: BTreeSet::new(),
            bytes: 0,
            count: 0,
        }
    }

    /// The least charge among flows holding items (VTC's floor for newly active flows).
    fn min_active_charge(&self) -> Option<f64> {
        self.vtc.first().map(|(c, ..)| c.0)
    }

    fn key(&self, item: &Item) -> u64 {
        match self.cfg.ordering {
            Ordering::Fcfs => item.arrival_ms,
            Ordering::Edf => item.deadline_ms,
        }
    }

    /// Takes an active flow out of its policy's ordered index before it changes.
    fn unindex(&mut self, name: &str) {
        let Some(f) = self.flows.get(name) else {
            return;
        };
        let Some(head) = f.items.keys().next().copied() else {
            return;
        };
        match self.cfg.fairness {
            Fairness::RoundRobin => {}
            Fairness::GlobalStrict => {
                self.heads.remove(&(head, name.to_string()));
            }
            Fairness::Vtc => {
                self.vtc
                    .remove(&(Charge(f.charge), f.items.len(), head, name.to_string()));
            }
        }
    }

    /// Puts a flow holding items back into its policy's index.
    fn index(&mut self, name: &str) {
        let Some(f) = self.flows.get_mut(name) else {
            return;
        };
        let Some(head) = f.items.keys().next().copied() else {
            return;
        };
        match self.cfg.fairness {
            Fairness::RoundRobin => {
                if !f.in_ring {
                    f.in_ring = true;
                    self.ring.push_back(name.to_string());
                }
            }
            Fairness::GlobalStrict => {
                self.heads.insert((head, name.to_string()));
            }
            Fairness::Vtc => {
                let entry = (Charge(f.charge), f.items.len(), head, name.to_string());
                self.vtc.insert(entry);
            }
        }
    }

    /// Round robin: drops emptied flows from the front of the ring.
    fn clean_ring_front(&mut self) {
        while let Some(front) = self.ring.front() {
            match self.flows.get_mut(front) {
                Some(f) if !f.items.is_empty() => return,
                Some(f) => f.in_ring = false,
                None => {}
            }
            self.ring.pop_front();
        }
    }

    /// The flow to serve next, by the band's fairness policy.
    fn next_flow(&mut self) -> Option<String> {
        if self.cfg.fairness == Fairness::RoundRobin {
            self.clean_ring_front();
            let f = self.ring.pop_front()?;
            // Back of the ring; it leaves once it reaches the front empty.
            self.ring.push_back(f.clone());
            return Some(f);
        }
        self.peek_flow().map(str::to_string)
    }

    /// The flows in the order the band's fairness policy would serve them.
    fn in_turn(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self.cfg.fairness {
            Fairness::RoundRobin => Box::new(
                self.ring
                    .iter()
                    .filter(|n| self.flows.get(*n).is_some_and(|f| !f.items.is_empty()))
                    .map(String::as_str),
            ),
            Fairness::GlobalStrict => Box::new(self.heads.iter().map(|(_, n)| n.as_str())),
            // Equal charges (a flow just lifted to the floor ties with the flow that set it):
            // the shorter backlog goes first, so a light tenant's one request does not wait
            // behind a heavy tenant's queue; then the older item.
            Fairness::Vtc => Box::new(self.vtc.iter().map(|(.., n)| n.as_str())),
        }
    }

    /// The flow [`Band::next_flow`] would pick, without moving the round-robin ring.
    fn peek_flow(&self) -> Option<&str> {
        self.in_turn().next()
    }

    /// Takes `flow`'s first item out, charging its prompt tokens (VTC).
    fn take_first(&mut self, name: &str, input_weight: f64) -> Option<Item> {
        self.unindex(name);
        let f = self.flows.get_mut(name)?;
        let (_, item) = f.items.pop_first()?;
        f.charge += item.prompt_tokens * input_weight;
        self.bytes -= item.bytes;
        self.count -= 1;
        self.index(name);
        self.tidy(name);
        Some(item)
    }

    /// After `flow` lost an item: an emptied flow is dropped, or (VTC) kept idle while its
    /// charge is above the band's minimum; idle flows the minimum has reached are forgotten
    /// (they would be lifted to it anyway), and at most [`IDLE_FLOW_CAP`] are kept, so many
    /// one-off fairness ids cannot grow memory while the band stays busy.
    fn tidy(&mut self, name: &str) {
        if self.count == 0 {
            self.flows.clear();
            self.ring.clear();
            self.heads.clear();
            self.vtc.clear();
            self.idle.clear();
            return;
        }
        if self.flows.get(name).is_some_and(|f| f.items.is_empty()) {
            let floor = self.min_active_charge();
            let keep = self.cfg.fairness == Fairness::Vtc
                && floor.is_some_and(|m| self.flows.get(name).is_some_and(|f| f.charge > m));
            if keep {
                let c = self.flows.get(name).map_or(0.0, |f| f.charge);
                self.idle.insert((Charge(c), name.to_string()));
            } else if !self.flows.get(name).is_some_and(|f| f.in_ring) {
                self.flows.remove(name);
            }
        }
        let Some(floor) = self.min_active_charge() else {
            return;
        };
        while let Some((c, n)) = self.idle.first().cloned() {
            if c.0 > floor && self.idle.len() <= IDLE_FLOW_CAP {
                break;
            }
            self.idle.pop_first();
            if self
                .flows
                .get(&n)
                .is_some_and(|f| f.items.is_empty() && !f.in_ring)
            {
                self.flows.remove(&n);
            }
        }
    }
}

/// The queues.
#[derive(Debug)]
pub struct FlowQueues {
    cfg: FlowConfig,
    /// By priority, highest first when iterated in reverse.
    bands: BTreeMap<i32, Band>,
    where_is: HashMap<ItemId, (i32, String, Key)>,
    /// Items by deadline, so expiry finds what is due without a scan.
    deadlines: BTreeSet<(u64, ItemId)>,
    bytes: u64,
    seq: u64,
}

impl FlowQueues {
    pub fn new(cfg: FlowConfig) -> Self {
        Self {
            cfg,
            bands: BTreeMap::new(),
            where_is: HashMap::new(),
            deadlines: BTreeSet::new(),
            bytes: 0,
            seq: 0,
        }
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.where_is.len()
    }

    pub fn is_empty(&self) -> bool {
        self.where_is.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Items held in one band.
    pub fn band_len(&self, priority: i32) -> usize {
        self.bands.get(&priority).map_or(0, |b| b.count)
    }

    /// Flows with state (items, or a charge above their band's minimum).
    pub fn flows(&self) -> usize {
        self.bands
            .values()
            .map(|b| b.flows.values().filter(|f| !f.items.is_empty()).count() + b.idle.len())
            .sum()
    }

    fn band_config(&self, priority: i32) -> BandConfig {
        self.cfg
            .bands
            .iter()
            .find(|b| b.priority == priority)
            .cloned()
            .unwrap_or_else(|| BandConfig {
                priority,
                ..self.cfg.default_band.clone()
            })
    }

    /// Queues an item; refused (nothing changes) when its band or the pool is full.
    pub fn enqueue(&mut self, item: Item) -> Result<(), EnqueueError> {
        if self.where_is.contains_key(&item.id) {
            return Err(EnqueueError::Duplicate(item.id));
        }
        if self.where_is.len() >= self.cfg.max_requests
            || self.bytes + item.bytes > self.cfg.max_bytes
        {
            return Err(EnqueueError::PoolFull);
        }
        let cfg = self.band_config(item.priority);
        let band = self
            .bands
            .entry(item.priority)
            .or_insert_with(|| Band::new(cfg));
        if band.count >= band.cfg.max_requests || band.bytes + item.bytes > band.cfg.max_bytes {
            return Err(EnqueueError::BandFull(item.priority));
        }
        let floor = band.min_active_charge();
        band.unindex(&item.flow);
        let flow = band.flows.entry(item.flow.clone()).or_default();
        if flow.items.is_empty() {
            // Newly active: no banking of idle time.
            let was = flow.charge;
            if let Some(m) = floor {
                flow.charge = flow.charge.max(m);
            }
            band.idle.remove(&(Charge(was), item.flow.clone()));
        }
        self.seq += 1;
        let key = (band.key(&item), self.seq);
        if let Some(flow) = band.flows.get_mut(&item.flow) {
            flow.items.insert(key, item.clone());
        }
        band.index(&item.flow);
        band.bytes += item.bytes;
        band.count += 1;
        self.bytes += item.bytes;
        self.deadlines.insert((item.deadline_ms, item.id));
        self.where_is
            .insert(item.id, (item.priority, item.flow, key));
        Ok(())
    }

    /// The priority of the band [`FlowQueues::pop`] would serve next.
    pub fn head_priority(&self) -> Option<i32> {
        self.bands
            .iter()
            .rev()
            .find(|(_, b)| b.count > 0)
            .map(|(p, _)| *p)
    }

    /// The band and flow [`FlowQueues::pop`] would serve next.
    pub fn peek(&self) -> Option<(i32, &str)> {
        let p = self.head_priority()?;
        Some((p, self.bands.get(&p)?.peek_flow()?))
    }

    /// The head band's flows in the order its fairness policy would serve them: for a
    /// dispatcher that holds some flows back (over their share) and serves the next in turn.
    pub fn in_turn(&self) -> Option<(i32, impl Iterator<Item = &str>)> {
        let p = self.head_priority()?;
        Some((p, self.bands.get(&p)?.in_turn()))
    }

    /// The next item to dispatch: the highest band holding items, its fairness policy's
    /// flow, that flow's first item by its ordering. Its prompt tokens are charged (VTC).
    pub fn pop(&mut self) -> Option<Item> {
        let priority = self.head_priority()?;
        let band = self.bands.get_mut(&priority)?;
        let name = band.next_flow()?;
        self.take(priority, &name)
    }

    /// `flow`'s first item in band `priority` (a flow [`FlowQueues::in_turn`] named); a
    /// round-robin flow served at its turn goes to the back of the ring, as with `pop`.
    pub fn pop_flow(&mut self, priority: i32, flow: &str) -> Option<Item> {
        let band = self.bands.get_mut(&priority)?;
        if band.cfg.fairness == Fairness::RoundRobin {
            band.clean_ring_front();
            if band.ring.front().is_some_and(|f| f == flow) {
                band.ring.rotate_left(1);
            }
        }
        self.take(priority, flow)
    }

    fn take(&mut self, priority: i32, flow: &str) -> Option<Item> {
        let w = self.cfg.vtc_input_weight;
        let item = self.bands.get_mut(&priority)?.take_first(flow, w)?;
        self.bytes -= item.bytes;
        self.where_is.remove(&item.id);
        self.deadlines.remove(&(item.deadline_ms, item.id));
        Some(item)
    }

    /// Removes an item that will not be dispatched (its client went away).
    pub fn remove(&mut self, id: ItemId) -> Option<Item> {
        let (priority, name, key) = self.where_is.remove(&id)?;
        let band = self.bands.get_mut(&priority)?;
        band.unindex(&name);
        let item = band.flows.get_mut(&name)?.items.remove(&key)?;
        band.index(&name);
        band.bytes -= item.bytes;
        band.count -= 1;
        band.tidy(&name);
        self.bytes -= item.bytes;
        self.deadlines.remove(&(item.deadline_ms, item.id));
        Some(item)
    }

    /// Makes room for a request of priority `above` when the queues are full: takes the
    /// item that would be served last in the lowest band below it (the longest flow's last
    /// item, so the tenant holding most gives way first). `None` when nothing held is below
    /// `above`. A scan of that band's flows: it runs only when the queues are full.
    pub fn displace(&mut self, above: i32) -> Option<Item> {
        let (_, band) = self.bands.range(..above).find(|(_, b)| b.count > 0)?;
        let id = band
            .flows
            .iter()
            .filter(|(_, f)| !f.items.is_empty())
            .max_by(|(an, a), (bn, b)| a.items.len().cmp(&b.items.len()).then(bn.cmp(an)))
            .and_then(|(_, f)| f.items.last_key_value())
            .map(|(_, it)| it.id)?;
        self.remove(id)
    }

    /// Removes and returns every item whose deadline has passed at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Item> {
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop_first();
            out.extend(self.remove(id));
        }
        out
    }

    /// Charges a flow the output tokens its dispatched request produced (VTC).
    pub fn charge_output(&mut self, priority: i32, flow: &str, tokens: f64) {
        self.charge(priority, flow, tokens * self.cfg.vtc_output_weight);
    }

    /// Adds `amount` (already weighted; negative corrects an over-estimate) to a flow's
    /// charge, if it still has state (a flow forgotten at the floor has nothing to correct).
    pub fn charge(&mut self, priority: i32, flow: &str, amount: f64) {
        if !amount.is_finite() {
            return;
        }
        let Some(band) = self.bands.get_mut(&priority) else {
            return;
        };
        let Some(old) = band.flows.get(flow).map(|f| f.charge) else {
            return;
        };
        band.unindex(flow);
        let idle = band.idle.remove(&(Charge(old), flow.to_string()));
        if let Some(f) = band.flows.get_mut(flow) {
            f.charge += amount;
            if idle {
                band.idle.insert((Charge(f.charge), flow.to_string()));
            }
        }
        band.index(flow);
    }

    /// The layer's settings.
    pub fn config(&self) -> &FlowConfig {
        &self.cfg
    }

    /// A flow's charge (VTC), if it has state.
    pub fn charge_of(&self, priority: i32, flow: &str) -> Option<f64> {
        Some(self.bands.get(&priority)?.flows.get(flow)?.charge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn band(priority: i32, fairness: Fairness, ordering: Ordering) -> BandConfig {
        BandConfig {
            priority,
            max_bytes: u64::MAX,
            max_requests: usize::MAX,
            fairness,
            ordering,
            usage_limit: 1.0,
            over_share_usage_limit: 1.0,
        }
    }

    fn queues(fairness: Fairness, ordering: Ordering) -> FlowQueues {
        FlowQueues::new(FlowConfig {
            max_bytes: u64::MAX,
            max_requests: usize::MAX,
            bands: vec![],
            default_band: band(0, fairness, ordering),
            vtc_input_weight: 1.0,
            vtc_output_weight: 2.0,
        })
    }

    fn item(id: u64, flow: &str, priority: i32, tokens: f64, arrival: u64, ttl: u64) -> Item {
        Item {
            id,
            flow: flow.into(),
            priority,
            bytes: 100,
            prompt_tokens: tokens,
            arrival_ms: arrival,
            deadline_ms: arrival + ttl,
        }
    }

    /// Round robin with `k` flows holding `per` items each, arriving in turns.
    fn round_robin_backlog(k: usize, per: usize) -> FlowQueues {
        let mut q = queues(Fairness::RoundRobin, Ordering::Fcfs);
        let mut id = 0;
        for i in 0..per {
            for f in 0..k {
                id += 1;
                q.enqueue(item(id, &format!("f{f}"), 0, 1.0, i as u64, 1000))
                    .unwrap();
            }
        }
        q
    }

    proptest! {
        /// Whatever arrives, each pop comes from the highest band holding items.
        #[test]
        fn strict_priority_between_bands(
            arrivals in prop::collection::vec((0usize..4, -2i32..3), 1..60),
            fairness in prop::sample::select(vec![Fairness::RoundRobin, Fairness::GlobalStrict, Fairness::Vtc]),
        ) {
            let mut q = queues(fairness, Ordering::Fcfs);
            for (i, (flow, prio)) in arrivals.iter().enumerate() {
                q.enqueue(item(i as u64, &format!("f{flow}"), *prio, 1.0, i as u64, 1000)).unwrap();
            }
            let mut last = i32::MAX;
            while let Some(it) = q.pop() {
                prop_assert!(it.priority <= last, "{} after {}", it.priority, last);
                last = it.priority;
            }
            prop_assert_eq!(q.len(), 0);
            prop_assert_eq!(q.bytes(), 0);
        }

        /// VTC: two backlogged flows' served tokens differ by at most one request's cost,
        /// however different their requests are.
        #[test]
        fn vtc_keeps_backlogged_flows_within_one_request(
            a in prop::collection::vec(1u32..100, 30..60),
            b in prop::collection::vec(1u32..100, 30..60),
            pops in 10usize..50,
        ) {
            let mut q = queues(Fairness::Vtc, Ordering::Fcfs);
            let mut id = 0;
            for (flow, costs) in [("a", &a), ("b", &b)] {
                for c in costs.iter() {
                    id += 1;
                    q.enqueue(item(id, flow, 0, f64::from(*c), id, 10_000)).unwrap();
                }
            }
            let mut served: HashMap<String, f64> = HashMap::new();
            for _ in 0..pops {
                let it = q.pop().unwrap();
                *served.entry(it.flow.clone()).or_default() += it.prompt_tokens;
            }
            let (sa, sb) = (served.get("a").copied().unwrap_or(0.0), served.get("b").copied().unwrap_or(0.0));
            prop_assert!((sa - sb).abs() <= 99.0, "{} vs {}", sa, sb);
        }

        /// `peek` names the band and flow `pop` serves, under every policy.
        #[test]
        fn peek_names_what_pop_serves(
            policy in 0usize..3,
            arrivals in prop::collection::vec((0usize..4, -1i32..2, 1u32..50), 1..40),
        ) {
            let fairness = [Fairness::RoundRobin, Fairness::GlobalStrict, Fairness::Vtc][policy];
            let mut q = queues(fairness, Ordering::Fcfs);
            for (i, (f, p, t)) in arrivals.iter().enumerate() {
                q.enqueue(item(i as u64, &format!("f{f}"), *p, f64::from(*t), i as u64, 1000)).unwrap();
            }
            while let Some((p, f)) = q.peek().map(|(p, f)| (p, f.to_string())) {
                let got = q.pop().unwrap();
                prop_assert_eq!((got.priority, got.flow), (p, f));
            }
        }

        /// Round robin through `in_turn` + `pop_flow` (the dispatcher's way) serves every
        /// backlogged flow within k pops too.
        #[test]
        fn round_robin_by_turn_starves_no_flow(k in 1usize..6, per in 1usize..8) {
            let mut q = round_robin_backlog(k, per);
            for _ in 0..per {
                let mut seen: Vec<String> = (0..k)
                    .map(|_| {
                        let (p, f) = {
                            let (p, mut turn) = q.in_turn().unwrap();
                            (p, turn.next().unwrap().to_string())
                        };
                        q.pop_flow(p, &f).unwrap().flow
                    })
                    .collect();
                seen.sort();
                seen.dedup();
                prop_assert_eq!(seen.len(), k);
            }
        }

        /// Round robin: with k backlogged flows, every flow is served within k pops.
        #[test]
        fn round_robin_starves_no_flow(k in 1usize..6, per in 1usize..8) {
            let mut q = round_robin_backlog(k, per);
            for _ in 0..per {
                let mut seen: Vec<String> = (0..k).map(|_| q.pop().unwrap().flow).collect();
                seen.sort();
                seen.dedup();
                prop_assert_eq!(seen.len(), k);
            }
        }

        /// Expiry and cancellation remove exactly the items meant, and the rest still
        /// dispatch in order.
        #[test]
        fn ttl_and_cancel_remove_exactly_the_right_items(
            ttls in prop::collection::vec(1u64..100, 1..40),
            now in 0u64..150,
            cancel in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
        ) {
            let mut q = queues(Fairness::GlobalStrict, Ordering::Edf);
            for (i, ttl) in ttls.iter().enumerate() {
                q.enqueue(item(i as u64, &format!("f{}", i % 3), 0, 1.0, i as u64, *ttl)).unwrap();
            }
            let mut gone: Vec<u64> = Vec::new();
            for c in &cancel {
                let id = c.index(ttls.len()) as u64;
                if q.remove(id).is_some() {
                    gone.push(id);
                }
            }
            let expired = q.expire(now);
            for it in &expired {
                prop_assert!(it.deadline_ms <= now);
                prop_assert!(!gone.contains(&it.id));
            }
            let mut deadlines = Vec::new();
            while let Some(it) = q.pop() {
                prop_assert!(it.deadline_ms > now);
                prop_assert!(!gone.contains(&it.id));
                deadlines.push(it.deadline_ms);
            }
            // EDF with global-strict: the band's earliest deadline first.
            prop_assert!(deadlines.windows(2).all(|w| w[0] <= w[1]), "{:?}", deadlines);
            prop_assert_eq!(expired.len() + deadlines.len() + gone.len(), ttls.len());
            prop_assert_eq!(q.flows(), 0);
        }
    }

    /// The brute-force choice the old scans made: the flow the index must agree with.
    fn scan(q: &FlowQueues, p: i32) -> Option<String> {
        let band = q.bands.get(&p)?;
        let active = band.flows.iter().filter(|(_, f)| !f.items.is_empty());
        match band.cfg.fairness {
            Fairness::GlobalStrict => active
                .map(|(n, f)| (*f.items.keys().next().unwrap(), n.clone()))
                .min()
                .map(|(_, n)| n),
            Fairness::Vtc => active
                .map(|(n, f)| {
                    (
                        Charge(f.charge),
                        f.items.len(),
                        *f.items.keys().next().unwrap(),
                        n.clone(),
                    )
                })
                .min()
                .map(|(.., n)| n),
            Fairness::RoundRobin => band.peek_flow().map(str::to_string),
        }
    }

    proptest! {
        /// Whatever mix of arrivals, cancels, charges, expiries and targeted pops, the
        /// ordered indexes name the flow a scan of every flow would, and the counts agree.
        #[test]
        fn the_index_agrees_with_a_scan(
            policy in 0usize..3,
            ops in prop::collection::vec((0u8..5, 0usize..6, 0u64..40, 1u32..30), 1..120),
        ) {
            let fairness = [Fairness::RoundRobin, Fairness::GlobalStrict, Fairness::Vtc][policy];
            let mut q = queues(fairness, Ordering::Edf);
            let mut next = 0u64;
            let mut live: Vec<u64> = Vec::new();
            for (op, f, t, c) in ops {
                match op {
                    0 | 1 => {
                        next += 1;
                        q.enqueue(item(next, &format!("f{f}"), 0, f64::from(c), t, u64::from(c) * 3)).unwrap();
                        live.push(next);
                    }
                    2 if !live.is_empty() => {
                        let id = live.remove(f % live.len());
                        q.remove(id);
                    }
                    3 => q.charge(0, &format!("f{f}"), f64::from(c) - 10.0),
                    _ => {
                        for it in q.expire(t) {
                            live.retain(|x| *x != it.id);
                        }
                    }
                }
                prop_assert_eq!(q.peek().map(|(_, n)| n.to_string()), scan(&q, 0));
                prop_assert_eq!(q.len(), q.bands.get(&0).map_or(0, |b| b.flows.values().map(|f| f.items.len()).sum()));
                prop_assert_eq!(q.deadlines.len(), q.len());
            }
            while let Some(it) = q.pop() {
                live.retain(|x| *x != it.id);
                prop_assert_eq!(q.peek().map(|(_, n)| n.to_string()), scan(&q, 0));
            }
            prop_assert!(live.is_empty());
            prop_assert_eq!(q.flows(), 0);
        }
    }

    #[test]
    fn a_flow_named_in_turn_can_be_served_out_of_turn() {
        let mut q = queues(Fairness::GlobalStrict, Ordering::Fcfs);
        q.enqueue(item(1, "early", 0, 1.0, 0, 100)).unwrap();
        q.enqueue(item(2, "early", 0, 1.0, 1, 100)).unwrap();
        q.enqueue(item(3, "late", 0, 1.0, 5, 100)).unwrap();
        let (p, order) = q.in_turn().unwrap();
        let order: Vec<String> = order.map(str::to_string).collect();
        assert_eq!(
            (p, order),
            (0, vec!["early".to_string(), "late".to_string()])
        );
        assert_eq!(q.pop_flow(0, "late").unwrap().id, 3);
        assert_eq!(q.pop().unwrap().id, 1);
        assert_eq!(q.pop_flow(0, "late"), None);
        assert_eq!(q.pop().unwrap().id, 2);
        assert!(q.is_empty());
    }

    #[test]
    fn many_one_off_flows_keep_no_state_past_the_idle_cap() {
        let mut q = queues(Fairness::Vtc, Ordering::Fcfs);
        // One backlogged flow keeps the band busy while one-off flows come and go, each
        // leaving a charge above the floor.
        q.enqueue(item(0, "steady", 0, 1.0, 0, 1_000_000)).unwrap();
        for i in 1..(3 * IDLE_FLOW_CAP as u64) {
            q.enqueue(item(i, &format!("once-{i}"), 0, 1000.0, i, 1_000_000))
                .unwrap();
            let popped = q.pop().unwrap();
            if popped.flow == "steady" {
                q.enqueue(item(popped.id + 10_000_000, "steady", 0, 1.0, i, 1_000_000))
                    .unwrap();
            }
            assert!(
                q.flows() <= q.len() + IDLE_FLOW_CAP + 1,
                "{} flows",
                q.flows()
            );
        }
    }

    #[test]
    fn vtc_ties_go_to_the_shorter_backlog() {
        let mut q = queues(Fairness::Vtc, Ordering::Fcfs);
        for i in 0..5 {
            q.enqueue(item(i, "heavy", 0, 0.0, i, 1000)).unwrap();
        }
        // Lifted to heavy's charge (0): a tie, and its one item goes before heavy's five.
        q.enqueue(item(9, "light", 0, 0.0, 9, 1000)).unwrap();
        assert_eq!(q.pop().unwrap().flow, "light");
        assert_eq!(q.pop().unwrap().flow, "heavy");
    }

    #[test]
    fn caps_refuse_without_changing_anything() {
        let mut q = FlowQueues::new(FlowConfig {
            max_bytes: 250,
            max_requests: 10,
            bands: vec![BandConfig {
                max_requests: 1,
                ..band(5, Fairness::RoundRobin, Ordering::Fcfs)
            }],
            default_band: band(0, Fairness::RoundRobin, Ordering::Fcfs),
            vtc_input_weight: 1.0,
            vtc_output_weight: 1.0,
        });
        q.enqueue(item(1, "a", 5, 1.0, 0, 10)).unwrap();
        assert_eq!(
            q.enqueue(item(2, "a", 5, 1.0, 0, 10)),
            Err(EnqueueError::BandFull(5))
        );
        q.enqueue(item(3, "a", 0, 1.0, 0, 10)).unwrap();
        assert_eq!(
            q.enqueue(item(4, "b", 0, 1.0, 0, 10)),
            Err(EnqueueError::PoolFull)
        );
        assert_eq!(
            q.enqueue(item(3, "a", 0, 1.0, 0, 10)),
            Err(EnqueueError::Duplicate(3))
        );
        assert_eq!((q.len(), q.bytes()), (2, 200));
        assert_eq!(q.pop().unwrap().id, 1);
    }

    #[test]
    fn a_full_queue_gives_way_from_its_lowest_band_and_longest_flow() {
        let mut q = queues(Fairness::GlobalStrict, Ordering::Fcfs);
        q.enqueue(item(1, "light", -1, 1.0, 1, 10)).unwrap();
        for i in 2..5 {
            q.enqueue(item(i, "heavy", -1, 1.0, i, 10)).unwrap();
        }
        q.enqueue(item(5, "std", 0, 1.0, 5, 10)).unwrap();
        // Nothing below -1: a sheddable arrival displaces nothing.
        assert_eq!(q.displace(-1), None);
        // The heaviest sheddable flow's last item goes first, then its next.
        assert_eq!(q.displace(0).map(|i| i.id), Some(4));
        assert_eq!(q.displace(100).map(|i| i.id), Some(3));
        assert_eq!((q.len(), q.bytes()), (3, 300));
        // Tie (one each): the name decides, deterministically.
        assert_eq!(q.displace(0).map(|i| i.flow), Some("heavy".into()));
        assert_eq!(q.displace(0).map(|i| i.flow), Some("light".into()));
        assert_eq!(q.displace(0), None, "std is not below 0");
        assert_eq!(q.displace(1).map(|i| i.id), Some(5));
        assert!(q.is_empty());
    }

    #[test]
    fn a_newly_active_flow_starts_at_the_minimum_and_output_is_charged() {
        let mut q = queues(Fairness::Vtc, Ordering::Fcfs);
        // "heavy" works alone for a while and runs up a charge.
        for i in 0..10 {
            q.enqueue(item(i, "heavy", 0, 100.0, i, 1000)).unwrap();
        }
        for _ in 0..5 {
            q.pop().unwrap();
        }
        q.charge_output(0, "heavy", 50.0);
        assert_eq!(q.charge_of(0, "heavy"), Some(600.0));
        // "light" arrives: it starts at heavy's charge (the band minimum), not at 0, so it
        // does not get the next 6 dispatches in a row for the time it was idle.
        q.enqueue(item(100, "light", 0, 100.0, 20, 1000)).unwrap();
        assert_eq!(q.charge_of(0, "light"), Some(600.0));
        let order: Vec<String> = (0..4).map(|_| q.pop().unwrap().flow).collect();
        assert!(order.iter().any(|f| f == "heavy"), "{order:?}");
    }
}
