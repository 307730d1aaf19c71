#!/usr/bin/env bash
# Lodestar from the shell with grpcurl and server reflection: no generated code at all.
#
#   LODESTAR_TOKEN=<admin token> bash examples/grpcurl.sh
#
# LODESTAR_CORE_ENDPOINT (core, default 127.0.0.1:50051) and LODESTAR_USAGE_ENDPOINT (the
# usage-tracker, default 127.0.0.1:50061) say where the services listen. grpcurl is the one
# `make` installs into .venv/bin, else the one on PATH.
set -euo pipefail

CORE=${LODESTAR_CORE_ENDPOINT:-127.0.0.1:50051}
USAGE=${LODESTAR_USAGE_ENDPOINT:-127.0.0.1:50061}
: "${LODESTAR_TOKEN:?set LODESTAR_TOKEN to a token (the admin one: .lodestar/tokens.yaml)}"
GRPCURL=$(dirname "$0")/../.venv/bin/grpcurl
[ -x "$GRPCURL" ] || GRPCURL=grpcurl
AUTH="authorization: Bearer $LODESTAR_TOKEN"

echo "== services core serves (reflection)"
"$GRPCURL" -plaintext "$CORE" list

echo "== RegistryService/ListModules"
"$GRPCURL" -plaintext -H "$AUTH" -d '{}' "$CORE" lodestar.core.v1.RegistryService/ListModules

echo "== UsageService/Summary: this month by model"
"$GRPCURL" -plaintext -H "$AUTH" -d '{"group_by": ["model"]}' \
  "$USAGE" lodestar.usage.v1.UsageService/Summary

echo "== a refusal: CreateBudget without a name (the details name the field)"
if "$GRPCURL" -plaintext -H "$AUTH" -d '{"budget": {}}' \
  "$USAGE" lodestar.usage.v1.BudgetService/CreateBudget; then
  echo "unexpected: an empty budget was accepted" >&2
  exit 1
fi
