"""TrainerMetrics: names, validation, and the /metrics endpoint."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from trainer.metrics import TrainerMetrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_serves_finetune_trainer_names():
    metrics = TrainerMetrics(stage="sft")
    port = _free_port()
    assert metrics.start_server(port)
    try:
        metrics.update(step=3, total_steps=10, loss=1.5, learning_rate=None, kl=0.25)
        metrics.count(tokens=120, samples=4)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.stop_server()
    assert 'finetune_trainer_step{stage="sft"} 3.0' in body
    assert 'finetune_trainer_loss{stage="sft"} 1.5' in body
    assert 'finetune_trainer_kl{stage="sft"} 0.25' in body
    assert 'finetune_trainer_tokens_total{stage="sft"} 120.0' in body
    assert 'finetune_trainer_samples_total{stage="sft"} 4.0' in body
    # Private registry: no process/platform collectors from the global one.
    assert "process_cpu_seconds_total" not in body
    # No GPU here, so no misleading constant-zero GPU memory series.
    assert "gpu_memory_allocated_bytes" not in body


def test_unknown_metric_name_raises():
    with pytest.raises(KeyError, match="lossss"):
        TrainerMetrics(stage="ppo").update(lossss=1.0)


def test_every_documented_gauge_is_exported_on_gpu():
    from prometheus_client import generate_latest

    metrics = TrainerMetrics(stage="ppo", gpu=True)
    names = ["step", "total_steps", "loss", "learning_rate", "tokens_per_second", "reward_mean", "kl",
             "entropy", "policy_clip_fraction", "approx_kl", "value_loss", "reward_model_accuracy",
             "gpu_memory_allocated_bytes"]
    metrics.update(**{name: 1.0 for name in names})
    body = generate_latest(metrics.registry).decode()
    for name in names:
        assert f'finetune_trainer_{name}{{stage="ppo"}} 1.0' in body


def test_port_in_use_warns_and_training_goes_on(capsys):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert TrainerMetrics(stage="sft").start_server(port) is False
    assert f"metrics server not started on port {port}" in capsys.readouterr().err
