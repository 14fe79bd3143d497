"""Start one container: bind its volumes in a private mount namespace, cd, exec.

The node agent runs `command_line(...)`, i.e.

    unshare --mount --propagation private -- python -I -S container_launcher.py SPEC ARGV...

`unshare` and this script both exec (no fork), so the pid the agent holds is
the container's own process. SPEC is JSON: {"binds": [Bind fields...],
"workdir": str, "workdir_on_host": bool}.

Every bind source is opened (O_PATH) before the first mount and then mounted
through /proc/self/fd/N, as runc does. Mounting by path instead breaks as soon
as one volume is mounted over a parent of another volume's host directory: an
emptyDir at /tmp while the cluster keeps its state in /tmp/localcluster-*
would hide the service-account token and every configMap or secret volume
before they are bound.

This file runs as a script under `python -I -S`: standard library only.
"""

import ctypes
import dataclasses
import json
import os
import shutil
import stat
import sys

# <sys/mount.h>
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384


@dataclasses.dataclass(frozen=True)
class Bind:
    """One host path to bind at a path inside the container."""

    source: str
    target: str
    read_only: bool = False
    optional: bool = False  # best effort: a failure is ignored (the termination-message file)


def command_line(*, binds: list, workdir: str, argv: list, workdir_on_host: bool = False) -> list:
    """argv that mounts `binds` in list order (put a parent before its children), cds, execs argv.

    workdir is a path inside the container (a container's `workingDir`,
    created when missing), or with workdir_on_host an existing host directory
    entered even when a volume hides its path (the agent's per-pod dir).
    Without root or `unshare` there are no mount namespaces: volumes are not
    mounted and the command runs with the host's filesystem.
    """
    if os.geteuid() != 0 or not shutil.which("unshare"):
        binds, prefix = [], []
    else:
        prefix = ["unshare", "--mount", "--propagation", "private", "--"]
    spec = {"binds": [dataclasses.asdict(b) for b in binds], "workdir": workdir,
            "workdir_on_host": workdir_on_host}
    return [*prefix, sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(spec), *argv]


def mount_all(binds: list) -> None:
    """Bind every source at its target, in list order; raise OSError naming the bind that failed."""
    opened = []  # (bind, fd): every source resolved before any mount can hide it
    for bind in binds:
        try:
            opened.append((bind, os.open(bind.source, os.O_PATH | os.O_CLOEXEC)))
        except OSError as exc:
            if not bind.optional:
                raise OSError(exc.errno, f"volume source {bind.source} for {bind.target}: "
                                         f"{exc.strerror}") from None
    for bind, fd in opened:
        try:
            _mount_one(bind, fd)
        except OSError as exc:
            if not bind.optional:
                raise OSError(exc.errno, f"cannot bind {bind.source} at {bind.target}: "
                                         f"{exc.strerror}") from None
        finally:
            os.close(fd)


def _mount_one(bind: Bind, fd: int) -> None:
    # The mount point is created where the target resolves now: inside an
    # earlier volume when it lies under one, else on the host.
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.makedirs(bind.target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(bind.target) or "/", exist_ok=True)
        if not os.path.exists(bind.target):
            open(bind.target, "a").close()
    _mount(f"/proc/self/fd/{fd}", bind.target, MS_BIND | MS_REC)
    if bind.read_only:
        _mount(None, bind.target, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _mount(source, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_void_p)
    encoded = source.encode() if source is not None else None
    if libc.mount(encoded, target.encode(), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def main(argv: list) -> None:
    spec, command = json.loads(argv[0]), argv[1:]
    try:
        host_workdir = (os.open(spec["workdir"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                        if spec["workdir_on_host"] else None)
        mount_all([Bind(**fields) for fields in spec["binds"]])
        if host_workdir is not None:
            os.fchdir(host_workdir)
            os.close(host_workdir)
        else:
            os.makedirs(spec["workdir"], exist_ok=True)
            os.chdir(spec["workdir"])
    except OSError as exc:
        sys.exit(f"localcluster: {exc}")
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:  # exit codes of a shell's `exec`
        sys.exit(_exit_with(127, f"{command[0]}: not found"))
    except PermissionError:
        sys.exit(_exit_with(126, f"{command[0]}: permission denied"))


def _exit_with(code: int, message: str) -> int:
    print(f"localcluster: exec {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    main(sys.argv[1:])
