"""Generate deploy/helm/lodestar/values.schema.json (strict: unknown keys and wrong types fail).

    .venv/bin/python deploy/helm/tools/gen_values_schema.py          # rewrite the schema
    .venv/bin/python deploy/helm/tools/gen_values_schema.py --check  # exit 1 if it is stale

The services come from deploy/helm/lodestar/services.yaml (one values block each). They share one
definition with serviceDefaults, so a key added to the defaults can be overridden by every service.
A service's ``config`` block is checked against the keys of its settings class (from the installed
packages), so a typo fails ``helm template`` instead of the pod's start; its values are left to the
service's loader (see ``settings_schema``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lodestar.common.cli import installed_services
from lodestar.common.config import ServiceSettings

CHART = Path(__file__).resolve().parents[1] / "lodestar"
SCHEMA_PATH = CHART / "values.schema.json"
SERVICES: dict[str, dict[str, str]] = yaml.safe_load((CHART / "services.yaml").read_text())

Schema = dict[str, Any]


def obj(
    props: dict[str, Schema], description: str = "", required: list[str] | None = None
) -> Schema:
    """A closed object: any key not listed is an error."""
    out: Schema = {"type": "object", "additionalProperties": False, "properties": props}
    if description:
        out["description"] = description
    if required:
        out["required"] = required
    return out


def string(description: str = "", **extra: Any) -> Schema:
    """A string, with ``description`` when given and any other JSON Schema keywords in ``extra``."""
    return {"type": "string", **({"description": description} if description else {}), **extra}


BOOL: Schema = {"type": "boolean"}
MAP: Schema = {"type": "object", "description": "free-form map"}
STR_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
LIST_OF_OBJECTS: Schema = {"type": "array", "items": {"type": "object"}}
PORT: Schema = {"type": "integer", "minimum": 1, "maximum": 65535}
NAME: Schema = string(pattern=r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", maxLength=253)
DURATION: Schema = string(pattern=r"^[0-9]+(ms|s|m|h)$")
QUANTITY: Schema = {"type": ["string", "number"]}
INT_OR_PERCENT: Schema = {
    "oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9]+%$"}]
}


def nonneg(minimum: int = 0) -> Schema:
    """An integer of at least ``minimum``."""
    return {"type": "integer", "minimum": minimum}


RESOURCES = obj(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
        "claims": LIST_OF_OBJECTS,
    },
    "Kubernetes ResourceRequirements",
)
LABEL_SELECTOR = obj({"matchLabels": STR_MAP, "matchExpressions": LIST_OF_OBJECTS})


def probe(readiness: bool = False) -> Schema:
    """A probe's timings; a readiness probe also has ``successThreshold``."""
    props = {
        "initialDelaySeconds": nonneg(),
        "periodSeconds": nonneg(1),
        "timeoutSeconds": nonneg(1),
        "failureThreshold": nonneg(1),
    }
    if readiness:
        props["successThreshold"] = nonneg(1)
    return obj(props, "probe timings (the gRPC action is set by the chart)")


def service(key: str) -> Schema:
    """The values block of one service: its own keys plus any key of serviceDefaults."""
    props = service_settings(key)
    props["image"]["required"] = ["repository"]
    return obj({"enabled": BOOL, **props}, SERVICES[key]["description"], required=["enabled"])


def service_defaults() -> Schema:
    """serviceDefaults: every setting a service may override, except what names the service."""
    props = service_settings(None)
    del props["image"]["properties"]["repository"]
    del props["database"]["properties"]["schemaName"]
    return obj(props, "defaults of every service; each service's block overrides them")


def settings_schema(settings_cls: type[BaseModel], description: str) -> Schema:
    """The shape of ``settings_cls``: its keys, nested, and nothing more.

    Unknown keys are refused at every level. Values are left to the service, whose loader is more
    lenient than a JSON schema would be (``log_level: info``, quoted numbers) and checks what a
    schema cannot (one field against another); required fields are left out, because the chart
    merges serviceDefaults into each service's block after the schema checked them apart.
    """
    raw = settings_cls.model_json_schema()
    definitions = raw.pop("$defs", {})

    def shape(node: Schema) -> Schema:
        if "$ref" in node:
            return shape(definitions[node["$ref"].rsplit("/", 1)[1]])
        options = [option for option in node.get("anyOf", []) if option.get("type") != "null"]
        objects = [shape(option) for option in options]
        if len(objects) == 1 and objects[0]:
            return {**objects[0], "type": ["object", "null"]}
        if "properties" in node:
            return {
                "type": "object",
                "additionalProperties": False,
                "properties": {name: shape(sub) for name, sub in node["properties"].items()},
            }
        if isinstance(node.get("additionalProperties"), dict):  # a map of settings objects
            return {"type": "object", "additionalProperties": shape(node["additionalProperties"])}
        return {}  # a value: the service checks it

    return {**shape(raw), "description": description}


def config_schema(key: str | None) -> Schema:
    """A service's ``config`` block: its settings; serviceDefaults': those every service has."""
    if key is None:
        return settings_schema(ServiceSettings, "merged into every service's config file")
    settings_cls = installed_services()[SERVICES[key]["name"]].settings_cls
    return settings_schema(settings_cls, "rendered as the module's YAML config file")


def service_settings(key: str | None) -> dict[str, Schema]:
    """The settings of a service (``key``) or of serviceDefaults (None)."""
    network = {
        "clients": {
            **LIST_OF_OBJECTS,
            "description": "NetworkPolicyPeer list admitted on the service's gRPC ports",
        },
        "extraIngress": LIST_OF_OBJECTS,
        "extraEgress": LIST_OF_OBJECTS,
    }
    if key is not None and SERVICES[key]["name"] == "health-monitor":
        network["providers"] = {
            **LIST_OF_OBJECTS,
            "description": "NetworkPolicyEgressRule list: LLM providers the health monitor probes",
        }
    return {
        "image": obj(
            {
                "repository": string(minLength=1),
                "tag": string(),
                "digest": string(pattern=r"^$|^sha256:[0-9a-f]{64}$"),
            },
        ),
        "replicas": nonneg(0),
        "config": config_schema(key),
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": string(minLength=1)},
            },
        },
        "envFrom": LIST_OF_OBJECTS,
        "resources": RESOURCES,
        "probes": obj(
            {"startup": probe(), "liveness": probe(), "readiness": probe(readiness=True)}
        ),
        "autoscaling": obj(
            {
                "enabled": BOOL,
                "minReplicas": nonneg(1),
                "maxReplicas": nonneg(1),
                "targetCPUUtilizationPercentage": {"type": ["integer", "null"], "minimum": 1},
                "targetMemoryUtilizationPercentage": {
                    "type": ["integer", "null"],
                    "minimum": 1,
                },
                "behavior": MAP,
            }
        ),
        "podDisruptionBudget": obj(
            {
                "enabled": BOOL,
                "minAvailable": {"oneOf": [{"type": "null"}, *INT_OR_PERCENT["oneOf"]]},
                "maxUnavailable": {"oneOf": [{"type": "null"}, *INT_OR_PERCENT["oneOf"]]},
            }
        ),
        "database": obj(
            {
                "existingSecret": NAME,
                "urlKey": string(),
                "schemaName": string(pattern=r"^[a-z_][a-z0-9_]{0,62}$"),
            }
        ),
        "migrations": obj({"enabled": BOOL}),
        "terminationGracePeriodSeconds": nonneg(1),
        "shutdownGraceSeconds": {"type": "number", "exclusiveMinimum": 0},
        "tmpDir": obj({"sizeLimit": QUANTITY, "medium": {"enum": ["", "Memory"]}}),
        "annotations": STR_MAP,
        "podAnnotations": STR_MAP,
        "podLabels": STR_MAP,
        "service": obj(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "annotations": STR_MAP,
            }
        ),
        "serviceAccount": obj({"annotations": STR_MAP}),
        "nodeSelector": STR_MAP,
        "tolerations": LIST_OF_OBJECTS,
        "affinity": MAP,
        "topologySpreadConstraints": LIST_OF_OBJECTS,
        "priorityClassName": string(),
        "networkPolicy": obj(network),
    }


def schema() -> Schema:
    """The whole values schema: global settings and one block per service of services.yaml."""
    peers = {**LIST_OF_OBJECTS, "description": "NetworkPolicyPeer list"}
    top: dict[str, Schema] = {
        "nameOverride": string(),
        "fullnameOverride": string(),
        "global": obj(
            {
                "image": obj(
                    {
                        "registry": string(),
                        "tag": string(),
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                        "pullSecrets": {"type": "array", "items": string(minLength=1)},
                    }
                ),
                "commonLabels": STR_MAP,
                "config": {**MAP, "description": "rendered as /etc/lodestar/lodestar.yaml"},
                "ports": obj({"grpc": PORT, "metrics": PORT, "health": PORT}),
                "coreEndpoint": string(),
                "postgres": obj({"existingSecret": NAME, "urlKey": string(minLength=1)}),
                "credentials": obj({"existingSecret": NAME, "generate": BOOL}),
                "tls": obj({"enabled": BOOL, "existingSecret": NAME, "mutual": BOOL}),
                "otel": obj(
                    {
                        "endpoint": string(),
                        "protocol": {"enum": ["grpc", "http/protobuf"]},
                        "resourceAttributes": STR_MAP,
                    }
                ),
                "networkPolicy": obj(
                    {
                        "enabled": BOOL,
                        "dns": obj(
                            {"namespaceSelector": LABEL_SELECTOR, "podSelector": LABEL_SELECTOR}
                        ),
                        "postgres": obj({"port": PORT, "to": peers}),
                        "otel": obj({"port": PORT, "to": peers}),
                        "prometheus": peers,
                    }
                ),
            }
        ),
        "migrations": obj(
            {
                "enabled": BOOL,
                "backoffLimit": nonneg(),
                "activeDeadlineSeconds": nonneg(1),
                "ttlSecondsAfterFinished": nonneg(),
                "resources": RESOURCES,
            }
        ),
        "monitoring": obj(
            {
                "serviceMonitor": obj(
                    {
                        "enabled": BOOL,
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "labels": STR_MAP,
                    }
                ),
                "prometheusRule": obj(
                    {
                        "enabled": BOOL,
                        "labels": STR_MAP,
                        "subscriptionLagThreshold": nonneg(1),
                        "lagFor": DURATION,
                        "moduleDownFor": DURATION,
                    }
                ),
                "grafanaDashboard": obj(
                    {"enabled": BOOL, "labels": STR_MAP, "annotations": STR_MAP}
                ),
            }
        ),
        "postgresql": obj(
            {
                "enabled": BOOL,
                "image": obj(
                    {
                        "registry": string(),
                        "repository": string(minLength=1),
                        "tag": string(minLength=1),
                    }
                ),
                "database": string(minLength=1),
                "username": string(minLength=1),
                "password": string(),
                "persistence": obj({"enabled": BOOL, "size": QUANTITY, "storageClass": string()}),
                "resources": RESOURCES,
            },
            "development only: a single-instance PostgreSQL",
        ),
        "tests": obj({"enabled": BOOL, "resources": RESOURCES}),
        "serviceDefaults": service_defaults(),
    }
    for key in SERVICES:
        top[key] = service(key)
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the Lodestar Helm chart",
        "type": "object",
        "additionalProperties": False,
        "properties": top,
        "required": ["global", *SERVICES],
    }


def main() -> int:
    """Write the schema, or with ``--check`` exit 1 when the committed one is stale."""
    text = json.dumps(schema(), indent=2) + "\n"
    if "--check" in sys.argv:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run python3 {Path(__file__).as_posix()}")
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
