"""The pause (pod sandbox) image, built from the Kubernetes source we already have.

No registry is reachable, so `k8s.gcr.io/pause:3.2` cannot be pulled. The pause
container is one static C program (`build/pause/linux/pause.c`); we compile it
with `gcc -static` and write a one-layer image as a docker-archive tar, which
`ctr images import` accepts. The image name is the one the kubelet and
containerd's CRI plugin are told to use (`SANDBOX_IMAGE`), so nothing is pulled.
"""

import hashlib
import io
import json
import pathlib
import subprocess
import tarfile

SANDBOX_IMAGE = "k8s.gcr.io/pause:3.2"  # kubelet 1.20's default --pod-infra-container-image
# The pause image upstream runs as 65535 ("nobody" in distroless terms).
PAUSE_USER = "65535:65535"


def compile_pause(source: pathlib.Path, output: pathlib.Path) -> pathlib.Path:
    """gcc -static the pause program; raises CalledProcessError with gcc's output on failure."""
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["gcc", "-Os", "-static", "-Wall", "-DVERSION=localcluster", "-o", str(output), str(source)],
        check=True, capture_output=True, text=True,
    )
    return output


def one_file_image(*, binary: bytes, path_in_image: str, repo_tag: str, user: str) -> bytes:
    """A docker-archive (the `docker save` format) with one layer holding one executable."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(path_in_image.lstrip("/"))
        info.size, info.mode = len(binary), 0o755
        tar.addfile(info, io.BytesIO(binary))
    layer_bytes = layer.getvalue()
    layer_digest = hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": [path_in_image], "User": user},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created_by": "localcluster: gcc -static pause.c"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": [f"{layer_digest}/layer.tar"]}]
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in ((config_name, config_bytes), (f"{layer_digest}/layer.tar", layer_bytes),
                              ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return archive.getvalue()


def build_pause_archive(*, kubernetes_tree: pathlib.Path, archive: pathlib.Path) -> pathlib.Path:
    """Compile pause.c from the tree and write the image archive (atomically) to `archive`."""
    binary = compile_pause(kubernetes_tree / "build" / "pause" / "linux" / "pause.c",
                           archive.with_name("pause"))
    partial = archive.with_suffix(".partial")
    partial.write_bytes(one_file_image(binary=binary.read_bytes(), path_in_image="/pause",
                                       repo_tag=SANDBOX_IMAGE, user=PAUSE_USER))
    partial.rename(archive)
    return archive
