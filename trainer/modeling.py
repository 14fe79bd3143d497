"""Loading models and tokenizers, and writing a stage's final model.

``final/`` is what the next stage (or the user) consumes: a plain
``from_pretrained`` directory, LoRA already merged, with the tokenizer beside
the weights and a ``COMPLETE`` marker written last.

A GGUF model (a ``.gguf`` file, or a directory holding one) is dequantised once
per stage into ``<outputDir>/gguf-model/`` (``prepare_model_source``) and from
then on loaded and saved as a plain transformers model: transformers cannot
``save_pretrained`` a model it loaded from GGUF, and dequantising takes longer
than loading safetensors (about 25 s against under 1 s for SmolLM2-135M).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import HUB_SCHEME, LoraConfig, OptimConfig, parse_hub_source
from trainer.durable import publish_directory
from trainer.model_card import render_model_card
from trainer.provenance import FINGERPRINT_FILE, model_identity
from trainer.runtime import COMPLETE_MARKER, PermanentStageFailure, StageContext

ALL_LINEAR = "all-linear"
"""lora.targetModules ["all-linear"]: PEFT's shorthand for every linear layer except the output head."""
GGUF_SUFFIX = ".gguf"
GGUF_CONVERTED_DIR = "gguf-model"
"""Under outputDir: the stage's GGUF model, dequantised to a plain transformers directory."""
GGUF_ORIGIN_FILE = "converted_from.json"
"""In the converted directory: which GGUF file (and its identity) it was converted from."""


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` loads: a local directory, or a Hub id with an optional revision."""

    name_or_path: str
    revision: str | None = None
    """Hub branch, tag or commit (from hf://org/name@revision); None for local directories."""
    gguf_file: str | None = None
    """For a GGUF model: the file's name inside the directory ``name_or_path``; stages load it only
    through ``prepare_model_source``, which converts it to a plain directory first."""

    def __str__(self) -> str:
        if self.gguf_file is not None:
            return str(Path(self.name_or_path) / self.gguf_file)
        return self.name_or_path if self.revision is None else f"{self.name_or_path}@{self.revision}"

    def __fspath__(self) -> str:  # a local model directory is used as a path (reward_normalization.json)
        return self.name_or_path

    def pretrained_kwargs(self) -> dict[str, str]:
        return {} if self.revision is None else {"revision": self.revision}


def resolve_model_source(source: str) -> ModelSource:
    """The directory or Hub id (and revision) ``from_pretrained`` accepts.

    ``hf://[namespace/]name[@revision]`` is a Hub id (downloading needs network), parsed by
    ``trainer.config.parse_hub_source`` exactly as the operator's admission check parses it.
    Anything else is local: a directory holding ``config.json`` (a transformers model), or a
    GGUF model: a ``.gguf`` file or a directory holding exactly one (``gguf_file`` set; stages
    convert it with ``prepare_model_source``). Otherwise PermanentStageFailure says which: a
    retry would find the same.
    """
    if source.startswith(HUB_SCHEME):
        try:
            hub = parse_hub_source(source)
        except ValueError as exc:
            raise PermanentStageFailure(f"model {exc}") from None
        return ModelSource(hub.repo_id, hub.revision)
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise PermanentStageFailure(f"model {source} is a file but not a .gguf file; expected a transformers "
                                        "model directory, a .gguf file or a directory holding one")
        return ModelSource(str(path.parent), gguf_file=path.name)
    if not path.is_dir():
        raise PermanentStageFailure(f"model directory {source} does not exist")
    if (path / "config.json").is_file():
        return ModelSource(str(path))
    ggufs = sorted(p.name for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(ggufs) == 1:
        return ModelSource(str(path), gguf_file=ggufs[0])
    if ggufs:
        raise PermanentStageFailure(f"model directory {source} holds several GGUF files ({', '.join(ggufs)}); "
                                    "point model at one of them")
    raise PermanentStageFailure(
        f"model directory {source} has no config.json and no .gguf file (is it a transformers model directory?)")


def convert_gguf(source: ModelSource, into: Path) -> None:
    """Dequantise the GGUF model ``source`` into ``into``: fp32 safetensors, config, tokenizer, marker.

    fp32 because dequantised weights (int * fp16 scale + fp16 offset) are exact in fp32 only.
    The model is rebuilt with ``from_config`` and given the loaded weights, since
    ``save_pretrained`` refuses a GGUF-loaded model; its ``quantization_config`` is dropped, so
    the result is a plain checkpoint. Written to ``into.tmp`` and renamed (``trainer.durable``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file}
    try:
        with _no_gguf_progress_bar():
            tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **kwargs)
            loaded = AutoModelForCausalLM.from_pretrained(source.name_or_path, dtype=torch.float32, **kwargs)
    except (ValueError, KeyError, OSError) as exc:  # an architecture or quantisation transformers cannot read
        raise PermanentStageFailure(f"model {source}: cannot load this GGUF file with transformers: "
                                    f"{type(exc).__name__}: {exc}") from exc
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the meta device and given the loaded tensors (assign): no second copy of the weights.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    temp = into.with_name(into.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    plain.save_pretrained(temp, safe_serialization=True)
    tokenizer.save_pretrained(temp)
    (temp / GGUF_ORIGIN_FILE).write_text(json.dumps({"gguf": str(source), "identity": model_identity(str(source))}))
    publish_directory(temp, into, marker=COMPLETE_MARKER)


@contextmanager
def _no_gguf_progress_bar():
    """transformers dequantises GGUF tensors under a plain ``tqdm`` bar that its own
    ``disable_progress_bar`` (``quiet_libraries``) does not reach, and tqdm reads TQDM_DISABLE
    only when it is first imported: swap the module's ``tqdm`` for a disabled one meanwhile."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support: nothing prints a bar
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def _converted_from(directory: Path) -> dict | None:
    if not (directory / COMPLETE_MARKER).is_file():
        return None
    try:
        return json.loads((directory / GGUF_ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return None


def prepare_model_source(ctx: StageContext, source: str) -> ModelSource:
    """``resolve_model_source``, and a GGUF model converted to ``<outputDir>/gguf-model/`` (``convert_gguf``).

    The main process converts, the others wait. A conversion already there from the same
    file (path, size, modification time) is reused, so a retried or resumed stage does not
    dequantise again.
    """
    resolved = resolve_model_source(source)
    if resolved.gguf_file is None:
        return resolved
    target = ctx.output_dir / GGUF_CONVERTED_DIR
    accelerator = ctx.accelerator
    if accelerator.is_main_process:
        origin = _converted_from(target)
        if origin != {"gguf": str(resolved), "identity": model_identity(str(resolved))}:
            print(f"[{ctx.job.stage}] model {resolved} is GGUF: dequantising it into {target}", flush=True)
            started = time.perf_counter()
            convert_gguf(resolved, target)
            print(f"[{ctx.job.stage}] converted {resolved} in {time.perf_counter() - started:.1f} s", flush=True)
        else:
            print(f"[{ctx.job.stage}] using {target}, converted earlier from {resolved}", flush=True)
    accelerator.wait_for_everyone()
    return ModelSource(str(target))


def _source(source: ModelSource | str) -> ModelSource:
    """A loadable source; a GGUF one must have gone through ``prepare_model_source`` first."""
    source = source if isinstance(source, ModelSource) else ModelSource(str(source))
    if source.gguf_file is not None:
        raise PermanentStageFailure(f"model {source} is a GGUF file; only a stage's input model may be GGUF "
                                    "(a reward model is the reward stage's final/ directory)")
    return source


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


def with_lora(model, lora: LoraConfig | None, *, task_type: str, modules_to_save: list[str] | None = None):
    if lora is None:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(lora.target_modules)
    # PEFT's own shorthand: every linear layer except the output head.
    target_modules = ALL_LINEAR if targets == [ALL_LINEAR] else targets
    peft_config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=target_modules, task_type=task_type,
                                 modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # typically: a target module name the model does not have
        raise PermanentStageFailure(f"lora.targetModules {list(lora.target_modules)}: {exc}") from exc


def model_options(settings: OptimConfig, *, trained: bool) -> dict:
    """Keyword arguments of the ``load_*`` functions from a stage's settings: the attention
    implementation for every model, gradient checkpointing for the trained ones."""
    return {"attention": settings.attention_implementation,
            "gradient_checkpointing": trained and settings.gradient_checkpointing}


def _pretrained_kwargs(source: ModelSource, attention: str | None) -> dict:
    kwargs = dict(source.pretrained_kwargs())
    if attention is not None:
        kwargs["attn_implementation"] = attention
    return kwargs


def enable_gradient_checkpointing(model) -> None:
    """transformers' gradient checkpointing, non-reentrant: it needs no input that requires grad,
    so it works with frozen embeddings (LoRA) too."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_causal_lm(path: ModelSource | str, *, dtype: torch.dtype, lora: LoraConfig | None = None,
                   attention: str | None = None, gradient_checkpointing: bool = False):
    """A causal LM in ``dtype``; with ``lora``, a PEFT model whose adapters are the only trainable weights.

    ``attention``: transformers' ``attn_implementation`` (None: its default); ``model_options``
    gives both options from a stage's settings.
    """
    from transformers import AutoModelForCausalLM

    source = _source(path)
    with _missing_on_hub_is_permanent(source):
        model = AutoModelForCausalLM.from_pretrained(source.name_or_path, dtype=dtype,
                                                     **_pretrained_kwargs(source, attention))
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return with_lora(model, lora, task_type="CAUSAL_LM")


def load_sequence_classifier(path: ModelSource | str, *, dtype: torch.dtype, lora: LoraConfig | None = None,
                             pad_token_id: int | None = None, attention: str | None = None,
                             gradient_checkpointing: bool = False):
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
                                                                   **_pretrained_kwargs(source, attention))
    model.config.pad_token_id = pad_token_id
    disable_dropout(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return with_lora(model, lora, task_type="SEQ_CLS", modules_to_save=["score"])


class AdapterDisabled:
    """A LoRA policy's frozen base as a model of its own: calls run the policy with its adapters switched off.

    The PPO/GRPO reference is the SFT model; when the policy is LoRA on that model, its frozen base *is*
    the SFT model, so no second copy is loaded. Only for gradient-free passes (the rollout's reference
    log-probs and held-out KL).
    """

    def __init__(self, peft_model):
        self.model = peft_model

    def __call__(self, **inputs):
        with self.model.disable_adapter():
            return self.model(**inputs)


def load_reference(source: ModelSource | str, *, policy, lora: LoraConfig | None, dtype: torch.dtype,
                   attention: str | None = None):
    """(reference model, a sentence for the log saying which one it is).

    The reference is the SFT model at ``source`` in ``dtype``, frozen. A LoRA policy loaded from
    ``source`` in the same ``dtype`` (its base frozen, so still exactly that model) lends its base with the
    adapters disabled (``AdapterDisabled``); otherwise (a full fine-tune moves the policy's own weights, or
    the base was loaded in another dtype) a separate copy is loaded and the sentence says why.
    """
    base_dtype = next(p.dtype for p in policy.parameters() if not p.requires_grad) if lora is not None else None
    if lora is not None and base_dtype == dtype:
        return AdapterDisabled(policy), "reference: the policy's frozen base with its LoRA adapters disabled " \
                                        "(no second copy of the model)"
    reference = load_causal_lm(source, dtype=dtype, attention=attention)
    disable_dropout(reference)
    reference.eval().requires_grad_(False)
    why = ("the policy is fully fine-tuned, so its weights leave the SFT model's" if lora is None else
           f"the policy's frozen base is {base_dtype}, the reference {dtype}")
    return reference, f"reference: a separate frozen copy of {source} ({why})"


def checkpoint_trainable_weights_only(accelerator) -> None:
    """Make ``accelerator.save_state`` write only the prepared models' trainable weights, and ``load_state``
    load them back onto models whose frozen weights came from their source.

    For LoRA stages: a checkpoint then holds the adapters (and a value head), the optimizer state and
    the RNG states, not a copy of the frozen base (which a resume reloads from the model source, the
    same bytes, as the fingerprint check guarantees). Loading fails (as a damaged checkpoint does) when
    the file lacks a trainable weight or holds a weight the model does not have.
    """
    from accelerate.utils import SAFE_WEIGHTS_NAME
    from safetensors.torch import load_file

    def trainable(model) -> set[str]:
        return {name for name, param in model.named_parameters() if param.requires_grad}

    def keep_trainable(models, weights, output_dir) -> None:
        for i, model in enumerate(models):
            keep = trainable(model)
            weights[i] = {name: value for name, value in weights[i].items() if name in keep}

    def load_trainable(models, input_dir) -> None:
        for i, model in enumerate(models):
            name = SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".safetensors", f"_{i}.safetensors")
            state = load_file(str(Path(input_dir) / name), device=str(next(model.parameters()).device))
            missing, unexpected = model.load_state_dict(state, strict=False)
            lacking = trainable(model) & set(missing)
            if lacking or unexpected:
                raise RuntimeError(f"{name}: trainable weights missing {sorted(lacking)[:3]}, "
                                   f"unexpected {sorted(unexpected)[:3]}")
        models.clear()  # all loaded here: accelerate must not load them again (strictly, without the base)

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


MODEL_CARD_FILE = "README.md"
ADAPTER_DIR = "adapter"
"""In final/, with lora.keepAdapter: the unmerged PEFT adapter."""


def save_final(ctx: StageContext, model, tokenizer, *, extra_files: dict[str, dict] | None = None,
               extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``<outputDir>/final/``: merged weights (safetensors) in the training precision
    (``ctx.dtype``: bf16/fp16 weights when the stage trained in it, whatever the fp32 master
    weights were), tokenizer (left-padding, except the reward model's), extra JSON files, extra safetensors files
    (``extra_tensors``: file name -> tensors, beside the model, not in it), the model card ``README.md``
    (``trainer.model_card``), ``fingerprint.json`` (what produced it, ``trainer.provenance``),
    with ``lora.keepAdapter`` the unmerged adapter in ``adapter/``, marker last.

    Called on every process; only the main process writes. The directory is
    built as ``final.tmp``, fsynced and renamed (``trainer.durable``), so ``final/``
    never holds half a model, not even after a power loss.
    """
    accelerator = ctx.accelerator
    final = ctx.output_dir / "final"
    accelerator.wait_for_everyone()
    from trainer import sharding

    # A sharded model is gathered (a collective: every process) into one full state dict on the main process.
    full_weights = sharding.full_state_dict(model) if model is not None and sharding.is_sharded(model) else None
    if accelerator.is_main_process:
        temp = ctx.output_dir / "final.tmp"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        if model is not None:
            unwrapped = accelerator.unwrap_model(model)
            if full_weights is not None and hasattr(unwrapped, "merge_and_unload"):
                # Sharded LoRA: adapter and merge are made from a whole CPU copy holding the gathered weights.
                unwrapped, full_weights = sharding.unsharded_peft_copy(unwrapped, full_weights), None
            lora = getattr(ctx.job, ctx.job.stage).lora
            if hasattr(unwrapped, "merge_and_unload") and lora is not None and lora.keep_adapter:
                # Before merging (which folds the adapter into the base in place): the adapter as PEFT saves it.
                unwrapped.save_pretrained(temp / ADAPTER_DIR, safe_serialization=True)
            if hasattr(unwrapped, "merge_and_unload"):  # PEFT: ship plain weights, no adapter runtime needed
                unwrapped = unwrapped.merge_and_unload()
            if ctx.dtype != torch.float32 and full_weights is None:  # training is over: the fp32 master copy is not needed any more
                unwrapped = unwrapped.to(ctx.dtype)
            if full_weights is not None:
                unwrapped.save_pretrained(temp, safe_serialization=True,
                                          state_dict={k: v.to(ctx.dtype) for k, v in full_weights.items()})
            else:
                unwrapped.save_pretrained(temp, safe_serialization=True)
            (temp / MODEL_CARD_FILE).write_text(render_model_card(
                job=ctx.job, fingerprint=ctx.fingerprint, metrics=ctx.latest_metrics,
                dtype=str(ctx.dtype).removeprefix("torch.")))
        if tokenizer is not None:
            if ctx.job.stage != "reward":
                # What batch generation needs; the trainer pads its own batches, so only users see this.
                tokenizer.padding_side = "left"
                tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes (transformers 5)
            tokenizer.save_pretrained(temp)
        for name, content in (extra_files or {}).items():
            (temp / name).write_text(json.dumps(content, indent=2))
        for name, tensors in (extra_tensors or {}).items():  # beside the model, e.g. PPO's value head
            from safetensors.torch import save_file

            save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(temp / name))
        (temp / FINGERPRINT_FILE).write_text(json.dumps(ctx.fingerprint, indent=2))
        publish_directory(temp, final, marker=COMPLETE_MARKER)
    accelerator.wait_for_everyone()
    return final
