"""The FederatedJob CustomResourceDefinition, generated from `fedsilo.spec`.

`build_crd()` turns the pydantic JSON schema (camelCase) into a Kubernetes structural
schema: `$ref`s inlined, optional fields expressed as `nullable`, draft-2020 numeric
bounds rewritten to OpenAPI v3, pydantic's `default_factory` values written as defaults,
immutable fields guarded by CEL transition rules. `crds/federatedjob.yaml` is its output;
`fedsilo crds --check` (and a test) fails when that file is stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter

from fedsilo import spec as spec_module
from fedsilo.spec import API_GROUP, API_VERSION, KIND, FederatedJobSpec

PLURAL = "federatedjobs"
SINGULAR = "federatedjob"
SHORT_NAMES = ["fedjob", "fedjobs"]
CATEGORIES = ["fedsilo"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"
PHASES = ["Pending", "Running", "Succeeded", "Failed"]

# Fields that may not change once a job exists: (path of property names, message).
IMMUTABLE_FIELDS: list[tuple[tuple[str, ...], str]] = [
    (("baseModel",), "spec.baseModel is immutable; create a new FederatedJob"),
    (("peft", "method"), "spec.peft.method is immutable; create a new FederatedJob"),
    (("task", "type"), "spec.task.type is immutable; create a new FederatedJob"),
    (("privacy",), "spec.privacy is immutable (a budget is accounted under one mechanism); create a new FederatedJob"),
]

Schema = dict[str, Any]


def _factory_defaults(schema: Schema, model: type[BaseModel]) -> Schema:
    """Write `default_factory` values (absent from pydantic's schema) as schema defaults.

    Nested models default to `{}` (the API server then fills in their own defaults);
    non-empty lists and dicts default to the factory's value; empty ones stay unset.
    """
    properties = schema.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        if field.default_factory is None or alias not in properties:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            properties[alias].setdefault("default", {})
            continue
        value = field.default_factory()  # type: ignore[call-arg]
        if value and annotation is not None:
            dumped = TypeAdapter(annotation).dump_python(value, mode="json", by_alias=True)
            properties[alias].setdefault("default", dumped)
    return schema


def _merge_any_of(options: list[Schema], defs: Schema) -> tuple[Schema, bool]:
    """Collapse pydantic's `anyOf` (optional / int-or-string) into one structural node."""
    non_null = [o for o in options if o.get("type") != "null"]
    nullable = len(non_null) < len(options)
    if sorted(o.get("type", "") for o in non_null) == ["integer", "string"]:
        return {"x-kubernetes-int-or-string": True}, nullable
    if len(non_null) != 1:
        raise ValueError(f"cannot express anyOf {options!r} as a structural schema")
    return _structural(non_null[0], defs), nullable


def _structural(node: Schema, defs: Schema) -> Schema:
    """Convert one pydantic JSON-schema node (recursively) into a structural schema node."""
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        model = getattr(spec_module, name)
        target = _factory_defaults(_structural(defs[name], defs), model)
        node = {**target, **{k: v for k, v in node.items() if k != "title"}}
    if "anyOf" in node:
        merged, nullable = _merge_any_of(node.pop("anyOf"), defs)
        node = {**merged, **node}
        if nullable:
            node["nullable"] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if exclusive in node and not isinstance(node[exclusive], bool):
            node[bound] = node.pop(exclusive)
            node[exclusive] = True
    node.pop("title", None)
    if "default" in node and node["default"] is None:
        del node["default"]
        node["nullable"] = True
    additional = node.get("additionalProperties")
    if additional is False or additional is True:
        del node["additionalProperties"]
    elif isinstance(additional, dict):
        node["additionalProperties"] = _structural(additional, defs)
    if "properties" in node:
        node["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
    if "items" in node:
        node["items"] = _structural(node["items"], defs)
    return node


def spec_schema() -> Schema:
    """The structural openAPIV3Schema of `spec`, with CEL immutability rules."""
    raw = FederatedJobSpec.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    schema = _factory_defaults(_structural(raw, defs), FederatedJobSpec)
    for path, message in IMMUTABLE_FIELDS:
        node = schema
        for part in path:
            node = node["properties"][part]
        node["x-kubernetes-validations"] = [{"rule": "self == oldSelf", "message": message}]
    silos = schema["properties"]["silos"]
    silos["x-kubernetes-list-type"] = "map"
    silos["x-kubernetes-list-map-keys"] = ["name"]
    return schema


def _string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def _integer(description: str) -> Schema:
    return {"type": "integer", "description": description}


def status_schema() -> Schema:
    """The `status` the operator writes (declared, so the API server keeps it).

    Unknown fields are preserved too: kopf keeps its own bookkeeping under `status.kopf`.
    """
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": _string("AggregatorReady, SilosReady, SpecApplied, Succeeded or Failed."),
            "status": _string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "reason": _string("One-word CamelCase reason."),
            "message": _string("Human-readable detail."),
            "lastTransitionTime": _string("When status last changed.", format="date-time"),
            "observedGeneration": _integer("metadata.generation this condition describes."),
        },
    }
    silo = {
        "type": "object",
        "properties": {
            "name": _string("Silo name."),
            "role": _string("trainer or evaluator."),
            "state": _string("The aggregator's view of the silo."),
            "joined": {"type": "boolean", "description": "Has the silo's agent joined?"},
            "roundsCompleted": _integer("Rounds this silo contributed to."),
            "lastSeen": _string("Last request from the silo.", format="date-time", nullable=True),
        },
    }
    external = {
        "type": "object",
        "properties": {
            "name": _string("Silo name."),
            "aggregatorUrl": _string("URL the silo agent connects to."),
            "tokenSecret": _string("Secret (job's namespace) holding the silo's token and URL."),
        },
    }
    privacy = {
        "type": "object",
        "description": "What protects the silos' updates, and the differential-privacy budget spent.",
        "properties": {
            "secureAggregation": {"type": "boolean", "description": "The aggregator sees only the masked sum."},
            "dp": {"type": "boolean", "description": "Client-level differential privacy is on."},
            "epsilon": {"type": "number", "description": "Epsilon spent so far (at delta)."},
            "delta": {"type": "number", "description": "The delta epsilon is reported at."},
            "targetEpsilon": {"type": "number", "description": "The budget the job may spend."},
        },
    }
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "phase": _string("Pending, Running, Succeeded or Failed.", enum=PHASES),
            "message": _string("Detail of the phase."),
            "round": _integer("Current (or last) round."),
            "rounds": _integer("Rounds the job runs."),
            "version": _integer("Version of the global adapter."),
            "accuracy": {
                "type": "number",
                "nullable": True,
                "description": "Last global accuracy.",
            },
            "loss": {"type": "number", "nullable": True, "description": "Last global loss."},
            "observedGeneration": _integer("metadata.generation the operator last reconciled."),
            "startTime": _string("When the first round started.", format="date-time"),
            "completionTime": _string("When the job finished.", format="date-time"),
            "aggregatorUrl": _string("In-cluster URL of the aggregator."),
            "adminSecret": _string("Secret with the admin token and the silo tokens."),
            "silos": {"type": "array", "items": silo},
            "privacy": privacy,
            "externalSilos": {
                "type": "array",
                "description": "What each external silo needs to join.",
                "items": external,
            },
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        },
    }


def build_crd() -> dict[str, Any]:
    """The FederatedJob CustomResourceDefinition as a dict (pure)."""
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Round", "type": "integer", "jsonPath": ".status.round"},
        {"name": "Rounds", "type": "integer", "jsonPath": ".status.rounds", "priority": 1},
        {"name": "Accuracy", "type": "number", "jsonPath": ".status.accuracy"},
        {"name": "Epsilon", "type": "number", "jsonPath": ".status.privacy.epsilon"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    schema = {
        "type": "object",
        "description": "A federated PEFT fine-tuning across organisational silos.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "fedsilo"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


HEADER = "# Generated by `fedsilo crds` from src/fedsilo/spec.py. Do not edit by hand.\n"


def render_crd() -> str:
    """The CRD as the YAML text of `crds/federatedjob.yaml`."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)


def write_crd(path: Path, check: bool = False) -> bool:
    """Write the CRD to `path`, or with `check` only compare. True when the file was current."""
    text = render_crd()
    current = path.exists() and path.read_text() == text
    if not check and not current:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return current


def default_crd_path() -> Path:
    """`crds/federatedjob.yaml` of the source checkout this module lives in."""
    return Path(__file__).resolve().parents[3] / "crds" / "federatedjob.yaml"
