#!/usr/bin/env python3
"""Soak: mixed valid and hostile traffic through two real Envoys (BUFFERED and FULL_DUPLEX_STREAMED)
into one EPP (flow control on, a small memory budget) for a bounded time, while model servers die
and come back, stall, fail, the pool file changes (also to an invalid file), bursts of sheddable
requests are held, uploads pause half way and, as root, a server in its own network namespace is
partitioned and loses packets. Asserts: the EPP never exits, its RSS stays within a bound of its
warmed-up size, its metric series stay bounded, every answer is a valid HTTP response, and no 5xx
comes from the gateway outside a window where a server was killed or partitioned (the EPP's own
503s and the servers' injected failures are theirs to choose).

Usage: scripts/soak.sh [SECONDS]   (default 180; binaries from target/release, Envoy from .venv)
"""

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN_DIR", os.path.join(ROOT, "target", "release"))
WORK = os.path.join(ROOT, ".soak")
BASE = "meta-llama/Llama-3.1-8B-Instruct"
DURATION = float(sys.argv[1]) if len(sys.argv) > 1 and __name__ == "__main__" else 180.0
WORKERS = 8
RSS_BOUND_MB = 48      # growth allowed over the warmed-up RSS
# Flow control on: sheddable work is held while servers are saturated (or stalled).
FLOW_CONFIG = ("featureGates: [flowControl]\nsaturationDetector: {runningRequestsThreshold: 8}\n"
               "flowControl: {defaultRequestTTL: 30s, maxRequests: 2000}\n")
# Metric series on the EPP's page. With flow control on, its families add series per band,
# outcome and (rule-known) model, with histogram buckets: 490 in a 120 s run, flat after the
# first minute; a client cannot add any (ids and names past the label slots are `other`).
SERIES_BOUND = 800
procs = []
NETNS = []  # namespaces to remove at exit


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def spawn(args, name, env=None, marker=None):
    out = open(os.path.join(WORK, name + ".out"), "w")
    err = open(os.path.join(WORK, name + ".log"), "w")
    p = subprocess.Popen(args, stdout=subprocess.PIPE if marker else out, stderr=err,
                         env={**os.environ, **(env or {})}, text=True)
    procs.append(p)
    if marker:
        deadline = time.time() + 30
        while time.time() < deadline:
            line = p.stdout.readline()
            if line.startswith(marker):
                return p, line[len(marker):].strip()
        raise SystemExit(f"{name} printed no {marker}")
    return p, None


def write_adapter(name):
    d = os.path.join(WORK, "adapters", name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        f.write('{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj"]}')
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\0" * 8 + b"{}")
    return d


def http_call(host, port, method, path, body=None, headers=None, timeout=30):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, data
    finally:
        c.close()


def start_sim(port=0):
    args = [os.path.join(BIN, "vllm-sim"), "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
            "--max-loras", "2", "--time-scale", "0.05", "--max-num-seqs", "16"]
    p, addr = spawn(args, f"sim-{port}-{len(procs)}", {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"},
                    "VLLM_SIM_LISTENING")
    host, prt = addr.rsplit(":", 1)
    for name in ("food-review-1", "food-review-2"):
        http_call(host, int(prt), "POST", "/v1/load_lora_adapter",
                  json.dumps({"lora_name": name, "lora_path": write_adapter(name)}),
                  {"content-type": "application/json"})
    return p, addr


def pool_file(addrs, weight):
    eps = "".join(f"- address: {a}\n" for a in addrs)
    return (f"pool: {{name: soak}}\nendpoints:\n{eps}models:\n- modelName: food-review\n"
            f"  criticality: Standard\n  targetModels:\n  - {{name: food-review-1, weight: {100 - weight}}}\n"
            f"  - {{name: food-review-2, weight: {weight}}}\n- modelName: batch\n  criticality: Sheddable\n"
            f"  targetModels: [{{name: {BASE}}}]\n")


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def start_envoy(epp_port, full_duplex, n):
    with open(os.path.join(ROOT, "deploy/envoy/envoy-epp.yaml.tmpl")) as f:
        cfg = f.read()
    cfg = (cfg.replace("${LISTEN_PORT}", "0").replace("${EPP_PORT}", str(epp_port))
           .replace("${BODY_MODE}", "FULL_DUPLEX_STREAMED" if full_duplex else "BUFFERED")
           .replace("${TRAILER_MODE}", "SEND" if full_duplex else "SKIP")
           .replace("${FAILURE_MODE_ALLOW}", "false"))
    path = os.path.join(WORK, f"envoy-{n}.yaml")
    with open(path, "w") as f:
        f.write(cfg)
    admin = os.path.join(WORK, f"envoy-{n}.admin")
    spawn([os.path.join(ROOT, ".venv/bin/envoy"), "-c", path, "--use-dynamic-base-id", "--concurrency", "2",
           "-l", os.environ.get("ENVOY_LOG_LEVEL", "error"), "--admin-address-path", admin], f"envoy-{n}")
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            a = open(admin).read().strip()
            h, p = a.rsplit(":", 1)
            _, body = http_call(h, int(p), "GET", "/listeners?format=json")
            port = json.loads(body)["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
            if port:
                return port
        except Exception:
            time.sleep(0.1)
    raise SystemExit("Envoy did not start")


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def netns_sim():
    """As root: a sim in its own network namespace behind a veth pair (faults by iptables)."""
    if os.geteuid() != 0:
        return None
    ns, host_if, ns_if = f"ilsoak{os.getpid()}", f"ilsh{os.getpid()}", f"ilsn{os.getpid()}"
    net = f"10.214.{os.getpid() % 60 * 4}"
    cmds = [["ip", "netns", "add", ns], ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
            ["ip", "link", "set", ns_if, "netns", ns], ["ip", "addr", "add", f"{net}.1/30", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/30", "dev", ns_if],
            ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"]]
    for c in cmds:
        if subprocess.run(c, capture_output=True).returncode != 0:
            log(f"no network namespace ({' '.join(c)} failed): network faults skipped")
            return None
    args = ["ip", "netns", "exec", ns, os.path.join(BIN, "vllm-sim"), "--host", f"{net}.2", "--port", "0",
            "--time-scale", "0.05", "--max-num-seqs", "16"]
    n = {"ns": ns, "if": host_if}
    NETNS.append(n)
    p, addr = spawn(args, "sim-netns", marker="VLLM_SIM_LISTENING")
    return {**n, "addr": addr, "proc": p}


def netns_fault(n, rule):
    """Adds (or with rule None, removes every) iptables drop rule on the namespace's link."""
    specs = [["-o", n["if"], "-j", "DROP"],
             ["-o", n["if"], "-m", "statistic", "--mode", "random", "--probability", "0.2", "-j", "DROP"]]
    if rule is None:
        for spec in specs:
            while subprocess.run(["iptables", "-D", "OUTPUT", *spec], capture_output=True).returncode == 0:
                pass
        return
    subprocess.run(["iptables", "-I", "OUTPUT", *specs[rule]], check=True)


def netns_remove(n):
    netns_fault(n, None)
    subprocess.run(["ip", "link", "del", n["if"]], capture_output=True)
    subprocess.run(["ip", "netns", "del", n["ns"]], capture_output=True)


def paused_upload(port, rng):
    """Announces a body, sends part of it, waits, and goes away without finishing."""
    total = rng.choice([200_000, 900_000])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  f"content-length: {total}\r\n\r\n".encode() + b'{"model": "food-review", "prompt": "' +
                  b"x" * (total // 2))
        time.sleep(rng.uniform(0.5, 3))
    return "cut"


def kind_of_5xx(data):
    """Who chose a 5xx: a model server (vLLM's error object, which has `param`), the EPP (its
    JSON error, without it) or the gateway (anything else: Envoy's own text)."""
    try:
        v = json.loads(data)
    except ValueError:
        return "gateway"
    if isinstance(v, dict) and isinstance(v.get("error"), dict) and "type" in v["error"]:
        return "server" if "param" in v["error"] else "epp"
    if isinstance(v, dict) and (v.get("object") == "error" or "message" in v):
        return "server"
    return "gateway"


def hostile_and_valid(rng):
    """(method, path, body, headers, what) for one request."""
    k = rng.random()
    big = lambda n: "x" * n
    if k < 0.30:
        return ("POST", "/v1/completions", json.dumps({"model": BASE, "prompt": f"hello {rng.random()}", "max_tokens": 4}), {}, "valid")
    if k < 0.45:
        return ("POST", "/v1/chat/completions", json.dumps({"model": "food-review", "messages": [{"role": "user", "content": "中文 review"}], "max_tokens": 3, "stream": rng.random() < 0.5, "stream_options": {"include_usage": True}}), {}, "canary")
    if k < 0.50:
        return ("POST", "/v1/completions", json.dumps({"model": "batch", "prompt": "summarize", "max_tokens": 2}), {}, "sheddable")
    if k < 0.60:
        return ("POST", "/v1/completions", json.dumps({"model": f"rnd-{rng.getrandbits(64):x}", "prompt": "x"}), {}, "random-model")
    if k < 0.63:
        return ("POST", "/v1/completions", json.dumps({"model": big(200_000), "prompt": "x"}), {}, "huge-model-name")
    if k < 0.66:
        return ("POST", "/v1/completions", json.dumps({"model": "food-review", "prompt": big(rng.choice([100_000, 700_000]))}), {}, "big-body")
    if k < 0.70:
        return ("POST", "/v1/completions", "{not json" + big(rng.randint(0, 5000)), {}, "bad-json")
    if k < 0.73:
        return ("POST", "/v1/completions", '{"model":"a","model":"b","prompt":"x"}', {}, "repeated-model")
    if k < 0.76:
        return ("POST", "/v1/completions", "[" * 5000 + "]" * 5000, {}, "deep-nesting")
    if k < 0.79:
        return ("POST", "/v1/completions", bytes([0xff, 0xfe, 0x00]) + os.urandom(64), {}, "binary")
    if k < 0.83:
        return (rng.choice(["GET", "DELETE", "OPTIONS", "PATCH"]), "/v1/models", None, {}, "bodyless")
    if k < 0.86:
        return ("POST", "/v1/completions", "", {}, "empty-post")
    if k < 0.90:
        # Routed as if the headers were absent: the gateway strips both, the EPP ignores them.
        return ("POST", "/v1/completions", json.dumps({"model": "food-review", "prompt": "x", "max_tokens": 1}),
                {"x-gateway-destination-endpoint": "127.0.0.1:1", "x-gateway-model-name-rewrite": "evil",
                 "x-request-id": big(4000)}, "spoofed-routing")
    if k < 0.93:
        return ("POST", "/v1/completions", json.dumps({"model": "food-review", "prompt": "x", "max_tokens": 1}),
                {"x-gateway-inference-objective": big(2000)}, "unknown-objective")
    return ("POST", "/v1/embeddings", json.dumps({"model": BASE, "input": [1, 2.5, "t", None, {"text": "x"}]}), {}, "embeddings")


def main():
    os.makedirs(WORK, exist_ok=True)
    random.seed(7)
    sims = [start_sim() for _ in range(3)]
    addrs = [a for _, a in sims]
    far = netns_sim()
    if far:
        addrs.append(far["addr"])
    pool = os.path.join(WORK, "pool.yaml")
    write_atomic(pool, pool_file(addrs, 10))
    epp, line = spawn([os.path.join(BIN, "epp"), "--bind-address", "127.0.0.1", "--grpc-port", "0",
                       "--grpc-health-port", "0", "--metrics-port", "0", "--pool-name", "soak",
                       "--pool-file", pool, "--max-body-bytes", "1048576", "--memory-budget", "96Mi",
                       "--config-text", FLOW_CONFIG], "epp", marker="EPP_LISTENING")
    fields = dict(w.split("=", 1) for w in line.split())
    epp_grpc = int(fields["grpc"].rsplit(":", 1)[1])
    mhost, mport = fields["metrics"].rsplit(":", 1)
    gateways = [start_envoy(epp_grpc, False, 0), start_envoy(epp_grpc, True, 1)]
    log(f"EPP {line}; gateways {gateways} (buffered, full duplex); {DURATION:.0f} s of traffic")

    stop = time.time() + DURATION
    counts, lock = {}, threading.Lock()
    bad = []
    # (start, end) of each request the gateway answered 5xx, and of each fault window.
    gateway_5xx, windows = [], []

    def worker(i):
        rng = random.Random(i)
        n = 0
        while time.time() < stop and n < 1_000_000:
            n += 1
            gw = rng.choice(gateways)
            method, path, body, headers, what = hostile_and_valid(rng)
            headers = {"content-type": "application/json", **headers}
            t_start = time.time()
            try:
                if rng.random() < 0.03:
                    what, status, ok = "paused-upload", paused_upload(gw, rng), True
                    with lock:
                        counts[(what, status)] = counts.get((what, status), 0) + 1
                    continue
                status, data = http_call("127.0.0.1", gw, method, path, body, headers, timeout=60)
                ok = 100 <= status <= 599
                if status >= 500:
                    who = kind_of_5xx(data)
                    status = f"{status}-{who}"
                    if who == "gateway":
                        with lock:
                            gateway_5xx.append((t_start, time.time(), what, status, data[:120]))
            except http.client.IncompleteRead:
                # A streamed answer (200 and its headers already sent) cut when its model
                # server was killed mid-stream: HTTP cannot say more than a reset. Counted,
                # accepted for streams only.
                streamed = isinstance(body, str) and '"stream": true' in body
                status, ok = ("truncated-stream" if streamed else "error IncompleteRead"), streamed
            except (OSError, http.client.HTTPException) as e:
                status, ok = f"error {type(e).__name__}", False
            with lock:
                key = (what, status)
                counts[key] = counts.get(key, 0) + 1
                if not ok and len(bad) < 20:
                    bad.append((what, status))

    def held_burst(n):
        """n sheddable requests at once while the pool is saturated: held, then released."""
        def one(i):
            try:
                st, data = http_call("127.0.0.1", gateways[i % 2], "POST", "/v1/completions",
                                     json.dumps({"model": "batch", "prompt": f"held {i}", "max_tokens": 2}),
                                     {"content-type": "application/json"}, timeout=60)
                if st >= 500:
                    who = kind_of_5xx(data)
                    st = f"{st}-{who}"
                    if who == "gateway":
                        with lock:
                            gateway_5xx.append((t0, time.time(), "held-burst", st, data[:120]))
            except (OSError, http.client.HTTPException) as e:
                st = f"error {type(e).__name__}"
                with lock:
                    if len(bad) < 20:
                        bad.append(("held-burst", st))
            with lock:
                counts[("held-burst", st)] = counts.get(("held-burst", st), 0) + 1
        t0 = time.time()
        ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def chaos():
        rng = random.Random(99)
        step = 0
        while time.time() < stop - 5:
            time.sleep(6)
            step += 1
            action = step % (8 if far else 6)
            if action == 0:  # a server dies and comes back on the same port
                i = rng.randrange(len(sims))
                p, addr = sims[i]
                w0 = time.time()
                p.send_signal(signal.SIGKILL)
                p.wait()
                time.sleep(1.5)
                sims[i] = start_sim(int(addr.rsplit(":", 1)[1]))
                with lock:
                    windows.append((w0, time.time()))
                log(f"chaos: server {addr} killed and restarted")
            elif action == 5:  # every server stalls: a burst of sheddable requests is held
                for a in addrs:
                    h, p = a.rsplit(":", 1)
                    http_call(h, int(p), "POST", "/sim/faults", json.dumps({"stall": True}))
                burst = threading.Thread(target=held_burst, args=(300,))
                burst.start()
                time.sleep(2)
                for a in addrs:
                    h, p = a.rsplit(":", 1)
                    http_call(h, int(p), "POST", "/sim/faults", json.dumps({"stall": False}))
                burst.join()
                log("chaos: 300 sheddable requests held through a stall and released")
            elif action == 6:  # the namespaced server is partitioned, then heals
                w0 = time.time()
                netns_fault(far, 0)
                time.sleep(4)
                netns_fault(far, None)
                with lock:
                    windows.append((w0, time.time()))
                log(f"chaos: server {far['addr']} partitioned for 4 s, then healed")
            elif action == 7:  # 20 % packet loss to the namespaced server
                netns_fault(far, 1)
                time.sleep(4)
                netns_fault(far, None)
                log(f"chaos: 20 % packet loss to {far['addr']} for 4 s")
            elif action == 1:  # a server stalls, then fails half its requests
                h, p = rng.choice(addrs).rsplit(":", 1)
                http_call(h, int(p), "POST", "/sim/faults", json.dumps({"stall": True}))
                time.sleep(1.5)
                http_call(h, int(p), "POST", "/sim/faults", json.dumps({"stall": False, "failure_rate": 0.5}))
                time.sleep(2)
                http_call(h, int(p), "POST", "/sim/faults", json.dumps({"failure_rate": 0.0}))
                log(f"chaos: server {h}:{p} stalled then failing")
            elif action == 2:  # the canary weight moves
                write_atomic(pool, pool_file(addrs, rng.choice([0, 10, 50, 100])))
                log("chaos: canary weights changed")
            elif action == 3:  # a bad edit (kept out), a truncated one, then a good one
                write_atomic(pool, "endpoints:\n- address: nope\n")
                time.sleep(0.5)
                write_atomic(pool, "")
                time.sleep(0.5)
                write_atomic(pool, pool_file(addrs, 10))
                log("chaos: invalid and empty pool files written (last good kept)")
            else:  # a server leaves the pool and returns
                write_atomic(pool, pool_file(addrs[:2], 10))
                time.sleep(2)
                write_atomic(pool, pool_file(addrs, 10))
                log("chaos: a server left the pool and came back")

    samples = []

    def sampler():
        while time.time() < stop:
            try:
                _, page = http_call(mhost, int(mport), "GET", "/metrics", timeout=10)
                series = sum(1 for l in page.decode().splitlines() if l and not l.startswith("#"))
            except OSError:
                series = -1
            samples.append((time.time(), rss_mb(epp.pid), series, epp.poll()))
            time.sleep(2)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    threads += [threading.Thread(target=chaos), threading.Thread(target=sampler)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0

    total = sum(counts.values())
    by_what = {}
    for (what, status), n in sorted(counts.items(), key=lambda x: str(x)):
        by_what.setdefault(what, []).append(f"{status}x{n}")
    log(f"{total} requests in {elapsed:.0f} s ({total / elapsed:.0f}/s) through both body modes")
    for what, s in sorted(by_what.items()):
        log(f"  {what:16} {' '.join(s)}")
    warm = [s for s in samples if s[0] - t0 > min(30, DURATION / 4)]
    rss0 = warm[0][1] if warm else samples[0][1]
    rss_max = max(s[1] for s in samples)
    series_max = max(s[2] for s in samples)
    log(f"EPP RSS: {samples[0][1]:.1f} MiB at start, {rss0:.1f} warmed up, {rss_max:.1f} max, {samples[-1][1]:.1f} at the end")
    log(f"EPP metric series: max {series_max}")
    failures = []
    if epp.poll() is not None or any(s[3] is not None for s in samples):
        failures.append("the EPP exited")
    if rss_max - rss0 > RSS_BOUND_MB:
        failures.append(f"RSS grew {rss_max - rss0:.1f} MiB after warm-up (bound {RSS_BOUND_MB})")
    if series_max > SERIES_BOUND:
        failures.append(f"{series_max} metric series (bound {SERIES_BOUND})")
    if bad:
        failures.append(f"non-HTTP answers: {bad}")
    # A request in flight to a server that was killed or cut off may get the gateway's 503;
    # any other gateway 5xx is one nobody chose.
    unexplained = [g for g in gateway_5xx
                   if not any(g[0] <= w1 + 3 and g[1] >= w0 for w0, w1 in windows)]
    log(f"gateway 5xx: {len(gateway_5xx)}, {len(gateway_5xx) - len(unexplained)} during a kill or partition")
    if unexplained:
        failures.append(f"{len(unexplained)} gateway 5xx outside any fault window: {unexplained[:3]}")

    five = sum(n for (w, s), n in counts.items() if isinstance(s, str) and s.startswith("500"))
    log(f"500s: {five}")
    if failures:
        log("SOAK FAILED: " + "; ".join(failures))
        return 1
    log("SOAK PASSED")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        for n in NETNS:
            netns_remove(n)
        for p in procs:
            try:
                p.kill()
            except OSError:
                pass
    sys.exit(code)
