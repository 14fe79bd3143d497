"""What the *_vs_trl.py benchmarks share: the tiny workload, running our stage in process, and the
alternate-and-repeat measurement with its summary.

The workload: a Llama-style policy (2 layers, hidden 128, 4 heads, intermediate 512) and a
byte-level BPE vocabulary of 512 built from a config as tests/conftest.py does (nothing is
downloaded); a reward model of the same shape (a sequence classifier); 256 prompts of 4-10 tokens.

Measurement: each side runs ``repeats`` times, the two alternating (ours first on even repeats,
TRL first on odd ones, so a slow spell of the shared machine hits both); ``gc.collect()`` then
``gc.freeze()`` before every run of either side (TRL calls ``gc.collect()`` on every update, and
what that costs depends on how many objects are alive in the process). One torch thread by
default: on a 2-core machine shared with other work, two spinning OpenMP threads make every op
wait for a core (a 32-token generation took 15 s with 2 threads and 0.07 s with 1 under load),
which measures the machine, not the code. Steady state: the first update of every run is a
warm-up and is left out.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

PROMPTS = 256
WORDS = ("the a good bad great awful happy sad yes no please thanks hello world model answer question short "
         "long reply tell me about cats dogs weather today tomorrow is was very quite nice terrible love hate").split()
GOOD_WORDS = frozenset({"good", "great", "happy", "nice", "love", "thanks"})


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


def good_words(prompts, completions, **fields) -> list[float]:
    """A rule-based reward with TRL's signature: the share of a completion's words that are "good" ones."""
    scores = []
    for text in completions:
        words = text.split()
        scores.append(sum(w in GOOD_WORDS for w in words) / max(1, len(words)))
    return scores


# ---------------------------------------------------------------------------
# our stage, in this process


@dataclass
class RunResult:
    episodes_per_second: float
    seconds: dict[str, float] = field(default_factory=dict)
    """Our stage only: seconds per step in each phase (generation, forward, scoring, optimisation, other)."""


def run_ours(work: Path, *, stage: str, job: dict, name: str) -> RunResult:
    """Run ``python -m trainer --stage <stage>`` in this process on ``job`` (its outputDir is set here)."""
    import yaml

    from trainer.__main__ import main

    out = work / name
    job = {**job, "stage": stage, "outputDir": str(out),
           "reporting": {"metricsPort": None, "terminationLogPath": str(work / "termination-log")}}
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(job))
    if main(["--stage", stage, "--config", str(config)]) != 0:
        raise SystemExit(f"our {stage} failed: {(work / 'termination-log').read_text()}")
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "progress" and e.get("metrics")]
    seconds = steps[-1]["time"] - steps[0]["time"]
    batch = job[stage]["batchSize"]
    timed = steps[1:]
    split = {k: statistics.mean(e["metrics"].get(f"{k}_seconds", 0.0) for e in timed)
             for k in ("generation", "forward", "scoring", "optimisation")}
    split["other"] = seconds / len(timed) - sum(split.values())
    return RunResult((len(steps) - 1) * batch / seconds, split)


def steady_rate(stamps: list[float], batch: int) -> float:
    """Episodes/s between the end of the first update and the end of the last."""
    return (len(stamps) - 1) * batch / (stamps[-1] - stamps[0])


# ---------------------------------------------------------------------------
# alternate, repeat, summarise


def alternate(ours: Callable[[int], RunResult], theirs: Callable[[int], RunResult], *,
              repeats: int) -> tuple[list[RunResult], list[RunResult]]:
    """Run both ``repeats`` times, alternating which goes first, each with the collector frozen and its
    standard output discarded."""
    mine: list[RunResult] = []
    trl: list[RunResult] = []
    for rep in range(repeats):
        order = [(ours, mine), (theirs, trl)] if rep % 2 == 0 else [(theirs, trl), (ours, mine)]
        for run, into in order:
            gc.collect()
            gc.freeze()
            try:  # both print a line per step; the summary is what matters here
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                    into.append(run(rep))
            finally:
                gc.unfreeze()
    return mine, trl


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise(title: str, mine: list[RunResult], trl: list[RunResult], *, unit: str = "episodes/s") -> dict:
    """Print medians, the ratio of medians, the spread of the per-repeat ratios, and our time split."""
    ours_rates = [r.episodes_per_second for r in mine]
    trl_rates = [r.episodes_per_second for r in trl]
    ratios = [a / b for a, b in zip(ours_rates, trl_rates)]  # each repeat's pair ran back to back
    ratio = statistics.median(ours_rates) / statistics.median(trl_rates)
    q1, q2, q3 = quartiles(ratios)
    print(f"\n== {title} ({len(mine)} runs each, alternating) ==")
    print(f"ours  median {statistics.median(ours_rates):7.2f} {unit}  runs: "
          + " ".join(f"{x:.2f}" for x in ours_rates))
    print(f"TRL   median {statistics.median(trl_rates):7.2f} {unit}  runs: "
          + " ".join(f"{x:.2f}" for x in trl_rates))
    print(f"ratio of medians {ratio:.2f}x; per-repeat ratios median {q2:.2f}x, IQR {q1:.2f}-{q3:.2f}x, "
          f"min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    split = {k: statistics.median(r.seconds[k] for r in mine) for k in mine[0].seconds}
    total = sum(split.values())
    print("our step time (median s): " + ", ".join(f"{k} {v * 1000:.0f} ms ({v / total:.0%})" for k, v in split.items()),
          flush=True)
    return {"title": title, "ours": ours_rates, "trl": trl_rates, "ratio_of_medians": ratio,
            "ratio_iqr": [q1, q3], "ratio_min": min(ratios), "ratio_max": max(ratios), "our_split_seconds": split}

