"""Throughput of our PPO stage against TRL 1.12's PPOTrainer (trl.experimental.ppo) on one tiny workload.

Both run in this one process on the same models, prompts and settings (benchmarks/tiny_workload.py):
batch 8; responses of exactly 32 tokens (no stop token); temperature 0.7; value model started from
the reward model; 1 and 4 PPO epochs, one minibatch; fp32 on the CPU; one torch thread. The two
sides alternate, each runs ``--repeats`` times (default 5) with ``gc.freeze()``, and the script
prints the median episodes/s of each, the ratio with its spread, and where our step time goes:
generation, forward (old log-probs, values, reference), scoring (reward), optimisation (the PPO
update, GAE and statistics), other (the loop around them: reporting, held-out bookkeeping).

TRL is a benchmark-only dependency, installed into its own virtualenv beside the project's
(TRL 1.12 is the last release with PPO; it accepts the project's transformers 5):

    benchmarks/trl_venv.sh 1.12.0
    ~/.cache/finetune-bench/trl-1.12.0/bin/python benchmarks/ppo_vs_trl.py [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tiny_workload import RunResult, alternate, build_models, prompts, run_ours, steady_rate, summarise  # noqa: E402

BATCH = 8
RESPONSE_TOKENS = 32
TEMPERATURE = 0.7
LEARNING_RATE = 1e-5


def ppo_ours(work: Path, sft: Path, rm: Path, prompt_file: Path, *, epochs: int, steps: int, rep: int) -> RunResult:
    job = {
        "model": str(sft), "rewardModel": str(rm), "data": {"prompts": str(prompt_file)},
        "ppo": {"steps": steps, "batchSize": BATCH, "ppoEpochs": epochs, "miniBatches": 1,
                "responseLengthTokens": RESPONSE_TOKENS, "stopToken": None, "missingEosPenalty": None,
                "temperature": TEMPERATURE, "learningRate": LEARNING_RATE, "precision": "fp32",
                "chatTemplate": False, "healthChecks": "off",
                "samplePrompts": 1, "sampleEverySteps": 10**6, "checkpointEverySteps": 10**6, "maxKl": None},
    }
    return run_ours(work, stage="ppo", job=job, name=f"ours-e{epochs}-r{rep}")


def ppo_trl(work: Path, sft: Path, rm: Path, texts: list[str], *, epochs: int, steps: int, rep: int) -> RunResult:
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"  # TRL generates from left-padded queries
    train = Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]})
    args = PPOConfig(
        output_dir=str(work / f"trl-e{epochs}-r{rep}"), report_to=[],
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=epochs, total_episodes=steps * BATCH, response_length=RESPONSE_TOKENS,
        stop_token=None, missing_eos_penalty=None, temperature=TEMPERATURE, learning_rate=LEARNING_RATE,
        local_rollout_forward_batch_size=BATCH, num_sample_generations=0, save_strategy="no",
        logging_steps=1, bf16=False, fp16=False, use_cpu=True, seed=0, disable_tqdm=True,
    )
    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(sft), ref_model=AutoModelForCausalLM.from_pretrained(sft),
        reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
        train_dataset=train, eval_dataset=train.select(range(BATCH)), callbacks=[StepTimes()],
    )
    trainer.train()
    return RunResult(steady_rate(stamps, BATCH))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="PPO updates per run (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side, alternating")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see tiny_workload.py)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--trainer-tree", type=Path, help="import our trainer from this directory instead, to "
                        "measure another commit (git archive COMMIT trainer | tar -x -C DIR)")
    args = parser.parse_args()
    if args.trainer_tree:
        sys.path.insert(0, str(args.trainer_tree.resolve()))
    try:
        import trl
    except ImportError:
        sys.exit("trl is not installed here: run benchmarks/trl_venv.sh 1.12.0 and use that venv's python")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, trl {trl.__version__}, "
          f"{args.steps} updates per run (first excluded), {args.repeats} runs per side", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sft, rm = build_models(work)
        texts = prompts(AutoTokenizer.from_pretrained(sft))
        prompt_file = work / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        for epochs in args.epochs:
            mine, theirs = alternate(
                lambda rep: ppo_ours(work, sft, rm, prompt_file, epochs=epochs, steps=args.steps, rep=rep),
                lambda rep: ppo_trl(work, sft, rm, texts, epochs=epochs, steps=args.steps, rep=rep),
                repeats=args.repeats)
            results.append(summarise(f"PPO, {epochs} epoch(s), batch {BATCH}, {RESPONSE_TOKENS} response tokens",
                                     mine, theirs))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
