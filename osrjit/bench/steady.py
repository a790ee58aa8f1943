"""Benchmark: steady-state cost of the call mechanism after a replacement, fib(27).

Two comparisons, each against a fresh compile of the same code, in one run
(medians of ``--rounds`` timings, the variants interleaved per round):

* ``patched_direct``: the runtime's own code. ``Runtime(calls="direct")``
  compiles fib v1 and replaces it with v2; fib's calls are then the patched
  ``call rel32`` sites. Against a fresh runtime that compiled v2 directly.
* ``indirect_slot`` and ``orc_stub``: the same plain-IR fib three ways —
  direct self-calls (the baseline), every call through a pointer cell
  (``load ptr; call *ptr``, what ``calls="slot"`` emits for calls to other
  functions), and every call to a stub ``jmp *ptr(%rip)`` whose pointer
  lives next to the code (the shape of the indirection stubs LLVM ORC puts in
  front of lazily compiled or redirectable functions). Calls are ``notail``
  so LLVM keeps both recursive calls in every variant (no accumulator
  recursion elimination in the direct one only).

    python -m osrjit.bench.steady [--n 27] [--rounds 9] [--json PATH]

JSON: ``{"steady_state_ratio": {"patched_direct": r, "indirect_slot": r,
"orc_stub": r}, "seconds": {...}}`` (ratio = variant time / fresh time).
"""
import argparse
import ctypes
import json
import statistics
import sys
import time

FIB_V1 = """
def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)
"""
FIB_V2 = """
def fib(n):
    if n < 2:
        return n
    a = fib(n - 1)
    b = fib(n - 2)
    return a + b
"""

_PLAIN_HEAD = 'target triple = "{triple}"\n'
_PLAIN_BODY = """
define i64 @{name}(i64 %n) noinline {{
entry:
  %c = icmp slt i64 %n, 2
  br i1 %c, label %base, label %rec
base:
  ret i64 %n
rec:
  %a = sub i64 %n, 1
  {callee_a}
  %x = notail call i64 {target}(i64 %a)
  %b = sub i64 %n, 2
  {callee_b}
  %y = notail call i64 {target}(i64 %b)
  %s = add i64 %x, %y
  ret i64 %s
}}
"""


def plain_ir(triple):
    """Three fibs in one module: direct, through a pointer cell, through an ORC-style stub."""
    parts = [_PLAIN_HEAD.format(triple=triple)]
    parts.append(_PLAIN_BODY.format(name="fib_direct", callee_a="", callee_b="",
                                    target="@fib_direct"))
    parts.append("@fib_cell = global ptr @fib_slot\n")
    parts.append(_PLAIN_BODY.format(name="fib_slot", target="%p",
                                    callee_a="%p = load ptr, ptr @fib_cell", callee_b="")
                 .replace("notail call i64 %p(i64 %b)", "notail call i64 %q(i64 %b)")
                 .replace("  %y = notail", "  %q = load ptr, ptr @fib_cell\n  %y = notail"))
    # ORC-style: every call goes to a stub that jumps through a pointer next to the code.
    parts.append("@fib_stub_ptr = global ptr @fib_orc\n")
    parts.append("declare i64 @fib_orc_stub(i64)\n")
    parts.append('module asm ".text"\n')
    parts.append('module asm ".globl fib_orc_stub"\n')
    parts.append('module asm "fib_orc_stub:"\n')
    parts.append('module asm "  jmpq *fib_stub_ptr(%rip)"\n')
    parts.append(_PLAIN_BODY.format(name="fib_orc", callee_a="", callee_b="",
                                    target="@fib_orc_stub"))
    return "\n".join(parts)


def load_plain():
    import llvmlite.binding as llvm
    from osrjit.compiling import target_machine
    tm = target_machine(2)
    mod = llvm.parse_assembly(plain_ir(tm.triple))
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=2)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    asm = tm.emit_assembly(mod)
    obj = tm.emit_object(mod)
    jit = llvm.create_lljit_compiler(tm)
    tracker = (llvm.JITLibraryBuilder().add_object_img(obj)
               .export_symbol("fib_direct").export_symbol("fib_slot").export_symbol("fib_orc")
               .link(jit, "bench-steady"))
    ty = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
    fns = {k: ty(tracker[k]) for k in ("fib_direct", "fib_slot", "fib_orc")}
    return (jit, tracker), fns, asm


def count_calls(asm, name):
    """Calls in function ``name`` of an assembly listing (a sanity check on the variants)."""
    body = asm.split(f"{name}:", 1)[1].split(".Lfunc_end", 1)[0]
    return sum(1 for line in body.splitlines() if line.strip().startswith("call"))


def timed(fn, n):
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=27)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from osrjit import Runtime

    def fib_ref(n):
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    want = fib_ref(args.n)
    replaced = Runtime(calls="direct")
    replaced.compile(FIB_V1)
    replaced.replace("fib", FIB_V2)
    fresh = Runtime(calls="direct")
    fresh.compile(FIB_V2)
    keep, plain, asm = load_plain()
    for name in ("fib_direct", "fib_slot", "fib_orc"):
        assert count_calls(asm, name) == 2, f"{name}: LLVM changed the call structure"
    variants = {"replaced": replaced.function("fib"), "fresh": fresh.function("fib"), **plain}
    for name, fn in variants.items():
        assert fn(args.n) == want, name
    samples = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            samples[name].append(timed(fn, args.n))
        if sys.stderr.isatty():
            sys.stderr.write(f"\rsteady state: round {r + 1}/{args.rounds}")
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 40 + "\r")
    med = {name: statistics.median(v) for name, v in samples.items()}
    ratios = {"patched_direct": med["replaced"] / med["fresh"],
              "indirect_slot": med["fib_slot"] / med["fib_direct"],
              "orc_stub": med["fib_orc"] / med["fib_direct"]}
    print(f"fib({args.n}), medians of {args.rounds}:")
    print(f"  runtime, replaced (patched direct calls) {med['replaced'] * 1e3:8.2f} ms   "
          f"fresh compile {med['fresh'] * 1e3:8.2f} ms   ratio {ratios['patched_direct']:.3f}")
    print(f"  plain IR: direct {med['fib_direct'] * 1e3:8.2f} ms   "
          f"through the slot {med['fib_slot'] * 1e3:8.2f} ms (ratio {ratios['indirect_slot']:.3f})"
          f"   ORC-style stub {med['fib_orc'] * 1e3:8.2f} ms (ratio {ratios['orc_stub']:.3f})")
    out = {"steady_state_ratio": ratios, "seconds": med, "n": args.n, "rounds": args.rounds}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    replaced.close()
    fresh.close()
    return out


if __name__ == "__main__":
    main()
