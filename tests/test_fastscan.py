"""The native stack scan gives the reference scan's answer on the same stopped stacks."""
import ctypes
import threading
import time

from childproc import run_child

SPIN = """
def spin(k):
    i = 0
    while i < k:
        i = i + 1
    return 0
"""
WORK = """
def work(n, k):
    if n == 0:
        return spin(k)
    return work(n - 1, k) + 1
"""
POLL_FREE = """
def busy(m):
    i = 0
    x = 1
    while i < m:
        x = (x * 7 + i) % 1009
        i = i + 1
    return x
"""


def both_scans_scenario():
    """Threads deep in JIT code (one parked at a poll, one in a poll-free loop
    stopped by the signal, one hijacked already); the world is stopped once and
    the reference scan, the native scan and the threads' own scans (made as
    they parked) classify the same stacks."""
    import osrjit
    from deopt.native_hijack import HS_SCANNED
    out = {}
    with osrjit.Runtime(walker="native") as rt:
        rt.compile(SPIN)
        rt.compile(WORK)
        rt.compile(POLL_FREE, polls=False)
        rt.compile("def outer(n, m):\n    return work(n, 0) + busy(m)\n")
        work = rt.function("work")
        outer = rt.function("outer")
        threading.stack_size(64 << 20)
        # 700 frames: one native call (osrjit_hj_scan); 2,500: deeper than
        # its buffer, the general path.
        ts = [threading.Thread(target=work, args=(700, 1 << 40)),
              threading.Thread(target=work, args=(2500, 1 << 40)),
              threading.Thread(target=outer, args=(5, 300_000_000))]   # a few seconds
        for t in ts:
            t.start()
        time.sleep(0.3)
        rt.replace("work", WORK.replace("+ 1", "+ 2"))      # hijacks the first two
        rt.replace("outer", "def outer(n, m):\n    return work(n, 0) + busy(m) + 1\n")
        anchor_scan = rt._anchor_scan
        one_call = []
        scan_thread = anchor_scan.thread

        def counted(state, ident, bounds):
            done = scan_thread(state, ident, bounds)
            one_call.append(done is not None)
            return done
        anchor_scan.thread = counted
        names = {"work", "outer"}
        shallow = ts[0].ident
        # The threads parked at a poll scan themselves on the way (SelfScan).
        # Three busy threads share two cores here: a spinner that does not get
        # a core within the grace is stopped by the signal instead, and one
        # not yet woken from the last stop stays parked there: the stopper
        # scans those. Stop again until the 700-deep one parks at its poll
        # afresh (and scans itself).
        for attempt in range(50):
            context = rt._scan_context(names)
            requests = rt._request_self_scans(context)
            others = rt._world.stop(timeout=5)
            state = {ident: st for ident, st, _ in others}[shallow]
            scanned = (context["self_scans"][ctypes.addressof(state)].block.state
                       == HS_SCANNED)
            if scanned or attempt == 49:
                break
            rt._world.release()
            rt._end_self_scans(requests)
            time.sleep(0.01)
        out["scanned_itself"] = scanned
        try:
            answers = {}
            one_call.clear()
            for walker, ctx in (("python", None), ("native", None), ("self", context)):
                rt.walker = "python" if walker == "python" else "native"
                found = rt._collect_frames(names, others, ctx).frames()
                executing = sorted(v.id for fn in rt._functions.values() for v in fn.versions
                                   if v.executing)
                answers[walker] = (sorted((v.id, fm.site_id, slot, pc, ident)
                                          for v, fm, slot, pc, ident in found), executing)
                if walker == "native":
                    out["one_call"] = sorted(one_call)
            out["self_answered"] = {
                ident: context["self_scans"][ctypes.addressof(st)].answer(
                    context["tables"], 0) is not None
                for ident, st, _ in others}
            out["depths"] = {t.ident: depth for t, depth in zip(ts, (700, 2500, 0))}

        finally:
            rt._world.release()
            rt._end_self_scans(requests)
        out["answers"] = answers
        out["states_after"] = sorted(scan.block.state for scan in context["self_scans"].values())
        del anchor_scan.thread
        out["signals"] = rt.stats()["signals_sent"]
        # End the threads: spin returns at once in a new version; busy ends by
        # itself. A spinner the signal stopped (no poll reached within the
        # grace, e.g. on a loaded machine) runs its old spin on and moves at
        # a later stop: replace again until every thread is done.
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in ts) and time.monotonic() < deadline:
            rt.replace("spin", SPIN.replace("i = i + 1", "i = k"))
            for t in ts:
                t.join(timeout=0.5)
        for t in ts:
            t.join(timeout=30)
        out["alive"] = sum(t.is_alive() for t in ts)
    return out


def test_native_and_reference_scans_agree_on_the_same_stopped_stacks():
    out = run_child(both_scans_scenario, timeout=300)
    python, native = out["answers"]["python"], out["answers"]["native"]
    assert native == python
    assert out["answers"]["self"] == python        # the threads' own scans: the same answer
    found, executing = native
    assert len(found) > 3200                  # both deep threads, every frame
    assert sum(1 for f in found if f[2] is None) > 3200   # already hijacked: seen through
    # Parked threads: the 700-deep one in one native call, the 2,500-deep one
    # on the general path (and the thread in a poll-free loop by its signal context).
    assert out["one_call"] == [False, True]
    # Self-scans: the 700-deep thread answered by itself; the 2,500-deep one
    # is deeper than its buffer and the poll-free one was stopped by the
    # signal (it never reached a poll): both scanned by the stopper. Every
    # request is withdrawn after the release.
    assert out["scanned_itself"]
    answered = {out["depths"][ident]: yes for ident, yes in out["self_answered"].items()}
    assert answered == {700: True, 2500: False, 0: False}
    assert out["states_after"] == [0, 0, 0]
    assert out["signals"] >= 1 and out["alive"] == 0
