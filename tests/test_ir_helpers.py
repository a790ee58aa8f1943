"""osrjit.ir: hand-written llvmlite IR through VersionedFunction — rendering,
frame maps, misuse errors, and compiled runs of both entries (in a child)."""
import ctypes
import re
import struct

import llvmlite.binding as llvm
import pytest
from llvmlite import ir

from childproc import run_child
from osrjit.abi import STATE_LIVE_BASE, LiveValue, SiteKind
from osrjit.errors import CompileError
from osrjit.ir import DOUBLE, I32, I64, PTR, VOID, Mode, VersionedFunction


# -- hand-written bodies (module level: the child process rebuilds them) ---------


def fib_body(fb):
    """The module docstring's worked example."""
    b = fb.builder
    fb.declare("a")                                   # crosses the 2nd call
    fb.poll(1, live=["n"])                            # entry safepoint poll
    n = fb.load("n")
    with b.if_then(b.icmp_signed("<", n, I64(2))):
        b.ret(n)
    fb.call_function(2, "fib", [b.sub(fb.load("n"), I64(1))], live=["n"], result="a")
    second = fb.call_function(3, "fib", [b.sub(fb.load("n"), I64(2))], live=["a"])
    b.ret(b.add(fb.load("a"), second))


def build_fib():
    return VersionedFunction("fib", ["n"]).build(fib_body)


def mixed_body(fb):
    """``mixed(i64 x, ptr cell)``: i32, double and ptr variables live across a hook.

    returns hook(x) + w + fptosi(d * 2) + *p   with w = (i32) x, d = (double) x, p = cell
    """
    b = fb.builder
    fb.declare("w", I32)
    fb.declare("d", DOUBLE)
    fb.declare("p", PTR)
    fb.store("w", b.trunc(fb.load("x"), I32))
    fb.store("d", b.sitofp(fb.load("x"), DOUBLE))
    fb.store("p", fb.load("cell"))
    h = fb.hook(10, fb.load("x"), live=["w", "d", "p"])
    doubled = b.fmul(fb.load("d"), ir.Constant(DOUBLE, 2.0))
    total = b.add(h, b.sext(fb.load("w"), I64))
    total = b.add(total, b.fptosi(doubled, I64))
    total = b.add(total, b.load(fb.load("p"), typ=I64))
    b.ret(total)


def build_mixed():
    return VersionedFunction("mixed", ["x", ("cell", PTR)]).build(mixed_body)


def external_body(fb):
    """``ext(a, fp)``: r = ext_mul(a, 3) (EXTERNAL site on a declared function),
    then s = fp(r, a) through a pointer value; returns r * 1000 + s."""
    b = fb.builder
    fb.declare("r")
    mul = fb.declare_function("ext_mul", ir.FunctionType(I64, [I64, I64]))
    fb.call(20, mul, [fb.load("a"), I64(3)], result="r", live=["a", "fp"])
    s = fb.call(21, fb.load("fp"), [fb.load("r"), fb.load("a")],
                function_type=ir.FunctionType(I64, [I64, I64]), callee_name="fp", live=["r"])
    b.ret(b.add(b.mul(fb.load("r"), I64(1000)), s))


def build_external():
    return VersionedFunction("ext", ["a", ("fp", PTR)]).build(external_body)


def tick_body(fb):
    """``void tick(ptr p)``: *p += 1; poll; *p += 10; error report if *p > 100."""
    b = fb.builder

    def bump(k):
        p = fb.load("p")
        b.store(b.add(b.load(p, typ=I64), I64(k)), p)

    bump(1)
    fb.poll(30)
    bump(10)
    big = b.icmp_signed(">", b.load(fb.load("p"), typ=I64), I64(100))
    with b.if_then(big):
        fb.report_error(1)
    b.ret_void()


def build_tick():
    return VersionedFunction("tick", [("p", PTR)], return_type=VOID).build(tick_body)


# -- rendering and frame maps ------------------------------------------------------


def test_worked_example_defines_both_entries_and_its_sites():
    fir = build_fib()
    assert fir.symbol == "osrjit.fn.fib" and fir.resume_symbol == "osrjit.fn.fib__resume"
    mod = llvm.parse_assembly(fir.module_ir)
    mod.verify()
    assert {f.name for f in mod.functions} >= {fir.symbol, fir.resume_symbol}
    assert fir.params == ("n",) and fir.callees == frozenset()
    assert {i: (s.kind, s.callee, s.live, s.has_result) for i, s in fir.sites.items()} == {
        1: (SiteKind.POLL, "osrjit_safepoint_slow", (LiveValue("n"),), False),
        2: (SiteKind.CALL, "fib", (LiveValue("n"),), True),
        3: (SiteKind.CALL, "fib", (LiveValue("a"),), True),
    }


def test_statepoint_renders_the_documented_form():
    fir = build_external()
    line = next(ln for ln in fir.module_ir.splitlines() if "(i64 20," in ln)
    assert re.fullmatch(
        r'  %"site\.20" = call token \(i64, i32, ptr, i32, i32, \.\.\.\) '
        r'@"llvm\.experimental\.gc\.statepoint\.p0"\(i64 20, i32 0, '
        r'ptr elementtype\(i64 \(i64, i64\)\) @"ext_mul", i32 2, i32 0, '
        r'i64 %"[^"]+", i64 3, i32 0, i32 0\) \[ "deopt"\(i64 %"live\.a", ptr %"live\.fp"\) \]',
        line), line
    assert 'call i64 @"llvm.experimental.gc.result.i64"(token %"site.20")' in fir.module_ir
    assert fir.sites[20].kind is SiteKind.EXTERNAL and fir.sites[20].callee == "ext_mul"
    assert fir.sites[21].callee == "fp"
    assert fir.sites[20].live == (LiveValue("a"), LiveValue("fp", "ptr"))


def test_resume_entry_dispatches_on_the_site_id_and_traps_otherwise():
    text = build_fib().module_ir
    resume = text[text.index('define i64 @"osrjit.fn.fib__resume"(i64 %"site_id", ptr %"state")'):]
    assert re.search(r'switch i64 %"site_id", label %"resume\.unknown" '
                     r'\[i64 1, label %"resume\.1" i64 2, label %"resume\.2" i64 3, label %"resume\.3"\]',
                     resume)
    assert 'resume.unknown:\n  call void @"llvm.trap"()\n  unreachable' in resume
    # site 2 restores n from state[1] and its result variable a from state[0]
    block = resume[resume.index("resume.2:"):resume.index("resume.3:")]
    assert "getelementptr inbounds i64, ptr %\"state\", i64 1" in block
    assert "getelementptr inbounds i64, ptr %\"state\", i64 0" in block
    assert block.rstrip().endswith('br label %"after.2"')


def test_live_defaults_to_every_declared_variable_but_the_result():
    def body(fb):
        fb.declare("a")
        fb.declare("b", DOUBLE)
        fb.call_function(5, "g", [fb.load("x")], result="a")
        fb.call_function(6, "g", [fb.load("x")])
        fb.builder.ret(fb.load("a"))

    fir = VersionedFunction("f", ["x"]).build(body)
    assert fir.sites[5].live == (LiveValue("x"), LiveValue("b", "double"))
    assert fir.sites[6].live == (LiveValue("x"), LiveValue("a"), LiveValue("b", "double"))
    assert fir.callees == frozenset({"g"})
    assert '@"osrjit.slot.g" = external global ptr' in fir.module_ir


def test_the_body_sees_each_mode_once():
    modes = []

    def body(fb):
        modes.append(fb.mode)
        assert fb.entry_function.name == "osrjit.fn.f"
        fb.builder.ret(fb.load("x"))

    VersionedFunction("f", ["x"]).build(body)
    assert modes == [Mode.NORMAL, Mode.RESUME]


def test_a_custom_symbol_is_used_for_both_entries():
    fir = VersionedFunction("f", ["x"], symbol="my_f").build(lambda fb: fb.builder.ret(fb.load("x")))
    assert 'define i64 @"my_f"(i64 %"x") uwtable gc "statepoint-example"' in fir.module_ir
    assert 'define i64 @"my_f__resume"(i64 %"site_id", ptr %"state") uwtable gc "statepoint-example"' in fir.module_ir


# -- misuse -----------------------------------------------------------------------


def _build(body, params=("x",), **kw):
    return VersionedFunction("f", list(params), **kw).build(body)


def test_an_ssa_value_crossing_a_site_is_rejected_with_a_hint():
    def body(fb):
        v = fb.builder.add(fb.load("x"), I64(1))
        fb.poll(1)
        fb.builder.ret(v)

    with pytest.raises(CompileError, match="keep such values in variables"):
        _build(body)


@pytest.mark.parametrize("body, message", [
    (lambda fb: (fb.poll(1), fb.poll(1), fb.builder.ret(I64(0))), "site id 1 used twice"),
    (lambda fb: (fb.poll(-1), fb.builder.ret(I64(0))), r"not an integer in \[0, 2\*\*63\)"),
    (lambda fb: fb.builder.ret(fb.load("y")), "no variable 'y'"),
    (lambda fb: (fb.declare("x"),), "declared twice"),
    (lambda fb: (fb.declare("h", ir.IntType(8)),), "i64, i32, double or ptr"),
    (lambda fb: (fb.poll(1, live=["nope"]), fb.builder.ret(I64(0))), "no variable 'nope'"),
    (lambda fb: (fb.poll(1, live=["x", "x"]), fb.builder.ret(I64(0))), "live names repeat"),
    (lambda fb: None, "without a terminator"),
    (lambda fb: (fb.declare("d", DOUBLE), fb.hook(1, fb.load("x"), result="d")), "result 'd' is double"),
    (lambda fb: (fb.store("x", I32(1)),), "storing i32 into variable 'x' of type i64"),
    (lambda fb: (fb.call(1, fb.load("x"), []),), "needs function_type"),
    (lambda fb: (fb.call_function(1, "g", [I32(1)], function_type=ir.FunctionType(I64, [I64])),),
     "argument 0 is i32"),
    (lambda fb: (fb.poll(1) if fb.mode is Mode.NORMAL else None, fb.builder.ret(I64(0))),
     "must not depend on the mode"),
])
def test_misuse_is_a_precise_compile_error(body, message):
    with pytest.raises(CompileError, match=message):
        _build(body)


def test_unsupported_return_type_is_rejected():
    with pytest.raises(CompileError, match="return type i8"):
        VersionedFunction("f", [], return_type=ir.IntType(8))


# -- compiled and run (child process) ------------------------------------------------


def scenario_fib_both_entries():
    from jit_loader import JitLoader
    jit = JitLoader().load(build_fib())
    return {
        "fib": [jit.call("fib", n) for n in range(15)],
        "resume_entry_poll": jit.resume("fib", 1, {"n": 12}),
        "resume_after_first_call": jit.resume("fib", 2, {"n": 10}, result=34),   # 34 + fib(8)
        "resume_after_second_call": jit.resume("fib", 3, {"a": 34}, result=21),  # a + 21
    }


def test_fib_built_by_hand_runs_and_resumes():
    out = run_child(scenario_fib_both_entries)
    assert out["fib"][:10] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34] and out["fib"][14] == 377
    assert out["resume_entry_poll"] == 144
    assert out["resume_after_first_call"] == 55
    assert out["resume_after_second_call"] == 55


def scenario_mixed_types():
    from jit_loader import JitLoader
    jit = JitLoader(hook=lambda x: x + 1000).load(build_mixed())
    fir, entry, resume = jit.versions["mixed"]
    cell = ctypes.c_int64(100)
    fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(entry)
    direct = fn(7, ctypes.addressof(cell))            # (7+1000) + 7 + 14 + 100
    live = [lv.name for lv in fir.sites[10].live]
    state = (ctypes.c_int64 * (STATE_LIVE_BASE + 3))()
    state[0] = 7                                      # the hook's result
    forged = {"w": 5, "d": struct.unpack("<q", struct.pack("<d", 1.5))[0],
              "p": ctypes.addressof(cell)}
    for i, name in enumerate(live):
        state[STATE_LIVE_BASE + i] = forged[name]
    rfn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(resume)
    resumed = rfn(10, ctypes.addressof(state))        # 7 + 5 + 3 + 100
    return direct, resumed, live


def test_i32_double_and_ptr_variables_cross_a_site():
    direct, resumed, live = run_child(scenario_mixed_types)
    assert live == ["w", "d", "p"]
    assert direct == 1007 + 7 + 14 + 100
    assert resumed == 7 + 5 + 3 + 100


_BINARY = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


def scenario_external_and_pointer_calls():
    from jit_loader import JitLoader
    mul = _BINARY(lambda a, b: a * b)
    sub = _BINARY(lambda a, b: a - b)
    address = lambda cb: ctypes.cast(cb, ctypes.c_void_p).value  # noqa: E731
    jit = JitLoader().load(build_external(), symbols={"ext_mul": address(mul)})
    _, entry, resume = jit.versions["ext"]
    fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(entry)
    direct = fn(4, address(sub))                      # r = 12, s = 12 - 4
    state = (ctypes.c_int64 * 3)(50, 2, address(sub))  # result r = 50, a = 2, fp
    rfn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(resume)
    resumed = rfn(20, ctypes.addressof(state))        # r = 50, s = 48
    return direct, resumed


def test_external_and_pointer_calls_run_and_resume():
    assert run_child(scenario_external_and_pointer_calls) == (12 * 1000 + 8, 50 * 1000 + 48)


def scenario_void_function_with_poll_and_error():
    from jit_loader import JitLoader
    jit = JitLoader(on_slow=lambda: None).load(build_tick())
    _, entry, resume = jit.versions["tick"]
    cell = ctypes.c_int64(0)
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(entry)(ctypes.addressof(cell))
    after_call = cell.value
    jit.flag.value = 1
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(entry)(ctypes.addressof(cell))
    slow = jit.slow_calls
    state = (ctypes.c_int64 * 2)(0, ctypes.addressof(cell))
    ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p)(resume)(30, ctypes.addressof(state))
    after_resume = cell.value
    cell.value = 95
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(entry)(ctypes.addressof(cell))
    return after_call, slow, after_resume, cell.value, jit.errors


def test_void_function_polls_resumes_and_reports_errors():
    after_call, slow, after_resume, final, errors = run_child(
        scenario_void_function_with_poll_and_error)
    assert after_call == 11 and slow == 1
    assert after_resume == 22 + 10  # only the code after the poll ran
    assert final == 95 + 11 and errors == [1]
