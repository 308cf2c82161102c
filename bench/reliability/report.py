#!/usr/bin/env python3
"""Writes the figures of docs/reliability.md from the committed results.

    report.py [--doc docs/reliability.md]

Reads fuzz/results.txt and bench/results/{reliability-flap,reliability-idle,reliability-soak,
fanout}.json, and replaces each block between `<!-- generated:NAME -->` and
`<!-- /generated:NAME -->` in the document with what those files say. Text outside the blocks
is left alone. A results file that is missing leaves its block saying so."""

import argparse
import json
import os
import re
import statistics
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def load(name):
    path = os.path.join(ROOT, "bench", "results", name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def n(x):
    return f"{x:,}"


def fuzz_block():
    """The longest run of each target in fuzz/results.txt."""
    path = os.path.join(ROOT, "fuzz", "results.txt")
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return "No fuzz results yet: run `fuzz/run.sh`.\n"
    best = {}
    when = None
    crashed = set()
    for line in lines:
        if line.startswith("# 20"):
            when = line[2:].split(",")[0]
            continue
        m = re.match(r"^(\S+)\s+(\d+) execs\s+(\d+)s\s+corpus\s+(\d+)\s+(\S+)$", line)
        if not m:
            continue
        target, execs, secs, corpus, status = m.groups()
        row = (int(execs), int(secs), int(corpus), when, status)
        if status != "ok":
            crashed.add(target)
            best[target] = row
        elif target not in crashed and (target not in best or row[0] > best[target][0]):
            best[target] = row
    out = ["| target | executions (longest run) | seconds | corpus grown to | run | result |",
           "|---|---|---|---|---|---|"]
    for target in sorted(best):
        execs, secs, corpus, when, status = best[target]
        mark = "" if execs >= 10_000_000 else " (short of 10^7)"
        out.append(f"| `{target}` | {n(execs)}{mark} | {secs} | {n(corpus)} | {when} | {status} |")
    short = [t for t, v in best.items() if v[0] < 10_000_000]
    out.append("")
    out.append(f"{len(best)} targets; {len(best) - len(short)} past 10^7 executions"
               + (f"; short of it: {', '.join(f'`{t}`' for t in sorted(short))}" if short else "")
               + (f"; **crashed: {', '.join(sorted(crashed))}**" if crashed else "; no crash")
               + ".")
    return "\n".join(out) + "\n"


def flap_block():
    d = load("reliability-flap.json")
    if not d:
        return "No results yet: run `bench/reliability/flap.py`.\n"
    a = d["answers"]
    answers = ", ".join(f"{n(v)} `{k}`" for k, v in sorted(a.items(), key=lambda kv: -kv[1]))
    b, f = d["before"], d["after"]
    return (
        f"Last run: {n(d['calls'])} calls in {d['seconds']:.0f} s, every one answered ({answers}); "
        f"{d['failed_calls']} failed calls, {len(d['unexpected_answers'])} unexpected answers. "
        f"{d['partner_outages']} outages; the breaker opened {d['breaker_opened']} times and closed "
        f"{d['breaker_closed']}. The partner saw {n(d['partner_requests'])} requests, at most "
        f"{d['partner_max_per_second']} in one second (quota {d['quota_per_second']}/s; the "
        f"limiter's bound is a full bucket plus a second's refill, {2 * d['quota_per_second']}). "
        f"Descriptors, threads and open app connections before and after: "
        f"{b['fds']}/{b['threads']}/{int(b['open_connections'])} and "
        f"{f['fds']}/{f['threads']}/{int(f['open_connections'])}. "
        f"Checks: {'all passed' if d['ok'] else 'FAILED: ' + ', '.join(k for k, v in d['checks'].items() if not v)}.\n")


def idle_block():
    d = load("reliability-idle.json")
    if not d:
        return "No results yet: run `bench/reliability/idle.py`.\n"
    rounds = d["rounds"]
    out = ["| round | p99 without idle connections | p99 with them | ratio | opened in | resident set with them |",
           "|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds, 1):
        out.append(f"| {i} | {r['baseline']['p99_ms']} ms | {r['with_idle']['p99_ms']} ms | "
                   f"{r['p99_ratio']} | {r['opened_in_s']} s | {r['rss_kib_with_idle'] // 1024} MiB |")
    ratios = [r["p99_ratio"] for r in rounds]
    out.append("")
    out.append(f"{n(d['idle_connections'])} idle connections, median p99 ratio "
               f"{statistics.median(ratios)} (goal: at most 2); every sampled idle connection alive: "
               f"{', '.join(r['idle_sample_alive'] for r in rounds)}. "
               f"Checks: {'all passed' if d.get('ok', True) else 'FAILED'}.")
    return "\n".join(out) + "\n"


def soak_block():
    d = load("reliability-soak.json")
    if not d:
        return "No results yet: run `bench/reliability/soak.py`.\n"
    lat = d.get("latency_ms", {})
    fl = d["flat"]
    checks = d["checks"]
    out = [
        "| measure | value |", "|---|---|",
        f"| load | {d['seconds'] // 60} min at {n(d['rate'])} calls/s offered on {d['connections']} keep-alive connections; {n(d['calls'])} calls, {d['rps']:,.0f} calls/s held |",
        f"| answers | {', '.join(f'{n(v)} × {k}' for k, v in d['codes'].items())}; errors: {sum(d['errors'].values()) if d['errors'] else 0} |",
        f"| latency p50 / p99 / p99.9 | {lat.get('p50')} / {lat.get('p99')} / {lat.get('p99.9')} ms |",
        f"| configuration edits applied | {d['edits']} ({d['revisions_seen']} distinct revisions sampled) |",
        f"| credential rotations | {d['rotations']}; {n(d['probes'])} probes, {len(d['wrong_probes'])} with a stale or missing credential |",
        f"| resident set, first third → last third (median) | {fl['rss_kib'][0] / 1024:.1f} → {fl['rss_kib'][1] / 1024:.1f} MiB |",
        f"| open descriptors, first third → last third | {fl['fds'][0]:.0f} → {fl['fds'][1]:.0f} |",
        f"| runtime tasks, first third → last third | {fl['tasks'][0]:.0f} → {fl['tasks'][1]:.0f} |",
        f"| idle before → after the load (descriptors, tasks, resident set) | {d['idle_before']['fds']}, {d['idle_before']['tasks']}, {d['idle_before']['rss_kib'] // 1024} MiB → {d['idle_after']['fds']}, {d['idle_after']['tasks']}, {d['idle_after']['rss_kib'] // 1024} MiB |",
        f"| checks | {'all passed' if d['ok'] else 'FAILED: ' + ', '.join(k for k, v in checks.items() if not v)} |",
        "",
        "The series, one sample every 5 minutes (every 10 s in the results file):",
        "",
        "| minute | resident set | descriptors | tasks | open app connections | calls so far |",
        "|---|---|---|---|---|---|",
    ]
    series = d["series"]
    step = max(1, round(300 / max(1.0, series[1]["t"] - series[0]["t"]))) if len(series) > 1 else 1
    for s in series[::step] + ([series[-1]] if series and (len(series) - 1) % step else []):
        out.append(f"| {s['t'] / 60:.0f} | {s['rss_kib'] / 1024:.1f} MiB | {s['fds']} | {s['tasks']} | "
                   f"{s['open_connections']} | {n(s['requests'])} |")
    return "\n".join(out) + "\n"


def fanout_block():
    d = load("fanout.json")
    if not d:
        return "No results yet: run `cargo bench -p tollgate-operator --bench fanout`.\n"
    f, j = d["fanout_ms"], d["join_leave_cpu_ms"]
    rows = [
        "| measure | value |", "|---|---|",
        f"| kill-switch fan-out, catalog update to each sidecar's apply, p50 / p99 / max | {f['p50']:,} ms / {f['p99']:,} ms / {f['max']:,} ms |",
        f"| the last of {n(d['streams'])} streams to apply a flip, median over flips | {f['last_stream_p50']:,} ms |",
    ]
    if "per_flip_last_ms" in f:
        rows.append(f"| the last stream to apply, each flip | {' / '.join(f'{x:,.0f}' for x in f['per_flip_last_ms'])} ms |")
    if "redivide_after_leave_ms" in d:
        rows.append(f"| {d.get('churn', 50)} pods leaving at once: until every other stream applied its next snapshot (the new count of sidecars; the shares follow once the leavers' leases end) | {d['redivide_after_leave_ms']:,} ms |")
    if "operator_cpu_ms_per_flip" in d:
        rows.append(f"| operator CPU per flip (all streams) | {d['operator_cpu_ms_per_flip']} ms |")
    rows += [
        f"| {n(d['streams'])} streams subscribing (TokenReview, first snapshot) | {d['subscribe_all_s']} s |",
        f"| operator memory per stream (resident set after minus before, / streams) | {d['operator_kib_per_stream']} KiB |",
        f"| operator CPU per pod joining and leaving: {j['few']} streams × 1 integration / {j['few']} × {d['integrations']} / {n(d['streams'])} × {d['integrations']} | {j['streams_few_integrations_1']} ms / {j['streams_few_integrations_all']} ms / {j['streams_all_integrations_all']} ms |",
        "",
        f"{n(d['streams'])} streams, {d['integrations']} integrations, {d['flips']} kill-switch flips; goal p99 under 1 s: "
        + ("met." if f["p99"] < 1000 else f"missed ({f['p99']:,} ms)."),
    ]
    return "\n".join(rows) + "\n"


BLOCKS = {"fuzz": fuzz_block, "flap": flap_block, "idle": idle_block, "soak": soak_block,
          "fanout": fanout_block}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "reliability.md"))
    a = ap.parse_args()
    text = open(a.doc).read()
    for name, fn in BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            print(f"report: no block '{name}' in {a.doc}", file=sys.stderr)
            return 1
        body = fn()
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    with open(a.doc, "w") as f:
        f.write(text)
    print(f"report: {a.doc} written ({', '.join(BLOCKS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
