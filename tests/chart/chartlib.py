"""Helpers of the chart tests: paths, and `helm template` parsed into documents.

Imported by the test modules as ``chartlib`` (tests/chart/conftest.py puts this
folder on sys.path; pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "ft"
NAMESPACE = "finetune-system"


@dataclass
class Rendered:
    """A `helm template` result: the exit status, stderr and the parsed documents."""

    returncode: int
    stderr: str
    docs: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}: {[d['metadata']['name'] for d in found]}"
        return found[0]


def helm_template(helm: str, *, values_files=(), set_values: dict | None = None,
                  namespace: str = NAMESPACE, kube_version: str | None = None,
                  api_versions=(), console: bool = False) -> Rendered:
    """Run `helm template` on the chart; never raises on a failed render.

    The console (on by default in the chart) is left out unless ``console`` is true: these
    tests are about the operator's objects; tests/console/test_chart.py renders the console."""
    if not console:
        set_values = {"console.enabled": False, **(set_values or {})}
    args = [helm, "template", RELEASE, str(CHART), "--namespace", namespace]
    for path in values_files:
        args += ["--values", str(path)]
    for key, value in (set_values or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    if kube_version:
        args += ["--kube-version", kube_version]
    for api_version in api_versions:
        args += ["--api-versions", api_version]
    result = subprocess.run(args, capture_output=True, text=True)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d] if result.returncode == 0 else []
    return Rendered(result.returncode, result.stderr, docs)
