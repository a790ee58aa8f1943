"""Life cycle: close() while code runs, a closed runtime, fork, failed replaces.

* ``close()`` from a hook, or while another thread is inside compiled code,
  raises :class:`osrjit.RuntimeBusy` naming the threads and functions — after
  waiting up to ``close(timeout=...)`` for other threads — and the runtime
  keeps working; a close racing with calls never lets a call into unmapped code.
* After ``close()`` every method raises :class:`osrjit.RuntimeClosed`;
  ``stats()`` reports nothing loaded.
* A child forked while a runtime exists replaces from the forking thread with
  100 frames live; the threads that did not survive the fork are forgotten.
* A ``replace()`` that fails at any step publishes nothing: the old version is
  current, computes the old results, and no frame was hijacked.

Every native scenario runs in a child process (a crash is a failed test).
"""
import os
import threading

import pytest

from childproc import run_child

#: f(n) = n(n+1)/2 with the hook answering 0; V2 adds 2n per frame, so a frame
#: that finished in V2 shows in the result: V2 everywhere gives n(n+1).
V1 = """
def f(n):
    if n == 0:
        return hook(0)
    return n + f(n - 1)
"""
V2 = """
def f(n):
    if n == 0:
        return hook(0)
    r = f(n - 1)
    return r + 2 * n
"""
V3 = """
def f(n):
    if n == 0:
        return hook(0)
    r = f(n - 1)
    return 3 * n + r
"""
#: A version whose frames V1's cannot resume in (no hook site): IncompatibleVersion.
INCOMPATIBLE = """
def f(n):
    if n == 0:
        return 0
    return n + f(n - 1)
"""
PATHS = [("python", "python"), ("native", "native")]


def old(n):
    return n * (n + 1) // 2


def new(n):
    return n * (n + 1)


# --------------------------------------------------------------------------
# close() while compiled code runs
# --------------------------------------------------------------------------

def close_from_hook_scenario(transfer, walker):
    import osrjit
    out = {}
    rt = osrjit.Runtime(transfer=transfer, walker=walker)
    rt.compile(V1)
    f = rt.function("f")

    def on_hook(_):
        try:
            rt.close(timeout=60)               # its own frames can never leave: at once
        except osrjit.RuntimeBusy as e:
            out["error"] = (str(e), e.threads, isinstance(e, osrjit.VersionInUse))
        return 0
    rt.on_hook(on_hook)
    out["result"] = f(30)
    rt.on_hook(lambda _: 0)
    out["after"] = (rt.closed, f(5), [v.id for v in rt.replace("f", V2)], f(5))
    rt.close()
    out["closed"] = rt.closed
    return out


@pytest.mark.parametrize("transfer,walker", PATHS)
def test_close_from_a_hook_raises_at_once_and_the_runtime_works_on(transfer, walker):
    out = run_child(close_from_hook_scenario, transfer, walker, timeout=120)
    message, threads, is_version_in_use = out["error"]
    assert message.startswith("cannot close the runtime: threads are inside its compiled code")
    assert "MainThread in f" in message and "the caller of close()" in message
    assert threads[0][:2] == ("MainThread", "f") and is_version_in_use
    assert out["result"] == old(30)
    assert out["after"] == (False, old(5), [2], new(5))
    assert out["closed"]


def close_while_another_thread_waits_in_a_hook_scenario(transfer, walker):
    import osrjit
    out = {}
    rt = osrjit.Runtime(transfer=transfer, walker=walker)
    rt.compile(V1)
    f = rt.function("f")
    inside, leave = threading.Event(), threading.Event()

    def on_hook(_):
        if threading.current_thread().name == "worker":
            inside.set()
            leave.wait()
        return 0
    rt.on_hook(on_hook)
    worker = threading.Thread(target=lambda: out.__setitem__("worker", f(40)), name="worker")
    worker.start()
    inside.wait()
    try:
        rt.close()                            # timeout 0: the worker is in its hook
    except osrjit.RuntimeBusy as e:
        out["error"] = (str(e), e.threads)
    out["open"] = (rt.closed, f(6))           # this thread may still call
    leave.set()
    worker.join()
    out["replaced"] = (f(7), rt.replace("f", V2)[0].id, f(7))
    rt.close()
    out["closed"] = rt.closed
    return out


@pytest.mark.parametrize("transfer,walker", PATHS)
def test_close_while_a_worker_waits_in_a_hook_raises_and_the_worker_finishes(transfer, walker):
    out = run_child(close_while_another_thread_waits_in_a_hook_scenario, transfer, walker,
                    timeout=120)
    message, threads = out["error"]
    assert "worker in f (in a hook or service called from JIT code)" in message
    assert [t[:2] for t in threads] == [("worker", "f")]
    assert out["open"] == (False, old(6))
    assert out["worker"] == old(40)
    assert out["replaced"] == (old(7), 2, new(7))
    assert out["closed"]


def close_waits_for_a_worker_scenario():
    import osrjit
    out = {}
    rt = osrjit.Runtime()
    rt.compile(V1)
    f = rt.function("f")
    inside, leave = threading.Event(), threading.Event()

    def on_hook(_):
        if threading.current_thread().name == "worker":
            inside.set()
            leave.wait()
        return 0
    rt.on_hook(on_hook)
    worker = threading.Thread(target=lambda: out.__setitem__("worker", f(25)), name="worker")
    worker.start()
    inside.wait()
    closer = threading.Thread(target=lambda: out.__setitem__("close", rt.close(timeout=300)))
    closer.start()
    leave.set()                     # before or after close() started waiting: either way it closes
    closer.join()
    worker.join()
    out["closed"] = rt.closed
    try:
        f(1)
    except osrjit.RuntimeClosed:
        out["call_after"] = "RuntimeClosed"
    return out


def test_close_with_a_timeout_waits_for_other_threads_to_leave():
    out = run_child(close_waits_for_a_worker_scenario, timeout=120)
    assert out == {"worker": old(25), "close": None, "closed": True,
                   "call_after": "RuntimeClosed"}


def close_races_calls_scenario(rounds):
    import osrjit
    bad = []
    for _ in range(rounds):
        rt = osrjit.Runtime(opt_level=0)
        rt.compile(V1)
        rt.on_hook(lambda v: v)
        f = rt.function("f")
        counts = []

        def work():
            n = closed = 0
            while not closed:
                try:
                    r = f(50)
                except osrjit.RuntimeClosed:
                    closed = 1
                    continue
                if r != old(50):
                    bad.append(r)
                n += 1
            counts.append(n)
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        busy = 0
        while True:
            try:
                rt.close()
                break
            except osrjit.RuntimeBusy:
                busy += 1
        for t in threads:
            t.join()
    return bad, rt.closed


def test_close_racing_calls_never_lets_a_call_into_unmapped_code():
    # Two threads call f in a loop while this one closes until it succeeds:
    # every call either ran to its result or raised RuntimeClosed.
    bad, closed = run_child(close_races_calls_scenario, 20, timeout=300)
    assert bad == [] and closed


def emulated_close_from_hook_scenario():
    import osrjit
    out = {}
    rt = osrjit.Runtime(backend="emulated")
    rt.compile(V1)

    def on_hook(_):
        try:
            rt.close()
        except osrjit.RuntimeBusy as e:
            out["error"] = str(e)
        return 0
    rt.on_hook(on_hook)
    out["result"] = rt.function("f")(10)
    rt.on_hook(lambda _: 0)
    out["after"] = (rt.closed, rt.function("f")(4))
    rt.close()
    out["closed"] = rt.closed
    return out


def test_emulated_close_from_a_hook_raises_and_the_runtime_works_on():
    out = run_child(emulated_close_from_hook_scenario, timeout=120)
    assert "from a service called by emulated thread" in out["error"]
    assert out["result"] == old(10) and out["after"] == (False, old(4)) and out["closed"]


# --------------------------------------------------------------------------
# A closed runtime
# --------------------------------------------------------------------------

#: Public methods and properties of Runtime / EmulatedRuntime, with arguments;
#: each raises RuntimeClosed once the runtime is closed.
CLOSED_CALLS = {
    "compile": lambda rt, v: rt.compile(V2),
    "compile_ir": lambda rt, v: rt.compile_ir([]),
    "function": lambda rt, v: rt.function("f"),
    "names": lambda rt, v: rt.names(),
    "versions": lambda rt, v: rt.versions("f"),
    "current": lambda rt, v: rt.current("f"),
    "version_at": lambda rt, v: rt.version_at(v.entry),
    "check_compatible": lambda rt, v: rt.check_compatible(v, v),
    "replace": lambda rt, v: rt.replace("f", V2),
    "collect": lambda rt, v: rt.collect(),
    "unload": lambda rt, v: rt.unload(v),
    "on_hook": lambda rt, v: rt.on_hook(None),
    "on_safepoint": lambda rt, v: rt.on_safepoint(None),
    "safepoint_flag": lambda rt, v: rt.safepoint_flag,
    "safepoint_flag=": lambda rt, v: setattr(rt, "safepoint_flag", 1),
    "safepoint_timeout": lambda rt, v: rt.safepoint_timeout,
    "safepoint_timeout=": lambda rt, v: setattr(rt, "safepoint_timeout", 1.0),
    "self_apply_times": lambda rt, v: rt.self_apply_times(),
    "old function": lambda rt, v: v.call(4),
}
NATIVE_ONLY = {"native_backend": lambda rt, v: rt.native_backend}
EMULATED_ONLY = {name: (lambda rt, v, name=name: getattr(rt, name))
                 for name in ("machine", "program", "stub_address", "grace", "old_code_fetches",
                              "old_code_fetch_count", "rolled_forward", "instructions")}
EMULATED_ONLY.update({"spawn": lambda rt, v: rt.spawn("f", 1), "run": lambda rt, v: rt.run(),
                      "stub_frames": lambda rt, v: rt.stub_frames()})


def closed_runtime_scenario(backend):
    import osrjit
    rt = osrjit.Runtime(backend=backend)
    rt.compile(V1)
    rt.on_hook(lambda _: 0)
    f = rt.function("f")
    assert f(3) == old(3)
    v = rt.current("f")
    v.call = f
    before = rt.stats()
    rt.close()
    rt.close()                                # idempotent
    calls = dict(CLOSED_CALLS, **(NATIVE_ONLY if backend == "native" else EMULATED_ONLY))
    raised = {}
    for name, call in calls.items():
        try:
            call(rt, v)
            raised[name] = "returned"
        except osrjit.RuntimeClosed:
            raised[name] = "RuntimeClosed"
        except Exception as e:  # noqa: BLE001 - reported, the test names it
            raised[name] = f"{type(e).__name__}: {e}"
    config = (rt.closed, rt.backend, rt.transfer, rt.walker, rt.compiler)
    return before, rt.stats(), raised, config


@pytest.mark.parametrize("backend", ["native", "emulated"])
def test_after_close_every_method_raises_runtime_closed_and_stats_show_nothing_loaded(backend):
    before, after, raised, config = run_child(closed_runtime_scenario, backend, timeout=120)
    assert {name: r for name, r in raised.items() if r != "RuntimeClosed"} == {}
    assert config[:2] == (True, backend)
    assert before["live_versions"] == {"f": 1} and before["attached_threads"] <= 1
    assert after.keys() == before.keys()
    assert after["live_versions"] == {}
    assert after["pending_returns"] == after["pinned_versions"] == after["attached_threads"] == 0
    assert after["stops"] == before["stops"]          # what happened stays counted


# --------------------------------------------------------------------------
# fork
# --------------------------------------------------------------------------

def fork_scenario(transfer, walker, depth):
    """Another thread sits in a hook with 11 frames of f, hijacked by a
    replace (V1 -> V2); the parent then recurses ``depth`` deep in V2 and
    forks in the hook at the bottom; the child replaces f again (V2 -> V3)
    with those frames live and reports through a pipe; both check results."""
    import osrjit
    rt = osrjit.Runtime(transfer=transfer, walker=walker)
    rt.compile(V1)
    f = rt.function("f")
    inside, leave = threading.Event(), threading.Event()
    state = {"child": False}
    read_end, write_end = os.pipe()

    def on_hook(_):
        if threading.current_thread().name == "other":
            inside.set()
            leave.wait()
            return 0
        if state.get("pid") is not None or state["child"]:
            return 0
        pid = os.fork()
        if pid == 0:
            state["child"] = True
            new_versions = rt.replace("f", V3)       # 'depth' frames of f live below
            state["replaced"] = [v.id for v in new_versions]
            return 0
        state["pid"] = pid
        return 0
    rt.on_hook(on_hook)
    other = threading.Thread(target=lambda: state.__setitem__("other", f(10)), name="other")
    other.start()
    inside.wait()
    rt.replace("f", V2)                              # the other thread's frames: hijacked
    result = f(depth)
    if state["child"]:
        code = 1
        try:
            s = rt.stats()
            report = [result, state["replaced"], s["transfers"], s["attached_threads"],
                      s["pending_returns"], f(depth)]
            rt.close()                                # the other thread was forgotten
            report.append(rt.closed)
            os.write(write_end, repr(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(state["pid"], 0)
    with os.fdopen(read_end) as pipe:
        child = pipe.read()
    leave.set()
    other.join()
    transfers = rt.stats()["transfers"]               # accounts native transfers, reclaims
    parent = [result, state["other"], len(rt.versions("f")), transfers, f(depth)]
    rt.close()
    return os.waitstatus_to_exitcode(status), child, parent


@pytest.mark.parametrize("transfer,walker", PATHS)
def test_a_fork_child_replaces_a_100_deep_recursion(transfer, walker):
    code, child, parent = run_child(fork_scenario, transfer, walker, 100, timeout=120)
    assert code == 0, child
    # Child: every frame (f(100) .. f(0)) finished in V3; the other thread is
    # gone from its registry and its 11 pending returns with it, so close()
    # does not wait for it.
    assert eval(child) == [3 * old(100), [3], 101, 1, 0, 3 * old(100), True]
    # Parent: untouched by the child's replace; the other thread's frames
    # finished in V2 once it left its hook.
    assert parent == [new(100), new(10), 1, 11, new(100)]


def fork_after_native_transfers_scenario():
    """Another thread's hijacked frames transfer natively; the native
    transfer's log of them is not accounted yet (no stop, no stats(), no
    background pass) when the main thread forks in a hook at the bottom of
    a recursion, that thread still alive. The child, where it is gone,
    replaces with its own frames live."""
    import osrjit
    rt = osrjit.Runtime(reclaim_interval=None)       # nothing accounts behind our back
    rt.compile(V1)
    f = rt.function("f")
    inside, leave = threading.Event(), threading.Event()
    returned, in_again, hold = threading.Event(), threading.Event(), threading.Event()
    state = {}

    def on_hook(_):
        name = threading.current_thread().name
        if name == "other":
            if returned.is_set():
                in_again.set()
                hold.wait()                          # in a hook again at the fork
            else:
                inside.set()
                leave.wait()
        elif state["fork"]:
            state["fork"] = False
            if os.fork() == 0:
                code = 1
                try:                                 # the child leaves from here
                    rt.replace("f", V3)              # 51 frames of f live below
                    s = rt.stats()
                    code = 0 if s["pending_returns"] == 51 and s["attached_threads"] == 1 else 3
                finally:
                    os._exit(code)
        return 0
    rt.on_hook(on_hook)
    state["fork"] = False
    def other_thread():
        state["other"] = f(10)
        returned.set()
        f(3)

    other = threading.Thread(target=other_thread, name="other")
    other.start()
    inside.wait()
    rt.replace("f", V2)                              # the other thread's 11 frames: hijacked
    leave.set()
    in_again.wait()                                  # ... transferred natively, unaccounted
    state["fork"] = True
    result = f(50)
    _, status = os.wait()
    hold.set()
    other.join()
    s = rt.stats()
    rt.close()
    return os.waitstatus_to_exitcode(status), state["other"], result, s["transfers"]


def test_a_fork_child_accounts_the_native_transfers_other_threads_logged():
    code, other, result, transfers = run_child(fork_after_native_transfers_scenario, timeout=120)
    assert code == 0
    assert other == new(10) and result == new(50) and transfers == 11


# --------------------------------------------------------------------------
# A replace() that fails publishes nothing
# --------------------------------------------------------------------------

def failed_replace_scenario(transfer, walker, where):
    """Replace f from the hook at the bottom of a 20-deep recursion with a
    failure injected at ``where``; then check nothing changed and a clean
    replace still works."""
    import osrjit
    from osrjit.errors import HijackError, SafepointTimeout
    from osrjit.native.replace import NativePause
    rt = osrjit.Runtime(transfer=transfer, walker=walker)
    rt.compile(V1)
    f = rt.function("f")
    backend = rt.native_backend
    before = rt.current("f")
    stub = backend.deopt.stub_address

    def inject(cls_or_obj, name, error, after=False):
        original = getattr(cls_or_obj, name)

        def failing(*args, **kwargs):
            if after:
                original(*args, **kwargs)
            raise error
        setattr(cls_or_obj, name, failing)
        return lambda: setattr(cls_or_obj, name, original)

    source = V2
    if where == "stop":
        undo = inject(backend.world, "stop", SafepointTimeout([("x", "IN_JIT")], 0.0))
    elif where == "scan":
        undo = inject(NativePause, "scan", osrjit.OsrJitError("injected in the scan"), after=True)
    elif where == "incompatible":
        undo, source = (lambda: None), INCOMPATIBLE
    elif where == "publish":        # after the slot stores and patches were written
        undo = inject(NativePause, "publish", osrjit.PatchError("injected"), after=True)
    elif where == "hijack":
        undo = inject(backend.hijacker, "hijack", HijackError("injected before any write"))
    elif where == "slot check":     # the fifth slot no longer holds its return address
        memory = backend.deopt.memory
        seen = []

        class Stale:
            def __getattr__(self, name):
                return getattr(memory, name)

            def read_u64(self, address):
                if address not in seen:
                    seen.append(address)
                return 0 if seen.index(address) == 4 else memory.read_u64(address)
        backend.deopt.memory = Stale()
        undo = lambda: setattr(backend.deopt, "memory", memory)  # noqa: E731
    out = {}

    def on_hook(_):
        if "error" not in out:
            try:
                rt.replace("f", source)
                out["error"] = None
            except osrjit.OsrJitError as e:
                out["error"] = type(e).__name__
            finally:
                undo()
            out["inside"] = (rt.current("f") is before, len(rt.versions("f")),
                             rt.stats()["pending_returns"], stub_slots())
        return 0

    def stub_slots():
        # Frames of this thread whose return-address slot holds the stub
        # (translated by the hijack table, or not): none may.
        import unwinder
        return sum(1 for fr in unwinder.backtrace() if fr.translated or fr.pc == stub)
    rt.on_hook(on_hook)
    out["result"] = f(20)
    s = rt.stats()
    out["after"] = (s["hijacks"], s["transfers"], s["live_versions"], f(5))
    rt.on_hook(lambda _: rt.replace("f", V2) and 0)
    out["clean"] = f(20)
    rt.close()
    return out


FAILURES = [("stop", "SafepointTimeout"), ("scan", "OsrJitError"),
            ("incompatible", "IncompatibleVersion"), ("publish", "PatchError"),
            ("hijack", "HijackError")]


@pytest.mark.parametrize("transfer,walker", PATHS)
@pytest.mark.parametrize("where,error", FAILURES + [("slot check", "HijackError")])
def test_a_failed_replace_publishes_nothing_and_leaves_the_stacks(transfer, walker, where, error):
    if where == "slot check" and walker == "native":
        pytest.skip("the native walker's slots are checked in native code")
    out = run_child(failed_replace_scenario, transfer, walker, where, timeout=120)
    assert out["error"] == error
    assert out["inside"] == (True, 1, 0, 0)      # old current, nothing loaded or hijacked
    assert out["result"] == old(20)              # every frame finished in the old code
    assert out["after"] == (0, 0, {"f": 1}, old(5))
    assert out["clean"] == new(20)               # and a replace works afterwards


@pytest.mark.parametrize("where,error", [("publish", "PatchError"), ("hijack", "HijackError")])
def test_a_failed_emulated_replace_publishes_nothing_and_leaves_the_stacks(where, error,
                                                                           monkeypatch):
    import osrjit
    from osrjit.emulated.backend import EmulatedPause
    rt = osrjit.Runtime(backend="emulated")
    rt.compile(V1)
    rt.on_hook(lambda _: 0)
    v1 = rt.current("f")
    thread = rt.spawn("f", 30)
    rt.run(300)                                   # mid-recursion: frames of v1 at their calls
    original = getattr(EmulatedPause, where)

    def failing(self, *args):
        if where == "publish":
            original(self, *args)                 # the slot written, then the failure
        raise (osrjit.PatchError if where == "publish" else osrjit.HijackError)("injected")
    monkeypatch.setattr(EmulatedPause, where, failing)
    with pytest.raises(osrjit.OsrJitError) as info:
        rt.replace("f", V2)
    monkeypatch.undo()
    assert type(info.value).__name__ == error
    assert rt.current("f") is v1 and len(rt.versions("f")) == 1
    assert rt.stub_frames() == [] and rt.stats()["hijacks"] == 0
    rt.run()
    assert thread.result == old(30)
    assert rt.stats()["old_code_fetches"] == 0
    thread = rt.spawn("f", 30)
    rt.run(300)
    rt.replace("f", V2)
    rt.run()
    assert thread.result == new(30)               # and a replace works afterwards
    rt.close()
