#!/usr/bin/env python3
"""Soak: the full policy stack under steady load for a long time, with the configuration
edited every 10 s and the credential rotated every minute.

    soak.py SIDECAR_BINARY [--seconds 1800] [--rate 2000] [--out FILE]

The partner is nginx (one worker) on loopback, which also takes the sidecar's span export
(OTLP over HTTP). The load is oha at a fixed rate on 32 keep-alive connections. Every
`--revision-every` seconds the manifest is rewritten (a pinned header's value changes), which
makes a new revision; every `--rotate-every` seconds the credential file gets a new value. A
probe calls `/whoami` (nginx answers with the Authorization header it got) once a second.

Samples the sidecar every `--sample-every` seconds: resident set, open descriptors, threads,
`tollgate_runtime_tasks`, `tollgate_open_connections`, the revision in force. Checks, and
writes as JSON with the series: every call answered 200 (oha saw no other status and no
error); every probe answered with a credential that was current or had just been replaced,
never without one, and each rotation reached the partner within 2 s; every edit was applied;
resident set, descriptors and tasks flat (the last third of the run within 25% + a small
constant of the first third, after a one-minute warm-up) and back to their idle values once the
load stops. Exits non-zero when a check fails."""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import Conn, Sidecar, MANIFEST, metric, raise_nofile

SPEC = """  timeouts: {{request: 2s, total: 5s}}
  retries:
    maxAttempts: 3
    backoff: {{base: 50ms, max: 500ms}}
  rateLimit:
    onLimit: reject
    limits:
      - {{name: sustained, requests: 100000000, per: 1m}}
      - {{name: burst, requests: 10000000, per: 1s}}
  circuitBreaker:
    window: 30s
    minimumRequests: 20
    failureRatePercent: 50
    consecutiveFailures: 5
    openDuration: 15s
  credentials:
    secretRef: {{name: partner-api, key: apiKey}}
    header: Authorization
    format: "Bearer {{value}}"
  versioning:
    pinHeaders: {{X-Api-Version: "v{edit}"}}
"""

NGINX = """worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {run}/body;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /whoami {{ default_type text/plain; return 200 "$http_authorization"; }}
        location / {{ default_type application/json; return 200 '{{"ok":true}}'; }}
    }}
    server {{
        listen 127.0.0.1:{otlp} backlog=1024;
        client_max_body_size 64m;
        location / {{ default_type application/x-protobuf; return 200; }}
    }}
}}
"""


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sidecar")
    ap.add_argument("--seconds", type=int, default=1800)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--revision-every", type=float, default=10)
    ap.add_argument("--rotate-every", type=float, default=60)
    ap.add_argument("--sample-every", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=60)
    ap.add_argument("--oha", default=shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha"))
    ap.add_argument("--out")
    a = ap.parse_args()
    raise_nofile(65536)
    run = tempfile.mkdtemp(prefix="tollgate-soak-")
    os.makedirs(os.path.join(run, "body"))
    port, otlp = free_port(), free_port()
    with open(os.path.join(run, "nginx.conf"), "w") as f:
        f.write(NGINX.format(run=run, port=port, otlp=otlp))
    nginx = subprocess.Popen(["nginx", "-c", os.path.join(run, "nginx.conf"), "-p", run],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secrets = os.path.join(run, "secrets")
    os.makedirs(os.path.join(secrets, "partner-api"))
    key_file = os.path.join(secrets, "partner-api", "apiKey")
    write_atomic(key_file, "key-0\n")
    sidecar = Sidecar(
        a.sidecar, MANIFEST.format(port=port, extra=SPEC.format(edit=0)),
        # Idle upstream connections are reaped after 5 s, so "idle again" can be checked.
        args=["--secrets-dir", secrets, "--pool-idle-timeout", "5s"],
        env={"OTEL_SDK_DISABLED": "false",
             "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp}",
             "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
             "OTEL_SERVICE_NAME": "tollgate-soak"},
    )
    stop = threading.Event()
    t0 = time.time()

    def revision():
        try:
            c = Conn(sidecar.admin)
            _, body = c.call("/config", host=None)
            c.close()
            return json.loads(body).get("revision")
        except (OSError, ValueError):
            return None

    def sample():
        m = sidecar.metrics()
        return {
            "t": round(time.time() - t0, 1),
            "rss_kib": sidecar.rss_kib(),
            "fds": sidecar.fds(),
            "threads": sidecar.threads(),
            "tasks": int(metric(m, "tollgate_runtime_tasks")),
            "open_connections": int(metric(m, "tollgate_open_connections")),
            "requests": int(metric(m, "tollgate_requests_total")),
            "revision": revision(),
        }

    # Idle values, after a few calls so the pools and the exporter exist.
    c = Conn(sidecar.listen)
    for _ in range(50):
        c.call("/warm")
    c.close()
    time.sleep(2)
    idle_before = sample()

    edits = []        # (time, edit number)
    rotations = []    # (time, key number)
    probes = []       # (time, answer)
    series = []

    def editor():
        n = 0
        while not stop.wait(a.revision_every):
            n += 1
            write_atomic(sidecar.config, MANIFEST.format(port=port, extra=SPEC.format(edit=n)))
            edits.append((time.time() - t0, n))

    def rotator():
        n = 0
        while not stop.wait(a.rotate_every):
            n += 1
            write_atomic(key_file, f"key-{n}\n")
            rotations.append((time.time() - t0, n))

    def prober():
        conn = None
        while not stop.wait(1.0):
            try:
                if conn is None:
                    conn = Conn(sidecar.listen)
                status, body = conn.call("/whoami")
                probes.append((time.time() - t0, status, body.decode(errors="replace")))
            except OSError as e:
                probes.append((time.time() - t0, 0, repr(e)))
                conn = None

    def sampler():
        while not stop.wait(a.sample_every):
            try:
                series.append(sample())
            except OSError:
                pass

    threads = [threading.Thread(target=f) for f in (editor, rotator, prober, sampler)]
    for t in threads:
        t.start()
    print(f"soak: {a.seconds}s at {a.rate}/s on {a.connections} connections "
          f"(a revision every {a.revision_every}s, a rotation every {a.rotate_every}s)", flush=True)
    oha = subprocess.run(
        [a.oha, "--no-tui", "--output-format", "json", "-z", f"{a.seconds}s", "-q", str(a.rate),
         "--latency-correction", "-c", str(a.connections), "-t", "10s", "--host", "partner.bench",
         f"http://{sidecar.listen[0]}:{sidecar.listen[1]}/v1/charges"],
        capture_output=True, text=True, timeout=a.seconds + 120)
    stop.set()
    for t in threads:
        t.join()
    load = json.loads(oha.stdout) if oha.returncode == 0 else {"error": oha.stderr[-2000:]}
    # Idle again: the load's connections close, their tasks end.
    deadline = time.time() + 30
    while True:
        idle_after = sample()
        if (idle_after["open_connections"] == 0 and idle_after["tasks"] <= idle_before["tasks"]
                and idle_after["fds"] <= idle_before["fds"] + 2) or time.time() > deadline:
            break
        time.sleep(0.5)
    last_revision = revision()
    c = Conn(sidecar.admin)
    _, last_config = c.call("/config", host=None)
    c.close()
    sidecar.stop()
    nginx.terminate()
    nginx.wait(10)

    codes = load.get("statusCodeDistribution", {})
    errors = load.get("errorDistribution", {})
    calls = sum(codes.values())
    bad = {k: v for k, v in codes.items() if k != "200"}
    # Credentials: each probe's value is the key in force or the one just replaced (a
    # rotation takes up to a reload interval to apply), never missing.
    def key_at(t):
        n = 0
        for rt, k in rotations:
            if rt <= t:
                n = k
        return n
    wrong_probes = []
    for t, status, body in probes:
        ok = status == 200 and body in (f"Bearer key-{key_at(t)}", f"Bearer key-{key_at(t - 2.0)}")
        if not ok:
            wrong_probes.append((round(t, 1), status, body[:80]))
    seen_keys = sorted({b for _, s, b in probes if s == 200})
    steady = [s for s in series if s["t"] >= a.warmup]
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]

    def flat(key, slack):
        if len(steady) < 3:
            return False, None, None
        f = statistics.median(x[key] for x in first)
        l = statistics.median(x[key] for x in last)
        return l <= f * 1.25 + slack, f, l

    rss_ok, rss_first, rss_last = flat("rss_kib", 8 * 1024)
    fds_ok, fds_first, fds_last = flat("fds", 8)
    tasks_ok, tasks_first, tasks_last = flat("tasks", 16)
    revisions = sorted({s["revision"] for s in series if s["revision"]})
    out = {
        "seconds": a.seconds, "rate": a.rate, "connections": a.connections,
        "calls": calls, "rps": load.get("summary", {}).get("requestsPerSec"),
        "latency_ms": {k: round(v * 1000, 3) for k, v in load.get("latencyPercentiles", {}).items()
                       if k in ("p50", "p99", "p99.9") and v is not None},
        "codes": codes, "errors": errors,
        "edits": len(edits), "rotations": len(rotations), "probes": len(probes),
        "keys_seen": seen_keys if len(seen_keys) <= 10 else seen_keys[:5] + ["…"] + seen_keys[-5:],
        "wrong_probes": wrong_probes[:20], "revisions_seen": len(revisions),
        "last_edit": edits[-1][1] if edits else 0, "last_revision": last_revision,
        "flat": {"rss_kib": [rss_first, rss_last], "fds": [fds_first, fds_last],
                 "tasks": [tasks_first, tasks_last]},
        "idle_before": idle_before, "idle_after": idle_after,
        "series": series,
    }
    checks = {
        "load ran": oha.returncode == 0 and calls > 0,
        "every call answered 200": calls > 0 and not bad and not errors,
        "offered rate held": bool(load.get("summary")) and calls >= a.rate * a.seconds * 0.98,
        "credential always current": not wrong_probes and len(probes) >= a.seconds * 0.9,
        # A rotation in the run's last 3 s may have had no probe after it.
        "every rotation seen": bool(rotations) and all(
            f"Bearer key-{k}" in seen_keys for t, k in rotations if t < probes[-1][0] - 3),
        "every edit applied": len(edits) >= a.seconds // a.revision_every - 1
        and bool(revisions) and len(revisions) >= min(len(series), len(edits)) * 0.8
        and f'"v{edits[-1][1] if edits else 0}"'.encode() in last_config,
        "rss flat": rss_ok, "fds flat": fds_ok, "tasks flat": tasks_ok,
        "idle again": idle_after["open_connections"] == 0
        and idle_after["tasks"] <= idle_before["tasks"]
        and idle_after["fds"] <= idle_before["fds"] + 2,
    }
    out["checks"] = checks
    out["ok"] = all(bool(v) for v in checks.values())
    text = json.dumps(out, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "series"}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    shutil.rmtree(run, ignore_errors=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
