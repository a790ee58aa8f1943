"""pytest plugin (entry point ``pytest11: osrjit``): sweeps in a runtime author's tests.

Fixture ``osrjit_sweep``: :func:`osrjit.testing.sweep` whose ``points``
default comes from the command line::

    pytest --osrjit-sweep-points=all     # every instruction boundary
    pytest --osrjit-sweep-points=200     # a seeded sample of 200 (default: 50)

A test passes ``points=`` itself to override. What the plugin reports:

* on a terminal, one progress line per sweep, rewritten in place: the
  function and arguments, points done / total, points per second; then the
  sweep's outcome. Not on a terminal (a CI log), nothing while it runs, and
  the outcome line with ``-v`` only;
* when a test that ran sweeps fails, a section ``osrjit sweep failures``
  in its report with every failed sweep's summary: each failing point with
  its reason, where each replacement found the threads (function, versions,
  the innermost old frame's site and its source line) and the one call that
  replays it (:class:`osrjit.testing.SweepFailure`).

Importing this plugin does not import llvmlite or unicorn; the fixture does,
on first use.
"""
import functools
import time

import pytest

DEFAULT_SAMPLE = 50
#: Seconds between two rewrites of a progress line (the last one is always written).
PROGRESS_INTERVAL_SECONDS = 0.2

_REPORTS = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("osrjit")
    group.addoption("--osrjit-sweep-points", default=str(DEFAULT_SAMPLE),
                    help="points per osrjit_sweep: 'all' (every instruction boundary) or a "
                         f"sample size (default {DEFAULT_SAMPLE})")


def _points(value: str):
    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        raise pytest.UsageError(f"--osrjit-sweep-points: 'all' or a number, not {value!r}")
    if count < 1:
        raise pytest.UsageError("--osrjit-sweep-points must be at least 1")
    return count


class _Progress:
    """One sweep's progress line, written to the terminal past output capture."""

    def __init__(self, config, label: str, chained=None):
        self._tr = config.pluginmanager.getplugin("terminalreporter")
        self._capman = config.pluginmanager.getplugin("capturemanager")
        self._live = self._tr is not None and bool(self._tr.isatty())
        self._verbose = (config.getoption("verbose") or 0) > 0
        self._label = label
        self._chained = chained
        self._started = time.perf_counter()
        self._written_at = None

    def _write(self, text: str, *, final: bool):
        if self._capman is None:
            self._emit(text, final)
            return
        with self._capman.global_and_fixture_disabled():
            self._emit(text, final)

    def _emit(self, text, final):
        tr = self._tr
        if self._live:
            if self._written_at is None:
                tr.write("\n")
            tr.rewrite(text, erase=True)
            if final:
                tr.write("\n")
        else:
            tr.write_line(text)
        tr.flush()

    def _rate(self, done):
        return done / max(1e-9, time.perf_counter() - self._started)

    def __call__(self, done: int, total: int):
        if self._chained is not None:
            self._chained(done, total)
        now = time.perf_counter()
        if not self._live or (self._written_at is not None and done < total
                              and now - self._written_at < PROGRESS_INTERVAL_SECONDS):
            return
        self._write(f"{self._label}: {done}/{total} points, {self._rate(done):.1f} points/s",
                    final=False)
        self._written_at = now

    def finish(self, report):
        if self._tr is None or not (self._live or self._verbose):
            return
        outcome = "ok" if report.ok else f"{len(report.failures)} FAILED"
        self._write(f"{self._label}: {report.points_passed}/{report.points_tried} points passed, "
                    f"{self._rate(report.points_tried):.1f} points/s, "
                    f"{report.old_code_fetches} old-code fetches: {outcome}", final=True)


@pytest.fixture
def osrjit_sweep(request):
    """``osrjit.testing.sweep`` with ``points`` defaulting to ``--osrjit-sweep-points``."""
    from osrjit.testing import sweep
    points = _points(request.config.getoption("--osrjit-sweep-points"))
    reports = request.node.stash.setdefault(_REPORTS, [])

    @functools.wraps(sweep)
    def run(versions, entry, args=(), **kwargs):
        kwargs.setdefault("points", points)
        progress = _Progress(request.config, f"osrjit sweep {entry}{tuple(args)!r}",
                             kwargs.get("progress"))
        kwargs["progress"] = progress
        report = sweep(versions, entry, args, **kwargs)
        reports.append(report)
        progress.finish(report)
        return report

    return run


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        failed = [r for r in item.stash.get(_REPORTS, ()) if not r.ok]
        if failed:
            report.sections.append(("osrjit sweep failures",
                                    "\n\n".join(r.summary() for r in failed)))
    return report
