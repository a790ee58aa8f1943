"""Scenarios: replacing functions while frames of them are live on the stack.

Each scenario runs in a child process (a broken transfer is a crash, and a
crash must be a failing test that names its signal). At the end of each,
``rt.stats()`` must show no pending returns and the old versions freed.
"""
import ctypes
import threading

import pytest

from childproc import run_child
from scenarios_native import (CHAIN, SUM_V1, SUM_V2, even_odd_scenario, fib_mixed_reference,
                              fib_scenario, loop_osr_scenario)

#: Every deopt scenario runs on the default (fast) paths and on the reference
#: ones (``Runtime(transfer=..., walker=...)``, both set to the value).
PATHS = ["fast", "reference"]

def _glibc_backtrace(limit=4096):
    buf = (ctypes.c_void_p * limit)()
    n = ctypes.CDLL("libc.so.6").backtrace(buf, limit)
    return [buf[i] or 0 for i in range(n)]


def sum_scenario(depth, big_stack, calls="slot", paths="fast"):
    import osrjit
    import unwinder
    out = {}
    with osrjit.Runtime(calls=calls, transfer=paths, walker=paths) as rt:
        rt.compile(SUM_V1)
        v1 = rt.current("sum")

        def on_hook(_):
            if "before" not in out:
                out["before"] = rt.stats()
                rt.replace("sum", SUM_V2)
                frames = unwinder.backtrace()
                out["hijacked_frames"] = sum(f.translated for f in frames)
                out["during"] = rt.stats()
                out["v1_loaded_during"] = v1.loaded
            return 0

        rt.on_hook(on_hook)

        def run():
            out["result"] = rt.function("sum")(depth)

        if big_stack:
            threading.stack_size(512 << 20)
            t = threading.Thread(target=run)
            t.start()
            t.join()
        else:
            run()
        out["after"] = rt.stats()
        out["v1_loaded_after"] = v1.loaded
        out["error"] = repr(rt.last_transfer_error)
    return out


@pytest.mark.parametrize("depth,big_stack,calls", [(1000, False, "slot"), (1000, False, "direct"),
                                                   (100_000, True, "slot")])
@pytest.mark.parametrize("paths", PATHS)
def test_recursive_sum_replaced_at_the_deepest_frame(depth, big_stack, calls, paths):
    out = run_child(sum_scenario, depth, big_stack, calls, paths, timeout=600)
    # Every pending frame finished with the new semantics (2n per level).
    assert out["result"] == depth * (depth + 1), out["error"]
    assert out["hijacked_frames"] == depth + 1          # sum(depth) .. sum(0)
    assert out["during"]["pending_returns"] == depth + 1
    assert out["v1_loaded_during"] is True
    after = out["after"]
    assert after["pending_returns"] == 0
    assert after["transfers"] == depth + 1
    assert after["transfer_failures"] == 0
    assert after["live_versions"] == {"sum": 1}
    assert after["freed_versions"] == 1
    assert out["v1_loaded_after"] is False


@pytest.mark.parametrize("replace_at,calls", [(1, "slot"), (17, "slot"), (55, "slot"),
                                              (17, "direct")])
@pytest.mark.parametrize("paths", PATHS)
def test_fibonacci_replaced_in_the_middle_of_the_call_tree(replace_at, calls, paths):
    result, stats = run_child(fib_scenario, 15, replace_at, calls, paths)
    assert result == fib_mixed_reference(15, replace_at)
    assert result != fib_mixed_reference(15, 10 ** 9)       # the replacement did change it
    assert stats["pending_returns"] == 0 and stats["transfer_failures"] == 0
    assert stats["live_versions"] == {"fib": 1} and stats["freed_versions"] == 1
    assert stats["transfers"] == stats["hijacks"] > 0


@pytest.mark.parametrize("which", ["both", "odd"])
@pytest.mark.parametrize("calls", ["slot", "direct"])
@pytest.mark.parametrize("paths", PATHS)
def test_mutual_recursion_both_or_one_replaced(which, calls, paths):
    n = 40
    result, stats, again, links = run_child(even_odd_scenario, n, which, calls, paths)
    assert again == result
    # Every direct call site left (self-calls in slot mode have none here;
    # cross calls in direct mode) reaches the current version with a plain rel32.
    if calls == "direct":
        assert links and all(link == ("DIRECT", True) for link in links)
    evens = odds = n // 2                      # even(40): 20 even frames and 20 odd frames above the leaf
    expected = 1 + 100 * odds + (10 * evens if which == "both" else 0)
    assert result == expected
    assert stats["pending_returns"] == 0 and stats["transfer_failures"] == 0
    if which == "both":
        assert stats["live_versions"] == {"even": 1, "odd": 1} and stats["freed_versions"] == 2
        assert stats["transfers"] == n + 1
    else:
        assert stats["live_versions"] == {"even": 1, "odd": 1} and stats["freed_versions"] == 1
        assert stats["transfers"] == odds


def chained_scenario(depth, paths="fast"):
    import osrjit
    out = {"stats": []}
    with osrjit.Runtime(transfer=paths, walker=paths) as rt:
        rt.compile(CHAIN.format(k=1))
        v1 = rt.current("sum")

        def on_hook(n):
            if n == 60:
                rt.replace("sum", CHAIN.format(k=2))
            elif n == 30:
                out["v2"] = rt.current("sum")
                rt.replace("sum", CHAIN.format(k=3))
                out["stats"].append(rt.stats())
            return 0

        rt.on_hook(on_hook)
        out["result"] = rt.function("sum")(depth)
        out["after"] = rt.stats()
        out["loaded"] = (v1.loaded, out.pop("v2").loaded)
    return out


@pytest.mark.parametrize("paths", PATHS)
def test_chained_versions_transfer_straight_to_the_newest(paths):
    out = run_child(chained_scenario, 100, paths)
    assert out["result"] == 3 * 100 * 101 // 2           # every frame ends in v3
    during = out["stats"][0]
    # v1 frames 100..61 stay hijacked once (retargeted, never stacked); the
    # frame of n = 60 was hijacked at its hook, resumed in v2's resume entry
    # and is hijacked again there as a v2 frame, with 59..30.
    assert during["hijacks"] == 41 + 31 and during["pending_returns"] == 71   # n = 60 already transferred once
    after = out["after"]
    assert after["pending_returns"] == 0 and after["transfers"] == 72
    assert after["live_versions"] == {"sum": 1} and after["freed_versions"] == 2
    assert out["loaded"] == (False, False)


SPIN = """
def spin(k):
    i = 0
    while hook(i) == 0:
        i = i + 1
    return i

def outer(k):
    return spin(k) + 1000
"""
OUTER_V2 = """
def outer(k):
    return spin(k) + 2000
"""


def spinning_callee_scenario(stop_at, paths="fast"):
    import osrjit
    seen = []
    with osrjit.Runtime(transfer=paths, walker=paths) as rt:
        rt.compile(SPIN)
        v1 = rt.current("outer")

        def on_hook(i):
            if i == 3:
                rt.replace("outer", OUTER_V2)
            if i > 3:
                s = rt.stats()
                seen.append((v1.loaded, s["pending_returns"], s["live_versions"]["outer"]))
            return 1 if i == stop_at else 0

        rt.on_hook(on_hook)
        result = rt.function("outer")(0)
        return result, seen, rt.stats(), v1.loaded


@pytest.mark.parametrize("paths", PATHS)
def test_caller_of_a_looping_callee_is_freed_only_after_the_loop_returns(paths):
    result, seen, stats, v1_loaded = run_child(spinning_callee_scenario, 50, paths)
    assert result == 50 + 2000                      # the caller finished in v2
    # While the callee loops, the old caller stays loaded with one pending return.
    assert seen and all(s == (True, 1, 2) for s in seen)
    assert stats["pending_returns"] == 0 and stats["freed_versions"] == 1
    assert not v1_loaded


@pytest.mark.parametrize("paths", PATHS)
def test_loop_osr_moves_a_running_frame_at_its_next_poll(paths):
    n, at_poll = 100, 11            # poll 1 is the entry poll; poll k+1 ends iteration k
    result, polls, stats = run_child(loop_osr_scenario, n, at_poll, paths)
    switched = at_poll - 1         # iterations 0..switched-1 ran in v1
    assert result == sum(range(switched)) + sum(2 * i for i in range(switched, n))
    assert polls == at_poll
    assert stats["transfers"] == 1 and stats["freed_versions"] == 1
    assert stats["pending_returns"] == 0


def no_stack_scenario():
    import osrjit
    with osrjit.Runtime() as rt:
        rt.compile(SUM_V1)
        rt.on_hook(lambda x: 0)
        v1 = rt.current("sum")
        rt.replace("sum", SUM_V2)
        return rt.stats(), v1.loaded, rt.function("sum")(10)


def test_replacing_a_function_on_no_stack_frees_it_at_once():
    stats, v1_loaded, result = run_child(no_stack_scenario)
    assert stats["hijacks"] == 0 and stats["pending_returns"] == 0
    assert stats["freed_versions"] == 1 and not v1_loaded
    assert stats["live_versions"] == {"sum": 1}
    assert result == 110


INCOMPATIBLE_V1 = """
def f(n):
    hook(n)
    return n
"""
INCOMPATIBLE_V2 = """
def f(n):
    x = n * 2
    hook(n)
    return x + n
"""


def incompatible_scenario():
    import osrjit
    import unwinder
    from deopt import IncompatibleVersion
    out = {}
    with osrjit.Runtime() as rt:
        rt.compile(INCOMPATIBLE_V1)

        def stack():
            return [(f.pc, f.ra_slot, f.stored_pc) for f in unwinder.backtrace()]

        def on_hook(_):
            before = stack()
            try:
                rt.replace("f", INCOMPATIBLE_V2)
            except IncompatibleVersion as e:
                out["error"] = str(e)
                out["site"] = e.site_id
            after = stack()
            # The frames the two walks share (below the Python frames) are identical.
            out["identical"] = before[-60:] == after[-60:]
            return 0

        rt.on_hook(on_hook)
        out["result"] = rt.function("f")(7)
        out["stats"] = rt.stats()
    return out


def test_incompatible_version_is_rejected_before_any_stack_write():
    out = run_child(incompatible_scenario)
    assert "x" in out["error"] and out["site"] is not None
    assert out["identical"]
    assert out["result"] == 7                      # the old version kept running
    s = out["stats"]
    assert s["hijacks"] == 0 and s["live_versions"] == {"f": 1} and s["freed_versions"] == 0


RESUME_CHAIN_V1 = """
def f(n):
    a = hook(n)
    b = hook(a + 1)
    return a + b

def outer(n):
    return f(n) + 1
"""
RESUME_CHAIN_V2 = """
def f(n):
    a = hook(n)
    b = hook(a + 1)
    return a + b + 100
"""


def backtraces_in_resume_scenario(paths="fast"):
    import osrjit
    import unwinder
    out = {}
    with osrjit.Runtime(transfer=paths, walker=paths) as rt:
        rt.compile(RESUME_CHAIN_V1)

        def observe(record):
            # Inside the transfer: the stub's frame is live and the original
            # return address is back in its slot.
            out["in_transfer_glibc"] = _glibc_backtrace()
            out["in_transfer_ours"] = [f.pc for f in unwinder.backtrace()]

        rt.native_backend.deopt.observer = observe

        def on_hook(x):
            if x == 5:
                rt.replace("f", RESUME_CHAIN_V2)
            elif x == 6:
                out["glibc"] = _glibc_backtrace()
                frames = unwinder.backtrace()
                out["ours"] = [f.pc for f in frames]
                out["names"] = [(f.pc, f.symbol) for f in frames]
            return x

        rt.on_hook(on_hook)
        out["jit"] = {}
        out["result"] = rt.function("outer")(5)
        f2 = rt.current("f")
        out["f2_resume"] = (f2.resume_entry, f2.code_range)
        out["outer"] = rt.current("outer").code_range
        out["stub"] = (rt.native_backend.deopt.stub_address - 1, rt.native_backend.deopt.return_address + 1)
    return out


def _suffix_from(pcs, pred):
    i = next(i for i, pc in enumerate(pcs) if pred(pc))
    return pcs[i:]


@pytest.mark.parametrize("paths", PATHS)
def test_glibc_backtrace_inside_a_resume_entry_and_inside_the_stub(paths):
    out = run_child(backtraces_in_resume_scenario, paths)
    assert out["result"] == 5 + 6 + 100 + 1
    lo, hi = out["f2_resume"][1]
    in_f2 = lambda pc: lo <= pc < hi
    # Inside the resume entry (the second hook): glibc and we agree from the
    # resumed frame down, and its caller is outer.
    g = _suffix_from(out["glibc"], in_f2)
    o = _suffix_from(out["ours"], in_f2)
    assert o[:len(g)] == g and len(g) > 10
    olo, ohi = out["outer"]
    assert olo <= g[1] < ohi                     # resumed frame -> outer (stub CFI / frame rebuilt)
    if paths == "fast":
        return          # the observer is a hook of the Python transfer: no Python runs inside
    # Inside the transfer: glibc walks through the stub into the old frame.
    slo, shi = out["stub"]
    in_stub = lambda pc: slo <= pc < shi
    g = _suffix_from(out["in_transfer_glibc"], in_stub)
    o = _suffix_from(out["in_transfer_ours"], in_stub)
    assert o[:len(g)] == g and len(g) > 10


def bad_requests_scenario(paths="fast"):
    import osrjit
    from osrjit.errors import UnknownFunction, VersionInUse
    out = []
    with osrjit.Runtime(transfer=paths, walker=paths) as rt:
        rt.compile(SUM_V1 + "\ndef other(n):\n    return n\n")
        for call in (lambda: rt.replace("nope", SUM_V2),
                     lambda: rt.replace("sum", SUM_V2 + "\ndef extra(n):\n    return n\n"),
                     lambda: rt.replace(["sum", "other"], SUM_V2),
                     lambda: rt.replace([], SUM_V2),
                     lambda: rt.replace("sum", "def sum(n):\n    return n +\n")):
            try:
                call()
                out.append(None)
            except (UnknownFunction, osrjit.CompileError, ValueError) as e:
                out.append(type(e).__name__)

        def on_hook(_):
            rt.replace("sum", SUM_V2)
            try:
                rt.close()
            except VersionInUse as e:
                out.append("close refused: " + str(e))
            return 0

        rt.on_hook(on_hook)
        rt.function("sum")(3)
        out.append(rt.stats()["pending_returns"])
        out.append(len(rt.versions("sum")))
    return out


@pytest.mark.parametrize("paths", PATHS)
def test_bad_replacement_requests_change_nothing(paths):
    out = run_child(bad_requests_scenario, paths)
    assert out[:5] == ["UnknownFunction", "CompileError", "CompileError", "ValueError", "CompileError"]
    assert out[5].startswith("close refused: cannot close the runtime: 4 hijacked frames")
    assert out[6:] == [0, 1]
