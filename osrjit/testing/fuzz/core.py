"""What every fuzz target shares: the seed programs, outcomes and their counts."""
from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["SEED_PROGRAMS", "Outcome", "Target", "Tally", "classify", "broken"]

#: Reference-language programs whose functions are the seeds: calls (direct
#: and through slots), recursion, hooks, loops with polls, division (the error
#: service), an explicit safepoint.
SEED_PROGRAMS = (
    "def fib(n):\n"
    "    if n < 2:\n"
    "        return n\n"
    "    return fib(n - 1) + fib(n - 2)\n"
    "\n"
    "def g(x):\n"
    "    return fib(x) + hook(x)\n",
    "def loop(n, d):\n"
    "    total = 0\n"
    "    i = 0\n"
    "    while i < n:\n"
    "        safepoint()\n"
    "        total += i // d + i % 3\n"
    "        i += 1\n"
    "    return total\n",
)


# --------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """How one case ended: ``kind`` is ``"valid"`` or the error's class name;
    ``foreign`` when that error is not the target's own; ``detail``: the
    traceback of a foreign error (or what check failed), else ``""``."""
    target: str
    kind: str
    foreign: bool = False
    detail: str = ""


@dataclass(frozen=True)
class Target:
    """A public entry under fuzz: ``run(seed, data, choice) -> Outcome``
    (``choice``: an integer for whatever the target picks, such as the pc a
    walk starts at); ``allowed``: the root of the errors it may end with."""
    name: str
    run: Callable
    allowed: type


def classify(target: str, allowed: type, error: BaseException | None) -> Outcome:
    if error is None:
        return Outcome(target, "valid")
    if isinstance(error, allowed):
        return Outcome(target, type(error).__name__)
    return Outcome(target, type(error).__name__, True,
                   "".join(traceback.format_exception(error)))


def broken(target: str, what: str) -> Outcome:
    """A case that ended without an exception but with a wrong result (a bug)."""
    return Outcome(target, "broken", True, what)


# --------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------

@dataclass
class Tally:
    """Outcome counts of one target: ``outcomes`` kind -> count, ``foreign``
    (the first few foreign outcomes kept whole), ``seconds`` spent."""
    target: str
    cases: int = 0
    outcomes: dict = field(default_factory=dict)
    foreign: list = field(default_factory=list)
    foreign_count: int = 0
    seconds: float = 0.0

    def add(self, outcome: Outcome, seconds: float = 0.0):
        self.cases += 1
        self.seconds += seconds
        self.outcomes[outcome.kind] = self.outcomes.get(outcome.kind, 0) + 1
        if outcome.foreign:
            self.foreign_count += 1
            if len(self.foreign) < 5:
                self.foreign.append(outcome)

    def timed(self, run: Callable[[], Outcome]) -> Outcome:
        """Run one case, count it and its time; returns its outcome."""
        t0 = time.perf_counter()
        outcome = run()
        self.add(outcome, time.perf_counter() - t0)
        return outcome
