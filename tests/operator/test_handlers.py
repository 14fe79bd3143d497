"""The kopf wiring: runs carry no finalizer, so they can be deleted without the operator."""

from __future__ import annotations

import asyncio

import kopf

from ftoperator import handlers  # noqa: F401  (registers the handlers)
from ftoperator.reconciler import RunLoops


def test_no_handler_makes_kopf_put_a_finalizer_on_runs():
    # kopf adds its finalizer to an object when a daemon, a timer or a non-optional deletion handler
    # matches it; then `kubectl delete` hangs while the operator is scaled to zero or uninstalled.
    registry = kopf.get_default_registry()
    assert not list(registry._spawning._handlers), "a kopf daemon or timer would add a finalizer to every run"
    assert not [h for h in registry._changing._handlers if h.requires_finalizer]


class FakeReconciler:
    def __init__(self, answers):
        self.answers = list(answers)
        self.passes = 0

    def reconcile(self, namespace, name):
        self.passes += 1
        return self.answers.pop(0) if self.answers else None


def test_a_runs_loop_starts_once_and_ends_when_the_run_is_gone():
    async def scenario():
        reconciler = FakeReconciler([None])  # None: the run is gone or being deleted
        loops = RunLoops(reconciler, resync_seconds=0.05, workers=1)
        assert loops.ensure("ns", "demo")
        assert not loops.ensure("ns", "demo")  # already running: one writer per run
        task, _ = loops._tasks[("ns", "demo")]
        await asyncio.wait_for(task, timeout=5)
        assert reconciler.passes == 1 and ("ns", "demo") not in loops._tasks

    asyncio.run(scenario())
