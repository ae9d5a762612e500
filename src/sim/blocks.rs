//! Prompt block hashes for the simulated prefix cache: chained per block, seeded per adapter as vLLM's are.

use std::hash::Hasher;

/// Chained 64-bit block hashes of `text`, `chars_per_block` characters a block, seeded by
/// `seed` (the adapter or base model) so that caches are per adapter as in vLLM.
pub fn block_hashes(seed: &str, text: &str, chars_per_block: usize) -> Vec<u64> {
    let bytes = text.as_bytes();
    let n = bytes.len() / chars_per_block.max(1);
    let mut out = Vec::with_capacity(n);
    let mut h = fnv1a(0xcbf2_9ce4_8422_2325, seed.as_bytes());
    for i in 0..n {
        h = fnv1a(h, &bytes[i * chars_per_block..(i + 1) * chars_per_block]);
        out.push(h);
    }
    out
}

/// FNV-1a (the `fnv` crate's) continued from `h` over `data`.
fn fnv1a(h: u64, data: &[u8]) -> u64 {
    let mut f = fnv::FnvHasher::with_key(h);
    f.write(data);
    f.finish()
}
