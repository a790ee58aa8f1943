"""Resource hygiene: many runtimes, one after another, in one process.

:func:`runtime_cycles` runs ``cycles`` *cycles*; each makes a native
:class:`osrjit.Runtime`, compiles a recursive function with a hook, calls it
on this thread — the hook replaces it while its frames are live (in every
cycle, or in one pair of cycles in ``replace_every``), so the cycle stops
the world, scans, hijacks and transfers — and on a helper thread
that lives across all cycles (it attaches to every runtime, so closing must
let go of its block, not its exit), checks both results and closes the
runtime. Cycles alternate the reference paths and the fast paths
(``transfer``/``walker``: ``"reference"``, then ``"fast"``), so the native
walker, the scan buffers, self-scan blocks and LIFOs are made and released
too. Between samples it reads what the process holds
(:func:`process_figures`, after ``gc.collect()``): resident set size, open
file descriptors, threads, and how many of the closed runtimes are still
alive (weak references).

Figures are taken after a warm-up (by default the first 10 % of the cycles:
the allocator's and the interpreter's caches fill once) so the growth per
cycle is what the runtimes leave behind. The default compiles at
``opt_level=0``: every run of llvmlite's ``O1``–``O3`` pass pipeline leaks
about 60 KB in the process that runs it (see :mod:`osrjit.native.compiler`),
which would hide what the runtime itself takes; ``opt_level=2`` with
``compiler="worker"`` runs the pipeline in the shared compile worker.

Used by ``tests/test_hygiene.py`` (in a child process) and
``scripts/hygiene_report.py``.
"""
from __future__ import annotations

import gc
import os
import threading
import time
import traceback
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["ProcessFigures", "HygieneReport", "process_figures", "runtime_cycles",
           "CYCLE_V1", "CYCLE_V2", "PATHS"]

#: What each cycle compiles, then replaces from the hook at the bottom of the
#: recursion. Both versions compute ``n * (n + 1) // 2`` with different code
#: and the same sites, so frames of v1 resume in v2.
CYCLE_V1 = """
def f(n):
    if n == 0:
        return hook(0)
    return n + f(n - 1)
"""
CYCLE_V2 = """
def f(n):
    if n == 0:
        return hook(0)
    r = f(n - 1)
    return r + n
"""
#: ``(transfer, walker)`` of cycle ``i``: ``PATHS[i % 2]``.
PATHS = (("reference", "reference"), ("fast", "fast"))
#: Recursion depth of each call (frames hijacked by the cycle's replace).
DEPTH = 20


@dataclass(frozen=True)
class ProcessFigures:
    """What the process holds at one moment, after ``cycle`` cycles.

    ``rss_bytes``: ``VmRSS`` of ``/proc/self/status``; ``fds``: entries of
    ``/proc/self/fd``; ``native_threads``: entries of ``/proc/self/task``;
    ``python_threads``: :func:`threading.active_count`; ``runtimes_alive``:
    closed runtimes not yet collected; ``seconds``: since the first cycle began.
    """
    cycle: int
    rss_bytes: int
    fds: int
    native_threads: int
    python_threads: int
    runtimes_alive: int
    seconds: float


def process_figures(cycle: int = 0, runtimes_alive: int = 0, seconds: float = 0.0):
    """This process's :class:`ProcessFigures` now (``gc.collect()`` first)."""
    gc.collect()
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024          # the kernel reports kB
                break
    return ProcessFigures(cycle=cycle, rss_bytes=rss, fds=len(os.listdir("/proc/self/fd")),
                          native_threads=len(os.listdir("/proc/self/task")),
                          python_threads=threading.active_count(),
                          runtimes_alive=runtimes_alive, seconds=seconds)


@dataclass(frozen=True)
class HygieneReport:
    """What :func:`runtime_cycles` measured.

    ``cycles``: cycles run (all of them unless one failed);
    ``samples``: :class:`ProcessFigures` before the first cycle, every
    ``sample_every`` cycles and after the last; ``warmup``: the figures the
    growth is measured from; ``failure``: the traceback of the cycle that
    failed (the run stops there), or None; ``options``: the runtimes' options.
    """
    cycles: int
    samples: tuple
    warmup: ProcessFigures
    failure: str | None
    options: tuple

    @property
    def end(self) -> ProcessFigures:
        return self.samples[-1]

    @property
    def seconds(self) -> float:
        return self.end.seconds

    @property
    def rss_growth_per_cycle_bytes(self) -> float:
        """RSS growth from the warm-up sample to the end, per cycle (bytes)."""
        span = self.end.cycle - self.warmup.cycle
        return (self.end.rss_bytes - self.warmup.rss_bytes) / span if span else 0.0

    def as_json(self) -> dict:
        """The figures as one JSON-ready dict."""
        end, warm = self.end, self.warmup
        return {
            "cycles": self.cycles, "failure": self.failure, "options": dict(self.options),
            "warmup_cycle": warm.cycle, "seconds": round(self.seconds, 3),
            "seconds_per_cycle": round(self.seconds / max(self.cycles, 1), 6),
            "rss_growth_per_cycle_bytes": round(self.rss_growth_per_cycle_bytes, 1),
            "rss_bytes": {"start": self.samples[0].rss_bytes, "warmup": warm.rss_bytes,
                          "end": end.rss_bytes},
            "fds": {"start": self.samples[0].fds, "warmup": warm.fds, "end": end.fds},
            "native_threads": {"start": self.samples[0].native_threads,
                               "warmup": warm.native_threads, "end": end.native_threads},
            "python_threads": {"warmup": warm.python_threads, "end": end.python_threads},
            "runtimes_alive": end.runtimes_alive,
            "samples": [[s.cycle, s.rss_bytes, s.fds, s.native_threads, round(s.seconds, 3)]
                        for s in self.samples],
        }

    def summary(self) -> str:
        end, warm = self.end, self.warmup
        head = (f"{self.cycles} runtimes in {self.seconds:.1f} s "
                f"({1000 * self.seconds / max(self.cycles, 1):.1f} ms per cycle)")
        if self.failure:
            head += f"; cycle {self.cycles + 1} failed:\n{self.failure}"
        return (f"{head}\nRSS growth after cycle {warm.cycle}: "
                f"{self.rss_growth_per_cycle_bytes:.0f} bytes per cycle "
                f"({warm.rss_bytes >> 10} -> {end.rss_bytes >> 10} KiB); "
                f"fds {warm.fds} -> {end.fds}; native threads {warm.native_threads} -> "
                f"{end.native_threads}; closed runtimes still alive: {end.runtimes_alive}")


def _one_cycle(index, helper, runtimes, options, replace):
    from ..runtime import Runtime
    transfer, walker = PATHS[index % 2]
    rt = Runtime(transfer=transfer, walker=walker, **options)
    runtimes.append(weakref.ref(rt))
    try:
        rt.compile(CYCLE_V1)
        f = rt.function("f")
        replaced = []

        def on_hook(_value):
            if replace and not replaced:
                replaced.append(rt.replace("f", CYCLE_V2))
            return 0
        rt.on_hook(on_hook)
        expected = DEPTH * (DEPTH + 1) // 2
        got = f(DEPTH)
        if got != expected:
            raise AssertionError(f"f({DEPTH}) on this thread gave {got}")
        got = helper.submit(f, DEPTH).result()
        if got != expected:
            raise AssertionError(f"f({DEPTH}) on the helper thread gave {got}")
        stats = rt.stats()
        transfers = DEPTH + 1 if replace else 0
        if stats["transfers"] != transfers or stats["pending_returns"]:
            raise AssertionError(f"transfers {stats['transfers']}, pending returns "
                                 f"{stats['pending_returns']} (expected {transfers}, 0)")
    finally:
        rt.close()


def _alive(runtimes):
    """How many of ``runtimes`` (weak references) a collection leaves alive."""
    gc.collect()
    return sum(1 for r in runtimes if r() is not None)


def runtime_cycles(cycles: int, *, warmup: int | None = None, sample_every: int | None = None,
                   replace_every: int = 1, opt_level: int = 0, compiler: str = "inprocess",
                   progress=None) -> HygieneReport:
    """Run ``cycles`` runtime cycles (see the module docstring) and measure.

    ``warmup``: the cycle the growth is measured from (default 10 % of
    ``cycles``); ``sample_every``: cycles between samples (default
    ``cycles // 20``); ``replace_every``: one pair of cycles (one per path)
    in that many replaces from the hook, the others only call (a replace
    about doubles a cycle's time); ``opt_level``, ``compiler``: the runtimes' options.
    ``progress(cycle, cycles)`` is called after each sample. Stops at the
    first cycle that raises (:attr:`HygieneReport.failure`).
    """
    warmup = max(1, cycles // 10) if warmup is None else warmup
    sample_every = max(1, cycles // 20) if sample_every is None else sample_every
    options = {"opt_level": opt_level, "compiler": compiler}
    if replace_every < 1:
        raise ValueError(f"replace_every must be >= 1, got {replace_every}")
    runtimes: list[weakref.ref] = []
    marks = {0, warmup, cycles} | set(range(sample_every, cycles, sample_every))
    failure = None
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hygiene-helper") as helper:
        helper.submit(lambda: None).result()     # the helper thread exists before sample 0
        start = time.perf_counter()
        samples = [process_figures(0)]
        warm = samples[0]
        for i in range(cycles):
            try:
                _one_cycle(i, helper, runtimes, options, (i // 2) % replace_every == 0)
            except Exception:  # noqa: BLE001 - reported, the run stops
                failure = traceback.format_exc()
                break
            done = i + 1
            if done in marks:
                s = process_figures(done, _alive(runtimes), time.perf_counter() - start)
                samples.append(s)
                if done == warmup:
                    warm = s
                if progress is not None:
                    progress(done, cycles)
        if failure is not None:
            samples.append(process_figures(done, _alive(runtimes), time.perf_counter() - start))
    options["replace_every"] = replace_every
    return HygieneReport(cycles=done, samples=tuple(samples), warmup=warm, failure=failure,
                         options=tuple(sorted(options.items())))
