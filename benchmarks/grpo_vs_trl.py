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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_workload import (RunResult, alternate, good_words, parser, run_ours, summarise, train_trl,  # noqa: E402
                           workload, write_json)

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
    from transformers import AutoModelForCausalLM, AutoTokenizer
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
    return train_trl(lambda callbacks: GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(sft), reward_funcs=good_words, args=args,
        train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer, callbacks=callbacks,
    ), batch=BATCH)


def main() -> None:
    args = parser(__doc__, steps=10, steps_help="optimizer steps per run (the first is a warm-up)").parse_args()
    with workload(args, trl_version="1.16.0") as w:
        mine, theirs = alternate(lambda rep: grpo_ours(w.work, w.sft, w.prompt_file, steps=args.steps, rep=rep),
                                 lambda rep: grpo_trl(w.work, w.sft, w.texts, steps=args.steps, rep=rep),
                                 repeats=args.repeats)
        result = summarise(f"GRPO, batch {BATCH} (group {GROUP}), up to {RESPONSE_TOKENS} response tokens",
                           mine, theirs)
    write_json(args, [result])


if __name__ == "__main__":
    main()
