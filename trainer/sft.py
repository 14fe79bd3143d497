"""Supervised fine-tuning: next-token loss on completion tokens only.

The loop, top to bottom: load and tokenise the data, load the model (LoRA
optional), build AdamW + linear warm-up/decay, resume from the latest
checkpoint if any, then for each optimizer step accumulate the loss of its
micro-batches, clip, step, report and checkpoint. The examples of every step
come from ``StepPlan``, so a resumed run sees exactly what the lost one would have.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed

from trainer.checkpoint import save_checkpoint
from trainer.data import IGNORE_INDEX, TokenizedExample, load_sft_rows, pad_right, tokenize_sft_row
from trainer.modeling import load_causal_lm, load_tokenizer, model_options, prepare_model_source, save_final
from trainer.runtime import PermanentStageFailure, StageContext, check_finite, step_health
from trainer.supervised import prepare_supervised

NON_FINITE_ADVICE = "lower sft.learningRate or maxGradNorm, check the data, or use precision fp32"


def collate(examples: list[TokenizedExample], *, pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    input_ids = pad_right([e.input_ids for e in examples], pad_value=pad_token_id)
    labels = pad_right([e.labels for e in examples], pad_value=IGNORE_INDEX)
    mask = pad_right([[1] * len(e.input_ids) for e in examples], pad_value=0)
    return {
        "input_ids": torch.tensor(input_ids, device=device),  # (b, t)
        "attention_mask": torch.tensor(mask, device=device),  # (b, t)
        "labels": torch.tensor(labels, device=device),  # (b, t)
    }


def run(ctx: StageContext) -> Path:
    job, cfg, accelerator = ctx.job, ctx.job.sft, ctx.accelerator
    if job.data.sft is None:
        raise PermanentStageFailure("sft stage needs data.sft (a dataset of prompt/completion or messages rows)")
    source = prepare_model_source(ctx, job.model)
    tokenizer = load_tokenizer(source)
    rows = load_sft_rows(job.data.sft, tokenizer=tokenizer, assistant_turns=cfg.assistant_turns)
    examples = [tokenize_sft_row(r, tokenizer=tokenizer, max_length=cfg.max_seq_length_tokens) for r in rows]

    set_seed(cfg.seed)  # identical initialisation (LoRA adapters) on every process
    # Trained weights stay fp32 and bf16/fp16 run under autocast; with LoRA the
    # frozen base can live in the compute dtype and PEFT keeps adapters in fp32.
    model = load_causal_lm(source, dtype=ctx.dtype if cfg.lora else torch.float32, lora=cfg.lora,
                           **model_options(cfg, trained=True))
    setup = prepare_supervised(ctx, model, cfg=cfg, epochs=cfg.epochs, max_steps=cfg.max_steps,
                               num_examples=len(examples))
    model, optimizer, scheduler, plan = setup.model, setup.optimizer, setup.scheduler, setup.plan
    start, total = setup.start_step, plan.total_steps
    model.train()
    ctx.stop.armed = True
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    window_samples = 0
    for step in range(start, total):
        micro_batches = plan.step_micro_batches(step, rank=accelerator.process_index)
        step_loss = torch.zeros((), device=ctx.device)
        for i, indices in enumerate(micro_batches):
            batch = collate([examples[j] for j in indices], pad_token_id=tokenizer.pad_token_id, device=ctx.device)
            last = i == len(micro_batches) - 1
            # Gradients are all-reduced only on the last micro-batch of the step.
            with nullcontext() if last else accelerator.no_sync(model):
                loss = model(**batch).loss / len(micro_batches)
                accelerator.backward(loss)
            step_loss += loss.detach()
            window_tokens += int(batch["attention_mask"].sum())
            window_samples += len(indices)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        check_finite(step_health(accelerator, loss=step_loss, grad_norm=grad_norm), stage="sft", step=step + 1,
                     advice=NON_FINITE_ADVICE)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += float(step_loss)
        window_steps += 1
        done = step + 1

        if done % cfg.log_every_steps == 0 or done == total:
            stats = accelerator.reduce(
                torch.tensor([window_loss, float(window_tokens), float(window_samples)], device=ctx.device), "sum")
            loss_mean = float(stats[0]) / (window_steps * accelerator.num_processes)
            tokens = int(stats[1])
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            ctx.metrics.count(tokens=tokens, samples=int(stats[2]))
            ctx.report("progress", step=done, total_steps=total, metrics={
                "loss": loss_mean,
                "learning_rate": scheduler.get_last_lr()[0],
                "tokens_per_second": tokens / elapsed,
                "grad_norm": float(grad_norm),
                "epoch": plan.position(done)["epoch"],
            })
            window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            window_samples = 0

        # The last step is checkpointed too: a crash while writing final/ then costs no training.
        stopping = ctx.stop.requested()
        if done % cfg.checkpoint_every_steps == 0 or done == total or stopping:
            path = save_checkpoint(ctx, step=done, extra_state={"examples": len(examples), **plan.position(done)})
            ctx.report("checkpoint", step=done, total_steps=total, checkpoint=str(path))
        if stopping:
            raise ctx.stop.interrupted(step=done, checkpoint=path)

    ctx.stop.armed = False
    return save_final(ctx, model, tokenizer)
