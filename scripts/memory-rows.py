#!/usr/bin/env python3
"""Memory rows: the loads that used to exhaust the EPP's memory, rerun through the shipped Envoy
config against release binaries. For each row a fresh EPP runs with the memory budget the manifest's
limit gives it (60 % of limits.memory, as --memory-budget=auto derives from the cgroup), and the
script reports its RSS idle, at peak and after the burst, what was charged to the budget, and the
answers clients got. Fails if RSS passes the manifest limit, does not come back within 20 % of idle,
or any answer is a 5xx the EPP did not choose.

Usage: scripts/memory-rows.sh [ROW ...]   (rows: bodies uploads tiny held100k idle ten_thousand)
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import soak  # noqa: E402  (its process helpers; WORK is shared)
from soak import BASE, BIN, ROOT, WORK, http_call, log, rss_mb, spawn, start_envoy  # noqa: E402


def manifest_limit_mb():
    with open(os.path.join(ROOT, "deploy/epp/epp.yaml")) as f:
        text = f.read()
    m = re.search(r"limits:\s*\n(?:\s+cpu:.*\n)?\s+memory:\s*(\d+)(Mi|Gi)", text)
    n = int(m.group(1))
    return n * 1024 if m.group(2) == "Gi" else n


SAMPLES = {}  # a response per non-200 status, for the log
LIMIT_MB = float(os.environ.get("LIMIT_MB", manifest_limit_mb()))
BUDGET = os.environ.get("BUDGET", f"{int(LIMIT_MB * 0.6)}Mi")


def start_pool(full_duplex, extra=()):
    sim, sim_addr = spawn([os.path.join(BIN, "vllm-sim"), "--host", "127.0.0.1", "--port", "0",
                           "--time-scale", "0.02", "--max-num-seqs", "256",
                           "--max-model-len", "100000000"], f"sim-{len(soak.procs)}",
                          marker="VLLM_SIM_LISTENING")
    pool = os.path.join(WORK, "pool.yaml")
    with open(pool, "w") as f:
        f.write(f"pool: {{name: mem}}\nendpoints:\n- address: {sim_addr}\nmodels:\n"
                f"- modelName: chat\n  criticality: Critical\n  targetModels: [{{name: {BASE}}}]\n"
                f"- modelName: batch\n  criticality: Sheddable\n  targetModels: [{{name: {BASE}}}]\n")
    # The sheddable band holds up to the pool's default cap (10,000; a band's default is 5,000).
    cfg = ("featureGates: [flowControl]\nsaturationDetector: {runningRequestsThreshold: 1}\n"
           "flowControl:\n  defaultRequestTTL: 170s\n  priorityBands:\n  - {priority: -1, maxRequests: " + os.environ.get("BAND", "10000") + "}\n")
    epp, line = spawn([os.path.join(BIN, "epp"), "--pool-file", pool, "--pool-name", "mem",
                       "--bind-address", "127.0.0.1", "--grpc-port", "0", "--grpc-health-port", "0",
                       "--metrics-port", "0", "--refresh-metrics-interval", "50ms",
                       "--config-text", cfg, "--memory-budget", BUDGET, *extra],
                      f"epp-{len(soak.procs)}", marker="EPP_LISTENING")
    fields = dict(kv.split("=", 1) for kv in line.split())
    port = start_envoy(int(fields["grpc"].rsplit(":", 1)[1]), full_duplex, len(soak.procs))
    return sim_addr, epp, fields, port


async def request(port, model, body_bytes=0, pause_at=None, release=None, prompt="hold",
                  content_length=None):
    """One HTTP/1.1 request through Envoy; returns its status (0: connection failed or cut)."""
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    except OSError:
        return 0
    pad = "x" * body_bytes
    body = json.dumps({"model": model, "prompt": prompt + pad, "max_tokens": 2}).encode()
    length = content_length or len(body)
    w.write(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n\r\n".encode())
    try:
        if pause_at is not None:
            try:
                w.write(body[:pause_at])
                await w.drain()
            except OSError:
                # Refused while uploading (the EPP's 429 at the headers; Envoy closed).
                line = await asyncio.wait_for(r.readline(), 2)
                return int(line.split()[1]) if line else 0
            await release.wait()
            try:
                # Refused while it uploaded (the EPP's 429 at its headers)?
                line = await asyncio.wait_for(r.readline(), 0.5)
                w.close()
                return int(line.split()[1]) if line else -1
            except asyncio.TimeoutError:
                w.close()
                return -1
        for i in range(0, len(body), 1 << 20):
            w.write(body[i:i + (1 << 20)])
            await w.drain()
        line = await asyncio.wait_for(r.readline(), 300)
        status = int(line.split()[1]) if line else 0
        if status != 200 and status not in SAMPLES:
            head = await asyncio.wait_for(r.read(600), 5)
            SAMPLES[status] = head.decode(errors="replace")
        w.close()
        return status
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return 0


def stall(sim_addr, on):
    h, p = sim_addr.rsplit(":", 1)
    http_call(h, int(p), "POST", "/sim/faults", json.dumps({"stall": on}), {"content-type": "application/json"})


def page(fields, path):
    h, p = fields["metrics"].rsplit(":", 1)
    return http_call(h, int(p), "GET", path)[1].decode()


def held(fields):
    return sum(float(l.rsplit(" ", 1)[1]) for l in page(fields, "/metrics").splitlines()
               if l.startswith("inference_extension_flow_control_queue_size{"))


def charged(fields):
    return json.loads(page(fields, "/debug/memory"))["charged_bytes"]


class Sampler:
    """RSS and charged bytes, sampled every 50 ms while a row runs."""

    def __init__(self, pid, fields):
        self.pid, self.fields, self.peak, self.peak_charged, self.on = pid, fields, 0.0, 0, True

    async def run(self):
        while self.on:
            self.peak = max(self.peak, rss_mb(self.pid))
            try:
                self.peak_charged = max(self.peak_charged, charged(self.fields))
            except Exception:
                pass
            await asyncio.sleep(0.05)


async def wait_until(cond, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.1)
    return False


async def hold_row(port, sim_addr, fields, n, body_bytes, critical=True):
    """n sheddable requests held behind one stalled request, then a critical one, then release."""
    stall(sim_addr, True)
    blocker = asyncio.ensure_future(request(port, "chat"))
    await wait_until(lambda: "inference_extension_picks_total{" in page(fields, "/metrics"), 30)
    tasks = [asyncio.ensure_future(request(port, "batch", body_bytes)) for _ in range(n)]
    await wait_until(lambda: held(fields) + sum(t.done() for t in tasks) >= n, 120)
    at_peak = held(fields)
    crit = asyncio.ensure_future(request(port, "chat")) if critical else None
    await asyncio.sleep(1.0)
    stall(sim_addr, False)
    statuses = await asyncio.gather(blocker, *tasks, *([crit] if crit else []))
    return statuses, at_peak


async def load(name, port, sim_addr, fields, epp):
    """One burst of the row's load: the answers, and a note."""
    note = ""
    if name == "bodies":
        statuses = await asyncio.gather(*[request(port, "chat", 30 << 20) for _ in range(8)])
    elif name == "uploads":
        release = asyncio.Event()
        tasks = [asyncio.ensure_future(request(port, "chat", 30 << 20, pause_at=20 << 20, release=release))
                 for _ in range(12)]
        await asyncio.sleep(5.0)
        note = f"RSS while paused {rss_mb(epp.pid):.0f} MiB"
        release.set()
        statuses = await asyncio.gather(*tasks)
    elif name in ("tiny", "held100k", "ten_thousand"):
        n, size = {"tiny": (4000, 0), "held100k": (1500, 100 * 1024), "ten_thousand": (10000, 0)}[name]
        statuses, n_held = await hold_row(port, sim_addr, fields, n, size)
        note = f"{n_held:.0f} held at once; critical: {statuses[-1]}"
    elif name == "idle":
        p = subprocess.Popen([os.path.join(ROOT, "target/release/examples/idle_streams"), fields["grpc"], "4", "4096"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        opened = p.stdout.readline().strip()
        await asyncio.sleep(2.0)
        note = f"{opened}, RSS then {rss_mb(epp.pid):.0f} MiB"
        p.stdin.close()
        note += ", " + p.stdout.readline().strip()
        p.wait(30)
        statuses = []
    else:
        raise SystemExit(f"unknown row {name}")
    return statuses, note


def epp_errors(fields):
    """The EPP's own error answers by code (inference_objective_request_error_total)."""
    out = {}
    for l in page(fields, "/metrics").splitlines():
        m = re.match(r'inference_objective_request_error_total\{.*error_code="(\d+)".*\} (\S+)', l)
        if m:
            out[int(m.group(1))] = out.get(int(m.group(1)), 0) + int(float(m.group(2)))
    return out


async def run_row(name):
    full_duplex = name in ("bodies", "uploads")
    extra = ("--secure-serving=false",) if name == "idle" else ()
    sim_addr, epp, fields, port = start_pool(full_duplex, extra)
    for _ in range(5 if name != "idle" else 0):
        await request(port, "chat")
    await asyncio.sleep(1.0)
    cold = rss_mb(epp.pid)
    # A first burst warms what a process keeps at its high-water mark (connection stream
    # tables, task slabs, map capacity); the second is measured against the warm idle size.
    await load(name, port, sim_addr, fields, epp)
    await wait_until(lambda: charged(fields) == 0, 30)
    await asyncio.sleep(3.0)
    idle = rss_mb(epp.pid)
    s = Sampler(epp.pid, fields)
    sampler = asyncio.ensure_future(s.run())
    statuses, note = await load(name, port, sim_addr, fields, epp)
    back = await wait_until(lambda: rss_mb(epp.pid) <= idle * 1.2, 20)
    after = rss_mb(epp.pid)
    s.on = False
    await sampler
    if name == "ten_thousand":
        note += f", {(s.peak - idle) * 1024 / 10000:.1f} KiB RSS per held request"
    counts = {}
    for st in statuses:
        counts[st] = counts.get(st, 0) + 1
    left = charged(fields)
    errors = epp_errors(fields)
    epp.terminate()
    # 0: the connection was reset while uploading, after the EPP's 429 (counted by the EPP).
    fives = {k: v for k, v in counts.items() if k >= 500 or (k == 0 and name != "uploads")}
    ok = s.peak < LIMIT_MB and back and not fives and left == 0
    log(f"{name}: cold {cold:.0f} MiB, warm idle {idle:.0f} MiB, peak {s.peak:.0f} MiB (limit {LIMIT_MB:.0f}, "
        f"budget {BUDGET}), after {after:.0f} MiB; peak charged {s.peak_charged / 2**20:.0f} MiB, {left} left; "
        f"answers {dict(sorted(counts.items()))}, the EPP's errors (both bursts) {errors}; {note} -> {'ok' if ok else 'FAIL'}")
    for st, text in SAMPLES.items():
        log(f"  {name} {st}: {' '.join(text.split())[:300]}")
    SAMPLES.clear()
    return ok


async def main():
    rows = sys.argv[1:] or ["bodies", "uploads", "tiny", "held100k", "idle", "ten_thousand"]
    os.makedirs(WORK, exist_ok=True)
    results = []
    for r in rows:
        results.append(await run_row(r))
        for p in soak.procs:
            p.kill()
        soak.procs.clear()
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        for p in soak.procs:
            try:
                p.kill()
            except OSError:
                pass
