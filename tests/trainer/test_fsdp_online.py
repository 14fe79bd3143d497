"""Sharded PPO and GRPO (ppo.fsdp, grpo.fsdp): two CPU processes over gloo with torch FSDP2 fully_shard.

The strongest check is against the replicated (DDP) run of the same job: the same seeds draw the same
responses and the gradients are averaged over the same two processes, so a sharded run must end with
the replicated run's weights up to the order of the gradient reductions (reduce-scatter against
all-reduce). A sharded run killed after a checkpoint and resumed ends like the uninterrupted one. Each
process holds about half of each trained model; the gathered final/ loads with plain transformers.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from .stage_runs import load_state_dict, max_abs_diff, progress_events, subprocess_env, write_job
from .test_grpo_distributed import _job as grpo_job
from .test_ppo_distributed import _free_port
from .test_ppo_distributed import _job as ppo_job
from .test_ppo_distributed import run_two_processes

SHARDED_LIKE_REPLICATED = 1e-5
"""Largest final-weight difference between a sharded and a replicated run of the same job. Identical
arithmetic except the gradient reduction (FSDP reduce-scatters shards, DDP all-reduces buckets) and the
clipping norm's summation order: float32 rounding (measured after 4 steps: 1.6e-7 PPO, 6e-8 GRPO). The
weights move by ~2.5e-3 in those steps, so a wrong gradient average (a sum, or one process's gradient)
or a rollout drawn from other weights would differ by far more."""

RESUME_TOLERANCE = 1e-5
"""Resumed against uninterrupted sharded run: the same operations in the same order on CPU (bitwise in
practice); the margin covers gloo's reduction order only."""


def _parameter_mib(stderr: str) -> dict[tuple[str, int, str], float]:
    """{(model, rank, 'unsharded'|'sharded'): MiB} from the trainer's per-process memory lines."""
    found = re.findall(r"rank (\d): (unsharded|sharded) parameters ([\d.]+) MiB \(([\w ]+)\)", stderr)
    return {(model, int(rank), what): float(mib) for rank, what, mib, model in found}


def _update_metrics(output: Path) -> list[dict]:
    return [e["metrics"] for e in progress_events(output) if e["kind"] == "progress" and e.get("metrics")]


def _assert_half_per_process(stderr: str, models: list[str]) -> dict:
    memory = _parameter_mib(stderr)
    for model in models:
        for rank in (0, 1):
            # an odd-sized tensor's shard is padded, hence 0.6 rather than 0.5
            assert memory[(model, rank, "sharded")] < 0.6 * memory[(model, rank, "unsharded")], memory
    return memory


def test_sharded_ppo_trains_like_replicated_ppo_and_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    settings = dict(steps=4, checkpointEverySteps=2, sampleEverySteps=2)
    sharded = write_job(tmp_path / "sharded.yaml", **ppo_job(tmp_path, tiny_model_dir, output="sharded",
                                                             fsdp={}, **settings))
    result = run_two_processes(tmp_path, sharded, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    memory = _assert_half_per_process(result.stderr, ["policy", "value model"])
    metrics = _update_metrics(tmp_path / "sharded")
    assert [m["loss"] for m in metrics] and all(math.isfinite(m[k]) for m in metrics
                                                for k in ("loss", "policy_loss", "value_loss", "kl", "score_mean"))
    # The checkpoint holds both trained models' shards and the optimizer (one file per process).
    assert len(list((tmp_path / "sharded" / "checkpoints" / "step-2" / "sharded").glob("*.distcp"))) == 2
    # Held-out samples were drawn (main process, policy gathered by both) at steps 0, 2 and 4.
    assert sorted({e["step"] for e in progress_events(tmp_path / "sharded") if e["kind"] == "samples"}) == [0, 2, 4]

    replicated = write_job(tmp_path / "replicated.yaml", **ppo_job(tmp_path, tiny_model_dir, output="replicated",
                                                                   **settings))
    assert run_two_processes(tmp_path, replicated, timeout=600).returncode == 0
    final = load_state_dict(tmp_path / "sharded" / "final")
    versus_replicated = max_abs_diff(final, load_state_dict(tmp_path / "replicated" / "final"))
    # Step 1 samples from the same starting weights with the same seeds: the gathered policy drew exactly
    # what the replicated one did.
    assert metrics[0]["score_mean"] == _update_metrics(tmp_path / "replicated")[0]["score_mean"]

    resumed = write_job(tmp_path / "resumed.yaml", **ppo_job(tmp_path, tiny_model_dir, output="resumed",
                                                             fsdp={}, **settings))
    killed = run_two_processes(tmp_path, resumed, env={"FINETUNE_FAIL_AT_STEP": "2"}, timeout=600)
    assert killed.returncode != 0 and "FINETUNE_FAIL_AT_STEP=2" in killed.stderr, killed.stderr[-4000:]
    again = run_two_processes(tmp_path, resumed, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stderr and "at step 2" in again.stderr
    versus_resumed = max_abs_diff(final, load_state_dict(tmp_path / "resumed" / "final"))

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "final").state_dict()  # plain format
    moved = max(float((trained[k] - start[k]).abs().max()) for k in start if k in trained)
    print(f"PPO parameter MiB per process: {memory}; sharded vs replicated {versus_replicated:.3g}, "
          f"resumed vs uninterrupted {versus_resumed:.3g}, largest change from the start {moved:.3g}")
    assert versus_replicated <= SHARDED_LIKE_REPLICATED
    assert versus_resumed <= RESUME_TOLERANCE
    assert moved > 100 * SHARDED_LIKE_REPLICATED  # it trained: the comparisons above are not of untouched weights


def test_sharded_ppo_with_a_value_head_saves_the_gathered_head(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = write_job(tmp_path / "job.yaml", **ppo_job(tmp_path, tiny_model_dir, output="out", steps=2,
                                                        valueModel="head", fsdp={}))
    result = run_two_processes(tmp_path, config, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_half_per_process(result.stderr, ["policy"])
    head = load_file(str(tmp_path / "out" / "final" / "value_head.safetensors"))
    hidden = AutoConfig.from_pretrained(tiny_model_dir).hidden_size
    assert head["weight"].shape == (1, hidden) and head["bias"].shape == (1,)  # whole, not one process's shard
    assert float(head["weight"].abs().max()) > 0  # trained from its zero start


def test_sharded_ppo_with_gradient_checkpointing_eager_attention_and_bf16_trains(tmp_path, tiny_model_dir):
    """The settings that turn the lean forward off: the gathered rollout then runs the model's own forward
    (layers kept gathered, so no collective per token) and the update recomputes activations."""
    import torch

    config = write_job(tmp_path / "job.yaml", **ppo_job(tmp_path, tiny_model_dir, output="out", steps=2, fsdp={},
                                                        gradientCheckpointing=True, attentionImplementation="eager",
                                                        precision="bf16"))
    result = run_two_processes(tmp_path, config, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_half_per_process(result.stderr, ["policy", "value model"])
    metrics = _update_metrics(tmp_path / "out")
    assert len(metrics) == 2 and all(math.isfinite(m[k]) for m in metrics for k in ("loss", "kl", "value_loss"))
    assert {v.dtype for v in load_state_dict(tmp_path / "out" / "final").values()} == {torch.bfloat16}


def test_sharded_grpo_trains_like_replicated_grpo_and_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    def job(output: str, **extra) -> Path:
        spec = grpo_job(tmp_path, tiny_model_dir, output=output)
        spec["grpo"].update(steps=4, klCoef=0.05, logEverySteps=1, **extra)  # klCoef: a whole reference too
        return write_job(tmp_path / f"{output}.yaml", **spec)

    result = run_two_processes(tmp_path, job("sharded", fsdp={}), stage="grpo", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    memory = _assert_half_per_process(result.stderr, ["policy"])
    metrics = _update_metrics(tmp_path / "sharded")
    assert len(metrics) == 4 and all(math.isfinite(m[k]) for m in metrics for k in ("loss", "kl", "reward_mean"))

    assert run_two_processes(tmp_path, job("replicated"), stage="grpo", timeout=600).returncode == 0
    final = load_state_dict(tmp_path / "sharded" / "final")
    versus_replicated = max_abs_diff(final, load_state_dict(tmp_path / "replicated" / "final"))

    resumed = job("resumed", fsdp={})
    killed = run_two_processes(tmp_path, resumed, stage="grpo", env={"FINETUNE_FAIL_AT_STEP": "2"}, timeout=600)
    assert killed.returncode != 0, killed.stderr[-4000:]
    again = run_two_processes(tmp_path, resumed, stage="grpo", timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    versus_resumed = max_abs_diff(final, load_state_dict(tmp_path / "resumed" / "final"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "final")
    print(f"GRPO parameter MiB per process: {memory}; sharded vs replicated {versus_replicated:.3g}, "
          f"resumed vs uninterrupted {versus_resumed:.3g}")
    assert versus_replicated <= SHARDED_LIKE_REPLICATED
    assert versus_resumed <= RESUME_TOLERANCE


GATHER_PROBE = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from trainer import sharding
    from trainer.config import FsdpConfig
    from trainer.lean_decoder import LeanDecoder

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    whole = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    full_bytes = sharding.local_parameter_bytes(model)
    sharding.shard(model, FsdpConfig(), device=torch.device("cpu"))
    query = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    assert LeanDecoder.of(model) is None  # shards: only the model's forward can gather them
    with sharding.gathered(model):
        assert sharding.local_parameter_bytes(model) == full_bytes
        assert LeanDecoder.of(model) is not None
        # A different number of forwards on each process: nothing in here may be a collective.
        for _ in range(1 + 2 * rank):
            logits = model(input_ids=query).logits
        lean = LeanDecoder.of(model)
        lean_logits = lean.logits(lean.forward_hidden(query, torch.ones_like(query), torch.arange(4)[None]))
    assert torch.equal(logits, whole(input_ids=query).logits) and torch.equal(lean_logits, logits)
    assert sharding.local_parameter_bytes(model) < 0.6 * full_bytes and LeanDecoder.of(model) is None
    model(input_ids=query, labels=query).loss.backward()  # sharded training works after the rollout
    assert all(p.grad is not None for p in model.parameters())
    print(f"rank {rank} gathered ok", flush=True)
''')


def test_a_gathered_policy_is_whole_and_samples_without_collectives_then_shards_again(tmp_path, tiny_model_dir):
    (tmp_path / "probe.py").write_text(GATHER_PROBE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(tmp_path / "probe.py"), str(tiny_model_dir)]
    # A collective inside the gathered block would leave the processes waiting on each other: the timeout.
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 0 gathered ok" in result.stdout and "rank 1 gathered ok" in result.stdout
