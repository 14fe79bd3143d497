"""Fully sharded training for the supervised stages (SFT, reward, DPO): torch FSDP2 ``fully_shard``.

Why torch's ``fully_shard`` and not accelerate's FSDP plugin: accelerate 1.15 with ``cpu=True``
wraps the model in DistributedDataParallel even with an FSDP plugin (tests/trainer/test_multinode.py
shows the CPU probe), so a CPU/gloo stage would silently train replicated. ``fully_shard`` is the
engine accelerate's FSDP2 path calls on GPUs, and it runs the same over gloo and NCCL.

What the loop changes when sharded (trainer.supervised): the model and optimizer are not prepared by
accelerate (its DDP wrapper would replicate again); gradients are reduce-scattered by FSDP on every
backward; the gradient norm is the global norm over all shards; checkpoints hold the sharded model and
optimizer through torch.distributed.checkpoint (one file per process, in ``sharded/`` of the
checkpoint directory) next to accelerate's scheduler and RNG files; the final model is gathered into
one full state dict on the main process and written by ``save_pretrained``.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from trainer.config import FsdpConfig
from trainer.runtime import PermanentStageFailure

SHARDED_DIR = "sharded"
"""Subdirectory of a checkpoint with torch.distributed.checkpoint's files of the sharded model and optimizer."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer decoder layers: modules of a class transformers lists in ``_no_split_modules``
    (the unit it never splits across devices, e.g. LlamaDecoderLayer) of the model or of a transformers
    model inside it (PPO's ValueModel holds one as its backbone)."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: torch.nn.Module, fsdp: FsdpConfig, *, device: torch.device,
          layers_required: bool = True) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group: one FSDP unit per decoder layer, then
    the root (embeddings, final norm, head). Needs torch.distributed initialised (several processes).
    ``layers_required=False`` shards a module without decoder layers (PPO's value head) as one unit."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers and layers_required:
        raise PermanentStageFailure(
            f"fsdp: {type(model).__name__} names no transformer decoder layer class (_no_split_modules), so "
            "it cannot be wrapped per layer; remove fsdp for this model")
    offload = fsdp.cpu_offload and device.type != "cpu"
    if fsdp.cpu_offload and not offload:  # torch's CPUOffloadPolicy needs an accelerator to move layers to
        print("fsdp.cpuOffload: the stage runs on CPUs, where the weights already are; sharding without it",
              file=sys.stderr, flush=True)
    if device.type != "cpu" and not offload:
        model.to(device)
    kwargs = {"offload_policy": CPUOffloadPolicy()} if offload else {}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def shard_trained(ctx, models: dict[str, torch.nn.Module], fsdp: FsdpConfig) -> None:
    """The online stages' (PPO, GRPO/RLOO) sharding: each trained model in place, one unit per decoder layer
    (a module without layers, PPO's value head, as one unit); logs each process's parameter memory before
    and after. The frozen reference and reward model are left alone: whole on every process."""
    for name, model in models.items():
        say_memory(ctx, model, "unsharded", name=name)
        shard(model, fsdp, device=ctx.device, layers_required=name == "policy")
        say_memory(ctx, model, "sharded", name=name)


def say_memory(ctx, model: torch.nn.Module, what: str, *, name: str | None = None) -> None:
    """Log this process's parameter memory: "[stage] rank R: <what> parameters X MiB (name)"."""
    print(f"[{ctx.job.stage}] rank {ctx.accelerator.process_index}: {what} parameters "
          f"{local_parameter_bytes(model) / 2**20:.2f} MiB" + (f" ({name})" if name else ""),
          file=sys.stderr, flush=True)


def autocast_forward(model: torch.nn.Module, accelerator) -> None:
    """Run ``model``'s forward under accelerate's autocast (bf16) and return its outputs in fp32, as
    ``accelerator.prepare`` would have made it: a sharded model is not prepared, and without this it would
    compute in fp32. The fp32 outputs matter too: the losses are computed from the logits outside the
    forward, and from bf16 logits a sharded run would drift from the replicated one (measured on sharded
    LoRA DPO: adapters 2e-3 apart after 4 steps)."""
    if accelerator.mixed_precision == "no":
        return
    from accelerate.utils.operations import convert_to_fp32

    forward = model.forward

    def forward_in_autocast(*args, **kwargs):
        with accelerator.autocast():
            outputs = forward(*args, **kwargs)
        return convert_to_fp32(outputs)

    model.forward = forward_in_autocast  # FSDP's hooks wrap __call__, which calls this


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this process holds (its shards when sharded)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
               for p in model.parameters())


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to the global L2 norm over every process's gradient shards; return that norm as a plain tensor."""
    return clip_parameters(list(model.parameters()), max_norm)


def clip_parameters(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm`` over a list of parameters (several sharded models on one optimizer, as PPO's
    policy and value model)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """What the online stages call after the backward passes of an optimizer step: accelerate's clipping for
    replicated (DDP) models, the global norm over shards (``clip_parameters``) for sharded ones."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        return clip_parameters(params, max_norm)
    return accelerator.clip_grad_norm_(params, max_norm)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every process calls it); a plain one as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextmanager
def gathered(*models: torch.nn.Module | None) -> Iterator[None]:
    """Inside: every sharded one of ``models`` holds its whole weights on every process (one all-gather per
    FSDP unit on entering, a collective: every process enters together), so each process samples on its own.

    Why gather for the whole rollout instead of letting each forward gather its layers (FSDP's normal
    forward): sampling runs one forward per token, and with per-forward gathering every process would
    have to run the same number of forwards (the gathers are collectives) and pay L all-gathers per token.
    Gathered, the rollout costs one all-gather of the policy, processes stop sampling independently,
    and the lean decoder (trainer.lean_decoder), which reads weights directly and cannot read shards,
    applies. The price is the whole policy's weights on each process while sampling (no gradients or
    optimizer state then); docs/sizing.md has the arithmetic. Layers are kept gathered after a forward
    too, so the model's own forward (gradient checkpointing, other architectures) gathers nothing either.
    Models that are not sharded (None, one process, no fsdp) pass through untouched.
    """
    from torch.distributed.fsdp import FSDPModule

    roots = [m for m in models if m is not None and is_sharded(m)]
    units = [u for root in roots for u in root.modules() if isinstance(u, FSDPModule)]
    inner = [u for u in units if not any(u is root for root in roots)]
    for unit in inner:  # roots already keep their weights after a forward (FSDP's default for a root)
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)


def register_checkpointing(accelerator, model: torch.nn.Module, optimizer, *, trainable_only: bool = False) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` (called on every process) also write and
    read the sharded model and optimizer with torch.distributed.checkpoint. A checkpoint without
    them fails to load, as a damaged one does (trainer.checkpoint falls back to the previous one).

    ``trainable_only`` (LoRA): the model's frozen weights are left out (``ignore_frozen_params``), as in
    unsharded LoRA checkpoints: a resume loads the frozen base from the model source (the same bytes, as
    the fingerprint check guarantees) and the adapters, a score head and the optimizer from the checkpoint.
    A checkpoint lacking one of those fails to load (torch.distributed.checkpoint asks for each key)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=trainable_only)
    # Loading leaves the frozen weights as they are: not strict about their absence (dcp.load has already
    # checked that every trainable weight was in the checkpoint).
    load_options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def save(models, weights, output_dir) -> None:
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(output_dir) / SHARDED_DIR))

    def load(models, input_dir) -> None:
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(Path(input_dir) / SHARDED_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=load_options)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on CPU, on the main process (empty elsewhere). Every process
    must call this (it is a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_peft_copy(peft_model: torch.nn.Module, full_weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A whole CPU copy of the sharded PEFT model ``peft_model`` holding ``full_weights`` (its gathered
    ``full_state_dict``), for ``final/`` on the main process: PEFT's ``save_pretrained`` (the adapter) and
    ``merge_and_unload`` read the modules' own weights, which FSDP2 leaves sharded even while gathered.

    Built on the meta device from the model's class and config and the same PEFT config, then given the
    gathered tensors (``assign``: no second copy of the weights); the buffers that are not in a state dict
    (rotary frequencies) come from ``peft_model``, which holds them whole on every process.
    """
    import copy

    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule

    base = peft_model.get_base_model()
    # fully_shard swaps a module's class for an FSDP subclass of it: the class to rebuild is the original.
    plain_class = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    adapter = peft_model.active_adapter
    with torch.device("meta"):
        clone = get_peft_model(plain_class(copy.deepcopy(base.config)), copy.deepcopy(peft_model.peft_config[adapter]),
                               adapter_name=adapter)
    if getattr(base, "generation_config", None) is not None:  # causal LMs have one, classifiers not
        clone.get_base_model().generation_config = copy.deepcopy(base.generation_config)
    _, unexpected = clone.load_state_dict(full_weights, strict=False, assign=True)
    clone.get_base_model().tie_weights()  # a tied head may appear once in the gathered dict
    sources = dict(peft_model.named_buffers())
    for name, buffer in list(clone.named_buffers()):
        if buffer.is_meta and name in sources:
            module_name, _, attribute = name.rpartition(".")
            clone.get_submodule(module_name)._buffers[attribute] = sources[name].detach().to("cpu", copy=True)
    missing = [name for name, tensor in clone.state_dict().items() if tensor.is_meta]
    if missing or unexpected:  # the copy must be exactly the trained model, or final/ would be wrong
        raise RuntimeError(f"rebuilding the sharded LoRA model: weights missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return clone.eval()
