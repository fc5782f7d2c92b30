"""Start one sandboxed program: confine this process, then run the program in it.

The local sandbox runs ``python -I -B _runner.py JOB`` in a fresh process
group, with a minimal environment, in the program's own temporary directory.
This file reads the job (then deletes it, so the program cannot read it),
confines itself (network namespace, resource limits, an unprivileged user,
an audit hook) and only then runs the program as ``__main__``. It imports only
the standard library, so it starts fast and runs under any interpreter.
"""

import contextlib
import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SETUP_FAILED = 125
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "os.chmod": 0, "os.chown": 0, "os.truncate": 0,
                "shutil.rmtree": 0, "os.utime": 0, "os.rename": 0, "os.link": 1, "os.symlink": 1}


def _new_network_namespace() -> bool:
    """Enter an empty network namespace (a user namespace too when not root); say whether it worked."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    return libc.unshare(flags) == 0


def _limit(job: dict) -> None:
    """Apply the job's resource limits (soft = hard, so the program cannot raise them)."""
    for name, value in job["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _drop_user(uid: int) -> None:
    """Become an unprivileged user with no supplementary groups."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _inside(path, root: str) -> bool:
    """Say whether ``path`` (str, bytes or fd) resolves inside ``root``; an fd counts as inside."""
    if isinstance(path, int):
        return True
    path = os.fsdecode(path)
    return os.path.realpath(path) == root or os.path.realpath(path).startswith(root + os.sep)


def _audit_hook(root: str):
    """A hook that refuses sockets, ctypes, and file changes outside ``root``."""

    def hook(event: str, args: tuple) -> None:
        if event.startswith("socket.") and event in ("socket.__new__", "socket.connect", "socket.bind",
                                                       "socket.getaddrinfo", "socket.sendto"):
            raise PermissionError("the code sandbox allows no network access")
        if event in ("ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata"):
            raise PermissionError("the code sandbox allows no ctypes")
        if event == "open" and args[2] & _WRITE_FLAGS and not _inside(args[0], root):
            raise PermissionError(f"the code sandbox allows writing only inside its directory, not {args[0]!r}")
        if event in _PATH_EVENTS:
            if not all(_inside(p, root) for p in args[:_PATH_EVENTS[event] + 1] if p is not None):
                raise PermissionError(f"the code sandbox allows changes only inside its directory ({event})")
            if event == "os.rename" and not _inside(args[1], root):
                raise PermissionError("the code sandbox allows changes only inside its directory (os.rename)")

    return hook


def main() -> None:
    job_path = sys.argv[1]
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    os.unlink(job_path)
    try:
        netns = job["network_namespace"] and _new_network_namespace()
        for module in job["preload"]:
            __import__(module)
        _limit(job)
        if job["uid"] is not None:
            _drop_user(job["uid"])
        root = os.path.realpath(os.getcwd())
        sys.addaudithook(_audit_hook(root))
    except Exception:  # noqa: BLE001 - any setup failure is reported to the parent, never run unconfined
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
    if job["network_namespace"] and not netns:
        print("trl-resets sandbox: could not enter a network namespace", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)
    if job.get("report"):
        library = os.path.dirname(os.__file__)
        print(json.dumps({"network_namespace": bool(netns), "library_readable": os.access(library, os.R_OK | os.X_OK)}),
              flush=True)
    source = job["source"]
    del job
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    sys.argv = ["solution.py"]
    status = 0
    try:
        exec(compile(source, "solution.py", "exec"), namespace)  # noqa: S102 - confined above
    except SystemExit as leaving:
        status = _exit_status(leaving.code)
    except BaseException:  # noqa: BLE001 - the program's own error: a failed run, as python reports it
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a program may have closed or replaced its streams
            stream.flush()
    os._exit(status)


def _exit_status(code) -> int:
    """The status python itself exits with for ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
