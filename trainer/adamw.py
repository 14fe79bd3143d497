"""AdamW for every stage: the fused kernel for new runs; on resume, the one the checkpoint was written with.

The fused kernel (``fused=True``) does AdamW's per-tensor arithmetic in one pass over each tensor instead
of several ``foreach`` ops over all of them: 2.2 against 6.5 ms of CPU per step on the benchmark workload
(benchmarks/README.md), and it is what TRL's trainers use by default (transformers' ``adamw_torch_fused``
since torch 2.8). Its arithmetic is AdamW's, but it rounds differently (about 2e-7 on the benchmark's
weights), so a run that switched implementation in mid-training would no longer equal an uninterrupted run.

It never switches: torch's ``Optimizer.load_state_dict`` restores every param-group setting saved in the
checkpoint, ``fused`` and ``foreach`` included. A checkpoint written before this change (``foreach=True``)
therefore continues with ``foreach``, bit for bit as the run it came from would have; a run started now
continues fused. ``follow_checkpoint`` only makes the optimizer's other record of the implementation (the
flag GradScaler reads in fp16) agree with the restored groups, and names the implementation for the log.
"""

from __future__ import annotations

import torch


def new_adamw(params, *, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel over ``params`` (fp32 master weights on one device type)."""
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=True)


def implementation(optimizer) -> str:
    """``fused``, ``foreach`` or ``for-loop``: what the optimizer's next step runs (its first param group decides;
    all groups are built and restored alike). ``optimizer`` may be wrapped (accelerate's AcceleratedOptimizer)."""
    group = _inner(optimizer).param_groups[0]
    if group.get("fused"):
        return "fused"
    return "foreach" if group.get("foreach") else "for-loop"


def follow_checkpoint(optimizer) -> str:
    """After a checkpoint was loaded into ``optimizer``: keep the implementation it recorded; return its name.

    The param groups already say which one (restored by ``load_state_dict``). Torch also sets
    ``_step_supports_amp_scaling`` when a fused optimizer is built, and GradScaler (fp16) then hands the step
    its scale, which only the fused kernel accepts; the flag follows the restored groups here.
    """
    name = implementation(optimizer)
    _inner(optimizer)._step_supports_amp_scaling = name == "fused"
    return name


def after_resume(optimizer, *, stage: str, main_process: bool) -> str:
    """``follow_checkpoint`` for a stage that has just loaded its checkpoint; the main process says so in the log
    when the run goes on with an older implementation. Returns its name."""
    name = follow_checkpoint(optimizer)
    if name != "fused" and main_process:
        print(f"[{stage}] AdamW {name}, as the checkpoint was written", flush=True)
    return name


def _inner(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)
