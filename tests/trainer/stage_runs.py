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
