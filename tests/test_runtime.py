"""The versioned JIT: compiling, calling, services, versions, unloading, errors.

Every scenario that runs JIT code is a module-level function run in a child
interpreter (``run_child``), so a crash fails the test naming its signal.
"""
import gc

import pytest

import handir
from childproc import run_child

# --------------------------------------------------------------------------
# Scenarios (run in a child)
# --------------------------------------------------------------------------


def _check_frame_map_coverage(rt):
    """Every site of every loaded version has a frame map in its entry, inside
    the version's .text, and every frame map is one of the version's sites."""
    checked = 0
    for name in rt.names():
        for v in rt.versions(name):
            start, end = v.code_range
            assert start < end
            for sid, site in v.sites.items():
                maps = v.frame_maps_for_site(sid)
                assert any(m.symbol == v.symbol for m in maps), (name, site)
                checked += 1
            for m in v.frame_maps:
                assert start < m.return_address <= end, (v, m)
                assert m.site_id in v.sites
                assert m.version == v.id and m.function == name
                assert v.frame_map_at(m.return_address) is m
    return checked


def scenario_reference_programs():
    import osrjit
    out = {}
    with osrjit.Runtime() as rt:
        names = rt.compile(handir.SOURCE)
        out["names"] = names
        out["fib"] = rt.function("fib")(20)
        out["ack"] = rt.function("ack")(2, 3)
        out["loops"] = rt.function("loops")(12)
        out["even"] = [rt.function("is_even")(k) for k in (0, 7, 10)]
        out["odd"] = [rt.function("is_odd")(k) for k in (0, 7, 10)]
        out["div"] = [rt.function("div")(7, 2), rt.function("div")(-7, 2)]
        # Hook round trip.
        seen = []
        rt.on_hook(lambda v: seen.append(v) or v * 100)
        out["hooky"] = rt.function("hooky")(3)
        out["hook_seen"] = seen
        # Safepoint slow path: flag clear -> never, flag set -> every poll.
        polls = []
        rt.on_safepoint(lambda: polls.append(1))
        rt.function("loops")(5)
        out["polls_flag_clear"] = len(polls)
        rt.safepoint_flag = 1
        out["loops_flag_set"] = rt.function("loops")(5)
        out["polls_flag_set"] = len(polls)
        out["fib_flag_set"] = rt.function("fib")(10)
        rt.safepoint_flag = 0
        out["sites_checked"] = _check_frame_map_coverage(rt)
        # Every kind of site produced a frame map somewhere.
        out["kinds"] = sorted({m.kind.name for n in rt.names() for m in rt.current(n).frame_maps})
    return out


def test_reference_programs_run_correctly():
    out = run_child(scenario_reference_programs)
    assert out["names"] == ["fib", "ack", "loops", "is_even", "is_odd", "hooky", "div"]
    assert out["fib"] == handir.py_fib(20)
    assert out["ack"] == handir.py_ack(2, 3)
    assert out["loops"] == handir.py_loops_from(0, 0, 12, 0)
    assert out["even"] == [1, 0, 1] and out["odd"] == [0, 1, 0]
    assert out["div"] == [7 // 2 + 7 % 2, -7 // 2 + -7 % 2]
    assert out["hooky"] == 300 + 2 * 400 and out["hook_seen"] == [3, 4]
    assert out["polls_flag_clear"] == 0
    # loops(5): 1 entry poll + 25 safepoint() + 25 inner + 5 outer back-edges.
    assert out["loops_flag_set"] == handir.py_loops_from(0, 0, 5, 0)
    assert out["polls_flag_set"] == 1 + 25 + 25 + 5
    assert out["fib_flag_set"] == 55
    assert out["sites_checked"] > 15
    assert out["kinds"] == ["CALL", "HOOK", "POLL"]


def scenario_exceptions():
    import threading

    import osrjit
    out = {}
    with osrjit.Runtime() as rt:
        rt.compile(handir.SOURCE)
        hooky, div = rt.function("hooky"), rt.function("div")

        def raising(v):
            raise KeyError(f"hook saw {v}")
        rt.on_hook(raising)
        try:
            hooky(3)
        except KeyError as e:
            out["hook_raised"] = str(e)
        # The pending exception was consumed: a later call is clean.
        rt.on_hook(lambda v: v)
        out["after"] = hooky(1)
        try:
            div(1, 0)
        except ZeroDivisionError as e:
            out["zero"] = str(e)
        # A hook that calls JIT code which fails sees the error itself (its own
        # pending scope) and may handle it; the outer call is unaffected.

        def handles(v):
            try:
                return div(v, 0)
            except ZeroDivisionError:
                return -1
        rt.on_hook(handles)
        out["handled"] = hooky(5)

        def lets_through(v):
            return div(v, 0)
        rt.on_hook(lets_through)
        try:
            hooky(5)
        except ZeroDivisionError:
            out["through"] = True
        # Only the first error of a scope is kept; later hooks do not run.
        calls = []

        def first_fails(v):
            calls.append(v)
            raise ValueError(v)
        rt.on_hook(first_fails)
        try:
            hooky(10)
        except ValueError as e:
            out["first"] = (e.args[0], calls)
        # No hook installed.
        rt.on_hook(None)
        try:
            hooky(1)
        except osrjit.HookNotSet as e:
            out["no_hook"] = type(e).__name__
        # A hook returning a non-int.
        rt.on_hook(lambda v: "x")
        try:
            hooky(1)
        except TypeError as e:
            out["not_int"] = str(e)
        # Pending exceptions are per thread.
        rt.on_hook(lambda v: (_ for _ in ()).throw(RuntimeError("t")) if v == 7 else v)
        results = {}

        def worker(k):
            try:
                results[k] = hooky(k)
            except RuntimeError:
                results[k] = "raised"
        threads = [threading.Thread(target=worker, args=(k,)) for k in (7, 20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["threads"] = results
    return out


def test_exceptions_reach_the_python_caller():
    out = run_child(scenario_exceptions)
    assert out["hook_raised"] == "'hook saw 3'"
    assert out["after"] == 1 + 2 * 2
    assert out["zero"] == "integer division or modulo by zero"
    assert out["handled"] == -1 + 2 * -1
    assert out["through"] is True
    assert out["first"] == (10, [10])
    assert out["no_hook"] == "HookNotSet"
    assert "must return an int" in out["not_int"]
    assert out["threads"] == {7: "raised", 20: 20 + 2 * 21}


def scenario_hand_written_ir():
    import osrjit
    out = {}
    with osrjit.Runtime() as rt:
        assert rt.compile_ir([handir.fib(), handir.twice()]) == ["fib", "twice"]
        rt.compile_ir(handir.kinds())
        rt.compile_ir(handir.locs())
        out["fib"] = rt.function("fib")(15)
        rt.on_hook(lambda v: v * 10)
        out["kinds"] = rt.function("kinds")(4)
        polls = []
        rt.on_safepoint(lambda: polls.append(1))
        rt.safepoint_flag = 1
        out["kinds_slow"] = rt.function("kinds")(4)
        out["polls"] = len(polls)
        out["locs"] = rt.function("locs")(5)
        out["sites_checked"] = _check_frame_map_coverage(rt)
    return out


def test_hand_written_ir_runs():
    out = run_child(scenario_hand_written_ir)
    assert out["fib"] == 610
    assert out["kinds"] == 3 * (0 + 10 + 20 + 30)      # acc = 60, twice(acc) + acc
    assert out["kinds_slow"] == out["kinds"]
    assert out["polls"] == 1 + 4 + 1                   # entry, 4 back-edges, safepoint()
    assert out["locs"] == 50 + 5
    assert out["sites_checked"] == 2 + 5 + 1


def scenario_versions():
    import unwinder

    import osrjit
    out = {}
    space = unwinder.AddressSpace.current_process()

    def registered(v):
        return any(getattr(m, "name", None) == f"{v.name}.v{v.id}" for m in space.modules)

    with osrjit.Runtime() as rt:
        rt.compile("def f(x):\n    return x + 1\n")
        rt.compile("def g(x):\n    return f(x) * 10\n")
        f, g = rt.function("f"), rt.function("g")
        out["before"] = (f(1), g(1))
        v1 = rt.current("f")
        rt.compile("def f(x):\n    return x + 2\n")
        v2 = rt.current("f")
        # g was not recompiled: it calls f through the slot, so it sees v2.
        out["after"] = (f(1), g(1))
        out["ids"] = [v.id for v in rt.versions("f")] + [rt.current("g").id]
        out["disjoint"] = v1.code_range[1] <= v2.code_range[0] or \
            v2.code_range[1] <= v1.code_range[0]
        out["registered"] = (registered(v1), registered(v2))
        out["version_at"] = rt.version_at(v2.entry) is v2
        try:
            rt.unload(v2)
        except osrjit.VersionInUse:
            out["unload_current"] = "refused"
        rt.unload(v1)
        out["unloaded"] = (v1.loaded, [v.id for v in rt.versions("f")], registered(v1))
        out["after_unload"] = (f(5), g(5))
        # The next library may reuse v1's memory; everything keeps working.
        rt.compile("def f(x):\n    return x + 3\n")
        v3 = rt.current("f")
        out["v3"] = (f(5), g(5), v3.id)
        rt.unload(v2)
        out["final"] = (f(6), g(6), [v.id for v in rt.versions("f")])
        out["slot_call_compat"] = rt.check_compatible(v3, v3) is None
    out["closed_registered"] = registered(v3)
    try:
        f(1)
    except osrjit.RuntimeClosed:
        out["closed"] = True
    return out


def test_versions_slots_and_unloading():
    out = run_child(scenario_versions)
    assert out["before"] == (2, 20)
    assert out["after"] == (3, 30)
    assert out["ids"] == [1, 3, 2]
    assert out["disjoint"]
    assert out["registered"] == (True, True)
    assert out["version_at"]
    assert out["unload_current"] == "refused"
    assert out["unloaded"] == (False, [3], False)
    assert out["after_unload"] == (7, 70)
    assert out["v3"] == (8, 80, 4)
    assert out["final"] == (9, 90, [4])
    assert out["slot_call_compat"]
    assert out["closed_registered"] is False
    assert out["closed"]


def scenario_compile_errors():
    import dataclasses

    import osrjit
    out = {}
    rt = osrjit.Runtime()
    ir = handir.twice()
    bad = dataclasses.replace(ir, module_ir=ir.module_ir.replace("shl i64", "shl i65"))
    try:
        rt.compile_ir(bad)
    except osrjit.CompileError as e:
        out["llvm_message"] = str(e)
    missing = dataclasses.replace(ir, symbol="nothere")
    try:
        rt.compile_ir(missing)
    except osrjit.CompileError as e:
        out["missing_symbol"] = str(e)
    # fib's slot names itself: fine alone. kinds calls twice: unknown yet.
    try:
        rt.compile_ir(handir.kinds())
    except osrjit.CompileError as e:
        out["unknown_callee"] = str(e)
    # All-or-nothing: the batch fails on its second function, nothing is published.
    try:
        rt.compile_ir([handir.twice(), bad])
    except osrjit.CompileError:
        out["batch_names"] = rt.names()
    rt.compile_ir(handir.twice())
    try:
        rt.compile("def twice(a, b):\n    return a\n")
    except osrjit.CompileError as e:
        out["arity"] = str(e)
    try:
        rt.compile("def h(x):\n    return x / 2\n")
    except osrjit.CompileError as e:
        out["lang"] = (e.line, str(e))
    try:
        rt.function("nope")
    except osrjit.UnknownFunction as e:
        out["unknown"] = (e.name, isinstance(e, LookupError))
    try:
        rt.versions("nope")
    except osrjit.OsrJitError:
        out["unknown_versions"] = True
    try:
        rt.function("twice")(1, 2)
    except TypeError as e:
        out["argc"] = str(e)
    out["twice"] = rt.function("twice")(21)
    rt.close()
    rt.close()                                   # idempotent
    try:
        rt.compile("def k(x):\n    return x\n")
    except osrjit.RuntimeClosed:
        out["closed"] = True
    del rt
    gc.collect()
    out["garbage"] = len(gc.garbage)
    return out


def test_compile_errors_are_precise():
    out = run_child(scenario_compile_errors)
    assert "twice: LLVM rejected the IR" in out["llvm_message"]
    assert "i65" in out["llvm_message"] or "error" in out["llvm_message"]
    assert "does not define @nothere" in out["missing_symbol"]
    assert "kinds calls 'twice', which is neither compiled nor in this batch" \
        in out["unknown_callee"]
    assert out["batch_names"] == []
    assert "different signature" in out["arity"]
    assert out["lang"][0] == 2
    assert out["unknown"] == ("nope", True)
    assert out["unknown_versions"]
    assert "takes 1 arguments" in out["argc"]
    assert out["twice"] == 42
    assert out["closed"]
    assert out["garbage"] == 0


def scenario_dropped_runtime():
    """A runtime dropped without close() (even inside a reference cycle) does not crash."""
    import osrjit
    for _ in range(3):
        rt = osrjit.Runtime()
        rt.compile(handir.SOURCE)
        rt.on_hook(lambda v, rt=rt: v)          # cycle: rt -> services -> hook -> rt
        assert rt.function("hooky")(1) == 1 + 2 * 2
        del rt
        gc.collect()
    rt = osrjit.Runtime()
    rt.compile("def f(x):\n    return x\n")
    f = rt.function("f")
    del rt                                       # f keeps the code alive
    gc.collect()
    return f(41) + 1


def test_dropped_runtime_is_safe():
    assert run_child(scenario_dropped_runtime) == 42


def scenario_stack_walk_meets_frame_maps():
    """From inside a hook, the unwinder walks the JIT frames of the current
    version; each frame's return address has a frame map, and reading its
    INDIRECT locations relative to the frame's RSP yields the live values."""
    import ctypes

    import unwinder
    from deopt.stackmaps import LocationKind

    import osrjit
    from osrjit.lang import site_id, site_key
    seen = []
    with osrjit.Runtime() as rt:
        rt.compile("def rec(n):\n    if n == 0:\n        return hook(0)\n"
                   "    return rec(n - 1) + n\n")

        def hook(v):
            for frame in unwinder.backtrace():
                version = rt.version_at(frame.pc)
                if version is None:
                    continue
                fm = version.frame_map_at(frame.pc)
                values = {}
                for slot in fm.values:
                    assert slot.location.kind is LocationKind.INDIRECT, slot
                    base = frame.regs[slot.location.dwarf_reg]
                    values[slot.name] = ctypes.c_int64.from_address(
                        base + slot.location.offset).value
                seen.append((frame.module, fm.site_id, values))
            return 100
        rt.on_hook(hook)
        result = rt.function("rec")(4)
    return result, seen, site_id(site_key("rec", "hook", "hook", 0)), \
        site_id(site_key("rec", "call", "rec", 0))


def test_stack_walk_meets_frame_maps():
    import unwinder
    if not hasattr(unwinder, "backtrace"):
        pytest.skip("unwinder.backtrace not available")
    result, seen, hook_site, call_site = run_child(scenario_stack_walk_meets_frame_maps)
    assert result == 100 + 1 + 2 + 3 + 4
    assert seen == [("rec.v1", hook_site, {})] + \
        [("rec.v1", call_site, {"n": n}) for n in (1, 2, 3, 4)]
