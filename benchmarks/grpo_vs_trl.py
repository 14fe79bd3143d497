"""Throughput of our GRPO stage against TRL 1.16's GRPOTrainer on one tiny workload.

Both run in this one process on the same model, tokenizer, prompts and settings
(benchmarks/tiny_workload.py): 16 responses per step (4 prompts x group of 4), responses of at most
32 tokens ending at EOS, temperature 0.7, a rule-based reward with TRL's signature
(``tiny_workload.good_words``), group-mean advantages scaled by the group std, per-sequence loss
normalisation (TRL's loss_type "grpo"), clip 0.2, one optimisation pass per batch, KL coefficient 0 and
so no reference model on either side; fp32 on the CPU, one torch thread. The two sides alternate,
each runs ``--repeats`` times (default 5) with ``gc.freeze()``, and the script prints the median
episodes/s of each, the ratio with its spread, and where our step time goes (generation, forward
for the old log-probs, scoring, optimisation, other).

TRL is a benchmark-only dependency, installed into its own virtualenv beside the project's
(TRL 1.16 accepts the project's transformers 5):

    benchmarks/trl_venv.sh 1.16.0
    ~/.cache/finetune-bench/trl-1.16.0/bin/python benchmarks/grpo_vs_trl.py [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tiny_workload import (RunResult, alternate, build_models, good_words, prompts, run_ours,  # noqa: E402
                           steady_rate, summarise)

BATCH = 16
GROUP = 4
RESPONSE_TOKENS = 32
TEMPERATURE = 0.7
LEARNING_RATE = 1e-5


def grpo_ours(work: Path, sft: Path, prompt_file: Path, *, steps: int, rep: int) -> RunResult:
    job = {
        "model": str(sft), "data": {"prompts": str(prompt_file)},
        "reward": {"functions": [{"type": "pythonBatch", "function": "tiny_workload:good_words"}]},
        "grpo": {"steps": steps, "batchSize": BATCH, "groupSize": GROUP, "algorithm": "grpo",
                 "iterationsPerBatch": 1, "miniBatches": 1, "lossNormalisation": "sequence", "klCoef": 0.0,
                 "responseLengthTokens": RESPONSE_TOKENS, "stopToken": "eos", "missingEosPenalty": None,
                 "temperature": TEMPERATURE, "learningRate": LEARNING_RATE, "precision": "fp32",
                 "chatTemplate": False, "healthChecks": "off",
                 "samplePrompts": 1, "sampleEverySteps": 10**6, "checkpointEverySteps": 10**6},
    }
    return run_ours(work, stage="grpo", job=job, name=f"ours-grpo-r{rep}")


def grpo_trl(work: Path, sft: Path, texts: list[str], *, steps: int, rep: int) -> RunResult:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"
    args = GRPOConfig(
        output_dir=str(work / f"trl-grpo-r{rep}"), report_to=[], per_device_train_batch_size=BATCH,
        num_generations=GROUP, gradient_accumulation_steps=1, num_iterations=1, max_steps=steps,
        max_completion_length=RESPONSE_TOKENS, temperature=TEMPERATURE, top_k=0, top_p=1.0,
        learning_rate=LEARNING_RATE, beta=0.0, epsilon=0.2, scale_rewards="group", loss_type="grpo",
        mask_truncated_completions=False, save_strategy="no", logging_steps=1, bf16=False, fp16=False,
        use_cpu=True, seed=0, disable_tqdm=True, log_completions=False,
    )
    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(sft), reward_funcs=good_words, args=args,
                          train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                          callbacks=[StepTimes()])
    trainer.train()
    return RunResult(steady_rate(stamps, BATCH))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side, alternating")
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
        sys.exit("trl is not installed here: run benchmarks/trl_venv.sh 1.16.0 and use that venv's python")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, trl {trl.__version__}, "
          f"{args.steps} steps per run (first excluded), {args.repeats} runs per side", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sft, _ = build_models(work)
        texts = prompts(AutoTokenizer.from_pretrained(sft))
        prompt_file = work / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        mine, theirs = alternate(lambda rep: grpo_ours(work, sft, prompt_file, steps=args.steps, rep=rep),
                                 lambda rep: grpo_trl(work, sft, texts, steps=args.steps, rep=rep),
                                 repeats=args.repeats)
        result = summarise(f"GRPO, batch {BATCH} (group {GROUP}), up to {RESPONSE_TOKENS} response tokens",
                           mine, theirs)
    if args.json:
        args.json.write_text(json.dumps([result], indent=2))


if __name__ == "__main__":
    main()
