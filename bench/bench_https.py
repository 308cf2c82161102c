"""The HTTPS case (`bench/run.sh --only https`): the sidecar intercepting a partner's TLS,
against HAProxy terminating and re-encrypting with a static certificate, in the same run.

Started through bench.py (same pinning, scheduling, interleaved rounds and ratios as the HTTP
cases). Standard library plus openssl; every load loop is bounded (oha -z) and aimed at
loopback only. Keys are made at bench time in the run's temporary directory and deleted with it.

Paths measured, all ending at the same TLS partner (nginx, one worker, 1 KiB body):
  direct   : oha -> nginx (TLS)
  tollgate : oha -> CONNECT partner.bench:443 -> Tollgate terminates TLS with a leaf from its pod
             CA -> pass-through integration -> verified TLS to nginx (pooled, keep-alive)
  haproxy  : oha -> HAProxy terminates TLS with a static certificate -> verified TLS to nginx
             (http-reuse always)
CONNECT, not the transparent listener: the transparent path needs a network namespace and
iptables rules to redirect the connection (SO_ORIGINAL_DST), which the HTTP cases do not use
either. Once the tunnel is open, both paths run the same code (intercept::serve), so keep-alive
requests cost the same; a new connection through CONNECT pays one extra round trip to the
sidecar (the CONNECT exchange) before the TLS handshake, which the new-connection case counts.
"""

import datetime
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time

import bench as B

PORTS = {
    "partner_tls_port": 19443,
    "haproxy_tls_port": 19444,
    "tollgate_https": 19088,
    "tollgate_https_admin": 19098,
}
HOST = "partner.bench"
URL = f"https://{HOST}/"
TARGETS = ["direct", "tollgate", "haproxy"]
RATES = [1000, 5000]
NEW_CONN_RATE = 200
NEW_CONN_CLOSED = 8  # closed-loop connections for new-connection throughput
DOC_BEGIN = "<!-- BEGIN GENERATED HTTPS: bench/run.sh --only https rewrites this part -->"
DOC_END = "<!-- END GENERATED HTTPS -->"


def log(msg):
    B.log(f"https: {msg}")


def openssl(*args, cwd):
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {out.stderr[-1000:]}")


def make_pki(d):
    """A bench CA and one leaf for partner.bench (and 127.0.0.1), ECDSA P-256 like the pod CA's
    leaves. nginx serves the leaf; HAProxy serves the same leaf as its static certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=tollgate bench CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    openssl("req", *ec, "-keyout", "partner.key", "-out", "partner.csr", "-subj", f"/CN={HOST}", cwd=d)
    with open(os.path.join(d, "leaf.ext"), "w") as f:
        f.write(f"subjectAltName=DNS:{HOST},IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "partner.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "leaf.ext", "-out", "partner.crt", cwd=d)
    with open(os.path.join(d, "static.pem"), "w") as out:
        for name in ("partner.crt", "partner.key"):
            with open(os.path.join(d, name)) as f:
                out.write(f.read())


def render(name, dest, **values):
    with open(os.path.join(B.CONF, name)) as f:
        text = f.read()
    allv = dict(PORTS)
    allv.update(values)
    with open(dest, "w") as f:
        f.write(B.fill(text, allv))
    return dest


def ports_free():
    for name, port in PORTS.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(f"127.0.0.1:{port} ({name}) is already in use; stop what listens there")


def https_get(target, cafile, timeout=2.0):
    """One GET of URL along the target's path, verifying as oha does. Returns the status."""
    ctx = ssl.create_default_context(cafile=cafile)
    if target == "tollgate":
        conn = http.client.HTTPSConnection("127.0.0.1", PORTS["tollgate_https"], timeout=timeout, context=ctx)
        conn.set_tunnel(HOST, 443)
    else:
        port = PORTS["partner_tls_port"] if target == "direct" else PORTS["haproxy_tls_port"]
        conn = http.client.HTTPSConnection(HOST, port, timeout=timeout, context=ctx)
        # Connect to loopback while verifying and sending SNI for partner.bench.
        conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout), server_hostname=HOST)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def oha(target, duration, cafile, rate=None, conns=32, keepalive=True):
    """One bounded oha run along the target's path. Returns a summary like bench.oha's."""
    argv = B.prio([
        "taskset", "-c", B.LOAD_CPU, B.OHA,
        "--no-tui", "--output-format", "json", "--worker-threads", "1",
        "-z", f"{duration}s", "-w", "-c", str(conns), "-t", "10s",
        "--cacert", cafile,
    ])
    if target == "tollgate":
        # CONNECT partner.bench:443 through the sidecar; the name is never resolved.
        argv += ["-x", f"http://127.0.0.1:{PORTS['tollgate_https']}", "--no-pre-lookup"]
    else:
        port = PORTS["partner_tls_port"] if target == "direct" else PORTS["haproxy_tls_port"]
        argv += ["--connect-to", f"{HOST}:443:127.0.0.1:{port}"]
    if rate:
        argv += ["-q", str(rate), "--latency-correction"]
    if not keepalive:
        argv += ["--disable-keepalive"]
    argv.append(URL)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed ({out.returncode}): {out.stderr[-2000:]}")
    j = json.loads(out.stdout)
    pct = j["latencyPercentiles"]
    codes = dict(j.get("statusCodeDistribution", {}))
    return {
        "requests": sum(codes.values()),
        "rps": j["summary"]["requestsPerSec"],
        "p50_us": (pct["p50"] or 0) * 1e6,
        "p99_us": (pct["p99"] or 0) * 1e6,
        "p99_9_us": (pct["p99.9"] or 0) * 1e6,
        "codes": codes,
        "errors": j.get("errorDistribution", {}),
    }


class HttpsBench:
    def __init__(self, args):
        self.quick = args.quick
        self.runs = args.runs or (1 if self.quick else 5)
        self.dur = args.duration or (3 if self.quick else 10)
        self.run_dir = tempfile.mkdtemp(prefix="tollgate-bench-https-")
        self.procs = {}
        self.results = {"cases": {}}
        self.args = args

    def cafile(self, target):
        if target == "tollgate":
            return os.path.join(self.run_dir, "trust", "ca.crt")
        return os.path.join(self.run_dir, "ca.crt")

    def start_all(self):
        ports_free()
        rd = self.run_dir
        make_pki(rd)
        os.makedirs(os.path.join(rd, "partner-tls-body"), exist_ok=True)
        body = "x" * B.BODY_BYTES
        cfg = render("nginx-partner-tls.conf", os.path.join(rd, "partner-tls.conf"), run=rd, body=body)
        self.procs["partner"] = B.Proc("partner-tls", [B.NGINX, "-c", cfg, "-p", rd, "-e", os.path.join(rd, "partner-tls-error.log")], B.LOAD_CPU, rd)
        cfg = render("haproxy-tls.cfg", os.path.join(rd, "haproxy-tls.cfg"), run=rd)
        self.procs["haproxy"] = B.Proc("haproxy-tls", [B.HAPROXY, "-f", cfg, "-db"], B.PROXY_CPU, rd)
        cfg = render("tollgate-https.yaml", os.path.join(rd, "tollgate-https.yaml"))
        trust = os.path.join(rd, "trust")
        self.procs["tollgate"] = B.Proc("tollgate-https", [
            B.SIDECAR, "--config", cfg,
            "--listen", f"127.0.0.1:{PORTS['tollgate_https']}",
            "--admin", f"127.0.0.1:{PORTS['tollgate_https_admin']}",
            "--ca-bundle", os.path.join(rd, "ca.crt"), "--trust-dir", trust,
        ], B.PROXY_CPU, rd)
        deadline = time.time() + 20
        for t in TARGETS:
            while True:
                try:
                    status = https_get(t, self.cafile(t))
                    if status != 200:
                        raise RuntimeError(f"{t} answered {status}")
                    break
                except Exception as e:  # noqa: BLE001 - not up yet, until the deadline
                    if time.time() > deadline:
                        raise RuntimeError(f"{t} not answering over HTTPS: {e}") from e
                    time.sleep(0.1)
        time.sleep(1.0)

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

    def measure(self, target, duration, **kw):
        proc = self.procs.get(target) if target != "direct" else None
        cpu0 = proc.cpu_seconds() if proc else None
        t0 = time.time()
        res = oha(target, duration, self.cafile(target), **kw)
        wall = time.time() - t0
        if proc:
            cpu = proc.cpu_seconds() - cpu0
            res["proxy_cpu_s"] = cpu
            res["proxy_cpu_util"] = cpu / wall
            res["proxy_rss_kib"] = proc.rss_kib()
        return res

    # --- cases ---

    def case_keepalive(self):
        """Added p50/p99 at fixed rates over keep-alive connections (32, open loop)."""
        raw = {r: {t: [] for t in TARGETS} for r in RATES}
        for rnd in range(self.runs):
            for rate in RATES:
                for t in TARGETS:
                    oha(t, 1, self.cafile(t), rate=rate)  # warm-up: connections, pools, leaf
                    res = self.measure(t, self.dur, rate=rate)
                    raw[rate][t].append(res)
                    log(f"keep-alive r{rnd + 1} {rate}/s {t:9s} p50 {res['p50_us']:8.1f}us p99 {res['p99_us']:8.1f}us codes {res['codes']} errors {res['errors']}")
                self.check_alive()
        out = {}
        for rate in RATES:
            per = {}
            for t in TARGETS:
                runs = raw[rate][t]
                entry = {q: B.stat([r[f"{q}_us"] for r in runs]) for q in ("p50", "p99", "p99_9")}
                entry["non_2xx_or_error"] = sum(B.bad(r) for r in runs)
                if t != "direct":
                    for q in ("p50", "p99"):
                        entry[f"added_{q}"] = B.stat([r[f"{q}_us"] - d[f"{q}_us"] for r, d in zip(runs, raw[rate]["direct"])])
                    entry["cpu_s_per_1k"] = B.stat([r["proxy_cpu_s"] / r["requests"] * 1000 if r["requests"] else None for r in runs])
                per[t] = entry
            for q in ("p50", "p99"):
                per["tollgate"][f"added_{q}_vs_haproxy"] = B.stat(B.ratio_runs(raw[rate], "tollgate", "haproxy", q))
            out[str(rate)] = {"summary": per, "raw": raw[rate]}
        self.results["cases"]["keepalive"] = out

    def case_peak(self):
        """Closed loop, 64 keep-alive connections: req per proxy CPU-second."""
        runs = max(1, min(self.runs, 3))
        dur = 3 if self.quick else 8
        raw = {t: [] for t in TARGETS}
        for rnd in range(runs):
            for t in TARGETS:
                oha(t, 1, self.cafile(t), conns=64)
                res = self.measure(t, dur, conns=64)
                raw[t].append(res)
                util = f" proxy cpu {res['proxy_cpu_util'] * 100:5.1f}%" if "proxy_cpu_util" in res else ""
                log(f"peak r{rnd + 1} {t:9s} {res['rps']:9.0f} req/s{util} codes {res['codes']}")
            self.check_alive()
        per = {}
        for t in TARGETS:
            entry = {"rps": B.stat([r["rps"] for r in raw[t]]), "non_2xx_or_error": sum(B.bad(r) for r in raw[t])}
            if t != "direct":
                entry["proxy_cpu_util"] = B.stat([r["proxy_cpu_util"] for r in raw[t]])
                entry["req_per_cpu_s"] = B.stat([r["requests"] / r["proxy_cpu_s"] if r["proxy_cpu_s"] else None for r in raw[t]])
            per[t] = entry
        per["tollgate"]["req_per_cpu_s_vs_haproxy"] = B.stat(
            [(a["requests"] / a["proxy_cpu_s"]) / (b["requests"] / b["proxy_cpu_s"])
             for a, b in zip(raw["tollgate"], raw["haproxy"]) if a["proxy_cpu_s"] and b["proxy_cpu_s"]]
        )
        self.results["cases"]["peak"] = {"summary": per, "raw": raw}

    def case_new_connections(self):
        """A new client connection (TCP, CONNECT for Tollgate, TLS handshake) for every request:
        latency at a fixed rate, and closed-loop new connections per second and per proxy
        CPU-second. Partner-side connections stay pooled for every proxy."""
        runs = max(1, min(self.runs, 3))
        dur = 3 if self.quick else 8
        raw = {"fixed": {t: [] for t in TARGETS}, "closed": {t: [] for t in TARGETS}}
        for rnd in range(runs):
            for t in TARGETS:
                oha(t, 1, self.cafile(t), rate=NEW_CONN_RATE, keepalive=False)
                res = self.measure(t, dur, rate=NEW_CONN_RATE, keepalive=False)
                raw["fixed"][t].append(res)
                log(f"new-conn r{rnd + 1} {NEW_CONN_RATE}/s {t:9s} p50 {res['p50_us']:8.1f}us p99 {res['p99_us']:8.1f}us codes {res['codes']} errors {res['errors']}")
                res = self.measure(t, dur, conns=NEW_CONN_CLOSED, keepalive=False)
                raw["closed"][t].append(res)
                util = f" proxy cpu {res['proxy_cpu_util'] * 100:5.1f}%" if "proxy_cpu_util" in res else ""
                log(f"new-conn r{rnd + 1} closed {t:9s} {res['rps']:8.0f} conn/s{util} codes {res['codes']} errors {res['errors']}")
            self.check_alive()
        per = {}
        for t in TARGETS:
            fixed, closed = raw["fixed"][t], raw["closed"][t]
            entry = {
                "p50": B.stat([r["p50_us"] for r in fixed]),
                "p99": B.stat([r["p99_us"] for r in fixed]),
                "rps": B.stat([r["rps"] for r in closed]),
                "non_2xx_or_error": sum(B.bad(r) for r in fixed + closed),
            }
            if t != "direct":
                entry["added_p50"] = B.stat([r["p50_us"] - d["p50_us"] for r, d in zip(fixed, raw["fixed"]["direct"])])
                entry["proxy_cpu_util"] = B.stat([r["proxy_cpu_util"] for r in closed])
                entry["conn_per_cpu_s"] = B.stat([r["requests"] / r["proxy_cpu_s"] if r["proxy_cpu_s"] else None for r in closed])
            per[t] = entry
        tg = per["tollgate"]
        tg["added_p50_vs_haproxy"] = B.stat(B.ratio_runs(raw["fixed"], "tollgate", "haproxy", "p50"))
        tg["conn_per_cpu_s_vs_haproxy"] = B.stat(
            [(a["requests"] / a["proxy_cpu_s"]) / (b["requests"] / b["proxy_cpu_s"])
             for a, b in zip(raw["closed"]["tollgate"], raw["closed"]["haproxy"]) if a["proxy_cpu_s"] and b["proxy_cpu_s"]]
        )
        self.results["cases"]["new_connections"] = {"rate": NEW_CONN_RATE, "closed_connections": NEW_CONN_CLOSED, "summary": per, "raw": raw}

    # --- driver ---

    def run(self):
        log(f"run dir {self.run_dir}; {self.runs} run(s) of {self.dur}s per case")
        self.results["machine"] = B.machine()
        self.results["machine"]["openssl"] = B.first_line(["openssl", "version"])
        self.results["config"] = {
            "quick": self.quick, "runs": self.runs, "duration_s": self.dur,
            "proxy_cpu": B.PROXY_CPU, "load_cpu": B.LOAD_CPU, "body_bytes": B.BODY_BYTES, "sched": B.SCHED,
            "latency_connections": 32, "peak_connections": 64, "tollgate_path": "CONNECT",
        }
        started = time.time()
        try:
            self.start_all()
            self.results["idle_rss_mib"] = {t: self.procs[t].rss_kib() / 1024 for t in ("tollgate", "haproxy")}
            for name, fn in (("keepalive", self.case_keepalive), ("peak", self.case_peak),
                             ("new_connections", self.case_new_connections)):
                log(f"== case {name}")
                fn()
        finally:
            self.stop_all()
        self.results["machine"]["load_avg_end"] = os.getloadavg()
        self.results["elapsed_s"] = time.time() - started
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        os.makedirs(B.RESULTS, exist_ok=True)
        name = f"https-{stamp}{'-quick' if self.quick else ''}.json"
        with open(os.path.join(B.RESULTS, name), "w") as f:
            json.dump(self.results, f, indent=1, sort_keys=True)
        shutil.copyfile(os.path.join(B.RESULTS, name), os.path.join(B.RESULTS, "https-latest-quick.json" if self.quick else "https-latest.json"))
        log(f"results: bench/results/{name}")
        if not self.quick or self.args.doc:
            write_doc(self.results, B.DOC, name)
            log(f"table: {os.path.relpath(B.DOC, B.REPO)}")
        shutil.rmtree(self.run_dir, ignore_errors=True)


# === the page ===


def generated(r, name):
    from report import f2, med, sp, verdict

    m, c, cases = r["machine"], r["config"], r["cases"]
    out = []
    w = out.append
    w(f"Results file: `bench/results/{name}` ({'quick' if c['quick'] else 'full'} run, {c['runs']} run(s) per case, "
      f"{c['duration_s']} s per fixed-rate run, {r['elapsed_s'] / 60:.1f} min in all); load average at start "
      f"{', '.join(f'{x:.1f}' for x in m['load_avg_start'])}, at end {', '.join(f'{x:.1f}' for x in m.get('load_avg_end', []))}; "
      f"{m['haproxy']}; {m['nginx']}; {m.get('openssl')}; {m['oha']}; sidecar at `{m['sidecar_commit']}`; "
      f"scheduling `{c.get('sched', 'none')}`, proxy on core {c['proxy_cpu']}, oha and partner on core {c['load_cpu']}.")
    w("")
    goals = []
    ka = cases.get("keepalive", {})
    if ka:
        w("**Keep-alive HTTPS calls** (µs; 32 connections, open loop, 1 KiB responses; added = the path's percentile "
          "minus the direct HTTPS call's in the same round)")
        w("")
        w("| rate | target | p50 | p99 | added p50 | added p99 | proxy CPU s per 1k | failed |")
        w("|---|---|---|---|---|---|---|---|")
        for rate, block in ka.items():
            for t, e in block["summary"].items():
                w(f"| {int(rate):,}/s | {t} | {sp(e['p50'])} | {sp(e['p99'])} | {sp(e.get('added_p50'))} | {sp(e.get('added_p99'))} | "
                  f"{sp(e.get('cpu_s_per_1k'), lambda x: f'{x:.4f}')} | {e['non_2xx_or_error']} |")
        w("")
        w("| Tollgate added latency ÷ HAProxy's | p50 | p99 |")
        w("|---|---|---|")
        for rate, block in ka.items():
            tg = block["summary"]["tollgate"]
            w(f"| {int(rate):,}/s | {sp(tg.get('added_p50_vs_haproxy'), f2)} | {sp(tg.get('added_p99_vs_haproxy'), f2)} |")
        w("")
        one = ka.get("1000", {}).get("summary", {}).get("tollgate", {})
        r50 = med(one.get("added_p50_vs_haproxy"))
        goals.append(("Keep-alive added p50 at 1k req/s ≤ 1.2× HAProxy's", f"{f2(r50)}×", None if r50 is None else r50 <= 1.2))
    pk = cases.get("peak")
    if pk:
        s = pk["summary"]
        w("**Peak, keep-alive** (closed loop, 64 connections, proxy pinned to one core)")
        w("")
        w("| target | req/s | proxy core busy | req per proxy CPU-second | failed |")
        w("|---|---|---|---|---|")
        for t, e in s.items():
            util = sp(e.get("proxy_cpu_util"), lambda x: f"{x * 100:.0f}%") if "proxy_cpu_util" in e else "—"
            w(f"| {t} | {sp(e['rps'])} | {util} | {sp(e.get('req_per_cpu_s')) if 'req_per_cpu_s' in e else '—'} | {e['non_2xx_or_error']} |")
        w("")
        w(f"Tollgate req per CPU-second ÷ HAProxy's: {sp(s['tollgate'].get('req_per_cpu_s_vs_haproxy'), f2)}.")
        w("")
    nc = cases.get("new_connections")
    if nc:
        s = nc["summary"]
        w(f"**A new connection for every request** (TCP + TLS handshake, and the CONNECT exchange for Tollgate; "
          f"latency at {nc['rate']}/s open loop, throughput closed loop with {nc['closed_connections']} connections; "
          "partner-side connections stay pooled)")
        w("")
        w("| target | p50 (µs) | p99 (µs) | added p50 (µs) | new connections/s | per proxy CPU-second | failed |")
        w("|---|---|---|---|---|---|---|")
        for t, e in s.items():
            w(f"| {t} | {sp(e['p50'])} | {sp(e['p99'])} | {sp(e.get('added_p50'))} | {sp(e['rps'])} | "
              f"{sp(e.get('conn_per_cpu_s')) if 'conn_per_cpu_s' in e else '—'} | {e['non_2xx_or_error']} |")
        w("")
        tg = s["tollgate"]
        w(f"Tollgate ÷ HAProxy: added p50 {sp(tg.get('added_p50_vs_haproxy'), f2)}, "
          f"new connections per CPU-second {sp(tg.get('conn_per_cpu_s_vs_haproxy'), f2)}.")
        w("")
    if goals:
        w("| goal | this run | |")
        w("|---|---|---|")
        for g, v, ok in goals:
            w(f"| {g} | {v} | {verdict(ok)} |")
        w("")
    return "\n".join(out)


def write_doc(results, path, name):
    with open(path) as f:
        page = f.read()
    if DOC_BEGIN not in page or DOC_END not in page:
        page = page.rstrip("\n") + "\n\n## HTTPS interception\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    head, rest = page.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    page = head + DOC_BEGIN + "\n\n" + generated(results, name) + "\n" + DOC_END + tail
    with open(path, "w") as f:
        f.write(page)


def main(args):
    HttpsBench(args).run()
