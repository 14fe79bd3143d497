"""The chart installs the console: its own Deployment from the operator image, a Service, and a
ServiceAccount granted exactly ftconsole.kube.PERMISSIONS (reviews cluster-wide, data where runs are)."""

from __future__ import annotations

from chartlib import CHART, NAMESPACE, helm_template

from ftconsole.kube import PERMISSIONS

REVIEWS = {p for p in PERMISSIONS if p[1] in ("tokenreviews", "subjectaccessreviews")}


def granted(rules):
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def console_objects(rendered):
    return [d for d in rendered.docs if (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
            == "console"]


def test_console_is_on_by_default_from_the_operator_image_with_its_own_command(helm):
    rendered = helm_template(helm, console=True)
    assert rendered.returncode == 0, rendered.stderr
    (deployment,) = [d for d in console_objects(rendered) if d["kind"] == "Deployment"]
    (operator,) = [d for d in rendered.of_kind("Deployment") if d is not deployment]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == operator["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["command"][:4] == ["python", "-m", "ftconsole", "serve"]
    assert "--port=8090" in container["command"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == f"ft-finetune-operator-console"
    (service,) = [d for d in console_objects(rendered) if d["kind"] == "Service"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8090


def test_console_service_account_gets_exactly_its_permissions_cluster_wide(helm):
    rendered = helm_template(helm, console=True)
    (role,) = [d for d in console_objects(rendered) if d["kind"] == "ClusterRole"]
    assert granted(role["rules"]) == set(PERMISSIONS)
    (binding,) = [d for d in console_objects(rendered) if d["kind"] == "ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ft-finetune-operator-console",
                                    "namespace": NAMESPACE}]


def test_namespace_scope_limits_the_console_to_the_watched_namespaces(helm):
    rendered = helm_template(helm, values_files=[CHART / "ci" / "namespace-scoped-values.yaml"], console=True)
    assert rendered.returncode == 0, rendered.stderr
    (cluster_role,) = [d for d in console_objects(rendered) if d["kind"] == "ClusterRole"]
    assert granted(cluster_role["rules"]) == REVIEWS, "only the reviews are cluster-wide"
    roles = [d for d in console_objects(rendered) if d["kind"] == "Role"]
    watched = rendered_watch_namespaces(rendered)
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
    assert all(granted(r["rules"]) == set(PERMISSIONS) - REVIEWS for r in roles)
    (deployment,) = [d for d in console_objects(rendered) if d["kind"] == "Deployment"]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert [c for c in command if c.startswith("--namespace=")] == [f"--namespace={ns}" for ns in watched]


def rendered_watch_namespaces(rendered):
    (operator,) = [d for d in rendered.of_kind("Deployment") if "console" not in d["metadata"]["name"]]
    command = operator["spec"]["template"]["spec"]["containers"][0]["command"]
    return [c.split("=", 1)[1] for c in command if c.startswith("--namespace=")]


def test_labels_join_the_default_edit_and_view_roles(helm):
    roles = {r["metadata"]["name"]: r for r in helm_template(helm, console=True).of_kind("ClusterRole")}
    edit, view = roles[f"{NAMESPACE}-ft-finetune-operator-labels-edit"], roles[f"{NAMESPACE}-ft-finetune-operator-labels-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert ("finetune.dev", "preferencelabels", "create") in granted(edit["rules"])
    assert granted(view["rules"]) == {("finetune.dev", "preferencelabels", v) for v in ("get", "list", "watch")}


def test_console_can_be_turned_off(helm):
    rendered = helm_template(helm, set_values={"console.enabled": False}, console=True)
    assert console_objects(rendered) == []
    assert helm_template(helm, set_values={"console.port": 0}, console=True).returncode != 0, "the schema checks the port"
