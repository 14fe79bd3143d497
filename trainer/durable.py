"""Directories that appear whole and survive a node crash: checkpoints and ``final/``.

A directory is built under a temporary name, its files and the directory itself
are fsynced, a marker file is written (and fsynced) last, and only then is it
renamed into place and its parent fsynced. A reader that finds the marker finds
every file complete, even after a power loss; a crash before the rename leaves
only the temporary directory, which nothing reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and every directory (so new names are durable too)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(root))


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(temp: Path, target: Path, *, marker: str) -> None:
    """Make the fully written ``temp`` appear as ``target`` with ``marker`` in it; replaces an old ``target``.

    An old ``target`` is first renamed aside, so a crash in between leaves either
    the old directory, or none (callers then fall back: a checkpoint to the previous
    one, ``final/`` to being written again from the last checkpoint), never a mix.
    """
    fsync_tree(temp)
    with open(temp / marker, "w") as handle:
        os.fsync(handle.fileno())
    fsync_directory(temp)
    aside = target.with_name(f".replaced-{target.name}")
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        os.rename(target, aside)
    os.replace(temp, target)
    fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
