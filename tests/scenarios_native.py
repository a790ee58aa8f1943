"""Native replacement scenarios shared by test modules: sources, scenario
functions and the references their results are checked against.

``paths`` (a scenario's option): ``"fast"`` (the runtime's defaults) or
``"reference"``, for both ``transfer`` and ``walker``.

Each scenario function is run in a child process by ``childproc.run_child``,
which imports this module by name there (it lives in ``tests/``, which the
child puts on ``sys.path``); arguments and results are picklable.
"""
import random
import threading
import time

__all__ = ["SUM_V1", "SUM_V2", "FIB_V1", "FIB_V2", "fib_scenario", "fib_mixed_reference",
           "EVEN_ODD_V1", "EVEN_V2", "ODD_V2", "even_odd_scenario", "CHAIN",
           "LOOP_V1", "LOOP_V2", "loop_osr_scenario", "WORK", "PAUSE", "workers_scenario"]

# --------------------------------------------------------------------------
# One thread: replacement with frames live on its stack
# --------------------------------------------------------------------------

SUM_V1 = """
def sum(n):
    if n == 0:
        return hook(0)
    return n + sum(n - 1)
"""
SUM_V2 = """
def sum(n):
    if n == 0:
        return hook(0)
    return 2 * n + sum(n - 1)
"""


FIB_V1 = """
def fib(n):
    if n < 2:
        return n + 0 * hook(n)
    return fib(n - 1) + fib(n - 2)
"""
FIB_V2 = """
def fib(n):
    if n < 2:
        return n + 0 * hook(n)
    return fib(n - 1) + fib(n - 2) + 1
"""


def fib_scenario(n, replace_at, calls="slot", paths="fast"):
    import osrjit
    with osrjit.Runtime(calls=calls, transfer=paths, walker=paths) as rt:
        rt.compile(FIB_V1)
        count = [0]

        def on_hook(_):
            count[0] += 1
            if count[0] == replace_at:
                rt.replace("fib", FIB_V2)
            return 0

        rt.on_hook(on_hook)
        result = rt.function("fib")(n)
        return result, rt.stats()


def fib_mixed_reference(n, replace_at):
    """The mixed run in Python: a frame adds 1 if it returns after the replacement."""
    state = {"leaves": 0, "replaced": False}

    def fib(n):
        if n < 2:
            state["leaves"] += 1
            if state["leaves"] == replace_at:
                state["replaced"] = True
            return n
        a = fib(n - 1)
        b = fib(n - 2)
        return a + b + (1 if state["replaced"] else 0)

    return fib(n)


EVEN_ODD_V1 = """
def even(n):
    if n == 0:
        return 1 + 0 * hook(n)
    return odd(n - 1)

def odd(n):
    if n == 0:
        return 0 + 0 * hook(n)
    return even(n - 1)
"""
EVEN_V2 = """
def even(n):
    if n == 0:
        return 1 + 0 * hook(n)
    return odd(n - 1) + 10
"""
ODD_V2 = """
def odd(n):
    if n == 0:
        return 0 + 0 * hook(n)
    return even(n - 1) + 100
"""


def even_odd_scenario(n, which, calls="slot", paths="fast"):
    import osrjit
    with osrjit.Runtime(calls=calls, transfer=paths, walker=paths) as rt:
        rt.compile(EVEN_ODD_V1)

        def on_hook(_):
            if which == "both":
                rt.replace(["even", "odd"], EVEN_V2 + ODD_V2)
            else:
                rt.replace("odd", ODD_V2)
            return 0

        rt.on_hook(on_hook)
        first = rt.function("even")(n)
        # A second run starts from scratch: every call, direct or through a
        # slot, must now reach the new versions.
        rt.on_hook(lambda x: 0)
        links = [(r.kind.name, r.target == rt.current(site.callee).entry)
                 for callee in ("even", "odd") for site, r in rt.native_backend.call_sites.resolutions(callee)]
        return first, rt.stats(), rt.function("even")(n), links


CHAIN = """
def sum(n):
    if n == 0:
        return 0
    hook(n)
    return {k} * n + sum(n - 1)
"""


LOOP_V1 = """
def loop(n):
    i = 0
    s = 0
    while i < n:
        s = s + i
        i = i + 1
    return s
"""
LOOP_V2 = """
def loop(n):
    i = 0
    s = 0
    while i < n:
        s = s + 2 * i
        i = i + 1
    return s
"""


def loop_osr_scenario(n, at_poll, paths="fast"):
    import osrjit
    with osrjit.Runtime(transfer=paths, walker=paths) as rt:
        rt.compile(LOOP_V1)
        polls = [0]

        def on_safepoint():
            polls[0] += 1
            if polls[0] == at_poll:
                rt.replace("loop", LOOP_V2)
                rt.safepoint_flag = 0

        rt.on_safepoint(on_safepoint)
        rt.safepoint_flag = 1
        return rt.function("loop")(n), polls[0], rt.stats()


# --------------------------------------------------------------------------
# Threads: replacement while other threads run the code being replaced
# --------------------------------------------------------------------------

WORK = """
def work(n):
    if n == 0:
        return pause(100000)
    return {k} + work(n - 1)
"""
# Keeps each thread deep in JIT code most of the time (a loop with polls at
# the bottom of every recursion), so replacements catch frames mid-flight.
PAUSE = """
def pause(k):
    i = 0
    while i < k:
        i = i + 1
    return 0
"""


def workers_scenario(n_threads, depth, replacements, seed, transfer="fast", walker="fast"):
    import osrjit
    results = []
    errors = []
    stop = threading.Event()
    with osrjit.Runtime(transfer=transfer, walker=walker) as rt:
        rt.compile(PAUSE + WORK.format(k=1))
        work = rt.function("work")

        def worker(d):
            try:
                while not stop.is_set():
                    results.append((d, work(d)))
            except BaseException as e:  # noqa: BLE001
                errors.append(repr(e))

        threading.stack_size(64 << 20)
        rng = random.Random(seed)
        depths = [rng.randint(depth, 10 * depth) for _ in range(n_threads)]
        ts = [threading.Thread(target=worker, args=(d,), name=f"worker-{i}")
              for i, d in enumerate(depths)]
        for t in ts:
            t.start()
        # Every thread has entered JIT code (attached on its first call), not
        # a sleep: the replacements must find their frames.
        deadline = time.monotonic() + 120
        while rt.stats()["attached_threads"] < n_threads and time.monotonic() < deadline:
            time.sleep(0.001)
        for i in range(replacements):
            rt.replace("work", WORK.format(k=2 if i % 2 == 0 else 1))
        stop.set()
        for t in ts:
            t.join()
        stats = rt.stats()
    return results, errors, stats, depths
