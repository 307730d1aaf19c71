#!/usr/bin/env bash
# Build one image per service (services/*/pyproject.toml) from the one parameterised Dockerfile,
# deploy/docker/Dockerfile, with the repository root as build context. Needs a Docker engine with
# BuildKit. The service's package name and console script are read from its pyproject.toml.
#   REGISTRY=registry.example.com/lodestar TAG=0.1.0 PUSH=1 bash scripts/build_images.sh [service...]
# Images are named <REGISTRY>/lodestar-<service>:<TAG> (no registry prefix when REGISTRY is empty),
# matching the chart's global.image.registry / global.image.tag and <service>.image.repository.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v docker >/dev/null 2>&1; then
  echo "build_images: 'docker' was not found on PATH. Building images needs a Docker engine with" >&2
  echo "BuildKit (Docker 23+ or docker buildx); install Docker, or build deploy/docker/Dockerfile" >&2
  echo "elsewhere (--build-arg SERVICE=<service>) with the repository root as build context." >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "build_images: the docker client cannot reach a Docker engine (is the daemon running, and" >&2
  echo "may this user use it?). 'docker info' shows the error." >&2
  exit 1
fi

DOCKERFILE=deploy/docker/Dockerfile
REGISTRY="${REGISTRY:-}"
VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' deploy/helm/lodestar/Chart.yaml)"
TAG="${TAG:-$VERSION}"
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
export DOCKER_BUILDKIT=1

if (($#)); then
  services=("$@")
else
  services=()
  for pyproject in services/*/pyproject.toml; do
    [[ -f "$pyproject" ]] || continue
    services+=("$(basename "$(dirname "$pyproject")")")
  done
fi
((${#services[@]})) || { echo "build_images: no services/*/pyproject.toml found" >&2; exit 1; }

# service_identity PYPROJECT: prints "<package name> <first console script>" of a service.
service_identity() {
  awk '
    /^\[/ { section = $0; next }
    section == "[project]" && /^name *=/ && !name { gsub(/[" ]/, "", $3); name = $3 }
    section == "[project.scripts]" && /=/ && !script { script = $1 }
    END { print name, script }
  ' "$1"
}

built=()
for service in "${services[@]}"; do
  pyproject="services/$service/pyproject.toml"
  [[ -f "$pyproject" ]] || { echo "build_images: $pyproject does not exist" >&2; exit 1; }
  read -r package script <<<"$(service_identity "$pyproject")"
  [[ -n "$package" && -n "$script" ]] \
    || { echo "build_images: $pyproject needs [project] name and a [project.scripts] entry" >&2; exit 1; }
  image="lodestar-$service:$TAG"
  [[ -n "$REGISTRY" ]] && image="${REGISTRY%/}/$image"
  echo "==> building $image from $DOCKERFILE (package $package, script $script)"
  docker build \
    --file "$DOCKERFILE" \
    --build-arg "SERVICE=$service" \
    --build-arg "PACKAGE=$package" \
    --build-arg "SCRIPT=$script" \
    --build-arg "VERSION=$VERSION" \
    --build-arg "REVISION=$REVISION" \
    --build-arg "CREATED=$CREATED" \
    --tag "$image" \
    .
  if [[ "${PUSH:-0}" == "1" ]]; then
    docker push "$image"
  fi
  built+=("$image")
done
printf 'built %s\n' "${built[@]}"
