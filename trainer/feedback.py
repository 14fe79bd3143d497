"""Human-feedback rounds in the trainer (``job.humanFeedback``; the operator's side is ``ftoperator.feedback``).

Two parts:

* **At a round boundary** of the online stage (ppo or grpo, after the step's checkpoint):
  ``open_round`` draws the round's candidates -- K prompts from the training prompts, R responses
  each from the current policy (optionally one from the reference, the model the stage started
  from), every two of them a pair, A and B in a seeded random order -- writes them to
  ``<outputDir>/feedback/round-<N>.json`` and into the round's ConfigMap (the console shows them),
  and raises ``FeedbackRoundOpened``: the process exits with ``FEEDBACK_ROUND_EXIT_CODE``. The
  next attempt resumes from that checkpoint, after the boundary, so the round is not opened again.
* **Retraining the reward model** (a reward-stage pod with ``FEEDBACK_ROUND_ENV`` set):
  ``retrain_reward`` reads the run's PreferenceLabels through the API, converts them with the
  console's own export (``ftconsole.labels.preference_rows``: one code path for ``labels export``
  and for training), keeps a share of them out (by a digest of the pair, so a pair stays on the same
  side in every round), measures the current reward model's accuracy on those, trains it further on
  the original preferences plus the others, measures again, and replaces ``final/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from trainer.config import FEEDBACK_ROUND_ENV, FEEDBACK_ROUND_PREFIX, HumanFeedbackConfig, StageJob
from trainer.runtime import COMPLETE_MARKER, FeedbackRoundOpened, PermanentStageFailure, StageContext

CANDIDATES_KEY = "candidates.json"
"""Key of the round's ConfigMap holding the candidates document."""
TEXT_LIMIT = 4000
"""Characters of a prompt or response kept in a candidate (the ConfigMap holds at most 1 MiB)."""
LABELS_FILE_ENV = "FINETUNE_FEEDBACK_LABELS"
"""A run without a cluster: a JSON file of PreferenceLabel objects (``kubectl get pl -o json``, or a list) that
the retraining reads instead of the API."""
FEEDBACK_FILE = "feedback.json"
"""Written into the retrained reward model's final/: the rounds it learned from and its accuracies."""


# ----------------------------------------------------------------------------- the round boundary


def round_due(job: StageJob, *, step: int, total_steps: int) -> int | None:
    """The round to open after ``step`` (only ever asked for steps this process ran), or None."""
    if job.human_feedback is None:
        return None
    return job.human_feedback.round_at(step, total_steps=total_steps)


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT - 3] + "..."


@torch.no_grad()
def draw_candidates(ctx: StageContext, *, cfg, feedback: HumanFeedbackConfig, round_: int, step: int, prompts: list,
                    policy, reference, reward, encoder) -> dict[str, Any]:
    """The round's candidates document: ``{"round", "stage", "step", "pairs": [{"prompt", "responses":
    [{"text", "source"}, {"text", "source"}]}]}``. Seeded by the stage seed and the round."""
    from trainer.rollout import sample_and_score

    stage = ctx.job.stage
    rng = random.Random(f"{cfg.seed}/feedback/{round_}")
    rows = rng.sample(prompts, min(feedback.prompts, len(prompts)))
    use_reference = feedback.include_sft and reference is not None and hasattr(reference, "config")
    if feedback.include_sft and not use_reference:
        print(f"[{stage}] humanFeedback.includeSft: no separate reference model in this stage (LoRA, or GRPO "
              "with klCoef 0); every response comes from the policy", flush=True)
    from_policy = feedback.responses_per_prompt - (1 if use_reference else 0)
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed * 1000 + round_)
        wanted = [row for row in rows for _ in range(from_policy)]
        drawn: list[str] = []
        for start in range(0, len(wanted), cfg.batch_size):  # no larger batches than training samples
            drawn += sample_and_score(ctx, cfg=cfg, policy_module=ctx.accelerator.unwrap_model(policy),
                                      encoder=encoder, reward=reward,
                                      prompts=wanted[start:start + cfg.batch_size]).responses_text
        texts = [drawn[i * from_policy:(i + 1) * from_policy] for i in range(len(rows))]
        sources = [[f"{stage}@{step}"] * from_policy for _ in rows]
        if use_reference:
            for start in range(0, len(rows), cfg.batch_size):
                base = sample_and_score(ctx, cfg=cfg, policy_module=reference, encoder=encoder, reward=reward,
                                        prompts=rows[start:start + cfg.batch_size])
                for i, text in enumerate(base.responses_text, start=start):
                    texts[i].append(text)
                    sources[i].append("sft")
    pairs = []
    for i, row in enumerate(rows):
        prompt = encoder.text(row.prompt)  # what the policy continued and what the reward model scores
        for a, b in combinations(range(len(texts[i])), 2):
            if rng.random() < 0.5:
                a, b = b, a
            pairs.append({"prompt": _cut(prompt), "responses": [
                {"text": _cut(texts[i][a]), "source": sources[i][a]},
                {"text": _cut(texts[i][b]), "source": sources[i][b]}]})
    return {"round": round_, "stage": stage, "step": step, "pairs": pairs}


def write_candidates(ctx: StageContext, document: dict[str, Any]) -> str:
    """Write the candidates to outputDir and, in a cluster, into the round's ConfigMap; returns where."""
    round_ = document["round"]
    path = ctx.output_dir / "feedback" / f"round-{round_}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, ensure_ascii=False)
    path.write_text(text)
    names = ctx.job.reporting.feedback_config_maps
    if not names:
        return str(path)
    if round_ > len(names):
        raise PermanentStageFailure(f"round {round_} has no ConfigMap (the operator created {len(names)})")
    from trainer.kube_reporter import _core_api, own_namespace

    name = names[round_ - 1]
    # Not best effort like progress: without its candidates nobody can label the round.
    _core_api().patch_namespaced_config_map(name, own_namespace(), {"data": {CANDIDATES_KEY: text}})
    return f"ConfigMap {name}"


def open_round(ctx: StageContext, *, cfg, round_: int, step: int, prompts: list, policy, reference, reward,
               encoder) -> None:
    """Draw and publish the round's candidates (main process), then raise ``FeedbackRoundOpened`` on every process."""
    feedback = ctx.job.human_feedback
    message = ""
    if ctx.accelerator.is_main_process:
        document = draw_candidates(ctx, cfg=cfg, feedback=feedback, round_=round_, step=step, prompts=prompts,
                                   policy=policy, reference=reference, reward=reward, encoder=encoder)
        where = write_candidates(ctx, document)
        message = (f"{FEEDBACK_ROUND_PREFIX}round {round_} after step {step}: {len(document['pairs'])} candidate "
                   f"pairs in {where}")
        ctx.report("feedback", step=step, total_steps=ctx.total_steps, reason=message)
    ctx.accelerator.wait_for_everyone()
    raise FeedbackRoundOpened(message or f"{FEEDBACK_ROUND_PREFIX}round {round_} after step {step}")


# ----------------------------------------------------------------------------- retraining the reward model


def continuation_round() -> int | None:
    """The round whose labels this reward-stage pod retrains on (``FEEDBACK_ROUND_ENV``), else None."""
    value = os.environ.get(FEEDBACK_ROUND_ENV)
    return int(value) if value else None


def is_held_out(prompt: str, chosen: str, rejected: str, *, share: float) -> bool:
    """Whether a human pair is kept out of training: a digest of the pair (either order), so the same
    pair is on the same side in every round and on every process."""
    if share <= 0:
        return False
    first, second = sorted((chosen, rejected))
    digest = hashlib.sha256(json.dumps([prompt, first, second], ensure_ascii=False).encode()).hexdigest()
    return int(digest[:8], 16) / 2 ** 32 < share


def fetch_labels(job: StageJob, *, rounds: range) -> list:
    """The run's PreferenceLabels of ``rounds`` in export order: read through the API (the Role grants list),
    or from the file ``LABELS_FILE_ENV`` names."""
    from ftconsole import GROUP, LABEL_PLURAL, VERSION
    from ftconsole.labels import LABEL_RUN, run_label_value, run_labels

    if job.run_name is None:
        raise PermanentStageFailure("the job has no runName: it names the FineTuneRun whose labels to train on")
    if os.environ.get(LABELS_FILE_ENV):
        document = json.loads(Path(os.environ[LABELS_FILE_ENV]).read_text())
        items = document.get("items", []) if isinstance(document, dict) else document
        return run_labels(items, run=job.run_name, rounds=rounds)
    from kubernetes import client
    from trainer.kube_reporter import _core_api, own_namespace

    _core_api()  # loads the in-cluster (or kubeconfig) credentials
    answer = client.CustomObjectsApi().list_namespaced_custom_object(
        GROUP, VERSION, own_namespace(), LABEL_PLURAL, label_selector=f"{LABEL_RUN}={run_label_value(job.run_name)}")
    return run_labels(answer.get("items") or [], run=job.run_name, rounds=rounds)


def human_preference_rows(labels: list, *, share: float) -> tuple[list, list, dict[str, int]]:
    """(train rows, held-out rows, skipped counts): the labels as the reward model's PreferenceRows."""
    from ftconsole.labels import preference_rows
    from trainer.data import PreferenceRow

    exported = preference_rows(labels)  # the same conversion as `python -m ftconsole labels export`
    train, held = [], []
    # In content order, not labelling order: the same labels train the same model however fast they came.
    rows = sorted(exported.rows, key=lambda row: (row["prompt"], row["chosen"], row["rejected"]))
    for number, row in enumerate(rows, start=1):
        pair = PreferenceRow(where=f"PreferenceLabel #{number}", prompt=row["prompt"], chosen=row["chosen"],
                             rejected=row["rejected"])
        (held if is_held_out(row["prompt"], row["chosen"], row["rejected"], share=share) else train).append(pair)
    return train, held, exported.skipped


def _restore_interrupted_swap(output_dir: Path, round_: int) -> None:
    # A crash between the two renames of a previous attempt left final/ missing: put the old one back.
    previous = output_dir / f"final.before-round-{round_}"
    if not (output_dir / "final" / COMPLETE_MARKER).is_file() and (previous / COMPLETE_MARKER).is_file():
        previous.rename(output_dir / "final")


def retrain_reward(ctx: StageContext, round_: int, *, labels: list | None = None) -> Path:
    """Train the reward stage's model further on the original preferences plus the human labels of rounds
    0..``round_`` (``labels``: those labels, else read through the API); replace ``final/``. Reports
    ``human_accuracy_before`` and ``human_accuracy_after`` (held-out human labels) with ``feedback_round``."""
    from trainer.data import load_preference_rows
    from trainer.modeling import load_sequence_classifier, load_tokenizer, model_options, save_final
    from trainer.reward_model import (FUNCTIONS_FILE, NORMALIZATION_FILE, encode_pairs, evaluate,
                                      normalization_stats, train_pairs)
    from trainer.supervised import prepare_supervised

    job, cfg, accelerator = ctx.job, ctx.job.reward, ctx.accelerator
    feedback = job.human_feedback
    if feedback is None or job.data.preferences is None:
        raise PermanentStageFailure(f"{FEEDBACK_ROUND_ENV} is set but the job has no humanFeedback or no "
                                    "data.preferences: only a run with human-feedback rounds retrains its reward model")
    if accelerator.is_main_process:
        _restore_interrupted_swap(ctx.output_dir, round_)
    accelerator.wait_for_everyone()
    current = ctx.output_dir / "final"
    if not (current / COMPLETE_MARKER).is_file():
        raise PermanentStageFailure(f"no reward model in {current} to continue from (the reward stage never finished)")
    if labels is None:
        labels = fetch_labels(job, rounds=range(0, round_ + 1))
    human_train, human_held, skipped = human_preference_rows(labels, share=feedback.held_out_share)
    tokenizer = load_tokenizer(str(current))
    original = load_preference_rows(job.data.preferences, tokenizer=tokenizer)
    # Balance: a few dozen human pairs next to thousands of original ones would hardly move the model.
    repeat = max(1, round(len(original) / len(human_train))) if human_train else 0
    train = encode_pairs(original + human_train * repeat, tokenizer=tokenizer, max_length=cfg.max_seq_length_tokens)
    held = encode_pairs(human_held, tokenizer=tokenizer, max_length=cfg.max_seq_length_tokens)
    pad = tokenizer.pad_token_id
    if accelerator.is_main_process:
        print(f"[reward] feedback round {round_}: {len(labels)} labels, {len(human_train)} human pairs to train on "
              f"(each {repeat}x beside {len(original)} original pairs), {len(human_held)} held out, skipped "
              f"{skipped}", flush=True)

    model = load_sequence_classifier(str(current), dtype=ctx.dtype if cfg.lora else torch.float32, lora=cfg.lora,
                                     pad_token_id=pad, **model_options(cfg, trained=True)).to(ctx.device)
    model.eval()
    before = evaluate(ctx, model, held, pad_token_id=pad, batch_size=cfg.batch_size)["reward_model_accuracy"] \
        if held else None
    # The first training's checkpoints are in outputDir: this one keeps its own, so a retry resumes it.
    work = dataclasses.replace(ctx, output_dir=ctx.output_dir / f"feedback-round-{round_}")
    setup = prepare_supervised(work, model, cfg=cfg, epochs=cfg.epochs, max_steps=cfg.max_steps,
                               num_examples=len(train))
    model = setup.model

    train_pairs(work, setup, train, pad_token_id=pad, non_finite_advice="lower reward.learningRate, or check the labels")
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    after = evaluate(ctx, unwrapped, held, pad_token_id=pad, batch_size=cfg.batch_size)["reward_model_accuracy"] \
        if held else None
    metrics = {"feedback_round": float(round_), "human_labels_train": float(len(human_train)),
               "human_labels_held_out": float(len(human_held))}
    if before is not None:
        metrics.update(human_accuracy_before=before, human_accuracy_after=after)
    extra = {NORMALIZATION_FILE: normalization_stats(ctx, unwrapped, train, pad_token_id=pad, batch_size=cfg.batch_size),
             FEEDBACK_FILE: {"round": round_, **metrics}}
    if cfg.functions:
        extra[FUNCTIONS_FILE] = {"functions": [f.model_dump(mode="json", by_alias=True, exclude_none=True)
                                               for f in cfg.functions]}
    built = save_final(work, model, tokenizer, extra_files=extra)
    if accelerator.is_main_process:
        previous = ctx.output_dir / f"final.before-round-{round_}"
        shutil.rmtree(previous, ignore_errors=True)
        current.rename(previous)  # kept: what the round changed can be compared
        built.rename(current)
    accelerator.wait_for_everyone()
    total = setup.plan.total_steps
    ctx.report("progress", step=total, total_steps=total, metrics=metrics)
    return current
