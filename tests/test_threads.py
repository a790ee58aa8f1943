"""Scenarios: replacement while other native threads run the code being replaced.

Every scenario runs in a child process. Threads park at safepoint polls (entry
and loop back-edges) or, in poll-free code, on the runtime's signal; the
stop-the-world walks every stack, hijacks old frames and releases.
"""
import ctypes
import random
import signal
import threading
import time

import pytest

from childproc import run_child
from scenarios_native import PAUSE, WORK, workers_scenario

#: (transfer, walker): the defaults (the fast paths), and the reference paths.
PATHS = [("fast", "fast"), ("reference", "reference")]


@pytest.mark.parametrize("replacements", [60])
@pytest.mark.parametrize("transfer,walker", PATHS)
def test_four_threads_recursing_while_main_replaces(replacements, transfer, walker):
    results, errors, stats, depths = run_child(workers_scenario, 4, 1000, replacements, 1,
                                               transfer, walker, timeout=600)
    assert not errors
    assert results
    # Each frame contributes 1 or 2 (the version it returned in).
    assert all(d <= r <= 2 * d for d, r in results)
    # Runs that mix both versions need a stop that lands while a thread
    # unwinds (no polls there: only the signal can); whether one does is a
    # matter of timing, so it is not asserted here. It is in
    # test_native_transfer.py::test_threads_stopped_while_unwinding_through_native_transfers.
    assert stats["pending_returns"] == 0 and stats["transfer_failures"] == 0
    assert stats["transfers"] == stats["hijacks"] > 0
    assert stats["live_versions"] == {"pause": 1, "work": 1}
    assert stats["freed_versions"] == replacements
    # The replacements' stops, and those of the background reclamation.
    assert stats["stops"] == replacements + stats["reclaim_stops"]


@pytest.mark.slow
@pytest.mark.parametrize("transfer,walker", PATHS)
def test_four_threads_thousand_replacements(transfer, walker):
    results, errors, stats, depths = run_child(workers_scenario, 4, 1000, 1000, 2, transfer,
                                               walker, timeout=3000)
    assert not errors and results
    assert all(d <= r <= 2 * d for d, r in results)
    assert stats["pending_returns"] == 0 and stats["transfers"] == stats["hijacks"]
    assert stats["live_versions"] == {"pause": 1, "work": 1} and stats["freed_versions"] == 1000


SPIN = """
def spin(n):
    x = 1
    i = 0
    while i < n:
        x = (x * 1103515245 + 12345) % 2147483648
        i = i + 1
    return x % 2
"""
CALLER = """
def caller(n):
    return spin(n) + {k}
"""


def poll_free_scenario(iterations, transfer="fast", walker="fast"):
    import osrjit
    out = {}
    with osrjit.Runtime(transfer=transfer, walker=walker) as rt:
        rt.compile(SPIN, polls=False)
        rt.compile(CALLER.format(k=1000))
        v1 = rt.current("caller")
        caller = rt.function("caller")
        started = threading.Event()

        def run():
            started.set()
            out["result"] = caller(iterations)

        t = threading.Thread(target=run, name="spinner")
        t.start()
        started.wait()
        time.sleep(0.1)                    # well inside the poll-free loop
        rt.replace("caller", CALLER.format(k=2000))
        out["during"] = rt.stats()
        out["v1_loaded_during"] = v1.loaded
        t.join()
        out["after"] = rt.stats()
        out["v1_loaded_after"] = v1.loaded
        out["spin_alone"] = rt.function("spin")(iterations)
    return out


@pytest.mark.parametrize("transfer,walker", PATHS)
def test_poll_free_loop_stops_on_the_signal_and_the_caller_transfers_later(transfer, walker):
    out = run_child(poll_free_scenario, 400_000_000, transfer, walker, timeout=600)
    during = out["during"]
    assert during["signals_sent"] >= 1
    assert during["pending_returns"] == 1 and out["v1_loaded_during"]
    assert out["result"] == out["spin_alone"] + 2000      # the caller finished in v2
    after = out["after"]
    assert after["pending_returns"] == 0 and after["transfers"] == 1
    assert after["freed_versions"] == 1 and not out["v1_loaded_after"]


RACE = """
def leaf(n):
    return hook(n) + {k}

def tree(n):
    if n == 0:
        return leaf(n)
    return tree(n - 1) + 1
"""


def race_scenario(replacements, seed, n_threads, transfer="fast", walker="fast"):
    import osrjit
    errors = []
    outcomes = []
    done = threading.Event()
    with osrjit.Runtime(transfer=transfer, walker=walker) as rt:
        rt.compile(RACE.format(k=0))
        rt.on_hook(lambda x: x)
        tree = rt.function("tree")

        def worker(i):
            rng = random.Random(seed * 100 + i)
            try:
                while not done.is_set():
                    action = rng.random()
                    if action < 0.6:
                        d = rng.randint(0, 60)
                        r = tree(d)
                        outcomes.append((d, r))
                    elif action < 0.8:
                        # A short-lived thread: enters, leaves and exits (detaches).
                        t = threading.Thread(target=lambda: outcomes.append((3, tree(3))))
                        t.start()
                        t.join()
                    else:
                        time.sleep(rng.random() * 0.0005)
            except BaseException as e:  # noqa: BLE001
                errors.append(repr(e))

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
        for t in ts:
            t.start()
        rng = random.Random(seed)
        for i in range(replacements):
            which = rng.choice(["leaf", "tree"])
            if which == "leaf":
                rt.replace("leaf", "def leaf(n):\n    return hook(n) + %d\n" % (i % 2))
            else:
                rt.replace("tree", "def tree(n):\n    if n == 0:\n        return leaf(n)\n"
                                   "    return tree(n - 1) + 1\n")
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.0005)
        done.set()
        for t in ts:
            t.join()
        stats = rt.stats()
        rt.collect()
        final = rt.stats()
    return errors, outcomes, stats, final


@pytest.mark.parametrize("replacements", [1000])
@pytest.mark.parametrize("transfer,walker", PATHS + [("fast", "reference")])
def test_replacement_racing_with_threads_entering_leaving_and_hooking(replacements, transfer,
                                                                      walker):
    errors, outcomes, stats, final = run_child(race_scenario, replacements, 7, 3, transfer,
                                               walker, timeout=900)
    assert not errors
    assert outcomes
    assert all(r in (d, d + 1) for d, r in outcomes)      # leaf adds 0 or 1, never anything else
    # No lost or double transfer: every hijack was returned through exactly once.
    assert stats["pending_returns"] == 0
    assert stats["transfers"] + stats["transfer_failures"] == stats["hijacks"]
    assert stats["transfer_failures"] == 0
    assert final["live_versions"] == {"leaf": 1, "tree": 1}


@pytest.mark.slow
@pytest.mark.parametrize("transfer,walker", PATHS)
def test_replacement_race_ten_thousand_times(transfer, walker):
    errors, outcomes, stats, final = run_child(race_scenario, 10_000, 11, 3, transfer, walker,
                                               timeout=3000)
    assert not errors and outcomes
    assert stats["pending_returns"] == 0
    assert stats["transfers"] == stats["hijacks"]
    assert final["live_versions"] == {"leaf": 1, "tree": 1}


def timeout_scenario():
    import osrjit
    from osrjit.native.threads import SafepointTimeout
    out = {}
    with osrjit.Runtime() as rt:
        rt.compile(SPIN, polls=False)
        rt.compile(CALLER.format(k=1000))
        caller = rt.function("caller")
        sig = rt.native_backend.signal.signal
        started = threading.Event()

        def run():
            # This thread refuses the runtime's signal: it cannot be stopped
            # while it spins in poll-free code.
            mask = (ctypes.c_uint64 * 16)()
            mask[(sig - 1) // 64] |= 1 << ((sig - 1) % 64)
            ctypes.CDLL("libc.so.6").pthread_sigmask(0, ctypes.byref(mask), None)  # SIG_BLOCK
            started.set()
            out["result"] = caller(600_000_000)

        t = threading.Thread(target=run, name="stubborn")
        t.start()
        started.wait()
        time.sleep(0.05)
        before = rt.stats()
        try:
            rt.replace("caller", CALLER.format(k=2000), timeout=0.3)
        except SafepointTimeout as e:
            out["error"] = str(e)
            out["threads"] = e.threads
        out["stats"] = rt.stats()
        out["before"] = before
        out["versions"] = len(rt.versions("caller"))
        t.join()
        out["spin"] = rt.function("spin")(600_000_000)
    return out


def test_a_thread_that_will_not_stop_times_out_and_nothing_is_modified():
    out = run_child(timeout_scenario, timeout=600)
    assert "stubborn" in out["error"] and "no stack was modified" in out["error"]
    assert out["threads"] == [("stubborn", "IN_JIT")]
    s = out["stats"]
    assert s["hijacks"] == 0 and s["pending_returns"] == 0 and out["versions"] == 1
    assert out["result"] == out["spin"] + 1000             # ran v1 undisturbed


REENTRANT = """
def inner(n):
    return hook(n) + 1

def loop(n):
    s = 0
    i = 0
    while i < n:
        s = s + inner(i)
        i = i + 1
    return s
"""


def reentrant_scenario(paths="fast"):
    import osrjit
    out = {}
    with osrjit.Runtime(transfer=paths, walker=paths) as rt:
        rt.compile(REENTRANT)
        loop = rt.function("loop")
        replaced = threading.Event()

        def on_hook(x):
            if threading.current_thread().name == "replacer" and x == 50 and not replaced.is_set():
                rt.replace("inner", "def inner(n):\n    return hook(n) + 2\n")
                replaced.set()
            return 0

        rt.on_hook(on_hook)
        res = {}
        ts = [threading.Thread(target=lambda n=n: res.__setitem__(n, loop(200)), name=n)
              for n in ("replacer", "other-1", "other-2")]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        out["results"] = res
        out["stats"] = rt.stats()
    return out


@pytest.mark.parametrize("paths", ["fast", "reference"])
def test_replace_from_a_hook_while_other_threads_run(paths):
    out = run_child(reentrant_scenario, paths)
    r = out["results"]
    assert 200 < r["replacer"] <= 400 and r["replacer"] > 200
    assert all(200 <= r[n] <= 400 for n in r)
    s = out["stats"]
    assert s["pending_returns"] == 0 and s["live_versions"] == {"inner": 1, "loop": 1}


def foreign_signal_scenario():
    import osrjit
    hits = []
    signal.signal(signal.SIGUSR1, lambda *a: hits.append("usr1"))
    with osrjit.Runtime() as rt:
        ours = rt.native_backend.signal.signal
        rt.compile(PAUSE + WORK.format(k=1))
        rt.replace("work", WORK.format(k=2))
        signal.raise_signal(signal.SIGUSR1)
        value = rt.function("work")(10)
    # After close the runtime's signal is back to its previous action.
    act = (ctypes.c_uint8 * 152)()
    ctypes.CDLL("libc.so.6").sigaction(ours, None, ctypes.byref(act))
    handler = int.from_bytes(bytes(act[:8]), "little")
    return hits, value, handler, signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL


def test_signals_the_runtime_does_not_own_are_untouched():
    hits, value, handler, usr1_kept = run_child(foreign_signal_scenario)
    assert hits == ["usr1"] and usr1_kept
    assert value == 20
    assert handler == 0                      # SIG_DFL restored for the runtime's signal


def test_a_late_detach_does_not_forget_a_thread_that_reused_the_ident():
    # A thread's block can be collected after a new thread got the same
    # pthread id and attached; the registry must keep the new thread.
    from osrjit.native.threads import ThreadRegistry, ThreadState, _Holder

    reg = ThreadRegistry(key=0)
    old, new = _Holder.__new__(_Holder), _Holder.__new__(_Holder)
    for h in (old, new):
        h.state, h.ident, h._registry = ThreadState(), 42, reg
    with reg._lock:
        reg._states[42] = (old.state, "old")
        reg._states[42] = (new.state, "new")      # the new thread attached with the same id
    reg._detach(old)                             # the old block is collected late
    assert [name for _, _, name in reg.snapshot()] == ["new"]
    reg._detach(new)
    assert reg.snapshot() == []


def test_settled_status_waits_out_a_flicker_and_reports_a_running_thread():
    from osrjit.native import threads
    from osrjit.errors import OsrJitError
    st = threads.ThreadState()
    st.status = threads.SCANNING          # a stopped thread leaving an old futex wait
    t = threading.Timer(0.05, lambda: setattr(st, "status", threads.PARKED))
    t.start()
    assert threads.settled_status(st) == threads.PARKED
    t.join()
    st.status = threads.IN_JIT            # would be running JIT code: a bug, reported
    with pytest.raises(OsrJitError, match="IN_JIT"):
        threads.settled_status(st, timeout=0.05)
