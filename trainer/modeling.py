"""Loading models and tokenizers, and writing a stage's final model.

``final/`` is what the next stage (or the user) consumes: a plain
``from_pretrained`` directory, LoRA already merged, with the tokenizer beside
the weights and a ``COMPLETE`` marker written last.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import HUB_SCHEME, LoraConfig, parse_hub_source
from trainer.durable import publish_directory
from trainer.provenance import FINGERPRINT_FILE
from trainer.runtime import COMPLETE_MARKER, PermanentStageFailure, StageContext

@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` loads: a local directory, or a Hub id with an optional revision."""

    name_or_path: str
    revision: str | None = None
    """Hub branch, tag or commit (from hf://org/name@revision); None for local directories."""

    def __str__(self) -> str:
        return self.name_or_path if self.revision is None else f"{self.name_or_path}@{self.revision}"

    def __fspath__(self) -> str:  # a local model directory is used as a path (reward_normalization.json)
        return self.name_or_path

    def pretrained_kwargs(self) -> dict[str, str]:
        return {} if self.revision is None else {"revision": self.revision}


def resolve_model_source(source: str) -> ModelSource:
    """The directory or Hub id (and revision) ``from_pretrained`` accepts.

    ``hf://[namespace/]name[@revision]`` is a Hub id (downloading needs network), parsed by
    ``trainer.config.parse_hub_source`` exactly as the operator's admission check parses it.
    Anything else is a local directory that must exist and hold ``config.json``. Otherwise
    PermanentStageFailure says which: a retry would find the same.
    """
    if source.startswith(HUB_SCHEME):
        try:
            hub = parse_hub_source(source)
        except ValueError as exc:
            raise PermanentStageFailure(f"model {exc}") from None
        return ModelSource(hub.repo_id, hub.revision)
    path = Path(source)
    if not path.is_dir():
        raise PermanentStageFailure(f"model directory {source} does not exist")
    if not (path / "config.json").is_file():
        raise PermanentStageFailure(
            f"model directory {source} has no config.json (is it a transformers model directory?)")
    return ModelSource(str(path))


def _source(source: ModelSource | str) -> ModelSource:
    return source if isinstance(source, ModelSource) else ModelSource(str(source))


@contextmanager
def _missing_on_hub_is_permanent(source: ModelSource):
    """Turn "no such repository / revision / file" from the Hub into PermanentStageFailure.

    transformers wraps huggingface_hub's errors in OSError; network errors stay as they are
    (retrying may help).
    """
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except OSError as exc:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)):
                raise PermanentStageFailure(f"model {source}: {type(cause).__name__}: not found on the Hugging "
                                            "Face Hub (check the id and revision, and the token for a private "
                                            "model)") from exc
            cause = cause.__cause__ or cause.__context__
        raise


def load_tokenizer(source: ModelSource | str):
    """The model's tokenizer with a pad token (EOS when it has none); callers choose the padding side."""
    from transformers import AutoTokenizer

    source = _source(source)
    with _missing_on_hub_is_permanent(source):
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **source.pretrained_kwargs())
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
        raise PermanentStageFailure(f"lora.targetModules {list(lora.target_modules)}: {exc}") from exc


def load_causal_lm(path: ModelSource | str, *, dtype: torch.dtype, lora: LoraConfig | None = None):
    """A causal LM in ``dtype``; with ``lora``, a PEFT model whose adapters are the only trainable weights."""
    from transformers import AutoModelForCausalLM

    source = _source(path)
    with _missing_on_hub_is_permanent(source):
        model = AutoModelForCausalLM.from_pretrained(source.name_or_path, dtype=dtype, **source.pretrained_kwargs())
    return _with_lora(model, lora, task_type="CAUSAL_LM")


def load_sequence_classifier(path: ModelSource | str, *, dtype: torch.dtype, lora: LoraConfig | None = None,
                             pad_token_id: int | None = None):
    """A one-output sequence classifier (reward model) with dropout off.

    transformers scores a sequence at its last non-pad token, so the model
    config must know the pad id: ``pad_token_id`` or else the tokenizer's in
    ``path``. A causal-LM checkpoint gets a freshly initialised score head.
    """
    from transformers import AutoModelForSequenceClassification

    if pad_token_id is None:
        pad_token_id = load_tokenizer(path).pad_token_id
    source = _source(path)
    with _missing_on_hub_is_permanent(source):
        model = AutoModelForSequenceClassification.from_pretrained(source.name_or_path, num_labels=1, dtype=dtype,
                                                                   **source.pretrained_kwargs())
    model.config.pad_token_id = pad_token_id
    disable_dropout(model)
    return _with_lora(model, lora, task_type="SEQ_CLS", modules_to_save=["score"])


def save_final(ctx: StageContext, model, tokenizer, *, extra_files: dict[str, dict] | None = None) -> Path:
    """Write ``<outputDir>/final/``: merged weights (safetensors), tokenizer, extra JSON files,
    ``fingerprint.json`` (what produced it, ``trainer.provenance``), marker last.

    Called on every process; only the main process writes. The directory is
    built as ``final.tmp``, fsynced and renamed (``trainer.durable``), so ``final/``
    never holds half a model, not even after a power loss.
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
        (temp / FINGERPRINT_FILE).write_text(json.dumps(ctx.fingerprint, indent=2))
        publish_directory(temp, final, marker=COMPLETE_MARKER)
    accelerator.wait_for_everyone()
    return final
