"""Start and stop child processes so that none outlive the cluster.

Every child gets its own session (process group = its pid), is recorded as a
file `<state>/pids/<pgid>` while alive (so `python -m localcluster down` can
kill what a crashed daemon left), and receives SIGKILL if the thread that
started it dies (PR_SET_PDEATHSIG) — the last line of defence when the parent
is SIGKILLed and neither atexit nor finalizers run.
"""

import ctypes
import os
import pathlib
import signal
import subprocess
import time

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessGroups:
    """Registry of the process groups one cluster started."""

    def __init__(self, state_dir: pathlib.Path):
        self.pid_dir = state_dir / "pids"
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.children: dict = {}  # pid -> Popen

    def spawn(self, argv, *, log_path: pathlib.Path, env=None, cwd=None) -> subprocess.Popen:
        """Start argv in a new session, stdout+stderr appended to log_path."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.children[process.pid] = process
        (self.pid_dir / str(process.pid)).write_text(" ".join(map(str, argv))[:500])
        return process

    def forget(self, process: subprocess.Popen) -> None:
        self.children.pop(process.pid, None)
        (self.pid_dir / str(process.pid)).unlink(missing_ok=True)

    def terminate(self, process: subprocess.Popen, *, grace_seconds: float) -> None:
        """SIGTERM the group, SIGKILL it after grace_seconds, reap and forget it."""
        signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=max(grace_seconds, 0))
        except subprocess.TimeoutExpired:
            pass
        # The leader may have exited while others in its group linger.
        signal_group(process.pid, signal.SIGKILL)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.forget(process)

    def terminate_all(self, *, grace_seconds: float) -> None:
        processes = list(self.children.values())
        for process in processes:
            signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in processes:
            self.terminate(process, grace_seconds=0)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_recorded(state_dir: pathlib.Path) -> list:
    """SIGKILL every process group recorded under state_dir/pids; return the pgids signalled."""
    killed = []
    pid_dir = state_dir / "pids"
    if not pid_dir.is_dir():
        return killed
    for entry in pid_dir.iterdir():
        if entry.name.isdigit() and pathlib.Path(f"/proc/{entry.name}").exists():
            signal_group(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
        entry.unlink(missing_ok=True)
    return killed
