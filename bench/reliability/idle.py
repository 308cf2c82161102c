#!/usr/bin/env python3
"""10,000 idle connections held open against the sidecar: the latency of calls on another
connection, against the same calls with no idle connection, in the same run.

    idle.py SIDECAR_BINARY [--idle N] [--calls N] [--out FILE]

Phases, each with the same sidecar, partner and client: `baseline` (no idle connection), then
`idle` (N connections opened, each making one call and then holding its connection silent),
then the idle connections' own state (how many the sidecar still holds). Each phase makes
`--calls` sequential calls on one keep-alive connection, after a warm-up. Writes JSON: p50,
p99, max per phase, the p99 ratio, the sidecar's fds and RSS, and how many idle connections
were still open at the end."""

import argparse
import json
import sys
import time

from common import Conn, Partner, Sidecar, MANIFEST, metric, percentile, raise_nofile


def measure(sidecar, calls):
    c = Conn(sidecar.listen)
    for _ in range(200):
        c.call("/warm")
    lat = []
    for _ in range(calls):
        t = time.perf_counter()
        status, _ = c.call("/v1/charges")
        lat.append((time.perf_counter() - t) * 1000.0)
        if status != 200:
            raise RuntimeError(f"call answered {status}")
    c.close()
    return {
        "calls": calls,
        "p50_ms": round(percentile(lat, 50), 3),
        "p99_ms": round(percentile(lat, 99), 3),
        "max_ms": round(max(lat), 3),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sidecar")
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    raise_nofile(a.idle * 2 + 4096)
    partner = Partner()
    # Idle connections must outlive the default 10 s head timeout for the length of the run.
    sidecar = Sidecar(a.sidecar, MANIFEST.format(port=partner.port, extra=""),
                      ["--max-connections", str(a.idle + 1024), "--header-read-timeout", "10m"])
    out = {"idle_connections": a.idle, "rounds": []}
    try:
        out["fds_before"] = sidecar.fds()
        out["rss_kib_before"] = sidecar.rss_kib()
        idle = []
        # Alternate: baseline, hold the idle connections, measure, let them go; several rounds,
        # so a machine busy with other work shows in both phases alike.
        for r in range(a.rounds):
            base = measure(sidecar, a.calls)
            t = time.time()
            for _ in range(a.idle):
                c = Conn(sidecar.listen)
                c.call("/open")
                idle.append(c)
            opened_s = round(time.time() - t, 1)
            held = metric(sidecar.metrics(), "tollgate_open_connections")
            loaded = measure(sidecar, a.calls)
            rnd = {"baseline": base, "with_idle": loaded, "opened_in_s": opened_s,
                   "sidecar_open_connections": held, "fds_with_idle": sidecar.fds(),
                   "rss_kib_with_idle": sidecar.rss_kib()}
            # Still open and usable: one call on a sample of them.
            alive = 0
            for c in idle[:: max(1, a.idle // 100)]:
                try:
                    if c.call("/still")[0] == 200:
                        alive += 1
                except OSError:
                    pass
            rnd["idle_sample_alive"] = f"{alive}/{len(idle[:: max(1, a.idle // 100)])}"
            for c in idle:
                c.close()
            idle = []
            rnd["p99_ratio"] = round(loaded["p99_ms"] / base["p99_ms"], 2)
            out["rounds"].append(rnd)
            print(json.dumps(rnd), flush=True)
        ratios = sorted(r["p99_ratio"] for r in out["rounds"])
        out["p99_ratio_median"] = ratios[len(ratios) // 2]
        out["goal"] = "p99 with idle connections within 2x of the p99 without"
        out["met"] = out["p99_ratio_median"] <= 2.0
        time.sleep(1)
        out["fds_after"] = sidecar.fds()
        out["rss_kib_after"] = sidecar.rss_kib()
    finally:
        sidecar.stop()
        partner.down()
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0 if out["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
