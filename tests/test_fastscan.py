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
    from osrjit.native.selfscan import HS_SCANNED
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
        backend = rt.native_backend
        anchor_scan = backend.scanner.anchor_scan
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
        # A probe: the pause stops and scans for names as a replace() would,
        # and publishes and hijacks nothing.
        for attempt in range(50):
            pause = backend.pause(names)
            pause.stop(timeout=5)
            context, others = pause.context, pause.others
            state = {ident: st for ident, st, _ in others}[shallow]
            scanned = (context.self_scans[ctypes.addressof(state)].block.state
                       == HS_SCANNED)
            if scanned or attempt == 49:
                break
            pause.release()
            time.sleep(0.01)
        out["scanned_itself"] = scanned
        try:
            answers = {}
            one_call.clear()
            for walker in ("python", "native", "self"):
                plan = pause.scan(mode=walker)
                found = plan.frames()
                executing = sorted(v.id for v in plan.executing)
                answers[walker] = (sorted((f.version.id, f.frame_map.site_id, f.slot, f.pc,
                                           f.thread) for f in found), executing)
                if walker == "native":
                    out["one_call"] = sorted(one_call)
            out["self_answered"] = {
                ident: context.self_scans[ctypes.addressof(st)].answer(
                    context.tables, 0) is not None
                for ident, st, _ in others}
            out["depths"] = {t.ident: depth for t, depth in zip(ts, (700, 2500, 0))}

        finally:
            pause.release()
        out["answers"] = answers
        out["states_after"] = sorted(scan.block.state for scan in context.self_scans.values())
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


ARRIVE = """
def work(n, k):
    if n == 0:
        return hook(1) + spin(k)
    return work(n - 1, k) + 1
"""


def self_apply_scenario():
    """A thread spinning under 300 fresh frames. (1) replace(): it scans and
    hijacks its own stack (as it parks, as it wakes). (2) The same steps by
    hand, with the apply left to the thread done by the stopper instead while
    the thread is still stopped (what the next stop-the-world does for a
    thread that has not woken yet). Every frame transfers and every result
    is right either way."""
    import osrjit
    from osrjit.native.selfscan import HS_SCANNED
    out = {}
    # No background reclamation: its stops would take the thread's self-scans.
    with osrjit.Runtime(walker="native", transfer="native", reclaim_interval=None) as rt:
        rt.compile(SPIN)
        rt.compile(ARRIVE)
        arrived = threading.Event()

        def arrive(_):
            arrived.set()
            return 0
        rt.on_hook(arrive)
        # The spinner always reaches its poll (never the signal, however
        # loaded the machine): it scans itself at every stop.
        rt.native_backend.world.grace = 5.0
        work = rt.function("work")
        results = []
        stop = threading.Event()

        def worker():
            while not stop.is_set():
                results.append(work(300, 20_000_000))
        threading.stack_size(64 << 20)
        t = threading.Thread(target=worker)
        t.start()
        # A first replace() grows the walker's tables for this stack (the
        # self-scan hands a walk that needs that to the stopper). After each
        # replace(), a new arrival at the bottom means fresh frames (a lap
        # takes ~10 ms, most of it spinning).
        arrived.wait(30)
        rt.replace("work", ARRIVE.replace("+ 1", "+ 2"))
        # A thread the signal stopped (no core within the grace on a busy
        # machine) is scanned by the stopper: replace until it scanned itself.
        for attempt in range(20):
            arrived.clear()
            arrived.wait(30)
            before = rt.stats()
            rt.replace("work", ARRIVE.replace("+ 1", "+ 2") if attempt % 2 else ARRIVE)
            out["times"] = rt.self_apply_times()
            s = rt.stats()
            out["first"] = (rt.last_pause.frames_hijacked,
                            s["self_scans"] - before["self_scans"],
                            s["self_applies"] - before["self_applies"])
            if out["first"][1]:
                break
        # (2) by hand: fresh frames again, the apply done by the stopper.
        names = {"work"}
        backend = rt.native_backend
        for attempt in range(20):
            arrived.clear()
            arrived.wait(30)
            pause = backend.pause(names)           # a probe: nothing published
            pause.stop(timeout=10)
            scanned = any(scan.block.state == HS_SCANNED
                          for scan in pause.context.self_scans.values())
            if scanned or attempt == 19:
                break
            pause.release()
        out["self_scanned"] = scanned
        try:
            plan = pause.scan(mode="self")
            pause.hijack(plan)
            out["left"] = [scan.applying() for _ident, scan in backend.hijacker.last_left]
            backend.hijacker.settle_self_applies(stopped=True)
            out["by_stopper"] = backend.hijacker.self_applies_by_stopper
        finally:
            try:
                pause.finish()
            finally:
                pause.release()
        out["second"] = len(plan)
        stop.set()
        t.join(60)
        out["alive"] = t.is_alive()
        out["results"] = sorted(set(results))
        s = rt.stats()
        out["stats"] = {k: s[k] for k in ("transfers", "transfer_failures", "pending_returns",
                                          "self_applies_by_stopper", "python_transfers")}
    return out


def test_threads_scan_and_hijack_their_own_stacks():
    out = run_child(self_apply_scenario, timeout=300)
    frames, scans, applies = out["first"]
    assert frames >= 1 and scans == 1 and applies == 1
    (_ident, seconds), = out["times"]
    assert seconds is not None and seconds > 0
    # Left to the thread, done by the stopper while the thread was stopped.
    assert out["self_scanned"], "20 stops in a row found the thread stopped by the signal"
    assert out["left"] == [True] and out["by_stopper"] == 1 and out["second"] >= 1
    assert not out["alive"]
    # 300 frames of +1 or +2 (hook and spin return 0 at the bottom): a lap
    # gives 300, 600, or in between when its frames moved to the other
    # version on the way out; never a broken frame's value.
    assert out["results"] and all(300 <= r <= 600 for r in out["results"])
    s = out["stats"]
    assert s["transfer_failures"] == 0 and s["pending_returns"] == 0
    assert s["transfers"] >= 3 and s["self_applies_by_stopper"] == 1
