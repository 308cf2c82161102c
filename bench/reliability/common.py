"""Shared parts of the reliability scenarios: a partner on loopback, the sidecar as a child
process in standalone mode, a keep-alive HTTP/1.1 client, and /proc readings."""

import os
import resource
import socket
import subprocess
import tempfile
import threading
import time

MANIFEST = """apiVersion: tollgate.dev/v1alpha1
kind: PartnerIntegration
metadata: {{name: partner, namespace: bench}}
spec:
  upstream:
    url: http://127.0.0.1:{port}
    hosts: [partner.bench]
{extra}
"""


def raise_nofile(n):
    """Raises this process's descriptor limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(n, hard) if hard != resource.RLIM_INFINITY else n
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Partner:
    """A threaded HTTP/1.1 partner on loopback: 200 with a small body, keep-alive. `up` turns it
    off and on (down: connections are refused and open ones closed). Counts requests."""

    BODY = b'{"ok":true}'

    def __init__(self, port=0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.lock = threading.Lock()
        self.conns = set()
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self):
        """Stops listening and closes every open connection."""
        self.running = False
        try:
            # shutdown wakes the thread blocked in accept(); close alone would not.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self.conns)
            self.conns.clear()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def up(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(4096)
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        sock = self.sock
        while True:
            try:
                c, _ = sock.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.conns.add(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                while len(buf) < length:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                buf = buf[length:]
                with self.lock:
                    self.requests += 1
                c.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(self.BODY)).encode()
                    + b"\r\n\r\n"
                    + self.BODY
                )
        except OSError:
            return
        finally:
            with self.lock:
                self.conns.discard(c)
            try:
                c.close()
            except OSError:
                pass


class Sidecar:
    """tollgate-sidecar --config FILE on free loopback ports."""

    def __init__(self, binary, manifest, args=(), env=None):
        self.dir = tempfile.mkdtemp(prefix="tollgate-reliability-")
        self.config = os.path.join(self.dir, "integrations.yaml")
        with open(self.config, "w") as f:
            f.write(manifest)
        self.log = open(os.path.join(self.dir, "sidecar.log"), "w+")
        self.proc = subprocess.Popen(
            [binary, "--config", self.config, "--listen", "127.0.0.1:0",
             "--admin", "127.0.0.1:0", "--log-format", "json", *args],
            stdout=subprocess.DEVNULL, stderr=self.log,
            env={**os.environ, "RUST_LOG": "info", "OTEL_SDK_DISABLED": "true", **(env or {})},
        )
        deadline = time.time() + 30
        import json
        while time.time() < deadline:
            self.log.seek(0)
            for line in self.log:
                try:
                    v = json.loads(line)
                except ValueError:
                    continue
                f = v.get("fields", {})
                if f.get("message") == "tollgate-sidecar ready":
                    h, p = f["listen"].rsplit(":", 1)
                    self.listen = (h, int(p))
                    h, p = f["admin"].rsplit(":", 1)
                    self.admin = (h, int(p))
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("sidecar not ready; log in " + self.log.name)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def metrics(self):
        c = Conn(self.admin)
        status, body = c.call("/metrics", host=None)
        c.close()
        return body.decode()


def metric(text, name, labels=None):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name):len(name) + 1] not in ("{", " "):
            continue
        if labels and not all(f'{k}="{v}"' in line for k, v in labels.items()):
            continue
        try:
            total += float(line.rsplit(" ", 1)[1])
        except ValueError:
            pass
    return total


class Conn:
    """One keep-alive HTTP/1.1 connection, blocking, that reads exactly one response per call."""

    def __init__(self, addr, timeout=10):
        self.s = socket.create_connection(addr, timeout=timeout)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def call(self, target, host="partner.bench"):
        """Sends GET `target` (absolute-form through the proxy when `host` is given); returns
        (status, body). Raises on a closed or reset connection."""
        if host:
            req = f"GET http://{host}{target} HTTP/1.1\r\nhost: {host}\r\n\r\n"
        else:
            req = f"GET {target} HTTP/1.1\r\nhost: admin\r\n\r\n"
        self.s.sendall(req.encode())
        while b"\r\n\r\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise ConnectionError("closed before the answer")
            self.buf += d
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        chunked = False
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v.strip())
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
        if chunked:
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self.buf += self._recv()
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self.buf += self._recv()
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    break
            return status, body
        while len(self.buf) < length:
            self.buf += self._recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body

    def _recv(self):
        d = self.s.recv(65536)
        if not d:
            raise ConnectionError("closed in the body")
        return d

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return 0.0
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]
