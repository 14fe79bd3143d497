"""Which access each console action needs, and which runs a user may see: pure decisions.

The console reads with its own ServiceAccount, so *it* must ask the cluster, for every request,
whether the *user* may do what the page shows or the button writes. Each action maps to one
SubjectAccessReview (``Access``); the cluster's RBAC (or any other authoriser) answers.

* the runs page: ``list finetuneruns`` per namespace (one review for all namespaces first);
* a run's page, its history and samples: ``get finetuneruns/<name>`` -- the history is the run's
  own observation, so whoever may read the run may read its history;
* the labelling page: ``get`` the run and ``list preferencelabels`` (the counts);
* writing a label: ``create preferencelabels`` in the run's namespace, and ``get`` the run.

No token, or one TokenReview rejects: 401. Any review denied: 403.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from ftconsole import GROUP, LABEL_PLURAL

RUNS = "finetuneruns"


@dataclass(frozen=True)
class Access:
    """One SubjectAccessReview's resource attributes."""

    verb: str
    resource: str
    namespace: str  # "" means all namespaces
    name: str | None = None
    group: str = GROUP


def list_runs(namespace: str) -> Access:
    return Access("list", RUNS, namespace)


def read_run(namespace: str, name: str) -> list[Access]:
    return [Access("get", RUNS, namespace, name)]


def label_page(namespace: str, name: str) -> list[Access]:
    return [Access("get", RUNS, namespace, name), Access("list", LABEL_PLURAL, namespace)]


def write_label(namespace: str, run: str) -> list[Access]:
    return [Access("get", RUNS, namespace, run), Access("create", LABEL_PLURAL, namespace)]


def readable_namespaces(namespaces: Iterable[str], allowed: Callable[[Access], bool]) -> set[str]:
    """The namespaces (of those given) whose runs the user may list: all of them when a
    cluster-wide review allows it (one review instead of one per namespace), else each one asked."""
    namespaces = set(namespaces)
    if allowed(list_runs("")):
        return namespaces
    return {ns for ns in sorted(namespaces) if allowed(list_runs(ns))}


def bearer_token(*, authorization: str | None, cookie: str | None, cookie_name: str) -> str | None:
    """The user's token: the ``Authorization: Bearer`` header (API clients, an authenticating
    proxy) or the console's login cookie; None when neither holds one."""
    if authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
        if token:
            return token
    for part in (cookie or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == cookie_name and value:
            return value
    return None
