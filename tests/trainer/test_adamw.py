"""AdamW (trainer/adamw.py): fused for new runs, and a resume continues with the implementation its
checkpoint was written with, bit for bit, through accelerate's save_state / load_state as the stages use it."""

from __future__ import annotations

import pytest
import torch

from trainer.adamw import after_resume, follow_checkpoint, implementation, new_adamw


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def _steps(model, optimizer, steps: range) -> None:
    for step in steps:
        torch.manual_seed(1000 + step)  # the same batch at the same step in every run
        x = torch.randn(8, 16)
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _run(tmp_path, *, first: str, then: str | None) -> dict[str, torch.Tensor]:
    """Six steps: three with an optimizer built as ``first`` ("foreach": what PPO built before, "for-loop": what the
    supervised stages built before, "fused": new_adamw),
    then, when ``then`` is given, a checkpoint and three more steps in a fresh accelerator with an optimizer built
    as ``then`` that loads it; else three more steps straight on."""
    from accelerate import Accelerator

    def build(kind, model):
        if kind == "fused":
            return new_adamw(model.parameters(), learning_rate=1e-2, weight_decay=0.01)
        if kind == "for-loop":  # torch's default on the CPU: what SFT, reward and DPO built before
            return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=True)

    acc = Accelerator(cpu=True)
    model = _model()
    model, optimizer = acc.prepare(model, build(first, model))
    _steps(model, optimizer, range(3))
    if then is not None:
        acc.save_state(str(tmp_path / "ckpt"))
        acc = Accelerator(cpu=True)
        model = _model()
        model, optimizer = acc.prepare(model, build(then, model))
        acc.load_state(str(tmp_path / "ckpt"))
        assert follow_checkpoint(optimizer) == first
    _steps(model, optimizer, range(3, 6))
    return {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_new_runs_use_the_fused_kernel():
    optimizer = new_adamw(_model().parameters(), learning_rate=1e-3, weight_decay=0.0)
    assert implementation(optimizer) == "fused"
    assert optimizer._step_supports_amp_scaling


@pytest.mark.parametrize("older", ["foreach", "for-loop"])
def test_a_checkpoint_written_with_an_older_implementation_resumes_with_it_bit_for_bit(tmp_path, older):
    straight = _run(tmp_path / "a", first=older, then=None)
    resumed = _run(tmp_path / "b", first=older, then="fused")
    assert _equal(straight, resumed)
    # The test can tell: had the resume switched to fused, the weights would differ (rounding).
    switched = _run(tmp_path / "c", first="fused", then=None)
    assert not _equal(straight, switched)


def test_a_fused_run_resumes_fused_bit_for_bit(tmp_path):
    straight = _run(tmp_path / "a", first="fused", then=None)
    resumed = _run(tmp_path / "b", first="fused", then="fused")
    assert _equal(straight, resumed)


def test_after_loading_a_foreach_checkpoint_the_gradscaler_flag_follows_it(tmp_path):
    """GradScaler (fp16) hands the step its scale only when this flag is set, which foreach would refuse."""
    old = torch.optim.AdamW(_model().parameters(), lr=1e-3, foreach=True)
    optimizer = new_adamw(_model().parameters(), learning_rate=1e-3, weight_decay=0.0)
    optimizer.load_state_dict(old.state_dict())
    assert follow_checkpoint(optimizer) == "foreach"
    assert not optimizer._step_supports_amp_scaling


def test_a_stage_resumed_with_an_older_implementation_says_so_once(capsys):
    optimizer = new_adamw(_model().parameters(), learning_rate=1e-3, weight_decay=0.0)
    optimizer.load_state_dict(torch.optim.AdamW(_model().parameters(), lr=1e-3).state_dict())
    assert after_resume(optimizer, stage="sft", main_process=True) == "for-loop"
    assert after_resume(optimizer, stage="sft", main_process=False) == "for-loop"  # other processes stay quiet
    assert capsys.readouterr().out == "[sft] AdamW for-loop, as the checkpoint was written\n"
    fresh = new_adamw(_model().parameters(), learning_rate=1e-3, weight_decay=0.0)
    assert after_resume(fresh, stage="sft", main_process=True) == "fused" and capsys.readouterr().out == ""
