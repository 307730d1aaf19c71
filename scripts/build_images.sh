#!/usr/bin/env bash
# Build one image per service that has a Dockerfile (services/*/Dockerfile), from the repository
# root as build context. Needs a Docker engine with BuildKit.
#   REGISTRY=registry.example.com/lodestar TAG=0.1.0 PUSH=1 bash scripts/build_images.sh [service...]
# Images are named <REGISTRY>/lodestar-<service>:<TAG> (no registry prefix when REGISTRY is empty),
# matching the chart's global.image.registry / global.image.tag and <service>.image.repository.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v docker >/dev/null 2>&1; then
  echo "build_images: 'docker' was not found on PATH. Building images needs a Docker engine with" >&2
  echo "BuildKit (Docker 23+ or docker buildx); install Docker, or build services/*/Dockerfile" >&2
  echo "elsewhere with the repository root as build context." >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "build_images: the docker client cannot reach a Docker engine (is the daemon running, and" >&2
  echo "may this user use it?). 'docker info' shows the error." >&2
  exit 1
fi

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
  for dockerfile in services/*/Dockerfile; do
    [[ -f "$dockerfile" ]] || continue
    services+=("$(basename "$(dirname "$dockerfile")")")
  done
fi
((${#services[@]})) || { echo "build_images: no services/*/Dockerfile found" >&2; exit 1; }

built=()
for service in "${services[@]}"; do
  dockerfile="services/$service/Dockerfile"
  [[ -f "$dockerfile" ]] || { echo "build_images: $dockerfile does not exist" >&2; exit 1; }
  image="lodestar-$service:$TAG"
  [[ -n "$REGISTRY" ]] && image="${REGISTRY%/}/$image"
  echo "==> building $image from $dockerfile"
  docker build \
    --file "$dockerfile" \
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
