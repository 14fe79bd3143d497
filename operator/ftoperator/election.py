"""Leader election with a Lease: block until this replica leads, then keep renewing or exit.

``--leader-election-namespace NS`` turns it on (the chart always does). The
standby replica waits in ``acquire`` before kopf starts, answering its liveness
probe meanwhile; the leader renews in a thread and ends the process (exit code
1, the pod restarts as a standby) when it cannot renew before its Lease would
expire -- the other replica may have taken over, and two leaders must never act
at once. A clean shutdown releases the Lease so the standby takes over at once.
The rules themselves are pure, in ``leadership``.
"""

from __future__ import annotations

import http.server
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from ftoperator import leadership
from ftoperator.kubeapi import ApiError, KubeApi

log = logging.getLogger("ftoperator.election")


class LeaderElector:
    def __init__(self, api: KubeApi, *, namespace: str, identity: str, duration_seconds: int = 15,
                 retry_seconds: float = 2.0, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 on_lost: Callable[[], None] = lambda: os._exit(1)):
        self.api, self.namespace, self.identity = api, namespace, identity
        self.duration = duration_seconds
        self.retry = retry_seconds
        self.clock = clock
        self.on_lost = on_lost
        self._stop = threading.Event()

    def try_once(self) -> bool:
        """One attempt to acquire or renew; True when this replica holds the Lease afterwards."""
        current = self.api.get_object("Lease", self.namespace, leadership.LEASE_NAME)
        step = leadership.next_step(current, identity=self.identity, namespace=self.namespace, now=self.clock(),
                                    duration_seconds=self.duration)
        if step.action == "wait":
            return False
        if step.action == "create":
            return self.api.create(step.lease)
        return self.api.replace(step.lease)

    def acquire(self, *, health_port: int | None = None) -> None:
        """Block until this replica leads; meanwhile answer /healthz on ``health_port`` (liveness)."""
        server = _serve_health(health_port) if health_port else None
        try:
            waiting_logged = False
            while not self.try_once():
                if not waiting_logged:
                    log.info("standing by: another replica holds Lease %s/%s", self.namespace,
                             leadership.LEASE_NAME)
                    waiting_logged = True
                time.sleep(self.retry)
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
        log.info("leading: holding Lease %s/%s as %s", self.namespace, leadership.LEASE_NAME, self.identity)
        threading.Thread(target=self._renew, name="lease-renewal", daemon=True).start()

    def _renew(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.duration / 3):
            try:
                if self.try_once():
                    last = time.monotonic()
                    continue
                log.error("lost Lease %s/%s to another replica; exiting", self.namespace, leadership.LEASE_NAME)
            except (ApiError, OSError) as exc:
                if time.monotonic() - last < self.duration * 2 / 3:
                    log.warning("cannot renew the Lease (%r); retrying", exc)
                    continue
                log.error("could not renew the Lease for %.0fs (%r); exiting so that two replicas never "
                          "act at once", time.monotonic() - last, exc)
            self.on_lost()
            return

    def release(self) -> None:
        """Stop renewing and give the Lease up (clean shutdown)."""
        self._stop.set()
        try:
            current = self.api.get_object("Lease", self.namespace, leadership.LEASE_NAME)
            lease = leadership.released(current, identity=self.identity) if current else None
            if lease is not None:
                self.api.replace(lease)
        except (ApiError, OSError) as exc:
            log.warning("could not release the Lease (%r); the standby takes over when it expires", exc)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path.startswith("/healthz") else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _serve_health(port: int) -> http.server.HTTPServer:
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), _Health)
    threading.Thread(target=server.serve_forever, name="standby-health", daemon=True).start()
    return server
