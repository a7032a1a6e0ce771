#!/usr/bin/env bash
# Renders every kustomization under deploy/ (kubectl kustomize) and validates the output against
# the Kubernetes OpenAPI schemas, strictly (unknown fields are errors) and offline
# (kubernetes-validate from PyPI, in a venv under target/; scripts/deploy-venv.sh makes it).
# Then checks what the schemas cannot: the least-privilege promises of deploy/README.md.
#
#   deploy/validate.sh [KUBERNETES_VERSION...]    default: 1.30.0 (oldest with appArmorProfile) and 1.37.0
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(1.30.0 1.37.0)
venv=$(bash scripts/deploy-venv.sh)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

targets=(deploy/overlays/production deploy/overlays/legacy-kernel deploy/base deploy/collector)
for target in "${targets[@]}"; do
  name=${target//\//_}
  kubectl kustomize "$target" > "$out/$name.yaml"
  for version in "${versions[@]}"; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$out/$name.yaml"
  done
  echo "ok: $target renders $(grep -c '^kind:' "$out/$name.yaml") objects, valid against Kubernetes ${versions[*]}"
done

# What the schemas allow but the design forbids, checked on the rendered DaemonSets.
"$venv/bin/python" - "$out" <<'PY'
import glob, re, sys, yaml

readme = open("deploy/README.md").read()
# Granted only by overlays/legacy-kernel, whose section of the README explains them.
LEGACY = {"SYS_ADMIN", "SYS_RESOURCE"} if "### Kernels without CAP_BPF" in readme else set()
failures = []
for path in sorted(glob.glob(f"{sys.argv[1]}/*.yaml")):
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") != "DaemonSet":
            continue
        where = f"{path.rsplit('/', 1)[-1]}: daemonset/{doc['metadata']['name']}"
        spec = doc["spec"]["template"]["spec"]
        if not spec.get("hostPID"):
            failures.append(f"{where}: hostPID is not true")
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            caps = sc.get("capabilities", {})
            if sc.get("privileged"):
                failures.append(f"{where}: {c['name']} is privileged")
            if caps.get("drop") != ["ALL"]:
                failures.append(f"{where}: {c['name']} does not drop ALL capabilities")
            for cap in caps.get("add", []):
                # A row of the capability table: | `CAP_X` | needed for | without it |
                if not re.search(rf"^\| `CAP_{cap}` \|", readme, re.MULTILINE) and cap not in LEGACY:
                    failures.append(f"{where}: CAP_{cap} is granted but has no row in deploy/README.md's table")
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    failures.append(f"{where}: {c['name']} has no {probe}")
            if "limits" not in c.get("resources", {}):
                failures.append(f"{where}: {c['name']} has no resource limits")
if failures:
    sys.exit("\n".join(failures))
print("ok: DaemonSets run unprivileged with hostPID, ALL dropped, each added capability justified, probes and limits set")
PY
