"""Throughput of our PPO stage against TRL 1.12's PPOTrainer (trl.experimental.ppo) on one tiny workload.

Both run in this one process on the same models, prompts and settings (benchmarks/tiny_workload.py):
batch 8; responses of exactly 32 tokens (no stop token); temperature 0.7; value model started from
the reward model; 1 and 4 PPO epochs, one minibatch; fp32 on the CPU; one torch thread. The two
sides alternate, each runs ``--repeats`` times (default 5) with ``gc.freeze()``, and the script
prints the median episodes/s of each, the ratio with its spread, and where our step time goes:
generation, forward (old log-probs, values, reference), scoring (reward), optimisation (the PPO
update, GAE and statistics), other (the loop around them: reporting, held-out bookkeeping). Then the 2x
budget: TRL's CPU time per step, half of it, ours, our update alone, and the ceiling, the ratio we would
reach with a free rollout (TRL's step over our update): under 2x, no rollout lever can reach the target.

TRL is a benchmark-only dependency, installed into its own virtualenv beside the project's
(TRL 1.12 is the last release with PPO; it accepts the project's transformers 5):

    benchmarks/trl_venv.sh 1.12.0
    ~/.cache/finetune-bench/trl-1.12.0/bin/python benchmarks/ppo_vs_trl.py [--steps 10] [--repeats 5]

``--value-model head`` runs our side with ``ppo.valueModel: head`` (a value head on the policy's backbone);
TRL keeps its separate value model, so that comparison is not like for like (benchmarks/README.md).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_workload import RunResult, alternate, parser, run_ours, summarise, train_trl, workload, write_json  # noqa: E402

BATCH = 8
RESPONSE_TOKENS = 32
TEMPERATURE = 0.7
LEARNING_RATE = 1e-5


def ppo_ours(work: Path, sft: Path, rm: Path, prompt_file: Path, *, epochs: int, steps: int, rep: int,
             value_model: str = "separate") -> RunResult:
    job = {
        "model": str(sft), "rewardModel": str(rm), "data": {"prompts": str(prompt_file)},
        "ppo": {"steps": steps, "batchSize": BATCH, "ppoEpochs": epochs, "miniBatches": 1,
                "responseLengthTokens": RESPONSE_TOKENS, "stopToken": None, "missingEosPenalty": None,
                "temperature": TEMPERATURE, "learningRate": LEARNING_RATE, "precision": "fp32",
                "chatTemplate": False, "healthChecks": "off",
                "samplePrompts": 1, "sampleEverySteps": 10**6, "checkpointEverySteps": 10**6, "maxKl": None,
                "valueModel": value_model},
    }
    return run_ours(work, stage="ppo", job=job, name=f"ours-{value_model}-e{epochs}-r{rep}")


def ppo_trl(work: Path, sft: Path, rm: Path, texts: list[str], *, epochs: int, steps: int, rep: int) -> RunResult:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
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
    return train_trl(lambda callbacks: PPOTrainer(
        args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(sft), ref_model=AutoModelForCausalLM.from_pretrained(sft),
        reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
        train_dataset=train, eval_dataset=train.select(range(BATCH)), callbacks=callbacks,
    ), batch=BATCH)


def step_budget(result: dict) -> dict:
    """What 2x would take, in CPU ms per PPO step: TRL's step, half of it (our target), ours, our update alone, and
    the ceiling, the ratio we would reach were our rollout free (generation, passes, scoring at zero cost). When
    the ceiling is under 2x no rollout lever can reach 2x: only a cheaper update could."""
    trl_step = BATCH / statistics.median(result["cpu"]["trl"])
    ours_step = BATCH / statistics.median(result["cpu"]["ours"])
    update = result["our_split_seconds"]["optimisation"]
    budget = {"trl_step_ms": trl_step * 1e3, "target_step_ms": trl_step * 500, "our_step_ms": ours_step * 1e3,
              "our_update_ms": update * 1e3, "ceiling_with_free_rollout": trl_step / update}
    print(f"2x budget (CPU per step): TRL {budget['trl_step_ms']:.0f} ms, so ours at most {budget['target_step_ms']:.0f}"
          f" ms; ours {budget['our_step_ms']:.0f} ms, of which the update {budget['our_update_ms']:.0f} ms; "
          f"ceiling with a free rollout {budget['ceiling_with_free_rollout']:.2f}x", flush=True)
    return budget


def main() -> None:
    cli = parser(__doc__, steps=10, steps_help="PPO updates per run (the first is a warm-up)")
    cli.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    cli.add_argument("--value-model", choices=["separate", "head"], default="separate",
                     help="our ppo.valueModel; TRL always uses a separate value model")
    args = cli.parse_args()
    results = []
    with workload(args, trl_version="1.12.0", unit="updates") as w:
        for epochs in args.epochs:
            mine, theirs = alternate(
                lambda rep: ppo_ours(w.work, w.sft, w.rm, w.prompt_file, epochs=epochs, steps=args.steps, rep=rep,
                                     value_model=args.value_model),
                lambda rep: ppo_trl(w.work, w.sft, w.rm, w.texts, epochs=epochs, steps=args.steps, rep=rep),
                repeats=args.repeats)
            result = summarise(f"PPO, {epochs} epoch(s), batch {BATCH}, {RESPONSE_TOKENS} response tokens, "
                               f"our value model: {args.value_model}", mine, theirs)
            result["budget"] = step_budget(result)
            results.append(result)
    write_json(args, results)


if __name__ == "__main__":
    main()
