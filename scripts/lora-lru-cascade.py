#!/usr/bin/env python3
"""Why registered-only adapters cost two reads on vLLM's LRU cache, and what freeing them saves.

A model of bench/workloads/lora-zipf.yaml's traffic (200 adapters, Zipf(1.0), ranks 8-32 at
25 ms per rank, 960 requests) on 8 servers x 16 host-memory cache entries, with a fixed
placement: the first adapters of an order cached (the 8 busiest on two servers), the rest
registered on one server each. Two ways to serve a request for an adapter not cached:

- lru: it is read into the server's LRU cache, which pushes out the entry used least recently,
  often a placed adapter, whose own next request then reads from disk (--lora-cold-adapters
  registered);
- freed: it is read into a free entry and unloaded once done (--lora-cold-adapters resolver);
  placement then leaves one entry per server free.

Orders: by popularity, or by popularity x read cost (rank). Prints median disk reads, engine
seconds spent reading, and reads over 400 ms (each such request alone misses a 400-ms TTFT).

    python3 scripts/lora-lru-cascade.py [--seeds 10]
"""
import argparse
import bisect
import collections
import random

SERVERS, ENTRIES, ADAPTERS, REQUESTS = 8, 16, 200, 960
RANK = [[8, 16, 24, 32][i % 4] for i in range(ADAPTERS)]


def sequence(seed):
    w = [1 / (i + 1) for i in range(ADAPTERS)]
    total, cum, c = sum(w), [], 0.0
    for x in w:
        c += x / total
        cum.append(c)
    r = random.Random(seed)
    return [min(bisect.bisect_left(cum, r.random()), ADAPTERS - 1) for _ in range(REQUESTS)]


def run(seed, order, entries, freed):
    per, homes = [[] for _ in range(SERVERS)], {}
    placed = set(order[: entries - 8])
    for a in order[: entries - 8]:
        for k in range(2 if a < 8 else 1):
            s = min(range(SERVERS), key=lambda s: (len(per[s]), (a * 7 + k) % SERVERS))
            per[s].append(a)
            homes.setdefault(a, []).append(s)
    caches = [collections.OrderedDict((a, None) for a in per[s]) for s in range(SERVERS)]
    reads = stall = slow = turn = 0
    for a in sequence(seed):
        hs = homes.get(a, [a % SERVERS])
        cache = caches[hs[turn % len(hs)]]
        turn += 1
        if a in cache:
            cache.move_to_end(a)
            continue
        ms = 25 * RANK[a]
        reads, stall, slow = reads + 1, stall + ms / 1000, slow + (ms > 400)
        if freed and a not in placed:
            continue
        cache[a] = None
        if len(cache) > ENTRIES:
            cache.popitem(last=False)
    return reads, stall, slow


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=10)
    n = p.parse_args().seeds
    orders = {
        "popularity": list(range(ADAPTERS)),
        "popularity x rank": sorted(range(ADAPTERS), key=lambda a: -RANK[a] / (a + 1)),
    }
    print("| cache order | not-cached reads | disk reads | engine s reading | reads > 400 ms |")
    print("|---|---|---|---|---|")
    for name, order in orders.items():
        for freed, entries in ((False, SERVERS * ENTRIES), (True, SERVERS * (ENTRIES - 1))):
            runs = [run(s, order, entries, freed) for s in range(n)]
            med = [sorted(r[i] for r in runs)[n // 2] for i in range(3)]
            how = "freed after use" if freed else "into the LRU"
            print(f"| {name} | {how} | {med[0]} | {med[1]:.1f} | {med[2]} |")


if __name__ == "__main__":
    main()
