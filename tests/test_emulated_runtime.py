"""The emulated backend: Runtime(backend="emulated"), its invariants and the sweep harness.

The machine is deterministic, so every scenario here replays exactly; the
full sweeps (every instruction boundary, >= 2,000 points per scenario) are in
``scripts/sweep.py`` and under ``-m slow``; CI runs a seeded sample.
"""
import pytest

from deopt.errors import IncompatibleVersion
from osrjit import Runtime
from osrjit.emulated import EmulatedRuntime
from osrjit.emulated.cfi_validator import CFIValidator
from osrjit.emulated.machine import ThreadState
from osrjit.testing import sample_points, sweep
from osrjit.testing.scenarios import POLL_FREE_V1, SCENARIOS, SUM_V1, SUM_V2

CI_SAMPLE = 40


def sum_ref(n):
    return n * (n + 1) // 2


def spin_ref(m):
    x = 1
    for i in range(m):
        x = (x * 7 + i) % 1009
    return x


def started(source, name, *args, k, **kwargs):
    """A runtime running ``name(*args)`` in one thread, stopped after ``k`` instructions."""
    rt = Runtime(backend="emulated", **kwargs)
    rt.compile(source)
    thread = rt.spawn(name, *args)
    rt.run(k)
    return rt, thread


def test_runtime_backend_emulated_is_an_emulated_runtime():
    rt = Runtime(backend="emulated")
    assert isinstance(rt, EmulatedRuntime) and rt.backend == "emulated"
    rt.compile(SUM_V1)
    assert rt.function("sum")(20) == sum_ref(20)
    with pytest.raises(ValueError, match="unknown backend"):
        Runtime(backend="gpu")
    with pytest.raises(ValueError, match="calls='slot' only"):
        Runtime(backend="emulated", calls="direct")
    with pytest.raises(ValueError, match="transfer='reference' only"):
        Runtime(backend="emulated", transfer="fast")
    with pytest.raises(ValueError, match="transfer='reference' only"):
        Runtime(backend="emulated", transfer="native")
    rt = Runtime(backend="emulated", walker="python")
    assert isinstance(rt, EmulatedRuntime) and (rt.transfer, rt.walker) == ("reference",) * 2


def test_replace_mid_recursion_transfers_every_frame_and_frees_v1():
    rt, thread = started(SUM_V1, "sum", 50, k=430)
    v1 = rt.current("sum")
    (v2,) = rt.replace("sum", SUM_V2)
    pause = rt.last_pause
    assert rt.current("sum") is v2
    # The thread ran on to its next poll and parked inside the slow path:
    # every frame of v1, the innermost included, waits at a site, hijacked.
    frames = rt.machine.walk(thread)
    assert frames[0].symbol == "hypercall.osrjit_safepoint_slow"
    v1_frames = [f for f in frames if v1.contains(f.lookup_pc)]
    depth = len(v1_frames)
    assert depth > 30 and all(f.translated for f in v1_frames)
    assert pause.frames_hijacked == depth and pause.stopped_async == 0
    assert rt.stats()["pending_returns"] == depth
    rt.run()
    assert thread.result == sum_ref(50)
    stats = rt.stats()
    assert stats["transfers"] == stats["hijacks"] == depth
    assert stats["pending_returns"] == 0 and stats["transfer_failures"] == 0
    assert stats["freed_versions"] == 1 and stats["live_versions"] == {"sum": 1}
    assert stats["old_code_fetches"] == 0 and rt.stub_frames() == []
    assert v1 not in rt.versions("sum")


def test_an_incompatible_version_leaves_every_stack_untouched():
    rt, thread = started(SUM_V1, "sum", 30, k=300)
    needs_more = """
def sum(n):
    if n == 0:
        return 0
    m = n * 2
    r = sum(n - 1)
    return r + m - n
"""
    with pytest.raises(IncompatibleVersion):
        rt.replace("sum", needs_more)
    # The same run with a stop-the-world that replaces nothing: the stopping
    # world moves the thread to its next poll in both, and then not one
    # byte of the stack nor a register may differ.
    ref, ref_thread = started(SUM_V1, "sum", 30, k=300)
    ref.collect()

    def picture(r, t):
        top = t.stack.end
        return t.regs(), r.machine.read(t.sp, top - t.sp)

    assert picture(rt, thread) == picture(ref, ref_thread)
    assert len(rt.versions("sum")) == 1 and rt.stats()["hijacks"] == 0
    rt.run()
    assert thread.result == sum_ref(30)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_sweep_sample(name):
    scenario = SCENARIOS[name]
    report = scenario.sweep(points=CI_SAMPLE, seed=1)
    assert report.points_tried == CI_SAMPLE, report
    assert report.ok, report
    assert report.points_passed == CI_SAMPLE and report.old_code_fetches == 0
    assert report.run_instructions >= 2000, "a full sweep must try >= 2,000 points"
    assert report.transfers > 0 and report.transfers == report.frames_hijacked
    if scenario.poll_free:
        assert report.stopped_async > 0, "the sample never used the emulated signal"


def test_sweep_replays_a_point_exactly():
    a = sweep([SUM_V1, SUM_V2], "sum", (40,), points=[333], threads=2, seed=5)
    b = sweep([SUM_V1, SUM_V2], "sum", (40,), points=[333], threads=2, seed=5)
    assert a.ok and b.ok
    assert (a.transfers, a.frames_hijacked, a.run_instructions) == \
        (b.transfers, b.frames_hijacked, b.run_instructions)


def test_sweep_reports_a_wrong_result_with_its_point():
    report = sweep([SUM_V1, SUM_V2], "sum", (20,), points=[5, 50],
                   expect=lambda k: sum_ref(20) + (k == 50))
    assert report.points_tried == 2 and report.points_passed == 1
    (failure,) = report.failures
    assert failure.k == 50 and "expected" in failure.reason
    assert not report.ok


def test_a_thread_left_running_old_code_is_reported_and_keeps_its_version():
    # The poll-free loop itself is replaced while a thread spins in it; with
    # no roll-forward the thread stays in v1's loop (as a native thread
    # stopped by the signal would): every instruction it fetches there after
    # replace() is an old-code fetch, and v1 stays loaded until it is done —
    # then it is freed without collect().
    spin_v2 = """
def spin(m):
    i = 0
    x = 1
    while m > i:
        x = (7 * x + i) % 1009
        i += 1
    return x
"""
    rt = Runtime(backend="emulated", grace=10, roll_limit=0)
    rt.compile(POLL_FREE_V1.split("def work")[0], polls=False)
    rt.compile("def work(n):\n    if n == 0:\n        return spin(300)\n"
               "    return 1 + work(n - 1)\n")
    thread = rt.spawn("work", 3)
    rt.run(400)
    assert rt.version_at(thread.pc) is rt.current("spin")
    old = rt.current("spin")
    rt.replace("spin", spin_v2, polls=False)
    assert rt.last_pause.stopped_async == 1
    assert old.executing and old in rt.versions("spin")
    rt.run(1000)
    assert old.loaded and old.executing                 # still spinning in it
    rt.run()
    assert thread.result == 3 + spin_ref(300)
    assert not old.loaded and old not in rt.versions("spin")
    fetches = rt.stats()["old_code_fetches"]
    assert fetches > 100
    first = rt.old_code_fetches[0]
    assert first.thread == thread.id and old.contains(first.pc) and not first.freed
    assert rt.collect() == 0


def test_a_fetch_from_freed_code_is_an_old_code_fetch():
    rt, thread = started(SUM_V1, "sum", 10, k=100)
    v1 = rt.current("sum")
    rt.replace("sum", SUM_V2)
    rt.run()
    assert rt.stats()["freed_versions"] == 1
    stale = rt.machine.spawn(v1.entry, (3,))        # a stale pointer into v1
    rt.run()
    assert stale.state is ThreadState.FAULTED
    stats = rt.stats()
    assert stats["old_code_fetches"] == 1 and stats["faulted_threads"] == 1
    assert rt.old_code_fetches[0].freed and rt.old_code_fetches[0].pc == v1.entry


def test_replace_from_a_service_is_refused():
    rt = Runtime(backend="emulated")
    rt.compile("def f(x):\n    return hook(x) + 1\n")
    errors = []

    def hook(x):
        try:
            rt.replace("f", "def f(x):\n    return hook(x) + 2\n")
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        return x

    rt.on_hook(hook)
    assert rt.function("f")(4) == 5
    assert "from a service" in str(errors[0])


def test_sweep_rejects_the_native_backend():
    with pytest.raises(ValueError, match="emulated"):
        sweep([SUM_V1], "sum", (3,), backend="native")


def test_sample_points_are_seeded_and_include_both_ends():
    a = sample_points(1000, 10, seed=3)
    assert a == sample_points(1000, 10, seed=3) and len(a) == 10
    assert a[0] == 0 and a[-1] == 999 and a == sorted(set(a))
    assert sample_points(5, 10) == [0, 1, 2, 3, 4]


def test_plugin_fixture_runs_a_sweep(osrjit_sweep):
    report = osrjit_sweep([SUM_V1, SUM_V2], "sum", (25,), points=6)
    assert report.ok and report.points_tried == 6


@pytest.mark.parametrize("k", [150, 420, 777])
def test_cfi_validator_through_the_deopt_stub_and_resume_entries(k):
    """Every instruction of two threads — versions, the deopt stub, the
    transfer hypercall, resume entries — unwinds exactly as the CPU nests."""
    rt = Runtime(backend="emulated", seed=k)
    rt.compile(SUM_V1)
    threads = [rt.spawn("sum", 12), rt.spawn("sum", 9)]
    validator = CFIValidator(rt.machine, return_entries={rt.stub_address})
    try:
        rt.run(k // 3)
        (v2,) = rt.replace("sum", SUM_V2)
        validator.cover([v2.code_range])
        rt.run()
    finally:
        validator.close()
    report = validator.report
    assert report.ok, report.summary()
    assert [t.result for t in threads] == [sum_ref(12), sum_ref(9)]
    assert rt.stats()["transfers"] > 0
    assert "osrjit_deopt_stub" in report.by_symbol
    # Hijacked slots held per-site stubs, whose rows are v1's at the site.
    assert any(s.startswith("osrjit.site.sum@v1.") for s in report.by_symbol)
    assert "hypercall.osrjit_deopt_transfer" in report.by_symbol
    assert any(s.endswith("__resume") for s in report.by_symbol)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_full_sweep(name):
    """Every instruction boundary (also ``python scripts/sweep.py``)."""
    report = SCENARIOS[name].sweep()
    assert report.points_tried == report.run_instructions >= 2000
    assert report.ok, report.summary()
