"""The chart's copies stay in step with their sources (hack/chart_sync.py --check)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from chartlib import CHART, REPO

sys.path.insert(0, str(REPO / "hack"))
import chart_sync  # noqa: E402


def test_chart_crd_copy_matches_the_generated_crds():
    sources = sorted((REPO / "crds").glob("*.yaml"))
    assert sources, "crds/ is empty: generate the CRD (python -m ftoperator.crdgen) first"
    copies = sorted((CHART / "files" / "crds").glob("*.yaml"))
    assert [p.name for p in copies] == [p.name for p in sources], "run: python hack/chart_sync.py"
    for source, copy in zip(sources, copies):
        assert copy.read_text() == source.read_text(), f"{copy} drifted from {source}: run python hack/chart_sync.py"


def test_chart_readme_values_table_is_current():
    readme = chart_sync.README.read_text()
    fresh = chart_sync.readme_with_table(readme, chart_sync.values_table((CHART / "values.yaml").read_text()))
    assert fresh == readme, "charts/finetune-operator/README.md is stale: run python hack/chart_sync.py"


def test_every_value_is_documented_and_listed():
    documented = {v.key for v in chart_sync.documented_values((CHART / "values.yaml").read_text())}
    assert {"replicas", "rbac.scope", "webhook.url", "monitoring.podMonitor.enabled"} <= documented
    assert all(v.description for v in chart_sync.documented_values((CHART / "values.yaml").read_text()))


def test_an_undocumented_value_is_an_error_naming_it():
    text = "webhook:\n  # -- documented\n  enabled: true\n  port: 9443\n"
    with pytest.raises(chart_sync.ValuesDocError, match=r"line 4: webhook.port"):
        chart_sync.documented_values(text)


def test_sync_check_mode_exits_zero_when_current():
    result = subprocess.run([sys.executable, str(REPO / "hack" / "chart_sync.py"), "--check"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
