"""Throughput of our PPO stage against TRL's PPOTrainer (trl 1.12, trl.experimental.ppo) on one workload.

Both run in this process on the same tiny models, prompts and settings:
Llama-style policy (2 layers, hidden 128, 4 heads, intermediate 512), byte-level BPE
vocabulary of 512; reward and value models of the same shape (sequence classifiers);
256 prompts of 4-10 tokens; batch 8; responses of exactly 32 tokens (no stop token);
1 and 4 PPO epochs, one minibatch; fp32 on the CPU.

TRL runs twice per setting: as shipped, and with ``gc.freeze()`` before training
(TRL calls ``gc.collect()`` twice per update, which walks every live Python object;
freezing moves the objects that exist at start out of the collector's way).  We compare
against the faster of the two.

Steady-state throughput: the first update of every run is a warm-up and is left out;
episodes/s = (updates - 1) * batch / seconds between the end of update 1 and the last.

    .venv/bin/python benchmarks/ppo_vs_trl.py [--steps 12]

TRL is a benchmark-only dependency; see benchmarks/README.md for how to install it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

BATCH = 8
RESPONSE_TOKENS = 32
PROMPTS = 256
TEMPERATURE = 0.7
LEARNING_RATE = 1e-5
WORDS = ("the a good bad great awful happy sad yes no please thanks hello world model answer question short "
         "long reply tell me about cats dogs weather today tomorrow is was very quite nice terrible love hate").split()


# ---------------------------------------------------------------------------
# workload


def build_models(directory: Path) -> tuple[Path, Path]:
    """Tokenizer + policy ("SFT") in directory/sft, reward model in directory/rm; returns both paths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                              PreTrainedTokenizerFast)

    corpus = [" ".join(random.Random(i).choice(WORDS) for _ in range(12)) for i in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=512, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, num_labels=1)
    sft, rm = directory / "sft", directory / "rm"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    return sft, rm


def prompts(tokenizer) -> list[str]:
    """256 prompts of 4-10 tokens each (word sequences trimmed by their token count)."""
    rng = random.Random(1)
    out = []
    while len(out) < PROMPTS:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        if 4 <= len(tokenizer(text)["input_ids"]) <= 10:
            out.append(text)
    return out


# ---------------------------------------------------------------------------
# ours


def run_ours(work: Path, sft: Path, rm: Path, texts: list[str], *, epochs: int, steps: int) -> dict:
    import yaml

    from trainer.__main__ import main

    out = work / f"ours-e{epochs}"
    prompt_file = work / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    job = {
        "stage": "ppo", "model": str(sft), "rewardModel": str(rm), "outputDir": str(out),
        "data": {"prompts": str(prompt_file)},
        "ppo": {"steps": steps, "batchSize": BATCH, "ppoEpochs": epochs, "miniBatches": 1,
                "responseLengthTokens": RESPONSE_TOKENS, "stopToken": None, "missingEosPenalty": None,
                "temperature": TEMPERATURE, "learningRate": LEARNING_RATE, "precision": "fp32",
                "samplePrompts": 1, "sampleEverySteps": 10**6, "checkpointEverySteps": 10**6, "maxKl": None},
        "reporting": {"metricsPort": None, "terminationLogPath": str(work / "termination-log")},
    }
    config = work / f"ours-e{epochs}.yaml"
    config.write_text(yaml.safe_dump(job))
    if main(["--stage", "ppo", "--config", str(config)]) != 0:
        raise SystemExit(f"our PPO failed: {(work / 'termination-log').read_text()}")
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    steps_done = [e for e in events if e["kind"] == "progress" and e.get("metrics")]
    seconds = steps_done[-1]["time"] - steps_done[0]["time"]
    episodes = (len(steps_done) - 1) * BATCH
    timed = steps_done[1:]
    split = {k: sum(e["metrics"][f"{k}_seconds"] for e in timed) for k in ("generation", "scoring", "optimisation")}
    total = sum(split.values())
    return {"episodes_per_second": episodes / seconds,
            "tokens_per_second": episodes * RESPONSE_TOKENS / seconds,
            "share": {k: v / total for k, v in split.items()},
            "loop_overhead": 1 - total / seconds}


# ---------------------------------------------------------------------------
# TRL


def run_trl(work: Path, sft: Path, rm: Path, texts: list[str], *, epochs: int, steps: int, freeze: bool) -> dict:
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"  # TRL generates from left-padded queries
    ids = [tokenizer(t)["input_ids"] for t in texts]
    train = Dataset.from_dict({"input_ids": ids})
    args = PPOConfig(
        output_dir=str(work / f"trl-e{epochs}-{'freeze' if freeze else 'plain'}"), report_to=[],
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
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        trainer.train()
    finally:
        if freeze:
            gc.unfreeze()
    episodes = (len(stamps) - 1) * BATCH
    seconds = stamps[-1] - stamps[0]
    return {"episodes_per_second": episodes / seconds, "tokens_per_second": episodes * RESPONSE_TOKENS / seconds}


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="PPO updates per run (the first is a warm-up)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("trl is not installed: see benchmarks/README.md")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, trl {trl.__version__}, "
          f"{args.steps} updates per run (first excluded)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sft, rm = build_models(work)
        texts = prompts(AutoTokenizer.from_pretrained(sft))
        lengths = [len(AutoTokenizer.from_pretrained(sft)(t)["input_ids"]) for t in texts[:50]]
        print(f"prompts: {len(texts)}, tokens per prompt (first 50) mean {statistics.mean(lengths):.1f}", flush=True)
        for epochs in args.epochs:
            ours = run_ours(work, sft, rm, texts, epochs=epochs, steps=args.steps)
            plain = run_trl(work, sft, rm, texts, epochs=epochs, steps=args.steps, freeze=False)
            frozen = run_trl(work, sft, rm, texts, epochs=epochs, steps=args.steps, freeze=True)
            best = max(plain, frozen, key=lambda r: r["episodes_per_second"])
            share = ", ".join(f"{k} {v:.0%}" for k, v in ours["share"].items())
            print(f"\n== {epochs} PPO epoch(s), batch {BATCH}, {RESPONSE_TOKENS} response tokens ==")
            print(f"ours               {ours['episodes_per_second']:7.2f} episodes/s  "
                  f"{ours['tokens_per_second']:8.1f} tokens/s")
            print(f"TRL as shipped     {plain['episodes_per_second']:7.2f} episodes/s  "
                  f"{plain['tokens_per_second']:8.1f} tokens/s")
            print(f"TRL + gc.freeze()  {frozen['episodes_per_second']:7.2f} episodes/s  "
                  f"{frozen['tokens_per_second']:8.1f} tokens/s")
            print(f"ours / faster TRL  {ours['episodes_per_second'] / best['episodes_per_second']:7.2f}x")
            print(f"our wall time: {share}; loop overhead outside those {ours['loop_overhead']:.0%}", flush=True)


if __name__ == "__main__":
    main()
