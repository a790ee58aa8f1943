"""Scenario: a deep JIT recursion calls back into Python; our backtrace agrees with glibc's.

glibc's ``backtrace()`` (libgcc's unwinder, which sees JIT code through the
``.eh_frame`` LLJIT registers) is the oracle: from the first JIT frame down to
the last frame glibc reports, both must list the same return addresses —
through the JIT frames, libffi, libpython and libc to ``_start`` (main thread)
or ``clone3`` (another thread). Each scenario runs in a child process.
"""
import ctypes
import threading


from childproc import run_child
from scenarios_ir import RECURSION_IR

DEPTH = 60


def _glibc_backtrace(limit=4096):
    libc = ctypes.CDLL("libc.so.6")
    buf = (ctypes.c_void_p * limit)()
    n = libc.backtrace(buf, limit)
    return [buf[i] or 0 for i in range(n)]


def recursion_scenario(depth, in_thread):
    import unwinder
    from jitutil import load_ir
    space = unwinder.AddressSpace.current_process()
    loaded = load_ir(RECURSION_IR, ["rec"], space=space, name="jit:rec")
    seen = {}

    @ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
    def callback(_):
        seen["glibc"] = _glibc_backtrace()
        frames = unwinder.backtrace()
        seen["ours"] = [f.pc for f in frames]
        seen["frames"] = [(f.pc, f.cfa, f.module, f.symbol, f.fallback, f.end_reason)
                          for f in frames]
        return 0

    rec = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(loaded.addresses["rec"])

    def run():
        seen["result"] = rec(depth, ctypes.cast(callback, ctypes.c_void_p))

    if in_thread:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    else:
        run()
    seen["text_range"] = loaded.text_range
    return seen


def _check(seen, depth):
    lo, hi = seen["text_range"]
    assert seen["result"] == depth + 1
    ours, glibc = seen["ours"], seen["glibc"]
    first_ours = next(i for i, pc in enumerate(ours) if lo <= pc < hi)
    first_glibc = next(i for i, pc in enumerate(glibc) if lo <= pc < hi)
    g = glibc[first_glibc:]
    o = ours[first_ours:]
    assert sum(lo <= pc < hi for pc in o) == depth + 1  # every JIT level
    assert o[:len(g)] == g, "\n".join(
        f"{i}: ours={a:#x} glibc={b:#x}" for i, (a, b) in enumerate(zip(o, g)) if a != b)
    # We go at least as far as glibc and end for a stated reason.
    frames = seen["frames"]
    assert frames[-1][5] is not None
    assert all(f[5] is None for f in frames[:-1])
    jit = [f for f in frames if lo <= f[0] < hi]
    assert all(f[2] == "jit:rec" and f[3] == "rec" and f[4] is None for f in jit)
    return frames


def test_backtrace_matches_glibc_through_jit_frames():
    frames = _check(run_child(recursion_scenario, DEPTH, False), DEPTH)
    names = [f[3] for f in frames]
    assert names[-1] == "_start" and "Py_BytesMain" in names, names[-6:]
    assert frames[-1][5] == "end of stack: return address undefined"
    assert any(f[2] and "libpython" in f[2] for f in frames)
    assert any(f[2] and "libffi" in f[2] for f in frames)


def test_backtrace_matches_glibc_from_a_second_thread():
    frames = _check(run_child(recursion_scenario, DEPTH, True), DEPTH)
    # libc is stripped of start_thread/clone3's names; what identifies the
    # thread's outermost frames is that they lie in libc, end at clone3's
    # `.cfi_undefined rip`, and that no frame is the program's main/_start.
    assert frames[-1][5] == "end of stack: return address undefined"
    assert all("libc.so" in (f[2] or "") for f in frames[-2:]), frames[-3:]
    assert frames[-3][3] == "pythread_wrapper"
    assert not any(f[3] in ("_start", "main", "Py_BytesMain") for f in frames)
