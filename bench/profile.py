#!/usr/bin/env python3
"""Profiles the sidecar's hot path under a fixed load (bench/profile.sh sets the binaries).

  profile.py perf [--config passthrough|full] [--rate N] [--seconds S]
      perf record (cpu-clock, call graphs) on the pinned sidecar; prints the top of the report.
  profile.py callgrind [...]
      runs the sidecar under valgrind's callgrind; instructions per request, counted only over
      the measured requests: deterministic, so before/after holds on a noisy shared machine.
  profile.py strace [...]
      system calls per request (strace -c on the running sidecar).
  profile.py count [...]
      no profiler: CPU seconds per 1k requests and RSS, for before/after comparisons.
"""

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tool", choices=["perf", "callgrind", "strace", "count"])
    ap.add_argument("--config", default="passthrough", choices=["passthrough", "full"])
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--out", default="/tmp/tollgate-profile")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    bench.ports_free()
    b = bench.Bench(argparse.Namespace(quick=True, runs=1, duration=args.seconds, only=None, doc=False))
    rd = b.run_dir
    body = "x" * bench.BODY_BYTES
    for d in ("partner-body",):
        os.makedirs(os.path.join(rd, d), exist_ok=True)
    cfg = bench.render("nginx-partner.conf", os.path.join(rd, "partner.conf"), run=rd, body=body)
    b.procs["partner"] = bench.Proc("partner", [bench.NGINX, "-c", cfg, "-p", rd, "-e", os.path.join(rd, "partner-error.log")], bench.LOAD_CPU, rd)
    bench.wait_port(bench.PORTS["partner_port"])
    secrets = os.path.join(rd, "secrets", "partner-api")
    os.makedirs(secrets, exist_ok=True)
    with open(os.path.join(secrets, "apiKey"), "w") as f:
        f.write("sk_bench_0123456789abcdef\n")
    env = None
    if args.config == "full":
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{bench.PORTS['otlp_port']}"}
    cfg = bench.render(f"tollgate-{args.config}.yaml", os.path.join(rd, "sidecar.yaml"))
    argv = [bench.SIDECAR, "--config", cfg, "--secrets-dir", os.path.join(rd, "secrets"),
            "--listen", f"127.0.0.1:{bench.PORTS['tollgate']}", "--admin", f"127.0.0.1:{bench.PORTS['tollgate_admin']}"]
    cg_file = os.path.join(args.out, "callgrind.out")
    if args.tool == "callgrind":
        for f in os.listdir(args.out):
            if f.startswith("callgrind.out"):
                os.remove(os.path.join(args.out, f))
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={cg_file}", "--dump-instr=no"] + argv
    b.procs["tollgate"] = bench.Proc("tollgate", argv, bench.PROXY_CPU, rd, env=env)
    try:
        bench.wait_port(bench.PORTS["tollgate"], host_header=bench.HOST, timeout=60)
        bench.oha(bench.PORTS["tollgate"], 2, rate=args.rate)  # warm-up
        pid = sidecar_pid(b.procs["tollgate"])
        proc = b.procs["tollgate"]
        perf = None
        if args.tool == "perf":
            perf = subprocess.Popen(["perf", "record", "-F", "1999", "-g", "--call-graph", "dwarf,16384",
                                     "-p", str(pid), "-o", os.path.join(args.out, "perf.data")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        if args.tool == "strace":
            perf = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", os.path.join(args.out, "strace.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        if args.tool == "callgrind":
            subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        cpu0 = cpu_of(pid)
        res = bench.oha(bench.PORTS["tollgate"], args.seconds, rate=args.rate)
        if args.tool == "callgrind":
            subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
        cpu = cpu_of(pid) - cpu0
        print(f"{res['requests']} requests, p50 {res['p50_us']:.0f}us p99 {res['p99_us']:.0f}us, "
              f"sidecar CPU {cpu:.2f}s = {cpu / res['requests'] * 1e6:.1f}us/request, RSS {proc.rss_kib() / 1024:.1f} MiB, codes {res['codes']}")
        if perf:
            perf.send_signal(2)
            perf.wait(timeout=120)
    finally:
        if args.tool == "callgrind":
            # Stop the sidecar itself (not the valgrind wrapper) and let it write its profile.
            os.kill(sidecar_pid(b.procs["tollgate"]), 15)
            b.procs["tollgate"].p.wait(timeout=60)
        b.stop_all()
    if args.tool == "perf":
        rep = subprocess.run(["perf", "report", "-i", os.path.join(args.out, "perf.data"), "--no-children",
                              "--percent-limit", "0.7", "--stdio", "-g", "none"], capture_output=True, text=True)
        print(rep.stdout[:12000])
    if args.tool == "strace":
        with open(os.path.join(args.out, "strace.txt")) as f:
            text = f.read()
        print(text)
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[-1] == "total":
                print(f"strace: {int(parts[3]) / res['requests']:.1f} system calls per request")
    if args.tool == "callgrind":
        dumps = sorted((f for f in os.listdir(args.out) if f.startswith("callgrind.out.")), key=lambda f: int(f.rsplit(".", 1)[1]))
        path = os.path.join(args.out, dumps[0])
        total = 0
        with open(path) as f:
            for line in f:
                if line.startswith("summary:") or line.startswith("totals:"):
                    total = int(line.split()[1])
        print(f"callgrind: {total / res['requests']:.0f} instructions per request ({res['requests']} requests, {path})")
        print(f"callgrind: {count_calls(path, ALLOCATORS) / res['requests']:.1f} heap allocations per request (malloc, calloc, realloc, memalign)")
        for caller, n in calls_by_caller(path, ALLOCATORS)[:15]:
            print(f"  {n / res['requests']:5.2f} per request from {caller[:150]}")
        rep = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=99", path], capture_output=True, text=True)
        print("\n".join(rep.stdout.splitlines()[:70]))


ALLOCATORS = {"malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign"}


def count_calls(path, names):
    """Calls to the named functions in a callgrind dump (names are compressed to ids)."""
    ids = {}
    total = 0
    target = False
    with open(path) as f:
        for line in f:
            m = re.match(r"fn=\((\d+)\) (.*)", line.strip())
            if m:
                ids[m.group(1)] = m.group(2)
            if line.startswith("cfn="):
                m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line.strip())
                if m:
                    if m.group(2) is not None:
                        ids[m.group(1)] = m.group(2)
                    target = ids.get(m.group(1), "") in names
                else:
                    target = line[4:].strip() in names
            elif line.startswith("calls=") and target:
                total += int(line[6:].split()[0])
                target = False
    return total


def calls_by_caller(path, names):
    """Calls to the named functions in a callgrind dump, by calling function, most first."""
    ids = {}
    by = {}
    caller = None
    target = False
    with open(path) as f:
        for line in f:
            line = line.strip()
            m = re.match(r"fn=\((\d+)\)(?: (.*))?$", line)
            if m:
                if m.group(2) is not None:
                    ids[m.group(1)] = m.group(2)
                caller = ids.get(m.group(1), "?")
                continue
            m = re.match(r"cfn=\((\d+)\)(?: (.*))?$", line)
            if m:
                if m.group(2) is not None:
                    ids[m.group(1)] = m.group(2)
                target = ids.get(m.group(1), "") in names
            elif line.startswith("calls=") and target:
                by[caller] = by.get(caller, 0) + int(line[6:].split()[0])
                target = False
    return sorted(by.items(), key=lambda kv: -kv[1])


def sidecar_pid(proc):
    """The sidecar's own pid (found by its binary and port, whatever wraps it)."""
    deadline = time.time() + 10
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if cmd and os.path.basename(cmd[0]) == os.path.basename(bench.SIDECAR).encode() and str(bench.PORTS["tollgate"]).encode() in b" ".join(cmd):
                return int(pid)
        time.sleep(0.2)
    return proc.pid


def cpu_of(pid):
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


if __name__ == "__main__":
    main()
