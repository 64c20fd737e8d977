"""The generated CRD: current, structural, and as strict as fedsilo.spec."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fedsilo.operator.crd import build_crd, default_crd_path, render_crd, write_crd
from fedsilo.spec import SpecError, parse_job

K8S_VERSION = "1.37.0"


def job_document() -> dict[str, Any]:
    return {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": {
            "baseModel": {"path": "/models/minilm"},
            "task": {"labels": ["neg", "pos"]},
            "training": {"rounds": 3},
            "silos": [
                {"name": "a", "data": {"path": "a.csv"}},
                {
                    "name": "b",
                    "data": {"path": "b.csv"},
                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                },
            ],
        },
    }


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out += walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            out += walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


def openapi() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def as_jsonschema(node: Any) -> Any:
    """Emulate the API server: nullable, int-or-string, and strict unknown-field rejection."""
    if isinstance(node, list):
        return [as_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def server_validate(document: dict[str, Any]) -> None:
    schema = as_jsonschema(openapi())
    schema["properties"]["metadata"] = {"type": "object"}
    jsonschema.Draft4Validator(schema).validate(document)


def test_file_is_current() -> None:
    path = default_crd_path()
    assert path.read_text() == render_crd(), "crds/federatedjob.yaml is stale: run `fedsilo crds`"
    assert write_crd(path, check=True)


def test_write_crd_check_reports_stale(tmp_path: Any) -> None:
    target = tmp_path / "crd.yaml"
    assert not write_crd(target, check=True)
    assert not target.exists()
    assert not write_crd(target)
    assert write_crd(target, check=True)


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(yaml.safe_load(render_crd()), K8S_VERSION, strict=True)


def test_schema_is_structural() -> None:
    text = render_crd()
    assert "$ref" not in text and "$defs" not in text and "anyOf" not in text
    for path, node in walk(openapi()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert "title" not in node and "const" not in node, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, True), bool), f"{path}: {bound} must be a boolean"
        if "properties" in node:
            assert node["type"] == "object", path


def test_names_columns_and_status() -> None:
    spec = build_crd()["spec"]
    assert spec["names"]["shortNames"][0] == "fedjob"
    assert "fedsilo" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Phase", "Round", "Accuracy", "Age"} <= set(columns)
    status = openapi()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert {"phase", "round", "accuracy", "loss", "conditions", "silos", "externalSilos"} <= set(status["properties"])


def test_validation_enums_minimums_defaults_nullable() -> None:
    spec = openapi()["properties"]["spec"]
    assert spec["required"] == ["baseModel", "silos"]
    training = spec["properties"]["training"]
    assert training["properties"]["rounds"] == {
        **training["properties"]["rounds"],
        "minimum": 1,
        "maximum": 10000,
        "default": 3,
    }
    assert training["properties"]["learningRate"]["exclusiveMinimum"] is True
    assert training["properties"]["localSteps"]["nullable"] is True
    assert spec["properties"]["peft"]["properties"]["method"]["enum"][0] == "lora"
    assert spec["properties"]["peft"]["properties"]["targetModules"]["default"] == [
        "query",
        "value",
    ]
    assert spec["properties"]["training"]["default"] == {}
    silo = spec["properties"]["silos"]["items"]
    assert silo["required"] == ["name", "data"]
    assert spec["properties"]["silos"]["x-kubernetes-list-map-keys"] == ["name"]
    limits = silo["properties"]["resources"]["properties"]["limits"]["additionalProperties"]
    assert limits == {"x-kubernetes-int-or-string": True}


def test_immutable_fields_have_cel_rules() -> None:
    spec = openapi()["properties"]["spec"]["properties"]
    for node in (
        spec["baseModel"],
        spec["peft"]["properties"]["method"],
        spec["task"]["properties"]["type"],
    ):
        rules = node["x-kubernetes-validations"]
        assert rules[0]["rule"] == "self == oldSelf"
        assert "immutable" in rules[0]["message"]


def test_good_document_passes_both() -> None:
    document = job_document()
    parse_job(document)
    server_validate(document)


def _unknown_field(d: dict[str, Any]) -> None:
    d["spec"]["training"]["roundz"] = 5


def _negative_rounds(d: dict[str, Any]) -> None:
    d["spec"]["training"]["rounds"] = -1


def _silo_without_data(d: dict[str, Any]) -> None:
    del d["spec"]["silos"][1]["data"]


def _bad_enum(d: dict[str, Any]) -> None:
    d["spec"]["peft"] = {"method": "qlora"}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_unknown_field, "roundz"),
        (_negative_rounds, "rounds"),
        (_silo_without_data, "data"),
        (_bad_enum, "method"),
    ],
)
def test_bad_documents_refused_naming_the_field(mutate: Any, field: str) -> None:
    document = copy.deepcopy(job_document())
    mutate(document)
    with pytest.raises(SpecError) as spec_error:
        parse_job(document)
    assert field in str(spec_error.value)
    with pytest.raises(jsonschema.ValidationError) as schema_error:
        server_validate(document)
    error = schema_error.value
    assert field in error.message or field in list(error.absolute_path)
