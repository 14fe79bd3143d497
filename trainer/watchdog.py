"""A progress watchdog: a stage whose steps stop coming ends with a reason instead of hanging (issue 13).

A collective that never completes (a peer died without closing its sockets, a network partition,
an NCCL hang) can leave every process of a stage waiting forever: the pod stays Running, the
run looks healthy. The gloo and NCCL timeouts (``FINETUNE_COLLECTIVE_TIMEOUT_SECONDS``) catch most
of these; the watchdog catches the rest, whatever the cause: when no step was reported for
``FINETUNE_PROGRESS_TIMEOUT_SECONDS`` (spec.distributed.progressTimeoutSeconds), it writes the
termination message and ends the process with exit code 1, so the operator retries the attempt
from the last checkpoint. Set the timeout above the slowest step plus a checkpoint save and the
model loading before the first step.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping

from trainer.multinode import PROGRESS_TIMEOUT_ENV

HUNG_EXIT_CODE = 1
"""Retryable: the next attempt may well get through (a lost peer is replaced)."""


class ProgressWatchdog:
    """Calls ``on_hung(message)`` once when ``beat`` was not called for ``timeout_seconds``.

    ``clock`` and the check interval are parameters so tests can drive it quickly.
    """

    def __init__(self, *, timeout_seconds: float, on_hung: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, check_seconds: float | None = None):
        self.timeout_seconds = timeout_seconds
        self.on_hung = on_hung
        self.clock = clock
        self.check_seconds = check_seconds or min(5.0, max(timeout_seconds / 10, 0.05))
        self._last = clock()
        self._step: int | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="progress-watchdog", daemon=True)

    def start(self) -> ProgressWatchdog:
        self._thread.start()
        return self

    def beat(self, step: int | None = None) -> None:
        """Progress was made (a step, a checkpoint): the clock starts again."""
        self._last = self.clock()
        self._step = step if step is not None else self._step

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self.check_seconds):
            idle = self.clock() - self._last
            if idle >= self.timeout_seconds:
                where = "before the first step" if not self._step else f"after step {self._step}"
                self.on_hung(f"no progress for {idle:.0f}s {where} ({PROGRESS_TIMEOUT_ENV}="
                             f"{self.timeout_seconds:g}, spec.distributed.progressTimeoutSeconds): the stage is "
                             "hung, most likely in a collective operation waiting for a peer that died or cannot "
                             "be reached; the attempt ends so that a new one resumes from the last checkpoint")
                return


def from_env(*, on_hung: Callable[[str], None], env: Mapping[str, str] = os.environ) -> ProgressWatchdog | None:
    """A started watchdog when ``FINETUNE_PROGRESS_TIMEOUT_SECONDS`` is set, else None."""
    from trainer.multinode import _seconds

    raw = env.get(PROGRESS_TIMEOUT_ENV)
    if not raw:
        return None
    return ProgressWatchdog(timeout_seconds=_seconds(env, PROGRESS_TIMEOUT_ENV, 0.0), on_hung=on_hung).start()


def exit_hung(termination_log: str) -> Callable[[str], None]:
    """``on_hung`` for a real stage: say why on stderr and in the termination message, then end at once.

    ``os._exit``: the main thread is blocked in the hung call and would never see an exception.
    """
    def hung(message: str) -> None:
        from trainer.reporting import write_termination_message

        print(f"[watchdog] {message}", file=sys.stderr, flush=True)
        try:
            write_termination_message(termination_log, f"Hung: {message}")
        finally:
            os._exit(HUNG_EXIT_CODE)

    return hung
