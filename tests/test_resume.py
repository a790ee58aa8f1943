"""Resume entries: ``@<f>__resume(site_id, state)`` continues right after a site.

Each scenario builds ``state`` by hand (``state[0]`` = the call's result,
``state[1 + i]`` = ``live[i]``, see ``osrjit/abi.py``) for one kind of site —
call, hook, ``safepoint()``, loop back-edge, entry poll — calls the version's
resume entry through ctypes and checks that the function finishes as if it
had been suspended there.
"""
import pytest

import handir
from childproc import ChildCrashed, run_child


def _resume(version, site_id, result, **values):
    """Call ``version``'s resume entry at ``site_id`` with live values by name."""
    import ctypes

    from osrjit.abi import STATE_LIVE_BASE, STATE_RESULT_INDEX
    live = version.sites[site_id].live
    assert set(values) == {v.name for v in live}, (sorted(values), live)
    state = (ctypes.c_int64 * (STATE_LIVE_BASE + len(live)))()
    state[STATE_RESULT_INDEX] = result
    for i, v in enumerate(live):
        state[STATE_LIVE_BASE + i] = values[v.name]
    entry = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(
        version.resume_entry)
    return entry(site_id, ctypes.addressof(state))


def scenario_hand_written():
    import osrjit
    out = {}
    with osrjit.Runtime() as rt:
        rt.compile_ir([handir.fib(), handir.twice(), handir.kinds()])
        fib, kinds = rt.current("fib"), rt.current("kinds")
        rt.on_hook(lambda v: v * 10)
        # fib(12) suspended in its first call (fib(11) returned 89).
        out["call_1"] = _resume(fib, 1, 89, n=12)
        # ... in its second call (fib(10) = 55 returned; a = fib(11) = 89).
        out["call_2"] = _resume(fib, 2, 55, a=89)
        # kinds(4) suspended at the entry poll: runs the whole function.
        out["entry_poll"] = _resume(kinds, 1, 0, n=4)
        # ... in the hook at i=2 (acc = 0+10 so far, hook returned 20).
        out["hook"] = _resume(kinds, 2, 20, n=4, i=2, acc=10)
        # ... at the back-edge poll after i=1 (acc = 10, i already 2).
        out["back_edge"] = _resume(kinds, 3, 0, n=4, i=2, acc=10)
        # ... in the call twice(acc) with acc = 60 (twice returned 120).
        out["call_twice"] = _resume(kinds, 4, 120, acc=60)
        # ... at the final safepoint() poll.
        out["safepoint"] = _resume(kinds, 5, 0, acc=60, t=120)
        # A frame of an old version resumes in a new version of the same code.
        rt.compile_ir(handir.kinds())
        new = rt.current("kinds")
        rt.check_compatible(kinds, new)
        out["new_version"] = _resume(new, 2, 20, n=4, i=2, acc=10)
    return out


def test_hand_written_sites_resume():
    out = run_child(scenario_hand_written)
    assert out["call_1"] == 144 and out["call_2"] == 144
    assert out["entry_poll"] == 180
    # acc: 10 + 20 (resumed hook) + 30 = 60 -> twice(60) + 60
    assert out["hook"] == 180
    assert out["back_edge"] == 3 * (10 + 20 + 30)
    assert out["call_twice"] == 180
    assert out["safepoint"] == 180
    assert out["new_version"] == 180


def scenario_reference_language():
    import osrjit
    from osrjit.lang import site_id, site_key
    out = {}
    with osrjit.Runtime() as rt:
        rt.compile(handir.SOURCE)
        rt.on_hook(lambda v: v * 100)
        fib, loops, hooky, ack = (rt.current(n) for n in ("fib", "loops", "hooky", "ack"))

        def sid(fn, kind, name, k):
            return site_id(site_key(fn, kind, name, k))
        # Entry poll of fib(15): the whole call.
        out["entry_poll"] = _resume(fib, sid("fib", "poll", "entry", 0), 0, n=15)
        # fib(15) suspended in fib(14) (returned 377): then fib(13) and the sum.
        out["call"] = _resume(fib, sid("fib", "call", "fib", 0), 377, n=15)
        # ... in fib(13) (returned 233) with fib(14) = 377 in its temporary.
        s1 = sid("fib", "call", "fib", 1)
        out["call_2"] = _resume(fib, s1, 233,
                                **{v.name: 377 for v in fib.sites[s1].live})
        # ack(2, 3) suspended in the inner ack(2, 2) (= 7): ack(1, 7).
        s = sid("ack", "call", "ack", 1)          # the inner call, evaluated first
        live = {v.name for v in ack.sites[s].live}
        out["ack_live"] = sorted(live)
        out["ack"] = _resume(ack, s, 7, **{n: {"m": 2, "n": 3}[n] for n in live})
        # hooky(3) suspended in hook(3) (returned 11): then 2 * hook(4).
        out["hook"] = _resume(hooky, sid("hooky", "hook", "hook", 0), 11, x=3)
        # loops(6) at safepoint() with i=2, j=3, s as of then.
        sp = sid("loops", "poll", "safepoint", 0)
        out["safepoint_live"] = sorted(v.name for v in loops.sites[sp].live)
        s_at = sum(i * j + 1 for i in range(2) for j in range(6)) + \
            sum(2 * j + 1 for j in range(4))
        out["safepoint"] = _resume(loops, sp, 0, i=2, j=3, n=6, s=s_at)
        # ... at the inner loop's back-edge (j already incremented to 4).
        be = sid("loops", "poll", "loop", 1)
        out["back_edge"] = _resume(loops, be, 0, **{
            k: v for k, v in dict(i=2, j=4, n=6, s=s_at).items()
            if k in {x.name for x in loops.sites[be].live}})
        out["expected_loops"] = handir.py_loops_from(2, 4, 6, s_at)
    return out


def test_reference_language_sites_resume():
    out = run_child(scenario_reference_language)
    assert out["entry_poll"] == handir.py_fib(15)
    assert out["call"] == 377 + 233 and out["call_2"] == 610
    assert out["ack_live"] == ["m"]             # n is dead after the inner call
    assert out["ack"] == handir.py_ack(1, 7)
    assert out["hook"] == 11 + 2 * 400
    assert out["safepoint_live"] == ["i", "j", "n", "s"]
    assert out["safepoint"] == out["expected_loops"]
    assert out["back_edge"] == out["expected_loops"]


def scenario_unknown_site():
    import osrjit
    with osrjit.Runtime() as rt:
        rt.compile_ir(handir.twice())
        import ctypes
        state = (ctypes.c_int64 * 1)()
        ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(
            rt.current("twice").resume_entry)(12345, ctypes.addressof(state))


def test_unknown_site_id_traps():
    with pytest.raises(ChildCrashed, match="SIGILL|SIGTRAP"):
        run_child(scenario_unknown_site)
