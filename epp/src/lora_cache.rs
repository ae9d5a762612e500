//! What a server's host-memory adapter cache holds, inferred from the adapters sent there: vLLM's LRU replayed on our own requests.
//!
//! vLLM keeps `--max-cpu-loras` adapters in host memory, least recently used out first, and
//! (before its residency metrics) does not say which. The EPP sees every request it sends a
//! server, so replaying them through an LRU of that size names what the server most likely
//! holds: routing by residency on servers that do not report it. Another replica's requests
//! and a sidecar's loads of adapters already listed are not seen, and a restart only as the
//! server's return to the pool (the guess is then cleared): it is a guess, ranked below what
//! a server reports, and only ever used as a score.

use std::collections::VecDeque;

/// The most entries kept, whatever a flag says (vLLM's caches hold tens).
pub const MAX_ENTRIES: usize = 256;

/// Adapter keys, most recently sent first.
#[derive(Debug, Clone, Default)]
pub struct AdapterLru {
    keys: VecDeque<u64>,
}

impl AdapterLru {
    /// An adapter was sent to the server, or newly loaded there (a load reads it into the
    /// cache). The order is kept for [`MAX_ENTRIES`]; the cache's size applies on lookup.
    pub fn touch(&mut self, key: u64) {
        if let Some(i) = self.keys.iter().position(|k| *k == key) {
            self.keys.remove(i);
        }
        self.keys.push_front(key);
        self.keys.truncate(MAX_ENTRIES);
    }

    /// Forgets everything: the server may have restarted with an empty cache.
    pub fn clear(&mut self) {
        self.keys.clear();
    }

    /// Distinct adapters remembered (at most [`MAX_ENTRIES`]).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the adapter is among the `capacity` most recently sent.
    pub fn holds(&self, key: u64, capacity: usize) -> bool {
        self.keys.iter().take(capacity).any(|k| *k == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn least_recently_sent_goes_first() {
        let mut c = AdapterLru::default();
        for k in [1, 2, 3] {
            c.touch(k);
        }
        c.touch(1);
        c.touch(4);
        assert!(c.holds(1, 3) && c.holds(3, 3) && c.holds(4, 3));
        assert!(!c.holds(2, 3), "2 was used least recently");
        assert!(
            !c.holds(3, 2),
            "a smaller cache holds only the two most recent"
        );
        assert_eq!(c.len(), 4);
        c.clear();
        assert!(
            c.is_empty() && !c.holds(4, 3),
            "a restarted server holds nothing"
        );
    }

    proptest! {
        #[test]
        fn bounded_and_holds_what_was_just_sent(keys in proptest::collection::vec(0u64..400, 0..600), cap in 0usize..400) {
            let mut c = AdapterLru::default();
            for k in &keys {
                c.touch(*k);
                prop_assert!(c.holds(*k, cap.max(1)));
                prop_assert!(c.keys.len() <= MAX_ENTRIES);
            }
        }
    }
}
