"""``python -m trainer.gang_launch``, the command of every pod of a multi-node stage, on loopback.

Real processes with the env ``ftoperator.gang.rendezvous_env`` builds and short timeouts: a rank
that cannot reach rank 0 ends within the rendezvous timeout with a termination message naming
the address, the port and what the name resolved to; a worker's permanent error keeps exit code 3.
"""

from __future__ import annotations

import subprocess
import sys
import time

from trainer.config import PERMANENT_FAILURE_EXIT_CODE
from trainer.multinode import EXPECTED_WORLD_SIZE_ENV

from .stage_runs import subprocess_env
from .test_multinode import free_port, sft_job_file, termination_message


def launch(tmp_path, *, rank: int, nodes: int, port: int, address: str = "127.0.0.1", timeout: int = 60,
           expected: int | None = None) -> subprocess.Popen:
    from ftoperator.gang import rendezvous_env

    env = {e["name"]: e["value"] for e in rendezvous_env(
        run="demo", namespace="team-a", stage="sft", attempt=1, rank=rank, nodes=nodes, processes_per_node=1,
        port=port, rendezvous_timeout_seconds=timeout, collective_timeout_seconds=60)}
    env["PET_MASTER_ADDR"] = env["MASTER_ADDR"] = address  # no cluster DNS here
    if expected is not None:
        env[EXPECTED_WORLD_SIZE_ENV] = str(expected)
    job = sft_job_file(tmp_path)
    return subprocess.Popen([sys.executable, "-m", "trainer.gang_launch", "--stage", "sft", "--config", str(job)],
                            cwd=tmp_path, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_pod_that_cannot_reach_rank_0_ends_within_the_timeout_naming_address_port_and_cause(tmp_path):
    port = free_port()  # nothing listens: rank 0's pod never came, or the port is blocked
    started = time.monotonic()
    lonely = launch(tmp_path, rank=1, nodes=2, port=port, timeout=3)
    output = lonely.communicate(timeout=240)[0]
    elapsed = time.monotonic() - started
    assert lonely.returncode == 1, output[-3000:]  # retryable
    message = termination_message(tmp_path)
    assert message.startswith(f"rendezvous failed: pod rank 1 of 2 could not reach rank 0 at 127.0.0.1:{port}"), message
    assert "(rendezvousTimeoutSeconds 3)" in message
    assert "127.0.0.1 resolves to 127.0.0.1 but nothing accepted the connection in time" in message
    assert elapsed < 60, elapsed  # the timeout it was given, plus interpreter start; torch's default is 600 s


def test_a_rank_0_name_that_does_not_resolve_is_named_as_such(tmp_path):
    lonely = launch(tmp_path, rank=1, nodes=2, port=free_port(), address="demo-sft-1.team-a.invalid", timeout=3)
    output = lonely.communicate(timeout=240)[0]
    assert lonely.returncode == 1, output[-3000:]
    message = termination_message(tmp_path)
    assert "could not reach rank 0 at demo-sft-1.team-a.invalid:" in message
    assert "demo-sft-1.team-a.invalid does not resolve" in message


def test_rank_0_whose_peer_never_comes_says_so(tmp_path):
    alone = launch(tmp_path, rank=0, nodes=2, port=free_port(), timeout=3)
    output = alone.communicate(timeout=240)[0]
    assert alone.returncode == 1, output[-3000:]
    assert "pod rank 0 of 2 waited" in termination_message(tmp_path)
    assert "for the other pods to join (rendezvousTimeoutSeconds 3)" in termination_message(tmp_path)


def test_two_pods_meet_and_a_workers_permanent_error_keeps_exit_code_3(tmp_path):
    # Both pods reach the trainer (one world of 2); it refuses a world other than the expected 3.
    port = free_port()
    pods = [launch(tmp_path / str(r), rank=r, nodes=2, port=port, expected=3) for r in (0, 1)
            if (tmp_path / str(r)).mkdir() or True]
    outputs = [p.communicate(timeout=240)[0] for p in pods]
    assert [p.returncode for p in pods] == [PERMANENT_FAILURE_EXIT_CODE] * 2, outputs
    for r in (0, 1):
        assert "world size mismatch: the stage expects 3 processes" in termination_message(tmp_path / str(r))
        assert "but 2 came up" in termination_message(tmp_path / str(r))
