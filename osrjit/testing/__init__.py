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
``points=[k]``. Each :class:`SweepFailure` carries that call
(:attr:`SweepFailure.replay`) and, for the first
:data:`DESCRIBED_FAILURES` failures, where each replacement found every
thread: the function, the versions (old -> new), and the innermost old
frame's site with its source line (:mod:`osrjit.testing.report`).

Installed as a pytest plugin (entry point ``pytest11: osrjit``): the fixture
``osrjit_sweep`` is :func:`sweep` with the ``--osrjit-sweep-points`` option
(``all`` or a sample size) as its default ``points``, a progress line per
sweep on a terminal, and the failing points of a failed test's sweeps in its
report (:mod:`osrjit.testing.plugin`).
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["sweep", "SweepReport", "SweepFailure", "sample_points", "DESCRIBED_FAILURES"]

#: Failing points of one sweep that are run a second time to say where each
#: replacement found the threads (:attr:`SweepFailure.where`).
DESCRIBED_FAILURES = 10


@dataclass(frozen=True)
class SweepFailure:
    """Point ``k`` (instructions executed before the replacement request) and why it failed.

    ``where``: what each replacement of the point met, one
    :class:`osrjit.testing.report.ReplacementSeen` each — the functions and
    their versions (``versions[i] -> versions[j]``, runtime ids ``#a ->
    #b``), and per thread the innermost frame of an old version: its site
    (id, kind, callee) and the site's source line (or IR line); empty past
    the first :data:`DESCRIBED_FAILURES` failures. ``replay``: the Python
    call that runs just this point again.
    """
    k: int
    reason: str
    where: tuple = ()
    replay: str = ""

    def __str__(self):
        lines = [f"k={self.k}: {self.reason}"]
        lines += [f"    {line}" for seen in self.where for line in seen.lines()]
        if self.replay:
            lines.append(f"    replay: {self.replay}")
        return "\n".join(lines)


@dataclass(repr=False)
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

    def __repr__(self):
        ks = ", ".join(str(f.k) for f in self.failures[:5])
        more = ", ..." if len(self.failures) > 5 else ""
        failed = f", failing k: {ks}{more}" if self.failures else ""
        return (f"<SweepReport {self.points_passed}/{self.points_tried} points passed, "
                f"{self.old_code_fetches} old-code fetches{failed}>")


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
    stopped after an exact instruction count. Each failure names the call
    that replays it and, for the first :data:`DESCRIBED_FAILURES`, where the
    replacements found the threads (its point is run once more to see).
    """
    if backend != "emulated":
        raise ValueError(f"sweep() needs backend='emulated' (got {backend!r}): only an "
                         "emulated CPU stops after an exact number of instructions")
    versions = list(versions)
    if not versions:
        raise ValueError("sweep() needs at least one version")
    if threads < 1:
        raise ValueError("threads must be >= 1")
    poll_free = tuple(poll_free)
    options = dict(expect=expect, backend=backend, threads=threads, seed=seed, quantum=quantum,
                   poll_free=poll_free, grace=grace, stagger=stagger, hook=hook,
                   opt_level=opt_level)
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
    from .report import describe_replacement, replay_call
    for i, f in enumerate(report.failures):
        where = ()
        if i < DESCRIBED_FAILURES:
            where = _where(make, later, f.k, gap, n, expect, reference, poll_free, versions,
                           describe_replacement)
        report.failures[i] = dataclasses.replace(
            f, where=where, replay=replay_call(sweep, versions, entry, args, options, f.k))
    report.seconds = time.perf_counter() - started
    return report


def _where(make, later, k, gap, n, expect, reference, poll_free, versions, describe):
    """Run point ``k`` again (the same run: the emulator is deterministic),
    describing each replacement right after it."""
    seen = []

    def observe(number, rt, ts, names, old, new, requested_at, source_of):
        seen.append(describe(rt, ts, names, old, new, number=number, requested_at=requested_at,
                             sources=versions, source_of=source_of))

    _one_point(make, later, k, gap, n, expect, reference, poll_free, SweepReport(), observe)
    return tuple(seen)


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


def _one_point(make, later, k, gap, n, expect, reference, poll_free, report, observe=None):
    """Run one point; returns None or the reason it failed. ``observe(number,
    rt, threads, names, old, new, requested_at, source_of)`` is called right
    after each replacement (see :func:`osrjit.testing.report.describe_replacement`)."""
    rt, ts = make()
    try:
        budget = k
        source_of = {rt.current(name).id: 0 for name in rt.names()} if observe else {}
        for j, (names, source) in enumerate(later):
            if budget:
                rt.run(budget)
            old = {name: rt.current(name) for name in names if name in rt.names()}
            requested_at = rt.instructions
            new = _compile(rt, source, poll_free, names)
            if observe is not None:
                source_of.update((v.id, j + 1) for v in new)
                observe(j + 1, rt, ts, names, old, new, requested_at, source_of)
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
