"""The bounded metric history the trainer writes for the console (trainer.kube_reporter.MetricHistory)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from trainer import kube_reporter
from trainer.kube_reporter import KubernetesReporter, MetricHistory, append_point, halve, thin_samples
from trainer.reporting import ProgressEvent


class ConfigMaps:
    """Named ConfigMaps' data; records patches per name; names in `forbidden` answer like a 403."""

    def __init__(self, **data):
        self.data = {name: dict(d) for name, d in data.items()}
        self.patches: list[str] = []
        self.forbidden: set[str] = set()

    def read_namespaced_config_map(self, name, namespace):
        return SimpleNamespace(data=dict(self.data.get(name, {})))

    def patch_namespaced_config_map(self, name, namespace, body):
        if name in self.forbidden:
            raise PermissionError("configmaps is forbidden")
        self.patches.append(name)
        self.data.setdefault(name, {}).update(body["data"])

    def history(self):
        return json.loads(self.data["demo-history"]["history.json"])


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def event(kind="progress", step=1, stage="ppo", **fields):
    return ProgressEvent(stage=stage, kind=kind, step=step, total_steps=10_000, time=1735732800.0 + step, **fields)


def test_a_series_stays_within_its_limit_and_spans_every_step():
    points: list = []
    for step in range(1, 10_001):
        points = append_point(points, step, float(step), limit=256)
        assert len(points) <= 256
    assert len(points) >= 128
    assert points[-1][0] == 10_000, "the newest step is always there"
    # Every point but the newest (the bucket being filled) stands for the same number of steps.
    counts = {p[4] if len(p) == 5 else 1 for p in points[:-1]}
    assert len(counts) == 1
    assert sum(p[4] if len(p) == 5 else 1 for p in points) == 10_000


def test_downsampling_keeps_a_spike_in_the_envelope():
    points: list = []
    for step in range(1, 1001):
        points = append_point(points, step, 50.0 if step == 500 else 0.1, limit=64)
    assert max(p[3] for p in points if len(p) == 5) == 50.0, "a KL spike survives as the max of its bucket"
    merged = halve([[1, 1.0], [2, 3.0], [3, 5.0]])
    assert merged == [[2, 2.0, 1.0, 3.0, 2], [3, 5.0]]


def test_a_restart_from_an_earlier_checkpoint_drops_the_redone_steps():
    points: list = []
    for step in (1, 2, 3, 4, 5):
        points = append_point(points, step, float(step))
    points = append_point(points, 3, 30.0)  # resumed from the step-2 checkpoint
    assert points == [[1, 1.0], [2, 2.0], [3, 30.0]]


def test_samples_are_thinned_oldest_first():
    samples = [{"stage": "ppo", "step": step, "prompt": "p"} for step in range(0, 200, 10) for _ in range(3)]
    kept = thin_samples(samples, limit=30)
    assert len(kept) <= 30
    steps = [s["step"] for s in kept]
    assert steps[0] == 0 and steps[-1] == 190, "the first and the latest evaluations stay"


def test_the_document_fits_its_byte_budget(monkeypatch):
    monkeypatch.setattr(kube_reporter, "HISTORY_BUDGET_BYTES", 40_000)
    history = MetricHistory()
    for step in range(1, 3001):
        history.add(event(step=step, metrics={f"metric_{i}": step * 0.001 + i for i in range(20)}))
    text = json.dumps(history.document(), separators=(",", ":"))
    assert len(text) <= 40_000
    assert all(len(points) >= 8 for points in history.stages["ppo"]["series"].values())


def test_reporter_writes_history_to_its_own_config_map_less_often_and_reads_it_back():
    api, clock = ConfigMaps(), Clock()
    rep = KubernetesReporter(config_map="demo-progress", namespace="ns", api=api, clock=clock,
                             min_interval_seconds=2.0, history_config_map="demo-history",
                             history_interval_seconds=10.0)
    rep.report(event(kind="started", step=0))
    for step in range(1, 21):
        clock.now += 1
        rep.report(event(step=step, metrics={"kl": step / 10, "score_mean": 1.0}))
    rep.report(event(kind="samples", step=20, samples=[{"prompt": "<script>x</script>", "response": "r",
                                                         "reward": 0.5, "kl": 0.1}]))
    assert api.patches.count("demo-history") < api.patches.count("demo-progress")
    rep.report(event(kind="succeeded", step=20))  # terminal: sent at once
    history = api.history()
    assert [p[0] for p in history["stages"]["ppo"]["series"]["kl"]] == list(range(1, 21))
    assert [e["kind"] for e in history["stages"]["ppo"]["events"]] == ["started", "succeeded"]
    assert history["samples"][0]["prompt"] == "<script>x</script>" and history["samples"][0]["step"] == 20
    assert "history.json" not in api.data["demo-progress"], "the operator's ConfigMap does not carry the history"
    # A restarted pod continues the history it finds.
    again = KubernetesReporter(config_map="demo-progress", namespace="ns", api=api, clock=clock,
                               history_config_map="demo-history")
    again.report(event(stage="ppo", kind="started", step=20))
    assert len(api.history()["stages"]["ppo"]["series"]["kl"]) == 20


def test_history_that_cannot_be_written_does_not_stop_progress():
    api, clock = ConfigMaps(), Clock()
    api.forbidden.add("demo-history")  # e.g. a run whose Role predates the history ConfigMap
    rep = KubernetesReporter(config_map="demo-progress", namespace="ns", api=api, clock=clock,
                             history_config_map="demo-history")
    rep.report(event(step=1, metrics={"kl": 0.1}))
    rep.report(event(kind="succeeded", step=1))
    assert api.patches == ["demo-progress", "demo-progress"]
