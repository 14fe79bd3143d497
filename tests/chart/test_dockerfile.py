"""The Dockerfile builds what the dev environment tests (no docker here: static checks + an import test)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from chartlib import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
SETUP = (REPO / "hack" / "setup.sh").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

sys.path.insert(0, str(REPO / "docker"))
import operator_requirements  # noqa: E402


def stages() -> dict[str, str]:
    """{stage name: its Dockerfile text}."""
    parts = re.split(r"^FROM\s+", DOCKERFILE, flags=re.M)[1:]
    result = {}
    for part in parts:
        header = part.splitlines()[0]
        match = re.search(r"\s+AS\s+(\S+)", header, re.I)
        result[match.group(1) if match else header] = part
    return result


def project_installs(text: str) -> list[str]:
    """Extras of every `pip install [-e] ".[extras]"` / `pip install .` of the project, "" for none."""
    found = []
    for match in re.finditer(r"pip install\b[^\n]*?\s[\"']?\.(\[([\w,-]+)\])?[\"']?(\s|$)", text):
        found.append(match.group(2) or "")
    return found


def test_both_targets_exist():
    assert {"trainer", "operator"} <= set(stages())


def test_base_images_are_pinned_by_version():
    images = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", DOCKERFILE, re.M)
    images += [line.split()[1] for line in DOCKERFILE.splitlines()
               if line.startswith("FROM ") and not line.split()[1].startswith(("$", "base"))]
    assert images, "no base image found"
    for image in images:
        assert ":" in image and not image.endswith(":latest"), f"{image} is not pinned"
        assert re.search(r":\d+\.\d+\.\d+", image), f"{image}: pin the full version"


def test_every_target_runs_as_a_numeric_non_root_user():
    for name in ("trainer", "operator"):
        users = re.findall(r"^USER\s+(\S+)", stages()[name], re.M)
        assert users, f"target {name} has no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"target {name}: USER {users[-1]} (runAsNonRoot needs a numeric uid)"


def test_torch_in_the_trainer_image_is_the_version_setup_sh_tests_with():
    dev_pin = re.search(r"torch==([\w.+]+)", SETUP).group(1)
    image_pin = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE).group(1)
    assert image_pin == dev_pin.split("+")[0]


def test_images_install_the_project_with_extras_the_dev_install_includes():
    dev_installs = project_installs(SETUP)
    assert dev_installs == ["dev"], f"hack/setup.sh installs the project with {dev_installs}"
    dev_extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["dev"])
    image_extras = {e for e in project_installs(DOCKERFILE) for e in e.split(",") if e}
    # The operator image installs the operator extra's requirements via operator_requirements.py.
    image_extras.add("operator")
    for extra in image_extras:
        assert extra in PYPROJECT["project"]["optional-dependencies"], f"unknown extra {extra}"
        assert f"[{extra}]" in dev_extra, f"the dev install does not include extra {extra!r} used by an image"
    assert "pip install . " in DOCKERFILE or "pip install .\n" in DOCKERFILE


def test_operator_requirements_exclude_the_training_stack():
    names = {operator_requirements.distribution_name(r)
             for r in operator_requirements.operator_requirements(PYPROJECT)}
    assert "kopf" in names and "pydantic" in names and "kubernetes" in names
    assert not names & operator_requirements.TRAINER_ONLY
    assert "finetune-operator" not in names
    # Every trainer-only name really is a base dependency (the list is not stale).
    base = {operator_requirements.distribution_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert operator_requirements.TRAINER_ONLY <= base


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in the operator image")
sys.meta_path.insert(0, Block())
import ftoperator.__main__
"""


def test_operator_imports_without_the_training_stack():
    # What the operator image lacks: the trainer-only distributions' import names.
    blocked = {"torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors"}
    result = subprocess.run([sys.executable, "-P", "-c", BLOCKER.format(blocked=sorted(blocked))],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]


def test_trainer_entrypoint_uses_accelerate_only_for_several_processes():
    script = (REPO / "docker" / "trainer-entrypoint.sh").read_text()
    assert 'exec python -m trainer "$@"' in script
    assert "accelerate launch" in script and '--num_processes "$NUM_PROCESSES"' in script
    assert "ENTRYPOINT [\"/usr/local/bin/trainer-entrypoint\"]" in DOCKERFILE


def test_dockerignore_keeps_what_pip_install_needs():
    ignore = (REPO / ".dockerignore").read_text()
    for path in ("pyproject.toml", "README.md", "trainer/", "operator/", "hack/localcluster/", "docker/"):
        assert f"!{path}" in ignore
    packages = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    kept = ("trainer/", "operator/", "hack/localcluster/")
    assert all(f"{p}/".startswith(kept) for p in packages), packages
