"""Benchmark: per-frame cost of ``unwinder.backtrace()`` beside glibc ``backtrace()``.

Both walk the same stack in the same run: a JIT-compiled recursion (LLJIT,
``add_object_img``) of depth D calls back into Python, and inside that
callback each walker is timed over repeated walks; the figure is the median
over rounds, divided by the number of frames the walker reported. The cold
first walk (process start → first ``unwinder.backtrace()`` through libc and
libpython, including module discovery from ``/proc/self/maps``) is timed in
fresh child processes.

    python -m osrjit.bench.unwind [--depths 100,1000] [--rounds 7] [--json PATH]
"""
import argparse
import ctypes
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time

RECURSION_IR = r"""
define i64 @rec(i64 %n, ptr %cb) {
entry:
  %z = icmp eq i64 %n, 0
  br i1 %z, label %leaf, label %down
leaf:
  %r0 = call i64 %cb(i64 0)
  %s0 = add i64 %r0, 1
  ret i64 %s0
down:
  %m = sub i64 %n, 1
  %r1 = call i64 @rec(i64 %m, ptr %cb)
  %s1 = add i64 %r1, 1
  ret i64 %s1
}
"""

COLD_SNIPPET = r"""
import sys, time
sys.path.insert(0, {root!r})
import unwinder
t0 = time.perf_counter()
frames = unwinder.backtrace()
t1 = time.perf_counter()
syms = [f.symbol for f in frames]
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, len(frames))
"""


def load_recursion():
    import llvmlite.binding as llvm
    from elftools.elf.elffile import ELFFile
    import unwinder
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    tm = llvm.Target.from_default_triple().create_target_machine(reloc="pic", codemodel="small", opt=2)
    obj = tm.emit_object(llvm.parse_assembly(RECURSION_IR))
    jit = llvm.create_lljit_compiler(tm)
    tracker = llvm.JITLibraryBuilder().add_object_img(obj).export_symbol("rec").link(jit, "bench")
    elf = ELFFile(io.BytesIO(obj))
    st_value = elf.get_section_by_name(".symtab").get_symbol_by_name("rec")[0]["st_value"]
    text = tracker["rec"] - st_value
    unwinder.AddressSpace.current_process().add_code_object(obj, {".text": text}, name="jit:bench")
    return jit, tracker


def measure(loaded, depth, rounds, reps):
    import unwinder
    libc = ctypes.CDLL("libc.so.6")
    buf = (ctypes.c_void_p * (depth + 4096))()
    out = {}

    @ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
    def callback(_):
        ours, glibc = [], []
        n_ours = len(unwinder.backtrace())       # warm the row cache
        n_glibc = libc.backtrace(buf, len(buf))
        for _ in range(rounds):
            t = time.perf_counter_ns()
            for _ in range(reps):
                unwinder.backtrace()
            ours.append((time.perf_counter_ns() - t) / reps / n_ours)
            t = time.perf_counter_ns()
            for _ in range(reps):
                libc.backtrace(buf, len(buf))
            glibc.append((time.perf_counter_ns() - t) / reps / n_glibc)
        out.update(ours=statistics.median(ours), glibc=statistics.median(glibc),
                   frames_ours=n_ours, frames_glibc=n_glibc)
        return 0

    jit, tracker = loaded
    rec = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(tracker["rec"])
    # A deep recursion wants a big native stack: run on a thread that has one.
    threading.stack_size(256 << 20)
    t = threading.Thread(target=rec, args=(depth, ctypes.cast(callback, ctypes.c_void_p)))
    t.start()
    t.join()
    return out


def cold_walk(rounds):
    import unwinder
    root = os.path.dirname(os.path.dirname(os.path.abspath(unwinder.__file__)))  # the same one
    walks, syms, frames = [], [], 0
    for _ in range(rounds):
        p = subprocess.run([sys.executable, "-c", COLD_SNIPPET.format(root=root)],
                           capture_output=True, text=True, check=True)
        w, s, frames = p.stdout.split()
        walks.append(float(w))
        syms.append(float(s))
    return statistics.median(walks), statistics.median(syms), int(frames)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="100,1000")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = {"walk_ns_per_frame": {}, "cold_first_walk_s": None}
    print(f"{'depth':>7} {'frames':>7} {'unwinder ns/frame':>18} {'glibc ns/frame':>15} {'ratio':>7}")
    loaded = load_recursion()  # keep the JIT code (and its registration) for the whole run
    for depth in (int(d) for d in args.depths.split(",")):
        reps = max(1, 2000 // depth)
        r = measure(loaded, depth, args.rounds, reps)
        ratio = r["ours"] / r["glibc"]
        results["walk_ns_per_frame"][str(depth)] = {"python": r["ours"], "glibc": r["glibc"],
                                                    "frames": r["frames_ours"]}
        print(f"{depth:>7} {r['frames_ours']:>7} {r['ours']:>18.0f} {r['glibc']:>15.0f} {ratio:>6.1f}x",
              flush=True)
    cold, syms, frames = cold_walk(args.rounds)
    results["cold_first_walk_s"] = cold
    results["cold_first_symbolize_s"] = syms
    print(f"cold first walk (fresh process, {frames} frames through libc/libpython, "
          f"incl. module discovery): {cold * 1e3:.1f} ms; naming those frames "
          f"(symbol tables) {syms * 1e3:.1f} ms (medians of {args.rounds})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
