"""(sandbox side) Load solution.py, run the tests of config.json in order, write result.json.

Copied into the sandbox's temporary directory and run there by `drift.envs.sandbox` as
`python -I -S harness.py`; it imports the standard library only. Limits and the audit hook are in
place before the model's code is read.
"""

import ast
import json
import os
import resource
import sys

# what generated code commonly imports, loaded while the interpreter's files are still readable
# (after the drop to nobody, a home directory's Python installation may not be)
PRELOAD = ("bisect", "collections", "copy", "datetime", "decimal", "fractions", "functools", "heapq", "itertools",
           "math", "operator", "random", "re", "statistics", "string", "typing")
for _name in PRELOAD:
    __import__(_name)

with open("config.json", encoding="utf-8") as f:
    CONFIG = json.load(f)
ROOT = os.path.realpath(CONFIG["root"])
result_file = open("result.json", "w", encoding="utf-8")  # opened before the limits: the verdict's only channel

for limit, value in ((resource.RLIMIT_AS, CONFIG["memory_mb"] << 20), (resource.RLIMIT_CPU, CONFIG["cpu_seconds"]),
                     (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
if CONFIG["drop_to"] is not None:
    os.setgroups([])
    os.setgid(CONFIG["drop_to"])
    os.setuid(CONFIG["drop_to"])

REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.", "resource.setrlimit", "resource.prlimit", "pty.")
PATH_EVENTS = ("os.remove", "os.rmdir", "os.rename", "os.replace", "os.unlink", "os.mkdir", "os.chmod", "os.chown",
               "os.truncate", "os.symlink", "os.link", "shutil.rmtree")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path: object) -> bool:
    if isinstance(path, int):  # an already open descriptor
        return True
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(ROOT + os.sep)
    except (TypeError, ValueError):
        return False


def _audit(event: str, args: tuple) -> None:
    if event.startswith(REFUSED):
        raise PermissionError(f"the sandbox refuses {event}")
    if event == "open" and args[0] is not None:
        mode, flags = args[1] or "", args[2] or 0
        if (any(c in str(mode) for c in "wax+") or flags & WRITE_FLAGS) and not _inside(args[0]):
            raise PermissionError(f"the sandbox refuses writing {args[0]!r}")
    elif event in PATH_EVENTS and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"the sandbox refuses {event} outside its directory")


sys.addaudithook(_audit)


def _got(test: str, namespace: dict) -> str:
    """For `assert CALL == EXPECTED`: what CALL gave, as text; else empty."""
    try:
        node = ast.parse(test).body[0]
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and isinstance(node.test.ops[0], ast.Eq):
            value = eval(compile(ast.Expression(node.test.left), "<test>", "eval"), namespace)
            return f" (your function returned {value!r:.200})"
    except BaseException:
        pass
    return ""


def main() -> dict:
    namespace: dict = {"__name__": "solution"}
    try:
        with open("solution.py", encoding="utf-8") as f:
            exec(compile(f.read(), "solution.py", "exec"), namespace)
    except BaseException as e:
        return {"passed": 0, "failure": f"Loading your code raised {type(e).__name__}: {e}"}
    entry = CONFIG["entry_point"]
    if not callable(namespace.get(entry)):
        return {"passed": 0, "failure": f"Your code does not define a function named {entry}."}
    for i, test in enumerate(CONFIG["tests"]):
        try:
            exec(compile(test, f"<test {i + 1}>", "exec"), namespace)
        except AssertionError:
            return {"passed": i, "failure": f"Test failed: {test}{_got(test, namespace)}"}
        except BaseException as e:
            return {"passed": i, "failure": f"Test failed: {test} raised {type(e).__name__}: {e}"}
    return {"passed": len(CONFIG["tests"]), "failure": None}


verdict = main()
result_file.write(json.dumps(verdict)[:4000] if len(json.dumps(verdict)) < 4000
                  else json.dumps({"passed": verdict["passed"], "failure": str(verdict["failure"])[:2000]}))
result_file.close()
os._exit(0)
