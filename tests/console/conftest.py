"""tests/console: the fake cluster (fakes.py) and the chart helpers (tests/chart/chartlib.py) importable."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "chart"))


@pytest.fixture(scope="session")
def helm() -> str:
    from localcluster import tools

    return str(tools.helm_path())


@pytest.fixture
def browser():
    """Headless chromium (browserlib.chromium), shared by the fake-cluster and the real-cluster browser tests."""
    from browserlib import chromium

    with chromium() as driver:
        yield driver
