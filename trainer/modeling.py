"""Loading models and tokenizers, and writing a stage's final model.

``final/`` is what the next stage (or the user) consumes: a plain
``from_pretrained`` directory, LoRA already merged, with the tokenizer beside
the weights and a ``COMPLETE`` marker written last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from trainer.config import LoraConfig
from trainer.runtime import COMPLETE_MARKER, StageContext, StageFailed

HUB_SCHEME = "hf://"


def resolve_model_source(source: str) -> str:
    """A path or hub id ``from_pretrained`` accepts.

    ``hf://org/name`` becomes the hub id ``org/name`` (downloading needs
    network). Anything else is a local directory that must exist and hold
    ``config.json``; otherwise StageFailed says which.
    """
    if source.startswith(HUB_SCHEME):
        hub_id = source[len(HUB_SCHEME):].strip("/")
        if hub_id.count("/") != 1 or not all(hub_id.split("/")):
            raise StageFailed(f"model {source!r}: expected hf://org/name")
        return hub_id
    path = Path(source)
    if not path.is_dir():
        raise StageFailed(f"model directory {source} does not exist")
    if not (path / "config.json").is_file():
        raise StageFailed(f"model directory {source} has no config.json (is it a transformers model directory?)")
    return str(path)


def load_tokenizer(path: str):
    """The model's tokenizer with a pad token (EOS when it has none); callers choose the padding side."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0: RLHF reward and value estimates must be deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def _with_lora(model, lora: LoraConfig | None, *, task_type: str, modules_to_save: list[str] | None = None):
    if lora is None:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type=task_type,
                                 modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # typically: a target module name the model does not have
        raise StageFailed(f"lora.targetModules {list(lora.target_modules)}: {exc}") from exc


def load_causal_lm(path: str, *, dtype: torch.dtype, lora: LoraConfig | None = None):
    """A causal LM in ``dtype``; with ``lora``, a PEFT model whose adapters are the only trainable weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return _with_lora(model, lora, task_type="CAUSAL_LM")


def load_sequence_classifier(path: str, *, dtype: torch.dtype, lora: LoraConfig | None = None,
                             pad_token_id: int | None = None):
    """A one-output sequence classifier (reward model) with dropout off.

    transformers scores a sequence at its last non-pad token, so the model
    config must know the pad id: ``pad_token_id`` or else the tokenizer's in
    ``path``. A causal-LM checkpoint gets a freshly initialised score head.
    """
    from transformers import AutoModelForSequenceClassification

    if pad_token_id is None:
        pad_token_id = load_tokenizer(path).pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = pad_token_id
    disable_dropout(model)
    return _with_lora(model, lora, task_type="SEQ_CLS", modules_to_save=["score"])


def save_final(ctx: StageContext, model, tokenizer, *, extra_files: dict[str, dict] | None = None) -> Path:
    """Write ``<outputDir>/final/``: merged weights (safetensors), tokenizer, extra JSON files, marker last.

    Called on every process; only the main process writes. The directory is
    built as ``final.tmp`` and renamed, so ``final/`` never holds half a model.
    """
    accelerator = ctx.accelerator
    final = ctx.output_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        temp = ctx.output_dir / "final.tmp"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        if model is not None:
            unwrapped = accelerator.unwrap_model(model)
            if hasattr(unwrapped, "merge_and_unload"):  # PEFT: ship plain weights, no adapter runtime needed
                unwrapped = unwrapped.merge_and_unload()
            unwrapped.save_pretrained(temp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(temp)
        for name, content in (extra_files or {}).items():
            (temp / name).write_text(json.dumps(content, indent=2))
        (temp / COMPLETE_MARKER).write_text("")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temp, final)
    accelerator.wait_for_everyone()
    return final
