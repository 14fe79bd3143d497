"""``python -m trainer.gang_launch --stage S --config FILE``: one pod of a stage that runs on several pods.

The operator's command for every pod of a stage with ``resources.nodes`` above 1. It runs
``torchrun`` (``torch.distributed.run``) in this process with no arguments of its own: torchrun
reads nodes, node rank, processes per node, rank 0's address and port and its rendezvous timeout
from ``PET_*`` (``ftoperator.gang.rendezvous_env``), so there is no shell and nothing to expand.
Each worker runs ``python -m trainer`` with the same arguments.

What this adds to a bare ``torchrun``:

* a rendezvous that fails (rank 0 unreachable: a wrong address, a blocked port, a Service that
  does not resolve; or peers that never come) ends with exit code 1 and a termination message that
  names rank 0's address and port, what the name resolved to, and the timeout, instead of a
  traceback from deep inside torch.distributed;
* a worker's failure keeps its exit code (3 stays a permanent error) and its own termination
  message (the workers share the pod's termination log);
* SIGTERM (pod deletion) is passed to the workers by torchrun, which checkpoint and stop
  (``runtime.GracefulStop``); the exit code is then 128 + the signal, as for a plain process.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from trainer.__main__ import DEFAULT_TERMINATION_LOG, parse_args
from trainer.config import ConfigError, load_stage_job
from trainer.reporting import write_termination_message

RENDEZVOUS_FAILED_EXIT_CODE = 1
"""Retryable: the next attempt gets a new rank 0 and a new Service."""


def _termination_log(config: str) -> Path | None:
    try:
        return Path(load_stage_job(config).reporting.termination_log_path)
    except ConfigError:
        return DEFAULT_TERMINATION_LOG if DEFAULT_TERMINATION_LOG.exists() else None


def rendezvous_failure(exc: BaseException, *, env=os.environ, waited: float) -> str:
    """One line naming what failed: which node, rank 0's address and port, the DNS answer, the timeout."""
    from trainer.multinode import _where

    node, nodes = env.get("PET_NODE_RANK", "?"), env.get("PET_NNODES", "?")
    address, port = env.get("PET_MASTER_ADDR", "?"), env.get("PET_MASTER_PORT", "?")
    timeout = env.get("PET_RDZV_CONF", "").removeprefix("timeout=") or "600"
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if node == "0":
        head = (f"pod rank 0 of {nodes} waited {waited:.0f}s at {address}:{port} for the other pods to join "
                f"(rendezvousTimeoutSeconds {timeout}); they could not reach it or did not start (see their pods)"
                f"{_not_this_pod(address)}")
    else:
        head = (f"pod rank {node} of {nodes} could not reach rank 0 at {address}:{port} within {waited:.0f}s "
                f"(rendezvousTimeoutSeconds {timeout}): {_where(address)}")
    return f"rendezvous failed: {head} [{type(exc).__name__}: {detail}]"


def _not_this_pod(address: str) -> str:
    """When rank 0's own name points elsewhere (a wrong Service), say so: that is why nobody could meet here."""
    import socket

    try:
        own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)}
        named = {info[4][0] for info in socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return ""
    if named & own or any(ip.startswith("127.") for ip in named):
        return ""
    return (f"; {address} resolves to {', '.join(sorted(named))}, not to this pod ({', '.join(sorted(own))}): "
            "the rendezvous Service does not select rank 0")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    started = time.monotonic()
    try:
        torchrun(["-m", "trainer", "--stage", args.stage, "--config", args.config])
        return 0
    except ChildFailedError as exc:  # a worker failed: it wrote its own reason
        _, first = exc.get_first_failure()
        code = first.exitcode
        return 128 - code if code < 0 else code or 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except Exception as exc:  # the agent's rendezvous: rank 0 unreachable, or peers that never came
        message = rendezvous_failure(exc, waited=time.monotonic() - started)
        print(f"[{args.stage}] failed: {message}", file=sys.stderr, flush=True)
        log = _termination_log(args.config)
        if log is not None:
            write_termination_message(log, message)
        return RENDEZVOUS_FAILED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
