"""Benchmark: stop-the-world pause and time-to-safepoint beside glibc ``backtrace()``.

For T = 1, 2, 4 threads, each thread recurses D = 1,000 frames deep in JIT
code and then spins in a loop with safepoint polls. The main thread replaces
the recursive function R times (alternating two versions); each replacement
stops the world, walks every thread's stack, hijacks its D old frames and
releases. Reported (medians over the R replacements):

* time-to-safepoint — request → every thread parked (a thread parking at a
  poll walks and plans its own stack on the way: ``osrjit.native.fastscan.SelfScan``);
* pause — request → parked → walked and hijacked → released, *plus* the
  longest time a thread then took to write its own hijacks as it woke
  (``Runtime.self_apply_times``): the world stands still for that thread
  until it is done. ``stopper`` is the first part alone;
* glibc — the time glibc ``backtrace()`` takes to walk the same stacks: each
  thread, at the same depth, times its own ``backtrace()`` (median of 15,
  one thread at a time) and the figure is the sum over the threads (a
  stop-the-world walks them all).

    python -m osrjit.bench.stw [--threads 1,2,4] [--depth 1000] [--rounds 15]
                               [--mode fresh|rescan] [--walker W] [--transfer T] [--json PATH]

By default (``--mode fresh``) every replacement hijacks 1,000 new frames per
thread: between replacements each thread returns out of its frames (they
transfer into the new version) and recurses again. ``--mode rescan`` keeps
the frames hijacked from the first replacement on, so later pauses only walk
through them.
"""
import argparse
import ctypes
import json
import statistics
import threading
import time

SPIN = """
def spin(k):
    i = 0
    while i < k:
        i = i + 1
    return 0
"""
#: What the hook returns to end drive's loop.
DONE = 1 << 40
# Lap after lap of deep, until the hook at the bottom returns DONE.
DRIVE = """
def drive(n, k):
    r = 0
    while r < 1099511627776:
        r = deep(n, k)
    return r
"""
# At the bottom: hook(1) says "here" (and, for the glibc figure, walks), then spin.
DEEP = """
def deep(n, k):
    if n == 0:
        return hook(1) + spin(k)
    return deep(n - 1, k) + {step}
"""


def glibc_walk_seconds(rt, depth, n_threads):
    """Sum over threads of the median time of one glibc backtrace() at ``depth`` frames."""
    libc = ctypes.CDLL("libc.so.6")
    per_thread = []
    lock = threading.Lock()

    def on_hook(_):
        buf = (ctypes.c_void_p * (depth + 4096))()
        times = []
        # One thread at a time: walks running side by side on fewer cores than
        # threads would each be slowed by the others and the sum overstated.
        with lock:
            for _ in range(15):
                t = time.perf_counter()
                libc.backtrace(buf, len(buf))
                times.append(time.perf_counter() - t)
            per_thread.append(statistics.median(times))
        return 0

    rt.on_hook(on_hook)
    deep = rt.function("deep")
    ts = [threading.Thread(target=deep, args=(depth, 0)) for _ in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rt.on_hook(lambda x: 0)
    return sum(per_thread)


def measure(n_threads, depth, rounds, walker="fast", transfer="fast", mode="fresh",
            spin=1 << 26):
    """Medians over ``rounds`` replacements of ``deep`` with ``n_threads``
    threads each ``depth`` frames deep in it.

    ``mode="fresh"``: each thread spins ``spin`` loop iterations at the bottom
    (several ms), returns all the way out (its hijacked frames transfer into
    the new version) and recurses again; the main thread replaces once every
    thread has reached the bottom again since the last replacement (a hook
    call just before the spin says so), so every replacement finds each thread spinning at a poll under
    ``depth`` new frames. ``mode="rescan"``: the threads never return, so
    only the first replacement writes slots and the others find every frame
    already hijacked (they walk through the stub and retarget nothing).
    """
    import osrjit
    with osrjit.Runtime(walker=walker, transfer=transfer) as rt:
        rt.compile(SPIN + DEEP.format(step=1) + DRIVE)
        rt.on_hook(lambda x: 0)
        glibc = glibc_walk_seconds(rt, depth, n_threads)
        drive = rt.function("drive")
        stop = threading.Event()
        # The threads that reached the bottom since the last replacement (a
        # count of arrivals let a fast thread arrive twice while a slow one
        # still spun under the last round's, already hijacked, frames).
        arrived = set()

        def arrive(_):
            arrived.add(threading.get_ident())
            return DONE if stop.is_set() else 0
        rt.on_hook(arrive)
        k = spin if mode == "fresh" else 1 << 40

        def worker(j):
            # The laps run inside JIT code: between two laps a thread is in
            # drive, not in Python waiting for the GIL with no frame of deep
            # (a stop then found 3 of 4 threads under 1,000 frames).
            drive(depth, k)

        threading.stack_size(64 << 20)
        ts = [threading.Thread(target=worker, args=(j,)) for j in range(n_threads)]
        for t in ts:
            t.start()
        time.sleep(0.2)
        ttsp, pause, stopper, applies, hijacked, fresh = [], [], [], [], [], []
        for i in range(rounds):
            if mode == "fresh":
                # Every thread has returned out of the previous round's
                # frames, recursed again and is spinning at the bottom.
                while len(arrived) < n_threads:
                    time.sleep(0.0002)
            before = rt.stats()["hijacks"]
            rt.replace("deep", DEEP.format(step=2 if i % 2 == 0 else 1))
            arrived.clear()
            p = rt.last_pause
            own = [t for _ident, t in rt.self_apply_times() if t is not None]
            ttsp.append(p.time_to_safepoint_seconds)
            stopper.append(p.pause_seconds)
            applies.append(max(own, default=0.0))
            pause.append(p.pause_seconds + applies[-1])
            hijacked.append(p.frames_hijacked)
            fresh.append(rt.stats()["hijacks"] - before)
            time.sleep(0.02)
        stop.set()
        rt.safepoint_flag = 0
        if mode == "rescan":
            # End the spinners' loops: a version of spin whose loop exits at
            # once (same sites, so their frames move into it at their next poll).
            # (Again until they are done: a spinner the signal stopped moves
            # at a later stop.)
            while any(t.is_alive() for t in ts):
                rt.replace("spin", SPIN.replace("i = i + 1", "i = k"))
                for t in ts:
                    t.join(timeout=0.5)
        for t in ts:
            t.join()
        return {"time_to_safepoint_s": statistics.median(ttsp), "pause_s": statistics.median(pause),
                "stopper_pause_s": statistics.median(stopper),
                "self_apply_s": statistics.median(applies),
                "glibc_walk_s": glibc, "frames_hijacked": statistics.median(hijacked),
                "frames_newly_hijacked": statistics.median(fresh), "mode": mode,
                "walker": walker, "transfer": transfer, "stats": rt.stats()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--depth", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--walker", choices=("fast", "reference", "python", "native"), default="fast",
                    help="how replace() walks the stopped stacks (default fast)")
    ap.add_argument("--transfer", choices=("fast", "reference", "python", "native"),
                    default="fast", help="how hijacked frames transfer (default fast)")
    ap.add_argument("--mode", choices=("fresh", "rescan"), default="fresh",
                    help="fresh: every replacement hijacks new frames (default); rescan: "
                         "the frames stay hijacked from the first replacement on")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = {}
    print(f"mode {args.mode}, walker {args.walker}, transfer {args.transfer}")
    print(f"{'threads':>7} {'frames/thread':>13} {'hijacked':>8} {'time-to-safepoint':>18} "
          f"{'stopper':>10} {'own writes':>10} {'pause':>10} {'glibc walk':>11} "
          f"{'pause/glibc':>11}")
    for n in (int(x) for x in args.threads.split(",")):
        r = measure(n, args.depth, args.rounds, args.walker, args.transfer, args.mode)
        out[str(n)] = r
        print(f"{n:>7} {args.depth:>13} {r['frames_newly_hijacked']:>8.0f} "
              f"{r['time_to_safepoint_s'] * 1e3:>15.3f} ms {r['stopper_pause_s'] * 1e3:>7.3f} ms "
              f"{r['self_apply_s'] * 1e3:>7.3f} ms {r['pause_s'] * 1e3:>7.3f} ms "
              f"{r['glibc_walk_s'] * 1e3:>8.3f} ms {r['pause_s'] / r['glibc_walk_s']:>10.2f}x",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
