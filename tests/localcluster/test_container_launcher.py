"""The container launcher binds volumes in a private mount namespace (no cluster needed)."""

import os
import shutil
import subprocess
import sys

import pytest

from localcluster.container_launcher import Bind, command_line


@pytest.fixture(autouse=True)
def _mount_namespaces_available():
    # The local cluster itself needs these; a machine without them must fail here, not skip.
    assert os.geteuid() == 0, "mount namespaces need root (the local node agent runs as root)"
    assert shutil.which("unshare"), "unshare (util-linux) is missing"


def launch(binds: list, code: str, *, workdir: str) -> subprocess.CompletedProcess:
    return subprocess.run(command_line(binds=binds, workdir=workdir, argv=[sys.executable, "-c", code]),
                          capture_output=True, text=True, timeout=30)


def test_volume_over_a_parent_of_other_sources_does_not_hide_them(tmp_path):
    # Like an emptyDir at /tmp while every volume's host dir is under /tmp:
    # `state` holds the sources and an empty dir is mounted over it first.
    state = tmp_path / "state"
    (state / "config").mkdir(parents=True)
    (state / "config" / "lr").write_text("0.001")
    (state / "token").write_text("t0ken")
    (state / "empty").mkdir()
    binds = [
        Bind(source=str(state / "empty"), target=str(state)),
        Bind(source=str(state / "config"), target=str(state / "config-inside"), read_only=True),
        Bind(source=str(state / "token"), target=str(tmp_path / "sa" / "token"), read_only=True),
    ]
    code = ("import os, sys\n"
            f"state, sa = {str(state)!r}, {str(tmp_path / 'sa')!r}\n"
            "print(sorted(os.listdir(state)))\n"
            "print(open(state + '/config-inside/lr').read(), open(sa + '/token').read())\n"
            "try:\n"
            "    open(state + '/config-inside/lr', 'w')\n"
            "except OSError as exc:\n"
            "    print(exc.strerror)\n"
            "print(os.getcwd())\n")

    result = launch(binds, code, workdir=str(state / "work"))

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['config-inside', 'work']",  # the empty dir, with the mount points made inside it
        "0.001 t0ken",
        "Read-only file system",
        str(state / "work"),
    ]
    # Nothing leaked out of the namespace: the host still sees its own files.
    assert sorted(os.listdir(state)) == ["config", "empty", "token"]


def test_host_workdir_is_entered_even_when_a_volume_hides_its_path(tmp_path):
    pod_dir = tmp_path / "state" / "pod"
    pod_dir.mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    hide_state = Bind(source=str(tmp_path / "empty"), target=str(tmp_path / "state"))

    result = subprocess.run(
        command_line(binds=[hide_state], workdir=str(pod_dir), workdir_on_host=True,
                     argv=[sys.executable, "-c", "open('out.txt', 'w').write('here')"]),
        capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    assert (pod_dir / "out.txt").read_text() == "here"


def test_missing_source_fails_naming_it_unless_optional(tmp_path):
    missing = Bind(source=str(tmp_path / "gone"), target=str(tmp_path / "mnt"))
    optional = Bind(source=str(tmp_path / "gone"), target=str(tmp_path / "log"), optional=True)

    failed = launch([missing], "print('ran')", workdir=str(tmp_path))
    ran = launch([optional], "print('ran')", workdir=str(tmp_path))

    assert failed.returncode == 1
    assert f"volume source {tmp_path / 'gone'} for {tmp_path / 'mnt'}" in failed.stderr
    assert (ran.returncode, ran.stdout) == (0, "ran\n")


def test_unknown_command_exits_127_like_a_shell(tmp_path):
    result = subprocess.run(command_line(binds=[], workdir=str(tmp_path), argv=["no-such-command-xyz"]),
                            capture_output=True, text=True, timeout=30)

    assert result.returncode == 127
    assert "no-such-command-xyz: not found" in result.stderr
