"""PPO on two CPU processes (gloo) through torch.distributed.run.

Every training prompt is the same text, so the only thing that can make the two
processes' responses differ at step 1 (identical weights) is their sampling seed.
A python reward function logs what each process scored, which is the observable
proof of per-rank seeds and of the cross-process metric reduction.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .stage_runs import load_state_dict, max_abs_diff, progress_events, subprocess_env, write_job, write_jsonl

HELD_OUT = ["held out one?", "held out two?"]
TRAIN_PROMPT = "tell me about cats?"

# Scores len(response) and appends (rank, prompt, response, score) to scored-<rank>.jsonl beside it.
LOGGING_REWARD = textwrap.dedent('''
    import json, os
    from pathlib import Path

    def score(prompt, response):
        value = float(len(response))
        rank = os.environ.get("RANK", "0")
        with open(Path(__file__).parent / f"scored-{rank}.jsonl", "a") as handle:
            handle.write(json.dumps({"prompt": prompt, "response": response, "score": value}) + "\\n")
        return value
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(tmp_path: Path, model: Path, *, output: str, **ppo_settings) -> dict:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in HELD_OUT + [TRAIN_PROMPT] * 16])
    (tmp_path / "rank_logging_reward.py").write_text(LOGGING_REWARD)
    settings = {"steps": 3, "batchSize": 2, "responseLengthTokens": 5, "samplePrompts": len(HELD_OUT),
                "sampleEverySteps": 10, "checkpointEverySteps": 2, "ppoEpochs": 1, "miniBatches": 1,
                "learningRate": 1e-3, "temperature": 1.0, "precision": "fp32", "missingEosPenalty": None,
                "logEverySteps": 1, "chatTemplate": False}  # raw prompts, as the SFT data was
    settings.update(ppo_settings)
    return {"stage": "ppo", "model": str(model), "outputDir": str(tmp_path / output),
            "data": {"prompts": str(prompts)},
            "reward": {"functions": [{"type": "python", "function": "rank_logging_reward:score"}]},
            "ppo": settings}


def run_two_processes(tmp_path: Path, config: Path, *, env: dict[str, str] | None = None,
                      timeout: float = 120, stage: str = "ppo") -> subprocess.CompletedProcess:
    environment = subprocess_env(**(env or {}))
    # tmp_path holds the python reward function's module.
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [environment.get("PYTHONPATH"), str(tmp_path)]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "trainer", "--stage", stage, "--config", str(config)]
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def _scored(tmp_path: Path, rank: int) -> list[dict]:
    rows = [json.loads(line) for line in (tmp_path / f"scored-{rank}.jsonl").read_text().splitlines()]
    return [r for r in rows if r["prompt"] == TRAIN_PROMPT]  # rank 0 also scores the held-out samples


def test_two_process_ppo_samples_per_rank_reduces_metrics_and_saves_one_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    config = write_job(tmp_path / "job.yaml", **_job(tmp_path, tiny_model_dir, output="out"))
    result = run_two_processes(tmp_path, config)
    assert result.returncode == 0, result.stderr[-4000:]

    out = tmp_path / "out"
    events = progress_events(out)
    kinds = [e["kind"] for e in events]
    assert kinds.count("started") == 1 and kinds.count("succeeded") == 1 and kinds[-1] == "succeeded"
    assert events[-1]["step"] == 3
    metrics = [e["metrics"] for e in events if e["kind"] == "progress" and e.get("metrics")]
    assert [e["step"] for e in events if e["kind"] == "progress" and e.get("metrics")] == [1, 2, 3]

    # Same prompt, same weights at step 1: different responses only if each process has its own seed.
    rank0, rank1 = _scored(tmp_path, 0), _scored(tmp_path, 1)
    assert len(rank0) == len(rank1) == 3 * 2  # 3 steps x batchSize 2 on each process
    assert [r["response"] for r in rank0[:2]] != [r["response"] for r in rank1[:2]]
    # score_mean is over both processes' episodes, not the main process's alone.
    step1 = [r["score"] for r in rank0[:2] + rank1[:2]]
    assert metrics[0]["score_mean"] == pytest.approx(sum(step1) / len(step1), rel=1e-6)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update

    checkpoint = out / "checkpoints" / "step-2"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                               "random_states_1.pkl"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert not list(out.glob("final.tmp*"))


def test_two_process_ppo_resumed_after_a_kill_ends_like_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """Observed difference: 0 (bitwise). Asserted < 1e-5: lost state (optimizer, scheduler, per-rank
    seeds, data position) would differ by far more."""
    straight = write_job(tmp_path / "straight.yaml", **_job(tmp_path, tiny_model_dir, output="straight"))
    assert run_two_processes(tmp_path, straight).returncode == 0

    resumed = write_job(tmp_path / "resumed.yaml", **_job(tmp_path, tiny_model_dir, output="resumed"))
    killed = run_two_processes(tmp_path, resumed, env={"FINETUNE_FAIL_AT_STEP": "2"})
    assert killed.returncode != 0 and "FINETUNE_FAIL_AT_STEP=2" in killed.stderr, killed.stderr[-4000:]
    assert not (tmp_path / "resumed" / "final").exists()
    result = run_two_processes(tmp_path, resumed)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout + result.stderr

    diff = max_abs_diff(load_state_dict(tmp_path / "straight" / "final"),
                        load_state_dict(tmp_path / "resumed" / "final"))
    print(f"max abs weight difference after a 2-process resume: {diff:.3g}")
    assert diff < 1e-5


def test_two_process_ppo_kl_guard_stops_both_processes_with_one_reason(tmp_path, tiny_model_dir):
    # Step 1 has KL 0; after one update the KL (the same reduced value on both processes) exceeds the bound.
    # k3 is never negative, so the bound is crossed whatever the direction of the first update.
    config = write_job(tmp_path / "job.yaml", **_job(tmp_path, tiny_model_dir, output="out", maxKl=1e-6,
                                                     klEstimator="k3", checkpointEverySteps=100))
    result = run_two_processes(tmp_path, config)  # a guard firing on one process only would hang here
    assert result.returncode != 0
    reason = (tmp_path / "termination-log").read_text()
    assert "KL divergence" in reason and "step 2" in reason
    kinds = [e["kind"] for e in progress_events(tmp_path / "out")]
    assert kinds.count("failed") == 1 and "succeeded" not in kinds
