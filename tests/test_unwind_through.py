"""Scenarios: libgcc, gdb-style walkers and ours unwind *through* hijacked frames.

After a replacement, every frame of the old version at a site holds a per-site
stub (:mod:`deopt.sitestubs`) in its return-address slot. The stub's CFI is
the old frame's row, so glibc ``backtrace()`` (libgcc) walks on to the old
frames' callers with no help from osrjit, and returns as many frames as before
the replacement. Our walkers agree with it frame for frame: the Python walker
and the native walker without the runtime's translation see the stubs libgcc
sees; with it, the original return addresses the stubs stand for.
"""
import ctypes
import os
import re
import shutil
import subprocess
import sys

import pytest

from childproc import ROOT_DIR, TESTS_DIR, run_child
from scenarios_native import SUM_V1, SUM_V2

DEPTH = 20


def _glibc_backtrace(limit=4096):
    buf = (ctypes.c_void_p * limit)()
    n = ctypes.CDLL("libc.so.6").backtrace(buf, limit)
    return [buf[i] or 0 for i in range(n)]


def _from_jit(pcs, is_jit):
    """The frames from the innermost JIT frame outward."""
    i = next(i for i, pc in enumerate(pcs) if is_jit(pc))
    return pcs[i:]


def unwind_through_scenario(transfer, walker):
    import osrjit
    import unwinder
    out = {}
    with osrjit.Runtime(transfer=transfer, walker=walker) as rt:
        rt.compile(SUM_V1)
        backend = rt.native_backend
        deopt = backend.deopt
        v1 = rt.current("sum")
        stubs = dict((stub, ra) for ra, stub in v1.stubs.pairs)

        def walks(tag):
            # glibc's backtrace() first, then ours from the same Python frame.
            out[f"glibc_{tag}"] = _glibc_backtrace()
            out[f"ours_{tag}"] = [f.pc for f in unwinder.backtrace()]
            space = backend.space
            space.remove_return_address_filter(deopt.table.translate)
            try:
                out[f"raw_{tag}"] = [f.pc for f in unwinder.backtrace()]
            finally:
                space.add_return_address_filter(deopt.table.translate)
            native = backend.scanner.walker()
            mirror = backend.scanner.translation_mirror()

            def native_walks(regs):
                return ([f.pc for f in native.walk(regs, innermost_is_caller=True)],
                        [f.pc for f in native.walk(regs, innermost_is_caller=True,
                                                   translation=mirror)])
            out[f"native_raw_{tag}"], out[f"native_{tag}"] = \
                unwinder.with_captured_registers(native_walks)

        def on_hook(_):
            walks("before")
            rt.replace("sum", SUM_V2)
            walks("after")
            out["pending"] = rt.stats()["pending_returns"]
            return 0

        rt.on_hook(on_hook)
        out["result"] = rt.function("sum")(DEPTH)
        out["stubs"] = stubs
        out["v1"] = v1.code_range
        out["symbols"] = sorted(s for s in v1.stubs.library.addresses)
        out["after_stats"] = rt.stats()
    return out


@pytest.mark.parametrize("transfer,walker", [("python", "python"), ("native", "native")])
def test_glibc_backtrace_after_a_replace_returns_every_frame(transfer, walker):
    out = run_child(unwind_through_scenario, transfer, walker)
    assert out["result"] == DEPTH * (DEPTH + 1)            # v2: 2n per level
    assert out["pending"] == DEPTH + 1                    # sum(20) .. sum(0) hijacked
    assert out["after_stats"]["pending_returns"] == 0
    stubs, (lo, hi) = out["stubs"], out["v1"]
    in_v1 = lambda pc: lo <= pc < hi
    is_jit = lambda pc: in_v1(pc) or pc in stubs
    site = lambda pc: stubs.get(pc, pc)

    before, after = out["glibc_before"], out["glibc_after"]
    assert len(after) == len(before)                      # not cut at the first hijacked frame
    g0, g1 = _from_jit(before, is_jit), _from_jit(after, is_jit)
    # sum(0) .. sum(20), each at a site (the hook's, the recursive call's),
    # show as their stubs.
    assert sum(pc in stubs for pc in g1) == DEPTH + 1
    assert [site(pc) for pc in g1] == g0
    assert all(s.startswith("osrjit.site.sum@v1.") for s in out["symbols"])

    # Our walkers agree with libgcc frame for frame: without the runtime's
    # translation they see the stubs, with it the return addresses they stand for.
    assert _from_jit(out["raw_after"], is_jit) == g1
    assert _from_jit(out["native_raw_after"], is_jit) == g1
    assert _from_jit(out["ours_after"], is_jit) == g0
    assert _from_jit(out["native_after"], is_jit) == g0
    for tag in ("ours", "raw", "native", "native_raw"):
        assert _from_jit(out[f"{tag}_before"], is_jit) == g0, tag


def gdb_target():
    """Run under gdb: a trap in the hook before and after the replace (gdb
    stops at each and does not pass it on)."""
    import signal

    import osrjit
    with osrjit.Runtime() as rt:
        rt.compile(SUM_V1)

        def on_hook(_):
            os.kill(os.getpid(), signal.SIGTRAP)
            rt.replace("sum", SUM_V2)
            os.kill(os.getpid(), signal.SIGTRAP)
            return 0

        rt.on_hook(on_hook)
        print("result", rt.function("sum")(DEPTH))


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_gdb_bt_walks_through_the_site_stubs():
    code = (f"import sys; sys.path[:0] = [{TESTS_DIR!r}, {ROOT_DIR!r}]; "
            "import test_unwind_through as t; t.gdb_target()")
    gdb = subprocess.run(
        ["gdb", "-q", "-batch", "-nx", "-ex", "set pagination off", "-ex", "run",
         "-ex", "bt", "-ex", "continue", "-ex", "bt", "-ex", "continue",
         "--args", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=300)
    out = gdb.stdout
    assert f"result {DEPTH * (DEPTH + 1)}" in out, out[-3000:]
    before, after = [re.findall(r"^#(\d+) +(?:0x[0-9a-f]+ in )?(\S+)", part, re.M)
                     # "Program received ..." or, once the runtime runs a thread of
                     # its own (osrjit-reclaim), 'Thread 1 "python" received ...'
                     for part in out.split("received signal SIGTRAP")[1:3]]
    assert len(after) == len(before) > 2 * DEPTH
    assert "Backtrace stopped" not in out
    names_before, names_after = [n for _, n in before], [n for _, n in after]
    # Where the old frames were, the stubs standing for them; elsewhere the same frames.
    rows = [i for i, n in enumerate(names_after) if n.startswith("osrjit.site.sum@v1.site")]
    assert len(rows) == DEPTH + 1
    assert len({names_before[i] for i in rows}) == 1 and names_before[rows[0]] != "??"
    assert ([n for i, n in enumerate(names_before) if i not in rows]
            == [n for i, n in enumerate(names_after) if i not in rows])
