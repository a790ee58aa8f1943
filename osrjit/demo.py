"""The README demo: a backtrace taken inside a deep JIT recursion.

A reference-language function recurses 50 deep; at the bottom it calls
``hook()``, which calls back into Python, and Python takes a native backtrace
with :func:`unwinder.backtrace`. Every frame is named: JIT frames by function
and version, the rest by module and symbol (libffi, libpython, libc, ...).
The same stack is then compared with glibc's ``backtrace()``.
"""
import ctypes
import os

import unwinder

SOURCE = '''
def down(n):
    if n == 0:
        return hook(n)
    return down(n - 1) + 1
'''

DEPTH = 50


def _glibc_backtrace(limit=1024):
    buf = (ctypes.c_void_p * limit)()
    n = ctypes.CDLL("libc.so.6").backtrace(buf, limit)
    return [buf[i] or 0 for i in range(n)]


def describe(frame, rt=None):
    """One line for a frame: address, function, where it lives."""
    version = rt.version_at(frame.pc) if rt is not None else None
    if version is not None:
        where = f"JIT {version.name} v{version.id}"
    else:
        where = os.path.basename(frame.module) if frame.module else "?"
    extra = f"  [{frame.fallback}]" if frame.fallback else ""
    return f"{frame.pc:#014x}  {frame.symbol or '??':<28} {where}{extra}"


def print_stack(frames, rt=None, out=print):
    """Print frames innermost first, collapsing runs of the same JIT function."""
    i = 0
    while i < len(frames):
        j = i
        line = describe(frames[i], rt)
        while j + 1 < len(frames) and describe(frames[j + 1], rt).split()[1:] == line.split()[1:] \
                and rt is not None and rt.version_at(frames[j + 1].pc) is not None:
            j += 1
        out(f"  #{i:<3} {line}" + (f"   (x{j - i + 1} frames, #{i}..#{j})" if j > i else ""))
        i = j + 1
    last = frames[-1]
    out(f"  walk ended: {last.end_reason}")


def main(out=print):
    from .runtime import Runtime
    with Runtime() as rt:
        rt.compile(SOURCE)
        seen = {}

        def on_hook(value):
            seen["glibc"] = _glibc_backtrace()
            seen["frames"] = unwinder.backtrace()
            return value

        rt.on_hook(on_hook)
        result = rt.function("down")(DEPTH)
        out(f"osrjit demo: down({DEPTH}) = {result}, compiled by LLJIT "
            f"(version v{rt.versions('down')[-1].id}, code at "
            f"{rt.versions('down')[-1].code_range[0]:#x})")
        out(f"native backtrace taken inside hook() at the bottom of the recursion "
            f"({len(seen['frames'])} frames, innermost first):")
        print_stack(seen["frames"], rt, out)
        ours = [f.pc for f in seen["frames"]]
        glibc = seen["glibc"]
        jit = [i for i, pc in enumerate(ours) if rt.version_at(pc) is not None]
        gj = [i for i, pc in enumerate(glibc) if rt.version_at(pc) is not None]
        same = ours[jit[0]:jit[0] + len(glibc) - gj[0]] == glibc[gj[0]:]
        out(f"glibc backtrace() agrees from the first JIT frame to its last frame: {same} "
            f"({len(glibc) - gj[0]} frames compared)")
        return 0 if same and result == DEPTH else 1
