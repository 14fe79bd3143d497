"""trainer.kube_reporter.KubernetesReporter against a minimal fake ConfigMap API."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from trainer.kube_reporter import KubernetesReporter, own_namespace
from trainer.reporting import ProgressEvent


class FakeConfigMaps:
    """read/patch of one ConfigMap's data, recording every patch; can be told to fail."""

    def __init__(self, data=None):
        self.data = dict(data or {})
        self.patches = []
        self.failures_left = 0

    def read_namespaced_config_map(self, name, namespace):
        return SimpleNamespace(data=dict(self.data))

    def patch_namespaced_config_map(self, name, namespace, body):
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("apiserver unavailable")
        self.patches.append((namespace, name, body))
        self.data.update(body["data"])

    def document(self):
        return json.loads(self.data["progress.json"])


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def reporter(api, clock, **kwargs):
    return KubernetesReporter(config_map="demo-progress", namespace="team-a", api=api, clock=clock,
                              min_interval_seconds=2.0, **kwargs)


def event(kind="progress", step=1, **fields):
    return ProgressEvent(stage="ppo", kind=kind, step=step, total_steps=10, time=1735732800.0, **fields)


def test_updates_are_throttled_except_terminal_events_and_close_flushes():
    api, clock = FakeConfigMaps(), Clock()
    rep = reporter(api, clock)
    rep.report(event(step=1, metrics={"kl": 0.1}))
    rep.report(event(step=2))
    clock.now += 1
    rep.report(event(step=3))
    assert len(api.patches) == 1, "within min_interval only the first update is sent"
    clock.now += 1.5
    rep.report(event(step=4))
    assert len(api.patches) == 2 and api.document()["stages"]["ppo"]["step"] == 4
    rep.report(event(step=5))
    rep.close()
    assert api.document()["stages"]["ppo"]["step"] == 5
    rep.report(event(kind="succeeded", step=10, artifact="/artifacts/x/final"))
    assert api.document()["stages"]["ppo"]["kind"] == "succeeded"
    assert api.document()["stages"]["ppo"]["artifact"] == "/artifacts/x/final"
    assert api.patches[0][:2] == ("team-a", "demo-progress")


def test_earlier_stages_are_kept_and_metrics_and_samples_merge():
    earlier = {"current": "sft", "stages": {"sft": {"kind": "succeeded", "step": 40, "totalSteps": 40}}}
    api, clock = FakeConfigMaps({"progress.json": json.dumps(earlier)}), Clock()
    rep = reporter(api, clock)
    rep.report(event(step=1, metrics={"loss": 1.0}))
    clock.now += 5
    samples = [{"prompt": "p" * 2000, "response": "r", "reward": 1.0, "kl": 0.0}] * 5
    rep.report(event(kind="samples", step=2, metrics={"eval_kl": 0.2}, samples=samples))
    document = api.document()
    assert document["current"] == "ppo"
    assert document["stages"]["sft"]["step"] == 40
    assert document["stages"]["ppo"]["metrics"] == {"loss": 1.0, "eval_kl": 0.2}
    assert len(document["samples"]) == 3
    assert document["samples"][0]["stage"] == "ppo" and len(document["samples"][0]["prompt"]) == 500
    assert document["updated"] == "2025-01-01T12:00:00Z"


def test_a_short_circuited_stage_keeps_its_step_count():
    api, clock = FakeConfigMaps(), Clock()
    rep = reporter(api, clock)
    rep.report(event(kind="succeeded", step=10))
    rep.report(ProgressEvent(stage="ppo", kind="succeeded", step=0, total_steps=0))
    assert api.document()["stages"]["ppo"]["step"] == 10


def test_api_errors_are_swallowed_and_retried_later(capsys):
    api, clock = FakeConfigMaps(), Clock()
    rep = reporter(api, clock)
    api.failures_left = 1
    rep.report(event(step=1))
    assert api.patches == [] and "cannot update ConfigMap" in capsys.readouterr().err
    rep.close()
    assert api.document()["stages"]["ppo"]["step"] == 1


def test_unreadable_existing_config_map_starts_afresh():
    api, clock = FakeConfigMaps({"progress.json": "{broken"}), Clock()
    rep = reporter(api, clock)
    assert rep.document == {"stages": {}}


def test_namespace_comes_from_the_service_account_file_then_the_environment(tmp_path, monkeypatch):
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("from-file\n")
    assert own_namespace(namespace_file) == "from-file"
    monkeypatch.setenv("POD_NAMESPACE", "from-env")
    assert own_namespace(tmp_path / "missing") == "from-env"
    monkeypatch.delenv("POD_NAMESPACE")
    with pytest.raises(ValueError, match="POD_NAMESPACE"):
        own_namespace(tmp_path / "missing")
