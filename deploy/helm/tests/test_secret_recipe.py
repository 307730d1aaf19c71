"""The Secrets docs/deploy.md tells operators to create, plus those the chart creates, hold every
key that a rendered pod reads, in every scenario (a missing key is a CreateContainerConfigError)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helm_chart import REPO, SCENARIOS, SERVICES, name_of, pod_specs, render

from lodestar.common.auth import Role, hash_token, parse_credentials, read_credentials_document

DEPLOY_DOC = REPO / "docs" / "deploy.md"
#: Keys of a kubernetes.io/tls Secret (cert-manager adds ca.crt).
TLS_KEYS = {"tls.crt", "tls.key", "ca.crt"}


def recipe_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from every `kubectl create secret generic` in docs/deploy.md."""
    blocks = re.findall(r"```bash\n(.*?)```", DEPLOY_DOC.read_text(), re.S)
    commands = " ".join(blocks).replace("\\\n", " ")
    secrets: dict[str, set[str]] = {}
    for name, flags in re.findall(r"create secret generic (\S+)([^\n]*)", commands):
        keys = set(re.findall(r"--from-literal=([^=\s]+)=", flags))
        keys |= {Path(f.split("=")[0]).name for f in re.findall(r"--from-file=(\S+)", flags)}
        secrets.setdefault(name, set()).update(keys)
    return secrets


def secret_reads(spec: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(Secret name, key) a pod needs; key None when it mounts the whole Secret."""
    reads: list[tuple[str, str | None]] = []
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                reads.append((ref["name"], ref["key"]))
        for source in container.get("envFrom", []):
            if "secretRef" in source and not source["secretRef"].get("optional"):
                reads.append((source["secretRef"]["name"], None))
    for volume in spec.get("volumes", []):
        secret = volume.get("secret")
        if secret and not secret.get("optional"):
            items = secret.get("items") or [{"key": None}]
            reads += [(secret["secretName"], item["key"]) for item in items]
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source and not source["secret"].get("optional"):
                for item in source["secret"].get("items") or [{"key": None}]:
                    reads.append((source["secret"]["name"], item["key"]))
    return reads


def test_the_recipe_is_read() -> None:
    secrets = recipe_secrets()
    assert {"database-url"} <= secrets["lodestar-postgres"]
    tokens = {f"{name}-token" for name in ("admin", "publisher", *SERVICES.values())}
    assert {"credentials.yaml", *tokens} <= secrets["lodestar-credentials"]


@pytest.mark.parametrize("scenario", [None, *SCENARIOS], ids=lambda s: s.stem if s else "defaults")
def test_every_secret_key_a_pod_reads_is_created(scenario: Path | None) -> None:
    objects = render(files=(scenario,) if scenario else ())
    created = recipe_secrets()
    for secret in (o for o in objects if o["kind"] == "Secret"):
        keys = {*secret.get("data", {}), *secret.get("stringData", {})}
        created.setdefault(secret["metadata"]["name"], set()).update(keys)
    # Secrets a scenario names itself hold what the recipe's hold, under the keys it names.
    named_here = set(re.findall(r"[\w.-]+", scenario.read_text())) if scenario else set()
    known_keys = set().union(*created.values()) | TLS_KEYS | named_here
    for obj, spec, _ in pod_specs(objects):
        for name, key in secret_reads(spec):
            where = f"{name_of(obj)} reads Secret {name} key {key}"
            if name in created:
                assert key is None or key in created[name], f"{where}: not created"
            else:
                assert scenario, f"{where}: neither the docs nor the chart create it"
                assert name in named_here, f"{where}: neither the docs nor the chart create it"
                assert key is None or key in known_keys, f"{where}: a key nobody documents"


def test_the_defaults_need_only_what_the_recipe_creates() -> None:
    reads = {read for _, spec, _ in pod_specs(render()) for read in secret_reads(spec)}
    created = recipe_secrets()
    missing = {(name, key) for name, key in reads if key not in created.get(name, {key})}
    assert not missing
    assert {name for name, _ in reads} <= created.keys()


def test_the_credentials_recipe_runs_and_each_token_key_matches_its_principal(
    tmp_path: Path,
) -> None:
    """The shell block, run with a kubectl that records the Secrets it is asked to create."""
    block = next(
        b for b in re.findall(r"```bash\n(.*?)```", DEPLOY_DOC.read_text(), re.S) if "sha256" in b
    )
    (tmp_path / "bin").mkdir()
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"open({str(tmp_path / 'calls.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    kubectl.chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, check=True)

    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    (credentials_call,) = [c for c in calls if "lodestar-credentials" in c]
    literals = dict(
        arg.removeprefix("--from-literal=").split("=", 1)
        for arg in credentials_call
        if arg.startswith("--from-literal=")
    )
    path = tmp_path / "credentials.yaml"
    entries = parse_credentials(read_credentials_document(path), path)
    by_name = {entry.principal.name: entry for entry in entries}
    for key, token in literals.items():
        entry = by_name[key.removesuffix("-token")]
        assert entry.token_sha256 == hash_token(token), key
    assert by_name["admin"].principal.role is Role.ADMIN
    assert {by_name[name].principal.role for name in SERVICES.values()} == {Role.MODULE}
