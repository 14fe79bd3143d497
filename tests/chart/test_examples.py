"""Every example in examples/ is a FineTuneRun the generated CRD and the operator accept.

Three layers, each catching what the one before cannot:
1. the CRD's openAPIV3Schema (jsonschema, offline; unknown fields rejected, which
   the API server would instead prune silently);
2. the operator's own validation (``ftoperator.validation.validate_spec``: the
   checks the admission webhook runs, e.g. PPO needs a reward);
3. the real API server (`kubectl apply --dry-run=server` with the CRD installed).
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from chartlib import REPO

from localcluster.polling import wait_for_crd

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CRD_FILE = REPO / "crds" / "finetuneruns.finetune.dev.yaml"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def runs(path: Path) -> list[dict]:
    return [d for d in documents(path) if d.get("kind") == "FineTuneRun"]


RUN_EXAMPLES = [p for p in EXAMPLES if runs(p)]


def as_json_schema(node):
    """OpenAPI v3.0 (structural, as in a CRD) -> JSON Schema draft 4 (boolean exclusiveMinimum, like OpenAPI 3.0) that rejects unknown fields."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: as_json_schema(value) for key, value in node.items() if not key.startswith("x-kubernetes")}
    if node.get("nullable"):
        result.pop("nullable")
        if "type" in result:
            result["type"] = [result["type"], "null"]
        if "enum" in result and None not in result["enum"]:
            result["enum"] = [*result["enum"], None]
    if node.get("x-kubernetes-int-or-string"):
        result.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        result["additionalProperties"] = False
    return result


@pytest.fixture(scope="module")
def crd() -> dict:
    assert CRD_FILE.exists(), f"{CRD_FILE} missing: generate it with python -m ftoperator.crdgen"
    return yaml.safe_load(CRD_FILE.read_text())


def test_the_promised_examples_exist():
    names = {p.name for p in RUN_EXAMPLES}
    assert {"gpu-1b-preferences.yaml", "heuristic-rewards.yaml", "multi-gpu.yaml", "multi-node.yaml",
            "pod-template.yaml", "tiny-feedback.yaml"} <= names


def test_the_human_feedback_example_opens_two_rounds():
    from ftoperator import builders
    from ftoperator.validation import validate_spec

    spec, errors = validate_spec(runs(REPO / "examples" / "tiny-feedback.yaml")[0]["spec"])
    assert errors == [] and builders.feedback_rounds(spec) == 2


def test_the_pod_template_example_shows_every_pod_template_field():
    from ftoperator.podapi import PodTemplate

    template = runs(REPO / "examples" / "pod-template.yaml")[0]["spec"]["podTemplate"]
    shown = set(template) | {"extraResources", "schedulerName", "runtimeClassName"}  # commented out / rarely set
    assert shown == {field.alias for field in PodTemplate.model_fields.values()}


def test_examples_cover_preferences_heuristic_rewards_and_multi_gpu():
    preferences = runs(REPO / "examples" / "gpu-1b-preferences.yaml")[0]["spec"]
    assert preferences["data"]["preferences"] and preferences["resources"]["gpus"] == 1
    assert preferences["stages"]["ppo"]["precision"] == "bf16"
    heuristic = runs(REPO / "examples" / "heuristic-rewards.yaml")[0]["spec"]
    assert "preferences" not in heuristic["data"] and heuristic["stages"]["reward"]["functions"]
    assert runs(REPO / "examples" / "multi-gpu.yaml")[0]["spec"]["resources"]["gpus"] == 4


def test_the_multi_node_example_runs_sft_and_ppo_on_two_pods_and_the_reward_on_one():
    from ftoperator.gangstage import stage_nodes
    from ftoperator.validation import parse_spec

    spec, _ = parse_spec(runs(REPO / "examples" / "multi-node.yaml")[0]["spec"])
    assert [stage_nodes(spec, stage) for stage in ("sft", "reward", "ppo")] == [2, 1, 2]
    assert spec.distributed.gang_scheduler == "kueue"


def test_one_example_per_policy_algorithm():
    """PPO, GRPO, RLOO and DPO each have an example (tests/operator/test_e2e_policy_stages.py runs the new ones)."""
    def algorithm(spec: dict) -> str:
        stages = spec["stages"]
        if "grpo" in stages:
            return stages["grpo"].get("algorithm", "grpo")
        return next(stage for stage in ("ppo", "dpo") if stage in stages)

    found = {path.name: algorithm(runs(path)[0]["spec"]) for path in RUN_EXAMPLES}
    assert found["tiny-cpu.yaml"] == "ppo"
    assert found["grpo-verifiable.yaml"] == "grpo"
    assert found["rloo-reward-model.yaml"] == "rloo"
    assert found["dpo-preferences.yaml"] == "dpo"
    dpo = runs(REPO / "examples" / "dpo-preferences.yaml")[0]["spec"]
    assert "reward" not in dpo["stages"] and dpo["data"]["preferences"]
    verifiable = runs(REPO / "examples" / "grpo-verifiable.yaml")[0]["spec"]
    assert "preferences" not in verifiable["data"]
    assert [f["type"] for f in verifiable["stages"]["reward"]["functions"]] == ["numericAnswer"]


@pytest.mark.parametrize("path", RUN_EXAMPLES, ids=lambda p: p.name)
def test_example_matches_the_crd_schema(crd, path):
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = as_json_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}
    for run in runs(path):
        assert run["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(run), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{path.name}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", RUN_EXAMPLES, ids=lambda p: p.name)
def test_example_passes_the_operators_validation(path):
    from ftoperator.validation import describe, validate_spec

    for run in runs(path):
        # The multi-GPU example must pass with a limit of 8 GPUs per stage (a typical node).
        spec, errors = validate_spec(run["spec"], max_gpus_per_stage=8, default_image="trainer:test")
        assert spec is not None and not errors, f"{path.name}: {describe(errors)}"


def test_schema_check_catches_a_typo(crd):
    # Guards the guard: a misspelled field must fail the schema test above.
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = as_json_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}
    run = copy.deepcopy(runs(REPO / "examples" / "gpu-1b-preferences.yaml")[0])
    run["spec"]["stages"]["ppo"]["klCoeff"] = 0.1
    assert any("klCoeff" in e.message for e in jsonschema.Draft4Validator(schema).iter_errors(run))


@pytest.mark.cluster
def test_api_server_accepts_every_example(kube_cluster):
    namespace = "examples-dry-run"
    kube_cluster.kubectl("create", "namespace", namespace, check=False)
    kube_cluster.kubectl("apply", "-f", str(CRD_FILE))
    wait_for_crd(kube_cluster, "finetuneruns.finetune.dev")
    for path in EXAMPLES:
        result = kube_cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace,
                                      "-f", str(path), check=False)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
