"""Several processes as several "nodes" on loopback (gloo): the rendezvous env the operator gives a gang,
the world-size check at stage start and the rendezvous and collective timeouts (trainer.multinode).

Real processes, short timeouts. The stage-start failures happen before any model is loaded, so
the trainer runs here with a model path that is never read.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from trainer.multinode import (
    COLLECTIVE_TIMEOUT_ENV, EXPECTED_WORLD_SIZE_ENV, RENDEZVOUS_TIMEOUT_ENV, check_world_size, timeouts,
)
from trainer.runtime import PermanentStageFailure

from .stage_runs import run_cli, subprocess_env, write_job, write_jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_job_file(tmp_path):
    job = {"stage": "sft", "model": str(tmp_path / "never-loaded"), "outputDir": str(tmp_path / "out"),
           "data": {"sft": str(write_jsonl(tmp_path / "sft.jsonl", [{"text": "hello"}]))}, "sft": {}}
    return write_job(tmp_path / "job.yaml", **job)


def termination_message(tmp_path) -> str:
    return (tmp_path / "termination-log").read_text()


# ----------------------------------------------------------------------------- the world-size check


def test_world_size_check_names_expected_and_actual():
    check_world_size(expected="4", actual=4)
    check_world_size(expected=None, actual=1)  # single-pod stages: no expectation set
    with pytest.raises(PermanentStageFailure, match=r"expects 4 processes .* but 3 came up"):
        check_world_size(expected="4", actual=3)
    with pytest.raises(PermanentStageFailure, match=EXPECTED_WORLD_SIZE_ENV):
        check_world_size(expected="two", actual=1)


def test_timeouts_come_from_the_environment_and_refuse_nonsense():
    rendezvous, collective = timeouts({RENDEZVOUS_TIMEOUT_ENV: "7", COLLECTIVE_TIMEOUT_ENV: "2.5"})
    assert (rendezvous.total_seconds(), collective.total_seconds()) == (7, 2.5)
    with pytest.raises(PermanentStageFailure, match=RENDEZVOUS_TIMEOUT_ENV):
        timeouts({RENDEZVOUS_TIMEOUT_ENV: "0"})


def test_a_stage_started_without_its_peers_fails_at_once_instead_of_training_alone(tmp_path):
    # What a launcher that ignores the multi-node settings does: one plain process.
    result = run_cli("sft", sft_job_file(tmp_path), env={EXPECTED_WORLD_SIZE_ENV: "2"}, timeout=240)
    assert result.returncode == 3, result.stderr[-3000:]
    message = termination_message(tmp_path)
    assert "expects 2 processes" in message and "but 1 came up" in message
    assert not (tmp_path / "out" / "progress.jsonl").exists() or "succeeded" not in (
        tmp_path / "out" / "progress.jsonl").read_text()


# ----------------------------------------------------------------------------- rendezvous timeouts


def test_a_rank_that_cannot_reach_rank_0_ends_within_the_rendezvous_timeout_naming_address_and_port(tmp_path):
    port = free_port()  # nothing listens there: rank 0 never came up
    started = time.monotonic()
    result = run_cli("sft", sft_job_file(tmp_path), timeout=240, env={
        "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        RENDEZVOUS_TIMEOUT_ENV: "2"})
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]  # retryable: rank 0 may be back next attempt
    message = termination_message(tmp_path)
    assert f"rank 1 of 2 could not reach rank 0 at 127.0.0.1:{port} within 2s" in message
    assert "127.0.0.1 resolves to 127.0.0.1 but nothing accepted" in message
    assert elapsed < 120  # torch's default would wait 30 minutes


def test_a_rank_0_address_that_does_not_resolve_is_named_as_such(tmp_path):
    result = run_cli("sft", sft_job_file(tmp_path), timeout=240, env={
        "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "rank0.invalid",
        "MASTER_PORT": str(free_port()), RENDEZVOUS_TIMEOUT_ENV: "2"})
    assert result.returncode == 1, result.stderr[-3000:]
    message = termination_message(tmp_path)
    assert "could not reach rank 0 at rank0.invalid:" in message and "rank0.invalid does not resolve" in message


def test_rank_0_whose_peers_never_come_ends_within_the_rendezvous_timeout(tmp_path):
    port = free_port()
    result = run_cli("sft", sft_job_file(tmp_path), timeout=240, env={
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        RENDEZVOUS_TIMEOUT_ENV: "2"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"rank 0 of 2 waited 2s at 127.0.0.1:{port} for the other processes" in termination_message(tmp_path)


# ----------------------------------------------------------------------------- two "nodes" with the gang env

PROBE = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from trainer.multinode import EXPECTED_WORLD_SIZE_ENV, check_world_size, init_distributed
    from trainer.runtime import StageFailed, PermanentStageFailure
    try:
        init_distributed(cuda=False)
        check_world_size(expected=os.environ.get(EXPECTED_WORLD_SIZE_ENV), actual=dist.get_world_size())
    except StageFailed as exc:
        print("FAILED", exc, flush=True)
        sys.exit(3 if isinstance(exc, PermanentStageFailure) else 1)
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} sum {total.item():g}", flush=True)
    dist.destroy_process_group()
""")


def launch_node(tmp_path, *, rank: int, nodes: int, port: int, expected: int | None = None,
                rendezvous_timeout: int = 60) -> subprocess.Popen:
    """One gang member as the operator will start it: torchrun reading only the env ftoperator.gang builds."""
    from ftoperator.gang import rendezvous_env

    env = {e["name"]: e["value"] for e in rendezvous_env(
        run="demo", namespace="team-a", stage="sft", attempt=0, rank=rank, nodes=nodes, processes_per_node=1,
        port=port, rendezvous_timeout_seconds=rendezvous_timeout, collective_timeout_seconds=60)}
    # No cluster DNS here: rank 0's Service name stands for loopback.
    env["PET_MASTER_ADDR"] = env["MASTER_ADDR"] = "127.0.0.1"
    if expected is not None:
        env[EXPECTED_WORLD_SIZE_ENV] = str(expected)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", str(probe)], cwd=tmp_path,
                            env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_started_from_the_gang_env_form_one_world_of_two(tmp_path):
    port = free_port()
    nodes = [launch_node(tmp_path, rank=r, nodes=2, port=port) for r in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    # The all-reduce saw both ranks: 1 + 2.
    assert "rank 0 of 2 sum 3" in outputs[0] and "rank 1 of 2 sum 3" in outputs[1]


def test_a_world_smaller_than_expected_fails_every_rank_with_the_counts(tmp_path):
    port = free_port()
    nodes = [launch_node(tmp_path, rank=r, nodes=2, port=port, expected=3) for r in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert all(p.returncode != 0 for p in nodes), outputs
    assert all("FAILED world size mismatch: the stage expects 3 processes" in o and "but 2 came up" in o
               for o in outputs), outputs


def test_a_node_whose_rank_0_never_comes_gives_up_after_the_rendezvous_timeout_it_was_given(tmp_path):
    # Only node rank 1: torchrun's own agent must stop waiting (PET_RDZV_CONF), before any trainer code runs.
    started = time.monotonic()
    lonely = launch_node(tmp_path, rank=1, nodes=2, port=free_port(), rendezvous_timeout=3)
    output = lonely.communicate(timeout=240)[0]
    elapsed = time.monotonic() - started
    assert lonely.returncode != 0, output
    assert "127.0.0.1" in output and "timed out" in output.lower(), output[-3000:]
    assert elapsed < 120  # the default would be 900 s


COLLECTIVE_PROBE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    from trainer.multinode import init_distributed
    init_distributed(cuda=False)
    done = Path("rank0-done")
    if dist.get_rank() == 1:
        # Stay alive without joining the collective until rank 0 has given up on it.
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        sys.exit(0)
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        print("NO TIMEOUT", flush=True)
    except RuntimeError as exc:
        print(f"TIMED OUT after {time.monotonic() - started:.1f}s: {str(exc).splitlines()[0]}", flush=True)
    finally:
        done.write_text("x")
""")


def test_a_hung_collective_ends_after_the_collective_timeout(tmp_path):
    probe = tmp_path / "collective.py"
    probe.write_text(COLLECTIVE_PROBE)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(probe)],
        cwd=tmp_path, env=subprocess_env(**{COLLECTIVE_TIMEOUT_ENV: "3"}), capture_output=True, text=True,
        timeout=240)
    match = re.search(r"TIMED OUT after ([\d.]+)s", result.stdout)
    assert match, result.stdout + result.stderr[-3000:]
    assert 2.5 <= float(match.group(1)) < 60  # the configured 3 s, not torch's 30 minutes


# ----------------------------------------------------------------------------- sharding on CPU

FSDP2_PROBE = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from trainer.multinode import init_distributed

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)

    def batch(rank, step):  # (2, 16) token ids, different per rank and step
        return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100 * step + rank))

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if sys.argv[1] == "single":  # one process on both ranks' batches: the loss mean is what sharding averages
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(3):
            loss = sum(model(input_ids=batch(r, step), labels=batch(r, step)).loss for r in (0, 1)) / 2
            loss.backward(); opt.step(); opt.zero_grad()
        torch.save(model.state_dict(), "single.pt")
        sys.exit(0)
    init_distributed(cuda=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rank = dist.get_rank()
    for step in range(3):
        loss = model(input_ids=batch(rank, step), labels=batch(rank, step)).loss
        loss.backward(); opt.step(); opt.zero_grad()
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        single = torch.load("single.pt")
        diff = max((full[k] - single[k]).abs().max().item() for k in single)
        total = sum(v.numel() for v in single.values())
        print(f"local {local} of {total} diff {diff:.3e} tensors {len(full)} of {len(single)}", flush=True)
""")


def test_fsdp2_shards_a_causal_lm_on_cpu_with_gloo_and_trains_like_one_process(tmp_path):
    """The CPU path for sharded stages (issue 13 item 3): torch's fully_shard works over gloo.

    accelerate 1.15 does not take this path: with cpu=True and an FSDP plugin it wraps the model
    in DistributedDataParallel (docs/multinode.md), so sharded CPU stages must call fully_shard.
    """
    probe = tmp_path / "fsdp2.py"
    probe.write_text(FSDP2_PROBE)
    single = subprocess.run([sys.executable, str(probe), "single"], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(probe), "fsdp2"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    match = re.search(r"local (\d+) of (\d+) diff ([\d.e+-]+) tensors (\d+) of (\d+)", sharded.stdout)
    assert match, sharded.stdout + sharded.stderr[-3000:]
    local, total, diff, gathered, expected = match.groups()
    assert int(local) * 2 == int(total)  # each rank holds half of every parameter
    assert gathered == expected  # the full state dict gathers every tensor (what save_pretrained needs)
    # Measured 0.0 (same reductions in the same order on CPU); 1e-6 leaves room for other BLAS builds.
    assert float(diff) <= 1e-6
