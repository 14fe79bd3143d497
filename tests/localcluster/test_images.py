"""Images for the local node: names, the cache key, what the built images hold, import into containerd.

The tests of built images call `images.build_images()` (cached under
`paths.cache_root()/"images"`; the first build takes several minutes) and read
the docker-archives it returns: their config and the files of their layers.
The import test runs a throwaway containerd of its own (root, state and socket
in a temporary folder, no CRI plugin) and stops it afterwards.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

from localcluster import images, polling

REPO = images.REPO
DIST_PACKAGES = "usr/local/lib/python3.11/dist-packages"


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

def test_image_names_are_the_ones_the_chart_and_examples_use():
    chart = yaml.safe_load((images.CHART / "Chart.yaml").read_text())
    assert images.TRAINER_IMAGE == f"ghcr.io/finetune-dev/finetune-trainer:{chart['appVersion']}"
    assert images.OPERATOR_IMAGE == f"ghcr.io/finetune-dev/finetune-operator:{chart['appVersion']}"
    example = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    assert example["spec"]["image"] == images.TRAINER_IMAGE


def test_an_explicit_chart_tag_wins_over_the_app_version(tmp_path):
    (tmp_path / "Chart.yaml").write_text('appVersion: "1.2.3"\n')
    (tmp_path / "values.yaml").write_text(
        "image: {repository: r/op, tag: ''}\ntrainer: {image: {repository: r/tr, tag: special}}\n"
    )
    assert images.chart_image_references(tmp_path) == {"trainer": "r/tr:special", "operator": "r/op:1.2.3"}


# ---------------------------------------------------------------------------
# Cache key
# ---------------------------------------------------------------------------

def fake_repo(root: pathlib.Path) -> pathlib.Path:
    files = {
        "Dockerfile": "FROM x\n", "pyproject.toml": "[project]\n", "README.md": "readme\n",
        "trainer/config.py": "A = 1\n", "operator/ftoperator/handlers.py": "B = 1\n",
        "hack/localcluster/paths.py": "C = 1\n", "docker/trainer-entrypoint.sh": "#!/bin/sh\n",
        "docker/wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl": "wheel bytes",
        "examples/tiny.yaml": "kind: FineTuneRun\n", "docs/deploy.md": "# deploy\n",
        "tests/test_x.py": "def test(): pass\n", "hack/setup.sh": "#!/bin/sh\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def key_of(repo: pathlib.Path, **overrides) -> str:
    arguments = {"context": images.context_hash(repo), "base": "b" * 64, "target": "trainer",
                 "build_args": {"TORCH_WHEEL": "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"}}
    return images.image_inputs_hash(**{**arguments, **overrides})


@pytest.mark.parametrize("changed", [
    "trainer/config.py", "operator/ftoperator/handlers.py", "hack/localcluster/paths.py",
    "Dockerfile", "pyproject.toml", "README.md", "docker/trainer-entrypoint.sh", "trainer/new_module.py",
])
def test_the_key_changes_when_a_file_of_the_build_context_changes(tmp_path, changed):
    repo = fake_repo(tmp_path)
    before = key_of(repo)
    (repo / changed).write_text((repo / changed).read_text() + "# edited\n" if (repo / changed).exists() else "x\n")
    assert key_of(repo) != before


@pytest.mark.parametrize("changed", [
    "examples/tiny.yaml", "docs/deploy.md", "tests/test_x.py", "hack/setup.sh",
    "trainer/__pycache__/config.cpython-311.pyc", "finetune_operator.egg-info/PKG-INFO",
    # the wheel is named by a build argument instead of hashed (200 MB)
    "docker/wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl",
])
def test_the_key_ignores_files_outside_the_build_context(tmp_path, changed):
    repo = fake_repo(tmp_path)
    before = key_of(repo)
    (repo / changed).parent.mkdir(parents=True, exist_ok=True)
    (repo / changed).write_text("something else\n")
    assert key_of(repo) == before


def test_the_key_changes_with_the_executable_bit_of_a_context_file(tmp_path):
    repo = fake_repo(tmp_path)
    before = key_of(repo)
    os.chmod(repo / "docker/trainer-entrypoint.sh", 0o755)
    assert key_of(repo) != before


def test_the_key_changes_with_base_target_and_build_arguments(tmp_path):
    repo = fake_repo(tmp_path)
    before = key_of(repo)
    assert key_of(repo, base="c" * 64) != before
    assert key_of(repo, target="operator") != before
    assert key_of(repo, build_args={"TORCH_WHEEL": "torch-2.14.0+cpu-cp311-cp311-linux_x86_64.whl"}) != before


def test_the_base_key_follows_its_recipe_and_mirror():
    before = images.base_inputs_hash(images.BASE_RECIPE, mirror="http://deb.debian.org/debian")
    assert images.base_inputs_hash(images.BASE_RECIPE, mirror="http://deb.debian.org/debian") == before
    assert images.base_inputs_hash(images.BASE_RECIPE, mirror="http://snapshot.debian.org/x") != before
    more = {**images.BASE_RECIPE, "packages": [*images.BASE_RECIPE["packages"], "curl"]}
    assert images.base_inputs_hash(more, mirror="http://deb.debian.org/debian") != before


# ---------------------------------------------------------------------------
# Dockerfile helpers
# ---------------------------------------------------------------------------

def project_requirements(tmp_path, pyproject: str, *extras: str) -> subprocess.CompletedProcess:
    (tmp_path / "pyproject.toml").write_text(pyproject)
    return subprocess.run([sys.executable, str(REPO / "docker" / "project-requirements.py"), *extras],
                          cwd=tmp_path, capture_output=True, text=True)


def test_project_requirements_lists_the_dependencies_and_the_extra(tmp_path):
    result = project_requirements(tmp_path, (REPO / "pyproject.toml").read_text(), "operator")
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("\n")
    assert "kopf>=1.45" in listed and "pydantic>=2.8,<3" in listed
    assert not any(line.startswith(("torch", "transformers")) for line in listed)


def test_project_requirements_refuses_an_extra_that_names_the_project(tmp_path):
    result = project_requirements(tmp_path, (REPO / "pyproject.toml").read_text(), "dev")
    assert result.returncode != 0 and "requires the project itself" in result.stderr


def test_the_public_build_keeps_its_python_image_and_pypi_torch():
    dockerfile = images.DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", dockerfile, re.M)
    assert re.search(r'^ARG TORCH_WHEEL=""$', dockerfile, re.M)
    # Without TORCH_WHEEL the trainer installs PyPI's torch of TORCH_VERSION.
    assert 'else pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"' in dockerfile
    assert (REPO / "docker" / "wheels" / "README.md").is_file(), "the trainer target bind-mounts docker/wheels"


# ---------------------------------------------------------------------------
# Built images (read from the archives)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def archives(tmp_path_factory):
    """{"trainer": archive, "operator": archive}: hard links to what build_images() returned.

    Other sessions on this machine may rebuild (and replace) the archives while
    these tests read them; builds hold `build_lock`, so an archive and its
    record taken together under it belong together.
    """
    built = images.build_images()
    assert built == [images.archive_path("trainer"), images.archive_path("operator")]
    snapshot = tmp_path_factory.mktemp("archives")
    with images.build_lock():
        for archive in built:
            os.link(archive, snapshot / archive.name)
            shutil.copy(archive.with_suffix(".json"), snapshot / archive.with_suffix(".json").name)
    yield {"trainer": snapshot / "trainer.tar", "operator": snapshot / "operator.tar"}
    shutil.rmtree(snapshot)


def archive_config(archive: pathlib.Path) -> dict:
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))[0]
        return json.load(tar.extractfile(manifest["Config"]))


def archive_files(archive: pathlib.Path) -> set:
    """Paths of the image's file system: its layers applied in order, whiteouts honoured."""
    found: set = set()
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))[0]
        for layer in manifest["Layers"]:
            with tarfile.open(fileobj=tar.extractfile(layer), mode="r|*") as layer_tar:
                for member in layer_tar:
                    path = member.name.removeprefix("./").rstrip("/")
                    directory, name = os.path.split(path)
                    if name == ".wh..wh..opq":
                        found = {p for p in found if not p.startswith(directory + "/")}
                    elif name.startswith(".wh."):
                        hidden = os.path.join(directory, name[len(".wh."):])
                        found = {p for p in found if p != hidden and not p.startswith(hidden + "/")}
                    else:
                        found.add(path)
    return found


@pytest.fixture(scope="session")
def trainer_files(archives) -> set:
    return archive_files(archives["trainer"])


@pytest.fixture(scope="session")
def operator_files(archives) -> set:
    return archive_files(archives["operator"])


def dockerfile_instruction(target: str, instruction: str):
    """The last INSTRUCTION's JSON argument in a Dockerfile stage."""
    stage = re.split(r"^FROM\s+", images.DOCKERFILE.read_text(), flags=re.M)
    text = next(part for part in stage if re.match(rf"\S+\s+AS\s+{target}\b", part, re.I))
    return json.loads(re.findall(rf"^{instruction}\s+(\[.*\])\s*$", text, re.M)[-1])


def test_the_trainer_image_runs_as_65532_with_the_dockerfile_entrypoint(archives):
    config = archive_config(archives["trainer"])["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == dockerfile_instruction("trainer", "ENTRYPOINT")
    assert config["Entrypoint"] == ["/usr/local/bin/trainer-entrypoint"]
    assert config["WorkingDir"] == "/tmp"
    assert "PIP_BREAK_SYSTEM_PACKAGES=1" in config["Env"]


def test_the_operator_image_runs_as_65532_with_the_dockerfile_entrypoint(archives):
    config = archive_config(archives["operator"])["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == dockerfile_instruction("operator", "ENTRYPOINT") == ["python", "-m", "ftoperator"]


def test_the_images_carry_their_reference_and_inputs_hash(archives):
    for name, reference in (("trainer", images.TRAINER_IMAGE), ("operator", images.OPERATOR_IMAGE)):
        record = images.read_record(archives[name])
        manifest = images.archive_manifest(archives[name])
        assert record["reference"] == reference and manifest["references"] == [reference]
        assert record["config_digest"] == manifest["config_digest"]
        labels = archive_config(archives[name])["config"]["Labels"]
        assert labels[images.HASH_LABEL] == record["inputs_hash"]


def test_the_trainer_image_has_the_project_and_the_cpu_torch_wheel(trainer_files):
    version = images.dockerfile_torch_version(images.DOCKERFILE.read_text())
    assert f"{DIST_PACKAGES}/torch-{version}+cpu.dist-info/METADATA" in trainer_files
    assert f"{DIST_PACKAGES}/torch/__init__.py" in trainer_files
    # No CUDA runtime wheels: PyPI's CUDA torch would have pulled nvidia-* wheels.
    assert not any(p.startswith(f"{DIST_PACKAGES}/nvidia") for p in trainer_files)
    for module in ("trainer/config.py", "trainer/ppo.py", "ftoperator/builders.py", "transformers/__init__.py"):
        assert f"{DIST_PACKAGES}/{module}" in trainer_files, module
    assert any(re.fullmatch(rf"{DIST_PACKAGES}/finetune_operator-[\w.]+\.dist-info/METADATA", p) for p in trainer_files)
    assert "usr/local/bin/trainer-entrypoint" in trainer_files
    assert "usr/local/bin/accelerate" in trainer_files
    # The wheel was only mounted for the install, never copied into a layer.
    assert not any(p.endswith(".whl") and "torch" in p for p in trainer_files)


def test_the_operator_image_has_the_project_and_no_training_stack(operator_files):
    for module in ("ftoperator/__main__.py", "trainer/config.py", "kopf/__init__.py"):
        assert f"{DIST_PACKAGES}/{module}" in operator_files, module
    for package in ("torch", "transformers", "accelerate", "peft"):
        assert not any(p.startswith(f"{DIST_PACKAGES}/{package}/") for p in operator_files), package


def current_hashes() -> list:
    return [plan["inputs_hash"] for plan in images.image_plans()]


def test_a_second_build_without_changes_reuses_the_archives(capsys):
    # Others may edit the tree meanwhile, and an edit rightly makes the next call
    # rebuild: so retry until the inputs held still across one whole call.
    for _attempt in range(5):
        built = images.build_images()
        hashes = current_hashes()
        if hashes != [images.read_record(archive)["inputs_hash"] for archive in built]:
            continue  # edited while that build ran
        before = [archive.stat().st_mtime_ns for archive in built]
        capsys.readouterr()
        lines = []
        again = images.build_images(log=lines.append)
        if current_hashes() != hashes:
            continue  # edited during this call
        assert again == built == [images.archive_path("trainer"), images.archive_path("operator")]
        assert [archive.stat().st_mtime_ns for archive in again] == before
        assert sum(" cached: " in line for line in lines) == 2, lines
        steps = capsys.readouterr().out  # build.step prints each step it starts
        assert "build trainer image" not in steps and "build operator image" not in steps
        return
    pytest.fail("the build context changed during each of 5 attempts")


# ---------------------------------------------------------------------------
# Import into a throwaway containerd
# ---------------------------------------------------------------------------

@pytest.fixture
def containerd(tmp_path_factory):
    """Address of a containerd of this test's own (not the system's); stopped and removed afterwards."""
    root = tmp_path_factory.mktemp("containerd")
    address = str(root / "containerd.sock")
    config = root / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{root / "root"}"\n'
        f'state = "{root / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{address}"\n'
        f'[ttrpc]\n  address = "{address}.ttrpc"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{root / "opt"}"\n'
    )
    with open(root / "containerd.log", "wb") as log:
        process = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)

    def ready():
        if process.poll() is not None:
            return "exited"
        return subprocess.run(["ctr", "--address", address, "version"], capture_output=True).returncode == 0

    try:
        if polling.wait_for(ready, timeout=60, what=f"containerd at {address}") == "exited":
            raise RuntimeError(f"containerd exited: {(root / 'containerd.log').read_text()[-2000:]}")
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)
        assert not images.mounts_below(root), images.mounts_below(root)
        shutil.rmtree(root)


def containerd_images(address: str) -> dict:
    """{reference: config digest} of the images in containerd's k8s.io namespace."""
    listing = subprocess.run(["ctr", "--address", address, "-n", "k8s.io", "images", "list", "-q"],
                             capture_output=True, text=True, check=True).stdout.split()
    return {ref: images.containerd_config_digest(ref, containerd_address=address) for ref in listing}


def test_import_puts_both_images_into_k8s_io_and_skips_them_the_second_time(archives, containerd, capsys):
    archive_list = [archives["trainer"], archives["operator"]]
    images.import_images(archive_list, containerd_address=containerd)
    present = containerd_images(containerd)
    for archive in archive_list:
        record = images.read_record(archive)
        assert present[record["reference"]] == record["config_digest"]
    # Unpacked for the default snapshotter, as the kubelet's CRI needs them.
    snapshots = subprocess.run(["ctr", "--address", containerd, "-n", "k8s.io", "snapshots", "list"],
                               capture_output=True, text=True, check=True).stdout
    assert len(snapshots.splitlines()) > 1
    capsys.readouterr()

    images.import_images(archive_list, containerd_address=containerd)
    out = capsys.readouterr().out
    assert out.count("already in containerd") == 2 and "import trainer.tar" not in out
