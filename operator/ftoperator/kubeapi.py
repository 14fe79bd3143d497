"""The only module that talks to the Kubernetes API (besides kopf's own watches).

Objects travel as plain dicts. Creates report 409 AlreadyExists (the caller checks
whose the existing object is) and deletes tolerate 404 NotFound, so applying a
decision twice is harmless. Every
request is counted by verb for the metrics and the scale benchmark.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from typing import Any, Callable
from urllib.parse import quote

from ftoperator import API_VERSION, GROUP, KIND, PLURAL, VERSION
from ftoperator.conditions import timestamp

MERGE_PATCH = "application/merge-patch+json"
EVENT_MESSAGE_LIMIT = 1024
REPORTING_COMPONENT = "finetune-operator"

_KIND_PATHS = {
    "Pod": ("/api/v1", "pods"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Service": ("/api/v1", "services"),
    "Event": ("/api/v1", "events"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    KIND: (f"/apis/{GROUP}/{VERSION}", PLURAL),
    "PreferenceLabel": (f"/apis/{GROUP}/{VERSION}", "preferencelabels"),
    # A kind served by more than one API group is keyed "<apiVersion>/<kind>" (``type_key``).
    "scheduling.x-k8s.io/v1alpha1/PodGroup": ("/apis/scheduling.x-k8s.io/v1alpha1", "podgroups"),
    "scheduling.volcano.sh/v1beta1/PodGroup": ("/apis/scheduling.volcano.sh/v1beta1", "podgroups"),
}


def type_key(obj: dict[str, Any]) -> str:
    """How ``_path`` finds an object's resource: its kind, or "<apiVersion>/<kind>" for PodGroups."""
    kind = obj["kind"]
    return kind if kind in _KIND_PATHS else f"{obj['apiVersion']}/{kind}"


class ApiError(Exception):
    """A non-2xx answer; ``status`` is the HTTP code, the message is the API's."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def load_api_client(*, connections: int = 32) -> Any:
    """An ApiClient from the in-cluster service account, else from KUBECONFIG / ~/.kube/config.

    ``connections`` should cover the reconcile threads, or urllib3 keeps reopening connections.
    """
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = connections
    return client.ApiClient(configuration)


_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def permission_of(method: str, path: str) -> tuple[str, str, str]:
    """The RBAC (group, resource, verb) a request needs (``permissions`` lists them all)."""
    parts = path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    if rest[:1] == ["namespaces"]:
        rest = rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    verb = _VERBS.get(method) or ("get" if len(rest) > 1 else "list")
    return group, resource, verb


def _path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = _KIND_PATHS[kind]
    path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    if name is not None:
        path += f"/{quote(name)}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


class KubeApi:
    """Thin, synchronous, dict-in dict-out client (run it in a thread from async code)."""

    def __init__(self, api_client: Any, *, timeout_seconds: float = 30.0,
                 on_request: Callable[[str], None] | None = None):
        self._client = api_client
        self._timeout = timeout_seconds
        self._on_request = on_request
        self.requests: Counter[str] = Counter()
        self._instance = socket.gethostname()

    def request(self, method: str, path: str, *, body: Any = None, query: list[tuple[str, str]] | None = None,
                content_type: str | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        method, url, headers, body, _ = self._client.param_serialize(
            method=method, resource_path=path, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"])
        verb = method.lower()
        self.requests[verb] += 1
        if self._on_request is not None:
            self._on_request(verb)
        response = self._client.call_api(method, url, header_params=headers, body=body,
                                         _request_timeout=self._timeout)
        raw = response.read()
        if response.status >= 400:
            try:
                message = json.loads(raw).get("message", "")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            raise ApiError(response.status, message)
        return json.loads(raw) if raw else {}

    # --------------------------------------------------------------------- runs

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The FineTuneRun, or None if it is gone."""
        try:
            return self.request("GET", _path(KIND, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def patch_run_status(self, namespace: str, name: str, status_patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource; None if the run is gone."""
        try:
            return self.request("PATCH", _path(KIND, namespace, name, "status"), body={"status": status_patch},
                                content_type=MERGE_PATCH)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    # --------------------------------------------------------------------- children

    def list_objects(self, kind: str, namespace: str, *, label_selector: str) -> list[dict[str, Any]]:
        """Objects of ``kind`` matching the selector, whoever owns them, each with its ``kind`` set."""
        answer = self.request("GET", _path(kind, namespace), query=[("labelSelector", label_selector)])
        items = answer.get("items") or []
        for item in items:  # list items come without kind
            item.setdefault("kind", kind)
        return items

    def list_pods(self, namespace: str, *, label_selector: str) -> list[dict[str, Any]]:
        """Pods matching the selector, whoever owns them."""
        return self.list_objects("Pod", namespace, label_selector=label_selector)

    def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One namespaced object (with its ``kind`` set), or None if there is none."""
        try:
            obj = self.request("GET", _path(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        obj.setdefault("kind", kind)
        return obj

    def create(self, obj: dict[str, Any]) -> bool:
        """Create a namespaced object; False if one of that name already existed (409), whoever owns it.

        Any other refusal raises ApiError with the server's message (quota, admission, Pod Security).
        """
        meta = obj["metadata"]
        try:
            self.request("POST", _path(type_key(obj), meta["namespace"]), body=obj)
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    def delete_pod(self, namespace: str, name: str, *, force: bool = False) -> bool:
        """Delete a pod (background propagation); False if it was already gone.

        ``force``: grace period 0, which removes the object at once -- only for a pod whose node
        stopped reporting, where no kubelet will ever confirm the deletion.
        """
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if force:
            body["gracePeriodSeconds"] = 0
        try:
            self.request("DELETE", _path("Pod", namespace, name), body=body)
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    # --------------------------------------------------------------------- leader election

    def replace(self, obj: dict[str, Any]) -> bool:
        """PUT a namespaced object with the resourceVersion it was read with; False on 409 Conflict
        (someone changed it since: read it again)."""
        meta = obj["metadata"]
        try:
            self.request("PUT", _path(obj["kind"], meta["namespace"], meta["name"]), body=obj)
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    def post_event(self, run: dict[str, Any], *, type_: str, reason: str, message: str, now: Any) -> None:
        """A core/v1 Event about the run (kubectl describe shows it)."""
        meta = run["metadata"]
        stamp = timestamp(now)
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"],
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_,
            "reason": reason,
            "message": message[:EVENT_MESSAGE_LIMIT],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "source": {"component": REPORTING_COMPONENT},
            "reportingComponent": REPORTING_COMPONENT,
            "reportingInstance": self._instance,
        }
        self.request("POST", _path("Event", meta["namespace"]), body=event)
