"""End to end on the real node: the GRPO, RLOO and DPO examples reach Succeeded through `kubectl apply`.

Each example in examples/ is applied as it is, all at once into one namespace (the node runs what fits;
the rest waits), and each test waits for its own run: Succeeded, the printer columns of its policy
stage filled (Reward and KL for GRPO and RLOO, Pref-Acc and Margin for DPO), its samples or metrics in
the status and a final model that transformers loads. The time from apply to Succeeded is printed.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_e2e_operator import (  # noqa: E402, F401  (api, operator: pytest fixtures, used by name)
    REPO, api, delete_namespace, operator, pod_names, populated_namespace, printed_columns, wait_state,
)

pytestmark = pytest.mark.cluster

EXAMPLES = {"grpo": "grpo-verifiable.yaml", "rloo": "rloo-reward-model.yaml", "dpo": "dpo-preferences.yaml"}
FILLERS = "good bad great happy sad yes no please hello world weather today tomorrow love hate kind nice".split()
ANSWERS = {"cats": 3, "dogs": 7}
"""examples/grpo-verifiable.yaml's task: the answer is the digit the prompt's first word stands for."""


def digit_rows(n: int, *, seed: int, with_answer: bool) -> list[dict]:
    """Prompts "cats good yes?"; with_answer: {"answer": "3"} (prompts), else a random digit as the completion (SFT)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        key = rng.choice(sorted(ANSWERS))
        prompt = f"{key} {rng.choice(FILLERS)} {rng.choice(FILLERS)}?"
        rows.append({"prompt": prompt, "answer": str(ANSWERS[key])} if with_answer
                    else {"prompt": prompt, "completion": f" {rng.randrange(10)}"})
    return rows


def example(name: str) -> dict:
    return yaml.safe_load((REPO / "examples" / EXAMPLES[name]).read_text())


@pytest.fixture(scope="module")
def applied(kube_cluster, tiny_model_dir, operator):
    """One namespace with the toy data of every example, every example applied; yields (namespace, apply times)."""
    namespace = populated_namespace(kube_cluster, tiny_model_dir)
    datasets = kube_cluster.pvc_dir(namespace, "datasets")
    for file, rows in {"digits-sft.jsonl": digit_rows(640, seed=1, with_answer=False),
                       "digits-prompts.jsonl": digit_rows(128, seed=7, with_answer=True)}.items():
        (datasets / file).write_text("".join(json.dumps(row) + "\n" for row in rows))
    applied_at = {}
    for name, file in EXAMPLES.items():
        kube_cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / file))
        applied_at[name] = time.monotonic()
    yield namespace, applied_at
    delete_namespace(kube_cluster, namespace)


def succeeded(kube_cluster, api, applied, name: str) -> tuple[dict, dict[str, str]]:
    """Wait for the example's run to end; its status and printed columns once Succeeded."""
    namespace, applied_at = applied
    run = example(name)["metadata"]["name"]
    status = wait_state(api, namespace, run, "Succeeded", "Failed", timeout=600)
    stages = ", ".join(f"{stage} {s.get('startTime')}..{s.get('completionTime')}"
                       for stage, s in status["stages"].items())
    print(f"{EXAMPLES[name]}: apply to {status['state']} in {time.monotonic() - applied_at[name]:.0f}s ({stages}); "
          f"columns {printed_columns(kube_cluster, namespace, run)}")
    assert status["state"] == "Succeeded", json.dumps(status, indent=1)[-3000:]
    return status, printed_columns(kube_cluster, namespace, run)


def final_model_loads(kube_cluster, namespace: str, run: str, stage: str) -> None:
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(kube_cluster.pvc_dir(namespace, "runs") / namespace / run / stage
                                                / "final") is not None


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_grpo_and_rloo_examples_succeed_with_reward_and_kl_columns(kube_cluster, api, applied, name):
    namespace = applied[0]
    spec = example(name)["spec"]
    run, steps = example(name)["metadata"]["name"], spec["stages"]["grpo"]["steps"]
    status, row = succeeded(kube_cluster, api, applied, name)

    assert (row["STAGE"], row["PROGRESS"], row["STATUS"]) == ("grpo", f"grpo {steps}/{steps}", "Succeeded"), row
    reward, kl = float(row["REWARD"]), float(row["KL"])
    assert kl >= 0.0  # k3, non-negative
    if name == "grpo":
        assert -1.0 <= reward <= 1.0  # numericAnswer scores 0 or 1, less 1 for a response without EOS
    assert row["PREF-ACC"] == row["MARGIN"] == "", row
    grpo = status["stages"]["grpo"]
    assert (grpo["step"], grpo["totalSteps"], grpo["attempts"]) == (steps, steps, 1)
    assert {"reward_mean", "kl", "eval_reward_mean"} <= set(grpo["metrics"])
    assert status["samples"] and {s["stage"] for s in status["samples"]} == {"grpo"}
    if name == "grpo":  # verifiable reward from functions: no reward model is trained, so no reward pod
        assert status["stages"]["reward"]["state"] == "Skipped"
        assert pod_names(api, namespace, run) == [f"{run}-grpo-1", f"{run}-sft-1"]
    else:  # the trained reward model scores RLOO
        assert status["stages"]["reward"]["state"] == "Succeeded"
        assert pod_names(api, namespace, run) == [f"{run}-grpo-1", f"{run}-reward-1", f"{run}-sft-1"]
    final_model_loads(kube_cluster, namespace, run, "grpo")


def test_dpo_example_succeeds_with_preference_accuracy_and_margin_columns(kube_cluster, api, applied):
    namespace = applied[0]
    run = example("dpo")["metadata"]["name"]
    status, row = succeeded(kube_cluster, api, applied, "dpo")

    steps = example("dpo")["spec"]["stages"]["dpo"]["maxSteps"]
    assert (row["STAGE"], row["PROGRESS"], row["STATUS"]) == ("dpo", f"dpo {steps}/{steps}", "Succeeded"), row
    assert 0.0 <= float(row["PREF-ACC"]) <= 1.0
    float(row["MARGIN"])
    assert row["REWARD"] == row["KL"] == "", row
    metrics = status["stages"]["dpo"]["metrics"]
    assert {"loss", "reward_margin", "preference_accuracy", "eval_preference_accuracy",
            "eval_reward_margin"} <= set(metrics)
    assert float(row["PREF-ACC"]) == pytest.approx(metrics["eval_preference_accuracy"], abs=1e-4)
    assert status["samples"] and all(s["stage"] == "dpo" and {"prompt", "chosen", "rejected", "chosenReward"} <= set(s)
                                     for s in status["samples"])
    assert pod_names(api, namespace, run) == [f"{run}-dpo-1", f"{run}-sft-1"]
    final_model_loads(kube_cluster, namespace, run, "dpo")
