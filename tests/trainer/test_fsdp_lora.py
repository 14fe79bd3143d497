"""Sharded LoRA (fsdp with lora) in SFT, reward, DPO and GRPO: two CPU processes over gloo with torch FSDP2.

The frozen base is sharded with its adapters (one FSDP unit per decoder layer); final/ is merged from the
gathered weights on the main process (trainer.sharding.unsharded_peft_copy). The check is against the
replicated (DDP) LoRA run of the same job: the same seeds and the same gradient average over two
processes, so the merged final/ must match up to the order of the gradient reductions. A sharded LoRA
run killed after a checkpoint and resumed ends like the uninterrupted one. PPO with lora stays refused
(test_fsdp.py).
"""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from safetensors.torch import load_file as load_state_dict_file
from torch.distributed.checkpoint import FileSystemReader

from .stage_runs import load_state_dict, max_abs_diff, write_job
from .test_dpo import dpo_job
from .test_fsdp import _losses, _parameter_mib, _run_two
from .test_reward_model import reward_job
from .test_sft import sft_job

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "keepAdapter": True}

SHARDED_LIKE_REPLICATED = 1e-5
"""Largest merged-weight difference between a sharded and a replicated LoRA run of the same job: the same
float32 arithmetic except the gradient reduction (reduce-scatter against all-reduce) and the clipping
norm's summation order. The merged weights move by more than 1e-3 from the start, so a wrong gradient
average or an adapter left out of the merge would differ by far more."""

RESUME_TOLERANCE = 1e-5
"""Resumed against uninterrupted sharded LoRA run: the same operations in the same order on CPU; the margin
covers gloo's reduction order only."""


def _moved(final: dict, start: dict) -> float:
    return max(float((final[k].float() - start[k].float()).abs().max()) for k in start if k in final)


def test_sharded_lora_sft_merges_like_replicated_lora_and_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = dict(epochs=3, batchSize=2, checkpointEverySteps=2, logEverySteps=1, lora=LORA)
    sharded = write_job(tmp_path / "sharded.yaml", **sft_job(tmp_path, tiny_model_dir, output="sharded",
                                                             fsdp={}, **settings))
    result = _run_two("sft", sharded)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(_parameter_mib(result.stderr, "sharded")) == [0, 1], result.stderr[-3000:]
    losses = _losses(tmp_path / "sharded")
    assert len(losses) == 9 and sum(losses[-3:]) < sum(losses[:3]), losses
    # Checkpoints hold the adapters and their optimizer state, not the frozen base (as unsharded LoRA's).
    checkpoint = tmp_path / "sharded" / "checkpoints" / "step-9" / "sharded"
    assert len(list(checkpoint.glob("*.distcp"))) == 2
    saved = list(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert any("lora_A" in k for k in saved) and not any("base_layer" in k or "embed_tokens" in k for k in saved), saved

    replicated = write_job(tmp_path / "replicated.yaml", **sft_job(tmp_path, tiny_model_dir, output="replicated",
                                                                   **settings))
    assert (ddp := _run_two("sft", replicated)).returncode == 0, ddp.stderr[-4000:]
    final = load_state_dict(tmp_path / "sharded" / "final")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    moved = _moved(final, start)
    versus_replicated = max_abs_diff(final, load_state_dict(tmp_path / "replicated" / "final"))

    killed = _run_two("sft", write_job(tmp_path / "resumed.yaml", **sft_job(
        tmp_path, tiny_model_dir, output="resumed", fsdp={}, **settings)), env={"FINETUNE_FAIL_AT_STEP": "4"})
    assert killed.returncode != 0 and not (tmp_path / "resumed" / "final").exists()
    resumed = _run_two("sft", tmp_path / "resumed.yaml")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    versus_resumed = max_abs_diff(final, load_state_dict(tmp_path / "resumed" / "final"))
    print(f"sharded LoRA SFT: merged weights moved {moved:.3g}; vs replicated {versus_replicated:.3g}; "
          f"resumed vs uninterrupted {versus_resumed:.3g}")
    assert moved > 1e-3
    assert versus_replicated <= SHARDED_LIKE_REPLICATED
    assert versus_resumed <= RESUME_TOLERANCE

    # final/ is a plain merged model (no adapter keys), and final/adapter/ is PEFT's adapter: over the input
    # model it computes what the merged model computes.
    assert not any("lora_" in k or "base_layer" in k for k in final)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "final").eval()
    adapter_config = json.loads((tmp_path / "sharded" / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             tmp_path / "sharded" / "final" / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-5)


def _sharded_then_replicated(tmp_path, stage: str, job, settings: dict):
    """The stage's job run sharded, then replicated (DDP), 2 processes each: (the sharded run, its final
    weights, their largest difference to the replicated run's)."""
    sharded = _run_two(stage, write_job(tmp_path / "sharded.yaml", **job(output="sharded", fsdp={}, **settings)))
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    replicated = _run_two(stage, write_job(tmp_path / "replicated.yaml", **job(output="replicated", **settings)))
    assert replicated.returncode == 0, replicated.stderr[-4000:]
    final = load_state_dict(tmp_path / "sharded" / "final")
    return sharded, final, max_abs_diff(final, load_state_dict(tmp_path / "replicated" / "final"))


def test_sharded_lora_reward_model_merges_like_replicated_lora(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    settings = dict(epochs=2, lora=LORA)
    result, final, difference = _sharded_then_replicated(tmp_path, "reward", partial(reward_job, tmp_path,
                                                                                     tiny_model_dir), settings)
    assert sorted(_parameter_mib(result.stderr, "sharded")) == [0, 1], result.stderr[-3000:]
    print(f"sharded LoRA reward: vs replicated {difference:.3g}")
    assert difference <= SHARDED_LIKE_REPLICATED
    # The trained score head (PEFT's modules_to_save) is in the merged model, under its plain name.
    assert "score.weight" in final and not any("modules_to_save" in k or "lora_" in k for k in final)
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "sharded" / "final", num_labels=1)


def test_sharded_lora_dpo_in_bf16_merges_like_replicated_lora(tmp_path, tiny_model_dir):
    """bf16: each FSDP unit holds the bf16 frozen base and the fp32 adapters together."""
    from transformers import AutoModelForCausalLM

    settings = dict(batchSize=2, epochs=2, logEverySteps=1, precision="bf16", lora=LORA)
    _, final, difference = _sharded_then_replicated(tmp_path, "dpo", partial(dpo_job, tmp_path, tiny_model_dir),
                                                    settings)
    losses = _losses(tmp_path / "sharded")
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
    print(f"sharded LoRA DPO (bf16): vs replicated {difference:.3g}")
    assert difference <= SHARDED_LIKE_REPLICATED
    AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "final")
    assert {v.dtype for v in final.values()} == {torch.bfloat16}  # merged, saved in the training precision



@pytest.mark.parametrize(("stage", "settings"), [("grpo", {}), ("ppo", {}), ("ppo", {"valueModel": "head"})],
                         ids=["grpo", "ppo", "ppo-value-head"])
def test_sharded_lora_online_stage_trains_like_replicated_lora_and_resumes_to_the_same_weights(
        tmp_path, tiny_model_dir, stage, settings):
    """A KL term: the reference is the gathered policy with its adapters disabled. PPO: its value model is
    LoRA on the same backbone, sharded too, or a value head on the LoRA policy."""
    from transformers import AutoModelForCausalLM

    from .test_fsdp_online import _update_metrics
    from .test_grpo_distributed import _job as grpo_job
    from .test_ppo_distributed import _job as ppo_job
    from .test_ppo_distributed import run_two_processes

    def job(output: str, **extra):
        if stage == "grpo":
            spec = grpo_job(tmp_path, tiny_model_dir, output=output)
            spec["grpo"].update(steps=4, klCoef=0.05, logEverySteps=1, lora=LORA, **extra)
        else:
            spec = ppo_job(tmp_path, tiny_model_dir, output=output, steps=4, lora=LORA, **settings, **extra)
        return write_job(tmp_path / f"{output}.yaml", **spec)

    result = run_two_processes(tmp_path, job("sharded", fsdp={}), stage=stage, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "adapters disabled" in result.stdout + result.stderr  # the reference is the policy's own base
    metrics = _update_metrics(tmp_path / "sharded")
    assert len(metrics) == 4 and all(math.isfinite(m["kl"]) for m in metrics)
    replicated = run_two_processes(tmp_path, job("replicated"), stage=stage, timeout=600)
    assert replicated.returncode == 0, replicated.stderr[-4000:]
    final = load_state_dict(tmp_path / "sharded" / "final")
    versus_replicated = max_abs_diff(final, load_state_dict(tmp_path / "replicated" / "final"))

    resumed = job("resumed", fsdp={})
    killed = run_two_processes(tmp_path, resumed, stage=stage, env={"FINETUNE_FAIL_AT_STEP": "2"}, timeout=600)
    assert killed.returncode != 0, killed.stderr[-4000:]
    again = run_two_processes(tmp_path, resumed, stage=stage, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stderr and "at step 2" in again.stderr
    versus_resumed = max_abs_diff(final, load_state_dict(tmp_path / "resumed" / "final"))
    moved = _moved(final, AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())
    print(f"sharded LoRA {stage}: moved {moved:.3g}; vs replicated {versus_replicated:.3g}; "
          f"resumed vs uninterrupted {versus_resumed:.3g}")
    assert moved > 100 * SHARDED_LIKE_REPLICATED
    assert versus_replicated <= SHARDED_LIKE_REPLICATED
    assert versus_resumed <= RESUME_TOLERANCE
    assert not any("lora_" in k for k in final)
    assert (tmp_path / "sharded" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    if settings.get("valueModel") == "head":  # the trained head, gathered, beside the merged policy
        head = {k: load_state_dict_file(tmp_path / run / "final" / "value_head.safetensors")
                for k, run in (("sharded", "sharded"), ("replicated", "replicated"))}
        assert head["sharded"]["weight"].shape == head["replicated"]["weight"].shape
        assert max_abs_diff(head["sharded"], head["replicated"]) <= SHARDED_LIKE_REPLICATED
        assert float(head["sharded"]["weight"].abs().max()) > 0
