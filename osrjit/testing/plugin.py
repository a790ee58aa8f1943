"""pytest plugin (entry point ``pytest11: osrjit``): sweeps in a runtime author's tests.

Fixture ``osrjit_sweep``: :func:`osrjit.testing.sweep` whose ``points``
default comes from the command line::

    pytest --osrjit-sweep-points=all     # every instruction boundary
    pytest --osrjit-sweep-points=200     # a seeded sample of 200 (default: 50)

A test passes ``points=`` itself to override. Importing this plugin does not
import llvmlite or unicorn; the fixture does, on first use.
"""
import functools

import pytest

DEFAULT_SAMPLE = 50


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


@pytest.fixture
def osrjit_sweep(request):
    """``osrjit.testing.sweep`` with ``points`` defaulting to ``--osrjit-sweep-points``."""
    from osrjit.testing import sweep
    points = _points(request.config.getoption("--osrjit-sweep-points"))

    @functools.wraps(sweep)
    def run(versions, entry, args=(), **kwargs):
        kwargs.setdefault("points", points)
        return sweep(versions, entry, args, **kwargs)

    return run
