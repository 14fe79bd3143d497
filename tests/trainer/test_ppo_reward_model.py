"""PPO against a trained reward model: the reward stage's output feeds the reward and the value model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer import ppo
from trainer.runtime import StageFailed

from .stage_runs import max_abs_diff, run_in_process, write_job
from .test_ppo import ppo_job, samples_by_step
from .test_reward_model import reward_job


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The reward stage's final/ directory after one epoch on the polite-vs-rude preferences (~1 s)."""
    tmp_path = tmp_path_factory.mktemp("reward-stage")
    job = reward_job(tmp_path, tiny_model_dir, epochs=1, evalFraction=0.0)
    assert run_in_process("reward", write_job(tmp_path / "reward.yaml", **job)) == 0
    return tmp_path / "out" / "final"


def _raw_reward_model_scores(reward_model_dir: Path, prompts: list[str], responses: list[str]) -> list[float]:
    """Unnormalised scores, one text at a time (no padding), encoded as the reward stage trains."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.data import encode_for_reward

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    scores = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            ids = encode_for_reward(tokenizer, prompt=prompt, response=response, max_length=512)
            scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return scores


def test_ppo_with_a_trained_reward_model_scores_with_its_normalisation(tmp_path, tiny_model_dir, reward_model_dir,
                                                                       capsys):
    from transformers import AutoModelForCausalLM

    job = ppo_job(tmp_path, tiny_model_dir, output="out", steps=2, sampleEverySteps=1, checkpointEverySteps=100,
                  missingEosPenalty=None, rewardModelWeight=0.5,
                  functions=[{"type": "keywords", "keywords": ["cats"]}])
    job["rewardModel"] = str(reward_model_dir)
    assert run_in_process("ppo", write_job(tmp_path / "ppo.yaml", **job)) == 0
    assert f"[ppo] value model initialised from {reward_model_dir}" in capsys.readouterr().out
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")

    # Every held-out reward is keywords + 0.5 * (rm - mean) / std with the reward stage's own statistics.
    stats = json.loads((reward_model_dir / "reward_normalization.json").read_text())
    samples = [s for step in samples_by_step(tmp_path / "out").values() for s in step]
    raw = _raw_reward_model_scores(reward_model_dir, [s["prompt"] for s in samples],
                                   [s["response"] for s in samples])
    keyword = [float("cats" in s["response"].lower()) for s in samples]
    expected = [k + 0.5 * (r - stats["mean"]) / stats["std"] for k, r in zip(keyword, raw)]
    assert [s["reward"] for s in samples] == pytest.approx(expected, abs=1e-4)
    # ... and not the raw score: the check above can tell the two apart.
    assert [s["reward"] for s in samples] != pytest.approx([k + 0.5 * r for k, r in zip(keyword, raw)], abs=1e-4)


def test_value_model_starts_from_the_reward_models_backbone_with_a_zero_head(tiny_model_dir, reward_model_dir):
    from transformers import AutoModel, AutoModelForSequenceClassification

    value = ppo.ValueModel.from_pretrained(str(reward_model_dir), dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir)
    assert max_abs_diff(value.backbone.state_dict(), reward_model.model.state_dict()) == 0.0
    # The reward stage trained the backbone, so this is not the SFT model's backbone by another name.
    sft_backbone = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    assert max_abs_diff(value.backbone.state_dict(), sft_backbone) > 1e-4
    assert not value.head.weight.any() and not value.head.bias.any()


def test_reward_model_setting_is_used_only_when_it_holds_a_model(tmp_path, reward_model_dir):
    assert ppo.reward_model_source(None) is None
    assert str(ppo.reward_model_source(str(reward_model_dir))) == str(reward_model_dir)
    functions_only = tmp_path / "functions-only"  # a reward stage trained on no preferences
    functions_only.mkdir()
    (functions_only / "reward_functions.json").write_text('{"functions": []}')
    assert ppo.reward_model_source(str(functions_only)) is None
    with pytest.raises(StageFailed, match=r"rewardModel: model directory .*/typo does not exist"):
        ppo.reward_model_source(str(tmp_path / "typo"))

