"""Helpers for stage tests: tiny JSON Lines data, StageJob files, and running the CLI.

Stages run either in a subprocess (``run_cli``: the real ``python -m trainer``
path, and the only way to test a process that dies) or in-process through
``trainer.__main__.main`` (``run_in_process``), which saves the few seconds of
importing torch and transformers per run on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_job(path: Path, **job) -> Path:
    """A StageJob YAML file; reporting defaults keep tests offline and port-free."""
    reporting = {"metricsPort": None, "terminationLogPath": str(path.parent / "termination-log")}
    reporting.update(job.pop("reporting", {}))
    path.write_text(yaml.safe_dump({**job, "reporting": reporting}))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the test machine is small and shared
    env.update(extra)
    return env


def run_cli(stage: str, config: Path, *, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "--stage", stage, "--config", str(config)],
                          cwd=config.parent, env=subprocess_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def run_in_process(stage: str, config: Path) -> int:
    from trainer.__main__ import main

    return main(["--stage", stage, "--config", str(config)])


def progress_events(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_state_dict(directory: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def kill_and_resume(stage: str, config: Path, output_dir: Path) -> subprocess.CompletedProcess:
    """Run ``config`` killed at step 2 (FINETUNE_FAIL_AT_STEP: exit 137 as after SIGKILL, no final/), then run it
    again; assert that it resumed and succeeded, and return that second run."""
    killed = run_cli(stage, config, env={"FINETUNE_FAIL_AT_STEP": "2"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert not (Path(output_dir) / "final").exists()
    result = run_cli(stage, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr + result.stdout
    return result


def final_weight_difference(straight: Path, resumed: Path) -> float:
    """Largest absolute difference between two runs' final/ weights (printed, for the test log)."""
    diff = max_abs_diff(load_state_dict(Path(straight) / "final"), load_state_dict(Path(resumed) / "final"))
    print(f"max abs weight difference after resume: {diff:.3g}")
    return diff


def supervised_tiny_model(tiny_model_dir: Path, directory: Path, pairs: Callable[[int], list[tuple[str, str]]],
                          *, steps: int = 40) -> Path:
    """Train the tiny model on ``pairs(step)`` (prompt, completion) texts, the loss on the completion and </s>,
    AdamW 3e-3, one batch a step; save model and tokenizer in ``directory``. The toy "SFT" models the PPO and
    GRPO tests start from (about 2 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        encoded = [(tokenizer(prompt)["input_ids"],
                    tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                   for prompt, completion in pairs(step)]
        width = max(len(p) + len(c) for p, c in encoded)
        ids = torch.zeros(len(encoded), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(encoded):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
            mask[i, :len(p) + len(c)] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def checkpoint_tensor_names(path: Path) -> dict[str, list[str]]:
    """Tensor names in each model*.safetensors of a checkpoint directory (what a checkpoint holds)."""
    from safetensors import safe_open

    names = {}
    for file in sorted(path.glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names[file.name] = list(handle.keys())
    return names
