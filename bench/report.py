"""Writes the generated part of docs/benchmarks.md from one results file.

Only the text between the BEGIN/END markers is replaced; the rest of the page (method notes,
the profile and what it changed) is kept as written.
"""

import os

BEGIN = "<!-- BEGIN GENERATED: bench/run.sh rewrites this part -->"
END = "<!-- END GENERATED -->"


def us(x):
    return "n/a" if x is None else f"{x:.0f}"


def f2(x):
    return "n/a" if x is None else f"{x:.2f}"


def sp(s, fmt=us):
    """median (min–max)."""
    if not s or s.get("median") is None:
        return "n/a"
    lo, hi = s["min_max"]
    return f"{fmt(s['median'])} ({fmt(lo)}–{fmt(hi)})"


def med(s):
    return None if not s else s.get("median")


def verdict(ok):
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def generated(r, name):
    m = r["machine"]
    c = r["config"]
    cases = r["cases"]
    out = []
    w = out.append
    w(f"Results file: `bench/results/{name}` ({'quick' if c['quick'] else 'full'} run, "
      f"{c['runs']} run(s) per case, {c['duration_s']} s per fixed-rate run, {r['elapsed_s'] / 60:.1f} min in all).")
    w("")
    w("### Machine")
    w("")
    w(f"- {m['nproc']} cores, {m['cpu_model']}, {m['mem_gib']} GiB, kernel {m['kernel']}")
    la = ", ".join(f"{x:.1f}" for x in m["load_avg_start"])
    le = ", ".join(f"{x:.1f}" for x in m.get("load_avg_end", []))
    w(f"- load average at start {la}, at end {le} (the machine is shared: other builds ran alongside)")
    w(f"- {m['haproxy']}; {m['nginx']}; {m['oha']}; {m['rustc']}; sidecar at `{m['sidecar_commit']}`")
    w(f"- proxy under test pinned to core {c['proxy_cpu']}; oha and the partner pinned to core {c['load_cpu']}; "
      f"every bench process scheduled `{c.get('sched', 'none')}` (see bench/README.md)")
    w("")
    w("Cells are the median over runs, with (min–max) across runs. \"Added\" is the proxy's percentile minus the "
      "direct percentile of the same round; ratios are taken inside each round, then the median.")
    w("")

    goals = []
    lat = cases.get("latency")
    if lat:
        w("### 1. Added latency at fixed rates (µs, 1 KiB responses, keep-alive, 32 connections, open loop)")
        w("")
        for rate, block in lat.items():
            s = block["summary"]
            w(f"**{int(rate):,} req/s**")
            w("")
            w("| target | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 | failed |")
            w("|---|---|---|---|---|---|---|---|")
            for t, e in s.items():
                w(f"| {t} | {sp(e['p50'])} | {sp(e['p99'])} | {sp(e['p99_9'])} | "
                  f"{sp(e.get('added_p50'))} | {sp(e.get('added_p99'))} | {sp(e.get('added_p99_9'))} | {e['non_2xx_or_error']} |")
            w("")
            tg = s["tollgate"]
            w("| Tollgate added latency ÷ peer's | p50 | p99 | p99.9 |")
            w("|---|---|---|---|")
            for peer in ("haproxy", "nginx"):
                w(f"| vs {peer} | {sp(tg.get(f'added_p50_vs_{peer}'), f2)} | {sp(tg.get(f'added_p99_vs_{peer}'), f2)} | {sp(tg.get(f'added_p99_9_vs_{peer}'), f2)} |")
            w("")
        one = lat.get("1000", {}).get("summary")
        if one:
            tg = one["tollgate"]
            a50 = med(tg.get("added_p50"))
            r50 = med(tg.get("added_p50_vs_haproxy"))
            r99 = med(tg.get("added_p99_vs_haproxy"))
            goals.append(("Added p50 at 1k req/s ≤ 100 µs", f"{us(a50)} µs", None if a50 is None else a50 <= 100))
            goals.append(("Added p50 at 1k req/s ≤ 1.2× HAProxy's", f"{f2(r50)}×", None if r50 is None else r50 <= 1.2))
            goals.append(("Added p99 at 1k req/s ≤ 1.5× HAProxy's", f"{f2(r99)}×", None if r99 is None else r99 <= 1.5))

        w("### 3. Full policy stack against pass-through (same rounds as case 1)")
        w("")
        w("Two quota bands far above the offered rate, breaker, retry (3 attempts), timeouts, a credential, "
          f"a pinned header, spans exported over OTLP/HTTP to a local sink ({cases.get('otlp_batches_received', 0)} export batches received).")
        w("")
        w("| rate | pass-through p50 | full p50 | full ÷ pass-through p50 | p99 | added p50 full ÷ pass-through |")
        w("|---|---|---|---|---|---|")
        for rate, block in lat.items():
            s = block["summary"]
            f = s["tollgate-full"]
            w(f"| {int(rate):,}/s | {sp(s['tollgate']['p50'])} | {sp(f['p50'])} | {sp(f.get('p50_vs_passthrough'), f2)} | "
              f"{sp(f.get('p99_vs_passthrough'), f2)} | {sp(f.get('added_p50_vs_passthrough'), f2)} |")
        w("")
        if one:
            fr = med(one["tollgate-full"].get("p50_vs_passthrough"))
            goals.append(("Full stack ≤ +10% p50 over pass-through (1k req/s, end to end)", f"{f2(fr)}×", None if fr is None else fr <= 1.10))

    peak = cases.get("peak")
    if peak:
        s = peak["summary"]
        w("### 2. Peak throughput, proxy pinned to one core (closed loop, 64 connections)")
        w("")
        w("| target | req/s | proxy core busy | req per proxy CPU-second | failed |")
        w("|---|---|---|---|---|")
        for t, e in s.items():
            util = sp(e.get("proxy_cpu_util"), lambda x: f"{x * 100:.0f}%") if "proxy_cpu_util" in e else "—"
            w(f"| {t} | {sp(e['rps'])} | {util} | {sp(e.get('req_per_cpu_s')) if 'req_per_cpu_s' in e else '—'} | {e['non_2xx_or_error']} |")
        w("")
        tg = s["tollgate"]
        w("| Tollgate ÷ peer | req/s | req per CPU-second |")
        w("|---|---|---|")
        for peer in ("haproxy", "nginx"):
            w(f"| vs {peer} | {sp(tg.get(f'rps_vs_{peer}'), f2)} | {sp(tg.get(f'req_per_cpu_s_vs_{peer}'), f2)} |")
        w("")
        w("`direct` is the ceiling of the load generator and partner sharing their core; a proxy whose core is not "
          "near 100% busy was limited by that side, not by itself, so req per CPU-second is the fairer capacity figure.")
        w("")
        for peer in ("haproxy", "nginx"):
            rr = med(tg.get(f"rps_vs_{peer}"))
            goals.append((f"One-core throughput ≥ 0.8× {peer}", f"{f2(rr)}× (req/s), {f2(med(tg.get(f'req_per_cpu_s_vs_{peer}')))}× (per CPU-s)", None if rr is None else rr >= 0.8))

    res = cases.get("resources")
    if res:
        s = res["summary"]
        w(f"### 4. Memory and CPU ({res['connections']} connections, {res['rate']:,} req/s)")
        w("")
        w("| target | RSS idle (MiB) | RSS under load, max (MiB) | CPU s per 1k requests | failed |")
        w("|---|---|---|---|---|")
        for t, e in s.items():
            w(f"| {t} | {e['rss_idle_mib']:.1f} | {sp(e['rss_load_mib'], lambda x: f'{x:.1f}')} | {sp(e['cpu_s_per_1k'], lambda x: f'{x:.4f}')} | {e['non_2xx_or_error']} |")
        w("")
        tg = s["tollgate"]
        w(f"Tollgate CPU per request ÷ HAProxy's: {sp(tg.get('cpu_vs_haproxy'), f2)}; ÷ nginx's: {sp(tg.get('cpu_vs_nginx'), f2)}. "
          "nginx is counted as master + worker.")
        w("")
        idle = tg["rss_idle_mib"]
        load = med(tg["rss_load_mib"])
        goals.append(("RSS idle ≤ 10 MiB", f"{idle:.1f} MiB", idle <= 10))
        goals.append(("RSS under load ≤ 20 MiB", f"{f2(load)} MiB", None if load is None else load <= 20))

    rl = cases.get("rate_limit")
    if rl:
        s = rl["summary"]
        w(f"### 5. Twice the quota offered ({s['offered_per_s']}/s against {s['quota_per_s']}/s)")
        w("")
        w("| unloaded p99 (µs) | admitted p99 (µs) | admitted ÷ unloaded p99 | 429 p50 / p99 (µs) | share answered 429 | admitted per s | other failures |")
        w("|---|---|---|---|---|---|---|")
        w(f"| {sp(s['unloaded_p99_us'])} | {sp(s['admitted_p99_us'])} | {sp(s['admitted_p99_vs_unloaded'], f2)} | "
          f"{us(med(s['rejected_p50_us']))} / {us(med(s['rejected_p99_us']))} | {sp(s['share_429'], f2)} | {sp(s['admitted_per_s'])} | {s['other_failures']} |")
        w("")
        w("Unloaded = the same sidecar offered exactly its quota. The quota's burst band holds one second of tokens, "
          "so the first second admits up to twice the rate.")
        w("")
        ar = med(s["admitted_p99_vs_unloaded"])
        goals.append(("Issue: admitted p99 at 2× quota within 1.2× of unloaded", f"{f2(ar)}×", None if ar is None else ar <= 1.2))

    rv = cases.get("reload")
    if rv:
        s = rv["summary"]
        w(f"### 6. A new revision every second under {s['rate']:,} req/s")
        w("")
        w("| requests | revisions applied | failed | p99 (µs) |")
        w("|---|---|---|---|")
        w(f"| {s['requests']:,} | {s['revisions_applied']} | {s['failed']} | {sp(s['p99_us'])} |")
        w("")
        goals.append(("Issue: zero failed requests across revisions", f"{s['failed']} failed", s["failed"] == 0))

    w("### Goals")
    w("")
    w("| goal | this run | |")
    w("|---|---|---|")
    for g, v, ok in goals:
        w(f"| {g} | {v} | {verdict(ok)} |")
    w("")
    return "\n".join(out)


SKELETON = """# Benchmarks

{begin}
{end}
"""


def write(results, path, name):
    if os.path.exists(path):
        with open(path) as f:
            page = f.read()
    else:
        page = SKELETON.format(begin=BEGIN, end=END)
    if BEGIN not in page or END not in page:
        page = page.rstrip("\n") + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page = head + BEGIN + "\n\n" + generated(results, name) + "\n" + END + tail
    with open(path, "w") as f:
        f.write(page)
