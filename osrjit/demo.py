"""The README demo: replace a function while 50 frames of it are on the stack.

``depth(n)`` recurses 50 deep and calls ``hook()`` at the bottom. Inside the
hook — with every frame of version 1 still live — Python replaces ``depth``
with a version that counts differently, and shows the native stack before and
after: JIT frames named by function and version, hijacked frames marked (their
return-address slot now holds the deopt stub; the walk shows the original
return address), everything else by module and symbol. When the hook returns,
each pending frame returns into the stub, is rebuilt as a frame of version 2
and finishes there; then version 1 is freed. The stack walks are checked
against glibc's ``backtrace()``.
"""
import ctypes
import os

import unwinder

V1 = '''
def depth(n):
    if n == 0:
        return hook(0)
    return depth(n - 1) + 1
'''

V2 = '''
def depth(n):
    if n == 0:
        return hook(0)
    return depth(n - 1) + 1000
'''

DEPTH = 50


def _glibc_backtrace(limit=1024):
    buf = (ctypes.c_void_p * limit)()
    n = ctypes.CDLL("libc.so.6").backtrace(buf, limit)
    return [buf[i] or 0 for i in range(n)]


def describe(frame, rt=None):
    """``(function, where, marker)`` for a frame."""
    version = rt.version_at(frame.pc - 1) if rt is not None and frame.index else (
        rt.version_at(frame.pc) if rt is not None else None)
    if version is not None:
        resume = " (resume entry)" if frame.symbol and frame.symbol.endswith("__resume") else ""
        return version.name + resume, f"JIT v{version.id}", "HIJACKED" if frame.translated else ""
    where = os.path.basename(frame.module) if frame.module else "?"
    return frame.symbol or "??", where, "[frame pointers]" if frame.fallback else ""


def stack_lines(frames, rt=None):
    """Frames innermost first as text; runs of identical JIT frames fold into one line.

    Call it while the versions the frames name are loaded.
    """
    keys = [describe(f, rt) for f in frames]
    lines = []
    i = 0
    while i < len(frames):
        key = keys[i]
        j = i
        while j + 1 < len(frames) and key[1].startswith("JIT") and keys[j + 1] == key:
            j += 1
        run = f"  x{j - i + 1} (#{i}..#{j})" if j > i else ""
        lines.append(f"  #{i:<3} {frames[i].pc:#014x}  {key[0]:<30} {key[1]:<24} {key[2]}{run}")
        i = j + 1
    lines.append(f"  walk ended: {frames[-1].end_reason}")
    return lines


def print_stack(lines, out=print):
    """Print the JIT part of ``stack_lines`` output with its neighbours; elide the rest."""
    lines, last = lines[:-1], lines[-1]
    # Keep the JIT part and its neighbours; elide the deep interpreter frames.
    jit = [k for k, line in enumerate(lines) if "JIT" in line]
    keep = set(range(0, 2)) | set(range(len(lines) - 2, len(lines)))
    for k in jit:
        keep |= {k - 1, k, k + 1}
    for k, line in enumerate(lines):
        if k in keep:
            out(line)
        elif k - 1 in keep:
            out("  ...")
    out(last)


def main(out=print):
    from .runtime import Runtime
    with Runtime() as rt:
        rt.compile(V1)
        v1 = rt.current("depth")
        seen = {}

        def on_hook(value):
            seen["glibc_before"] = _glibc_backtrace()
            seen["before"] = unwinder.backtrace()
            seen["before_lines"] = stack_lines(seen["before"], rt)
            rt.replace("depth", V2)
            seen["after_lines"] = stack_lines(unwinder.backtrace(), rt)
            seen["stats_during"] = rt.stats()
            return value

        rt.on_hook(on_hook)
        out(f"osrjit demo: depth({DEPTH}) with version 1 (adds 1 per level) compiled by LLJIT at "
            f"{v1.code_range[0]:#x}; inside hook() at the bottom we replace it with version 2 "
            f"(adds 1000 per level).\n")
        result = rt.function("depth")(DEPTH)
        v2 = rt.current("depth")

        out(f"Native stack inside hook(), before replace() ({len(seen['before'])} frames):")
        print_stack(seen["before_lines"], out)
        ours = [f.pc for f in seen["before"]]
        glibc = seen["glibc_before"]
        first = next(i for i, pc in enumerate(glibc) if v1.contains(pc - 1))
        mine = next(i for i, pc in enumerate(ours) if v1.contains(pc - 1))
        agree = ours[mine:mine + len(glibc) - first] == glibc[first:]
        out(f"  (glibc backtrace() agrees from the first JIT frame to its last frame: {agree})\n")

        out("Same stack after replace(): every version-1 frame is now a pending return "
            "into the deopt stub:")
        print_stack(seen["after_lines"], out)
        s = seen["stats_during"]
        out(f"  stats: {s['pending_returns']} pending returns, live versions "
            f"{s['live_versions']}\n")

        expected = DEPTH * 1000
        out(f"Result: depth({DEPTH}) = {result} (every pending frame finished in version 2: "
            f"expected {expected})")
        stats = rt.stats()
        out(f"rt.stats() = {stats}")
        out(f"version 1 loaded: {v1.loaded}; version 2 (v{v2.id}) current at {v2.code_range[0]:#x}")
        ok = (agree and result == expected and stats["pending_returns"] == 0
              and stats["freed_versions"] == 1 and not v1.loaded)
    out("")
    return 0 if ok and threads_part(out) else 1


SPIN = """
def spin(k):
    i = 0
    while i < k:
        i = i + 1
    return 0
"""
SPIN_DONE = """
def spin(k):
    i = 0
    while i < k:
        i = k
    return 0
"""
WALK = """
def walk(n, k):
    if n == 0:
        return spin(k) + hook(n)
    return walk(n - 1, k) + {step}
"""
#: Iterations of the old loop: it outlasts the replacements by far, yet a
#: thread the signal stopped between two polls (under load) still finishes
#: it in seconds. The loop counts in ``spin``'s own frame, so only a stop
#: that parks the thread at a poll can move it into the new loop.
SPIN_ITERATIONS = 1 << 32


def threads_part(out=print):
    """Part 2: three threads deep in `walk` are stopped, replaced and released at once."""
    import threading
    from .runtime import Runtime
    with Runtime() as rt:
        rt.compile(SPIN + WALK.format(step=1))
        rt.on_hook(lambda x: 0)
        walk = rt.function("walk")
        results = {}
        depths = {"worker-1": 200, "worker-2": 400, "worker-3": 600}
        entered = threading.Barrier(len(depths) + 1)

        def work(name, depth):
            entered.wait()
            results[name] = walk(depth, SPIN_ITERATIONS)

        threads = [threading.Thread(target=work, args=(n, d), name=n) for n, d in depths.items()]
        for t in threads:
            t.start()
        entered.wait()
        # Each thread is on its way down or already spinning at the bottom;
        # replace() stops it wherever it is (a poll, or the signal).
        out("Part 2: three threads run walk(n) down to 200, 400 and 600 frames and spin at the "
            "bottom (safepoint polls on every loop back-edge and function entry). The main "
            "thread replaces walk (+1 per level -> +10 per level), then spin (to end the loops):")
        rt.replace("walk", WALK.format(step=10))
        p = rt.last_pause
        s = rt.stats()
        out(f"  replace(walk): stopped {p.threads - 1} threads in "
            f"{p.time_to_safepoint_seconds * 1e3:.1f} ms, hijacked {p.frames_hijacked} frames, "
            f"released after {p.pause_seconds * 1e3:.1f} ms; {s['pending_returns']} pending returns")
        rt.replace("spin", SPIN_DONE)
        p = rt.last_pause
        out(f"  replace(spin): a thread parked at a poll of the old loop moves into the new one "
            f"({p.frames_hijacked} frames hijacked; {p.stopped_async} threads stopped by the "
            f"signal between polls finish their old loop first)")
        for t in threads:
            t.join()
        for n, d in depths.items():
            out(f"  {n}: walk({d}) = {results[n]} (expected {10 * d}: every frame finished in v2)")
        s = rt.stats()
        out(f"  rt.stats() = {s}")
        return (all(results[n] == 10 * d for n, d in depths.items()) and s["pending_returns"] == 0
                and s["freed_versions"] == 2)
