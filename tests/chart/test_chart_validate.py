"""The API server accepts what the chart renders: `kubectl apply --dry-run=server` on the local cluster.

This is real validation, not a schema copy: the local control plane's
kube-apiserver (1.20) checks every object (types, required fields, RBAC rule
shape, webhook configuration, the CRD's structural schema), and kubectl
validates field names against the server's OpenAPI document (--validate=strict
falls back to that on a 1.20 server). ServiceMonitor and PodMonitor need the
Prometheus Operator CRDs: reduced copies from fixtures/ are installed first.
"""

from __future__ import annotations

import subprocess

import pytest
from chartlib import CHART, CI_VALUES, NAMESPACE, RELEASE

from localcluster.polling import wait_for_crd

pytestmark = pytest.mark.cluster

FIXTURES = CHART.parents[1] / "tests" / "chart" / "fixtures"


@pytest.fixture(scope="module")
def dry_run_cluster(kube_cluster):
    for namespace in (NAMESPACE, "team-a", "team-b"):
        kube_cluster.kubectl("create", "namespace", namespace, check=False)
    kube_cluster.kubectl("apply", "-f", str(FIXTURES / "monitoring-crds.yaml"))
    wait_for_crd(kube_cluster, "servicemonitors.monitoring.coreos.com", "podmonitors.monitoring.coreos.com")
    return kube_cluster


def render_for(cluster, values_file) -> str:
    args = [cluster.helm_path, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--kube-version", "1.20.2"]
    if values_file:
        args += ["--values", str(values_file)]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("values_file", [None, *CI_VALUES],
                         ids=["default", *[p.name.removesuffix("-values.yaml") for p in CI_VALUES]])
def test_api_server_accepts_every_rendered_object(dry_run_cluster, values_file):
    manifest = render_for(dry_run_cluster, values_file)
    result = dry_run_cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                                     input=manifest, check=False)
    assert result.returncode == 0, result.stderr
    assert "created (server dry run)" in result.stdout


def test_api_server_rejects_a_mistyped_field(dry_run_cluster):
    # Guards the guard: the dry run above would catch a typo in a template.
    manifest = render_for(dry_run_cluster, None).replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:")
    result = dry_run_cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                                     input=manifest, check=False)
    assert result.returncode != 0
    assert "readOnlyRootFileSystem" in result.stderr
