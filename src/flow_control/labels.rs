//! Which fairness ids get metric labels of their own: a bounded set that forgets idle ids, so new tenants get their series and old ones do not keep theirs for good.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::pool::labels::OTHER_MODEL;
use crate::pool::metrics::{EppMetrics, FlowEnqueueLabels, FlowOutcomeLabels, FlowQueueLabels};

/// Fairness ids with series of their own at a time; others are counted as `other`.
pub const FLOW_LABELS_MAX: usize = 64;
/// An id with nothing held for this long gives its slot (and its series) to a new id.
pub const FLOW_LABEL_IDLE: Duration = Duration::from_secs(300);
/// Every outcome a held request's series may carry.
const OUTCOMES: &[&str] = &[
    "Dispatched",
    "RejectedCapacity",
    "EvictedTTL",
    "EvictedContextCancelled",
];

struct Slot {
    last_used: Instant,
    held: usize,
    /// The queue label sets created under this id (its series to remove when it leaves).
    series: HashSet<FlowQueueLabels>,
}

/// The slots, kept under one lock by flow control.
pub struct LabelSlots {
    slots: HashMap<String, Slot>,
    idle_after: Duration,
}

impl LabelSlots {
    pub fn new(idle_after: Duration) -> Self {
        Self {
            slots: HashMap::new(),
            idle_after,
        }
    }

    /// The label for `id`: itself when it has (or gets) a slot, else `other`. Taking a slot
    /// from an idle id removes that id's series from `metrics`.
    pub fn label(&mut self, id: &str, metrics: &EppMetrics) -> String {
        let now = Instant::now();
        if let Some(s) = self.slots.get_mut(id) {
            s.last_used = now;
            return id.to_string();
        }
        if self.slots.len() >= FLOW_LABELS_MAX {
            let idle = self
                .slots
                .iter()
                .filter(|(_, s)| s.held == 0 && now.duration_since(s.last_used) >= self.idle_after)
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            let Some(old) = idle else {
                return OTHER_MODEL.to_string();
            };
            if let Some(slot) = self.slots.remove(&old) {
                forget(&old, &slot, metrics);
            }
        }
        self.slots.insert(
            id.to_string(),
            Slot {
                last_used: now,
                held: 0,
                series: HashSet::new(),
            },
        );
        id.to_string()
    }

    /// A request was queued under these labels.
    pub fn held(&mut self, labels: &FlowQueueLabels) {
        if let Some(s) = self.slots.get_mut(&labels.fairness_id) {
            s.held += 1;
            s.series.insert(labels.clone());
        }
    }

    /// A request queued under these labels left the queue.
    pub fn released(&mut self, labels: &FlowQueueLabels) {
        if let Some(s) = self.slots.get_mut(&labels.fairness_id) {
            s.held = s.held.saturating_sub(1);
            s.last_used = Instant::now();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }
}

/// Removes every series an id's slot created.
fn forget(id: &str, slot: &Slot, metrics: &EppMetrics) {
    for l in &slot.series {
        metrics.flow_queue_size.remove(l);
        metrics.flow_queue_bytes.remove(l);
        for outcome in OUTCOMES {
            metrics.flow_queue_duration.remove(&FlowOutcomeLabels {
                fairness_id: id.to_string(),
                priority: l.priority.clone(),
                outcome: (*outcome).to_string(),
                inference_pool: l.inference_pool.clone(),
                model_name: l.model_name.clone(),
                target_model_name: l.target_model_name.clone(),
            });
            metrics.flow_enqueue_duration.remove(&FlowEnqueueLabels {
                fairness_id: id.to_string(),
                priority: l.priority.clone(),
                outcome: (*outcome).to_string(),
            });
        }
        metrics.flow_enqueue_duration.remove(&FlowEnqueueLabels {
            fairness_id: id.to_string(),
            priority: l.priority.clone(),
            outcome: "Queued".to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(id: &str) -> FlowQueueLabels {
        FlowQueueLabels {
            fairness_id: id.into(),
            priority: "0".into(),
            inference_pool: "p".into(),
            model_name: "m".into(),
            target_model_name: "m".into(),
        }
    }

    #[test]
    fn idle_ids_give_their_slot_and_series_to_new_ones() {
        let metrics = EppMetrics::new();
        let mut s = LabelSlots::new(Duration::ZERO);
        for i in 0..FLOW_LABELS_MAX {
            let id = format!("t{i}");
            assert_eq!(s.label(&id, &metrics), id);
            let l = labels(&id);
            s.held(&l);
            metrics.flow_queue_size.get_or_create(&l).inc();
        }
        // All held: a new id is `other`.
        assert_eq!(s.label("new", &metrics), OTHER_MODEL);
        // t0 finishes and idles: its slot and its series go to the new id.
        s.released(&labels("t0"));
        metrics.flow_queue_size.get_or_create(&labels("t0")).dec();
        assert_eq!(s.label("new", &metrics), "new");
        assert_eq!(s.len(), FLOW_LABELS_MAX);
        let page = metrics.encode();
        assert!(!page.contains("fairness_id=\"t0\""), "{page}");
        assert!(page.contains("fairness_id=\"t1\""));
    }

    #[test]
    fn a_busy_id_keeps_its_slot_until_idle_long_enough() {
        let metrics = EppMetrics::new();
        let mut s = LabelSlots::new(Duration::from_secs(3600));
        for i in 0..FLOW_LABELS_MAX {
            s.label(&format!("t{i}"), &metrics);
        }
        assert_eq!(s.label("late", &metrics), OTHER_MODEL);
    }
}
