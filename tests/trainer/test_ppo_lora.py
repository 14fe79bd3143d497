"""PPO (and GRPO) with LoRA: the reference is the policy's own frozen base, the value model is LoRA too,
the frozen base loads in the compute dtype, and checkpoints hold adapters and optimizer state, not the base."""

from __future__ import annotations

import pytest
import torch

from trainer.checkpoint import complete_checkpoints
from trainer.config import LoraConfig
from trainer.modeling import AdapterDisabled, load_causal_lm, load_reference
from trainer.ppo import ValueModel

from .stage_runs import (checkpoint_tensor_names, final_weight_difference, kill_and_resume, load_state_dict,
                         max_abs_diff, progress_events, run_cli, write_job)
from .test_ppo import ppo_job, toy_sft_dir  # noqa: F401  (fixture)

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}


def _lora() -> LoraConfig:
    return LoraConfig.model_validate(LORA)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_a_lora_policys_reference_is_its_frozen_base_and_equals_the_sft_model_after_training(tiny_model_dir):
    policy = load_causal_lm(tiny_model_dir, dtype=torch.float32, lora=_lora())
    reference, said = load_reference(tiny_model_dir, policy=policy, lora=_lora(), dtype=torch.float32)
    assert isinstance(reference, AdapterDisabled)
    assert "adapters disabled" in said
    for name, param in policy.named_parameters():  # as if trained: adapters move, the base does not
        if param.requires_grad:
            param.data.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    sft = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    assert torch.equal(_logits(reference, ids), _logits(sft, ids))
    assert not torch.allclose(_logits(policy, ids), _logits(sft, ids))  # the adapters are back on after the call


def test_a_separate_reference_is_loaded_and_the_log_says_why_when_the_base_cannot_be_shared(tiny_model_dir):
    full = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    reference, said = load_reference(tiny_model_dir, policy=full, lora=None, dtype=torch.float32)
    assert not isinstance(reference, AdapterDisabled) and "fully fine-tuned" in said
    assert not any(p.requires_grad for p in reference.parameters())
    other_dtype = load_causal_lm(tiny_model_dir, dtype=torch.float32, lora=_lora())
    reference, said = load_reference(tiny_model_dir, policy=other_dtype, lora=_lora(), dtype=torch.bfloat16)
    assert not isinstance(reference, AdapterDisabled) and "torch.float32" in said


def test_with_lora_the_frozen_base_is_in_the_compute_dtype_and_only_adapters_are_fp32(tiny_model_dir):
    policy = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16, lora=_lora())
    trained = {p.dtype for p in policy.parameters() if p.requires_grad}
    frozen = {p.dtype for p in policy.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}


def test_a_lora_value_model_trains_only_adapters_and_its_fp32_head(tiny_model_dir):
    value = ValueModel.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16, lora=_lora())
    trained = {n for n, p in value.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("head.") for n in trained)
    assert value.head.weight.dtype == torch.float32
    assert {p.dtype for p in value.parameters() if not p.requires_grad} == {torch.bfloat16}
    ids = torch.tensor([[5, 6, 7]])
    out = value(ids, torch.ones_like(ids), torch.arange(3)[None])
    assert out.shape == (1, 3) and out.dtype == torch.float32


def test_lora_ppo_checkpoints_hold_adapters_not_the_base_and_resume_bit_identically(tmp_path, toy_sft_dir):  # noqa: F811
    """Subprocesses with one thread, as in test_ppo's resume test; asserted < 1e-5 (observed 0)."""
    settings = dict(steps=4, checkpointEverySteps=2, lora=LORA, learningRate=1e-2)
    straight = write_job(tmp_path / "straight.yaml", **ppo_job(tmp_path, toy_sft_dir, output="straight", **settings))
    result = run_cli("ppo", straight)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference: the policy's frozen base with its LoRA adapters disabled" in result.stdout + result.stderr
    assert "LoRA" in result.stdout + result.stderr  # the value model too
    metrics = [e["metrics"] for e in progress_events(tmp_path / "straight") if e.get("metrics") and "kl" in e["metrics"]]
    assert abs(metrics[0]["kl"]) < 1e-4  # policy == its own base before the first update

    checkpoint = complete_checkpoints(tmp_path / "straight")[-1][1]
    keys = checkpoint_tensor_names(checkpoint)
    assert set(keys) == {"model.safetensors", "model_1.safetensors"}  # policy, value model
    assert keys["model.safetensors"] and all("lora_" in k for k in keys["model.safetensors"])
    assert all("lora_" in k or k.startswith("head.") for k in keys["model_1.safetensors"])
    assert any(k.startswith("head.") for k in keys["model_1.safetensors"])

    resumed = write_job(tmp_path / "resumed.yaml", **ppo_job(tmp_path, toy_sft_dir, output="resumed", **settings))
    kill_and_resume("ppo", resumed, tmp_path / "resumed")
    assert final_weight_difference(tmp_path / "straight", tmp_path / "resumed") < 1e-5
    before = load_state_dict(toy_sft_dir)
    assert max_abs_diff(before, load_state_dict(tmp_path / "straight" / "final")) > 0  # the adapters did train


@pytest.mark.parametrize("lora", [None, LORA])
def test_the_value_model_trains_every_weight_without_lora_and_only_adapters_with_it(tiny_model_dir, lora):
    value = ValueModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                       lora=None if lora is None else _lora())
    trainable = sum(p.numel() for p in value.parameters() if p.requires_grad)
    total = sum(p.numel() for p in value.parameters())
    assert (trainable == total) == (lora is None)
