//! Bounded approximate prefix-cache index: which endpoints recently served which prompt blocks.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use lru::LruCache;

/// Most endpoints remembered per block (a block served everywhere says nothing anyway).
const MAX_ENDPOINTS_PER_BLOCK: usize = 8;

/// An LRU over block hashes with a hard entry cap, so memory stays bounded whatever the
/// traffic (upstream's index can grow without limit with small blocks).
#[derive(Debug)]
pub struct PrefixIndex {
    blocks: LruCache<u64, Vec<u32>>,
}

impl PrefixIndex {
    /// An index holding at most `capacity` blocks (~100 bytes each).
    pub fn new(capacity: usize) -> Self {
        Self {
            blocks: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("nonzero")),
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.blocks.cap().get()
    }

    /// For each endpoint, how many leading blocks of `blocks` it has served.
    pub fn match_lengths(&self, blocks: &[u64]) -> HashMap<u32, usize> {
        let mut matched: HashMap<u32, usize> = HashMap::new();
        for (i, b) in blocks.iter().enumerate() {
            let Some(eps) = self.blocks.peek(b) else {
                break;
            };
            let mut advanced = false;
            for &e in eps {
                let m = matched.entry(e).or_insert(0);
                if *m == i {
                    *m = i + 1;
                    advanced = true;
                }
            }
            if !advanced {
                break;
            }
        }
        matched.retain(|_, m| *m > 0);
        matched
    }

    /// Records that `endpoint` now caches `blocks`.
    pub fn insert(&mut self, blocks: &[u64], endpoint: u32) {
        for b in blocks {
            match self.blocks.get_mut(b) {
                Some(eps) => {
                    if let Some(pos) = eps.iter().position(|e| *e == endpoint) {
                        // Most recent last.
                        eps.remove(pos);
                    } else if eps.len() >= MAX_ENDPOINTS_PER_BLOCK {
                        eps.remove(0);
                    }
                    eps.push(endpoint);
                }
                None => {
                    self.blocks.put(*b, vec![endpoint]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_matches_per_endpoint() {
        let mut idx = PrefixIndex::new(100);
        idx.insert(&[1, 2, 3], 7);
        idx.insert(&[1, 2], 8);
        let m = idx.match_lengths(&[1, 2, 3, 4]);
        assert_eq!(m.get(&7), Some(&3));
        assert_eq!(m.get(&8), Some(&2));
        // A gap stops the match.
        assert!(idx.match_lengths(&[9, 1, 2]).is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let mut idx = PrefixIndex::new(1000);
        for i in 0..100_000u64 {
            idx.insert(&[i, i + 1_000_000], (i % 50) as u32);
        }
        assert_eq!(idx.len(), 1000);
    }
}
