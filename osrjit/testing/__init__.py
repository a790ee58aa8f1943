"""Replacement sweeps: request a replacement at every instruction boundary of a run.

A runtime author's test states a program (the first version of some
functions), later versions, an entry point and its arguments; :func:`sweep`
runs the program on the emulated backend (:class:`osrjit.emulated.EmulatedRuntime`)
once per point ``k``, requests the replacement after exactly ``k``
instructions, lets every thread finish, and checks:

* each thread's result (``expect(k)``, or by default the result of v1 run alone);
* no thread faulted and no service reported an exception;
* no instruction of an old version was fetched after its replacement
  completed, and no freed code was fetched (:attr:`SweepReport.old_code_fetches`);
* every hijacked frame was transferred (``transfers == hijacks``, no fallback
  into old code), no stack still returns into the deopt stub, and after a
  final collection every old version has been freed.

The emulator is deterministic (``seed`` fixes the schedule of ``threads``
threads), so a failing point replays exactly: rerun :func:`sweep` with
``points=[k]``.

Installed as a pytest plugin (entry point ``pytest11: osrjit``): the fixture
``osrjit_sweep`` is :func:`sweep` with the ``--osrjit-sweep-points`` option
(``all`` or a sample size) as its default ``points``.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["sweep", "SweepReport", "SweepFailure", "sample_points"]


@dataclass(frozen=True)
class SweepFailure:
    """Point ``k`` (instructions executed before the replacement request) and why it failed."""
    k: int
    reason: str

    def __str__(self):
        return f"k={self.k}: {self.reason}"


@dataclass
class SweepReport:
    """What :func:`sweep` found.

    ``points_tried`` / ``points_passed``: counts. ``failures``: one
    :class:`SweepFailure` per failed point. ``old_code_fetches``: total
    instructions fetched from old or freed versions after a replacement
    completed, over all points. ``run_instructions``: length of the reference
    run (v1 alone; ``points=None`` sweeps ``range(run_instructions)``).
    ``transfers`` / ``frames_hijacked`` / ``stopped_async``: totals over all
    points. ``expected``: the reference results, one per thread.
    ``seconds``: wall time.
    """
    points_tried: int = 0
    points_passed: int = 0
    failures: list = field(default_factory=list)
    old_code_fetches: int = 0
    run_instructions: int = 0
    transfers: int = 0
    frames_hijacked: int = 0
    stopped_async: int = 0
    expected: tuple = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and self.old_code_fetches == 0 and \
            self.points_passed == self.points_tried

    def summary(self) -> str:
        lines = [f"{self.points_passed}/{self.points_tried} points passed, "
                 f"{len(self.failures)} failures, {self.old_code_fetches} old-code fetches "
                 f"(run of {self.run_instructions} instructions; {self.transfers} transfers, "
                 f"{self.frames_hijacked} frames hijacked, {self.stopped_async} async stops; "
                 f"{self.seconds:.1f} s)"]
        lines += [f"  {f}" for f in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... {len(self.failures) - 20} more")
        return "\n".join(lines)

    __str__ = summary


def sample_points(n_instructions: int, count: int, seed: int = 0) -> list[int]:
    """``count`` distinct points of ``range(n_instructions)`` drawn with ``seed``
    (always including the first and the last), sorted."""
    if count >= n_instructions:
        return list(range(n_instructions))
    if count <= 2:
        return [0, n_instructions - 1][:max(count, 1)]
    rng = random.Random(seed)
    inner = rng.sample(range(1, n_instructions - 1), count - 2)
    return sorted([0, n_instructions - 1] + inner)


def _defined_names(source: str) -> list[str]:
    import ast
    return [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]


def sweep(versions: Sequence[str], entry: str, args: tuple = (), *,
          expect: Callable[[int], object] | None = None, backend: str = "emulated",
          points: Iterable[int] | int | None = None, threads: int = 1, seed: int = 0,
          quantum: tuple[int, int] = (1, 100), poll_free: Iterable[str] = (),
          grace: int = 10_000, stagger: int | None = None, hook: Callable | None = None,
          opt_level: int = 2, progress: Callable[[int, int], None] | None = None) -> SweepReport:
    """Replace ``versions[1:]`` into a run of ``versions[0]`` at every point.

    ``versions``: reference-language sources; ``versions[0]`` defines the
    program, each later source the functions it replaces (all of those, and
    only those, are replaced). ``entry(*args)`` runs in ``threads`` emulated
    threads. ``points``: the instruction counts ``k`` at which the first
    replacement is requested; default every instruction boundary of the
    reference run (``range(n)``); an int samples that many (seeded). Later
    versions follow every ``stagger`` instructions (default ``n // (2 *
    len(versions))``). ``expect(k)``: the expected result (an int for every
    thread, or a tuple with one per thread); None means "the same as v1 run
    alone", so later versions should compute the same function compiled
    differently. ``poll_free``: names of functions compiled without safepoint
    polls (stopped by the emulated "signal" after ``grace`` instructions).
    ``hook``: the hook service. ``progress(done, total)`` is called after
    each point. Only ``backend="emulated"`` sweeps: a native CPU cannot be
    stopped after an exact instruction count.
    """
    if backend != "emulated":
        raise ValueError(f"sweep() needs backend='emulated' (got {backend!r}): only an "
                         "emulated CPU stops after an exact number of instructions")
    versions = list(versions)
    if not versions:
        raise ValueError("sweep() needs at least one version")
    if threads < 1:
        raise ValueError("threads must be >= 1")
    cache: dict = {}
    poll_free = frozenset(poll_free)
    report = SweepReport()
    started = time.perf_counter()

    def make():
        from osrjit.emulated.runtime import EmulatedRuntime
        rt = EmulatedRuntime(opt_level=opt_level, seed=seed, quantum=quantum, grace=grace,
                             object_cache=cache)
        if hook is not None:
            rt.on_hook(hook)
        _compile(rt, versions[0], poll_free)
        ts = [rt.spawn(entry, *args) for _ in range(threads)]
        return rt, ts

    # The reference run: v1 alone.
    rt, ts = make()
    rt.run()
    reference = tuple(_finish(t) for t in ts)
    n = rt.instructions
    report.run_instructions = n
    report.expected = reference
    if points is None:
        points = range(n)
    elif isinstance(points, int):
        points = sample_points(n, points, seed)
    points = list(points)
    gap = stagger if stagger is not None else max(1, n // (2 * max(1, len(versions))))
    later = [(_defined_names(src), src) for src in versions[1:]]

    for i, k in enumerate(points):
        report.points_tried += 1
        failure = _one_point(make, later, k, gap, n, expect, reference, poll_free, report)
        if failure is None:
            report.points_passed += 1
        else:
            report.failures.append(SweepFailure(k, failure))
        if progress is not None:
            progress(i + 1, len(points))
    report.seconds = time.perf_counter() - started
    return report


def _compile(rt, source, poll_free, names=None):
    """Compile ``source`` with polls except for the functions in ``poll_free``."""
    from osrjit import lang
    known = {n: len(rt.current(n).ir.params) for n in rt.names()}
    with_polls = lang.compile_source(source, known=known, polls=True, calls=rt.calls)
    if poll_free & {ir.name for ir in with_polls}:
        without = {ir.name: ir for ir in lang.compile_source(source, known=known, polls=False,
                                                             calls=rt.calls)}
        irs = [without[ir.name] if ir.name in poll_free else ir for ir in with_polls]
    else:
        irs = with_polls
    if names is None:
        return rt.compile_ir(irs)
    return rt.replace(names, irs)


def _finish(thread):
    from osrjit.emulated.program import finish
    return finish(thread)


def _one_point(make, later, k, gap, n, expect, reference, poll_free, report):
    """Run one point; returns None or the reason it failed."""
    rt, ts = make()
    try:
        budget = k
        for j, (names, source) in enumerate(later):
            if budget:
                rt.run(budget)
            _compile(rt, source, poll_free, names)
            pause = rt.last_pause
            report.frames_hijacked += pause.frames_hijacked
            report.stopped_async += pause.stopped_async
            budget = gap
        cap = 50 * n + 1_000_000
        before = rt.instructions
        if not rt.run(cap) and any(not t.finished for t in ts):
            if rt.instructions - before >= cap:
                return f"the run did not finish within {cap} instructions after the replacement"
        stats = rt.stats()
        report.old_code_fetches += stats["old_code_fetches"]
        report.transfers += stats["transfers"]
        if stats["old_code_fetches"]:
            return f"{stats['old_code_fetches']} old-code fetches, first: {rt.old_code_fetches[0]}"
        results = []
        for t in ts:
            try:
                results.append(_finish(t))
            except Exception as e:  # noqa: BLE001 - a fault or pending exception fails the point
                return f"thread {t.id}: {type(e).__name__}: {e}"
        want = reference if expect is None else expect(k)
        if not isinstance(want, tuple):
            want = (want,) * len(ts)
        if tuple(results) != tuple(want):
            return f"results {tuple(results)} != expected {tuple(want)}"
        if stats["transfer_failures"]:
            return (f"{stats['transfer_failures']} frames fell back to old code: "
                    f"{rt.last_transfer_error}")
        if stats["transfers"] != stats["hijacks"]:
            return f"{stats['hijacks']} hijacks but {stats['transfers']} transfers"
        leftover = rt.stub_frames()
        if leftover:
            return f"stacks still return into the deopt stub: {leftover[:4]}"
        rt.collect()
        stats = rt.stats()
        old = {name: count - 1 for name, count in stats["live_versions"].items() if count > 1}
        if old:
            return f"old versions still loaded at the end: {old}"
        return None
    finally:
        rt.close()
