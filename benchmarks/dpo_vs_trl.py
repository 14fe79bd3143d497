"""Throughput of our DPO stage against TRL 1.16's DPOTrainer on one tiny workload.

Both run in this one process on the same model and tokenizer (benchmarks/tiny_workload.py) and the
same 256 preference pairs: the workload's prompts, a chosen reply of 6-12 "good" words and a
rejected one of 6-12 other words. Settings on both sides: sigmoid loss, beta 0.1, 8 pairs per
step (16 sequences, chosen and rejected in one forward pass), learning rate 1e-5, no held-out
evaluation, no checkpoints inside the timed steps, fp32 on the CPU, one torch thread.

Ours computes the reference log-probabilities once before training (always); TRL does so only
with ``precompute_ref_log_probs=True``, and otherwise runs a reference model on every step. So
the script compares against both (``--trl-reference``): ``precomputed`` is the like-for-like
comparison of the training step, ``every-step`` is TRL's default. Each comparison alternates
the two sides, ``--repeats`` times each (default 5) with ``gc.freeze()``, and prints the median
pairs/s of each (steady state: the first step is left out, and so is the one-off reference pass
on both sides), the ratio with its spread, and where our step time goes (forward + backward,
clipping + optimizer step, other: collation, logging).

TRL is a benchmark-only dependency, installed into its own virtualenv beside the project's:

    benchmarks/trl_venv.sh 1.16.0
    ~/.cache/finetune-bench/trl-1.16.0/bin/python benchmarks/dpo_vs_trl.py [--steps 24] [--repeats 5]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_workload import (GOOD_WORDS, WORDS, RunResult, alternate, parser, run_ours, summarise,  # noqa: E402
                           train_trl, workload, write_json)

BATCH = 8
BETA = 0.1
LEARNING_RATE = 1e-5


def preference_rows(texts: list[str]) -> list[dict]:
    """One pair per prompt: good words chosen over other words, 6-12 of each, seeded."""
    rng = random.Random(2)
    good, other = sorted(GOOD_WORDS), [w for w in WORDS if w not in GOOD_WORDS]
    reply = lambda words: " " + " ".join(rng.choice(words) for _ in range(rng.randint(6, 12)))  # noqa: E731
    return [{"prompt": t, "chosen": reply(good), "rejected": reply(other)} for t in texts]


def dpo_ours(work: Path, sft: Path, data: Path, *, steps: int, rep: int) -> RunResult:
    job = {
        "model": str(sft), "data": {"preferences": str(data)},
        "dpo": {"batchSize": BATCH, "maxSteps": steps, "epochs": 1, "evalFraction": 0.0, "beta": BETA,
                "lossType": "sigmoid", "learningRate": LEARNING_RATE, "precision": "fp32", "chatTemplate": False,
                "logEverySteps": 1, "checkpointEverySteps": 10**6},
    }
    return run_ours(work, stage="dpo", job=job, name=f"ours-dpo-r{rep}")


def dpo_trl(work: Path, sft: Path, rows: list[dict], *, steps: int, rep: int, precompute: bool) -> RunResult:
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    AcceleratorState._reset_state(True)  # our stage's Accelerator may have set it up another way
    args = DPOConfig(
        output_dir=str(work / f"trl-dpo-r{rep}"), report_to=[], per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LEARNING_RATE, beta=BETA,
        loss_type=["sigmoid"], max_length=512, precompute_ref_log_probs=precompute, disable_dropout=True,
        save_strategy="no", logging_steps=1, bf16=False, fp16=False, use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    try:
        return train_trl(lambda callbacks: DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(sft), args=args, train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(sft), callbacks=callbacks,
        ), batch=BATCH)
    finally:
        AcceleratorState._reset_state(True)


def main() -> None:
    cli = parser(__doc__, steps=24, steps_help="optimizer steps per run (the first is a warm-up; at most 32, one "
                                                "epoch of the 256 pairs)")
    cli.add_argument("--trl-reference", choices=["precomputed", "every-step", "both"], default="both",
                     help="TRL's reference log-probs: precomputed once (like ours) or a reference model per step")
    args = cli.parse_args()
    variants = {"precomputed": True, "every-step": False}
    wanted = list(variants) if args.trl_reference == "both" else [args.trl_reference]
    results = []
    with workload(args, trl_version="1.16.0") as w:
        rows = preference_rows(w.texts)
        data = w.work / "preferences.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for name in wanted:
            mine, theirs = alternate(
                lambda rep: dpo_ours(w.work, w.sft, data, steps=args.steps, rep=len(results) * 100 + rep),
                lambda rep: dpo_trl(w.work, w.sft, rows, steps=args.steps, rep=len(results) * 100 + rep,
                                    precompute=variants[name]),
                repeats=args.repeats)
            results.append(summarise(f"DPO, {BATCH} pairs per step, TRL's reference {name}", mine, theirs,
                                     unit="pairs/s"))
    write_json(args, results)


if __name__ == "__main__":
    main()
