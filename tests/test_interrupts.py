"""Stack overflow and Ctrl-C in JIT code: the thread's JIT frames are
abandoned back to its entry, the caller gets StackOverflow or
KeyboardInterrupt, and the runtime goes on (each scenario in a child)."""
import os
import signal
import threading
import time

import pytest

import osrjit
from childproc import run_child

COUNTDOWN = """
def f(n, at):
    if n == at:
        hook(n)
    if n == 0:
        return 0
    return f(n - 1, at) + 1
"""

SPIN = """
def spin(depth):
    if depth > 0:
        return spin(depth - 1) + 1
    hook(0)
    hook(1)
    i = 0
    while i >= 0:
        i = i + 1
    return i

def count(n):
    i = 0
    while i < n:
        i = i + 1
    return i
"""


def _figures(rt):
    s = rt.stats()
    return {"pending_returns": s["pending_returns"], "live_versions": s["live_versions"]}


def overflow_scenario(transfer, replace_at):
    """f recurses until the stack is nearly full; with ``replace_at``, a hook
    at that depth replaces f while the frames above are live (all hijacked)."""
    out = {}
    with osrjit.Runtime(transfer=transfer) as rt:
        rt.compile(COUNTDOWN)
        f = rt.function("f")

        def hook(n):
            rt.replace(["f"], COUNTDOWN.replace("+ 1", "+ 2"))
            out["pending_in_hook"] = rt.stats()["pending_returns"]
            return 0
        rt.on_hook(hook)
        try:
            f(10_000_000, replace_at)
        except osrjit.StackOverflow as e:
            out["error"] = (type(e).__name__, isinstance(e, RecursionError),
                            isinstance(e, osrjit.OsrJitError))
        out["after"] = _figures(rt)
        out["f10"] = f(10, -1)
        out["again"] = _figures(rt)
        try:
            f(10_000_000, -1)
        except RecursionError:
            out["twice"] = True
        out["f1000"] = f(1000, -1)
    return out


@pytest.mark.parametrize("transfer", ["python", "native"])
def test_a_recursion_deeper_than_the_stack_raises_stack_overflow(transfer):
    out = run_child(overflow_scenario, transfer, -1)
    assert out["error"] == ("StackOverflow", True, True)
    assert out["after"] == {"pending_returns": 0, "live_versions": {"f": 1}}
    assert out["f10"] == 10 and out["f1000"] == 1000 and out["twice"]


@pytest.mark.parametrize("transfer", ["python", "native"])
def test_an_overflow_drops_the_hijacks_of_frames_a_replace_left_pending(transfer):
    out = run_child(overflow_scenario, transfer, 10_000_000 - 500)
    assert out["pending_in_hook"] >= 500
    assert out["error"] == ("StackOverflow", True, True)
    # The old version's frames will never return: nothing pending, old code freed.
    assert out["after"] == {"pending_returns": 0, "live_versions": {"f": 1}}
    assert out["f10"] == 20 and out["f1000"] == 2000


def sigint_scenario(transfer, depth, replace):
    """The main thread spins in JIT code (``depth`` frames deep); a helper
    thread sends SIGINT once the hook says the loop is about to start."""
    out = {}
    with osrjit.Runtime(transfer=transfer) as rt:
        rt.compile(SPIN)
        spin = rt.function("spin")
        started = threading.Event()

        def hook(which):
            # hook(0) replaces (the frames below are hijacked and this one
            # transfers as it returns), hook(1) runs in the new version:
            # SIGINT never meets the Python transfer (see the README).
            if which == 0 and replace:
                rt.replace(["spin", "count"], SPIN.replace("+ 1\n    hook", "+ 3\n    hook"))
                out["pending_in_hook"] = rt.stats()["pending_returns"]
            elif which == 1:
                started.set()
            return 0
        rt.on_hook(hook)
        sent = []

        def interrupter():
            started.wait()
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)
        helper = threading.Thread(target=interrupter)
        helper.start()
        try:
            spin(depth)
        except KeyboardInterrupt:
            out["latency_ms"] = (time.perf_counter() - sent[0]) * 1e3
        helper.join()
        out["after"] = _figures(rt)
        out["count"] = rt.function("count")(100_000)
    return out


@pytest.mark.parametrize("transfer", ["python", "native"])
def test_sigint_stops_a_jit_loop_with_keyboard_interrupt(transfer):
    out = run_child(sigint_scenario, transfer, 0, False, timeout=120)
    print(f"SIGINT -> KeyboardInterrupt: {out['latency_ms']:.3f} ms")
    assert "latency_ms" in out
    assert out["after"] == {"pending_returns": 0, "live_versions": {"spin": 1, "count": 1}}
    assert out["count"] == 100_000


@pytest.mark.parametrize("transfer", ["python", "native"])
def test_sigint_drops_the_hijacks_of_the_abandoned_frames(transfer):
    out = run_child(sigint_scenario, transfer, 50, True, timeout=120)
    print(f"SIGINT -> KeyboardInterrupt (50 hijacked frames): {out['latency_ms']:.3f} ms")
    assert out["pending_in_hook"] == 51          # 50 frames below the hook, and its own
    assert "latency_ms" in out
    assert out["after"] == {"pending_returns": 0, "live_versions": {"spin": 1, "count": 1}}
    assert out["count"] == 100_000


def plain_sigint_scenario():
    """SIGINT while no JIT code runs, with a runtime open and after it closed."""
    out = []
    rt = osrjit.Runtime()
    rt.compile(SPIN)
    out.append(rt.function("count")(10))
    for _ in range(2):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000_000):    # the handler runs between bytecodes
                pass
            out.append("no interrupt")
        except KeyboardInterrupt:
            out.append("KeyboardInterrupt")
        rt.close()
    out.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    return out


def test_sigint_outside_jit_code_is_python_s_own():
    assert run_child(plain_sigint_scenario) == [10, "KeyboardInterrupt", "KeyboardInterrupt",
                                                True]


def custom_handler_scenario():
    """A Python SIGINT handler installed before the runtime is still the one
    called; if it returns, the abandoned call raises KeyboardInterrupt."""
    calls = []
    signal.signal(signal.SIGINT, lambda *a: calls.append("handler"))
    out = {}
    with osrjit.Runtime() as rt:
        rt.compile(SPIN)
        started = threading.Event()
        rt.on_hook(lambda which: (which == 1 and started.set(), 0)[1])

        def interrupter():
            started.wait()
            os.kill(os.getpid(), signal.SIGINT)
        helper = threading.Thread(target=interrupter)
        helper.start()
        try:
            rt.function("spin")(0)
        except KeyboardInterrupt:
            out["raised"] = True
        helper.join()
        out["calls"] = calls
        out["count"] = rt.function("count")(7)
    return out


def test_a_python_sigint_handler_still_runs_and_the_call_still_stops():
    assert run_child(custom_handler_scenario) == {"raised": True, "calls": ["handler"],
                                                   "count": 7}


def test_stack_overflow_is_exported_as_a_recursion_error():
    assert issubclass(osrjit.StackOverflow, osrjit.OsrJitError)
    assert issubclass(osrjit.StackOverflow, RecursionError)
    assert "StackOverflow" in osrjit.__all__


DOWN = """
def down(n):
    if n == 0:
        return hook(0)
    return down(n - 1) + 1
"""


def deepest_scenario(transfer):
    """Find the deepest ``down(n)`` that fits (StackOverflow beyond it), then
    run a hook at that depth that replaces ``down`` (hijacking every frame)
    and calls JIT code again: the hook's Python runs within the margin below
    the limit, so JIT code it calls overflows at once, and says so."""
    out = {}
    with osrjit.Runtime(transfer=transfer) as rt:
        rt.compile(DOWN)
        down = rt.function("down")
        rt.on_hook(lambda _: 0)

        def fits(n):
            try:
                down(n)
                return True
            except osrjit.StackOverflow:
                return False
        lo, hi = 1, 1
        while fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        out["depth"] = lo

        def deep_hook(_):
            rt.replace(["down"], DOWN.replace("+ 1", "+ 2"))
            out["pending_in_hook"] = rt.stats()["pending_returns"]
            for n in (3, 1_000_000):
                try:
                    down(n)
                except osrjit.StackOverflow:
                    out.setdefault("inner", []).append(n)
            return 7
        rt.on_hook(deep_hook)
        out["result"] = down(lo)
        out["after"] = _figures(rt)
    return out


@pytest.mark.parametrize("transfer", [pytest.param("python", marks=pytest.mark.slow), "native"])
def test_the_margin_holds_a_hook_that_replaces_and_calls_jit_code_at_the_deepest_depth(transfer):
    out = run_child(deepest_scenario, transfer, timeout=300)
    depth = out["depth"]
    print(f"deepest down(n): {depth}")
    assert depth > 10_000
    assert out["pending_in_hook"] == depth + 1
    assert out["inner"] == [3, 1_000_000]
    assert out["result"] == 7 + 2 * depth
    assert out["after"] == {"pending_returns": 0, "live_versions": {"down": 1}}


NESTED = SPIN + """
def outer():
    hook(2)
    i = 0
    while i >= 0:
        i = i + 1
    return i
"""


def nested_sigint_scenario():
    """JIT code calls a hook that calls a JIT loop; SIGINT stops the inner
    loop (KeyboardInterrupt in the hook, pending for the outer call) and
    then the outer one at its next poll."""
    out = {}
    with osrjit.Runtime() as rt:
        rt.compile(NESTED)
        started = threading.Event()
        spin = rt.function("spin")

        def hook(which):
            if which == 1:
                started.set()
            elif which == 2:
                try:
                    spin(0)
                except KeyboardInterrupt:
                    out["inner"] = True
                    raise
            return 0
        rt.on_hook(hook)

        def interrupter():
            started.wait()
            os.kill(os.getpid(), signal.SIGINT)
        helper = threading.Thread(target=interrupter)
        helper.start()
        try:
            rt.function("outer")()
        except KeyboardInterrupt:
            out["outer"] = True
        helper.join()
        out["after"] = _figures(rt)
        out["count"] = rt.function("count")(5)
    return out


def test_sigint_stops_nested_jit_loops_one_after_the_other():
    out = run_child(nested_sigint_scenario, timeout=120)
    assert out == {"inner": True, "outer": True, "count": 5,
                   "after": {"pending_returns": 0,
                             "live_versions": {"spin": 1, "count": 1, "outer": 1}}}


def thread_overflow_scenario(stack_bytes):
    """f overflows on a thread with a ``stack_bytes`` stack."""
    out = {}
    with osrjit.Runtime() as rt:
        rt.compile(COUNTDOWN)
        f = rt.function("f")

        def run():
            try:
                f(10_000_000, -1)
            except osrjit.StackOverflow:
                out["error"] = "StackOverflow"
            out["f100"] = f(100, -1)
        threading.stack_size(stack_bytes)
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        out["after"] = _figures(rt)
    return out


@pytest.mark.parametrize("stack_bytes", [1 << 20, 16 << 20])
def test_a_thread_s_overflow_is_checked_against_its_own_stack(stack_bytes):
    out = run_child(thread_overflow_scenario, stack_bytes)
    assert out == {"error": "StackOverflow", "f100": 100,
                   "after": {"pending_returns": 0, "live_versions": {"f": 1}}}


def two_runtimes_scenario():
    """Two runtimes chain their SIGINT handlers; closing the first one (not
    the last installed) leaves the second one's working, closing both
    gives Python its handler back."""
    out = []
    a, b = osrjit.Runtime(), osrjit.Runtime()
    for rt in (a, b):
        rt.compile(SPIN)
    a.close()
    started = threading.Event()
    b.on_hook(lambda which: (which == 1 and started.set(), 0)[1])

    def interrupter():
        started.wait()
        os.kill(os.getpid(), signal.SIGINT)
    helper = threading.Thread(target=interrupter)
    helper.start()
    try:
        b.function("spin")(0)
    except KeyboardInterrupt:
        out.append("KeyboardInterrupt")
    helper.join()
    out.append(b.function("count")(3))
    b.close()
    out.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000_000):
            pass
    except KeyboardInterrupt:
        out.append("KeyboardInterrupt")
    return out


def test_sigint_with_two_runtimes_closed_out_of_order():
    assert run_child(two_runtimes_scenario, timeout=120) == ["KeyboardInterrupt", 3, True,
                                                              "KeyboardInterrupt"]
