"""The CFI validator: at every instruction of the frontend's code, the
unwinder's caller chain (CFA, return address, return-address slot and the
callee-saved registers of every frame) equals a shadow call stack kept from
the CPU's own calls and returns.

Covered: the entry (``@f``) and resume (``@f__resume``) paths of every
function of the test programs (fib, Ackermann, even/odd mutual recursion,
nested loops with polls and the flag set, hooks, division), with services
near (direct calls) and far (through PLT stubs), slot and direct call modes,
interleaved threads. Negative scenarios show the validator finds wrong CFA
rules, wrong register-save rules and code without CFI, naming the function,
offset and row.

CI keeps inputs small (one Python walk per instruction, ~0.1 ms); the
exhaustive sweeps are marked ``slow``.
"""
import pytest

import handir
from osrjit.emulated.program import EmulatedProgram
from osrjit.emulated import Machine
from osrjit.emulated.cfi_validator import CFIValidator, validate
from osrjit.emulated.loader import assemble

FUNCTIONS = ("fib", "ack", "loops", "is_even", "is_odd", "hooky", "div")
ENTRY_CALLS = [("fib", (7,)), ("ack", (2, 1)), ("is_even", (5,)), ("is_odd", (4,)),
               ("loops", (3,)), ("hooky", (2,)), ("div", (7, 0)), ("div", (-7, 2))]


def _program(*, calls="slot", opt_level=2, hypercall_base=None, polls=True, source=handir.SOURCE):
    m = Machine(hypercall_base=hypercall_base)
    prog = EmulatedProgram(m, opt_level=opt_level)
    prog.compile(source, calls=calls, polls=polls)
    prog.on_hook(lambda x: x + 1000)
    return m, prog


def _flag_for(prog, polls):
    """Set the safepoint flag; the slow path clears it after ``polls`` calls."""
    count = [0]

    def slow(thread):
        count[0] += 1
        if count[0] >= polls:
            prog.safepoint_flag = 0
    prog.on_safepoint(slow)
    prog.safepoint_flag = 1
    return count


def _spawn_every_resume(prog, value=2):
    """One thread per site of every function, resuming with every live value
    and the call's result = ``value`` (small enough for each to terminate)."""
    threads = []
    for name in prog.names():
        v = prog.current(name)
        for sid, site in v.sites.items():
            threads.append(prog.spawn_resume(v, sid, value, {x.name: value for x in site.live}))
    return threads


def _assert_ok(report):
    assert report.ok, report.summary()
    assert report.instructions_checked > 0


def _checked_symbols(report):
    return {s.removeprefix("osrjit.fn.") for s in report.by_symbol}


def test_entry_paths_of_every_program_unwind_exactly():
    m, prog = _program()
    slow = _flag_for(prog, 25)
    threads = [prog.spawn(name, *args) for name, args in ENTRY_CALLS]
    report = validate(m, quantum=(1000, 1000))
    _assert_ok(report)
    assert [t.result for t in threads] == [
        handir.py_fib(7), handir.py_ack(2, 1), 0, 0, handir.py_loops_from(0, 0, 3, 0),
        1002 + 2 * 1003, 0, -7 // 2 + -7 % 2]
    assert isinstance(threads[6].pending, ZeroDivisionError)
    assert slow[0] == 25
    assert set(FUNCTIONS) <= _checked_symbols(report)
    assert {"hypercall.osrjit_hook", "hypercall.osrjit_safepoint_slow",
            "hypercall.osrjit_error"} <= set(report.by_symbol)
    assert report.max_depth >= 7


def test_resume_entries_at_every_site_unwind_exactly():
    m, prog = _program()
    threads = _spawn_every_resume(prog)
    n_sites = sum(len(prog.current(n).sites) for n in prog.names())
    assert len(threads) == n_sites >= 15
    report = validate(m)
    _assert_ok(report)
    assert all(t.finished for t in threads)
    resumes = {s for s in _checked_symbols(report) if s.endswith("__resume")}
    assert resumes == {f + "__resume" for f in FUNCTIONS}


def test_stubs_to_far_services_unwind_exactly():
    m, prog = _program(hypercall_base=0x7E00_0000_0000)
    _flag_for(prog, 5)
    threads = [prog.spawn("hooky", 3), prog.spawn("loops", 2), prog.spawn("div", 1, 0)]
    threads += _spawn_every_resume(prog)[:6]
    report = validate(m)
    _assert_ok(report)
    assert {"osrjit.plt.osrjit_hook", "osrjit.plt.osrjit_safepoint_slow",
            "osrjit.plt.osrjit_error"} <= set(report.by_symbol)
    assert threads[0].result == 1003 + 2 * 1004


def test_interleaved_threads_keep_separate_shadow_stacks():
    m, prog = _program(calls="direct")
    threads = [prog.spawn(name, *args) for name, args in ENTRY_CALLS[:6]]
    report = validate(m, seed=4, quantum=(1, 7))
    _assert_ok(report)
    assert [t.result for t in threads[:4]] == [13, handir.py_ack(2, 1), 0, 0]


def test_opt_level_zero_frame_pointer_code():
    m, prog = _program(opt_level=0)
    threads = [prog.spawn("fib", 5), prog.spawn("hooky", 1), prog.spawn("loops", 2)]
    threads += _spawn_every_resume(prog)[::3]
    report = validate(m)
    _assert_ok(report)
    assert threads[0].result == 5


# --------------------------------------------------------------------------
# The validator finds what is wrong
# --------------------------------------------------------------------------

BAD_CFI = r'''
	.text
	.globl outer
	.type outer,@function
outer:
	.cfi_startproc
	pushq %rbx
	.cfi_def_cfa_offset 24            # wrong: the push moved the CFA offset to 16
	.cfi_offset %rbx, -24
	movq $7, %rbx
	callq inner
	popq %rbx
	.cfi_def_cfa_offset 8
	retq
	.cfi_endproc
	.size outer, .-outer
	.globl inner
	.type inner,@function
inner:
	.cfi_startproc
	pushq %rbx
	.cfi_def_cfa_offset 16
	.cfi_offset %rbx, -8              # wrong: rbx was saved at CFA - 16
	movq $9, %rbx
	nop
	popq %rbx
	.cfi_def_cfa_offset 8
	retq
	.cfi_endproc
	.size inner, .-inner
	.globl nocfi
	.type nocfi,@function
nocfi:                                # a leaf without any FDE
	movq %rdi, %rax
	retq
	.size nocfi, .-nocfi
	.globl calls_nocfi
	.type calls_nocfi,@function
calls_nocfi:
	.cfi_startproc
	subq $8, %rsp
	.cfi_def_cfa_offset 16
	callq nocfi
	addq $8, %rsp
	.cfi_def_cfa_offset 8
	retq
	.cfi_endproc
	.size calls_nocfi, .-calls_nocfi
'''


@pytest.fixture(scope="module")
def bad_object():
    return assemble(BAD_CFI)


def test_a_wrong_cfa_rule_is_reported_with_function_offset_and_row(bad_object):
    m = Machine()
    obj = m.load_object(bad_object, name="bad")
    m.spawn(obj.symbols["outer"], [])
    report = validate(m)
    assert not report.ok
    wheres = {f.where for f in report.failures}
    # outer's instructions after the push, and every instruction of inner
    # (whose caller chain goes through outer's wrong row).
    assert "outer+0x1" in wheres and "inner+0x0" in wheres and "outer+0x0" not in wheres
    f = next(f for f in report.failures if f.where == "outer+0x1")
    assert f.frame == 0 and any("cfa" in d for d in f.differences)
    assert "rsp+24" in f.row or "24" in f.row, f.row
    assert "outer+0x1" in str(f) and hex(f.pc) in str(f)


def test_a_wrong_register_save_rule_is_reported(bad_object):
    m = Machine()
    obj = m.load_object(bad_object, name="bad")
    m.spawn(obj.symbols["inner"], [])           # inner alone: its CFA rule is right
    report = validate(m)
    bad = [f for f in report.failures if f.where.startswith("inner")]
    assert bad and all("rbx" in " ".join(f.differences) for f in bad)
    # Wrong from the push on (the rule stays in force after the pop: CFI rows
    # carry forward; before the push no rule applies).
    assert {f.where for f in bad} == {"inner+0x1", "inner+0x8", "inner+0x9", "inner+0xa"}


def test_code_without_cfi_is_reported(bad_object):
    m = Machine()
    obj = m.load_object(bad_object, name="bad")
    m.spawn(obj.symbols["calls_nocfi"], [5])
    report = validate(m)
    assert {f.where for f in report.failures} == {"nocfi+0x0", "nocfi+0x3"}
    assert all(f.row is None and "frame-pointer" in f.differences[0] for f in report.failures)


def test_a_leaf_function_without_polls_unwinds_exactly():
    """A function without calls (no polls: no sites at all) is still
    ``uwtable``, so a thread stopped inside it unwinds (LLVM would otherwise
    infer ``nounwind`` and emit no FDE: see test_code_without_cfi_is_reported)."""
    src = "def sq(x):\n    return x * x\n\ndef caller(x):\n    return sq(x) + 1\n"
    m, prog = _program(source=src, polls=False)
    t = prog.spawn("caller", 7)
    report = validate(m)
    _assert_ok(report)
    assert t.result == 50 and report.by_symbol["osrjit.fn.sq"] > 0


def test_validator_hooks_only_its_ranges_and_can_be_removed():
    m, prog = _program()
    fib = prog.current("fib")
    with CFIValidator(m, [fib.code_range]) as v:
        prog.spawn("hooky", 1)
        prog.spawn("fib", 4)
        m.run()
    assert set(v.report.by_symbol) == {"osrjit.fn.fib"}
    checked = v.report.instructions_checked
    prog.spawn("fib", 4)
    m.run()
    assert v.report.instructions_checked == checked


# --------------------------------------------------------------------------
# Exhaustive sweeps (pytest -m slow)
# --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("opt_level", [0, 1, 2, 3])
@pytest.mark.parametrize("calls", ["slot", "direct"])
def test_sweep_every_program_and_site(opt_level, calls):
    for far in (None, 0x7E00_0000_0000):
        for seed in (0, 1):
            m, prog = _program(calls=calls, opt_level=opt_level, hypercall_base=far)
            _flag_for(prog, 200)
            threads = [prog.spawn("fib", 12), prog.spawn("ack", 2, 3),
                       prog.spawn("is_even", 30), prog.spawn("loops", 6),
                       prog.spawn("hooky", 9), prog.spawn("div", 5, 0)]
            for value in (1, 2):      # (0 or 3 make some resumed recursions very deep)
                threads += _spawn_every_resume(prog, value)
            report = validate(m, seed=seed, quantum=(1, 50))
            _assert_ok(report)
            assert all(t.finished for t in threads)
            assert threads[0].result == handir.py_fib(12)
            assert threads[1].result == handir.py_ack(2, 3)
            assert {f + "__resume" for f in FUNCTIONS} <= _checked_symbols(report)
