"""Benchmark: per-frame cost of the native walker beside the Python walker and glibc.

All walkers walk the same stack in the same run: a JIT-compiled recursion
(LLJIT, ``add_object_img``; see ``osrjit/bench/unwind.py``) of depth D calls back
into Python, and inside that callback, with the registers captured by
``unwinder.with_captured_registers``, each walker is timed over repeated
walks; the figure is the median over rounds, divided by the number of frames
that walker reported.

* ``python``: ``unwinder.walk`` (the reference), as ``unwinder.backtrace()`` runs it;
* ``native``: ``osrjit_native_walk`` as a native caller makes it (reset the
  state, call), repeated by a small native loop so no Python runs between
  walks (tables already grown by a first walk);
* ``glibc``: ``backtrace()`` (libgcc's unwinder) from the callback, repeated by
  the same kind of native loop;
* ``native_ctypes`` / ``glibc_ctypes``: one ctypes call per walk instead (the
  call costs about 1 µs / 0.35 µs here, which shows at depth 100);
* ``native_api`` / ``native_arrays``: ``NativeWalker.walk`` (one record per
  frame) and ``NativeWalker.walk_arrays`` (columns).

It also reports what tables cost: the growing tables the walks compiled, and
compiling every FDE of libc and libpython at once.

    python -m osrjit.bench.native_walk [--depths 100,1000,10000] [--rounds 7] [--json PATH]
"""
import argparse
import ctypes
import json
import os
import statistics
import threading
import time

from .unwind import load_recursion  # the same JIT recursion

#: Native loops that repeat a walk ``reps`` times, so the per-call cost of
#: ctypes does not count: ``walk`` resets the state from ``init`` first.
REPEAT_IR = r"""
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)

define i64 @repeat_native_walk(i64 %reps, ptr %walk, ptr %tables, ptr %init, ptr %state,
                               ptr %out, i64 %max, i64 %lo, i64 %hi) uwtable {
entry:
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i1, %loop ]
  call void @llvm.memcpy.p0.p0.i64(ptr %state, ptr %init, i64 176, i1 false)
  %n = call i64 %walk(ptr %tables, ptr null, ptr %state, ptr %out, i64 %max, i64 %lo, i64 %hi)
  %i1 = add i64 %i, 1
  %more = icmp ult i64 %i1, %reps
  br i1 %more, label %loop, label %done
done:
  ret i64 %n
}

define i64 @repeat_backtrace(i64 %reps, ptr %backtrace, ptr %buf, i32 %size) uwtable {
entry:
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i1, %loop ]
  %n = call i32 %backtrace(ptr %buf, i32 %size)
  %i1 = add i64 %i, 1
  %more = icmp ult i64 %i1, %reps
  br i1 %more, label %loop, label %done
done:
  %n64 = sext i32 %n to i64
  ret i64 %n64
}
"""


def load_repeaters():
    """``(jit, tracker, repeat_native_walk, repeat_backtrace)`` as ctypes functions.
    Keep the tuple alive while calling them."""
    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    tm = llvm.Target.from_default_triple().create_target_machine(reloc="pic", codemodel="small",
                                                                 opt=2)
    obj = tm.emit_object(llvm.parse_assembly(REPEAT_IR))
    jit = llvm.create_lljit_compiler(tm)
    tracker = (llvm.JITLibraryBuilder().add_object_img(obj).export_symbol("repeat_native_walk")
               .export_symbol("repeat_backtrace").link(jit, "bench-repeat"))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    walk = ctypes.CFUNCTYPE(i64, i64, vp, vp, vp, vp, vp, i64, ctypes.c_uint64,
                            ctypes.c_uint64)(tracker["repeat_native_walk"])
    bt = ctypes.CFUNCTYPE(i64, i64, vp, vp, ctypes.c_int32)(tracker["repeat_backtrace"])
    return jit, tracker, walk, bt


def _median_ns(fn, frames, rounds, reps):
    """Median over ``rounds`` of the per-frame time of ``reps`` calls of ``fn`` (ns)."""
    samples = []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter_ns() - t) / reps / frames)
    return statistics.median(samples)


def measure(loaded, repeaters, walker, depth, rounds):
    import unwinder
    from unwinder.native import (NATIVE_WALK_TYPE, EndReason, OutFrame, WalkState,
                                 stack_bounds_of, state_from_regs)
    space = walker.space
    libc = ctypes.CDLL("libc.so.6")
    backtrace = ctypes.cast(libc.backtrace, ctypes.c_void_p).value
    buf = (ctypes.c_void_p * (depth + 4096))()
    _jit, _tracker, repeat_walk, repeat_backtrace = repeaters
    out = {}

    def inside(regs):
        bounds = stack_bounds_of(regs[unwinder.x86_64.RSP])
        memory = lambda: unwinder.ProcessMemory(page_cache=True)  # noqa: E731
        py_frames = list(unwinder.walk(regs, memory(), space, caller_frame=True))
        t = time.perf_counter()
        api_frames = walker.walk(regs, innermost_is_caller=True, stack_bounds=bounds)
        first = time.perf_counter() - t            # grows the tables it needs
        n = len(api_frames)
        same = [(f.pc, f.cfa, f.ra_slot) for f in api_frames] == \
               [(f.pc, f.cfa, f.ra_slot) for f in py_frames]

        # The raw call, as a park stub would make it: prepared state and output.
        init = state_from_regs(regs, innermost_is_caller=True)
        state = WalkState()
        frames_out = (OutFrame * (n + 16))()
        fn = NATIVE_WALK_TYPE(walker.entry_address)
        memmove = ctypes.memmove
        state_at, init_at = ctypes.addressof(state), ctypes.addressof(init)
        with walker.pin():
            args = (walker.tables_address, None, state_at, ctypes.addressof(frames_out),
                    len(frames_out), bounds[0], bounds[1])

            def native():
                memmove(state_at, init_at, ctypes.sizeof(WalkState))
                return fn(*args)

            n_raw = native()
            raw_end = EndReason(state.end_reason).name
            ns_ctypes = _median_ns(native, n_raw, rounds, max(20, 200_000 // depth))
            reps = max(20, 200_000 // depth)
            ns_native = _median_ns(
                lambda: repeat_walk(reps, walker.entry_address, args[0], init_at, state_at,
                                    args[3], args[4], args[5], args[6]),
                n_raw * reps, rounds, 1)
        ns_python = _median_ns(
            lambda: list(unwinder.walk(regs, memory(), space, caller_frame=True)),
            len(py_frames), rounds, max(1, 2_000 // depth))
        ns_api = _median_ns(
            lambda: walker.walk(regs, innermost_is_caller=True, stack_bounds=bounds),
            n, rounds, max(1, 5_000 // depth))
        ns_arrays = _median_ns(
            lambda: walker.walk_arrays(regs, innermost_is_caller=True, stack_bounds=bounds),
            n, rounds, max(2, 50_000 // depth))
        out.update(python=ns_python, native=ns_native, native_ctypes=ns_ctypes,
                   native_api=ns_api, native_arrays=ns_arrays,
                   frames=n, frames_python=len(py_frames), frames_raw=n_raw, raw_end=raw_end,
                   same=same, first_walk_s=first)

    @ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
    def callback(_):
        try:
            n_glibc = libc.backtrace(buf, len(buf))
            out["glibc_ctypes"] = _median_ns(lambda: libc.backtrace(buf, len(buf)), n_glibc,
                                             rounds, max(5, 20_000 // depth))
            reps = max(5, 20_000 // depth)
            n_loop = repeat_backtrace(1, backtrace, buf, len(buf))
            out["glibc"] = _median_ns(lambda: repeat_backtrace(reps, backtrace, buf, len(buf)),
                                      n_loop * reps, rounds, 1)
            out["frames_glibc"] = n_glibc
            unwinder.with_captured_registers(inside)
        except BaseException as e:  # noqa: BLE001 - never unwind into JIT code
            out["error"] = e
        return 0

    jit, tracker = loaded
    rec = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(tracker["rec"])
    threading.stack_size(256 << 20)          # a deep recursion wants a big native stack
    t = threading.Thread(target=rec, args=(depth, ctypes.cast(callback, ctypes.c_void_p)))
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out


def whole_table_costs(walker):
    """Seconds to compile every FDE of libc and libpython (fresh ModuleTable.whole)."""
    from unwinder.native import ModuleTable
    costs = {}
    for m in walker.space.modules:
        base = os.path.basename(m.name)
        if base.startswith("libc.so") or base.startswith("libpython"):
            t = time.perf_counter()
            table = ModuleTable.whole(m)
            costs[base] = {"seconds": time.perf_counter() - t, "fdes": table.stats.fdes,
                           "rows": table.stats.rows, "bytes": table.stats.bytes}
    return costs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="100,1000,10000")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from unwinder.native import NativeWalker
    loaded = load_recursion()   # keep the JIT code (and its registration) for the whole run
    repeaters = load_repeaters()
    walker = NativeWalker()
    per_frame = {k: {} for k in ("python", "native", "glibc", "native_ctypes", "glibc_ctypes",
                                 "native_api", "native_arrays")}
    results = {"walk_ns_per_frame": per_frame, "frames": {}, "native_speedup_vs_glibc": {}}
    print(f"{'depth':>7} {'frames':>7} {'python':>8} {'native':>7} {'glibc':>7} "
          f"{'glibc/native':>12} | {'via ctypes: native':>18} {'glibc':>6} | {'api':>6} "
          f"{'arrays':>6}   (ns per frame, medians of {args.rounds})")
    for depth in (int(d) for d in args.depths.split(",")):
        r = measure(loaded, repeaters, walker, depth, args.rounds)
        for k in per_frame:
            per_frame[k][str(depth)] = r[k]
        results["frames"][str(depth)] = r["frames"]
        speedup = r["glibc"] / r["native"]
        results["native_speedup_vs_glibc"][str(depth)] = speedup
        ok = r["same"] and r["frames_raw"] == r["frames"] and r["raw_end"] == "RA_UNDEFINED"
        note = "" if ok else f"   (!) same={r['same']} raw={r['frames_raw']} {r['raw_end']}"
        print(f"{depth:>7} {r['frames']:>7} {r['python']:>8.0f} {r['native']:>7.1f} "
              f"{r['glibc']:>7.1f} {speedup:>11.1f}x | {r['native_ctypes']:>18.1f} "
              f"{r['glibc_ctypes']:>6.0f} | {r['native_api']:>6.0f} {r['native_arrays']:>6.0f}"
              f"{note}", flush=True)
    stats = {m.name: t.stats for m, t in walker.tables.items()}
    grown = {os.path.basename(k): {"regions": s.regions, "fdes": s.fdes, "rows": s.rows,
                                   "seconds": s.seconds}
             for k, s in stats.items()}
    results["growing_tables"] = grown
    total = sum(s.seconds for s in stats.values())
    print(f"tables grown by these walks: {sum(s.regions for s in stats.values())} FDE regions "
          f"in {len(stats)} modules, {total * 1e3:.1f} ms in total")
    whole = whole_table_costs(walker)
    results["whole_table_compile"] = whole
    for name, c in whole.items():
        print(f"whole table of {name}: {c['fdes']} FDEs -> {c['rows']} rows "
              f"({c['bytes'] / 1024:.0f} KiB) in {c['seconds']:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
