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
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# Distributions of the GPU training stack: in the `train` extra, never in the operator image.
TRAINING_STACK = {"torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors",
                  "gguf", "pyarrow"}  # GGUF model sources and Parquet datasets are read by the trainer only


def distribution_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def self_extras(requirements: list[str]) -> set[str]:
    """Extras an extra pulls in by naming the project itself ("finetune-operator[a,b]")."""
    name = distribution_name(PYPROJECT["project"]["name"])
    found = set()
    for requirement in requirements:
        match = re.match(r"\s*([\w.-]+)\[([\w,\s-]+)\]", requirement)
        if match and distribution_name(match.group(1)) == name:
            found |= {e.strip() for e in match.group(2).split(",")}
    return found


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


def test_each_image_installs_the_project_with_its_own_extra():
    targets = stages()
    assert project_installs(targets["trainer"]) == ["train"]
    assert project_installs(targets["operator"]) == ["operator"]
    # The CUDA torch is installed before the project, so the train extra's range keeps it.
    trainer = targets["trainer"]
    assert trainer.index('"torch==${TORCH_VERSION}"') < trainer.index('pip install ".[train]"')


def test_the_dev_install_includes_every_extra_an_image_installs():
    dev_installs = project_installs(SETUP)
    assert dev_installs == ["dev"], f"hack/setup.sh installs the project with {dev_installs}"
    image_extras = {e for e in project_installs(DOCKERFILE) for e in e.split(",") if e}
    assert image_extras == {"train", "operator"}
    for extra in image_extras:
        assert extra in EXTRAS, f"unknown extra {extra}"
    assert image_extras <= self_extras(EXTRAS["dev"]), "the dev extra must include every extra an image installs"


def test_the_training_stack_is_only_in_the_train_extra():
    base = {distribution_name(r) for r in PYPROJECT["project"]["dependencies"]}
    operator = {distribution_name(r) for r in EXTRAS["operator"]}
    train = {distribution_name(r) for r in EXTRAS["train"]}
    assert {"pydantic", "pyyaml", "kubernetes", "prometheus-client"} <= base
    assert "kopf" in operator
    assert TRAINING_STACK == train
    assert not TRAINING_STACK & (base | operator)
    assert not self_extras(EXTRAS["operator"]), "the operator extra must not pull in other extras"


def test_setup_sh_pins_torch_before_installing_the_train_extra():
    # Otherwise pip would resolve torch itself and pull CUDA wheels on a CPU machine.
    assert SETUP.index("torch==") < SETUP.index('-e ".[dev]"')


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
    # What the operator image lacks (these distributions import under their own names).
    result = subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=sorted(TRAINING_STACK))],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]


def test_trainer_entrypoint_uses_accelerate_only_for_several_processes():
    script = (REPO / "docker" / "trainer-entrypoint.sh").read_text()
    assert 'exec python -m trainer "$@"' in script
    assert "accelerate launch" in script and '--num_processes "$NUM_PROCESSES"' in script
    assert "ENTRYPOINT [\"/usr/local/bin/trainer-entrypoint\"]" in DOCKERFILE


def test_dockerignore_keeps_what_pip_install_needs():
    ignore = (REPO / ".dockerignore").read_text()
    for path in ("pyproject.toml", "README.md", "trainer/", "operator/", "console/", "hack/localcluster/", "docker/"):
        assert f"!{path}" in ignore
    packages = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    kept = ("trainer/", "operator/", "console/", "hack/localcluster/")
    assert all(f"{p}/".startswith(kept) for p in packages), packages
