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
from pathlib import Path

import torch

from trainer.config import FsdpConfig
from trainer.runtime import PermanentStageFailure

SHARDED_DIR = "sharded"
"""Subdirectory of a checkpoint with torch.distributed.checkpoint's files of the sharded model and optimizer."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer decoder layers: modules of a class transformers lists in ``_no_split_modules``
    (the unit it never splits across devices, e.g. LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: torch.nn.Module, fsdp: FsdpConfig, *, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group: one FSDP unit per decoder layer, then
    the root (embeddings, final norm, head). Needs torch.distributed initialised (several processes)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers:
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


def autocast_forward(model: torch.nn.Module, accelerator) -> None:
    """Run ``model``'s forward under accelerate's autocast (bf16), as ``accelerator.prepare`` would
    have made it: a sharded model is not prepared, and without this it would compute in fp32."""
    if accelerator.mixed_precision == "no":
        return
    forward = model.forward

    def forward_in_autocast(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

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
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def register_checkpointing(accelerator, model: torch.nn.Module, optimizer) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` (called on every process) also write and
    read the sharded model and optimizer with torch.distributed.checkpoint. A checkpoint without
    them fails to load, as a damaged one does (trainer.checkpoint falls back to the previous one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def save(models, weights, output_dir) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(output_dir) / SHARDED_DIR))

    def load(models, input_dir) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(Path(input_dir) / SHARDED_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on CPU, on the main process (empty elsewhere). Every process
    must call this (it is a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
