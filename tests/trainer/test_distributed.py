"""Two CPU processes (gloo) through torch.distributed.run: one run, one final model, one set of events."""

from __future__ import annotations

import socket
import subprocess
import sys

from .stage_runs import progress_events, subprocess_env, write_job
from .test_sft import sft_job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sft_run_completes_and_saves_one_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    job = sft_job(tmp_path, tiny_model_dir, epochs=2, batchSize=2, checkpointEverySteps=2, logEverySteps=1)
    config = write_job(tmp_path / "job.yaml", **job)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "trainer", "--stage", "sft", "--config", str(config)]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    out = tmp_path / "out"
    events = progress_events(out)
    # Only the main process reports: one started, one succeeded.
    assert [e["kind"] for e in events].count("started") == 1
    assert events[-1]["kind"] == "succeeded"
    # 9 rows, 2 per process per step, 2 processes: 3 steps per epoch, 2 epochs.
    assert events[-1]["total_steps"] == 6
    checkpoint = out / "checkpoints" / "step-6"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                               "random_states_1.pkl"]
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert not list(out.glob("final.tmp*"))
