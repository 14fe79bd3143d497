"""Sharded supervised stages (spec fsdp): two CPU processes over gloo with torch FSDP2 fully_shard.

One uninterrupted sharded SFT run against one killed after a checkpoint and resumed: the same final
weights (tolerance below); loss goes down; the gathered final model loads with plain transformers and
equals the checkpoint's weights; each process held about half the parameters. A reward run checks the
sequence-classifier path. The config refusals are unit tests. PPO and GRPO: test_fsdp_online.py; with
lora: test_fsdp_lora.py.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest
import torch

from trainer.config import ConfigError, load_stage_job

from .stage_runs import load_state_dict, max_abs_diff, progress_events, subprocess_env, write_job
from .test_dpo import dpo_job
from .test_reward_model import reward_job
from .test_sft import sft_job

RESUME_TOLERANCE = 1e-5
"""Largest weight difference allowed between a resumed and an uninterrupted sharded run: the same
float32 operations in the same order on CPU give identical results; the margin covers gloo's
reduction order only."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(stage: str, config, *, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "trainer", "--stage", stage, "--config", str(config)]
    return subprocess.run(command, cwd=config.parent, env=subprocess_env(**(env or {})), capture_output=True,
                          text=True, timeout=600)


def _losses(out) -> list[float]:
    return [e["metrics"]["loss"] for e in progress_events(out) if e["kind"] == "progress" and "loss" in e.get("metrics", {})]


def _parameter_mib(stderr: str, what: str) -> dict[int, float]:
    return {int(r): float(m) for r, m in re.findall(rf"rank (\d): {what} parameters ([\d.]+) MiB", stderr)}


def test_sharded_sft_on_two_processes_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    settings = dict(epochs=3, batchSize=2, checkpointEverySteps=2, logEverySteps=1, fsdp={})
    whole = write_job(tmp_path / "whole.yaml", **sft_job(tmp_path, tiny_model_dir, output="whole", **settings))
    result = _run_two("sft", whole)
    assert result.returncode == 0, result.stderr[-4000:]
    # Each process holds half the weights after sharding (an odd-sized tensor's shard is padded).
    unsharded, sharded = _parameter_mib(result.stderr, "unsharded"), _parameter_mib(result.stderr, "sharded")
    assert sorted(sharded) == [0, 1], result.stderr[-3000:]
    for rank in (0, 1):
        assert sharded[rank] < 0.6 * unsharded[rank], (unsharded, sharded)
    losses = _losses(tmp_path / "whole")
    assert len(losses) == 9 and sum(losses[-3:]) < sum(losses[:3]), losses
    # The checkpoint holds the sharded model and optimizer (one file per process) next to the RNG states.
    assert len(list((tmp_path / "whole" / "checkpoints" / "step-9" / "sharded").glob("*.distcp"))) == 2

    killed_job = sft_job(tmp_path, tiny_model_dir, output="resumed", **settings)
    killed = _run_two("sft", write_job(tmp_path / "resumed.yaml", **killed_job), env={"FINETUNE_FAIL_AT_STEP": "4"})
    assert killed.returncode != 0
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = _run_two("sft", tmp_path / "resumed.yaml")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr

    final_whole = load_state_dict(tmp_path / "whole" / "final")
    difference = max_abs_diff(final_whole, load_state_dict(tmp_path / "resumed" / "final"))
    print(f"parameter MiB per rank: unsharded {unsharded}, sharded {sharded}; resumed vs whole: {difference}")
    assert difference <= RESUME_TOLERANCE
    # The gathered final model is the plain transformers format, and differs from the start.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "final")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = model.state_dict()
    assert max(float((trained[k] - start[k]).abs().max()) for k in start if k in trained) > 1e-3


def test_sharded_reward_stage_on_two_processes_saves_a_loadable_classifier(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    config = write_job(tmp_path / "job.yaml", **reward_job(tmp_path, tiny_model_dir, epochs=2, fsdp={"cpuOffload": True}))
    result = _run_two("reward", config)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _parameter_mib(result.stderr, "sharded"), result.stderr[-3000:]
    assert "fsdp.cpuOffload: the stage runs on CPUs" in result.stderr
    assert progress_events(tmp_path / "out")[-1]["kind"] == "succeeded"
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "final", num_labels=1)


def test_sharded_dpo_on_two_processes_lowers_its_loss_and_saves_a_loadable_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    config = write_job(tmp_path / "job.yaml", **dpo_job(tmp_path, tiny_model_dir, batchSize=2, epochs=2,
                                                        logEverySteps=1, precision="bf16", fsdp={}))
    result = _run_two("dpo", config)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(_parameter_mib(result.stderr, "sharded")) == [0, 1], result.stderr[-3000:]
    losses = _losses(tmp_path / "out")
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
    # final/ holds the gathered weights in the training precision.
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert {v.dtype for v in load_state_dict(tmp_path / "out" / "final").values()} == {torch.bfloat16}


@pytest.mark.parametrize(("stage", "extra", "message"), [
    ("grpo", {"precision": "fp16"}, "grpo: Value error, fsdp cannot be combined with precision fp16"),
    ("dpo", {"precision": "fp16"}, "dpo: Value error, fsdp cannot be combined with precision fp16"),
])
def test_fsdp_is_refused_where_it_is_not_built(tmp_path, stage, extra, message):
    config = write_job(tmp_path / "job.yaml", stage=stage, model="m", outputDir=str(tmp_path / "o"),
                       **{stage: {"fsdp": {}, **extra}})
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_stage_job(config)


def test_a_sharded_model_computes_under_the_stage_autocast():
    """A sharded model is not prepared by accelerate, so the loop adds the bf16 autocast prepare would have."""
    from types import SimpleNamespace

    from trainer.sharding import autocast_forward

    # accelerate's Accelerator is a process-wide singleton: stand-ins with its two attributes used here.
    bf16 = SimpleNamespace(mixed_precision="bf16", autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 4)
    x = torch.randn(2, 64)
    in_fp32 = layer(x)
    in_bf16 = torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float()
    autocast_forward(layer, bf16)
    # Computed in bf16, returned in fp32 (as accelerate's prepare does: the losses read fp32 logits).
    out = layer(x)
    assert out.dtype == torch.float32 and torch.equal(out, in_bf16) and not torch.equal(out, in_fp32)
    plain = torch.nn.Linear(4, 4)
    autocast_forward(plain, SimpleNamespace(mixed_precision="no"))
    assert plain(torch.ones(2, 4)).dtype == torch.float32


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "grpo"])
def test_every_stage_accepts_fsdp_with_lora(tmp_path, stage):
    config = write_job(tmp_path / "job.yaml", stage=stage, model="m", outputDir=str(tmp_path / "o"),
                       **{stage: {"fsdp": {}, "lora": {"rank": 4}}})
    settings = getattr(load_stage_job(config), stage)
    assert settings.fsdp is not None and settings.lora.rank == 4


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_online_stages_accept_fsdp(tmp_path, stage):
    config = write_job(tmp_path / "job.yaml", stage=stage, model="m", outputDir=str(tmp_path / "o"),
                       **{stage: {"fsdp": {"cpuOffload": True}}})
    assert getattr(load_stage_job(config), stage).fsdp.cpu_offload is True
