"""Soak: a randomized mix of what a long-running embedder does to a runtime, every result checked.

    python scripts/soak.py --seconds 60 --seed 1 [--json PATH] [--paths default|reference]

Worker threads enter and leave JIT code, recurse, loop, call hooks (some of
which replace functions or call JIT code again) and exit; new ones start. The
main thread meanwhile replaces functions with compatible and incompatible
versions, collects, closes the runtime while it is busy (which must be refused)
and at quiescence (which must work), forks a child that replaces a live
recursion, interrupts a JIT loop with SIGINT and recurses past the stack limit.

Checking results. Every version of a function computes the same *shape* with a
different constant: each frame of ``tri`` (each iteration of ``spin``) adds
``1`` in "low" versions and ``K = 2**20`` in "high" ones, so a call of depth
``d`` returns ``a + b*K`` with ``a + b = d``: the result must decode to such a
pair, whatever mix of versions its frames returned in. A frame that resumed
with a wrong value, twice, or not at all breaks the equation.

At every quiescence (all workers joined) the runtime must show 0 pending
returns and, without ``collect()``, exactly one version per function.

Exit status 0 when nothing failed; the report (``--json``) lists every failure.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import osrjit  # noqa: E402

#: The per-frame contribution of a "high" version (a "low" one adds 1).
K = 1 << 20
#: Deepest ordinary recursion a worker runs (frames).
MAX_DEPTH = 400
#: Longest ordinary loop a worker runs (iterations).
MAX_SPIN = 200_000

TRI = """
def tri(n):
    if n == 0:
        return hook(0)
    return tri(n - 1) + {c}
"""
#: Incompatible with TRI while frames are live: ``m`` and ``n`` cross the call.
TRI_WIDE = """
def tri(n):
    m = n * 3
    if n == 0:
        return hook(0)
    r = tri(n - 1)
    return r + m - n * 3 + {c}
"""
SPIN = """
def spin(n):
    s = 0
    i = 0
    while i < n:
        s = s + {c}
        i = i + 1
    return s
"""
#: A loop that tells the hook it started (the interrupt action waits for it).
LOOP = """
def loop(n):
    s = hook(-1)
    i = 0
    while i < n:
        s = s + 1
        i = i + 1
    return s
"""


def decodes(result: int, depth: int) -> bool:
    """True when ``result == a + b*K`` for some ``a + b == depth``, ``a, b >= 0``."""
    b, rem = divmod(result - depth, K - 1)
    return rem == 0 and 0 <= b <= depth


def source(fn: str, high: bool, wide: bool = False) -> str:
    c = K if high else 1
    if fn == "tri":
        return (TRI_WIDE if wide else TRI).format(c=c)
    return SPIN.format(c=c)


class Soak:
    def __init__(self, seconds: float, seed: int, options: dict, actions=None):
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.seed = seed
        self.rng = random.Random(seed)
        self.options = options
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}
        self.interrupt_latencies: list[float] = []
        self.lock = threading.Lock()
        self.progress = 0
        self.rt = None
        self.wide = False
        self.workers: list[threading.Thread] = []
        self.stop_workers = threading.Event()
        self.local = threading.local()
        self.worker_seq = 0
        self.only = set(actions) if actions else None

    # -- bookkeeping -----------------------------------------------------------

    def count(self, what: str, n: int = 1):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n
            self.progress += 1

    def fail(self, what: str):
        with self.lock:
            self.failures.append(what)
        print(f"FAIL: {what}", file=sys.stderr, flush=True)

    # -- runtime -----------------------------------------------------------------

    def open_runtime(self):
        rt = osrjit.Runtime(**self.options)
        rt.compile(source("tri", False))
        rt.compile(source("spin", False))
        rt.compile(LOOP)
        rt.on_hook(self.on_hook)
        self.rt = rt
        self.wide = False
        self.count("runtimes")

    def on_hook(self, x: int) -> int:
        if x == -1:
            started = getattr(self.local, "loop_started", None)
            if started is not None:
                started.set()
            return 0
        plan = getattr(self.local, "hook_plan", None)
        if plan is None:
            return 0
        self.local.hook_plan = None
        kind, rng = plan
        if kind == "replace":
            self.replace(rng, from_hook=True)
        elif kind == "nested":
            self.check_tri(rng.randint(1, 30), "nested")
        elif kind == "sleep":
            time.sleep(rng.random() * 0.002)
        return 0

    def check_tri(self, depth: int, label: str):
        r = self.rt.function("tri")(depth)
        if not decodes(r, depth):
            self.fail(f"{label}: tri({depth}) = {r}, not a + b*K with a + b = {depth}")
        self.count("calls_checked")

    def check_spin(self, n: int, label: str):
        r = self.rt.function("spin")(n)
        if not decodes(r, n):
            self.fail(f"{label}: spin({n}) = {r}, not a + b*K with a + b = {n}")
        self.count("calls_checked")

    def replace(self, rng: random.Random, *, from_hook: bool = False, wide: bool | None = None):
        fn = rng.choice(["tri", "spin"])
        if wide is None:
            wide = fn == "tri" and rng.random() < 0.2
        src = source(fn, rng.random() < 0.5, wide=wide)
        where = "hook" if from_hook else "main"
        try:
            self.rt.replace(fn, src)
        except osrjit.IncompatibleVersion:
            # Expected only when the two shapes meet with frames live.
            if not (wide or (fn == "tri" and self.wide)):
                self.fail(f"replace({fn}) from {where}: compatible version refused:\n"
                          + traceback.format_exc())
            self.count("replaces_refused")
            return
        if fn == "tri":
            self.wide = wide
        self.count(f"replaces_from_{where}")

    # -- workers -------------------------------------------------------------------

    def worker(self, seed: int):
        rng = random.Random(seed)
        calls = rng.randint(5, 200)
        try:
            while calls and not self.stop_workers.is_set():
                calls -= 1
                roll = rng.random()
                if roll < 0.15:
                    self.local.hook_plan = ("replace", rng)
                elif roll < 0.25:
                    self.local.hook_plan = ("nested", rng)
                elif roll < 0.35:
                    self.local.hook_plan = ("sleep", rng)
                else:
                    self.local.hook_plan = None
                if rng.random() < 0.7:
                    self.check_tri(rng.randint(1, MAX_DEPTH), "worker")
                else:
                    self.check_spin(rng.randint(1, MAX_SPIN), "worker")
        except Exception:
            self.fail("worker raised:\n" + traceback.format_exc())
        self.count("workers_exited")

    def start_worker(self):
        self.worker_seq += 1
        t = threading.Thread(target=self.worker, args=(self.seed * 1_000_003 + self.worker_seq,),
                             name=f"soak-worker-{self.worker_seq}", daemon=True)
        t.start()
        self.workers.append(t)
        self.count("workers_started")

    def keep_workers(self, rng: random.Random):
        self.workers = [t for t in self.workers if t.is_alive()]
        while len(self.workers) < rng.randint(1, 4):
            self.start_worker()

    def join_workers(self):
        self.stop_workers.set()
        for t in self.workers:
            t.join(120)
            if t.is_alive():
                self.fail(f"{t.name} did not finish within 120 s")
        self.workers = []
        self.stop_workers.clear()

    # -- main-thread actions ---------------------------------------------------------

    def quiescence(self, label: str):
        """All workers joined: nothing pending, one version per function, without collect()."""
        self.join_workers()
        want = {name: 1 for name in self.rt.names()}
        stats = None
        end = time.monotonic() + 10.0
        while time.monotonic() < end:
            stats = self.rt.stats()
            if stats["pending_returns"] == 0 and dict(stats["live_versions"]) == want:
                break
            time.sleep(0.01)
        else:
            self.fail(f"{label}: at quiescence {stats['pending_returns']} pending returns, "
                      f"versions {dict(stats['live_versions'])} (want {want}) after 10 s")
            self.rt.collect()
        self.count("quiescences")

    def act_epoch(self, rng):
        self.quiescence("epoch")
        self.harvest_stats()
        self.rt.close()
        self.open_runtime()

    def act_close_busy(self, rng):
        """close() while a worker is in a hook: refused, and the runtime still works."""
        release = threading.Event()
        inside = threading.Event()

        def body():
            self.local.hook_plan = ("block", None)
            try:
                self.rt.function("tri")(3)
            except Exception:
                self.fail("blocked worker raised:\n" + traceback.format_exc())

        def block_hook(x):
            inside.set()
            release.wait(30)
            return 0

        self.rt.on_hook(block_hook)
        t = threading.Thread(target=body, daemon=True)
        t.start()
        try:
            if not inside.wait(30):
                self.fail("close_busy: worker never reached its hook")
                return
            try:
                self.rt.close(timeout=0.01)
            except osrjit.OsrJitError:
                self.count("close_refused")
            else:
                self.fail("close() returned while a thread waited in a hook")
                release.set()
                t.join(30)
                self.open_runtime()
                return
        finally:
            release.set()
            t.join(30)
            if not self.rt.closed:
                self.rt.on_hook(self.on_hook)
        self.check_tri(5, "after refused close")

    def act_fork(self, rng):
        """A child forked now replaces a 100-deep recursion with its frames live."""
        depth = 100
        high = rng.random() < 0.5
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                rt = self.rt

                def on_hook(_):
                    rt.replace("tri", source("tri", high))
                    return 0

                rt.on_hook(on_hook)
                r = rt.function("tri")(depth)
                stats = rt.stats()
                code = 0 if decodes(r, depth) and stats["pending_returns"] == 0 else 3
                if code:
                    print(f"fork child: tri({depth}) = {r}, stats {dict(stats)}",
                          file=sys.stderr, flush=True)
            except BaseException:
                traceback.print_exc()
                code = 2
            os._exit(code)
        end = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > end:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                self.fail("fork child hung for 60 s")
                return
            time.sleep(0.005)
        if os.waitstatus_to_exitcode(status) != 0:
            self.fail(f"fork child failed: exit code {os.waitstatus_to_exitcode(status)}")
        self.count("forks")

    def act_interrupt(self, rng):
        """SIGINT while this (the main) thread runs a JIT loop with polls."""
        started = threading.Event()
        self.local.loop_started = started
        sent = []

        def interrupter():
            if started.wait(30):
                sent.append(time.perf_counter())
                os.kill(os.getpid(), signal.SIGINT)

        t = threading.Thread(target=interrupter, daemon=True)
        t.start()
        try:
            r = self.rt.function("loop")(1 << 40)
            self.fail(f"interrupt: the loop finished ({r}) instead of raising KeyboardInterrupt")
        except KeyboardInterrupt:
            if sent:
                self.interrupt_latencies.append(time.perf_counter() - sent[0])
            self.count("interrupts")
        finally:
            self.local.loop_started = None
            t.join(30)
        self.check_tri(10, "after interrupt")

    def act_overflow(self, rng):
        try:
            r = self.rt.function("tri")(10_000_000)
            self.fail(f"overflow: tri(10_000_000) returned {r}")
        except osrjit.StackOverflow:
            self.count("overflows")
        self.check_tri(10, "after overflow")

    def act_replace(self, rng):
        self.replace(rng)

    def act_collect(self, rng):
        self.rt.collect()
        self.count("collects")

    def act_call(self, rng):
        self.local.hook_plan = None
        self.check_tri(rng.randint(1, MAX_DEPTH), "main")

    # -- run -----------------------------------------------------------------------------

    def harvest_stats(self):
        s = self.rt.stats()
        for key in ("transfers", "hijacks", "freed_versions", "native_transfers",
                    "python_transfers", "stops"):
            if key in s:
                self.count(f"stats_{key}", s[key])

    def watchdog(self):
        last, idle = -1, 0.0
        while True:
            time.sleep(5)
            if self.progress == last:
                idle += 5
                if idle >= 120:
                    print("soak: no progress for 120 s; stacks follow", file=sys.stderr)
                    faulthandler.dump_traceback(all_threads=True)
                    os._exit(4)
            else:
                last, idle = self.progress, 0.0

    def run(self) -> dict:
        threading.Thread(target=self.watchdog, daemon=True, name="soak-watchdog").start()
        actions = [(self.act_replace, 30), (self.act_call, 20), (self.act_collect, 5),
                   (self.act_epoch, 3), (self.act_close_busy, 2), (self.act_fork, 2),
                   (self.act_interrupt, 2), (self.act_overflow, 2)]
        if self.only is not None:
            actions = [(f, w) for f, w in actions if f.__name__[4:] in self.only]
        fns, weights = zip(*actions)
        self.open_runtime()
        started = time.monotonic()
        while time.monotonic() < self.deadline:
            self.keep_workers(self.rng)
            action = self.rng.choices(fns, weights)[0]
            try:
                action(self.rng)
            except Exception:
                self.fail(f"{action.__name__} raised:\n" + traceback.format_exc())
                if self.rt.closed:
                    self.open_runtime()
            time.sleep(self.rng.random() * 0.01)
        self.quiescence("end")
        self.harvest_stats()
        self.rt.close()
        lat = self.interrupt_latencies
        return {
            "seconds": round(time.monotonic() - started, 1), "seed": self.seed,
            "options": self.options, "failures": self.failures, "counts": dict(sorted(
                self.counts.items())),
            "interrupt_latency_ms": {
                "median": round(statistics.median(lat) * 1e3, 2) if lat else None,
                "max": round(max(lat) * 1e3, 2) if lat else None},
        }


#: The main thread's actions (``--actions`` picks a subset).
ACTIONS = ("replace", "call", "collect", "epoch", "close_busy", "fork", "interrupt", "overflow")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--paths", choices=["default", "reference"], default="default",
                    help="the runtime's defaults, or the reference walker and transfer")
    ap.add_argument("--actions", help="comma-separated subset of: " + ", ".join(ACTIONS))
    args = ap.parse_args(argv)
    options = {} if args.paths == "default" else {"transfer": "reference", "walker": "reference"}
    actions = args.actions.split(",") if args.actions else None
    if actions and not set(actions) <= set(ACTIONS):
        ap.error(f"unknown actions: {sorted(set(actions) - set(ACTIONS))}")
    report = Soak(args.seconds, args.seed, options, actions).run()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
