"""Direct preference optimisation (Rafailov et al. 2023) on preference pairs: no reward model, no sampling.

Top to bottom: load and check the pairs (``data.preferences``, the rows the reward stage
reads), set a seeded share aside as the held-out split, tokenise each pair as prompt + reply
with the loss on the reply's tokens only; load the policy (the input model, the SFT output;
LoRA optional); get the reference log-probabilities of every pair; then the supervised loop
shared with SFT and the reward stage (``trainer.supervised``) with the DPO (or IPO) loss of one
micro-batch as its ``forward``, evaluating on the held-out pairs at every log.

The reference is the input model itself, so its log-probabilities are those of the policy
before its first step: they are computed once, by the freshly loaded policy in eval mode and
without gradients, before training starts (so no second copy of the model is ever held), and
saved in ``<outputDir>/reference-logprobs/`` with the fingerprint of what they depend on. A
retry or resume of the same run reads them back instead of recomputing them. The arithmetic
is in ``trainer.dpo_math``; docs/dpo.md describes every setting and metric.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from pydantic.alias_generators import to_camel

from trainer import dpo_math, provenance, sharding
from trainer.config import DPOConfig
from trainer.data import (
    TOKENIZED_DIR, PreferenceRow, encode_text, load_preference_rows, pad_right, render_prompt, split_for_eval,
    tokenized_once,
)
from trainer.durable import publish_directory
from trainer.modeling import (disable_dropout, load_causal_lm, load_tokenizer, model_options, prepare_model_source,
                              save_final)
from trainer.runtime import COMPLETE_MARKER, PermanentStageFailure, StageContext
from trainer.supervised import MicroBatch, prepare_supervised, train_supervised

NON_FINITE_ADVICE = "lower dpo.learningRate or maxGradNorm, check the preference data, or use precision fp32"
REFERENCE_DIR = "reference-logprobs"
"""In outputDir: the reference log-probabilities of every pair, computed once per run."""
REFERENCE_FILE = "logprobs.safetensors"
REFERENCE_SETTINGS = frozenset({"max_seq_length_tokens", "eval_fraction", "seed", "chat_template", "precision",
                                "attention_implementation", "lora", "share_prompt"})
"""The dpo settings the reference log-probabilities depend on (which pairs are held out, how they are
tokenised, the compute dtype); a change to any other setting keeps the saved ones."""
REFERENCE_COLUMNS = ("chosen_sum", "chosen_tokens", "rejected_sum", "rejected_tokens")
SAMPLE_PAIRS = 4
"""Held-out pairs whose prompt the policy answers at every log (the ``samples`` event)."""
MAX_SAMPLE_TOKENS = 64
"""A sample response is as long as the longest reply of the shown pairs, at most this many tokens."""


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a pair: the shared prompt, then each reply (ending with EOS); the loss covers the replies."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _reply_ids(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _common_start(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(row: PreferenceRow, *, tokenizer, max_length: int, chat_template: bool) -> EncodedPair:
    """The pair as the policy reads it.

    The prompt is the row's prompt text (``render_prompt``: a text prompt through the chat template
    as a user message when ``chat_template``; a conversational row's prompt is already rendered),
    tokenised with the tokenizer's special tokens (BOS once); each reply is tokenised on its own and
    ends with EOS, as SFT trains replies to end. An implicit-prompt text row (no ``prompt``) is
    split at the longest common start of the two tokenised texts, each reply keeping at least one
    token. Over ``max_length``: the replies keep at least half of it (cut from the right) and the
    prompt loses its start, identically for both replies, so the prompt still cancels in the loss.
    """
    if row.prompt:
        text = row.prompt if row.chat else render_prompt(tokenizer, row.prompt, chat_template=chat_template)
        prompt = encode_text(tokenizer, text)
        chosen = _reply_ids(tokenizer, tokenizer(row.chosen, add_special_tokens=False)["input_ids"])
        rejected = _reply_ids(tokenizer, tokenizer(row.rejected, add_special_tokens=False)["input_ids"])
    else:
        whole_chosen, whole_rejected = encode_text(tokenizer, row.chosen), encode_text(tokenizer, row.rejected)
        shared = min(_common_start(whole_chosen, whole_rejected), len(whole_chosen) - 1, len(whole_rejected) - 1)
        prompt = whole_chosen[:max(shared, 0)]
        chosen = _reply_ids(tokenizer, whole_chosen[len(prompt):])
        rejected = _reply_ids(tokenizer, whole_rejected[len(prompt):])
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        reply_budget = max(max_length - len(prompt), min(longest, max_length // 2))
        chosen, rejected = chosen[:reply_budget], rejected[:reply_budget]
        keep = max_length - max(len(chosen), len(rejected))
        prompt = prompt[len(prompt) - keep:] if keep > 0 else []
    return EncodedPair(prompt=prompt, chosen=chosen, rejected=rejected)


def collate_pairs(pairs: list[EncodedPair], *, pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Chosen sequences first, then rejected, right-padded: input_ids, attention_mask, completion_mask, (2b, t)."""
    sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    replies = [(len(p.prompt), len(p.chosen)) for p in pairs] + [(len(p.prompt), len(p.rejected)) for p in pairs]
    completion = [[0] * start + [1] * length for start, length in replies]
    return {
        "input_ids": torch.tensor(pad_right(sequences, pad_value=pad_token_id), device=device),
        "attention_mask": torch.tensor(pad_right([[1] * len(s) for s in sequences], pad_value=0), device=device),
        "completion_mask": torch.tensor(pad_right(completion, pad_value=0), device=device),
    }


SHARED_PROMPT_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take the block attention mask of ``collate_shared_prompt``."""


def collate_shared_prompt(pairs: list[EncodedPair], *, pad_token_id: int, device,
                          attention: str) -> dict[str, torch.Tensor]:
    """One right-padded row per pair, prompt + chosen + rejected, (b, t), so the prompt is computed once.

    The rejected reply continues the prompt's positions (``position_ids``) and cannot see the chosen
    reply (``attention_mask``, (b, 1, t, t): causal, minus the rejected-to-chosen block; bool for sdpa,
    additive float for eager), so each reply's logits are those of its own sequence prompt + reply.
    ``chosen_*`` and ``rejected_*`` (b, k) say which position's logits predict which token (see
    ``dpo_math.gathered_logprobs``): reply token j is predicted at the position before it, and the
    first rejected token at the prompt's last position. A first token with no prompt before it is not
    scored, as in ``collate_pairs``.
    """
    b = len(pairs)
    width = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    allowed = torch.ones(width, width, dtype=torch.bool).tril().repeat(b, 1, 1)  # (b, t, t)
    scored: dict[str, list[list[tuple[int, int]]]] = {"chosen": [], "rejected": []}
    for i, pair in enumerate(pairs):
        p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
        ids[i, :p + c + r] = torch.tensor(pair.prompt + pair.chosen + pair.rejected)
        positions[i, :p + c] = torch.arange(p + c)
        positions[i, p + c:p + c + r] = torch.arange(p, p + r)
        allowed[i, p + c:p + c + r, p:p + c] = False
        scored["chosen"].append([(p + j - 1, t) for j, t in enumerate(pair.chosen)])
        scored["rejected"].append([(p - 1 if j == 0 else p + c + j - 1, t) for j, t in enumerate(pair.rejected)])
    if attention == "eager":
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        mask = allowed
    batch = {"input_ids": ids.to(device), "position_ids": positions.to(device),
             "attention_mask": mask[:, None].to(device)}
    for name, rows in scored.items():
        k = max(len(row) for row in rows)
        sources = torch.zeros((b, k), dtype=torch.long)
        tokens = torch.zeros((b, k), dtype=torch.long)
        counted = torch.zeros((b, k))
        for i, row in enumerate(rows):
            for j, (source, token) in enumerate(row):
                if source >= 0:
                    sources[i, j], tokens[i, j], counted[i, j] = source, token, 1.0
        batch.update({f"{name}_sources": sources.to(device), f"{name}_tokens": tokens.to(device),
                      f"{name}_mask": counted.to(device)})
    return batch


def shared_prompt_attention(config) -> str | None:
    """The model's attention implementation when it can run a pair as one sequence, else None (said on stderr).

    None for implementations that do not take the prepared mask, and for a model with an active
    sliding attention window, which the plainly causal mask would not apply.
    """
    attention = getattr(config, "_attn_implementation", None)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    why = (f"attention implementation {attention} takes no prepared mask" if attention not in SHARED_PROMPT_ATTENTION
           else f"the model has a sliding attention window ({window})" if window else None)
    if why:
        print(f"[dpo] pairs run as two sequences (sharePrompt does not apply): {why}", file=sys.stderr, flush=True)
        return None
    return attention


def pair_logprobs(model, pairs: list[EncodedPair], *, pad_token_id: int, device,
                  shared_prompt_attention: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, token counts) of the replies' log-probs, each (2b,): chosen replies first. One forward pass.

    With ``shared_prompt_attention`` (the model's attention implementation, one of
    ``SHARED_PROMPT_ATTENTION``) each pair is one sequence (``collate_shared_prompt``); without,
    two (``collate_pairs``). The results agree to float rounding.
    """
    if shared_prompt_attention is None:
        batch = collate_pairs(pairs, pad_token_id=pad_token_id, device=device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2b, t, v)
        return dpo_math.completion_logprobs(logits, batch["input_ids"], batch["completion_mask"])
    batch = collate_shared_prompt(pairs, pad_token_id=pad_token_id, device=device,
                                  attention=shared_prompt_attention)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits  # (b, t, v)
    chosen = dpo_math.gathered_logprobs(logits, batch["chosen_sources"], batch["chosen_tokens"], batch["chosen_mask"])
    rejected = dpo_math.gathered_logprobs(logits, batch["rejected_sources"], batch["rejected_tokens"],
                                          batch["rejected_mask"])
    return torch.cat([chosen[0], rejected[0]]), torch.cat([chosen[1], rejected[1]])


@torch.no_grad()
def compute_reference(ctx: StageContext, model, pairs: list[EncodedPair], *, pad_token_id: int, batch_size: int,
                      shared_prompt_attention: str | None) -> torch.Tensor:
    """(n, 4) float32, ``REFERENCE_COLUMNS`` of every pair, the same on every process.

    Each process computes pairs rank, rank + world, ... in batches of ``batch_size``; the
    results are gathered. Call on every process, with ``model`` in eval mode.
    """
    accelerator, n = ctx.accelerator, len(pairs)
    if n == 0:
        return torch.zeros(0, 4)
    world, rank = accelerator.num_processes, accelerator.process_index
    share = math.ceil(n / world)
    mine = list(range(rank, n, world))
    mine += mine[-1:] * (share - len(mine))  # equal shares for the gather; the repeats are dropped below
    rows = []
    for start in range(0, share, batch_size):
        chunk = [pairs[i] for i in mine[start:start + batch_size]]
        with accelerator.autocast():
            sums, counts = pair_logprobs(model, chunk, pad_token_id=pad_token_id, device=ctx.device,
                                         shared_prompt_attention=shared_prompt_attention)
        b = len(chunk)
        rows.append(torch.stack([sums[:b], counts[:b], sums[b:], counts[b:]], dim=1).float())  # (b, 4)
    gathered = accelerator.gather(torch.cat(rows)).cpu()  # (world * share, 4), process by process
    reference = torch.empty(n, 4)
    for r in range(world):
        owned = list(range(r, n, world))
        reference[owned] = gathered[r * share:r * share + len(owned)]
    return reference


def reference_fingerprint(ctx: StageContext) -> dict:
    """The stage's fingerprint restricted to what the reference log-probs depend on (``REFERENCE_SETTINGS``)."""
    keep = {to_camel(name) for name in REFERENCE_SETTINGS}
    fingerprint = dict(ctx.fingerprint)
    fingerprint["settings"] = {k: v for k, v in ctx.fingerprint.get("settings", {}).items() if k in keep}
    return fingerprint


def load_reference(ctx: StageContext, *, train: int, held_out: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(train, held-out) reference log-probs saved by an earlier attempt of this run, or None.

    None (and a line on stderr saying why) when there are none, they are incomplete, or they were
    computed for another run, other inputs or other settings; the same answer on every process.
    """
    from safetensors.torch import load_file

    directory = ctx.output_dir / REFERENCE_DIR
    found, why = None, None
    if (directory / COMPLETE_MARKER).is_file():
        saved = provenance.read_final_fingerprint(directory) or {}
        current = reference_fingerprint(ctx)
        changed = provenance.differences(saved, current, stage=ctx.job.stage)
        if saved.get("runUid") != current.get("runUid"):
            changed.insert(0, f"runUid: {saved.get('runUid')} -> {current.get('runUid')}")
        if changed:
            why = f"computed for other inputs or settings ({'; '.join(changed)})"
        else:
            try:
                tensors = load_file(str(directory / REFERENCE_FILE))
            except Exception as exc:  # a damaged file surfaces as any of several library errors
                why = f"unreadable ({type(exc).__name__}: {exc})"
            else:
                if tuple(tensors["train"].shape) == (train, 4) and tuple(tensors["held_out"].shape) == (held_out, 4):
                    found = (tensors["train"], tensors["held_out"])
                else:
                    why = "saved for another number of pairs"
    everywhere = torch.tensor([0.0 if found is None else 1.0], device=ctx.device)
    if ctx.accelerator.num_processes > 1:
        everywhere = ctx.accelerator.reduce(everywhere, "min")
    if float(everywhere) == 0.0:
        found = None
    if ctx.is_main_process:
        message = (f"reference log-probs read from {directory}" if found is not None else
                   f"reference log-probs in {directory} not used: {why}" if why else None)
        if message:
            print(f"[dpo] {message}", file=sys.stderr, flush=True)
    return found


def save_reference(ctx: StageContext, train: torch.Tensor, held_out: torch.Tensor) -> None:
    """Write ``<outputDir>/reference-logprobs/`` whole (tensors, fingerprint, marker last); all processes call it."""
    from safetensors.torch import save_file

    if ctx.is_main_process:
        temp = ctx.output_dir / f".tmp-{REFERENCE_DIR}"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        save_file({"train": train.contiguous(), "held_out": held_out.contiguous()}, str(temp / REFERENCE_FILE),
                  metadata={"columns": ",".join(REFERENCE_COLUMNS)})
        (temp / provenance.FINGERPRINT_FILE).write_text(json.dumps(reference_fingerprint(ctx), indent=2))
        publish_directory(temp, ctx.output_dir / REFERENCE_DIR, marker=COMPLETE_MARKER)
    ctx.accelerator.wait_for_everyone()


def _reference_columns(reference: torch.Tensor, *, loss_type: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs, each (b,), from rows of ``REFERENCE_COLUMNS``."""
    reference = reference.to(device)
    return (dpo_math.sequence_logprobs(reference[:, 0], reference[:, 1], loss_type=loss_type),
            dpo_math.sequence_logprobs(reference[:, 2], reference[:, 3], loss_type=loss_type))


def pair_terms(model, pairs: list[EncodedPair], reference: torch.Tensor, *, cfg: DPOConfig, pad_token_id: int,
               device, shared_prompt_attention: str | None) -> tuple[dpo_math.PairTerms, int]:
    """Loss and implicit rewards of ``pairs`` under ``model`` against their reference rows (b, 4),
    and the number of tokens read."""
    sums, counts = pair_logprobs(model, pairs, pad_token_id=pad_token_id, device=device,
                                 shared_prompt_attention=shared_prompt_attention)  # (2b,) each
    policy = dpo_math.sequence_logprobs(sums, counts, loss_type=cfg.loss_type)
    reference_chosen, reference_rejected = _reference_columns(reference, loss_type=cfg.loss_type, device=device)
    b = len(pairs)
    terms = dpo_math.preference_terms(policy[:b], policy[b:], reference_chosen, reference_rejected, beta=cfg.beta,
                                      loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
    prompt_reads = 1 if shared_prompt_attention else 2
    tokens = sum(prompt_reads * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    return terms, tokens


def window_metrics(sums: dict[str, float], *, prefix: str = "") -> dict[str, float]:
    """Means per pair of summed statistics: ``{prefix}`` + chosen_reward, rejected_reward, reward_margin,
    preference_accuracy."""
    pairs = max(sums["pairs"], 1.0)
    chosen, rejected = sums["chosen_reward"] / pairs, sums["rejected_reward"] / pairs
    return {f"{prefix}chosen_reward": chosen, f"{prefix}rejected_reward": rejected,
            f"{prefix}reward_margin": chosen - rejected, f"{prefix}preference_accuracy": sums["correct"] / pairs}


def _statistics(terms: dpo_math.PairTerms, device) -> dict[str, torch.Tensor]:
    return {"chosen_reward": terms.chosen_rewards.sum(), "rejected_reward": terms.rejected_rewards.sum(),
            "correct": terms.correct.sum(), "pairs": torch.tensor(float(terms.losses.numel()), device=device)}


@torch.no_grad()
def evaluate_held_out(ctx: StageContext, model, pairs: list[EncodedPair], reference: torch.Tensor, *, cfg: DPOConfig,
                      pad_token_id: int, shared_prompt_attention: str | None) -> dict[str, float]:
    """eval_loss and the eval_ window metrics over all held-out ``pairs``, each process taking its share.

    Call on every process with the unwrapped policy in eval mode; ``reference`` holds the pairs' rows (n, 4).
    """
    accelerator = ctx.accelerator
    mine = list(range(accelerator.process_index, len(pairs), accelerator.num_processes))
    names = ("loss", "chosen_reward", "rejected_reward", "correct", "pairs")
    totals = torch.zeros(len(names), device=ctx.device)
    for start in range(0, len(mine), cfg.batch_size):
        indices = mine[start:start + cfg.batch_size]
        with accelerator.autocast():
            terms, _ = pair_terms(model, [pairs[j] for j in indices], reference[indices], cfg=cfg,
                                  pad_token_id=pad_token_id, device=ctx.device,
                                  shared_prompt_attention=shared_prompt_attention)
        statistics = {"loss": terms.losses.sum(), **_statistics(terms, ctx.device)}
        totals += torch.stack([statistics[n].float() for n in names])
    sums = dict(zip(names, accelerator.reduce(totals, "sum").tolist()))
    return {"eval_loss": sums["loss"] / max(sums["pairs"], 1.0), **window_metrics(sums, prefix="eval_")}


@torch.no_grad()
def held_out_samples(ctx: StageContext, model, pairs: list[EncodedPair], reference: torch.Tensor, *,
                     texts: list[tuple[str, str]], cfg: DPOConfig, tokenizer,
                     shared_prompt_attention: str | None) -> list[dict]:
    """The policy's greedy answer to each pair's prompt, beside the pair (``texts``: its chosen and
    rejected replies as written) and its implicit rewards.

    Greedy decoding draws no random numbers, so samples never change the training that follows.
    ``model`` is the unwrapped policy in eval mode; run on the main process only (on every process when it is
    sharded: its forward is a collective).
    """
    if not pairs:
        return []
    with ctx.accelerator.autocast():
        terms, _ = pair_terms(model, pairs, reference, cfg=cfg, pad_token_id=tokenizer.pad_token_id,
                              device=ctx.device, shared_prompt_attention=shared_prompt_attention)
    max_new = min(MAX_SAMPLE_TOKENS, max(max(len(p.chosen), len(p.rejected)) for p in pairs))
    samples = []
    for k, (pair, (chosen, rejected)) in enumerate(zip(pairs, texts)):
        prompt = torch.tensor([pair.prompt or [tokenizer.eos_token_id]], device=ctx.device)  # (1, p)
        with ctx.accelerator.autocast():
            output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
        samples.append({
            "prompt": tokenizer.decode(pair.prompt, skip_special_tokens=True),
            "response": tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True),
            "chosen": chosen, "rejected": rejected,
            "chosen_reward": float(terms.chosen_rewards[k]), "rejected_reward": float(terms.rejected_rewards[k]),
        })
    return samples


def encoded_pairs(ctx: StageContext, tokenizer) -> tuple[list[EncodedPair], list[EncodedPair], list[tuple[str, str]]]:
    """(training pairs, held-out pairs, the chosen and rejected texts of the first SAMPLE_PAIRS held-out
    pairs), read, split and encoded (``encode_pair``) once per stage: cached in outputDir/tokenized,
    built on the main process only (``trainer.data.tokenized_once``)."""
    cfg, path = ctx.job.dpo, ctx.job.data.preferences
    settings = {"max_length": cfg.max_seq_length_tokens, "chat_template": cfg.chat_template,
                "eval_fraction": cfg.eval_fraction, "seed": cfg.seed}

    def build() -> dict:
        rows = load_preference_rows(path, tokenizer=tokenizer)
        train_rows, eval_rows = split_for_eval(rows, fraction=cfg.eval_fraction, seed=cfg.seed)
        encode = dict(tokenizer=tokenizer, max_length=cfg.max_seq_length_tokens, chat_template=cfg.chat_template)
        return {"train": [astuple(encode_pair(r, **encode)) for r in train_rows],
                "held_out": [astuple(encode_pair(r, **encode)) for r in eval_rows],
                "shown": [[r.chosen, r.rejected] for r in eval_rows[:SAMPLE_PAIRS]]}

    stored = tokenized_once("dpo", path, tokenizer=tokenizer, settings=settings, build=build,
                            cache_dir=ctx.output_dir / TOKENIZED_DIR, accelerator=ctx.accelerator,
                            describe=lambda v: f"{len(v['train'])} + {len(v['held_out'])} held-out preference pairs")
    return ([EncodedPair(*map(list, pair)) for pair in stored["train"]],
            [EncodedPair(*map(list, pair)) for pair in stored["held_out"]],
            [(chosen, rejected) for chosen, rejected in stored["shown"]])


def run(ctx: StageContext) -> Path:
    job, cfg, accelerator = ctx.job, ctx.job.dpo, ctx.accelerator
    if job.data.preferences is None:
        raise PermanentStageFailure("dpo stage needs data.preferences (a dataset of prompt/chosen/rejected rows)")
    source = prepare_model_source(ctx, job.model)
    tokenizer = load_tokenizer(source)
    pad = tokenizer.pad_token_id
    train, held_out, shown_texts = encoded_pairs(ctx, tokenizer)

    set_seed(cfg.seed)  # identical initialisation (LoRA adapters) on every process
    model = load_causal_lm(source, dtype=ctx.dtype if cfg.lora else torch.float32, lora=cfg.lora,
                           **model_options(cfg, trained=True))
    disable_dropout(model)  # the log-ratios to the reference must not be noise
    shared = shared_prompt_attention(model.config) if cfg.share_prompt else None
    layout = dict(pad_token_id=pad, shared_prompt_attention=shared)
    saved = load_reference(ctx, train=len(train), held_out=len(held_out))
    if saved is None:
        # Before any step the policy is the reference (LoRA's B matrices start at zero).
        model.to(ctx.device).eval()
        saved = (compute_reference(ctx, model, train, batch_size=cfg.batch_size, **layout),
                 compute_reference(ctx, model, held_out, batch_size=cfg.batch_size, **layout))
        save_reference(ctx, *saved)
    reference_train, reference_held_out = saved
    setup = prepare_supervised(ctx, model, cfg=cfg, epochs=cfg.epochs, max_steps=cfg.max_steps,
                               num_examples=len(train))

    def forward(indices: list[int]) -> MicroBatch:
        terms, tokens = pair_terms(setup.model, [train[j] for j in indices], reference_train[indices], cfg=cfg,
                                   device=ctx.device, **layout)
        return MicroBatch(loss=terms.losses.mean(), tokens=tokens, samples=len(indices),
                          sums=_statistics(terms, ctx.device))

    def report_samples(step: int) -> None:
        # A sharded policy's forward is a collective: every process decodes (the same greedy answers).
        if ctx.is_main_process or sharding.is_sharded(setup.model):
            shown = list(range(min(SAMPLE_PAIRS, len(held_out))))
            samples = held_out_samples(ctx, accelerator.unwrap_model(setup.model), [held_out[j] for j in shown],
                                       reference_held_out[shown], texts=shown_texts[:len(shown)], cfg=cfg,
                                       tokenizer=tokenizer, shared_prompt_attention=shared)
            if ctx.is_main_process:
                ctx.report("samples", step=step, total_steps=setup.plan.total_steps, samples=samples)

    def evaluate(step: int) -> dict[str, float]:
        report_samples(step)
        return evaluate_held_out(ctx, accelerator.unwrap_model(setup.model), held_out, reference_held_out, cfg=cfg,
                                 **layout)

    if held_out and setup.start_step == 0:  # what the input model answers, to compare the later samples with
        setup.model.eval()
        report_samples(0)
    train_supervised(ctx, setup, forward=forward, summarise=window_metrics, evaluate=evaluate if held_out else None,
                     non_finite_advice=NON_FINITE_ADVICE)
    if held_out and setup.start_step == setup.plan.total_steps:  # resumed at the end: no log ran the evaluation
        setup.model.eval()
        with torch.no_grad():
            metrics = evaluate(setup.start_step)
        ctx.report("progress", step=setup.start_step, total_steps=setup.plan.total_steps, metrics=metrics)
    return save_final(ctx, setup.model, tokenizer)
