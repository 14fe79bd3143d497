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

Two clocks: the wall clock (what a user waits for) and this process's CPU time (``time.process_time``;
what the code costs: time spent waiting for a core, which other work on a shared machine adds in
bursts, does not count). Rates and ratios are printed on both; our per-phase split is in CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import types
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
    """Wall clock: what a user waits for, and what a busy shared machine moves most."""
    cpu_episodes_per_second: float = float("nan")
    """Per second of this process's CPU time over the same steps: what the code costs, less moved by
    other processes taking the cores (time spent waiting for a core does not count)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Our stage only: CPU seconds per step in each phase (generation, forward, scoring, optimisation, other)."""


class Stamps:
    """(wall, CPU) time at the end of each step: steady-state rates between the first stamp and the last."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def result(self, batch: int, seconds: dict[str, float] | None = None) -> RunResult:
        steps = len(self.wall) - 1
        return RunResult(steps * batch / (self.wall[-1] - self.wall[0]), steps * batch / (self.cpu[-1] - self.cpu[0]),
                         seconds or {})


def run_ours(work: Path, *, stage: str, job: dict, name: str) -> RunResult:
    """Run ``python -m trainer --stage <stage>`` in this process on ``job`` (its outputDir is set here)."""
    import yaml

    from trainer.__main__ import main
    from trainer.runtime import StageContext

    out = work / name
    job = {**job, "stage": stage, "outputDir": str(out),
           "reporting": {"metricsPort": None, "terminationLogPath": str(work / "termination-log")}}
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(job))
    stamps = Stamps()
    report = StageContext.report

    def stamped(self, kind, **kwargs):  # a step ends with its progress event, as TRL's with on_step_end
        if kind == "progress" and kwargs.get("metrics"):
            stamps()
        return report(self, kind, **kwargs)

    StageContext.report = stamped
    # The stage's phase timers (trainer.rollout.now) read this process's CPU time here, like the CPU rates.
    rollout = importlib.import_module("trainer.rollout")
    clock = rollout.time
    rollout.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        if main(["--stage", stage, "--config", str(config)]) != 0:
            raise SystemExit(f"our {stage} failed: {(work / 'termination-log').read_text()}")
    finally:
        StageContext.report = report
        rollout.time = clock
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    timed = [e for e in events if e["kind"] == "progress" and e.get("metrics")][1:]
    split = {k: statistics.mean(e["metrics"].get(f"{k}_seconds", 0.0) for e in timed)
             for k in ("generation", "forward", "scoring", "optimisation")}
    split["other"] = (stamps.cpu[-1] - stamps.cpu[0]) / len(timed) - sum(split.values())
    return stamps.result(job[stage]["batchSize"], split)


def train_trl(make_trainer: Callable[[list], object], *, batch: int) -> RunResult:
    """Build TRL's trainer with ``make_trainer(callbacks)`` (seeded) and train it, stamping every step's end."""
    from transformers import TrainerCallback

    stamps = Stamps()

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps()

    torch.manual_seed(0)
    make_trainer([StepTimes()]).train()
    return stamps.result(batch)


# ---------------------------------------------------------------------------
# the command line every *_vs_trl.py shares


@dataclass
class Workload:
    work: Path
    sft: Path
    rm: Path
    texts: list[str]
    prompt_file: Path


def parser(doc: str, *, steps: int, steps_help: str) -> argparse.ArgumentParser:
    """The options every comparison takes; a script adds its own."""
    out = argparse.ArgumentParser(description=doc.splitlines()[0])
    out.add_argument("--steps", type=int, default=steps, help=steps_help)
    out.add_argument("--repeats", type=int, default=5, help="runs of each side, alternating")
    out.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides (see "
                                                             "tiny_workload.py)")
    out.add_argument("--json", type=Path, help="also write the figures here")
    out.add_argument("--trainer-tree", type=Path, help="import our trainer from this directory instead, to measure "
                     "another commit (git archive COMMIT trainer | tar -x -C DIR)")
    return out


@contextlib.contextmanager
def workload(args, *, trl_version: str, unit: str = "steps"):
    """Check TRL, quiet transformers, set the threads, print the header, build the workload in a temporary
    directory; yields a Workload."""
    if args.trainer_tree:
        sys.path.insert(0, str(args.trainer_tree.resolve()))
    try:
        import trl
    except ImportError:
        sys.exit(f"trl is not installed here: run benchmarks/trl_venv.sh {trl_version} and use that venv's python")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, trl {trl.__version__}, "
          f"{args.steps} {unit} per run (first excluded), {args.repeats} runs per side", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sft, rm = build_models(work)
        texts = prompts(AutoTokenizer.from_pretrained(sft))
        prompt_file = work / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        yield Workload(work, sft, rm, texts, prompt_file)


def write_json(args, results: list[dict]) -> None:
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


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
    """Print, on the wall clock and on CPU time, the medians, the ratio of the medians and the spread of the
    per-repeat ratios; then where our step time goes."""
    print(f"\n== {title} ({len(mine)} runs each, alternating) ==")
    out = {"title": title}
    for clock, rate in (("wall", lambda r: r.episodes_per_second), ("cpu", lambda r: r.cpu_episodes_per_second)):
        ours_rates, trl_rates = [rate(r) for r in mine], [rate(r) for r in trl]
        ratios = [a / b for a, b in zip(ours_rates, trl_rates)]  # each repeat's pair ran back to back
        ratio = statistics.median(ours_rates) / statistics.median(trl_rates)
        q1, q2, q3 = quartiles(ratios)
        print(f"[{clock}] ours median {statistics.median(ours_rates):7.2f} {unit}  runs: "
              + " ".join(f"{x:.2f}" for x in ours_rates))
        print(f"[{clock}] TRL  median {statistics.median(trl_rates):7.2f} {unit}  runs: "
              + " ".join(f"{x:.2f}" for x in trl_rates))
        print(f"[{clock}] ratio of medians {ratio:.2f}x; per-repeat ratios median {q2:.2f}x, IQR {q1:.2f}-{q3:.2f}x, "
              f"min {min(ratios):.2f}x, max {max(ratios):.2f}x")
        out[clock] = {"ours": ours_rates, "trl": trl_rates, "ratio_of_medians": ratio, "ratio_median": q2,
                      "ratio_iqr": [q1, q3], "ratio_min": min(ratios), "ratio_max": max(ratios)}
    split = {k: statistics.median(r.seconds[k] for r in mine) for k in mine[0].seconds}
    total = sum(split.values())
    print("our step's CPU time (median): "
          + ", ".join(f"{k} {v * 1000:.0f} ms ({v / total:.0%})" for k, v in split.items()), flush=True)
    out["our_split_seconds"] = split
    return out
