"""Prometheus metrics of a running stage, on a registry of their own.

A private ``CollectorRegistry`` (not the process-global one) keeps tests and
several stages in one process from colliding, and keeps the endpoint free of
unrelated default collectors. Every metric carries one label, ``stage``, so the
number of series stays bounded whatever the run does.
"""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

PREFIX = "finetune_trainer_"

# name -> help text. Units are in the help text and, where it matters, the name.
GAUGES: dict[str, str] = {
    "step": "Optimizer steps (PPO iterations) completed.",
    "total_steps": "Optimizer steps (PPO iterations) planned for the stage.",
    "loss": "Training loss of the last reported steps.",
    "learning_rate": "Current learning rate.",
    "tokens_per_second": "Tokens processed per second, all processes together.",
    "reward_mean": "Mean reward of the last batch of rollouts.",
    "kl": "Mean KL divergence between policy and reference per sequence, in nats.",
    "entropy": "Mean policy entropy per token, in nats.",
    "policy_clip_fraction": "Fraction of tokens whose PPO ratio was clipped.",
    "approx_kl": "Approximate KL between the old and the updated policy, in nats.",
    "value_loss": "Value-function loss.",
    "reward_model_accuracy": "Held-out preference accuracy of the reward model (0..1).",
    "preference_accuracy": "DPO: share of the last reported training pairs whose chosen reply has the higher reward.",
    "reward_margin": "DPO: mean implicit-reward margin (chosen minus rejected) of the last reported training pairs.",
    "eval_preference_accuracy": "DPO: held-out preference accuracy (0..1).",
    "eval_reward_margin": "DPO: mean held-out implicit-reward margin, chosen minus rejected.",
    "gpu_memory_allocated_bytes": "Bytes of GPU memory allocated by tensors on this process (CUDA only).",
}

# Counters are incremented, never set; prometheus_client appends ``_total``.
COUNTERS: dict[str, str] = {
    "tokens": "Tokens processed, all processes together.",
    "samples": "Training examples (SFT rows, preference pairs) processed.",
    "episodes": "PPO episodes (prompt + generated response) processed.",
}


class TrainerMetrics:
    """Gauges and counters of one stage, exposed as ``finetune_trainer_*``."""

    def __init__(self, *, stage: str, gpu: bool = False):
        """``gpu``: export gpu_memory_allocated_bytes (a constant 0 on CPU would mislead)."""
        self.stage = stage
        self.registry = CollectorRegistry()
        self._gauges = {
            name: Gauge(PREFIX + name, text, ["stage"], registry=self.registry).labels(stage=stage)
            for name, text in GAUGES.items()
            if gpu or name != "gpu_memory_allocated_bytes"
        }
        self._counters = {
            name: Counter(PREFIX + name, text, ["stage"], registry=self.registry).labels(stage=stage)
            for name, text in COUNTERS.items()
        }
        self._server = None

    def update(self, **values: float | None) -> None:
        """Set gauges by name; None values are skipped. An unknown name raises KeyError.

        Raising on unknown names catches a typo in a stage at test time instead
        of silently never exporting a metric.
        """
        unknown = sorted(set(values) - set(GAUGES))
        if unknown:
            raise KeyError(f"unknown trainer metric(s) {unknown}; known: {sorted(self._gauges)}")
        for name, value in values.items():
            if value is not None and name in self._gauges:
                self._gauges[name].set(float(value))

    def count(self, *, tokens: int = 0, samples: int = 0, episodes: int = 0) -> None:
        """Add to the ``*_total`` counters (all processes together: pass reduced numbers)."""
        for name, amount in (("tokens", tokens), ("samples", samples), ("episodes", episodes)):
            if amount:
                self._counters[name].inc(amount)

    def start_server(self, port: int) -> bool:
        """Serve /metrics on ``port``; a port in use prints a warning and returns False.

        Metrics are a convenience: losing them must never stop a training run.
        """
        try:
            self._server = start_http_server(port, registry=self.registry)
        except OSError as exc:
            print(f"warning: metrics server not started on port {port}: {exc}", file=sys.stderr, flush=True)
            return False
        return True

    def stop_server(self) -> None:
        if self._server is None:
            return
        server = self._server[0] if isinstance(self._server, tuple) else None
        if server is not None:
            server.shutdown()
            server.server_close()
        self._server = None
