"""What final/ holds and how models are built: training precision, model card, LoRA all-linear,
gradient checkpointing and the attention implementation."""

from __future__ import annotations

import json

import pytest

from .stage_runs import load_state_dict, max_abs_diff, run_cli, run_in_process, write_job, write_jsonl
from .test_sft import sft_rows


def sft(tmp_path, model_dir, *, output: str, subprocess: bool = False, **settings) -> dict:
    job = {"stage": "sft", "model": str(model_dir), "outputDir": str(tmp_path / output),
           "data": {"sft": str(write_jsonl(tmp_path / "sft.jsonl", sft_rows()))},
           "sft": {"batchSize": 4, "maxSteps": 2, "learningRate": 1e-3, **settings}}
    config = write_job(tmp_path / f"{output}.yaml", **job)
    if subprocess:
        result = run_cli("sft", config)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert run_in_process("sft", config) == 0
    return job


def test_a_full_fine_tune_saves_in_its_training_precision_with_a_model_card(tmp_path, tiny_model_dir):
    from safetensors import safe_open

    # In a subprocess: accelerate's mixed-precision state is per process and cannot be changed back.
    sft(tmp_path, tiny_model_dir, output="out", precision="bf16", subprocess=True)
    final = tmp_path / "out" / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        dtypes = {str(weights.get_tensor(name).dtype) for name in weights.keys()}
    assert dtypes == {"torch.bfloat16"}  # half the size of the fp32 master weights
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(final).padding_side == "left"  # what batch generation needs

    card = (final / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "base_model" not in card  # a local path means nothing to the Hub
    fingerprint = json.loads((final / "fingerprint.json").read_text())
    assert f"`data.sft` = `{tmp_path / 'sft.jsonl'}` ({fingerprint['inputs']['data.sft']})" in card
    assert "| loss |" in card and "safetensors, bfloat16" in card and "precision: bf16" in card


def test_the_model_card_names_a_hub_base_model():
    from trainer.config import StageJob
    from trainer.model_card import render_model_card

    job = StageJob.model_validate({"stage": "reward", "model": "hf://org/name@abc", "outputDir": "/o",
                                   "reward": {"lora": {"rank": 4}}})
    card = render_model_card(job=job, fingerprint={}, metrics={"reward_model_accuracy": 0.75}, dtype="float32")
    assert "base_model: org/name\n" in card and "pipeline_tag: text-classification" in card
    assert "- lora" in card and "| reward_model_accuracy | 0.75 |" in card and "reward_normalization.json" in card


def test_lora_all_linear_adapts_every_linear_layer_but_the_head(tmp_path, tiny_model_dir):
    sft(tmp_path, tiny_model_dir, output="out", lora={"rank": 4, "alpha": 8, "dropout": 0.0,
                                                      "targetModules": ["all-linear"]})
    base, tuned = load_state_dict(tiny_model_dir), load_state_dict(tmp_path / "out" / "final")
    changed = {k.split(".")[-2] for k in base if not (base[k] == tuned[k]).all()}
    assert changed == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not (tmp_path / "out" / "final" / "adapter").exists()  # only with lora.keepAdapter


def test_keep_adapter_saves_the_unmerged_peft_adapter_beside_the_merged_model(tmp_path, tiny_model_dir):
    """final/adapter/ over the input model gives the merged final/ weights, loaded with plain PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft(tmp_path, tiny_model_dir, output="out", lora={"rank": 4, "alpha": 8, "dropout": 0.0, "keepAdapter": True})
    final = tmp_path / "out" / "final"
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    assert (final / "adapter" / "adapter_model.safetensors").is_file() and (final / "model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merged_here = PeftModel.from_pretrained(base, final / "adapter").merge_and_unload().state_dict()
    merged_there = load_state_dict(final)
    assert max_abs_diff(merged_here, merged_there) < 1e-6
    assert max_abs_diff(load_state_dict(tiny_model_dir), merged_there) > 1e-4  # the adapter did train


def test_keep_adapter_does_not_block_a_resume():
    from trainer.config import StageJob
    from trainer.provenance import stage_settings

    def settings(keep: bool) -> dict:
        return stage_settings(StageJob.model_validate({"stage": "sft", "model": "m", "outputDir": "/o",
                                                       "sft": {"lora": {"rank": 4, "keepAdapter": keep}}}))

    assert settings(True) == settings(False) and settings(True)["lora"]["rank"] == 4


def test_all_linear_cannot_be_combined_with_names():
    from pydantic import ValidationError

    from trainer.config import LoraConfig

    with pytest.raises(ValidationError, match="give it alone"):
        LoraConfig(target_modules=["all-linear", "q_proj"])


def test_gradient_checkpointing_and_eager_attention_train_the_same_weights(tmp_path, tiny_model_dir):
    sft(tmp_path, tiny_model_dir, output="plain")
    sft(tmp_path, tiny_model_dir, output="checkpointed", gradientCheckpointing=True, attentionImplementation="eager")
    plain = load_state_dict(tmp_path / "plain" / "final")
    assert max_abs_diff(plain, load_state_dict(tmp_path / "checkpointed" / "final")) < 1e-5
    assert max_abs_diff(plain, load_state_dict(tiny_model_dir)) > 1e-4  # and they did train


def test_ppo_builds_its_models_with_the_settings(tmp_path, tiny_model_dir):
    from .test_ppo import ppo_job

    job = ppo_job(tmp_path, tiny_model_dir, output="out", steps=1, gradientCheckpointing=True,
                  attentionImplementation="eager", sampleEverySteps=1000)
    assert run_in_process("ppo", write_job(tmp_path / "job.yaml", **job)) == 0
    assert (tmp_path / "out" / "final" / "README.md").is_file()
