#!/usr/bin/env python3
"""The fewest disk reads any demand-paging placement can make on lora-zipf's traffic.

A model of bench/workloads/lora-zipf.yaml (200 adapters, Zipf(1.0) popularity, 16 req/s for
60 s) with an oracle: the fleet's host-memory cache entries (8 servers x 16) pooled into one
cache, filled before the run with the adapters the run will ask for most, then Belady's MIN
(evict the adapter asked for again furthest in the future). No real placement does better:
it splits the cache per server, must hold busy adapters on several servers for load, and
cannot see the future. Prints the floor for several seeds next to lazy loading's measured
count and the issue's target (0.2x lazy's).

    python3 scripts/lora-disk-floor.py [--lazy 184]
"""
import argparse
import bisect
import random


def sequence(seed, adapters, exponent, requests):
    w = [1 / (i + 1) ** exponent for i in range(adapters)]
    total = sum(w)
    cum, c = [], 0.0
    for x in w:
        c += x / total
        cum.append(c)
    r = random.Random(seed)
    return [min(bisect.bisect_left(cum, r.random()), adapters - 1) for _ in range(requests)]


def belady(seq, capacity, preload):
    nxt, last = [0] * len(seq), {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = last.get(seq[i], float("inf"))
        last[seq[i]] = i
    first = {}
    for i, a in enumerate(seq):
        first.setdefault(a, i)
    cache = {a: first.get(a, float("inf")) for a in preload}
    misses = 0
    for i, a in enumerate(seq):
        if a not in cache:
            misses += 1
            if len(cache) >= capacity:
                del cache[max(cache, key=cache.get)]
        cache[a] = nxt[i]
    return misses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--exponent", type=float, default=1.0)
    p.add_argument("--requests", type=int, default=16 * 60)
    p.add_argument("--cache", type=int, default=8 * 16)
    p.add_argument("--lazy", type=float, default=184, help="lazy loading's measured disk loads")
    p.add_argument("--seeds", type=int, default=10)
    a = p.parse_args()
    floors, known = [], []
    for seed in range(a.seeds):
        seq = sequence(seed, a.adapters, a.exponent, a.requests)
        counts = {}
        for x in seq:
            counts[x] = counts.get(x, 0) + 1
        top = sorted(counts, key=lambda k: -counts[k])[: a.cache]
        floors.append(belady(seq, a.cache, top))
        # Knowing the popularity exactly, not the run: the most popular adapters cached, the
        # rest read from disk on every request.
        known.append(sum(1 for x in seq if x >= a.cache))
    for name, v in [("oracle (the run's future known)", floors), ("popularity known, cache fixed", known)]:
        v.sort()
        m = v[len(v) // 2]
        print(f"{name}: min {v[0]}, median {m}, max {v[-1]} disk loads over {a.seeds} seeds; {m / a.lazy:.2f}x lazy's {a.lazy:.0f}")
    print(f"target: 0.2x lazy's = {0.2 * a.lazy:.0f}")


if __name__ == "__main__":
    main()
