"""Run native scenarios in a child interpreter.

A scenario that corrupts a native stack can kill the process that runs it. Each
native scenario therefore runs as a module-level function in a fresh Python
process; a crash becomes a failed test that names the signal, never a dead
pytest.

    from childproc import run_child
    result = run_child(my_scenario, 1000)      # my_scenario defined at module level

The function and its arguments/result must be picklable; the function's module
must be importable from ``tests/`` (every test module is).
"""
import os
import pickle
import signal
import subprocess
import sys
import tempfile

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(TESTS_DIR)

_BOOT = r"""
import pickle, sys, traceback
sys.path[:0] = [{tests!r}, {root!r}]
with open({inp!r}, 'rb') as f:
    modname, funcname, args, kwargs = pickle.load(f)
import importlib
func = getattr(importlib.import_module(modname), funcname)
try:
    out = ('ok', func(*args, **kwargs))
except BaseException as e:
    out = ('error', ''.join(traceback.format_exception(e)))
with open({outp!r}, 'wb') as f:
    pickle.dump(out, f)
"""


class ChildCrashed(AssertionError):
    """The child process died (signal or non-zero exit) before reporting."""


def run_child(func, *args, timeout=300, **kwargs):
    """Run ``func(*args, **kwargs)`` in a fresh interpreter and return its result.

    Raises :class:`ChildCrashed` naming the signal if the child dies, and
    ``AssertionError`` carrying the child's traceback if ``func`` raised.
    ``timeout`` is in seconds.
    """
    modname = func.__module__
    if modname == "__main__":
        raise ValueError("run_child needs a function defined in an importable module")
    with tempfile.TemporaryDirectory(prefix="osrjit-child-") as tmp:
        inp = os.path.join(tmp, "in.pickle")
        outp = os.path.join(tmp, "out.pickle")
        with open(inp, "wb") as f:
            pickle.dump((modname, func.__name__, args, kwargs), f)
        code = _BOOT.format(tests=TESTS_DIR, root=ROOT_DIR, inp=inp, outp=outp)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(outp):
            if proc.returncode < 0:
                what = f"killed by signal {signal.Signals(-proc.returncode).name}"
            else:
                what = f"exited with status {proc.returncode}"
            raise ChildCrashed(f"{modname}.{func.__name__} {what}\n"
                               f"--- stdout ---\n{proc.stdout[-4000:]}\n"
                               f"--- stderr ---\n{proc.stderr[-4000:]}")
        with open(outp, "rb") as f:
            status, value = pickle.load(f)
    if status == "error":
        raise AssertionError(f"{modname}.{func.__name__} raised in the child:\n{value}")
    return value
