"""Scenario: mutated LLVM IR and mutated reference-language source end in CompileError.

The reference frontend's ``module_ir`` of a few functions (slot and direct
calls, hooks, loops with polls, division) is mutated -- lines deleted,
duplicated and swapped, tokens replaced by IR keywords, types, constants and
names or by other tokens of the module, bytes flipped -- and handed to
``osrjit.compiling.emit_object`` and to ``Runtime.compile_ir`` and
``Runtime.replace`` of a native runtime. Each ends with a
:class:`osrjit.CompileError` (for the runtime: an :class:`osrjit.OsrJitError`,
as IR that LLVM accepts may no longer match its FunctionIR's sites) or,
rarely, a valid compile; afterwards the runtime still compiles and calls a
function. Both run in a child process, so an LLVM abort
is a failing test that names its signal.

Reference-language source, mutated the same way, gives ``compile_source``
nothing but CompileError or FunctionIRs (in process: the frontend is Python).
"""
import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from childproc import run_child
from osrjit.testing import fuzz

EMIT_CASES = 1500
RUNTIME_CASES = 600


def _foreign(tally, what):
    return "\n\n".join(f"{what}: {o.kind}\n{o.detail}" for o in tally.foreign)


def scenario_mutated_ir_into_emit_object(cases, seed):
    from osrjit.compiling import target_machine
    rng = random.Random(seed)
    irs = fuzz.seed_irs()
    tm = target_machine(2)
    tally = fuzz.Tally("emit_object")
    for _ in range(cases):
        ir = fuzz.mutate_ir(irs[rng.randrange(len(irs))], fuzz.random_text_edits(rng))
        tally.timed(lambda: fuzz.run_emit(ir, tm))
    tm.close()
    return tally


def test_mutated_ir_into_emit_object_gives_only_compile_errors():
    tally = run_child(scenario_mutated_ir_into_emit_object, EMIT_CASES, 19)
    assert tally.foreign_count == 0, _foreign(tally, "emit_object")
    assert tally.cases == EMIT_CASES
    assert tally.outcomes["CompileError"] > EMIT_CASES // 2 and tally.outcomes.get("valid")


def scenario_mutated_ir_into_a_runtime(cases, seed):
    """Half the cases through compile_ir, half through replace (no frame of
    the replaced function is live, so replace compiles, checks, publishes and
    frees)."""
    import osrjit
    rng = random.Random(seed)
    irs = fuzz.seed_irs()
    alive = []
    with osrjit.Runtime() as rt:
        for program in fuzz.SEED_PROGRAMS:
            rt.compile(program)
        compilers = [fuzz.RuntimeCompiler(rt, "compile_ir"), fuzz.RuntimeCompiler(rt, "replace")]
        tallies = [fuzz.Tally(c.name) for c in compilers]
        for k in range(cases):
            ir = fuzz.mutate_ir(irs[rng.randrange(len(irs))], fuzz.random_text_edits(rng))
            tallies[k % 2].timed(lambda: compilers[k % 2](ir))
            if k % 100 == 99:
                alive.append(compilers[0].check_alive(k))
        alive.append(compilers[0].check_alive(cases))
        stats = rt.stats()
    return tallies, alive, stats["live_versions"]


def test_mutated_ir_into_compile_ir_and_replace_gives_only_osrjit_errors_and_the_runtime_works():
    tallies, alive, live = run_child(scenario_mutated_ir_into_a_runtime, RUNTIME_CASES, 19)
    for tally in tallies:
        assert tally.foreign_count == 0, _foreign(tally, tally.target)
        assert tally.cases == RUNTIME_CASES // 2
        assert tally.outcomes["CompileError"] > RUNTIME_CASES // 4 and tally.outcomes.get("valid")
    assert alive == [True] * (RUNTIME_CASES // 100 + 1)
    # Each valid compile's predecessors were unloaded: one version each is left.
    assert [live[name] for name in ("fib", "g", "loop", f"alive{RUNTIME_CASES}")] == [1] * 4


def scenario_emit_fib_with(replacements):
    """emit_object of fib's IR with each ``(old, new)`` text replacement (of
    every occurrence): the outcome kind of each."""
    from osrjit.compiling import target_machine
    tm = target_machine(2)
    fib = fuzz.seed_irs()[0]
    out = []
    for old, new in replacements:
        assert old in fib.module_ir
        mutated = dataclasses.replace(fib, module_ir=fib.module_ir.replace(old, new))
        out.append(fuzz.run_emit(mutated, tm).kind)
    return out


def test_a_gc_strategy_llvm_cannot_emit_is_a_compile_error_not_an_abort():
    """LLVM's code generator aborts the process on a GC name it does not know
    ("LLVM ERROR: unsupported GC: stat%point-example", found by the fuzzer),
    on erlang and ocaml, whose printers llvmlite does not link, and on a
    statepoint in a shadow-stack function (an assertion)."""
    names = ['"stat%point-example"', '"erlang"', '"ocaml"', '"shadow-stack"',
             r'"statepoint\2Dexample\22"', '/* a comment */ "x"',
             '"coreclr"', r'"statepoint\2Dexample"', '; a comment\n "statepoint-example"']
    kinds = run_child(scenario_emit_fib_with,
                      [('gc "statepoint-example"', f"gc {name}") for name in names])
    assert kinds == ["CompileError"] * 6 + ["valid"] * 3


def test_ir_llvm_would_abort_on_or_cannot_describe_is_a_compile_error():
    """Found by the fuzz report: a gc.result of ``token poison`` verifies, and
    instruction selection then asserts ("Register use before def!") and
    aborts the process; an error message that quotes a line cut inside a
    multi-byte character made llvmlite raise UnicodeDecodeError; a lone
    surrogate in the text, UnicodeEncodeError."""
    result = '@"llvm.experimental.gc.result.i64"(token %"site.4937520674309065775")'
    kinds = run_child(scenario_emit_fib_with, [
        (result, '@"llvm.experimental.gc.result.i64"(token poison)'),
        (result, '@"llvm.experimental.gc.result.i64"(token none)'),
        ('target datalayout = ""', 'target datalayout = "\ufffd"'),
        ('target datalayout = ""', 'target datalayout = "\ud800"'),
        ('target datalayout = ""', 'target datalayout = ""')])
    assert kinds == ["CompileError"] * 4 + ["valid"]


_SOURCE_EDIT = st.tuples(st.integers(0, len(fuzz.TEXT_EDITS) - 1), st.integers(0, 1 << 16),
                         st.integers(0, 1 << 16))


@pytest.mark.filterwarnings("ignore::SyntaxWarning")   # Python on source like "1x"
@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(program=st.sampled_from(fuzz.SEED_PROGRAMS),
       edits=st.lists(_SOURCE_EDIT, min_size=1, max_size=4))
def test_mutated_source_gives_only_compile_errors(program, edits):
    source = fuzz.mutate_text(program, edits, fuzz.SOURCE_VOCABULARY)
    outcome = fuzz.run_source(source)
    assert not outcome.foreign, f"{source!r}:\n{outcome.detail}"
