"""`helm lint` / `helm template` of the chart with default values and every variant in ci/.

These prove what the chart renders; tests/chart/test_chart_validate.py proves the
API server accepts it, and test_helm_install.py that it runs.
"""

from __future__ import annotations

import base64
import re
import subprocess

import sys

import pytest
from chartlib import CHART, CI_VALUES, NAMESPACE, REPO, helm_template

sys.path.insert(0, str(REPO / "tests"))
from podsecurity import restricted_violations  # noqa: E402

VARIANTS = [None, *CI_VALUES]
VARIANT_IDS = ["default", *[p.name.removesuffix("-values.yaml") for p in CI_VALUES]]


def test_ci_folder_has_the_variants_the_chart_promises():
    names = {p.name for p in CI_VALUES}
    assert {"namespace-scoped-values.yaml", "monitoring-values.yaml", "webhook-disabled-values.yaml",
            "webhook-url-values.yaml"} <= names


@pytest.mark.parametrize("values_file", VARIANTS, ids=VARIANT_IDS)
def test_helm_lint_passes(helm, values_file):
    args = [helm, "lint", str(CHART), "--strict"]
    if values_file:
        args += ["--values", str(values_file)]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values_file", VARIANTS, ids=VARIANT_IDS)
def test_every_variant_renders_a_restricted_operator_that_elects_a_leader(helm, values_file):
    rendered = helm_template(helm, values_files=[values_file] if values_file else [])
    assert rendered.returncode == 0, rendered.stderr
    deployment = rendered.one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    # The Lease keeps the old and the new pod from acting together during a rolling update.
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert f"--leader-election-namespace={NAMESPACE}" in spec["template"]["spec"]["containers"][0]["command"]
    pod = spec["template"]["spec"]
    assert restricted_violations(pod, spec["template"]["metadata"].get("annotations")) == []
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    # The local node agent ignores images: the command must be explicit.
    assert container["command"][:3] == ["python", "-m", "ftoperator"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # A standby replica is alive but serves no webhook: ready only once the webhook port is open.
    readiness = container["readinessProbe"]
    assert readiness.get("tcpSocket") == {"port": "webhook"} or readiness["httpGet"]["path"] == "/healthz"
    assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in container["ports"] or values_file
    assert container["resources"]["requests"]


def test_each_template_file_renders_at_most_one_kind(helm):
    # One resource per template file (role.yaml renders one Role per watched namespace).
    everything = [CHART / "ci" / "monitoring-values.yaml", CHART / "ci" / "namespace-scoped-values.yaml"]
    rendered = helm_template(helm, values_files=everything)
    assert rendered.returncode == 0, rendered.stderr
    result = subprocess.run(
        [helm, "template", "ft", str(CHART), "-n", NAMESPACE, *sum((["-f", str(p)] for p in everything), [])],
        capture_output=True, text=True, check=True,
    )
    kinds_by_source: dict[str, set] = {}
    for chunk in result.stdout.split("\n---\n"):
        source = re.search(r"# Source: (\S+)", chunk)
        kind = re.search(r"^kind: (\S+)", chunk, re.M)
        if source and kind:
            kinds_by_source.setdefault(source.group(1), set()).add(kind.group(1))
    assert all(len(kinds) == 1 for kinds in kinds_by_source.values()), kinds_by_source


def test_default_install_is_cluster_scoped_with_a_service_routed_webhook(helm):
    rendered = helm_template(helm)
    command = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert not any(arg.startswith("--namespace") for arg in command)
    assert "--webhook-cert=/etc/finetune-operator/webhook/tls.crt" in command
    assert {r["metadata"]["name"] for r in rendered.of_kind("ClusterRole")} == {
        "finetune-system-ft-finetune-operator", "finetune-system-ft-finetune-operator-edit",
        "finetune-system-ft-finetune-operator-view", "finetune-system-ft-finetune-operator-labels-edit",
        "finetune-system-ft-finetune-operator-labels-view"}
    assert rendered.one("ClusterRoleBinding")
    # The only Role is leader election's, in the release namespace.
    assert [(r["metadata"]["name"], r["metadata"]["namespace"]) for r in rendered.of_kind("Role")] == [
        ("ft-finetune-operator-leader-election", NAMESPACE)]
    webhook = rendered.one("ValidatingWebhookConfiguration")["webhooks"][0]
    assert webhook["clientConfig"]["service"]["path"] == "/validate-finetunerun"
    assert webhook["failurePolicy"] == "Fail"
    assert {d["metadata"]["name"] for d in rendered.of_kind("Service")} == {
        "ft-finetune-operator-metrics", "ft-finetune-operator-webhook"}
    assert not rendered.of_kind("ServiceMonitor") and not rendered.of_kind("PodMonitor")


def test_generated_certificate_is_trusted_by_the_webhook_configuration(helm):
    from cryptography import x509

    rendered = helm_template(helm, values_files=[CHART / "ci" / "webhook-url-values.yaml"])
    secret = rendered.one("Secret")
    webhook = rendered.one("ValidatingWebhookConfiguration")["webhooks"][0]
    assert webhook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "ft-finetune-operator-webhook.finetune-system.svc" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_webhook_url_replaces_the_service_route(helm):
    rendered = helm_template(helm, values_files=[CHART / "ci" / "webhook-url-values.yaml"])
    client_config = rendered.one("ValidatingWebhookConfiguration")["webhooks"][0]["clientConfig"]
    assert client_config["url"] == "https://127.0.0.1:19443/validate-finetunerun"
    assert "service" not in client_config
    assert [d["metadata"]["name"] for d in rendered.of_kind("Service")] == ["ft-finetune-operator-metrics"]
    command = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--webhook-port=19443" in command


def test_webhook_disabled_renders_no_webhook_objects_and_passes_no_webhook(helm):
    rendered = helm_template(helm, values_files=[CHART / "ci" / "webhook-disabled-values.yaml"])
    assert not rendered.of_kind("ValidatingWebhookConfiguration") and not rendered.of_kind("Secret")
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    assert "--no-webhook" in pod["containers"][0]["command"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]


def test_existing_secret_is_mounted_and_its_ca_bundle_used(helm):
    rendered = helm_template(helm, values_files=[CHART / "ci" / "existing-secret-values.yaml"])
    assert not rendered.of_kind("Secret")
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    certificate_volume = next(v for v in pod["volumes"] if v["name"] == "webhook-certificate")
    assert certificate_volume["secret"]["secretName"] == "my-webhook-tls"
    webhook = rendered.one("ValidatingWebhookConfiguration")["webhooks"][0]
    assert webhook["clientConfig"]["caBundle"] == "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="


def test_namespace_scope_grants_roles_only_in_watched_namespaces(helm):
    rendered = helm_template(helm, values_files=[CHART / "ci" / "namespace-scoped-values.yaml"])
    roles = [r for r in rendered.of_kind("Role") if not r["metadata"]["name"].endswith("-leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = [b for b in rendered.of_kind("RoleBinding") if not b["metadata"]["name"].endswith("-leader-election")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    # The only cluster-wide permissions left are reading CRDs and namespace names (kopf's scans).
    (cluster_role,) = [r for r in rendered.of_kind("ClusterRole")
                       if "rbac.authorization.k8s.io/aggregate-to-view" not in r["metadata"]["labels"]
                       and "rbac.authorization.k8s.io/aggregate-to-edit" not in r["metadata"]["labels"]]
    assert cluster_role["rules"] == [{"apiGroups": ["apiextensions.k8s.io"],
                                      "resources": ["customresourcedefinitions"],
                                      "verbs": ["get", "list", "watch"]},
                                     {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}]
    command = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert [a for a in command if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    assert all(binding["subjects"][0]["namespace"] == NAMESPACE for binding in rendered.of_kind("RoleBinding"))


def test_namespace_scope_limits_the_webhook_to_watched_namespaces_where_the_label_exists(helm):
    values = [CHART / "ci" / "namespace-scoped-values.yaml"]
    new = helm_template(helm, values_files=values, kube_version="1.30.0")
    selector = new.one("ValidatingWebhookConfiguration")["webhooks"][0]["namespaceSelector"]
    assert selector["matchExpressions"][0]["values"] == ["team-a", "team-b"]
    # Kubernetes 1.20 has no kubernetes.io/metadata.name label: no selector rather than one that never matches.
    old = helm_template(helm, values_files=values, kube_version="1.20.2")
    assert "namespaceSelector" not in old.one("ValidatingWebhookConfiguration")["webhooks"][0]


def test_monitoring_variant_renders_service_and_pod_monitors(helm):
    rendered = helm_template(helm, values_files=[CHART / "ci" / "monitoring-values.yaml"])
    service_monitor = rendered.one("ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    metrics_service = next(s for s in rendered.of_kind("Service") if s["metadata"]["name"].endswith("-metrics"))
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    pod_monitor = rendered.one("PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "finetune-trainer"}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}


def test_crd_is_templated_from_the_generated_copy_and_kept_on_uninstall(helm):
    import yaml

    crds = {crd["metadata"]["name"]: crd for crd in helm_template(helm).of_kind("CustomResourceDefinition")}
    # FineTuneRuns and the console's PreferenceLabels (human labels are data too: kept on uninstall).
    assert set(crds) == {"finetuneruns.finetune.dev", "preferencelabels.finetune.dev"}
    for name, crd in crds.items():
        generated = yaml.safe_load((CHART / "files" / "crds" / f"{name}.yaml").read_text())
        assert crd["spec"] == generated["spec"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not helm_template(helm, set_values={"crds.install": False}).of_kind("CustomResourceDefinition")


@pytest.mark.parametrize(
    ("set_values", "message"),
    [
        ({"replicas": "two"}, "replicas"),
        ({"replicas": -1}, "replicas"),
        ({"rbac.scope": "everything"}, "rbac"),
        ({"webhook.failurePolicy": "Sometimes"}, "failurePolicy"),
        ({"webhook.url": "http://127.0.0.1:9443"}, "url"),
        ({"metrics.port": 70000}, "port"),
        ({"unknownValue": 1}, "unknownValue"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"rbac.scope": "namespace"}, "rbac.scope=namespace needs watchNamespaces"),
        ({"webhook.certificate.existingSecret": "tls"}, "needs webhook.certificate.caBundle"),
        ({"webhook.certificate.caBundle": "eA=="}, "only used with webhook.certificate.existingSecret"),
        ({"liveness.port": 8080}, "must differ"),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_value(helm, set_values, message):
    rendered = helm_template(helm, set_values=set_values)
    assert rendered.returncode != 0
    assert message in rendered.stderr, rendered.stderr


def test_webhook_path_matches_the_operators_validating_handler():
    # kopf serves an admission handler at /<id>; the chart hard-codes the path.
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    path = re.search(r'define "finetune-operator.webhookPath" -}}\s*(\S+)', helpers).group(1)
    sources = "\n".join(p.read_text() for p in (REPO / "operator" / "ftoperator").glob("*.py"))
    assert "on.validate" in sources, "the operator has no @kopf.on.validate handler yet"
    assert re.search(rf"""id\s*=\s*["']{re.escape(path.lstrip('/'))}["']""", sources) or \
        re.search(rf"""["']{re.escape(path.lstrip('/'))}["']""", sources), \
        f"chart calls {path} but no handler id {path.lstrip('/')!r} in operator/"
