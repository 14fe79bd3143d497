"""Supervised fine-tuning: next-token loss on completion tokens only.

Top to bottom: load and tokenise the data, load the model (LoRA optional), then
the supervised loop shared with the reward and DPO stages (``trainer.supervised``:
AdamW + linear warm-up/decay, resume, accumulate, clip, step, report, checkpoint)
with the next-token loss of one micro-batch as its ``forward``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed

from trainer.data import IGNORE_INDEX, TOKENIZED_DIR, TokenizedExample, pad_right, sft_examples
from trainer.modeling import load_causal_lm, load_tokenizer, model_options, prepare_model_source, save_final
from trainer.runtime import PermanentStageFailure, StageContext
from trainer.supervised import MicroBatch, prepare_supervised, train_supervised

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
    job, cfg = ctx.job, ctx.job.sft
    if job.data.sft is None:
        raise PermanentStageFailure("sft stage needs data.sft (a dataset of prompt/completion or messages rows)")
    source = prepare_model_source(ctx, job.model)
    tokenizer = load_tokenizer(source)
    examples = sft_examples(job.data.sft, tokenizer=tokenizer, max_length=cfg.max_seq_length_tokens,
                            assistant_turns=cfg.assistant_turns, cache_dir=ctx.output_dir / TOKENIZED_DIR,
                            accelerator=ctx.accelerator)

    set_seed(cfg.seed)  # identical initialisation (LoRA adapters) on every process
    # Trained weights stay fp32 and bf16/fp16 run under autocast; with LoRA the
    # frozen base can live in the compute dtype and PEFT keeps adapters in fp32.
    model = load_causal_lm(source, dtype=ctx.dtype if cfg.lora else torch.float32, lora=cfg.lora,
                           **model_options(cfg, trained=True))
    setup = prepare_supervised(ctx, model, cfg=cfg, epochs=cfg.epochs, max_steps=cfg.max_steps,
                               num_examples=len(examples))

    def forward(indices: list[int]) -> MicroBatch:
        batch = collate([examples[j] for j in indices], pad_token_id=tokenizer.pad_token_id, device=ctx.device)
        return MicroBatch(loss=setup.model(**batch).loss, tokens=int(batch["attention_mask"].sum()),
                          samples=len(indices))

    train_supervised(ctx, setup, forward=forward, non_finite_advice=NON_FINITE_ADVICE)
    return save_final(ctx, setup.model, tokenizer)
