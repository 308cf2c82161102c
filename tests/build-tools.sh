#!/usr/bin/env bash
# Builds the Go tools the end-to-end tests run, into one tools directory:
#
#   controlplane   etcd + kube-apiserver harness from tests/controlplane
#   helm           helm v3 from its Go module
#   promtool       Prometheus' rule checker and rule unit-test runner, from its Go module
#   node           kubelet, kube-controller-manager, kube-scheduler, kube-proxy and a
#                  cluster DNS from tests/node, for the suite that runs real pods
#
# Usage: tests/build-tools.sh [controlplane|helm|promtool|node]...     (no argument: all)
#
# Tools directory: $TOLLGATE_E2E_TOOLS_DIR, else $CARGO_TARGET_DIR/e2e-tools, else
# <repo>/target/e2e-tools (a relative CARGO_TARGET_DIR is taken from the repo root).
# The e2e test harness (tests/src) runs this same script when a tool is missing
# or stale, so CI calls it first to make the long cold build visible on its own.
#
# A tool is rebuilt only when its inputs changed: a .stamp file beside each binary
# records a hash of them. Concurrent runs are serialised with flock.
set -euo pipefail

HELM_VERSION=v3.22.0
# Prometheus 3.16's Go module (its tags are v0.<major><minor>.<patch>).
PROMETHEUS_MODULE_VERSION=v0.316.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

if [[ -n "${TOLLGATE_E2E_TOOLS_DIR:-}" ]]; then
    tools="$TOLLGATE_E2E_TOOLS_DIR"
else
    target="${CARGO_TARGET_DIR:-target}"
    [[ "$target" = /* ]] || target="$repo/$target"
    tools="$target/e2e-tools"
fi
mkdir -p "$tools"
tools="$(cd "$tools" && pwd)"

log() { echo "build-tools: $*" >&2; }

# Deterministic flags whatever GOFLAGS the machine sets; -s -w only drops the
# symbol table and DWARF (stack traces still work) and shortens the link.
export GOFLAGS="-buildvcs=false -trimpath"

# build NAME STAMP_INPUT FUNCTION: runs FUNCTION, which must write the binary to
# $out, unless $tools/NAME exists and $tools/NAME.stamp holds STAMP_INPUT's hash.
build() {
    local name="$1" stamp_input="$2" fn="$3"
    local bin="$tools/$name" stamp
    stamp="$(printf '%s' "$stamp_input" | sha256sum | cut -d' ' -f1)"
    if [[ -x "$bin" && "$(cat "$bin.stamp" 2>/dev/null)" == "$stamp" ]]; then
        log "$name: up to date ($bin)"
        return
    fi
    log "$name: building into $bin (a cold build takes minutes)"
    local start=$SECONDS
    out="$bin.tmp.$$"
    "$fn"
    mv -f "$out" "$bin"
    echo "$stamp" >"$bin.stamp"
    log "$name: built in $((SECONDS - start))s, $(du -m "$bin" | cut -f1) MiB"
}

build_controlplane() {
    cd "$here/controlplane"
    local kube_version inputs
    kube_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)" # e.g. v1.36.3
    local minor="${kube_version#v1.}"
    minor="${minor%%.*}"
    # Without these the server reports v0.0.0-master, which breaks clients that
    # check the server version (helm's kubeVersion constraints, for one).
    local ldflags="-s -w"
    ldflags+=" -X k8s.io/component-base/version.gitVersion=$kube_version"
    ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
    ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"
    inputs="$(go version) $ldflags $(cat go.mod go.sum ./*.go | sha256sum)"
    go_build() { go build -ldflags "$ldflags" -o "$out" .; }
    build controlplane "$inputs" go_build
}

build_node() {
    cd "$here/node"
    local kube_version minor ldflags inputs
    kube_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)" # v1.35.x
    minor="${kube_version#v1.}"
    minor="${minor%%.*}"
    ldflags="-s -w"
    ldflags+=" -X k8s.io/component-base/version.gitVersion=$kube_version"
    ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
    ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"
    inputs="$(go version) $ldflags $(cat go.mod go.sum ./*.go | sha256sum)"
    go_build() { go build -ldflags "$ldflags" -o "$out" .; }
    build node "$inputs" go_build
}

build_helm() {
    # Helm's own release build sets its version and derives the Kubernetes version
    # it assumes offline (helm template) from the client-go it uses; do the same.
    local gomod client_go kmajor kminor ldflags
    gomod="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
    client_go="$(awk '$1 == "k8s.io/client-go" { print $2 }' "$gomod")" # e.g. v0.37.0
    kmajor=$(( $(echo "$client_go" | cut -d. -f1 | tr -d v) + 1 ))
    kminor="$(echo "$client_go" | cut -d. -f2)"
    ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        ldflags+=" -X $pkg.k8sVersionMajor=$kmajor -X $pkg.k8sVersionMinor=$kminor"
    done
    # go install names its output after the package; build into a private GOBIN
    # and move the result, so a concurrent reader never sees a half-written file.
    install_helm() {
        local gobin="$tools/.helm-gobin.$$"
        GOBIN="$gobin" go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
        mv -f "$gobin/helm" "$out"
        rmdir "$gobin"
    }
    build helm "$(go version) $HELM_VERSION $ldflags" install_helm
}

build_promtool() {
    # Only `check rules` and `test rules` are used: the service-discovery plugins (cloud SDKs)
    # are left out with Prometheus' own build tag, which shortens a cold build by minutes.
    local version="${PROMETHEUS_MODULE_VERSION#v0.}" ldflags
    version="$((10#${version%%.*} / 100)).$((10#${version%%.*} % 100)).${version#*.}" # 3.16.0
    ldflags="-s -w -X github.com/prometheus/common/version.Version=$version"
    install_promtool() {
        local gobin="$tools/.promtool-gobin.$$"
        GOBIN="$gobin" go install -tags remove_all_sd -ldflags "$ldflags" \
            "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION"
        mv -f "$gobin/promtool" "$out"
        rmdir "$gobin"
    }
    build promtool "$(go version) $PROMETHEUS_MODULE_VERSION remove_all_sd $ldflags" install_promtool
}

exec 9>"$tools/.lock"
flock 9

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(controlplane helm promtool node)
total=$SECONDS
for t in "${targets[@]}"; do
    case "$t" in
    controlplane) (build_controlplane) ;;
    helm) (build_helm) ;;
    promtool) (build_promtool) ;;
    node) (build_node) ;;
    *)
        log "unknown tool: $t (expected controlplane, helm, promtool or node)"
        exit 2
        ;;
    esac
done
log "done in $((SECONDS - total))s; tools in $tools"
