"""Build the trainer and operator images on this machine, cached, for the local node.

No Docker and no registry here, so (as root, on Debian bookworm):

1. base image: `debootstrap` a minimal bookworm (python3 3.11, pip, `python` on
   PATH, ca-certificates) and commit it with buildah as
   `localhost/finetune-base:<hash>`. It stands in for python:*-slim-bookworm
   (the Dockerfile's PYTHON_IMAGE build argument).
2. torch: the CPU wheel of the Dockerfile's TORCH_VERSION is copied from pip's
   local wheels (PIP_FIND_LINKS) or downloaded from PyTorch's CPU index into
   docker/wheels/ (git-ignored); TORCH_WHEEL tells the Dockerfile to install it.
3. `buildah bud --layers` of the Dockerfile's `trainer` and `operator` targets,
   tagged with the names the chart uses (`TRAINER_IMAGE`, `OPERATOR_IMAGE`),
   labelled with their inputs hash. pip inside the build reaches PyPI through
   the host's network with the host's CA bundle mounted over the image's for
   the build only (it may hold a proxy's CA that Debian's ca-certificates lack).
4. Each image is exported as a docker-archive tar under
   `paths.cache_root()/"images"` with a JSON file naming its inputs hash.

An image whose inputs hash (see `image_inputs_hash`) matches its archive's is not
rebuilt, so a second `build_images()` takes seconds. `import_images()` puts the
archives into a containerd's `k8s.io` namespace, where the kubelet's CRI finds
them, skipping an image that containerd already holds with the same config digest.

Output: one timestamped line per step (`build.step`); a failure raises
`build.BuildError` naming the step.

    python hack/localcluster/images.py [--containerd-address ADDR]
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import yaml

from localcluster import paths
from localcluster.build import BuildError, debian_mirror_uri, run, step

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "charts" / "finetune-operator"
WHEELS_DIR = REPO / "docker" / "wheels"
# What the build context holds (.dockerignore keeps the same paths): a change
# under any of them can change an image.
CONTEXT_PATHS = ("Dockerfile", "pyproject.toml", "README.md", "trainer", "operator", "console", "hack/localcluster",
                 "docker")
# Never copied into an image (.dockerignore) or only named by a build argument
# (the wheels, whose file names go into the hash instead).
IGNORED_PARTS = ("__pycache__",)
IGNORED_SUFFIXES = (".pyc", ".whl")
IGNORED_DIR_SUFFIXES = (".egg-info",)
# The image label that carries the inputs hash.
HASH_LABEL = "dev.finetune.inputs-hash"
# The host's CA bundle (pip on the host uses it too); mounted over the image's
# during RUN steps only.
HOST_CA_BUNDLE = pathlib.Path("/etc/ssl/certs/ca-certificates.crt")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CONTAINERD_NAMESPACE = "k8s.io"

# Everything the base image is made of; its hash names the base image.
BASE_RECIPE = {
    "suite": "bookworm",
    "variant": "minbase",
    # passwd (groupadd/useradd) is in every debootstrap (priority required);
    # python-is-python3 gives `python`, python3-pip gives `pip`.
    "packages": ["python3", "python3-pip", "python-is-python3", "ca-certificates"],
    # Removed after debootstrap: package caches (93 MB), logs, translations and
    # manuals (40 MB), the host's resolver and hostname (the runtime provides
    # them) and device nodes (the runtime mounts /dev).
    "remove": [
        "dev/*", "etc/resolv.conf", "etc/hostname",
        "var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*", "var/log/*.log",
        "var/log/apt/*", "usr/share/locale/*/LC_MESSAGES", "usr/share/man/*", "usr/share/info/*",
    ],
    "env": {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        # Debian's python3 is "externally managed" (PEP 668): without this, pip
        # refuses to install into it. The image is single-purpose, so the
        # Debian-packaged Python modules cannot be broken by it in a way that matters.
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
    },
    "cmd": ["python3"],
}


def log_line(message: str, *, log=print) -> None:
    log(f"[localcluster images {time.strftime('%H:%M:%S')}] {message}")


# ---------------------------------------------------------------------------
# Names and hashes (pure, or reading only the repository)
# ---------------------------------------------------------------------------

def chart_image_references(chart_dir: pathlib.Path) -> dict:
    """{"trainer": ref, "operator": ref} as the chart's templates resolve them by default.

    The repositories come from values.yaml (`trainer.image`, `image`); an empty
    tag means the chart's appVersion, as in the chart.
    """
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    references = {}
    for name, image in (("trainer", values["trainer"]["image"]), ("operator", values["image"])):
        tag = image.get("tag") or chart["appVersion"]
        references[name] = f"{image['repository']}:{tag}"
    return references


_REFERENCES = chart_image_references(CHART)
TRAINER_IMAGE = _REFERENCES["trainer"]
OPERATOR_IMAGE = _REFERENCES["operator"]


def dockerfile_torch_version(dockerfile_text: str) -> str:
    """The Dockerfile's `ARG TORCH_VERSION=` default (the version the trainer image pins)."""
    match = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile_text, re.M)
    if not match:
        raise BuildError(f"{DOCKERFILE}: no `ARG TORCH_VERSION=...` line")
    return match.group(1)


def base_inputs_hash(recipe: dict, *, mirror: str) -> str:
    """Hash of everything the base image is made of (the recipe and the Debian mirror)."""
    document = json.dumps({"recipe": recipe, "mirror": mirror}, sort_keys=True)
    return hashlib.sha256(document.encode()).hexdigest()


def _is_context_file(relative: pathlib.PurePath) -> bool:
    if any(part in IGNORED_PARTS or part.endswith(IGNORED_DIR_SUFFIXES) for part in relative.parts):
        return False
    return not relative.name.endswith(IGNORED_SUFFIXES)


def context_files(repo: pathlib.Path) -> list:
    """The files under CONTEXT_PATHS that can end up in an image, sorted, relative to repo."""
    found = []
    for top in CONTEXT_PATHS:
        path = repo / top
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found += [p.relative_to(repo) for p in candidates if _is_context_file(p.relative_to(repo))]
    return sorted(found)


def context_hash(repo: pathlib.Path) -> str:
    """Hash of the names, contents and executable bits of `context_files(repo)`."""
    digest = hashlib.sha256()
    for relative in context_files(repo):
        path = repo / relative
        digest.update(f"{relative.as_posix()}\0{os.access(path, os.X_OK)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def image_inputs_hash(*, context: str, base: str, target: str, build_args: dict) -> str:
    """Hash naming one image: build context, base image, Dockerfile target, build arguments.

    `build_args` are the arguments that change the image's content (e.g. the
    torch wheel's file name), not machine details such as where the CA bundle is.
    """
    document = json.dumps(
        {"context": context, "base": base, "target": target, "build_args": build_args}, sort_keys=True
    )
    return hashlib.sha256(document.encode()).hexdigest()


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def _output(cmd, **kwargs) -> str:
    """stdout of cmd; BuildError with its stderr if it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise BuildError(f"command {' '.join(map(str, cmd))} exited with {result.returncode}: "
                         f"{result.stderr.strip()[-2000:]}")
    return result.stdout


def buildah_image_exists(reference: str) -> bool:
    probe = subprocess.run(["buildah", "inspect", "--type", "image", reference], capture_output=True)
    return probe.returncode == 0


def images_dir() -> pathlib.Path:
    return paths.cache_root() / "images"


def _require_root_and_tools(tools) -> None:
    if os.geteuid() != 0:
        raise BuildError("building images needs root (debootstrap, buildah, ctr); run as root")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise BuildError(f"{', '.join(missing)} not found: run `python -m localcluster build` "
                         "(it installs the Debian packages)")


# ---------------------------------------------------------------------------
# Base image
# ---------------------------------------------------------------------------

def base_reference(base_hash: str) -> str:
    return f"localhost/finetune-base:{base_hash[:16]}"


def _remove_globs(rootfs: pathlib.Path, patterns) -> None:
    for pattern in patterns:
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def mounts_below(directory: pathlib.Path) -> list:
    """Mount points at or below directory, deepest first (from /proc/self/mounts)."""
    root = os.path.realpath(directory)
    found = []
    for line in pathlib.Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].encode().decode("unicode_escape")  # "\040" for spaces
        if point == root or point.startswith(root + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_rootfs(rootfs: pathlib.Path) -> None:
    """Unmount what debootstrap left mounted in rootfs (after a failure), then delete it.

    Refuses to delete while anything is still mounted there: that could be the
    host's /dev or /proc.
    """
    for point in mounts_below(rootfs):
        subprocess.run(["umount", point], capture_output=True)
    left = mounts_below(rootfs)
    if left:
        raise BuildError(f"still mounted inside {rootfs}: {left}; unmount them, then delete {rootfs}")
    shutil.rmtree(rootfs, ignore_errors=True)


def ensure_base_image(*, base_hash: str, mirror: str, log=print) -> str:
    """The base image's reference; debootstraps and commits it unless buildah has it."""
    reference = base_reference(base_hash)
    if buildah_image_exists(reference):
        log_line(f"base image {reference} already built", log=log)
        return reference
    images_dir().mkdir(parents=True, exist_ok=True)
    rootfs = pathlib.Path(tempfile.mkdtemp(dir=images_dir(), prefix="rootfs-"))
    try:
        with step(f"debootstrap {BASE_RECIPE['suite']} ({BASE_RECIPE['variant']}) from {mirror}"):
            run(["debootstrap", f"--variant={BASE_RECIPE['variant']}",
                 f"--include={','.join(BASE_RECIPE['packages'])}", "--components=main",
                 BASE_RECIPE["suite"], str(rootfs), mirror])
            if mounts_below(rootfs):
                raise BuildError(f"debootstrap left {mounts_below(rootfs)} mounted")
            _remove_globs(rootfs, BASE_RECIPE["remove"])
        with step(f"base image {reference}"):
            container = _output(["buildah", "from", "scratch"]).strip()
            try:
                mountpoint = _output(["buildah", "mount", container]).strip()
                run(["cp", "-a", f"{rootfs}/.", mountpoint])
                run(["buildah", "umount", container])
                config = ["buildah", "config", "--label", f"{HASH_LABEL}={base_hash}",
                          "--cmd", json.dumps(BASE_RECIPE["cmd"])]
                for name, value in BASE_RECIPE["env"].items():
                    config += ["--env", f"{name}={value}"]
                run([*config, container])
                run(["buildah", "commit", "--quiet", container, reference], stdout=subprocess.DEVNULL)
            finally:
                subprocess.run(["buildah", "rm", container], capture_output=True)
    finally:
        _remove_rootfs(rootfs)
    return reference


# ---------------------------------------------------------------------------
# torch wheel
# ---------------------------------------------------------------------------

# The base image's Python is bookworm's python3, 3.11: the wheel must be cp311.
def _is_cpu_wheel(name: str, version: str) -> bool:
    return name.startswith(f"torch-{version}+cpu-cp311-cp311-") and name.endswith(".whl")


def ensure_torch_wheel(*, version: str, log=print) -> str:
    """File name of the CPU torch wheel in docker/wheels/ (copied or downloaded there if missing).

    pip looks in its configured wheel folders only (PIP_FIND_LINKS, pip.conf)
    first, then in PyTorch's CPU index. Other wheels in the folder are removed.
    """
    present = [p.name for p in WHEELS_DIR.glob("*.whl") if _is_cpu_wheel(p.name, version)]
    if present:
        return present[0]
    requirement = f"torch=={version}+cpu"
    common = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--python-version", "3.11", "--dest"]
    with step(f"{requirement} wheel into {WHEELS_DIR}"):
        images_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=images_dir(), prefix="download-") as download:
            local = subprocess.run([*common, download, "--no-index", requirement], capture_output=True, text=True)
            if local.returncode != 0:
                log_line(f"no local {requirement} wheel, downloading from {TORCH_CPU_INDEX}", log=log)
                run([*common, download, "--index-url", TORCH_CPU_INDEX, requirement])
            wheels = [p for p in pathlib.Path(download).glob("*.whl") if _is_cpu_wheel(p.name, version)]
            if not wheels:
                raise BuildError(f"pip did not produce a {requirement} cp311 wheel; put one into {WHEELS_DIR}")
            for old in WHEELS_DIR.glob("*.whl"):
                old.unlink()
            shutil.move(wheels[0], WHEELS_DIR / wheels[0].name)
    return wheels[0].name


# ---------------------------------------------------------------------------
# Trainer and operator images
# ---------------------------------------------------------------------------

def archive_path(name: str) -> pathlib.Path:
    return images_dir() / f"{name}.tar"


def _record_path(archive: pathlib.Path) -> pathlib.Path:
    return archive.with_suffix(".json")


def read_record(archive: pathlib.Path):
    """The JSON written next to an archive ({reference, inputs_hash, config_digest}), None if absent."""
    try:
        return json.loads(_record_path(archive).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def archive_manifest(archive: pathlib.Path) -> dict:
    """{"references": [...], "config_digest": "sha256:..."} from a docker-archive's manifest.json."""
    with tarfile.open(archive, "r:") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    if len(manifest) != 1:
        raise BuildError(f"{archive}: expected one image in manifest.json, found {len(manifest)}")
    config_file = manifest[0]["Config"]  # "<sha256 hex>.json"
    return {"references": manifest[0].get("RepoTags") or [],
            "config_digest": "sha256:" + pathlib.PurePath(config_file).stem}


@contextlib.contextmanager
def build_lock(*, log=print):
    """Serialise builds on this machine (test sessions and the CLI may run at once)."""
    images_dir().mkdir(parents=True, exist_ok=True)
    with open(images_dir() / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log_line("waiting for another image build on this machine to finish", log=log)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_and_export(*, name: str, reference: str, inputs_hash: str, base: str, build_args: dict) -> pathlib.Path:
    """`buildah bud` one Dockerfile target, export it to archive_path(name), write its record."""
    unique = f"localhost/finetune-{name}:{inputs_hash[:16]}"
    id_file = images_dir() / f"{name}.image-id"
    with step(f"build {name} image {reference}"):
        cmd = ["buildah", "bud", "--layers", "--pull=never", "--isolation", "chroot", "--network", "host",
               "--volume", f"{HOST_CA_BUNDLE}:/etc/ssl/certs/ca-certificates.crt:ro",
               "--build-arg", f"PYTHON_IMAGE={base}",
               "--target", name, "--iidfile", str(id_file), "--file", str(DOCKERFILE)]
        for arg, value in build_args.items():
            cmd += ["--build-arg", f"{arg}={value}"]
        run([*cmd, str(REPO)])
        # The hash label is set in a commit of its own (an empty layer, well
        # under a second): buildah 1.28's layer cache ignores `bud --label`,
        # so an unchanged build would return its old image with the old label.
        container = _output(["buildah", "from", "--pull=never", id_file.read_text().strip()]).strip()
        try:
            run(["buildah", "config", "--label", f"{HASH_LABEL}={inputs_hash}", container])
            run(["buildah", "commit", "--quiet", "--iidfile", str(id_file), container, unique],
                stdout=subprocess.DEVNULL)
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)
        run(["buildah", "tag", unique, reference])
    archive = archive_path(name)
    with step(f"export {name} image to {archive}"):
        partial = archive.with_suffix(".tar.partial")
        partial.unlink(missing_ok=True)
        _record_path(archive).unlink(missing_ok=True)
        # Exported by the ID this build produced, so the archive holds exactly
        # that image even if `reference` has been re-tagged since, and is named
        # only `reference` (pushing by a name would add that name too).
        image_id = id_file.read_text().strip()
        run(["buildah", "push", "--quiet", image_id, f"docker-archive:{partial}:{reference}"])
        os.replace(partial, archive)
        record = {"reference": reference, "inputs_hash": inputs_hash, **archive_manifest(archive)}
        _record_path(archive).write_text(json.dumps(record, indent=2) + "\n")
    return archive


def build_images(*, log=print) -> list:
    """Make sure the trainer and operator images are built and exported; return their archives.

    Returns [trainer archive, operator archive] (docker-archive tars under
    `images_dir()`, each with a .json record of its reference, inputs hash and
    config digest). The base image stays in buildah's storage only: no pod runs it.
    """
    with build_lock(log=log):
        return _build_images(log=log)


def image_plans(*, log=print) -> list:
    """What build_images() builds, from the current inputs: one dict per image.

    Keys: name (the Dockerfile target), reference, build_args, base_hash,
    inputs_hash. Copies the torch wheel into docker/wheels/ if it is missing.
    """
    wheel = ensure_torch_wheel(version=dockerfile_torch_version(DOCKERFILE.read_text()), log=log)
    base_hash = base_inputs_hash(BASE_RECIPE, mirror=debian_mirror_uri())
    context = context_hash(REPO)
    plans = [
        {"name": "trainer", "reference": TRAINER_IMAGE, "build_args": {"TORCH_WHEEL": wheel}},
        {"name": "operator", "reference": OPERATOR_IMAGE, "build_args": {}},
    ]
    for plan in plans:
        plan["base_hash"] = base_hash
        plan["inputs_hash"] = image_inputs_hash(context=context, base=base_hash, target=plan["name"],
                                                build_args=plan["build_args"])
    return plans


def _build_images(*, log) -> list:
    started = time.monotonic()
    plans = image_plans(log=log)
    archives = []
    base = None
    for plan in plans:
        inputs_hash = plan["inputs_hash"]
        archive = archive_path(plan["name"])
        record = read_record(archive)
        if archive.is_file() and record and record["inputs_hash"] == inputs_hash:
            log_line(f"{plan['reference']} cached: {archive} ({inputs_hash[:16]})", log=log)
        else:
            _require_root_and_tools(["debootstrap", "buildah"])
            base = base or ensure_base_image(base_hash=plan["base_hash"], mirror=debian_mirror_uri(), log=log)
            build_and_export(name=plan["name"], reference=plan["reference"], inputs_hash=inputs_hash,
                             base=base, build_args=plan["build_args"])
        archives.append(archive)
    log_line(f"images ready in {time.monotonic() - started:.1f}s", log=log)
    return archives


# ---------------------------------------------------------------------------
# containerd
# ---------------------------------------------------------------------------

def _ctr(containerd_address: str, *args) -> list:
    return ["ctr", "--address", containerd_address, "--namespace", CONTAINERD_NAMESPACE, *args]


def containerd_config_digest(reference: str, *, containerd_address: str):
    """Config digest of `reference` in containerd's k8s.io namespace; None if it has no such image."""
    listing = _output(_ctr(containerd_address, "images", "list", f"name=={reference}")).splitlines()
    rows = [line.split() for line in listing[1:] if line.split() and line.split()[0] == reference]
    if not rows:
        return None
    digest = rows[0][2]  # REF TYPE DIGEST SIZE PLATFORMS LABELS
    document = json.loads(_output(_ctr(containerd_address, "content", "get", digest)))
    if "manifests" in document:  # an index: the manifest of this machine's platform
        digest = document["manifests"][0]["digest"]
        document = json.loads(_output(_ctr(containerd_address, "content", "get", digest)))
    return document["config"]["digest"]


def import_images(archives, *, containerd_address: str, snapshotter: str = "", log=print) -> None:
    """Import docker-archives into containerd (namespace k8s.io), unpacked for `snapshotter`.

    `snapshotter` "" means containerd's default (overlayfs); it must be the one
    the CRI plugin uses. An archive is skipped when containerd already holds
    each of its references with the same config digest (the config carries the
    inputs hash label, so equal digests mean equal images); that check does not
    look at which snapshotter it was unpacked for. Project archives are first
    brought up to this checkout's inputs (a no-op when they are), under the build
    lock, so two checkouts sharing the cache cannot import each other's images.
    Raises BuildError if an
    import fails or the image is not there afterwards.
    """
    _require_root_and_tools(["ctr"])
    with build_lock(log=log):  # a build on this machine would replace the archives
        archives = [pathlib.Path(a) for a in archives]
        project = {archive_path(plan["name"]) for plan in image_plans(log=log)}
        if project & set(archives):
            # Another checkout on this machine (a git worktree) may have rebuilt the
            # archives since ours were built: rebuild to this checkout's inputs, under the
            # same lock as the import, so a node never runs another tree's code.
            _build_images(log=log)
        for archive in archives:
            _import_archive(archive, containerd_address=containerd_address, snapshotter=snapshotter, log=log)


def _import_archive(archive: pathlib.Path, *, containerd_address: str, snapshotter: str, log) -> None:
    image = archive_manifest(archive)
    if not image["references"]:
        raise BuildError(f"{archive} names no image (no RepoTags in its manifest.json)")
    present = {ref: containerd_config_digest(ref, containerd_address=containerd_address)
               for ref in image["references"]}
    if all(digest == image["config_digest"] for digest in present.values()):
        log_line(f"{', '.join(present)} already in containerd ({image['config_digest'][:19]})", log=log)
        return
    with step(f"import {archive.name} into containerd {containerd_address} ({CONTAINERD_NAMESPACE})"):
        run(_ctr(containerd_address, "images", "import", f"--snapshotter={snapshotter}", str(archive)),
            stdout=subprocess.DEVNULL)
        for ref in image["references"]:
            found = containerd_config_digest(ref, containerd_address=containerd_address)
            if found != image["config_digest"]:
                raise BuildError(f"after importing {archive}, containerd has {ref} with config "
                                 f"{found}, expected {image['config_digest']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containerd-address", help="also import the images into this containerd (its grpc socket)")
    args = parser.parse_args(argv)
    try:
        archives = build_images()
        if args.containerd_address:
            import_images(archives, containerd_address=args.containerd_address)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    for archive in archives:
        print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
