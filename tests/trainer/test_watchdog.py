"""The progress watchdog (trainer.watchdog): a stage whose steps stop coming ends with a reason."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

from trainer.watchdog import PROGRESS_TIMEOUT_ENV, ProgressWatchdog, from_env

from .stage_runs import subprocess_env


def test_no_beat_for_the_timeout_calls_on_hung_once_naming_the_last_step():
    called: list[str] = []
    fired = threading.Event()
    dog = ProgressWatchdog(timeout_seconds=0.3, on_hung=lambda m: (called.append(m), fired.set()),
                           check_seconds=0.02).start()
    dog.beat(7)
    assert fired.wait(5)
    dog.stop()
    assert len(called) == 1
    assert "no progress for" in called[0] and "after step 7" in called[0]
    assert f"{PROGRESS_TIMEOUT_ENV}=0.3" in called[0]


def test_regular_beats_keep_it_quiet():
    called: list[str] = []
    dog = ProgressWatchdog(timeout_seconds=0.4, on_hung=called.append, check_seconds=0.02).start()
    for step in range(15):
        dog.beat(step)
        time.sleep(0.05)
    dog.stop()
    assert called == []


def test_unset_means_no_watchdog():
    assert from_env(on_hung=print, env={}) is None


def test_a_process_stuck_in_a_call_is_ended_with_exit_1_and_the_termination_message(tmp_path):
    # The main thread is blocked for good (as in a hung collective); only os._exit can end it.
    script = textwrap.dedent(f"""
        import threading
        from trainer.watchdog import exit_hung, from_env
        dog = from_env(on_hung=exit_hung({str(tmp_path / 'termination-log')!r}))
        dog.beat(3)
        threading.Event().wait()
    """)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(**{PROGRESS_TIMEOUT_ENV: "1"}),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 60
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("Hung: no progress for") and "after step 3" in message
