#!/usr/bin/env python3
"""Builds Tollgate's container images without a daemon, as OCI image archives.

    images/build.py --out DIR [--sidecar BIN] [--operator BIN] [--version V] [--with-test-images]

Each image is one uncompressed layer assembled here from files on this machine, written as an
OCI image layout in a tar archive (DIR/<name>.tar) that `ctr images import`, `podman load` and
`skopeo copy oci-archive:` read. Built the same way as the Dockerfiles say, from the project's
own binaries:

  ghcr.io/tollgate-dev/tollgate-operator:V      operator/Dockerfile: the operator binary in
      /usr/local/bin, user 65532:65532 (distroless "nonroot"), entrypoint the binary.
  ghcr.io/tollgate-dev/tollgate-sidecar:V       sidecar/Dockerfile: the sidecar binary, user
      1337:1337, /var/lib/tollgate owned by 1337 mode 0700 (the --state-file directory).
  ghcr.io/tollgate-dev/tollgate-sidecar-init:V  sidecar/Dockerfile stage `init`: the same binary
      plus the iptables tools (nft and legacy backends), root, entrypoint `setup-iptables`.

Every image carries what distroless/static carries: /etc/passwd and /etc/group with root,
nonroot (65532) and tollgate (1337), the CA bundle at /etc/ssl/certs/ca-certificates.crt, and
/tmp with mode 1777. Unlike the Dockerfiles' static musl binaries, a dynamically linked binary is
accepted: the shared libraries it needs (ldd) are copied in beside it, so the debug binaries
`cargo test` builds run too.

--with-test-images adds what the end-to-end suite needs on a node with no registry:
  tollgate.test/pause:V   the pod sandbox (a static pause, images/pause.c)
  tollgate.test/curl:V    an app: curl and sleep (no shell), user 1000
"""

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REGISTRY = "ghcr.io/tollgate-dev"
PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
    "tollgate:x:1337:1337:tollgate:/var/lib/tollgate:/sbin/nologin\n"
    "app:x:1000:1000:app:/tmp:/sbin/nologin\n"
)
GROUP = "root:x:0:\nnonroot:x:65532:\ntollgate:x:1337:\napp:x:1000:\n"
CA_BUNDLES = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"]
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(msg):
    print(f"images: {msg}", file=sys.stderr, flush=True)


class Rootfs:
    """The files of one layer: path in the image -> (bytes or source path, mode, uid, gid)."""

    def __init__(self):
        self.entries = {}

    def dir(self, path, mode=0o755, uid=0, gid=0):
        self.entries[path.strip("/")] = ("dir", None, mode, uid, gid)

    def data(self, path, content, mode=0o644, uid=0, gid=0):
        self.entries[path.strip("/")] = ("file", content.encode() if isinstance(content, str) else content, mode, uid, gid)

    def file(self, path, source, mode=None, uid=0, gid=0):
        with open(source, "rb") as f:  # follows symlinks: the image gets the real content
            content = f.read()
        if mode is None:
            mode = os.stat(source).st_mode & 0o7777
        self.entries[path.strip("/")] = ("file", content, mode, uid, gid)

    def symlink(self, path, target):
        self.entries[path.strip("/")] = ("symlink", target, 0o777, 0, 0)

    def binary(self, path, source, mode=0o755):
        """A program and, when it is dynamically linked, the shared libraries it loads."""
        self.file(path, source, mode)
        for lib in shared_libraries(source):
            if lib.strip("/") not in self.entries:
                self.file(lib, lib, 0o755)

    def base(self):
        for d in ["etc", "etc/ssl", "etc/ssl/certs", "usr", "usr/local", "usr/local/bin", "home", "root"]:
            self.dir(d)
        self.dir("tmp", 0o1777)
        self.dir("home/nonroot", 0o700, 65532, 65532)
        self.data("etc/passwd", PASSWD)
        self.data("etc/group", GROUP)
        self.data("etc/nsswitch.conf", "hosts: files dns\n")
        for bundle in CA_BUNDLES:
            if os.path.exists(bundle):
                self.file("etc/ssl/certs/ca-certificates.crt", bundle, 0o644)
                break
        else:
            sys.exit("images: no CA bundle on this machine (install ca-certificates)")

    def tar(self):
        """The layer: a deterministic tar (sorted, mtime 0, parents before children)."""
        paths = set(self.entries)
        for p in list(paths):  # every parent directory exists in the archive
            parts = p.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent not in self.entries:
                    self.entries[parent] = ("dir", None, 0o755, 0, 0)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            for path in sorted(self.entries):
                kind, content, mode, uid, gid = self.entries[path]
                info = tarfile.TarInfo(path)
                info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, 0
                info.uname = info.gname = ""
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    t.addfile(info)
                elif kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = content
                    t.addfile(info)
                else:
                    info.size = len(content)
                    t.addfile(info, io.BytesIO(content))
        return buf.getvalue()


def shared_libraries(binary):
    """Absolute paths of the shared libraries `binary` loads; empty for a static binary."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:  # "not a dynamic executable"
        return []
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            path = line.split("=>", 1)[1].split("(")[0].strip()
        else:
            path = line.split("(")[0].strip()
        if path.startswith("/"):
            libs.append(path)
    return libs


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_image(out_dir, ref, rootfs, config):
    """Writes DIR/<name>.tar: an OCI image layout holding one image tagged `ref`."""
    layer = rootfs.tar()
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "images/build.py"}],
    }
    config_blob = json.dumps(image_config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config_blob),
            "size": len(config_blob),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha256(layer),
                "size": len(layer),
            }
        ],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True).encode()
    tag = ref.rsplit(":", 1)[1]
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(manifest_blob),
                "size": len(manifest_blob),
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    name = ref.rsplit("/", 1)[1].split(":")[0]
    path = os.path.join(out_dir, f"{name}.tar")
    tmp = path + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add(member, data):
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            t.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for blob in (layer, config_blob, manifest_blob):
            add("blobs/sha256/" + sha256(blob).split(":")[1], blob)
    os.replace(tmp, path)
    log(f"{ref}: {path} ({len(layer) // (1 << 20)} MiB, manifest {sha256(manifest_blob)[:19]})")
    return path


def labels(title, description, version):
    return {
        "org.opencontainers.image.title": title,
        "org.opencontainers.image.description": description,
        "org.opencontainers.image.source": "https://github.com/tollgate-dev/tollgate",
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.version": version,
    }


def operator_image(args):
    fs = Rootfs()
    fs.base()
    fs.binary("usr/local/bin/tollgate-operator", args.operator)
    return write_image(args.out, f"{REGISTRY}/tollgate-operator:{args.version}", fs, {
        "User": "65532:65532",
        "Env": [PATH_ENV],
        "Entrypoint": ["/usr/local/bin/tollgate-operator"],
        "ExposedPorts": {"8443/tcp": {}, "8080/tcp": {}},
        "Labels": labels(
            "tollgate-operator",
            "Tollgate control plane: reconciles PartnerIntegrations and pushes policy to sidecars",
            args.version,
        ),
    })


def sidecar_image(args):
    fs = Rootfs()
    fs.base()
    fs.binary("usr/local/bin/tollgate-sidecar", args.sidecar)
    fs.dir("var")
    fs.dir("var/lib")
    fs.dir("var/lib/tollgate", 0o700, 1337, 1337)
    return write_image(args.out, f"{REGISTRY}/tollgate-sidecar:{args.version}", fs, {
        "User": "1337:1337",
        "Env": [PATH_ENV],
        "Entrypoint": ["/usr/local/bin/tollgate-sidecar"],
        "Labels": labels(
            "tollgate-sidecar",
            "Tollgate data plane: governs a pod's outbound calls to partner APIs",
            args.version,
        ),
    })


def init_image(args):
    fs = Rootfs()
    fs.base()
    fs.binary("usr/local/bin/tollgate-sidecar", args.sidecar)
    # The iptables tools: both multi-call binaries, their extensions, and the names
    # setup-iptables looks for on PATH.
    for multi in ["xtables-nft-multi", "xtables-legacy-multi"]:
        source = shutil.which(multi, path="/usr/sbin:/sbin:/usr/bin")
        if not source:
            sys.exit(f"images: {multi} not found: install Debian's iptables package")
        fs.binary(f"usr/sbin/{multi}", source)
    xtables = "/usr/lib/x86_64-linux-gnu/xtables"
    for ext in sorted(os.listdir(xtables)):
        source = os.path.join(xtables, ext)
        fs.file(f"{xtables}/{ext}", source, 0o644)
        for lib in shared_libraries(source):
            if lib.strip("/") not in fs.entries:
                fs.file(lib, lib, 0o755)
    for family in ["iptables", "ip6tables"]:
        for suffix in ["", "-save", "-restore"]:
            fs.symlink(f"usr/sbin/{family}-nft{suffix}", "xtables-nft-multi")
            fs.symlink(f"usr/sbin/{family}-legacy{suffix}", "xtables-legacy-multi")
            fs.symlink(f"usr/sbin/{family}{suffix}", "xtables-nft-multi")
    fs.dir("run", 0o755)
    fs.dir("var")
    fs.dir("var/lib")
    return write_image(args.out, f"{REGISTRY}/tollgate-sidecar-init:{args.version}", fs, {
        "User": "0:0",
        "Env": [PATH_ENV],
        "Entrypoint": ["/usr/local/bin/tollgate-sidecar", "setup-iptables"],
        "Labels": labels(
            "tollgate-sidecar-init",
            "Tollgate interception init container: installs the pod's redirect rules",
            args.version,
        ),
    })


def pause_image(args):
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "pause")
        subprocess.run(["cc", "-O2", "-static", "-o", binary, os.path.join(here, "pause.c")], check=True)
        fs = Rootfs()
        fs.binary("pause", binary)
        return write_image(args.out, f"tollgate.test/pause:{args.version}", fs, {
            "User": "65535:65535",
            "Entrypoint": ["/pause"],
        })


def curl_image(args):
    fs = Rootfs()
    fs.base()
    curl = shutil.which("curl")
    if not curl:
        sys.exit("images: curl not found: install Debian's curl package")
    fs.binary("usr/bin/curl", curl)
    # The app's container stays up with `sleep infinity` for the calls a test makes in it.
    fs.binary("usr/bin/sleep", shutil.which("sleep"))
    # curl's resolver loads NSS modules by name at run time; ldd does not see them.
    for lib in ["/lib/x86_64-linux-gnu/libnss_dns.so.2", "/lib/x86_64-linux-gnu/libnss_files.so.2",
                "/lib/x86_64-linux-gnu/libresolv.so.2"]:
        if os.path.exists(lib):
            fs.file(lib, lib, 0o755)
    return write_image(args.out, f"tollgate.test/curl:{args.version}", fs, {
        "User": "1000:1000",
        "Env": [PATH_ENV],
        "Entrypoint": ["/usr/bin/sleep", "infinity"],
    })


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the image archives")
    p.add_argument("--sidecar", help="the tollgate-sidecar binary (sidecar and init images)")
    p.add_argument("--operator", help="the tollgate-operator binary (operator image)")
    p.add_argument("--version", default="0.1.0", help="image tag (the chart's appVersion)")
    p.add_argument("--with-test-images", action="store_true", help="also the pause and curl images")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    built = []
    if args.operator:
        built.append(operator_image(args))
    if args.sidecar:
        built.append(sidecar_image(args))
        built.append(init_image(args))
    if args.with_test_images:
        built.append(pause_image(args))
        built.append(curl_image(args))
    if not built:
        sys.exit("images: nothing to build: give --operator, --sidecar or --with-test-images")
    log(f"{len(built)} images in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
