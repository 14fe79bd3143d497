"""The CRD is generated from the pydantic models, structural, and committed fresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftoperator import crdgen
from ftoperator.crdgen import SchemaError, structural

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "finetuneruns.finetune.dev.yaml"


def walk(schema, path="spec"):
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}.*")


def version_schema():
    return crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_up_to_date():
    assert CRD_FILE.read_text() == crdgen.render(), (
        "crds/finetuneruns.finetune.dev.yaml is stale: run `python -m ftoperator.crdgen > "
        "crds/finetuneruns.finetune.dev.yaml`")


def test_schema_is_structural_every_node_typed_no_refs_no_nullable_unions():
    for path, node in walk(version_schema()):
        assert "$ref" not in node and "$defs" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf only for int-or-string"
        assert node.get("additionalProperties") is not False, path
        assert "title" not in node, path


def test_every_spec_field_is_described_for_kubectl_explain():
    spec = version_schema()["properties"]["spec"]
    undocumented = [path for path, node in walk(spec) if not path.endswith(".*") and not path.endswith("[]")
                    and not node.get("description")]
    assert undocumented == []


def test_every_default_passes_its_bounds_as_kubernetes_1_20_checks_them():
    """A whole-number default (0.0) reaches the API server as an integer, which 1.20 compares with the bounds
    truncated to integers: `default: 0.0` below `maximum: 0.5, exclusiveMaximum: true` refused the whole CRD
    (dpo.labelSmoothing). Checked here, as the server would, so that no cluster is needed to find it."""
    import math

    refused = []
    for path, node in walk(version_schema()):
        default = node.get("default")
        if isinstance(default, bool) or not isinstance(default, (int, float)) or default != int(default):
            continue
        value = int(default)
        if "maximum" in node:
            bound = math.trunc(node["maximum"])
            if value > bound or (node.get("exclusiveMaximum") and value >= bound):
                refused.append(f"{path}: default {default} against maximum {node['maximum']}")
        if "minimum" in node:
            bound = math.trunc(node["minimum"])
            if value < bound or (node.get("exclusiveMinimum") and value <= bound):
                refused.append(f"{path}: default {default} against minimum {node['minimum']}")
    assert refused == []


def test_trainer_settings_and_their_defaults_reach_the_crd():
    stages = version_schema()["properties"]["spec"]["properties"]["stages"]["properties"]
    ppo = stages["ppo"]["properties"]
    assert ppo["klCoef"]["default"] == 0.05
    assert ppo["learningRate"]["minimum"] == 0 and ppo["learningRate"]["exclusiveMinimum"] is True
    assert ppo["klEstimator"]["enum"] == ["k1", "k3"]
    assert ppo["adaptiveKl"]["type"] == "object" and "nullable" not in ppo["adaptiveKl"]
    assert ppo["stopToken"]["nullable"] is True, "stopToken: null (no stop token) differs from the default"
    assert ppo["enabled"]["default"] is True
    assert stages["reward"]["properties"]["functions"]["items"]["properties"]["type"]["enum"]


def test_printer_columns_read_summary_fields_not_the_last_condition():
    columns = {c["name"]: c["jsonPath"] for c in crdgen.crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns == {"Stage": ".status.currentStage", "Progress": ".status.progress", "Reward": ".status.reward",
                       "KL": ".status.kl", "Pref-Acc": ".status.preferenceAccuracy",
                       "Margin": ".status.rewardMargin", "Status": ".status.state",
                       "Age": ".metadata.creationTimestamp"}
    status = version_schema()["properties"]["status"]["properties"]
    for field in ("currentStage", "progress", "reward", "kl", "preferenceAccuracy", "rewardMargin", "state"):
        assert field in status


def test_status_conditions_are_a_map_list_keyed_by_type():
    conditions = version_schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert {"type", "status", "reason", "lastTransitionTime"} <= set(conditions["items"]["required"])


def test_crd_names_and_scope():
    names = crdgen.crd()["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("FineTuneRun", "finetuneruns", ["ftr"])
    assert crdgen.crd()["spec"]["scope"] == "Namespaced"
    assert crdgen.crd()["spec"]["versions"][0]["subresources"] == {"status": {}}
    assert yaml.safe_load(crdgen.render()) == crdgen.crd()


def test_a_union_with_no_structural_form_is_an_error_naming_the_field():
    with pytest.raises(SchemaError, match=r"\.x: anyOf"):
        structural({"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
                   {})
