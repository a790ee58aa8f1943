"""What a sweep says when a point fails, and what the pytest plugin shows.

A deliberately wrong expectation makes points fail; the failure must name the
function, the versions, the site the replacement found the thread at with its
source line, and a call that replays exactly that point. The plugin is run
the way a user runs it: pytest in a child process (on a pseudo-terminal for
the progress line), with this checkout's ``osrjit`` first on the path.
"""
import os
import pty
import re
import subprocess
import sys

import osrjit.testing
from osrjit.testing import SweepFailure, sweep
from osrjit.testing.report import FunctionReplaced
from osrjit.testing.scenarios import SUM_V1, SUM_V2

from childproc import ROOT_DIR

SUM_20 = 210          # sum(20)


def wrong_expectation(k):
    """The result of sum(20), but off by one at point 133."""
    return SUM_20 + (k == 133)


def test_a_failing_point_names_function_versions_site_line_and_replay_call():
    report = sweep([SUM_V1, SUM_V2], "sum", (20,), points=[5, 133], expect=wrong_expectation)
    assert report.points_passed == 1 and not report.ok
    (failure,) = report.failures
    assert failure.k == 133 and failure.reason == f"results ({SUM_20},) != expected ({SUM_20 + 1},)"
    (seen,) = failure.where
    assert seen.number == 1 and seen.requested_at == 133 and seen.stopped_at >= 133
    assert seen.functions == (FunctionReplaced("sum", old_source=0, new_source=1, old_version=1,
                                               new_version=2),)
    # The one thread is stopped at a safepoint poll of sum v1, many frames deep.
    (thread,) = seen.threads
    assert thread.version == "sum#1" and thread.old_frames > 1 and thread.hijacked
    rt = osrjit.Runtime(backend="emulated")
    try:
        rt.compile(SUM_V1)
        site = rt.current("sum").sites[thread.site_id]
    finally:
        rt.close()
    assert thread.site == site.kind.value == "poll"
    assert thread.line == f"line {site.line} of versions[0]: " + \
        SUM_V1.splitlines()[site.line - 1].strip()
    assert str(seen).splitlines() == [
        "replacement 1: sum versions[0] -> versions[1] (#1 -> #2); requested after 133 "
        f"instructions, world stopped after {seen.stopped_at}; {seen.frames_hijacked} frames "
        "hijacked, 0 threads stopped outside a poll",
        f"  thread 1: innermost of its {thread.old_frames} old frames: sum#1 at site "
        f"{thread.site_id} (poll), hijacked, {thread.line}"]
    assert failure.replay == (
        f"osrjit.testing.sweep([{SUM_V1!r}, {SUM_V2!r}], 'sum', (20,), "
        "expect=__import__('test_sweep_reports', fromlist=['_']).wrong_expectation, "
        "points=[133])")
    assert str(failure).splitlines() == (
        [f"k=133: {failure.reason}"] + [f"    {line}" for line in seen.lines()]
        + [f"    replay: {failure.replay}"])
    assert str(failure) in report.summary()


def test_the_replay_call_runs_just_that_point_and_fails_the_same_way():
    (failure,) = sweep([SUM_V1, SUM_V2], "sum", (20,), points=[133], threads=2, seed=4,
                       expect=wrong_expectation).failures
    assert "threads=2, seed=4, points=[133]" in failure.replay
    replayed = eval(failure.replay, {"osrjit": osrjit})
    assert replayed.points_tried == 1
    assert [(f.k, f.reason, f.where) for f in replayed.failures] == \
        [(failure.k, failure.reason, failure.where)]
    (seen,) = failure.where
    assert [t.thread for t in seen.threads] == [1, 2]


def test_only_the_first_failures_are_run_again_to_describe_them():
    limit = osrjit.testing.DESCRIBED_FAILURES
    report = sweep([SUM_V1, SUM_V2], "sum", (3,), points=limit + 2, expect=lambda k: -1)
    assert len(report.failures) == report.points_tried == limit + 2
    assert [bool(f.where) for f in report.failures] == [True] * limit + [False] * 2
    assert all(f.replay.endswith(f"points=[{f.k}])") for f in report.failures)
    assert "expect=<lambda at " in report.failures[0].replay
    assert repr(report).startswith(f"<SweepReport 0/{report.points_tried} points passed")


def test_a_failure_without_details_prints_as_before():
    assert str(SweepFailure(7, "results (1,) != expected (2,)")) == \
        "k=7: results (1,) != expected (2,)"


USER_TEST = '''
from osrjit.testing.scenarios import SUM_V1, SUM_V2

def test_my_replacement(osrjit_sweep):
    assert osrjit_sweep([SUM_V1, SUM_V2], "sum", (20,), points=[5, 133]).ok

def test_my_wrong_expectation(osrjit_sweep):
    report = osrjit_sweep([SUM_V1, SUM_V2], "sum", (20,), points=[5, 133],
                          expect=lambda k: 210 + (k == 133))
    assert report.ok
'''


def _user_pytest(tmp_path, *options, stdout=subprocess.PIPE):
    (tmp_path / "test_user.py").write_text(USER_TEST)
    env = dict(os.environ, PYTHONPATH=ROOT_DIR, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *options],
                          cwd=tmp_path, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                          timeout=300)


def test_the_plugin_reports_the_failing_points_of_a_failed_test(tmp_path):
    p = _user_pytest(tmp_path, "-q")
    out = p.stdout.decode()
    assert p.returncode == 1, out
    assert "1 failed, 1 passed" in out
    section = out[out.index("osrjit sweep failures"):]
    assert "1/2 points passed, 1 failures" in section
    assert "k=133: results (210,) != expected (211,)" in section
    assert "replacement 1: sum versions[0] -> versions[1] (#1 -> #2)" in section
    assert re.search(r"thread 1: innermost of its \d+ old frames: sum#1 at site \d+ \(poll\), "
                     r"hijacked, line 2 of versions\[0\]: def sum\(n\):", section)
    assert (f"replay: osrjit.testing.sweep([{SUM_V1!r}, {SUM_V2!r}], 'sum', (20,), "
            "expect=<lambda at ") in section
    assert "points/s" not in out, "no progress lines in a log"
    assert "SweepReport(" not in out and "<SweepReport 1/2 points passed" in out


def test_the_plugin_prints_one_outcome_line_per_sweep_with_v_in_a_log(tmp_path):
    out = _user_pytest(tmp_path, "-v").stdout.decode()
    assert "\r" not in out
    assert re.search(r"osrjit sweep sum\(20,\): 2/2 points passed, [\d.]+ points/s, "
                     r"0 old-code fetches: ok", out), out
    assert re.search(r"osrjit sweep sum\(20,\): 1/2 points passed, [\d.]+ points/s, "
                     r"0 old-code fetches: 1 FAILED", out), out


def test_the_plugin_shows_a_progress_line_on_a_terminal(tmp_path):
    (tmp_path / "test_user.py").write_text(USER_TEST)
    leader, follower = pty.openpty()
    chunks = []
    try:
        p = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                              "-k", "test_my_replacement"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                             stdout=follower, stderr=follower,
                             env=dict(os.environ, PYTHONPATH=ROOT_DIR, COLUMNS="200"))
        os.close(follower)
        follower = None
        while True:                     # read as it comes: a full pty would block the child
            try:
                chunk = os.read(leader, 65536)
            except OSError:             # EIO: every writer closed its side and all was read
                break
            if not chunk:
                break
            chunks.append(chunk)
        returncode = p.wait(timeout=300)
    finally:
        os.close(leader)
        if follower is not None:
            os.close(follower)
    out = b"".join(chunks).decode(errors="replace")
    assert returncode == 0, out
    assert re.search(r"\rosrjit sweep sum\(20,\): 2/2 points, [\d.]+ points/s", out), out
    assert re.search(r"\rosrjit sweep sum\(20,\): 2/2 points passed, [\d.]+ points/s, "
                     r"0 old-code fetches: ok", out), out


def test_a_site_of_hand_written_ir_is_named_by_its_statepoint_line():
    from osrjit.ir import I64, VersionedFunction
    from osrjit.testing.report import site_line

    def body(fb):
        b = fb.builder
        fb.poll(1, live=["n"])
        with b.if_then(b.icmp_signed("<", fb.load("n"), I64(1))):
            b.ret(I64(0))
        b.ret(b.add(fb.call_function(2, "down", [b.sub(fb.load("n"), I64(1))], live=["n"]),
                    I64(1)))

    rt = osrjit.Runtime(backend="emulated")
    try:
        rt.compile_ir(VersionedFunction("down", ["n"]).build(body))
        v = rt.current("down")
        where = site_line(v, 2, sources=[], source_index=None)
    finally:
        rt.close()
    match = re.fullmatch(r"IR line (\d+): (.*)", where)
    assert match, where
    line = v.ir.module_ir.splitlines()[int(match.group(1)) - 1]
    assert line.strip() == match.group(2)
    assert "llvm.experimental.gc.statepoint" in line and "(i64 2, " in line and "down" in line


def test_a_thread_stopped_between_sites_is_described_by_its_offset():
    # With no roll-forward a thread spinning in the poll-free loop being
    # replaced stays there, stopped by the emulated signal at no site.
    from osrjit.testing.report import describe_replacement
    from osrjit.testing.scenarios import POLL_FREE_V1
    spin = POLL_FREE_V1.split("def work")[0]
    rt = osrjit.Runtime(backend="emulated", grace=10, roll_limit=0)
    try:
        rt.compile(spin, polls=False)
        rt.compile("def work(n):\n    if n == 0:\n        return spin(300)\n"
                   "    return 1 + work(n - 1)\n")
        thread = rt.spawn("work", 3)
        rt.run(400)
        old = rt.current("spin")
        assert rt.version_at(thread.pc) is old
        requested_at = rt.instructions
        new = rt.replace("spin", spin, polls=False)
        seen = describe_replacement(rt, [thread], ["spin"], {"spin": old}, new, number=1,
                                    requested_at=requested_at, sources=[spin, spin],
                                    source_of={old.id: 0, new[0].id: 1})
    finally:
        rt.close()
    assert rt.last_pause.stopped_async == 1 == seen.stopped_async
    (t,) = seen.threads
    assert (t.version, t.old_frames, t.site_id, t.site) == (f"spin#{old.id}", 1, None, None)
    assert 0 <= t.text_offset < old.code_range[1] - old.code_range[0]
    assert str(t) == (f"thread {thread.id}: innermost of its 1 old frames: spin#{old.id} at "
                      f".text+{t.text_offset:#x}, at no site (stopped by the signal)")
