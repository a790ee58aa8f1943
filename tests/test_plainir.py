"""Plain LLVM IR in: ordinary functions, instrumented by osrjit itself.

The instrumentation (:func:`osrjit.plainir.instrument`) is checked on its
FunctionIRs; every scenario that runs code, and above all every replacement
with frames live, runs in a child process (``childproc.run_child``) with
the default runtime and the fast one (native transfer and walker).
"""
import pytest

import osrjit
from childproc import run_child
from osrjit import CompileError, SignatureMismatch, SiteKind
from osrjit.plainir import instrument

#: The runtimes every native scenario runs with.
CONFIGS = {"default": {}, "fast": {"transfer": "native", "walker": "native"}}

SUM_LOOP = """
declare i64 @labs(i64)
declare i64 @osrjit_hook(i64)

define i64 @twice(i64 %x) {
  %y = mul i64 %x, 2
  ret i64 %y
}

define i64 @f(i64 %n) {
entry:
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i.next, %loop ]
  %s = phi i64 [ 0, %entry ], [ %s.next, %loop ]
  %neg = sub i64 0, %i
  %a = call i64 @twice(i64 %neg)
  %b = call i64 @labs(i64 %a)
  %h = call i64 @osrjit_hook(i64 %i)
  %t = add i64 %s, %b
  %s.next = add i64 %t, %h
  %i.next = add i64 %i, 1
  %c = icmp slt i64 %i.next, %n
  br i1 %c, label %loop, label %done
done:
  ret i64 %s.next
}
"""

DOWN = """
declare i64 @osrjit_hook(i64)

define i64 @down(i64 %n) {{
entry:
  %leaf = icmp eq i64 %n, 0
  br i1 %leaf, label %bottom, label %rec
bottom:
  %h = call i64 @osrjit_hook(i64 %n)
  ret i64 %h
rec:
  %m = sub i64 %n, 1
  %r = call i64 @down(i64 %m)
  %out = add i64 %r, {k}
  ret i64 %out
}}
"""

# A loop with a hook inside; v2 adds {k} * i per iteration instead.
LOOP = """
declare i64 @osrjit_hook(i64)

define i64 @loop(i64 %n) {{
entry:
  br label %head
head:
  %i = phi i64 [ 0, %entry ], [ %i.next, %body ]
  %acc = phi i64 [ 0, %entry ], [ %acc.next, %body ]
  %more = icmp slt i64 %i, %n
  br i1 %more, label %body, label %exit
body:
  %h = call i64 @osrjit_hook(i64 %i)
  %term = mul i64 %i, {k}
  %acc.1 = add i64 %acc, %term
  %acc.next = add i64 %acc.1, %h
  %i.next = add i64 %i, 1
  br label %head
exit:
  ret i64 %acc
}}
"""

UNNAMED = """
declare i64 @osrjit_hook(i64)

define i64 @u(i64 %0) {{
  %2 = mul i64 %0, {k}
  %3 = call i64 @osrjit_hook(i64 %0)
  %4 = add i64 %2, %3
  ret i64 %4
}}
"""


def _sites(fir, kind):
    return [s for s in fir.sites.values() if s.kind is kind]


# -- the instrumentation ----------------------------------------------------------

def test_every_call_is_a_site_and_the_live_values_come_from_ssa_liveness():
    irs = {f.name: f for f in instrument(SUM_LOOP, known_signatures={})}
    assert set(irs) == {"twice", "f"}
    f = irs["f"]
    assert f.params == ("n",) and f.return_type == "i64" and f.callees == {"twice"}
    [call] = _sites(f, SiteKind.CALL)
    [external] = _sites(f, SiteKind.EXTERNAL)
    [hook] = _sites(f, SiteKind.HOOK)
    polls = _sites(f, SiteKind.POLL)
    assert call.callee == "twice" and external.callee == "labs"
    assert len(polls) == 2                       # function entry and the loop header
    names = lambda site: [v.name for v in site.live]
    # Across the call of twice: the phis i and s, and n (the loop bound); not a itself.
    assert names(call) == ["i", "n", "s"]
    assert names(external) == ["i", "n", "s"]
    # b is used after the hook: it crosses the hook site.
    assert names(hook) == ["b", "i", "n", "s"]
    assert sorted(names(p) for p in polls) == [["i", "n", "s"], ["n"]]
    # twice has one site (its entry poll), with x live.
    [entry] = irs["twice"].sites.values()
    assert entry.kind is SiteKind.POLL and names(entry) == ["x"]


def test_site_ids_are_stable_across_an_edit_that_keeps_the_names():
    v1 = {f.name: f for f in instrument(SUM_LOOP, known_signatures={})}["f"]
    edited = SUM_LOOP.replace("%s.next = add i64 %t, %h",
                              "%t2 = mul i64 %t, 3\n  %s.next = add i64 %t2, %h")
    v2 = {f.name: f for f in instrument(edited, known_signatures={})}["f"]
    assert set(v1.sites) == set(v2.sites)
    assert all(v1.sites[i].live == v2.sites[i].live for i in v1.sites)


def test_without_polls_only_calls_are_sites():
    f = {f.name: f for f in instrument(SUM_LOOP, known_signatures={}, polls=False)}["f"]
    assert not _sites(f, SiteKind.POLL) and len(f.sites) == 3


def test_unnamed_values_get_names_no_other_version_has():
    [v1] = instrument(UNNAMED.format(k=3), known_signatures={})
    [same] = instrument(UNNAMED.format(k=3), known_signatures={})
    [v2] = instrument(UNNAMED.format(k=4), known_signatures={})
    hook = lambda fir: _sites(fir, SiteKind.HOOK)[0]
    assert hook(v1).live == hook(same).live             # the same text: the same names
    [product] = hook(v1).live                           # %2 = mul %0, k
    assert product.name.startswith("osrjit.t") and product.type == "i64"
    assert not {v.name for v in hook(v1).live} & {v.name for v in hook(v2).live}


def test_direct_calls_reference_the_callee_symbol():
    f = {f.name: f for f in instrument(SUM_LOOP, known_signatures={}, calls="direct")}["f"]
    assert f.direct_callees == {"twice"}
    assert '@"osrjit.fn.twice"' in f.module_ir or "@osrjit.fn.twice" in f.module_ir


def test_a_known_function_is_called_as_a_jit_function():
    src = ("declare i64 @g(i64)\n"
           "define i64 @h(i64 %x) {\n  %r = call i64 @g(i64 %x)\n  ret i64 %r\n}\n")
    [h] = instrument(src, known_signatures={"g": "i64 (i64)"}, polls=False)
    [site] = h.sites.values()
    assert site.kind is SiteKind.CALL and h.callees == {"g"}
    [h] = instrument(src, known_signatures={}, polls=False)
    assert [s.kind for s in h.sites.values()] == [SiteKind.EXTERNAL] and not h.callees


def test_ir_text_is_told_from_reference_language_source():
    from osrjit.plainir import is_plain_ir
    assert is_plain_ir("define i64 @f(i64 %x) {\n  ret i64 %x\n}\n")
    assert is_plain_ir(llvmlite_module())
    assert not is_plain_ir("def f(x):\n    define = x\n    return define\n")


# -- refusals ----------------------------------------------------------------------

@pytest.mark.parametrize("src,known,words", [
    # a JIT->JIT call whose type differs from the callee's definition
    ("define i64 @g(i64 %x) {\n  ret i64 %x\n}\n"
     "define i64 @h(i64 %x) {\n  %r = call i64 @g(double 1.0)\n  ret i64 %r\n}\n",
     {}, ["'g'", "i64 (double)", "i64 (i64)"]),
    ("declare i64 @g(ptr)\n"
     "define i64 @h(i64 %x) {\n  %r = call i64 @g(ptr null)\n  ret i64 %r\n}\n",
     {"g": "i64 (i64)"}, ["'g'", "i64 (ptr)", "i64 (i64)"]),
    # a site whose result comes back in XMM0
    ("declare double @cos(double)\ndefine i64 @h(i64 %x) {\n  %d = sitofp i64 %x to double\n"
     "  %c = call double @cos(double %d)\n  %r = fptosi double %c to i64\n  ret i64 %r\n}\n",
     {}, ["double", "XMM0"]),
    # a value of an unsupported type live across a site
    ("declare i64 @osrjit_hook(i64)\ndefine i64 @h(i64 %x) {\n"
     "  %v = insertelement <2 x double> zeroinitializer, double 1.0, i32 0\n"
     "  %k = call i64 @osrjit_hook(i64 %x)\n  %e = extractelement <2 x double> %v, i32 0\n"
     "  %r = fptosi double %e to i64\n  ret i64 %r\n}\n", {}, ["h", "%v", "<2 x double>"]),
    # a stack slot whose address crosses a site
    ("declare i64 @osrjit_hook(i64)\ndeclare void @fill(ptr)\ndefine i64 @h(i64 %x) {\n"
     "  %buf = alloca i64\n  call void @fill(ptr %buf)\n  %k = call i64 @osrjit_hook(i64 %x)\n"
     "  %r = load i64, ptr %buf\n  ret i64 %r\n}\n", {}, ["h", "%buf", "stack"]),
    # a mutable global
    ("@counter = global i64 0\ndefine i64 @h(i64 %x) {\n  store i64 %x, ptr @counter\n"
     "  ret i64 %x\n}\n", {}, ["@counter", "mutable"]),
    # a JIT function's address taken
    ("declare void @qsort(ptr, i64, i64, ptr)\ndefine i32 @cmp(ptr %a, ptr %b) {\n  ret i32 0\n}\n"
     "define void @h(ptr %p) {\n  call void @qsort(ptr %p, i64 1, i64 8, ptr @cmp)\n"
     "  ret void\n}\n",
     {}, ["'cmp'", "address"]),
    # osrjit's own symbols (a direct call the runtime would not know to patch)
    ('declare i64 @"osrjit.fn.g"(i64)\ndefine i64 @h(i64 %x) {\n'
     '  %r = call i64 @"osrjit.fn.g"(i64 %x)\n  ret i64 %r\n}\n', {}, ["osrjit.fn.g", "own"]),
    # IR LLVM rejects
    ("define i64 @h(i64 %x) {\n  ret i32 %x\n}\n", {}, ["LLVM"]),
])
def test_what_this_cut_cannot_instrument_is_a_precise_compile_error(src, known, words):
    with pytest.raises(CompileError) as info:
        instrument(src, known_signatures=known)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_a_new_version_with_another_signature_is_refused():
    src = "define double @g(double %x) {\n  ret double %x\n}\n"
    with pytest.raises(SignatureMismatch) as info:
        instrument(src, known_signatures={"g": "i64 (i64)"})
    assert info.value.old == "i64 (i64)" and info.value.new == "double (double)"
    assert "'g'" in str(info.value) and isinstance(info.value, osrjit.OsrJitError)


# -- scenarios (child processes) ---------------------------------------------------

def sum_loop_scenario(options, calls):
    import osrjit
    with osrjit.Runtime(calls=calls, **options) as rt:
        rt.on_hook(lambda x: 100 * x)
        names = rt.compile_ir(SUM_LOOP)
        first = rt.function("f")(7)

        def on_hook(x):             # twice becomes thrice at i == 3, mid-loop
            if x == 3:
                rt.replace("twice", "define i64 @twice(i64 %x) {\n  %y = mul i64 %x, 3\n"
                                    "  ret i64 %y\n}\n")
            return 100 * x
        rt.on_hook(on_hook)
        second = rt.function("f")(7)
        return names, first, second, rt.stats()


@pytest.mark.parametrize("calls", ["slot", "direct"])
@pytest.mark.parametrize("config", CONFIGS)
def test_loops_calls_between_plain_functions_libc_and_the_hook(config, calls):
    names, first, second, stats = run_child(sum_loop_scenario, CONFIGS[config], calls)
    assert names == ["twice", "f"]
    assert first == sum(2 * i + 100 * i for i in range(7))
    assert second == sum((2 if i <= 3 else 3) * i + 100 * i for i in range(7))
    assert stats["pending_returns"] == 0 and stats["live_versions"] == {"twice": 1, "f": 1}


def down_scenario(options, depth):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(DOWN.format(k=1))

        def on_hook(_):
            rt.replace("down", DOWN.format(k=2))
            return 0
        rt.on_hook(on_hook)
        result = rt.function("down")(depth)
        return result, rt.stats(), repr(rt.last_transfer_error)


@pytest.mark.parametrize("options", [*CONFIGS.values(), {"opt_level": 0, "compiler": "worker"}],
                         ids=[*CONFIGS, "O0-worker"])
def test_a_plain_recursion_replaced_from_the_hook_with_every_frame_live(options):
    depth = 50
    result, stats, error = run_child(down_scenario, options, depth)
    assert result == 2 * depth, error            # every pending frame finished in v2
    assert stats["transfers"] == depth + 1 and stats["transfer_failures"] == 0
    assert stats["pending_returns"] == 0 and stats["freed_versions"] == 1


def overflow_scenario(options):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(DOWN.format(k=1))
        rt.on_hook(lambda x: 0)
        down = rt.function("down")
        try:
            down(10_000_000)
            outcome = "returned"
        except osrjit.StackOverflow as e:
            outcome = type(e).__name__
        return outcome, down(10), rt.stats()["pending_returns"]


@pytest.mark.parametrize("config", CONFIGS)
def test_a_plain_recursion_past_the_stack_limit_raises_stack_overflow(config):
    outcome, after, pending = run_child(overflow_scenario, CONFIGS[config])
    assert outcome == "StackOverflow"
    assert after == 10 and pending == 0


def loop_scenario(options, n, at):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(LOOP.format(k=1))

        def on_hook(i):
            if i == at:
                rt.replace("loop", LOOP.format(k=5))
            return 0
        rt.on_hook(on_hook)
        result = rt.function("loop")(n)
        return result, rt.stats()


@pytest.mark.parametrize("config", CONFIGS)
def test_a_loop_moved_at_a_hook_inside_it(config):
    n, at = 20, 7
    result, stats = run_child(loop_scenario, CONFIGS[config], n, at)
    # The hook comes before the multiplication: iteration ``at`` already multiplies by 5.
    assert result == sum(i * (1 if i < at else 5) for i in range(n))
    assert stats["transfers"] == 1 and stats["freed_versions"] == 1


def unnamed_scenario(options, new_k):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(UNNAMED.format(k=3))
        out = {}

        def on_hook(x):
            try:
                rt.replace("u", UNNAMED.format(k=new_k))
                out["replaced"] = True
            except osrjit.IncompatibleVersion as e:
                out["refused"] = str(e)
            return 1
        rt.on_hook(on_hook)
        out["result"] = rt.function("u")(10)
        out["again"] = rt.function("u")(10)
        return out


@pytest.mark.parametrize("config", CONFIGS)
def test_unnamed_values_make_frames_incompatible_and_nothing_changes(config):
    out = run_child(unnamed_scenario, CONFIGS[config], 4)
    assert "refused" in out and "osrjit.t" in out["refused"]
    assert out["result"] == 31 and out["again"] == 31   # the frame finished in its version
    same = run_child(unnamed_scenario, CONFIGS[config], 3)
    assert same.get("replaced") and same["result"] == 31


def signature_scenario():
    import osrjit
    with osrjit.Runtime() as rt:
        rt.compile_ir("define i64 @g(i64 %x) {\n  %y = add i64 %x, 1\n  ret i64 %y\n}\n")
        try:
            rt.replace("g", "define double @g(double %x) {\n  ret double %x\n}\n")
        except osrjit.SignatureMismatch as e:
            refused = str(e)
        mistyped = None
        try:
            rt.compile_ir("declare double @g(i64)\ndefine i64 @h(i64 %x) {\n"
                          "  %r = call double @g(i64 %x)\n  %i = fptosi double %r to i64\n"
                          "  ret i64 %i\n}\n")
        except osrjit.CompileError as e:
            mistyped = str(e)
        return refused, rt.function("g")(21), mistyped, rt.names()


def test_a_signature_change_is_refused_and_the_old_version_keeps_working():
    refused, result, mistyped, names = run_child(signature_scenario)
    assert "i64 (i64)" in refused and "double (double)" in refused
    assert result == 22
    assert mistyped is not None and "'g'" in mistyped and names == ["g"]


def llvmlite_module():
    """A tiny code generator: ``poly(x) = hook(x) + x*x + k`` for a given k."""
    from llvmlite import ir
    i64 = ir.IntType(64)
    module = ir.Module()
    hook = ir.Function(module, ir.FunctionType(i64, [i64]), "osrjit_hook")
    fn = ir.Function(module, ir.FunctionType(i64, [i64]), "poly")
    fn.args[0].name = "x"
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    x = fn.args[0]
    square = b.mul(x, x, name="square")
    h = b.call(hook, [x], name="h")
    b.ret(b.add(b.add(h, square, name="sum"), i64(7), name="out"))
    return module


def llvmlite_scenario(options):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.on_hook(lambda x: 1000)
        rt.compile_ir(llvmlite_module())
        return rt.function("poly")(5)


@pytest.mark.parametrize("config", CONFIGS)
def test_an_llvmlite_module_built_with_irbuilder(config):
    assert run_child(llvmlite_scenario, CONFIGS[config]) == 1000 + 25 + 7


# i1/i8/i16/i32/double/float/ptr values and nine arguments (two passed on the
# stack) cross the hook site; v2 weighs %c by {k}.
MIX = """
declare i64 @osrjit_hook(i64)

define i64 @mix(i64 %a1, i64 %a2, i64 %a3, i64 %a4, i64 %a5, i64 %a6, i64 %a7, i64 %a8,
                i64 %a9) {{
entry:
  %b = icmp sgt i64 %a1, 0
  %c = trunc i64 %a2 to i8
  %s = trunc i64 %a3 to i16
  %w = trunc i64 %a4 to i32
  %d = sitofp i64 %a5 to double
  %f = sitofp i64 %a6 to float
  %p = inttoptr i64 %a7 to ptr
  %h = call i64 @osrjit_hook(i64 %a9)
  %bz = zext i1 %b to i64
  %cz = sext i8 %c to i64
  %sz = sext i16 %s to i64
  %wz = sext i32 %w to i64
  %d2 = fmul double %d, 1.5
  %di = fptosi double %d2 to i64
  %f2 = fmul float %f, 2.5
  %fi = fptosi float %f2 to i64
  %pi = ptrtoint ptr %p to i64
  %x2 = mul i64 %cz, {k}
  %x3 = add i64 %bz, %x2
  %x4 = add i64 %x3, %sz
  %x5 = add i64 %x4, %wz
  %x6 = add i64 %x5, %di
  %x7 = add i64 %x6, %fi
  %x8 = add i64 %x7, %pi
  %x9 = add i64 %x8, %a8
  %x10 = add i64 %x9, %h
  ret i64 %x10
}}
"""


def mix_scenario(options, args):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(MIX.format(k=10))

        def on_hook(x):
            rt.replace("mix", MIX.format(k=1000))
            return x
        rt.on_hook(on_hook)
        result = rt.function("mix")(*args)
        [hook] = [s for s in rt.current("mix").ir.sites.values() if s.kind.value == "hook"]
        return result, {v.name: v.type for v in hook.live}, rt.stats()


@pytest.mark.parametrize("config", CONFIGS)
def test_narrow_float_and_pointer_values_and_nine_arguments_cross_a_hook_site(config):
    args = (1, -3, -300, -70000, 11, 3, 0x12345678, 100000, 9)
    result, live, stats = run_child(mix_scenario, CONFIGS[config], args)
    assert live == {"a8": "i64", "b": "i1", "c": "i8", "s": "i16", "w": "i32", "d": "double",
                    "f": "float", "p": "ptr"}
    assert result == 1 + -3 * 1000 - 300 - 70000 + int(11 * 1.5) + int(3 * 2.5) \
        + 0x12345678 + 100000 + 9
    assert stats["transfers"] == 1 and stats["transfer_failures"] == 0


SUM_REC = """
define i64 @sum(i64 %n) {{
entry:
  %z = icmp eq i64 %n, 0
  br i1 %z, label %leaf, label %rec
leaf:
  ret i64 0
rec:
  %m = sub i64 %n, 1
  %r = call i64 @sum(i64 %m)
  %k = mul i64 %n, {k}
  %out = add i64 %r, %k
  ret i64 %out
}}
"""


def test_the_emulated_backend_replaces_a_plain_recursion_without_old_code_fetches():
    rt = osrjit.Runtime(backend="emulated", seed=0)
    try:
        rt.compile_ir(SUM_REC.format(k=1))
        t = rt.spawn("sum", 50)
        rt.run(300)
        rt.replace("sum", SUM_REC.format(k=2))
        rt.run()
        stats = rt.stats()
        assert t.result == 2 * 50 * 51 // 2           # every level adds after its call returns
        assert stats["transfers"] > 0 and stats["old_code_fetches"] == 0
    finally:
        rt.close()


# Unnamed values (as clang emits them) bound to source variables by debug
# records; v2 multiplies by {k}.
DEBUG_NAMED = """
declare i64 @osrjit_hook(i64)
declare void @llvm.dbg.value(metadata, metadata, metadata)

define i64 @dbg(i64 %0) !dbg !5 {{
  call void @llvm.dbg.value(metadata i64 %0, metadata !10, metadata !DIExpression()), !dbg !11
  %2 = mul i64 %0, 3, !dbg !11
  call void @llvm.dbg.value(metadata i64 %2, metadata !13, metadata !DIExpression()), !dbg !11
  %3 = call i64 @osrjit_hook(i64 %0), !dbg !11
  %4 = mul i64 %2, {k}, !dbg !11
  %5 = add i64 %4, %3, !dbg !11
  ret i64 %5, !dbg !11
}}

!llvm.dbg.cu = !{{!0}}
!llvm.module.flags = !{{!3}}
!0 = distinct !DICompileUnit(language: DW_LANG_C99, file: !1, producer: "hand",
                             isOptimized: false, runtimeVersion: 0, emissionKind: FullDebug)
!1 = !DIFile(filename: "dbg.c", directory: "/tmp")
!3 = !{{i32 2, !"Debug Info Version", i32 3}}
!5 = distinct !DISubprogram(name: "dbg", scope: !1, file: !1, line: 1, type: !6, unit: !0,
                            spFlags: DISPFlagDefinition)
!6 = !DISubroutineType(types: !7)
!7 = !{{null}}
!10 = !DILocalVariable(name: "n", arg: 1, scope: !5, file: !1, line: 1, type: !12)
!11 = !DILocation(line: 2, column: 3, scope: !5)
!12 = !DIBasicType(name: "long", size: 64, encoding: DW_ATE_signed)
!13 = !DILocalVariable(name: "triple", scope: !5, file: !1, line: 2, type: !12)
"""


def test_unnamed_values_take_the_names_of_their_debug_variables():
    [f] = instrument(DEBUG_NAMED.format(k=1), known_signatures={})
    [hook] = _sites(f, SiteKind.HOOK)
    [entry] = _sites(f, SiteKind.POLL)
    assert [v.name for v in hook.live] == ["triple"] and [v.name for v in entry.live] == ["n"]
    assert f.params == ("n",)
    assert (hook.line, hook.col) == (2, 3)         # the call's !DILocation


def debug_named_scenario(options):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(DEBUG_NAMED.format(k=1))

        def on_hook(x):
            rt.replace("dbg", DEBUG_NAMED.format(k=10))
            return 1
        rt.on_hook(on_hook)
        return rt.function("dbg")(5), rt.stats()["transfers"]


@pytest.mark.parametrize("config", CONFIGS)
def test_an_edit_of_unnamed_ir_with_debug_variables_keeps_frames_transferable(config):
    result, transfers = run_child(debug_named_scenario, CONFIGS[config])
    assert result == 5 * 3 * 10 + 1 and transfers == 1


VARARG = """
declare ptr @malloc(i64)
declare void @free(ptr)
declare i32 @sprintf(ptr, ptr, ...)
declare i64 @strtol(ptr, ptr, i32)
@fmt = constant [4 x i8] c"%ld\\00"

define i64 @roundtrip(i64 %x) {
  %buf = call ptr @malloc(i64 32)
  %n = call i32 (ptr, ptr, ...) @sprintf(ptr %buf, ptr @fmt, i64 %x)
  %back = call i64 @strtol(ptr %buf, ptr null, i32 10)
  call void @free(ptr %buf)
  %len = sext i32 %n to i64
  %out = mul i64 %back, 100
  %r = add i64 %out, %len
  ret i64 %r
}
"""


def test_a_vararg_call_stays_a_plain_call():
    [f] = instrument(VARARG, known_signatures={}, polls=False)
    assert sorted(s.callee for s in f.sites.values()) == ["free", "malloc", "strtol"]


def vararg_scenario(options):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(VARARG)
        return rt.function("roundtrip")(-12345)


@pytest.mark.parametrize("config", CONFIGS)
def test_constants_and_vararg_libc_calls_run(config):
    assert run_child(vararg_scenario, CONFIGS[config]) == -12345 * 100 + 6


STEP = "define i64 @step(i64 %x) {{\n  %y = mul i64 %x, {k}\n  ret i64 %y\n}}\n"
RUN = """
declare i64 @step(i64)

define i64 @run(i64 %n) {
entry:
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i.next, %loop ]
  %acc = phi i64 [ 0, %entry ], [ %acc.next, %loop ]
  %v = call i64 @step(i64 %i)
  %acc.next = add i64 %acc, %v
  %i.next = add i64 %i, 1
  %more = icmp slt i64 %i.next, %n
  br i1 %more, label %loop, label %done
done:
  ret i64 %acc.next
}
"""


def alternation_scenario(options, calls, threads, replacements, n):
    import threading
    import osrjit
    with osrjit.Runtime(calls=calls, **options) as rt:
        rt.compile_ir(STEP.format(k=2))
        rt.compile_ir(RUN)                   # step is known: a JIT call, by name
        run = rt.function("run")
        low, high = 2 * sum(range(n)), 3 * sum(range(n))
        started = [threading.Event() for _ in range(threads)]
        stop = threading.Event()
        bad, counts = [], [0] * threads

        def worker(w):
            while True:
                r = run(n)
                if not low <= r <= high:
                    bad.append(r)
                counts[w] += 1
                started[w].set()
                if stop.is_set():
                    return

        pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
        for t in pool:
            t.start()
        for e in started:
            e.wait()
        for j in range(replacements):
            rt.replace("step", STEP.format(k=3 if j % 2 == 0 else 2))
        stop.set()
        for t in pool:
            t.join()
        return bad, counts, rt.stats(), run(n)


@pytest.mark.parametrize("config,calls", [
    ("default", "slot"), ("fast", "direct"),
    pytest.param("default", "direct", marks=pytest.mark.slow),
    pytest.param("fast", "slot", marks=pytest.mark.slow)])
def test_a_plain_callee_replaced_a_hundred_times_while_callers_run(config, calls):
    n = 2000
    bad, counts, stats, last = run_child(alternation_scenario, CONFIGS[config], calls, 2, 100, n)
    assert bad == [] and all(c >= 1 for c in counts)
    assert last == 2 * sum(range(n))        # the 100th replacement (k=2) is current
    assert stats["pending_returns"] == 0 and stats["transfer_failures"] == 0
    assert stats["live_versions"] == {"step": 1, "run": 1}


# A switch, a phi of three site results (external, JIT, indirect through a
# pointer argument), and the hook: the weight of r is {k}.
SWITCHY = """
declare i64 @labs(i64)
declare i64 @osrjit_hook(i64)

define i64 @triple(i64 %x) {{
  %y = mul i64 %x, 3
  ret i64 %y
}}

define i64 @switchy(i64 %n, ptr %fp) {{
entry:
  br label %head
head:
  %i = phi i64 [ 0, %entry ], [ %i.next, %join ]
  %acc = phi i64 [ 0, %entry ], [ %acc.next, %join ]
  %lane = urem i64 %i, 3
  switch i64 %lane, label %other [ i64 0, label %zero
                                   i64 1, label %one ]
zero:
  %neg = sub i64 0, %i
  %r0 = call i64 @labs(i64 %neg)
  br label %join
one:
  %r1 = call i64 @triple(i64 %i)
  br label %join
other:
  %neg2 = sub i64 -5, %i
  %r2 = call i64 %fp(i64 %neg2)
  br label %join
join:
  %r = phi i64 [ %r0, %zero ], [ %r1, %one ], [ %r2, %other ]
  %h = call i64 @osrjit_hook(i64 %i)
  %w = mul i64 %r, {k}
  %acc.1 = add i64 %acc, %w
  %acc.next = add i64 %acc.1, %h
  %i.next = add i64 %i, 1
  %more = icmp ult i64 %i.next, %n
  br i1 %more, label %head, label %exit
exit:
  ret i64 %acc.next
}}
"""


def switchy_reference(n, at):
    total = 0
    for i in range(n):
        r = (i, 3 * i, 5 + i)[i % 3]
        total += r * (1 if i < at else 7) + i
    return total


def switchy_scenario(options, n, at):
    import ctypes
    import osrjit
    labs = ctypes.cast(ctypes.CDLL(None).labs, ctypes.c_void_p).value
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(SWITCHY.format(k=1))

        def on_hook(i):
            if i == at:         # v2 declares triple (compiled) and redefines switchy only
                head, body = SWITCHY.format(k=7).split("define i64 @triple")
                rt.replace("switchy", head + "declare i64 @triple(i64)\n" +
                           "define i64 @switchy" + body.split("define i64 @switchy")[1])
            return i
        rt.on_hook(on_hook)
        return rt.function("switchy")(n, labs), rt.stats()


@pytest.mark.parametrize("config", CONFIGS)
def test_a_switch_a_phi_of_site_results_and_an_indirect_call(config):
    n, at = 30, 10
    result, stats = run_child(switchy_scenario, CONFIGS[config], n, at)
    assert result == switchy_reference(n, at)
    assert stats["transfers"] == 1 and stats["transfer_failures"] == 0


QUOTED = """
declare i64 @osrjit_hook(i64)

define i64 @"my fn"(i64 %"the n") {{
"entry block":
  %"a b" = mul i64 %"the n", 3
  %"q\\22uote" = add i64 %"the n", 1
  %"5x" = add i64 %"the n", 2
  %h = call i64 @osrjit_hook(i64 %"the n")
  %r1 = mul i64 %"a b", {k}
  %r2 = add i64 %r1, %"q\\22uote"
  %r3 = add i64 %r2, %"5x"
  %r = add i64 %r3, %h
  ret i64 %r
}}
"""


def quoted_scenario(options):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(QUOTED.format(k=1))

        def on_hook(_):
            rt.replace("my fn", QUOTED.format(k=10))
            return 0
        rt.on_hook(on_hook)
        [hook] = [s for s in rt.current("my fn").ir.sites.values() if s.kind.value == "hook"]
        return rt.function("my fn")(5), [v.name for v in hook.live]


@pytest.mark.parametrize("config", CONFIGS)
def test_names_llvm_must_quote_work_as_function_and_value_names(config):
    result, live = run_child(quoted_scenario, CONFIGS[config])
    assert live == ["5x", "a b", 'q"uote']
    assert result == 15 * 10 + 6 + 7


def versioned_signature_scenario():
    import osrjit
    from osrjit.ir import DOUBLE, I64, VersionedFunction

    def body(fb):
        fb.builder.ret(fb.load("x"))
    with osrjit.Runtime() as rt:
        rt.compile_ir(VersionedFunction("g", [("x", I64)]).build(body))
        try:
            rt.replace("g", VersionedFunction("g", [("x", DOUBLE)]).build(
                lambda fb: fb.builder.ret(fb.builder.fptosi(fb.load("x"), I64))))
        except osrjit.SignatureMismatch as e:
            return str(e), rt.function("g")(21)


def test_any_new_version_with_other_parameter_types_is_refused():
    message, result = run_child(versioned_signature_scenario)
    assert "i64 (i64)" in message and "i64 (double)" in message and result == 21


# Variables in allocas, as a naive code generator (or clang -O0) emits them:
# SROA turns them into SSA values before anything else; v2 adds {k} * i.
ALLOCAS = """
declare i64 @osrjit_hook(i64)

define i64 @acc(i64 %n) {{
entry:
  %i.addr = alloca i64
  %s.addr = alloca i64
  store i64 0, ptr %i.addr
  store i64 0, ptr %s.addr
  br label %cond
cond:
  %i = load i64, ptr %i.addr
  %more = icmp slt i64 %i, %n
  br i1 %more, label %body, label %done
body:
  %h = call i64 @osrjit_hook(i64 %i)
  %s = load i64, ptr %s.addr
  %t = mul i64 %i, {k}
  %s1 = add i64 %s, %t
  store i64 %s1, ptr %s.addr
  %i1 = add i64 %i, 1
  store i64 %i1, ptr %i.addr
  br label %cond
done:
  %r = load i64, ptr %s.addr
  ret i64 %r
}}
"""


def allocas_scenario(options, n, at):
    import osrjit
    with osrjit.Runtime(**options) as rt:
        rt.compile_ir(ALLOCAS.format(k=1))

        def on_hook(i):
            if i == at:
                rt.replace("acc", ALLOCAS.format(k=4))
            return 0
        rt.on_hook(on_hook)
        return rt.function("acc")(n), rt.stats()["transfers"]


@pytest.mark.parametrize("config", CONFIGS)
def test_variables_in_allocas_are_promoted_and_transfer(config):
    result, transfers = run_child(allocas_scenario, CONFIGS[config], 12, 5)
    assert result == sum(i * (1 if i < 5 else 4) for i in range(12)) and transfers == 1
