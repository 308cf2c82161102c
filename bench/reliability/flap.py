#!/usr/bin/env python3
"""A partner that flaps (up 2 s, down 2 s) under load through the sidecar.

    flap.py SIDECAR_BINARY [--seconds 300] [--rate 400] [--out FILE]

Checks, and writes as JSON: every app call got an answer (no hang, no reset): the partner's
200, or the sidecar's 502 upstream-unreachable / 503 circuit-open / 429 rate-limited; the
breaker opened and closed again (tollgate_circuit_state sampled every 50 ms); the partner
never saw more than the quota (100 per second, below the offered rate): at most 100 x seconds
+ 100 in all, and in any one-second window at most a full bucket plus a second's refill
(200, the bound of the limiter's GCRA); and the sidecar's open descriptors, threads and open app connections are
back where they started once the load stops (no leak). Exits non-zero when a check fails."""

import argparse
import json
import sys
import threading
import time
from collections import Counter

from common import Conn, Partner, Sidecar, MANIFEST, metric, raise_nofile

QUOTA_PER_S = 100
SPEC = f"""  timeouts: {{request: 1s, total: 2s}}
  retries: {{maxAttempts: 1}}
  rateLimit:
    limits: [{{name: burst, requests: {QUOTA_PER_S}, per: 1s}}]
  circuitBreaker:
    window: 10s
    minimumRequests: 10
    failureRatePercent: 50
    consecutiveFailures: 5
    openDuration: 1s
    halfOpenProbes: 2
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sidecar")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--rate", type=int, default=400)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--out")
    a = ap.parse_args()
    raise_nofile(65536)
    partner = Partner()
    sidecar = Sidecar(a.sidecar, MANIFEST.format(port=partner.port, extra=SPEC))
    # Partner requests per second, from its own counter.
    per_second = []
    answers = Counter()
    failures = []
    states = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker():
        period = a.threads / a.rate
        c = None
        nxt = time.perf_counter()
        while not stop.is_set():
            nxt += period
            d = nxt - time.perf_counter()
            if d > 0:
                time.sleep(d)
            try:
                if c is None:
                    c = Conn(sidecar.listen, timeout=10)
                status, body = c.call("/v1/charges")
            except OSError as e:
                with lock:
                    failures.append(repr(e))
                c = None
                continue
            reason = "partner"
            if status != 200:
                try:
                    reason = json.loads(body)["error"]["reason"]
                except (ValueError, KeyError, TypeError):
                    reason = "?"
            with lock:
                answers[f"{status} {reason}"] += 1

    downs = []

    def flapper():
        up = True
        while not stop.wait(2.0):
            if up:
                partner.down()
                downs.append(time.time())
            else:
                partner.up()
            up = not up
        if not up:
            partner.up()

    def sampler():
        last = partner.requests
        tick = time.time()
        while not stop.is_set():
            time.sleep(0.05)
            try:
                states.append(int(metric(sidecar.metrics(), "tollgate_circuit_state")))
            except OSError:
                pass
            elapsed = time.time() - tick
            if elapsed >= 1.0:
                now = partner.requests
                per_second.append((now - last, elapsed))
                last, tick = now, time.time()

    # Before: after a short warm-up so the pools exist.
    c = Conn(sidecar.listen)
    for _ in range(20):
        c.call("/warm")
    c.close()
    time.sleep(1)
    before = {"fds": sidecar.fds(), "threads": sidecar.threads(),
              "open_connections": metric(sidecar.metrics(), "tollgate_open_connections")}
    threads = [threading.Thread(target=worker) for _ in range(a.threads)]
    threads += [threading.Thread(target=flapper), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    time.sleep(a.seconds)
    stop.set()
    for t in threads:
        t.join()
    # After: the load's connections are closed; give the sidecar a moment to see them go.
    deadline = time.time() + 15
    while time.time() < deadline:
        after = {"fds": sidecar.fds(), "threads": sidecar.threads(),
                 "open_connections": metric(sidecar.metrics(), "tollgate_open_connections")}
        if after["fds"] <= before["fds"] + 2 and after["open_connections"] <= before["open_connections"]:
            break
        time.sleep(0.2)
    opens = sum(1 for x, y in zip(states, states[1:]) if y == 2 and x != 2)
    closes = sum(1 for x, y in zip(states, states[1:]) if y == 0 and x != 0)
    sidecar.stop()
    allowed = {"200 partner", "502 upstream-unreachable", "503 circuit-open", "429 rate-limited"}
    odd = {k: v for k, v in answers.items() if k not in allowed}
    out = {
        "seconds": a.seconds, "offered_rate": a.rate, "quota_per_second": QUOTA_PER_S,
        "calls": sum(answers.values()), "answers": dict(answers), "failures": failures[:20],
        "failed_calls": len(failures), "unexpected_answers": odd,
        "partner_outages": len(downs), "breaker_opened": opens, "breaker_closed": closes,
        "partner_max_per_second": max([n for n, _ in per_second] or [0]),
        "states": "".join(str(x) for x in states)[:400], "partner_requests": partner.requests,
        "before": before, "after": after,
    }
    checks = {
        "every call answered": not failures and not odd,
        # Each outage opens it, each recovery closes it (the last outage may end the run).
        "breaker opened and closed": opens >= len(downs) - 1 and closes >= len(downs) - 1
        and opens >= 1,
        "partner within quota": partner.requests <= QUOTA_PER_S * (a.seconds + 1) + 20
        and all(n <= QUOTA_PER_S * (1 + dt) for n, dt in per_second),
        "no leaked descriptors": after["fds"] <= before["fds"] + 2,
        "no leaked connections": after["open_connections"] <= before["open_connections"],
        "no leaked threads": after["threads"] <= before["threads"],
    }
    out["checks"] = checks
    out["ok"] = all(checks.values())
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    partner.down()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
