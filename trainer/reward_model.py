"""Reward model: a one-output sequence classifier trained on preference pairs (Bradley-Terry).

The model starts from the SFT output (``job.model``) with a new score head and
reads its score at the last non-pad token. After training it is scored over
the training pairs to get normalisation statistics, which PPO uses to bring
scores to mean 0, std 1 (Huang et al., "The N Implementation Details of RLHF
with PPO", reward normalisation).

Without preference data but with heuristic reward functions there is nothing to
train: ``final/`` then holds only ``reward_functions.json``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from trainer.data import (
    TOKENIZED_DIR, PreferenceRow, encode_for_reward, load_preference_rows, pad_right, split_for_eval, tokenized_once,
)
from trainer.modeling import load_sequence_classifier, load_tokenizer, model_options, prepare_model_source, save_final
from trainer.runtime import PermanentStageFailure, StageContext
from trainer.supervised import MicroBatch, prepare_supervised, train_supervised

NORMALIZATION_FILE = "reward_normalization.json"
FUNCTIONS_FILE = "reward_functions.json"


def _log(ctx: StageContext, message: str) -> None:
    """A timestamped line in the pod log, as the progress lines are (main process only)."""
    if ctx.accelerator.is_main_process:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [reward] {message}", file=sys.stderr, flush=True)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), plus center_coefficient * mean((r_c + r_r)^2).

    The second term (TRL's ``center_rewards_coefficient``, Eisenstein et al.
    2023) keeps scores near zero; Bradley-Terry alone only fixes differences.
    chosen, rejected, margin: (b,).
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


def encode_pairs(rows: list[PreferenceRow], *, tokenizer, max_length: int) -> list[tuple[list[int], list[int], float]]:
    """(chosen ids, rejected ids, margin) per row, encoded exactly as PPO will score responses."""
    return [(encode_for_reward(tokenizer, prompt=r.prompt, response=r.chosen, max_length=max_length),
             encode_for_reward(tokenizer, prompt=r.prompt, response=r.rejected, max_length=max_length),
             r.margin) for r in rows]


def encoded_pairs(ctx: StageContext, tokenizer) -> list[tuple[list[int], list[int], float]]:
    """Every preference row encoded (``encode_pairs``) once per stage: cached in outputDir/tokenized,
    built on the main process only (``trainer.data.tokenized_once``)."""
    path, max_length = ctx.job.data.preferences, ctx.job.reward.max_seq_length_tokens

    def build() -> list:
        rows = load_preference_rows(path, tokenizer=tokenizer)
        return [list(pair) for pair in encode_pairs(rows, tokenizer=tokenizer, max_length=max_length)]

    stored = tokenized_once("reward", path, tokenizer=tokenizer, settings={"max_length": max_length},
                            cache_dir=ctx.output_dir / TOKENIZED_DIR, accelerator=ctx.accelerator, build=build,
                            describe=lambda value: f"{len(value)} preference pairs")
    return [(chosen, rejected, margin) for chosen, rejected, margin in stored]


def train_pairs(ctx: StageContext, setup, pairs: list[tuple[list[int], list[int], float]], *, pad_token_id: int,
                non_finite_advice: str) -> None:
    """The Bradley-Terry training loop on encoded pairs (``encode_pairs``), shared by the reward stage and a
    human-feedback round's retraining; ``setup`` comes from ``prepare_supervised``."""
    cfg, model = ctx.job.reward, setup.model

    def forward(indices: list[int]) -> MicroBatch:
        chunk = [pairs[j] for j in indices]
        # Chosen and rejected in one forward pass: (2b,) scores, chosen first.
        scores = score(model, [c for c, _, _ in chunk] + [r for _, r, _ in chunk], pad_token_id=pad_token_id,
                       device=ctx.device)
        chosen, rejected = scores[:len(chunk)], scores[len(chunk):]
        margin = torch.tensor([m for _, _, m in chunk], device=ctx.device) if cfg.margin_loss else None
        loss = bradley_terry_loss(chosen, rejected, margin=margin, center_coefficient=cfg.center_rewards_coefficient)
        return MicroBatch(loss=loss, tokens=sum(len(c) + len(r) for c, r, _ in chunk), samples=len(chunk),
                          sums={"correct": (chosen > rejected).float().sum(),
                                "pairs": torch.tensor(float(len(chunk)), device=ctx.device)})

    train_supervised(ctx, setup, forward=forward,
                     summarise=lambda sums: {"train_accuracy": sums["correct"] / max(sums["pairs"], 1.0)},
                     non_finite_advice=non_finite_advice)


def score(model, sequences: list[list[int]], *, pad_token_id: int, device) -> torch.Tensor:
    """Scalar score per sequence, (n,); right padding, read at the last non-pad token by transformers."""
    ids = torch.tensor(pad_right(sequences, pad_value=pad_token_id), device=device)  # (n, t)
    mask = torch.tensor(pad_right([[1] * len(s) for s in sequences], pad_value=0), device=device)
    return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()  # (n,)


@torch.no_grad()
def evaluate(ctx: StageContext, model, pairs, *, pad_token_id: int, batch_size: int) -> dict[str, float]:
    """Held-out accuracy (share of pairs with r_c > r_r) and mean margin r_c - r_r, over all processes."""
    accelerator = ctx.accelerator
    mine = pairs[accelerator.process_index::accelerator.num_processes]
    totals = torch.zeros(3, device=ctx.device)  # correct, margin sum, count
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        scores = score(model, [c for c, _, _ in chunk] + [r for _, r, _ in chunk],
                       pad_token_id=pad_token_id, device=ctx.device)
        chosen, rejected = scores[:len(chunk)], scores[len(chunk):]
        totals += torch.stack([(chosen > rejected).float().sum(), (chosen - rejected).sum(),
                               torch.tensor(float(len(chunk)), device=ctx.device)])
    totals = accelerator.reduce(totals, "sum")
    count = max(float(totals[2]), 1.0)
    return {"reward_model_accuracy": float(totals[0]) / count, "eval_margin": float(totals[1]) / count}


@torch.no_grad()
def normalization_stats(ctx: StageContext, model, pairs, *, pad_token_id: int, batch_size: int) -> dict[str, float]:
    """{"mean", "std"} of the scores of every chosen and rejected response of ``pairs``."""
    accelerator = ctx.accelerator
    mine = pairs[accelerator.process_index::accelerator.num_processes]
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # sum, sum of squares, count
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        scores = score(model, [c for c, _, _ in chunk] + [r for _, r, _ in chunk],
                       pad_token_id=pad_token_id, device=ctx.device).double()
        totals += torch.stack([scores.sum(), (scores ** 2).sum(),
                               torch.tensor(float(scores.numel()), dtype=torch.float64, device=ctx.device)])
    totals = accelerator.reduce(totals, "sum")
    n = float(totals[2])
    mean = float(totals[0]) / n
    variance = max(float(totals[1]) / n - mean ** 2, 0.0)
    return {"mean": mean, "std": math.sqrt(variance)}


def _functions_only(ctx: StageContext) -> Path:
    functions = [f.model_dump(mode="json", by_alias=True, exclude_none=True) for f in ctx.job.reward.functions]
    return save_final(ctx, None, None, extra_files={FUNCTIONS_FILE: {"functions": functions}})


def run(ctx: StageContext) -> Path:
    from trainer import feedback

    round_ = feedback.continuation_round()
    if round_ is not None:  # a human-feedback round: continue from final/ on the labels (trainer/feedback.py)
        return feedback.retrain_reward(ctx, round_)
    job, cfg, accelerator = ctx.job, ctx.job.reward, ctx.accelerator
    if job.data.preferences is None:
        if cfg.functions:
            return _functions_only(ctx)
        raise PermanentStageFailure("reward stage needs data.preferences or reward.functions")
    source = prepare_model_source(ctx, job.model)
    tokenizer = load_tokenizer(source)
    train, held_out = split_for_eval(encoded_pairs(ctx, tokenizer), fraction=cfg.eval_fraction, seed=cfg.seed)
    pad = tokenizer.pad_token_id

    set_seed(cfg.seed)  # identical score-head initialisation on every process
    model = load_sequence_classifier(source, dtype=ctx.dtype if cfg.lora else torch.float32, lora=cfg.lora,
                                     pad_token_id=pad, **model_options(cfg, trained=True))
    setup = prepare_supervised(ctx, model, cfg=cfg, epochs=cfg.epochs, max_steps=cfg.max_steps,
                               num_examples=len(train))
    model = setup.model

    train_pairs(ctx, setup, train, pad_token_id=pad,
                non_finite_advice="lower reward.learningRate or maxGradNorm, check the preference data, "
                                  "or use precision fp32")
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    if held_out:
        total = setup.plan.total_steps
        ctx.report("progress", step=total, total_steps=total,
                   metrics=evaluate(ctx, unwrapped, held_out, pad_token_id=pad, batch_size=cfg.batch_size))
    # Scoring every training response takes a fifth of a short stage: say so, or the log goes quiet.
    started = time.perf_counter()
    _log(ctx, f"scoring the {2 * len(train)} training responses for {NORMALIZATION_FILE}")
    stats = normalization_stats(ctx, unwrapped, train, pad_token_id=pad, batch_size=cfg.batch_size)
    _log(ctx, f"score mean {stats['mean']:.4g}, std {stats['std']:.4g} ({time.perf_counter() - started:.0f} s); "
              "saving final/")
    extra_files = {NORMALIZATION_FILE: stats}
    if cfg.functions:
        extra_files[FUNCTIONS_FILE] = {"functions": [
            f.model_dump(mode="json", by_alias=True, exclude_none=True) for f in cfg.functions]}
    return save_final(ctx, model, tokenizer, extra_files=extra_files)
