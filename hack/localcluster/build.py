"""Build (once) and cache the Kubernetes control-plane binaries and tools.

Run as root on Debian bookworm: `python -m localcluster build`. Steps:

1. apt: enable bookworm `deb-src`, install etcd, Go 1.19, rsync, dpkg-dev and
   the Debian packages of reflect2 1.0.2 / json-iterator 1.1.12.
2. `apt-get source kubernetes` (1.20.2, with vendored dependencies).
3. Replace the vendored reflect2 and json-iterator with Debian's newer ones:
   the vendored reflect2 1.0.1 reads runtime internals that moved in Go 1.18,
   and kube-apiserver dies with "fatal error: fault" on the first custom
   resource create. Then apply `SOURCE_FIXES`: upstream fixes that 1.20.2
   needs under a newer Go (each names its upstream change).
4. `make WHAT=...` for kube-apiserver, kube-controller-manager, kube-scheduler.
5. Copy them to the cache (`paths.bin_dir()`), then fetch kubectl + helm (see
   `tools`).

Each step is skipped when its result is already there, so a second run takes
seconds. Output: one timestamped line per step; a failure raises BuildError
naming the step.
"""

import contextlib
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import time

from localcluster import paths

COMPONENTS = (
    "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy",
)
APT_PACKAGES = (
    "etcd-server",
    "golang-go",
    "rsync",
    "dpkg-dev",
    "make",
    "golang-github-modern-go-reflect2-dev",
    "golang-github-json-iterator-go-dev",
    # the real node: container runtime, pod network, image building
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "buildah",
    "debootstrap",
    "gcc",
    "libc6-dev",
)
# vendored path -> Debian -dev package source path
VENDOR_REPLACEMENTS = {
    "vendor/github.com/modern-go/reflect2": "/usr/share/gocode/src/github.com/modern-go/reflect2",
    "vendor/github.com/json-iterator/go": "/usr/share/gocode/src/github.com/json-iterator/go",
}
# Edits of the source: path -> (text as shipped, replacement, why). Each is an upstream fix that 1.20.2
# predates and a newer Go than its own (1.15) needs; applied once, recognised by the replacement.
SOURCE_FIXES = {
    path: (
        "if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {",
        "if data == nil { // localcluster: kube-openapi#230",
        # Since Go 1.16 reflect.Zero shares one zero buffer, so this check holds for every zero value and custom
        # resources with "" in a string field (or a zero-valued field of any type held in that buffer) were
        # refused as "must be of type string: null" (kubernetes#99804; fixed upstream in 1.21 by this edit).
        "custom resources with an empty string field refused as null under Go >= 1.16 (kubernetes#99804)",
    )
    for path in ("vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go",
                 "vendor/github.com/go-openapi/validate/type.go")
}
BUILD_RECIPE = "2: vendored reflect2/json-iterator from Debian; SOURCE_FIXES kubernetes#99804\n"
"""Written beside the binaries; cached binaries built by another recipe are rebuilt (the fixes change them)."""
DEB_SRC_FILE = pathlib.Path("/etc/apt/sources.list.d/localcluster-deb-src.sources")


class BuildError(RuntimeError):
    """A build step failed; the message names the step and what to do."""


def log(message: str) -> None:
    print(f"[localcluster build {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def step(name: str):
    started = time.monotonic()
    log(f"{name} ...")
    try:
        yield
    except Exception as exc:  # any failure inside a step is reported with the step's name
        raise BuildError(f"build step {name!r} failed: {exc}") from exc
    log(f"{name} done in {time.monotonic() - started:.1f}s")


def run(cmd, **kwargs) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    env.update(kwargs.pop("env", {}))
    result = subprocess.run(cmd, env=env, **kwargs)
    if result.returncode != 0:
        raise BuildError(f"command {' '.join(map(str, cmd))} exited with {result.returncode}")


def binaries_present() -> bool:
    """The binaries are in the cache and were built by this recipe (with every fix in SOURCE_FIXES)."""
    recipe = paths.bin_dir() / "recipe"
    return (all((paths.bin_dir() / name).is_file() for name in COMPONENTS + ("etcd",))
            and recipe.is_file() and recipe.read_text() == BUILD_RECIPE)


def missing_apt_packages() -> list:
    missing = []
    for package in APT_PACKAGES:
        probe = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        )
        if "install ok installed" not in probe.stdout:
            missing.append(package)
    return missing


def debian_mirror_uri() -> str:
    """The URI this machine already uses for bookworm `deb` lines (mirrors and snapshots differ)."""
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        if path == str(DEB_SRC_FILE) or not os.path.isfile(path):
            continue
        text = pathlib.Path(path).read_text()
        if path.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields = dict(
                    line.split(":", 1) for line in stanza.splitlines()
                    if ":" in line and not line.startswith("#")
                )
                suites = fields.get("Suites", "").split()
                if "bookworm" in suites and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = line.split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    return words[1] if not words[1].startswith("[") else words[2]
    return "http://deb.debian.org/debian"


def ensure_apt_packages() -> None:
    missing = missing_apt_packages()
    needs_src = not list(source_root().glob("kubernetes-*/Makefile"))
    if not missing and not needs_src:
        log("apt packages already installed")
        return
    if os.geteuid() != 0:
        raise BuildError(f"need root to apt-get install {missing}; run the build as root")
    if needs_src and not DEB_SRC_FILE.exists():
        DEB_SRC_FILE.write_text(
            "Types: deb-src\n"
            f"URIs: {debian_mirror_uri()}\n"
            "Suites: bookworm\n"
            "Components: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    run(["apt-get", "update", "-q"])
    if missing:
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing])


def source_root() -> pathlib.Path:
    return paths.version_dir() / "src"


def kubernetes_tree() -> pathlib.Path:
    trees = sorted(p.parent for p in source_root().glob("kubernetes-*/Makefile"))
    if not trees:
        raise BuildError(f"no kubernetes source tree under {source_root()}")
    return trees[0]


def ensure_source() -> None:
    if list(source_root().glob("kubernetes-*/Makefile")):
        log(f"source already at {kubernetes_tree()}")
        return
    source_root().mkdir(parents=True, exist_ok=True)
    # bookworm's version string is "1.20.5+really1.20.2-...": take whatever
    # bookworm has and check the tree really is the version we expect.
    run(["apt-get", "source", "-q", "kubernetes"], cwd=source_root())
    version_file = kubernetes_tree() / "debian" / "changelog"
    if version_file.exists() and f"really{paths.K8S_VERSION}" not in version_file.read_text()[:300]:
        raise BuildError(f"apt-get source kubernetes did not give {paths.K8S_VERSION}; see {version_file}")
    kubernetes_tree()


def patch_vendor() -> None:
    tree = kubernetes_tree()
    marker = tree / ".localcluster-vendor-patched"
    if marker.exists():
        log("vendor already patched")
        return
    for vendored, replacement in VENDOR_REPLACEMENTS.items():
        target = tree / vendored
        if not os.path.isdir(replacement):
            raise BuildError(f"{replacement} missing: is its Debian -dev package installed?")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(replacement, target, symlinks=False,
                        ignore=shutil.ignore_patterns("*_test.go", "go.mod", "go.sum"))
    marker.write_text("reflect2 and json-iterator replaced with Debian's\n")


def fix_sources() -> None:
    tree = kubernetes_tree()
    for relative, (shipped, fixed, why) in SOURCE_FIXES.items():
        path = tree / relative
        text = path.read_text()
        if fixed in text:
            continue
        if text.count(shipped) != 1:
            raise BuildError(f"{relative}: expected the line to fix once ({why}); the source differs")
        path.write_text(text.replace(shipped, fixed))
        log(f"fixed {relative}: {why}")


def compile_components() -> None:
    tree = kubernetes_tree()
    gopath = tree / ".go"
    link = gopath / "src" / "k8s.io" / "kubernetes"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(tree)
    env = {
        "GOPATH": str(gopath),
        "CGO_ENABLED": "0",
        "GOCACHE": str(paths.version_dir() / "gocache"),
        # No .git in a source package: give the version explicitly.
        "KUBE_GIT_VERSION": f"v{paths.K8S_VERSION}",
        "KUBE_GIT_TREE_STATE": "clean",
        "KUBE_GIT_COMMIT": "0" * 40,
        "KUBE_GIT_MAJOR": paths.K8S_VERSION.split(".")[0],
        "KUBE_GIT_MINOR": paths.K8S_VERSION.split(".")[1],
    }
    what = " ".join(f"cmd/{name}" for name in COMPONENTS)
    run(["make", f"WHAT={what}"], cwd=link, env=env)


def install_binaries() -> None:
    tree = kubernetes_tree()
    paths.bin_dir().mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        found = sorted(tree.glob(f"_output/**/bin/{name}"))
        if not found:
            raise BuildError(f"{name} was not produced under {tree / '_output'}")
        shutil.copy2(found[0], paths.bin_dir() / name)
    (paths.bin_dir() / "recipe").write_text(BUILD_RECIPE)
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    if not os.path.isfile(etcd):
        raise BuildError("etcd not found: is the etcd-server Debian package installed?")
    shutil.copy2(etcd, paths.bin_dir() / "etcd")


def build(*, keep_source: bool = True) -> pathlib.Path:
    """Make sure the binaries and tools are in the cache; return `paths.bin_dir()`."""
    from localcluster import tools

    started = time.monotonic()
    if binaries_present():
        log(f"control-plane binaries cached in {paths.bin_dir()}")
    else:
        with step("apt packages"):
            ensure_apt_packages()
        with step(f"kubernetes {paths.K8S_VERSION} source"):
            ensure_source()
        with step("replace vendored reflect2/json-iterator, apply source fixes"):
            patch_vendor()
            fix_sources()
        with step("compile " + ", ".join(COMPONENTS) + " (5-10 min on 2 cores)"):
            compile_components()
        with step("install binaries into cache"):
            install_binaries()
        if not keep_source:
            shutil.rmtree(source_root(), ignore_errors=True)
    with step("kubectl and helm"):
        tools.ensure_tools()
    image_archives(log=log)
    log(f"ready in {time.monotonic() - started:.1f}s: {paths.bin_dir()}")
    return paths.bin_dir()


def image_archives(*, log=log) -> list:
    """The images a real node runs, built when missing or when their inputs changed.

    The pause image (from the Kubernetes source, once) and the project's trainer and
    operator images (from the Dockerfile, rebuilt when the code changes, so that
    pods run the working tree's code; see images.py).
    """
    from localcluster import images, pause

    pause_archive = paths.version_dir() / "pause-image.tar"
    if not pause_archive.is_file():
        with step("pause image"):
            pause.build_pause_archive(kubernetes_tree=kubernetes_tree(), archive=pause_archive)
    with step("trainer and operator images"):
        project_archives = images.build_images(log=log)
    return [pause_archive, *project_archives]


if __name__ == "__main__":
    try:
        build()
    except BuildError as exc:
        sys.exit(str(exc))
