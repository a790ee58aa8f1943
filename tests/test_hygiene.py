"""Resource hygiene: what a runtime takes from the process, close() gives back.

* Many runtimes in one process (:func:`osrjit.testing.hygiene.runtime_cycles`):
  each cycle creates a runtime, compiles, calls on two threads (a replace
  from the hook with frames live: every cycle under ``-m slow``, one pair of
  cycles in ten in CI), closes; none fails — also past the
  1,024 pthread keys a process has — and the process holds no more after
  the warm-up: RSS grows by less than 4 KiB per cycle, fds and threads stay
  flat, every closed runtime is collected. The cycles compile at
  ``opt_level=0``: llvmlite's ``O1``-``O3`` pass pipeline leaks about 60 KB per
  compile in the process that runs it (``osrjit/native/compiler.py``), which is
  not the runtime's to give back; ``compiler="worker"`` runs it elsewhere.
* A closed runtime is collectable and leaves nothing registered in the process.
* close() refuses (releasing nothing) while a thread is inside compiled code.
* Real-time signals: each open runtime holds its own; when none is left the
  next runtime fails at construction, leaking nothing.
* Two runtimes alive at once, each with threads, replaces and hooks, side by side.

Every scenario runs in a child process (``run_child``).
"""
import ctypes
import gc
import random
import threading
import time
import weakref

import pytest

from childproc import run_child
from scenarios_native import PAUSE

#: (transfer, walker): the defaults (the fast paths), and the reference paths.
PATHS = [("fast", "fast"), ("reference", "reference")]
#: Runtime cycles in CI (more than the 1,024 pthread keys of a process; one
#: pair of cycles in CI_REPLACE_EVERY replaces, to stay near a minute) and
#: under -m slow (every cycle replaces).
CI_CYCLES = 1_050
CI_REPLACE_EVERY = 10
SLOW_CYCLES = 10_000
#: RSS growth per cycle allowed after the warm-up (bytes).
RSS_PER_CYCLE_LIMIT = 4096


# --------------------------------------------------------------------------
# Many runtimes, one after another
# --------------------------------------------------------------------------

def cycles_scenario(cycles, replace_every):
    from osrjit.testing.hygiene import runtime_cycles
    return runtime_cycles(cycles, replace_every=replace_every)


def _check_cycles(report, cycles):
    assert report.failure is None, report.summary()
    assert report.cycles == cycles
    end, warm = report.end, report.warmup
    assert report.rss_growth_per_cycle_bytes < RSS_PER_CYCLE_LIMIT, report.summary()
    assert (end.fds, end.native_threads, end.python_threads) == \
        (warm.fds, warm.native_threads, warm.python_threads), report.summary()
    assert end.runtimes_alive == 0, report.summary()


def test_more_runtimes_than_pthread_keys_one_after_another():
    _check_cycles(run_child(cycles_scenario, CI_CYCLES, CI_REPLACE_EVERY, timeout=600),
                  CI_CYCLES)


@pytest.mark.slow
def test_ten_thousand_runtimes_one_after_another():
    _check_cycles(run_child(cycles_scenario, SLOW_CYCLES, 1, timeout=3600), SLOW_CYCLES)


# --------------------------------------------------------------------------
# One closed runtime: collectable, nothing left registered
# --------------------------------------------------------------------------

def _signal_handler(sig):
    """The handler address installed for ``sig`` (0: SIG_DFL), read with sigaction(2)."""
    act = (ctypes.c_uint8 * 152)()           # struct sigaction; sa_handler first
    ctypes.CDLL("libc.so.6").sigaction(sig, None, ctypes.byref(act))
    return int.from_bytes(bytes(act[:8]), "little")


def _free_pthread_key():
    """The index the next pthread_key_create would give (created and deleted)."""
    libc = ctypes.CDLL("libc.so.6")
    key = ctypes.c_uint()
    assert libc.pthread_key_create(ctypes.byref(key), None) == 0
    assert libc.pthread_key_delete(key) == 0
    return key.value


def collectable_scenario(transfer, walker):
    import unwinder
    import osrjit
    from osrjit.testing.hygiene import CYCLE_V1, CYCLE_V2
    space = unwinder.AddressSpace.current_process()
    before = {"filters": len(space.return_address_filters), "key": _free_pthread_key()}
    helper_ready, helper_go = threading.Event(), threading.Event()
    calls = {}

    rt = osrjit.Runtime(transfer=transfer, walker=walker)
    rt.compile(CYCLE_V1)
    f = rt.function("f")

    def on_hook(_):                           # closes over rt: a cycle through the callback
        if not rt.stats()["hijacks"]:
            rt.replace("f", CYCLE_V2)
        return 0
    rt.on_hook(on_hook)
    calls["main"] = f(20)

    def helper():                             # attached, and alive after close()
        calls["helper"] = f(20)
        helper_ready.set()
        helper_go.wait()
    t = threading.Thread(target=helper, name="helper")
    t.start()
    helper_ready.wait()
    backend = rt.native_backend
    sig = backend.signal.signal
    blocks = [weakref.ref(st) for _ident, st, _name in backend.registry.snapshot()]
    # The runtime's code objects in the unwinder (the JIT libraries it registered).
    registered = [lib.registration[1] for lib in backend.linker.libraries() if lib.registration]
    stats = rt.stats()
    during = {"filters": len(space.return_address_filters), "key": _free_pthread_key(),
              "handler": _signal_handler(sig), "registered": len(registered),
              "in_space": sum(1 for m in space.modules if any(m is r for r in registered))}
    refs = [weakref.ref(rt), weakref.ref(backend), weakref.ref(backend.linker)]
    rt.close()
    del rt, backend, f, on_hook
    gc.collect()
    after = {"filters": len(space.return_address_filters), "key": _free_pthread_key(),
             "handler": _signal_handler(sig),
             "in_space": sum(1 for m in space.modules if any(m is r for r in registered)),
             "alive": [r() is not None for r in refs],
             "blocks_alive": [b() is not None for b in blocks], "garbage": len(gc.garbage)}
    helper_go.set()
    t.join()
    return before, during, after, calls, stats


@pytest.mark.parametrize("transfer,walker", PATHS)
def test_a_closed_runtime_is_collected_and_leaves_nothing_registered(transfer, walker):
    before, during, after, calls, stats = run_child(collectable_scenario, transfer, walker)
    assert calls == {"main": 210, "helper": 210}
    assert stats["transfers"] == stats["hijacks"] == 21 and stats["attached_threads"] == 2
    # While open: a return-address filter, code objects, a pthread key, a signal handler.
    assert during["filters"] == before["filters"] + 1
    assert during["in_space"] == during["registered"] >= 4
    assert during["key"] != before["key"] and during["handler"] != 0
    # Closed and dropped: each given back; the runtime, its backend and linker
    # collected, and the block of the helper thread (still running) freed.
    assert (after["filters"], after["key"], after["in_space"]) == \
        (before["filters"], before["key"], 0)
    assert after["handler"] == 0                       # SIG_DFL, as before
    assert after["alive"] == [False, False, False] and after["garbage"] == 0
    assert len(after["blocks_alive"]) == 2 and not any(after["blocks_alive"])


# --------------------------------------------------------------------------
# close() while compiled code runs
# --------------------------------------------------------------------------

def close_in_use_scenario():
    import osrjit
    from osrjit.testing.hygiene import CYCLE_V1
    out = {}
    rt = osrjit.Runtime()
    rt.compile(CYCLE_V1)
    f = rt.function("f")
    inside, leave = threading.Event(), threading.Event()

    def on_hook(_):
        if threading.current_thread().name == "in-hook":
            inside.set()
            leave.wait()
        elif "from_hook" not in out:
            try:
                rt.close()
            except osrjit.VersionInUse as e:
                out["from_hook"] = str(e)
        return 0
    rt.on_hook(on_hook)
    out["main"] = f(10)
    t = threading.Thread(target=lambda: out.__setitem__("thread", f(10)), name="in-hook")
    t.start()
    inside.wait()
    try:
        rt.close()
    except osrjit.VersionInUse as e:
        out["while_in_hook"] = str(e)
    out["still_open"] = (not rt.closed, f(4))
    leave.set()
    t.join()
    rt.close()
    out["closed"] = rt.closed
    try:
        f(1)
    except osrjit.RuntimeClosed:
        out["call_after_close"] = "RuntimeClosed"
    return out


def test_close_refuses_while_a_thread_is_inside_compiled_code():
    out = run_child(close_in_use_scenario)
    assert "MainThread in f (in a hook or service called from JIT code" in out["from_hook"]
    assert "in-hook in f (in a hook or service called from JIT code)" in out["while_in_hook"]
    assert out["still_open"] == (True, 10)
    assert out["main"] == out["thread"] == 55
    assert out["closed"] and out["call_after_close"] == "RuntimeClosed"


# --------------------------------------------------------------------------
# Real-time signals: one per open runtime
# --------------------------------------------------------------------------

def signals_scenario(failed_attempts):
    import osrjit
    runtimes = []
    while True:
        try:
            runtimes.append(osrjit.Runtime(opt_level=0))
        except osrjit.ResourceExhausted as e:
            error = (e.resource, str(e))
            break
        if len(runtimes) > 64:
            raise AssertionError("no limit on real-time signals?")
    signals = [rt.native_backend.signal.signal for rt in runtimes]
    # Failed constructions give back what they took (the key, the LLJITs).
    key = _free_pthread_key()
    for _ in range(failed_attempts):
        try:
            osrjit.Runtime(opt_level=0)
        except osrjit.ResourceExhausted:
            pass
    key_after_failures = _free_pthread_key()
    # Every runtime still works.
    for rt in runtimes[:3]:
        rt.compile("def g(n):\n    return n + 1\n")
        assert rt.function("g")(1) == 2
    last = runtimes.pop()
    last.close()
    again = osrjit.Runtime(opt_level=0)
    reused = again.native_backend.signal.signal
    runtimes.append(again)
    for rt in runtimes:
        rt.close()
    handlers = [_signal_handler(s) for s in signals]
    reopened = [osrjit.Runtime(opt_level=0) for _ in signals]
    for rt in reopened:
        rt.close()
    return signals, error, key, key_after_failures, reused, handlers, len(reopened)


def test_each_open_runtime_holds_its_own_signal_and_one_more_fails_clearly():
    signals, error, key, key_after, reused, handlers, reopened = run_child(signals_scenario, 20)
    assert len(signals) >= 2 and len(set(signals)) == len(signals)
    assert error[0] == "real-time signal" and "close a runtime first" in error[1]
    assert key_after == key                  # the failed constructions deleted their keys
    assert reused == signals[-1]             # closing gave the signal back
    assert handlers == [0] * len(signals)    # SIG_DFL again, each
    assert reopened == len(signals)


# --------------------------------------------------------------------------
# Two runtimes side by side
# --------------------------------------------------------------------------

#: Recurses ``n`` deep, spins in ``pause`` (polls) at the bottom and calls
#: the hook there; each frame adds ``k`` (1 or 2) on the way back.
WORK_HOOKED = """
def work(n):
    if n == 0:
        return pause(100000) + 0 * hook(n)
    return {k} + work(n - 1)
"""


def two_runtimes_scenario(transfer, walker, replacements, seed):
    import osrjit
    rng = random.Random(seed)
    stop = threading.Event()
    errors = []
    names = ("A", "B")
    rts = {n: osrjit.Runtime(transfer=transfer, walker=walker) for n in names}
    results = {n: [] for n in names}
    hooks = {n: [] for n in names}
    nested = {n: [] for n in names}
    for n, rt in rts.items():
        rt.compile(PAUSE + WORK_HOOKED.format(k=1))
    work = {n: rt.function("work") for n, rt in rts.items()}

    def hook_of(name):
        other = "B" if name == "A" else "A"

        def on_hook(_):
            me = threading.current_thread().name
            hooks[name].append(me)
            # Now and then, from inside this runtime's code, call into the
            # other runtime's (its hook, seeing a foreign thread, only counts).
            if me.startswith(name) and len(hooks[name]) % 7 == 0:
                nested[name].append(work[other](5))
            return 0
        return on_hook
    for n, rt in rts.items():
        rt.on_hook(hook_of(n))

    def worker(name, depth):
        try:
            while not stop.is_set():
                results[name].append((depth, work[name](depth)))
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    threading.stack_size(64 << 20)
    threads = [threading.Thread(target=worker, args=(n, rng.randint(100, 1000)), name=f"{n}-{i}")
               for n in names for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    for i in range(replacements):
        for n in names:
            rts[n].replace("work", WORK_HOOKED.format(k=2 if i % 2 == 0 else 1))
    stop.set()
    for t in threads:
        t.join()
    stats = {n: rt.stats() for n, rt in rts.items()}
    signals = {n: rt.native_backend.signal.signal for n, rt in rts.items()}
    foreign = {n: sum(1 for me in hooks[n] if not me.startswith(n)) for n in names}
    for rt in rts.values():
        rt.close()
    return results, errors, stats, signals, nested, foreign


@pytest.mark.parametrize("transfer,walker", PATHS)
def test_two_runtimes_with_threads_replaces_and_hooks_side_by_side(transfer, walker):
    results, errors, stats, signals, nested, foreign = run_child(
        two_runtimes_scenario, transfer, walker, 20, 5, timeout=600)
    assert not errors
    assert signals["A"] != signals["B"]
    for n in ("A", "B"):
        assert results[n] and all(d <= r <= 2 * d for d, r in results[n])
        assert all(5 <= r <= 10 for r in nested[n])
        s = stats[n]
        assert s["pending_returns"] == 0 and s["transfer_failures"] == 0
        assert s["transfers"] == s["hijacks"] > 0
        assert s["live_versions"] == {"pause": 1, "work": 1}
        assert s["freed_versions"] == s["stops"] - s["reclaim_stops"] == 20
        assert s["attached_threads"] == 0           # every thread exited
    # A nested call runs the other runtime's hook on a foreign thread: exactly those.
    assert foreign["A"] == len(nested["B"]) and foreign["B"] == len(nested["A"])
