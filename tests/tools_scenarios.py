"""Scenarios that perf and gdb watch from outside (``tests/test_tools.py``).

Run as ``python tests/tools_scenarios.py <scenario> [args]``; each prints one
JSON line (``RESULT {...}``) with what the test checks the tool's output
against.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import osrjit  # noqa: E402

FIB = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - {k})\n"

DOWN_V1 = ("def down(n):\n    if n == 0:\n        return hook(n)\n    return down(n - 1) + 1\n"
           "\n"
           "def g(n):\n    return down(n) + 1\n")
DOWN_V2 = "def down(n):\n    if n == 0:\n        return hook(n)\n    return down(n - 1) + 2\n"


def _result(**fields):
    print("RESULT " + json.dumps(fields), flush=True)


def fib_before_and_after(perf: str, n: str = "32", rounds: str = "3"):
    """fib@v1 runs ``rounds`` times fib(n), then fib@v2 as often (same work:
    samples land on both in proportion to the CPU time, not the wall clock)."""
    n, rounds = int(n), int(rounds)
    with osrjit.Runtime(perf=None if perf == "env" else perf) as rt:
        rt.compile(FIB.format(k=2), filename="fib.py")
        [v1] = rt.versions("fib")
        v1_range = v1.code_range
        for _ in range(rounds):
            rt.function("fib")(n)
        [v2] = rt.replace("fib", FIB.format(k=2), filename="fib.py")
        for _ in range(rounds):
            rt.function("fib")(n)
        _result(pid=os.getpid(), v1=[v1.entry, *v1_range], v2=[v2.entry, *v2.code_range])


def gdb_after_replace():
    """The hook replaces ``down`` on the first call; on the second it calls
    ``getppid`` (where gdb stops) with down@v2 and g@v1 frames below it."""
    rt = osrjit.Runtime()
    rt.compile(DOWN_V1, filename="/srv/prog.py")
    calls = []

    def on_hook(x):
        if not calls:
            rt.replace("down", DOWN_V2, filename="/srv/prog_v2.py")
        else:
            os.getppid()
        calls.append(x)
        return 0

    rt.on_hook(on_hook)
    first, second = rt.function("g")(3), rt.function("g")(3)
    rt.close()
    _result(first=first, second=second)


if __name__ == "__main__":
    globals()[sys.argv[1].replace("-", "_")](*sys.argv[2:])
