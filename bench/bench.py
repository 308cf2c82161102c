#!/usr/bin/env python3
"""Tollgate benchmarks: the sidecar's cost against HAProxy and nginx, in the same run.

Started by bench/run.sh, which installs the tools and builds the sidecar first. Standard
library only. Every load loop is bounded in time (oha -z) and aimed at loopback only.

Layout of one run:
  core PROXY_CPU : the proxy under test (Tollgate, HAProxy or nginx), nothing else
  core LOAD_CPU  : the load generator (oha) and the partner (nginx, one worker)
Cases are interleaved round by round (direct, tollgate, tollgate-full, haproxy, nginx, then
again), so a burst of noise from other work on the machine hits every peer alike, and every
comparison is a ratio inside one round.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
CONF = os.path.join(BENCH, "conf")
RESULTS = os.path.join(BENCH, "results")
DOC = os.path.join(REPO, "docs", "benchmarks.md")

PROXY_CPU = "1"
LOAD_CPU = "0"
# Scheduling of every process of the bench (proxies, partner, oha), the same for all peers.
# On a machine shared with builds, the default policy measures the run queue: a proxy woken
# behind three compilers on its core puts milliseconds into every percentile. "fifo" (the
# default as root) runs them SCHED_FIFO at priority 1, so they preempt other work at once; the
# kernel's real-time throttling still leaves 5% of each core to everything else, and every
# load loop is bounded. BENCH_SCHED=nice uses nice -10, BENCH_SCHED=none changes nothing.
SCHED = os.environ.get("BENCH_SCHED", "fifo" if os.geteuid() == 0 else "none")


def prio(argv):
    """argv under the bench's scheduling (chrt and nice exec: the pid stays the program's)."""
    if SCHED == "fifo":
        return ["chrt", "-f", "1"] + argv
    if SCHED == "nice":
        return ["nice", "-n", "-10"] + argv
    return argv


PORTS = {
    "partner_port": 19081,
    "otlp_port": 19082,
    "tollgate": 19080,
    "tollgate_admin": 19090,
    "tollgate_full": 19085,
    "tollgate_full_admin": 19095,
    "tollgate_limited": 19086,
    "tollgate_limited_admin": 19096,
    "tollgate_reload": 19087,
    "tollgate_reload_admin": 19097,
    "haproxy": 19083,
    "nginx": 19084,
}
HOST = "partner.bench"
BODY_BYTES = 1024
RATE_LIMIT = 500  # case 5: the quota (requests per second); twice this is offered

# name -> (port, description)
TARGETS = {
    "direct": "the partner itself, no proxy",
    "tollgate": "Tollgate, pass-through integration (just `upstream`)",
    "tollgate-full": "Tollgate, full policy stack, spans exported",
    "haproxy": "HAProxy, nbthread 1",
    "nginx": "nginx, 1 worker",
}
PEERS = ["tollgate", "haproxy", "nginx"]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fill(template, values):
    """Replaces {name} for the names given; leaves every other brace alone."""
    return re.sub(
        r"\{(\w+)\}",
        lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0),
        template,
    )


def render(name, dest, **extra):
    with open(os.path.join(CONF, name)) as f:
        text = f.read()
    values = dict(PORTS)
    values.update(extra)
    with open(dest, "w") as f:
        f.write(fill(text, values))
    return dest


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# === processes ===


class Proc:
    """A process this bench started, pinned to one core; stopped by its own pid only."""

    def __init__(self, name, argv, cpu, run_dir, env=None):
        self.name = name
        self.log_path = os.path.join(run_dir, f"{name}.log")
        self.log = open(self.log_path, "w")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.p = subprocess.Popen(
            prio(["taskset", "-c", cpu] + argv),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
        self.pid = self.p.pid  # taskset execs the program: same pid

    def pids(self):
        """This process and its children (nginx's worker)."""
        out = [self.pid]
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
        return out

    def rss_kib(self):
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    def cpu_seconds(self):
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                # utime, stime: fields 14 and 15 of stat(5); here offset by the 2 before ")"
                total += (int(fields[11]) + int(fields[12])) / tick
            except OSError:
                pass
        return total

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def wait_port(port, timeout=20.0, host_header=None, path="/"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            if host_header:
                req.add_header("Host", host_header)
            with urllib.request.urlopen(req, timeout=2) as r:
                r.read()
                return r.status
        except Exception as e:  # noqa: BLE001 - any failure means not up yet
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not answering: {last}")


def ports_free():
    """Refuses to start over a leftover process: its answers would be measured instead."""
    import socket

    for name, port in PORTS.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(f"127.0.0.1:{port} ({name}) is already in use; stop what listens there")


# === load ===


def oha(port, duration, rate=None, conns=32, stats_breakdown=False):
    """One bounded oha run against 127.0.0.1:port with Host: partner.bench. Returns a summary."""
    argv = prio([
        "taskset", "-c", LOAD_CPU, OHA,
        "--no-tui", "--output-format", "json", "--worker-threads", "1",
        "-z", f"{duration}s", "-w", "-c", str(conns),
        "-t", "10s", "--host", HOST,
    ])
    if rate:
        argv += ["-q", str(rate), "--latency-correction"]
    if stats_breakdown:
        argv += ["--stats-success-breakdown"]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed ({out.returncode}): {out.stderr[-2000:]}")
    j = json.loads(out.stdout)
    pct = j["latencyPercentiles"]
    codes = {k: v for k, v in j.get("statusCodeDistribution", {}).items()}
    errors = j.get("errorDistribution", {})
    n = sum(codes.values())
    res = {
        "requests": n,
        "rps": j["summary"]["requestsPerSec"],
        "p50_us": pct["p50"] * 1e6,
        "p99_us": pct["p99"] * 1e6,
        "p99_9_us": pct["p99.9"] * 1e6,
        "max_us": j["summary"]["slowest"] * 1e6,
        "codes": codes,
        "errors": errors,
    }
    for key, name in (("latencyPercentilesSuccessful", "ok"), ("latencyPercentilesNotSuccessful", "not_ok")):
        p = j.get(key)
        if p and p.get("p50") is not None:
            res[f"{name}_p50_us"] = p["p50"] * 1e6
            res[f"{name}_p99_us"] = p["p99"] * 1e6
            res[f"{name}_p99_9_us"] = p["p99.9"] * 1e6
    return res


class Background:
    """Runs fn(*args) in a thread (oha is a subprocess: the GIL is free while it runs)."""

    def __init__(self, fn, *args, **kw):
        self._out = {}
        self._t = threading.Thread(target=self._run, args=(fn, args, kw), daemon=True)
        self._t.start()

    def _run(self, fn, args, kw):
        try:
            self._out["ok"] = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - re-raised in result()
            self._out["err"] = e

    def running(self):
        return self._t.is_alive()

    def result(self):
        self._t.join()
        if "err" in self._out:
            raise self._out["err"]
        return self._out["ok"]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    return [min(xs), max(xs)] if xs else None


def stat(xs):
    return {"median": med(xs), "min_max": spread(xs), "runs": xs}


# === the bench ===


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.runs = args.runs or (1 if self.quick else 5)
        self.dur = args.duration or (3 if self.quick else 10)
        self.run_dir = tempfile.mkdtemp(prefix="tollgate-bench-")
        self.procs = {}
        self.results = {"cases": {}}

    # --- setup ---

    def start_all(self):
        ports_free()
        rd = self.run_dir
        body = "x" * BODY_BYTES
        for d in ("partner-body", "proxy-body", "proxy-temp"):
            os.makedirs(os.path.join(rd, d), exist_ok=True)
        cfg = render("nginx-partner.conf", os.path.join(rd, "partner.conf"), run=rd, body=body)
        self.procs["partner"] = Proc("partner", [NGINX, "-c", cfg, "-p", rd, "-e", os.path.join(rd, "partner-error.log")], LOAD_CPU, rd)
        wait_port(PORTS["partner_port"])

        cfg = render("haproxy.cfg", os.path.join(rd, "haproxy.cfg"), run=rd, proxy_port=PORTS["haproxy"])
        self.procs["haproxy"] = Proc("haproxy", [HAPROXY, "-f", cfg, "-db"], PROXY_CPU, rd)
        cfg = render("nginx-proxy.conf", os.path.join(rd, "nginx-proxy.conf"), run=rd, proxy_port=PORTS["nginx"])
        self.procs["nginx"] = Proc("nginx", [NGINX, "-c", cfg, "-p", rd, "-e", os.path.join(rd, "nginx-proxy-error.log")], PROXY_CPU, rd)

        secrets = os.path.join(rd, "secrets", "partner-api")
        os.makedirs(secrets, exist_ok=True)
        with open(os.path.join(secrets, "apiKey"), "w") as f:
            f.write("sk_bench_0123456789abcdef\n")
        self.start_sidecar("tollgate", "tollgate-passthrough.yaml")
        self.start_sidecar(
            "tollgate-full", "tollgate-full.yaml",
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{PORTS['otlp_port']}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": "tollgate-bench",
            },
        )
        self.start_sidecar("tollgate-limited", "tollgate-limited.yaml", limit=RATE_LIMIT)
        self.start_sidecar("tollgate-reload", "tollgate-passthrough.yaml")
        for name in ("haproxy", "nginx", "tollgate", "tollgate-full", "tollgate-limited", "tollgate-reload"):
            wait_port(self.port(name), host_header=HOST)
        time.sleep(1.0)

    def start_sidecar(self, name, template, env=None, **extra):
        rd = self.run_dir
        key = name.replace("-", "_")
        cfg = render(template, os.path.join(rd, f"{name}.yaml"), **extra)
        argv = [
            SIDECAR, "--config", cfg, "--secrets-dir", os.path.join(rd, "secrets"),
            "--listen", f"127.0.0.1:{PORTS[key]}", "--admin", f"127.0.0.1:{PORTS[key + '_admin']}",
        ]
        self.procs[name] = Proc(name, argv, PROXY_CPU, rd, env=env)

    def port(self, target):
        if target == "direct":
            return PORTS["partner_port"]
        return PORTS[target.replace("-", "_")]

    def stop_all(self):
        for name, p in reversed(list(self.procs.items())):
            try:
                p.stop()
            except Exception as e:  # noqa: BLE001
                log(f"stopping {name}: {e}")

    def check_alive(self):
        for name, p in self.procs.items():
            if not p.alive():
                raise RuntimeError(f"{name} exited; see {p.log_path}")

    # --- cases ---

    def measure(self, target, duration, **kw):
        """A run with the proxy's CPU and RSS watched."""
        proc = self.procs.get(target)
        cpu0 = proc.cpu_seconds() if proc else None
        t0 = time.time()
        res = oha(self.port(target), duration, **kw)
        wall = time.time() - t0
        if proc:
            cpu = proc.cpu_seconds() - cpu0
            res["proxy_cpu_s"] = cpu
            res["proxy_cpu_util"] = cpu / wall
            res["proxy_cpu_s_per_1k"] = cpu / res["requests"] * 1000 if res["requests"] else None
            res["proxy_rss_kib"] = proc.rss_kib()
        return res

    def case_latency(self):
        """Cases 1 and 3: added latency at fixed rates; full stack vs pass-through."""
        rates = [1000, 5000]
        targets = ["direct", "tollgate", "tollgate-full", "haproxy", "nginx"]
        raw = {r: {t: [] for t in targets} for r in rates}
        for rnd in range(self.runs):
            for rate in rates:
                for t in targets:
                    oha(self.port(t), 1, rate=rate)  # warm-up: connections, pools
                    res = self.measure(t, self.dur, rate=rate)
                    raw[rate][t].append(res)
                    log(f"latency r{rnd + 1} {rate}/s {t:14s} p50 {res['p50_us']:8.1f}us p99 {res['p99_us']:8.1f}us p99.9 {res['p99_9_us']:8.1f}us codes {res['codes']}")
                self.check_alive()
        out = {}
        for rate in rates:
            per = {}
            for t in targets:
                runs = raw[rate][t]
                entry = {q: stat([r[f"{q}_us"] for r in runs]) for q in ("p50", "p99", "p99_9")}
                entry["non_2xx_or_error"] = sum(bad(r) for r in runs)
                if t != "direct":
                    for q in ("p50", "p99", "p99_9"):
                        entry[f"added_{q}"] = stat([r[f"{q}_us"] - d[f"{q}_us"] for r, d in zip(runs, raw[rate]["direct"])])
                    entry["cpu_s_per_1k"] = stat([r["proxy_cpu_s_per_1k"] for r in runs])
                per[t] = entry
            # Ratios inside each round, then the median over rounds.
            for peer in ("haproxy", "nginx"):
                for q in ("p50", "p99", "p99_9"):
                    per["tollgate"][f"added_{q}_vs_{peer}"] = stat(ratio_runs(raw[rate], "tollgate", peer, q))
            for q in ("p50", "p99", "p99_9"):
                per["tollgate-full"][f"{q}_vs_passthrough"] = stat(
                    [f[f"{q}_us"] / p[f"{q}_us"] for f, p in zip(raw[rate]["tollgate-full"], raw[rate]["tollgate"])]
                )
                per["tollgate-full"][f"added_{q}_vs_passthrough"] = stat(
                    ratio_runs(raw[rate], "tollgate-full", "tollgate", q)
                )
            out[str(rate)] = {"summary": per, "raw": raw[rate]}
        self.results["cases"]["latency"] = out
        self.results["cases"]["otlp_batches_received"] = self.otlp_batches()

    def otlp_batches(self):
        try:
            with open(os.path.join(self.run_dir, "otlp-access.log")) as f:
                return sum(1 for line in f if "POST" in line)
        except OSError:
            return 0

    def case_peak(self):
        """Case 2: closed-loop peak throughput, proxy pinned to one core."""
        targets = ["direct", "tollgate", "tollgate-full", "haproxy", "nginx"]
        runs = max(1, min(self.runs, 3))
        dur = 3 if self.quick else 8
        raw = {t: [] for t in targets}
        for rnd in range(runs):
            for t in targets:
                oha(self.port(t), 1, conns=64)
                res = self.measure(t, dur, conns=64)
                raw[t].append(res)
                util = f" proxy cpu {res['proxy_cpu_util'] * 100:5.1f}%" if "proxy_cpu_util" in res else ""
                log(f"peak r{rnd + 1} {t:14s} {res['rps']:9.0f} req/s{util} codes {res['codes']}")
            self.check_alive()
        per = {}
        for t in targets:
            entry = {"rps": stat([r["rps"] for r in raw[t]])}
            if t != "direct":
                entry["proxy_cpu_util"] = stat([r["proxy_cpu_util"] for r in raw[t]])
                # Requests per second of proxy CPU: the rate one saturated core would carry.
                entry["req_per_cpu_s"] = stat([r["requests"] / r["proxy_cpu_s"] if r["proxy_cpu_s"] else None for r in raw[t]])
            entry["non_2xx_or_error"] = sum(bad(r) for r in raw[t])
            per[t] = entry
        for peer in ("haproxy", "nginx"):
            per["tollgate"][f"rps_vs_{peer}"] = stat([a["rps"] / b["rps"] for a, b in zip(raw["tollgate"], raw[peer])])
            per["tollgate"][f"req_per_cpu_s_vs_{peer}"] = stat(
                [(a["requests"] / a["proxy_cpu_s"]) / (b["requests"] / b["proxy_cpu_s"]) for a, b in zip(raw["tollgate"], raw[peer]) if a["proxy_cpu_s"] and b["proxy_cpu_s"]]
            )
        self.results["cases"]["peak"] = {"summary": per, "raw": raw}

    def case_resources(self):
        """Case 4: RSS idle and under 100 connections; CPU seconds per 1k requests."""
        targets = ["tollgate", "tollgate-full", "haproxy", "nginx"]
        runs = max(1, min(self.runs, 3))
        rate = 5000
        raw = {t: [] for t in targets}
        for rnd in range(runs):
            for t in targets:
                proc = self.procs[t]
                samples = []
                cpu0 = proc.cpu_seconds()
                lg = Background(oha, self.port(t), self.dur, rate=rate, conns=100)
                while lg.running():
                    samples.append(proc.rss_kib())
                    time.sleep(0.25)
                res = lg.result()
                cpu = proc.cpu_seconds() - cpu0
                res["rss_load_max_kib"] = max(samples) if samples else None
                res["proxy_cpu_s_per_1k"] = cpu / res["requests"] * 1000 if res["requests"] else None
                raw[t].append(res)
                log(f"resources r{rnd + 1} {t:14s} rss under load {res['rss_load_max_kib'] / 1024:6.1f} MiB cpu/1k {res['proxy_cpu_s_per_1k']:.4f}s p99 {res['p99_us']:.0f}us codes {res['codes']}")
            self.check_alive()
        per = {}
        for t in targets:
            per[t] = {
                "rss_idle_mib": self.idle_rss[t] / 1024,
                "rss_load_mib": stat([r["rss_load_max_kib"] / 1024 for r in raw[t]]),
                "cpu_s_per_1k": stat([r["proxy_cpu_s_per_1k"] for r in raw[t]]),
                "non_2xx_or_error": sum(bad(r) for r in raw[t]),
            }
        for peer in ("haproxy", "nginx"):
            per["tollgate"][f"cpu_vs_{peer}"] = stat([a["proxy_cpu_s_per_1k"] / b["proxy_cpu_s_per_1k"] for a, b in zip(raw["tollgate"], raw[peer])])
        self.results["cases"]["resources"] = {"rate": rate, "connections": 100, "summary": per, "raw": raw}

    def case_rate_limit(self):
        """Case 5: twice the quota offered; the excess answered 429 at once."""
        runs = max(1, min(self.runs, 3))
        raw = {"unloaded": [], "overloaded": []}
        for rnd in range(runs):
            # Unloaded: offered at the quota, so everything is admitted. Let the bucket refill.
            time.sleep(2.0)
            res = self.measure("tollgate-limited", self.dur, rate=RATE_LIMIT, stats_breakdown=True)
            raw["unloaded"].append(res)
            log(f"rate-limit r{rnd + 1} offered {RATE_LIMIT}/s: p99 {res['p99_us']:.0f}us codes {res['codes']}")
            time.sleep(2.0)
            res = self.measure("tollgate-limited", self.dur, rate=2 * RATE_LIMIT, stats_breakdown=True)
            raw["overloaded"].append(res)
            log(f"rate-limit r{rnd + 1} offered {2 * RATE_LIMIT}/s: admitted p99 {res.get('ok_p99_us', 0):.0f}us, 429 p99 {res.get('not_ok_p99_us', 0):.0f}us codes {res['codes']}")
            self.check_alive()
        over = raw["overloaded"]
        summary = {
            "quota_per_s": RATE_LIMIT,
            "offered_per_s": 2 * RATE_LIMIT,
            "unloaded_p99_us": stat([r["p99_us"] for r in raw["unloaded"]]),
            "admitted_p99_us": stat([r.get("ok_p99_us") for r in over]),
            "rejected_p50_us": stat([r.get("not_ok_p50_us") for r in over]),
            "rejected_p99_us": stat([r.get("not_ok_p99_us") for r in over]),
            "admitted_p99_vs_unloaded": stat([o.get("ok_p99_us", 0) / u["p99_us"] for o, u in zip(over, raw["unloaded"])]),
            "share_429": stat([r["codes"].get("429", 0) / r["requests"] for r in over]),
            "admitted_per_s": stat([r["codes"].get("200", 0) / self.dur for r in over]),
            "other_failures": sum(sum(v for k, v in r["codes"].items() if k not in ("200", "429")) + sum(r["errors"].values()) for r in over),
        }
        self.results["cases"]["rate_limit"] = {"summary": summary, "raw": raw}

    def case_reload(self):
        """Case 6: a new revision every second under 1k req/s."""
        runs = max(1, min(self.runs, 3))
        dur = 5 if self.quick else 20
        path = os.path.join(self.run_dir, "tollgate-reload.yaml")
        with open(os.path.join(CONF, "tollgate-passthrough.yaml")) as f:
            base = fill(f.read(), dict(PORTS))
        log_path = self.procs["tollgate-reload"].log_path
        raw = []
        for rnd in range(runs):
            applied_before = count_lines(log_path, "config applied")
            lg = Background(oha, self.port("tollgate-reload"), dur, rate=1000)
            written = 0
            t_end = time.time() + dur + 30
            while lg.running() and time.time() < t_end:
                time.sleep(1.0)
                written += 1
                write_atomic(path, revision_yaml(base, rnd * 1000 + written))
            result = lg.result()
            time.sleep(1.0)
            result["revisions_written"] = written
            result["revisions_applied"] = count_lines(log_path, "config applied") - applied_before
            result["failed"] = bad(result)
            raw.append(result)
            log(f"reload r{rnd + 1}: {result['requests']} requests, {result['revisions_applied']} revisions applied, failed {result['failed']}, p99 {result['p99_us']:.0f}us codes {result['codes']} errors {result['errors']}")
            self.check_alive()
        summary = {
            "rate": 1000,
            "duration_s": dur,
            "requests": sum(r["requests"] for r in raw),
            "revisions_applied": sum(r["revisions_applied"] for r in raw),
            "failed": sum(r["failed"] for r in raw),
            "p99_us": stat([r["p99_us"] for r in raw]),
        }
        self.results["cases"]["reload"] = {"summary": summary, "raw": raw}

    # --- driver ---

    def run(self):
        log(f"run dir {self.run_dir}; {self.runs} run(s) of {self.dur}s per case")
        self.results["machine"] = machine()
        self.results["config"] = {
            "quick": self.quick, "runs": self.runs, "duration_s": self.dur,
            "proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU, "body_bytes": BODY_BYTES, "sched": SCHED,
            "latency_connections": 32, "peak_connections": 64,
        }
        started = time.time()
        try:
            self.start_all()
            self.idle_rss = {t: self.procs[t].rss_kib() for t in ("tollgate", "tollgate-full", "haproxy", "nginx")}
            log("idle RSS (MiB): " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in self.idle_rss.items()))
            only = set(self.args.only.split(",")) if self.args.only else None
            for name, fn in (("latency", self.case_latency), ("peak", self.case_peak),
                             ("resources", self.case_resources), ("rate_limit", self.case_rate_limit),
                             ("reload", self.case_reload)):
                if only and name not in only:
                    continue
                log(f"== case {name}")
                fn()
        finally:
            self.stop_all()
        self.results["machine"]["load_avg_end"] = os.getloadavg()
        self.results["elapsed_s"] = time.time() - started
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        os.makedirs(RESULTS, exist_ok=True)
        name = f"{stamp}{'-quick' if self.quick else ''}.json"
        with open(os.path.join(RESULTS, name), "w") as f:
            json.dump(self.results, f, indent=1, sort_keys=True)
        shutil.copyfile(os.path.join(RESULTS, name), os.path.join(RESULTS, "latest.json" if not self.quick else "latest-quick.json"))
        log(f"results: bench/results/{name}")
        if not self.quick or self.args.doc:
            import report
            report.write(self.results, DOC, name)
            log(f"table: {os.path.relpath(DOC, REPO)}")
        shutil.rmtree(self.run_dir, ignore_errors=True)


def ratio_runs(raw, a, b, q):
    """Per round: (a - direct) / (b - direct) for percentile q."""
    out = []
    for x, y, d in zip(raw[a], raw[b], raw["direct"]):
        ya = y[f"{q}_us"] - d[f"{q}_us"]
        xa = x[f"{q}_us"] - d[f"{q}_us"]
        out.append(xa / ya if ya > 0 else None)
    return out


def bad(res):
    return sum(v for k, v in res["codes"].items() if not k.startswith("2")) + sum(res["errors"].values())


def count_lines(path, needle):
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if needle in line)
    except OSError:
        return 0


def revision_yaml(base, n):
    """The pass-through manifest with a pinned header and a request timeout that change each time."""
    return base.rstrip("\n") + (
        f"\n  versioning:\n    pinHeaders: {{X-Bench-Revision: \"{n}\"}}\n"
        f"  timeouts: {{request: {2 + n % 2}s, total: 30s}}\n"
    )


def first_line(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def machine():
    model = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "sidecar", "crds"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "load_avg_start": os.getloadavg(),
        "sidecar_commit": commit + ("+dirty" if dirty else ""),
        "haproxy": first_line([HAPROXY, "-v"]),
        "nginx": first_line([NGINX, "-v"]),
        "oha": first_line([OHA, "--version"]),
        "rustc": first_line(["rustc", "--version"]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


OHA = os.environ.get("OHA", "oha")
NGINX = os.environ.get("NGINX", "/usr/sbin/nginx")
HAPROXY = os.environ.get("HAPROXY", "/usr/sbin/haproxy")
SIDECAR = os.environ.get("SIDECAR", "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short run per case (smoke test)")
    ap.add_argument("--runs", type=int, help="runs per case (default 5, quick 1)")
    ap.add_argument("--duration", type=int, help="seconds per fixed-rate run (default 10, quick 3)")
    ap.add_argument("--only", help="comma-separated cases: latency,peak,resources,rate_limit,reload; or https alone")
    ap.add_argument("--doc", action="store_true", help="regenerate docs/benchmarks.md even in quick mode")
    args = ap.parse_args()
    if not SIDECAR or not os.path.exists(SIDECAR):
        sys.exit("SIDECAR must name the release tollgate-sidecar binary (bench/run.sh sets it)")
    sys.path.insert(0, BENCH)
    if args.only == "https":
        import bench_https

        bench_https.main(args)
        return
    Bench(args).run()


if __name__ == "__main__":
    main()
