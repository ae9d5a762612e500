//! Rendezvous (highest-random-weight) affinity bounded by load: every EPP replica maps a prompt prefix to the same endpoint with no communication.
//!
//! Each (key, endpoint) pair gets a pseudo-random weight; a key's endpoints in weight order
//! are the same on every replica that sees the same endpoint set, whatever order it lists
//! them in, and an endpoint leaving moves only the keys it was first for. The preferred
//! endpoint is the first in that order whose load is within `factor x mean + 1`, so a hot
//! prefix spills to its next endpoint instead of piling onto one server.

/// A stable 64-bit key for an endpoint address (FNV-1a): the same on every replica.
pub fn endpoint_key(address: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in address.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The rendezvous weight of `endpoint` for `key`.
pub fn weight(key: u64, endpoint: u64) -> u64 {
    splitmix(key ^ splitmix(endpoint))
}

/// Indices of `endpoints` in rendezvous order for `key`, highest weight first (ties, which
/// need a 64-bit collision, by endpoint key).
pub fn order(key: u64, endpoints: &[u64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..endpoints.len()).collect();
    idx.sort_unstable_by(|&a, &b| {
        weight(key, endpoints[b])
            .cmp(&weight(key, endpoints[a]))
            .then(endpoints[a].cmp(&endpoints[b]))
    });
    idx
}

/// The preferred endpoint for `key`: the first in rendezvous order whose load is at most
/// `factor x mean load + 1`. `None` only when there are no endpoints.
pub fn preferred(key: u64, endpoints: &[u64], loads: &[f64], factor: f64) -> Option<usize> {
    if endpoints.is_empty() {
        return None;
    }
    let n = endpoints.len().min(loads.len());
    let finite = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
    let mean = loads[..n].iter().map(|&x| finite(x)).sum::<f64>() / n.max(1) as f64;
    let bound = factor.max(1.0) * mean + 1.0;
    let ord = order(key, &endpoints[..n]);
    ord.iter()
        .copied()
        .find(|&i| finite(loads[i]) <= bound)
        .or_else(|| ord.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| endpoint_key(&format!("10.0.0.{i}:8000")))
            .collect()
    }

    proptest! {
        /// Every replica agrees whatever order it lists the endpoints in.
        #[test]
        fn stable_under_endpoint_order(key: u64, n in 1usize..12, rot in 0usize..12, loads in prop::collection::vec(0.0f64..20.0, 12)) {
            let eps = keys(n);
            let mut shuffled: Vec<(u64, f64)> = eps.iter().copied().zip(loads.iter().copied()).collect();
            shuffled.rotate_left(rot % n);
            shuffled.reverse();
            let (k2, l2): (Vec<u64>, Vec<f64>) = shuffled.into_iter().unzip();
            let a = preferred(key, &eps, &loads[..n], 1.25).map(|i| eps[i]);
            let b = preferred(key, &k2, &l2, 1.25).map(|i| k2[i]);
            prop_assert_eq!(a, b);
        }

        /// An endpoint leaving moves only the keys it was first for.
        #[test]
        fn minimal_movement_when_an_endpoint_leaves(n in 2usize..12, gone in 0usize..12, keys_in in prop::collection::vec(any::<u64>(), 1..200)) {
            let eps = keys(n);
            let gone = gone % n;
            let rest: Vec<u64> = eps.iter().copied().enumerate().filter(|&(i, _)| i != gone).map(|(_, e)| e).collect();
            for k in keys_in {
                let before = eps[order(k, &eps)[0]];
                let after = rest[order(k, &rest)[0]];
                if before != eps[gone] {
                    prop_assert_eq!(before, after);
                }
            }
        }

        /// The preferred endpoint's load is within the bound whenever any endpoint's is, and
        /// it is the highest-weight one that is.
        #[test]
        fn load_bound_respected(key: u64, loads in prop::collection::vec(0.0f64..50.0, 1..12), factor in 1.0f64..3.0) {
            let eps = keys(loads.len());
            let mean = loads.iter().sum::<f64>() / loads.len() as f64;
            let bound = factor * mean + 1.0;
            let p = preferred(key, &eps, &loads, factor).unwrap();
            prop_assert!(loads[p] <= bound);
            for &i in &order(key, &eps) {
                if i == p { break; }
                prop_assert!(loads[i] > bound);
            }
        }
    }

    #[test]
    fn keys_spread_over_endpoints() {
        let eps = keys(8);
        let mut count = [0usize; 8];
        for k in 0..8000u64 {
            count[order(splitmix(k), &eps)[0]] += 1;
        }
        // Each endpoint is first for about 1/8 of the keys.
        for c in count {
            assert!((800..1200).contains(&c), "{count:?}");
        }
        assert_eq!(preferred(1, &[], &[], 1.25), None);
        // NaN or infinite loads never win nor panic.
        assert!(preferred(1, &eps, &[f64::NAN; 8], 1.25).is_some());
    }
}
