"""Factories shared by the operator's unit tests: specs, runs, observed pods, a clock."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import pytest

from ftoperator.builders import RunRef
from ftoperator.config import OperatorConfig
from ftoperator.observe import ObservedPod

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)

BASE_SPEC = {
    "model": {"source": "pvc://models/base-1b"},
    "data": {
        "sft": "pvc://datasets/sft.jsonl",
        "preferences": "pvc://datasets/prefs.jsonl",
        "prompts": "pvc://datasets/prompts.jsonl",
    },
    "stages": {
        "sft": {"epochs": 1, "learningRate": 2.0e-5, "batchSize": 8},
        "reward": {"epochs": 1},
        "ppo": {"steps": 500, "klCoef": 0.05, "responseLengthTokens": 128},
    },
    "resources": {"gpus": 1, "memory": "64Gi"},
    "artifacts": {"pvc": "runs"},
    "image": "ghcr.io/example/trainer:1",
    "backoffLimit": 2,
}


@pytest.fixture
def spec():
    """A fresh, valid three-stage spec (raw camelCase dict) to modify per test."""
    return copy.deepcopy(BASE_SPEC)


@pytest.fixture
def run():
    return RunRef(name="demo", namespace="team-a", uid="uid-1", generation=1)


@pytest.fixture
def config():
    return OperatorConfig(trainer_image="trainer:default", max_gpus_per_stage=8)


@pytest.fixture
def now():
    """now(seconds) -> T0 + seconds."""
    return lambda seconds=0: T0 + timedelta(seconds=seconds)


@pytest.fixture
def pod():
    """pod(stage, attempt, phase, **fields) -> ObservedPod named like the operator names them."""
    def make(stage: str, attempt: int, phase: str, **fields) -> ObservedPod:
        return ObservedPod(name=f"demo-{stage}-{attempt}", stage=stage, attempt=attempt, phase=phase, **fields)

    return make
