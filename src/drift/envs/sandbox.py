"""Running untrusted Python (a model's code and its unit tests) in a confined subprocess.

`run_tests(code, entry_point, tests, limits)` writes the code and the tests into a fresh temporary
directory and runs `python -I -S harness.py` there, which loads the code, checks `entry_point`,
runs the tests in order until the first failure and writes the verdict to result.json. What
confines the child, in the order it is set up:

- a new network namespace (`unshare --net`: only a loopback device, down) when this machine
  allows one (root, or unprivileged user namespaces: then `--map-root-user`); `isolation()` says
  which was used;
- the environment cleared (PATH, LANG and a private HOME/TMPDIR only), isolated mode (no
  PYTHON* variables, no user site), no site-packages (-S: the standard library only), the
  temporary directory as cwd; a new session, so a timeout kills the whole process group;
- rlimits set by the harness before the code loads: address space (`memory_mb`), CPU seconds,
  file size (1 MiB), open files, no core dumps; run as root, it then drops to uid/gid nobody, so
  it can neither raise those limits nor write outside its directory;
- a `sys.addaudithook` hook (which cannot be removed) that refuses sockets, starting or signalling
  processes, ctypes, changing rlimits, and opening for writing, deleting or renaming any path
  outside the temporary directory;
- a wall-clock limit (`seconds`): on expiry the process group is killed with SIGKILL.
This confines accidents and casual misuse by generated code; it is not a boundary against code
written to break out of CPython (no seccomp, no separate filesystem view).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HARNESS = Path(__file__).with_name("sandbox_harness.py")
NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    seconds: float = 3.0  # wall clock for loading the code and running every test
    memory_mb: int = 512  # address space of the child


@dataclass
class Verdict:
    passed: int  # tests passed before the first failure
    total: int
    failure: str | None  # the first failing test's message (None: all passed)
    timed_out: bool = False
    seconds: float = 0.0  # wall time of the child


@functools.cache
def isolation() -> str:
    """How the sandbox isolates the network here: "netns" (a new network namespace), "netns-userns"
    (the same, through an unprivileged user namespace) or "audit-hook" (sockets refused in-process only)."""
    if shutil.which("unshare") is None:
        return "audit-hook"
    for kind, flags in (("netns", ["--net"]), ("netns-userns", ["--net", "--map-root-user"])):
        if kind == "netns" and os.geteuid() != 0:
            continue
        try:
            done = subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return kind
    return "audit-hook"


def _command() -> list[str]:
    prefix = {"netns": ["unshare", "--net"], "netns-userns": ["unshare", "--net", "--map-root-user"]}
    return prefix.get(isolation(), []) + [sys.executable, "-I", "-S", "harness.py"]


def run_tests(code: str, entry_point: str, tests: list[str], limits: Limits = Limits()) -> Verdict:
    """Run `tests` (Python statements, e.g. asserts) against `code` in the sandbox; the first failure's message."""
    with tempfile.TemporaryDirectory(prefix="drift-sandbox-") as tmp:
        root = Path(tmp)
        shutil.copyfile(HARNESS, root / "harness.py")
        (root / "solution.py").write_text(code, encoding="utf-8")
        config = {"entry_point": entry_point, "tests": tests, "memory_mb": limits.memory_mb,
                  "cpu_seconds": int(limits.seconds) + 1, "root": str(root), "drop_to": NOBODY if os.geteuid() == 0 else None}
        (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
        (root / "home").mkdir()
        if os.geteuid() == 0:
            for p in (root, root / "home"):
                os.chown(p, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(root / "home"), "TMPDIR": str(root / "home")}
        start = time.monotonic()
        with open(root / "output.txt", "wb") as out:
            child = subprocess.Popen(_command(), cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            try:
                child.wait(timeout=limits.seconds)
            except subprocess.TimeoutExpired:
                _kill(child)
                return Verdict(0, len(tests), f"Your code did not finish within {limits.seconds:g} seconds.",
                               timed_out=True, seconds=time.monotonic() - start)
        seconds = time.monotonic() - start
        result = _read_result(root / "result.json")
        if result is None:
            tail = (root / "output.txt").read_bytes()[-300:].decode("utf-8", "replace").strip()
            why = f"exit status {child.returncode}" + (f": {tail.splitlines()[-1]}" if tail else "")
            return Verdict(0, len(tests), f"Your code stopped the test run ({why}).", seconds=seconds)
        return Verdict(int(result["passed"]), len(tests), result.get("failure"), seconds=seconds)


def _kill(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("passed"), int) else None
