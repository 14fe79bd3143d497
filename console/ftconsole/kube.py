"""The console's only contact with the Kubernetes API, under its own ServiceAccount.

Every read and write here is made after ``server`` has authorised the *user* with a
SubjectAccessReview; this module itself decides nothing. What the ServiceAccount may do is
listed in ``PERMISSIONS`` (the chart's console RBAC grants exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftconsole import GROUP, LABEL_PLURAL, VERSION

RUN_PLURAL = "finetuneruns"

PERMISSIONS: dict[tuple[str, str, str], str] = {
    ("authentication.k8s.io", "tokenreviews", "create"): "who is the user (bearer token)",
    ("authorization.k8s.io", "subjectaccessreviews", "create"): "may the user read or label this",
    (GROUP, RUN_PLURAL, "list"): "the runs page",
    (GROUP, RUN_PLURAL, "get"): "a run's page",
    (GROUP, LABEL_PLURAL, "list"): "label counts and export",
    (GROUP, LABEL_PLURAL, "create"): "a user's label",
    ("", "configmaps", "get"): "a run's <run>-history and <run>-feedback-<round> ConfigMaps, fetched by name (no list or watch)",
}
"""(API group, resource, verb) -> why; cluster-wide, or per namespace with console.namespaces."""


@dataclass
class User:
    """An authenticated user as TokenReview tells it."""

    username: str
    uid: str = ""
    groups: list[str] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)


def api_client(*, in_cluster: bool | None = None) -> Any:
    """A kubernetes ApiClient: in-cluster config in a pod, else the kubeconfig."""
    from kubernetes import client, config

    if in_cluster is not False:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            if in_cluster:
                raise
    config.load_kube_config()
    return client.ApiClient()


class ConsoleKube:
    """Typed calls the console makes; ``api`` is a kubernetes ApiClient."""

    def __init__(self, api: Any):
        from kubernetes import client

        self._client = client
        self._custom = client.CustomObjectsApi(api)
        self._core = client.CoreV1Api(api)
        self._authn = client.AuthenticationV1Api(api)
        self._authz = client.AuthorizationV1Api(api)

    # -- identity and access
    def token_review(self, token: str) -> User | None:
        """The user a bearer token belongs to, or None if the API server does not accept it."""
        review = self._authn.create_token_review(
            self._client.V1TokenReview(spec=self._client.V1TokenReviewSpec(token=token)))
        status = review.status
        if not status or not status.authenticated or not status.user:
            return None
        return User(username=status.user.username or "", uid=status.user.uid or "",
                    groups=list(status.user.groups or []), extra=dict(status.user.extra or {}))

    def access_review(self, user: User, *, namespace: str, verb: str, resource: str,
                      group: str = GROUP, name: str | None = None) -> bool:
        """Whether the cluster's authorisers allow ``user`` this request (SubjectAccessReview)."""
        attributes = self._client.V1ResourceAttributes(namespace=namespace or None, verb=verb, group=group,
                                                       resource=resource, name=name)
        review = self._authz.create_subject_access_review(self._client.V1SubjectAccessReview(
            spec=self._client.V1SubjectAccessReviewSpec(user=user.username, uid=user.uid or None,
                                                        groups=user.groups or None, extra=user.extra or None,
                                                        resource_attributes=attributes)))
        return bool(review.status and review.status.allowed)

    # -- runs
    def list_runs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """Runs in ``namespaces`` (None: all namespaces)."""
        if namespaces is None:
            return self._custom.list_cluster_custom_object(GROUP, VERSION, RUN_PLURAL).get("items", [])
        items: list[dict[str, Any]] = []
        for namespace in namespaces:
            items += self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, RUN_PLURAL).get("items", [])
        return items

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get_or_none(lambda: self._custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, RUN_PLURAL, name))

    def config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        found = self._get_or_none(lambda: self._core.read_namespaced_config_map(name, namespace))
        return None if found is None else dict(found.data or {})

    # -- labels
    def list_labels(self, namespace: str, *, run: str | None = None) -> list[dict[str, Any]]:
        from ftconsole.labels import LABEL_RUN

        selector = f"{LABEL_RUN}={run[:63].rstrip('-._')}" if run else ""
        return self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, LABEL_PLURAL,
                                                          label_selector=selector).get("items", [])

    def create_label(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._custom.create_namespaced_custom_object(GROUP, VERSION, obj["metadata"]["namespace"],
                                                            LABEL_PLURAL, obj)

    def _get_or_none(self, call: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
