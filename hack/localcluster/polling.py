"""Deadline-based polling: tests wait for conditions, never for fixed sleeps."""

import time


def wait_for(probe, *, timeout: float, what: str, interval: float = 0.1):
    """Call probe() until it returns something truthy; return that value.

    Raises TimeoutError naming `what` and the last value (or exception) seen.
    Exceptions from probe are retried until the deadline.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = probe()
            if last:
                return last
        except Exception as exc:  # the object may not exist yet
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)


def wait_for_crd(cluster, *names: str, timeout: float = 60) -> None:
    """Poll until each CustomResourceDefinition is Established.

    Not `kubectl wait --for=condition=Established`: that fails outright ("conditions
    accessor error") when it reads a CRD the API server has not given conditions yet.
    """
    for name in names:
        wait_for(lambda: cluster.kubectl(
            "get", "crd", name, "-o", 'jsonpath={.status.conditions[?(@.type=="Established")].status}',
            check=False).stdout == "True", timeout=timeout, what=f"CRD {name} to be established")
