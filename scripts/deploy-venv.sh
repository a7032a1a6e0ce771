#!/usr/bin/env bash
# Idempotent: a Python venv with PyPI kubernetes-validate (the Kubernetes OpenAPI schemas ship
# inside the wheel, so validation is offline), for deploy/validate.sh. Prints the venv path.
# Fast when present.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
VENV=${PROFILER_DEPLOY_VENV:-$root/target/deploy-venv}
VERSION=${PROFILER_KUBERNETES_VALIDATE_VERSION:-1.37.0}
PYTHON=${PYTHON:-python3}

installed() { compgen -G "$VENV/lib/python3*/site-packages/kubernetes_validate-$VERSION.dist-info" >/dev/null; }
if ! installed || [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  printf '[setup] creating %s with kubernetes-validate %s\n' "$VENV" "$VERSION" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$VERSION"
  "$VENV/bin/kubernetes-validate" --version >/dev/null
fi
echo "$VENV"
