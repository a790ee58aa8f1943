"""The replacement scenarios swept by osrjit's own tests and ``scripts/sweep.py``.

Each :class:`Scenario` holds the arguments of :func:`osrjit.testing.sweep`.
Later versions compute the same function as v1 with different code (so the
default expectation, "the result of v1 alone", holds wherever the
replacement lands), and keep every site v1 has with live values v1 records.
The runs are at least 2,000 instructions long, so a full sweep tries at
least 2,000 points.
"""
from dataclasses import dataclass, field

__all__ = ["Scenario", "SCENARIOS"]


@dataclass(frozen=True)
class Scenario:
    name: str
    versions: tuple
    entry: str
    args: tuple
    threads: int = 1
    poll_free: tuple = ()
    grace: int = 10_000
    note: str = ""
    kwargs: dict = field(default_factory=dict)

    def sweep(self, **overrides):
        """Run :func:`osrjit.testing.sweep` on this scenario (``overrides`` win)."""
        from . import sweep
        kw = dict(threads=self.threads, poll_free=self.poll_free, grace=self.grace, **self.kwargs)
        kw.update(overrides)
        return sweep(list(self.versions), self.entry, self.args, **kw)


SUM_V1 = """
def sum(n):
    if n == 0:
        return 0
    return n + sum(n - 1)
"""
SUM_V2 = """
def sum(n):
    if n == 0:
        return 0
    r = sum(n - 1)
    return r + n
"""
SUM_V3 = """
def sum(n):
    if n <= 0:
        return 0
    r = sum(n - 1)
    return n - (0 - r)
"""

EVEN_ODD_V1 = """
def even(n):
    if n == 0:
        return 1
    return odd(n - 1)

def odd(n):
    if n == 0:
        return 0
    return even(n - 1)
"""
EVEN_ODD_V2 = """
def even(n):
    if n <= 0:
        return 1
    r = odd(n - 1)
    return r

def odd(n):
    if n <= 0:
        return 0
    r = even(n - 1)
    return r
"""

LOOP_V1 = """
def squares(n):
    s = 0
    i = 0
    while i < n:
        s = s + i * i
        i = i + 1
    return s
"""
LOOP_V2 = """
def squares(n):
    s = 0
    i = 0
    while i < n:
        t = i * i
        s = t + s
        i += 1
    return s
"""

POLL_FREE_V1 = """
def spin(m):
    i = 0
    x = 1
    while i < m:
        x = (x * 7 + i) % 1009
        i = i + 1
    return x

def work(n):
    if n == 0:
        return spin(300)
    return 1 + work(n - 1)
"""
POLL_FREE_V2 = """
def work(n):
    if n == 0:
        return spin(300)
    r = work(n - 1)
    return r + 1
"""

SCENARIOS = {s.name: s for s in (
    Scenario("recursive", (SUM_V1, SUM_V2), "sum", (130,),
             note="sum(130): 131 frames of one function"),
    Scenario("mutual", (EVEN_ODD_V1, EVEN_ODD_V2), "even", (151,),
             note="even/odd both replaced at once"),
    Scenario("chained", (SUM_V1, SUM_V2, SUM_V3), "sum", (130,),
             note="v1 -> v2 -> v3, the second replacement a quarter-run later"),
    Scenario("loop-osr", (LOOP_V1, LOOP_V2), "squares", (250,),
             note="a loop frame parked at its back-edge poll resumes in v2's loop"),
    Scenario("poll-free-callee", (POLL_FREE_V1, POLL_FREE_V2), "work", (40,),
             poll_free=("spin",), grace=200,
             note="the caller of a poll-free loop is replaced; threads in the loop "
                  "are stopped after 200 instructions (the emulated signal)"),
    Scenario("three-threads", (SUM_V1, SUM_V2), "sum", (45,), threads=3,
             note="three threads, seeded interleaving"),
)}
