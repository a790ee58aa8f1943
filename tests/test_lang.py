"""The reference frontend: IR per construct, errors, site ids, live sets, ANF
order, and end-to-end runs (without the runtime) through ``jit_loader``.

End-to-end scenarios are module-level ``scenario_*`` functions run in a child
interpreter (``run_child``) so that a native crash fails one test. They check
three things against each other: CPython running the same source (the
language is a Python subset), a small interpreter of the lowered A-normal form
(``AnfInterpreter`` below, which also records every site's live values), and
the JIT-compiled code, including resuming it at every recorded site.
"""
import hashlib
import random
import re

import llvmlite.binding as llvm
import pytest

from childproc import run_child
from osrjit.abi import ERROR_SYMBOL, SLOT_PREFIX, SiteKind
from osrjit.errors import CompileError
from osrjit.lang import (INT64_MAX, INT64_MIN, Assign, Bin, BoolOp, Break, Chain, Cmp,
                         Cond, Const, Continue, Eval, If, Neg, Not, Return, Site, Var,
                         While, compile_source, lower_source, site_id, site_key,
                         temporary_name)

FIB = """
def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)
"""

CORPUS = """
def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)

def ack(m, n):
    if m == 0:
        return n + 1
    if n == 0:
        return ack(m - 1, 1)
    return ack(m - 1, ack(m, n - 1))

def is_even(n):
    if n == 0:
        return 1
    return is_odd(n - 1)

def is_odd(n):
    if n == 0:
        return 0
    return is_even(n - 1)

def nested(n, m):
    total = 0
    i = 0
    while i < n:
        j = 0
        while j < m:
            safepoint()
            total += i * j - (i + j) // 3 + hook(j) % 7
            j += 1
        i += 1
    return total

def logic(a, b):
    x = a and b
    y = a or b
    z = not a
    w = a < b <= 10 != a
    v = a if b else -b
    s = (a > 0 and hook(a)) or (b > 0 and hook(b) + 1) or -1
    t = 0 < hook(a) < hook(b) < 1000
    u = (fib(a % 5) if a > b else fib(b % 5)) + (a and b and fib(3)) + (a or fib(4))
    return x * 1000000 + y * 10000 + z * 1000 + w * 100 + v + s * 7 + t * 3 + u

def flow(n):
    i = 0
    acc = 0
    while True:
        i += 1
        if i > n:
            break
        if i % 3 == 0:
            continue
        acc = acc * 2 + hook(i) // 4
        if acc > 100000:
            return -acc
    return acc

def divs(a, b):
    return (a // b) * 1000 + a % b

def fallthrough(x):
    if x > 0:
        return 1

def aug(x):
    y = z = x + 1
    y += z * 2
    y -= 3
    y *= -2
    y //= 5
    y %= 11
    return +y - -z

def dead(x):
    while x > 0:
        x -= 1
        break
        x = hook(x)
    return x
    y = hook(x)
"""

#: (function, argument tuples) run end to end.
CORPUS_RUNS = [
    ("fib", [(n,) for n in range(0, 16)]),
    ("ack", [(0, 0), (1, 2), (2, 3), (3, 2)]),
    ("is_even", [(n,) for n in range(0, 12)]),
    ("is_odd", [(n,) for n in range(0, 12)]),
    ("nested", [(0, 0), (1, 3), (3, 4), (5, 5)]),
    ("logic", [(a, b) for a in (-3, 0, 2, 7) for b in (-1, 0, 4, 11)]),
    ("flow", [(n,) for n in (0, 1, 5, 20, 40)]),
    ("divs", [(a, b) for a in (-7, -1, 0, 5, 9) for b in (-4, -1, 3, 5)]),
    ("fallthrough", [(-1,), (3,)]),
    ("aug", [(x,) for x in (-20, -1, 0, 1, 13)]),
    ("dead", [(0,), (4,)]),
]


def hook_reference(x):
    """The hook service both CPython and the JIT loader use in these tests."""
    return x * 10


def run_python(source, name, args):
    """CPython's answer (``hook``/``safepoint`` as builtins; None counts as 0)."""
    namespace = {"hook": hook_reference, "safepoint": lambda: 0}
    exec(compile(source, "<corpus>", "exec"), namespace)
    return int(namespace[name](*args) or 0)


# -- an interpreter of the lowered form (the meaning the JIT must agree with) --


def wrap(v):
    return (v + 2 ** 63) % 2 ** 64 - 2 ** 63


class _Return(Exception):
    def __init__(self, value):
        self.value = value


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class AnfInterpreter:
    """Runs :class:`LoweredFunction` s with int64 wrapping; records, for every
    site executed, ``(function, site id, live values, result, frame's return)``
    — exactly what a resume at that site needs and must give back."""

    def __init__(self, functions, hook=hook_reference):
        self.functions = {f.name: f for f in functions}
        self.hook = hook
        self.records = []
        self.errors = 0

    def call(self, name, args):
        fn = self.functions[name]
        env = dict.fromkeys(fn.variables, 0)
        env.update(zip(fn.params, args))
        mine = []
        try:
            self.block(fn, fn.body, env, mine)
            value = 0
        except _Return as r:
            value = r.value
        self.records += [(name, *rec, value) for rec in mine]
        return value

    def block(self, fn, stmts, env, mine):
        for s in stmts:
            self.stmt(fn, s, env, mine)

    def stmt(self, fn, s, env, mine):
        if isinstance(s, Assign):
            env[s.target] = self.ev(s.value, env)
        elif isinstance(s, Eval):
            self.ev(s.value, env)
        elif isinstance(s, Site):
            args = [self.ev(a, env) for a in s.args]
            result = 0
            if s.kind is SiteKind.CALL:
                result = self.call(s.callee, args)
            elif s.kind is SiteKind.HOOK:
                result = wrap(self.hook(args[0]))
            if s.result is not None:
                env[s.result] = result
            mine.append((s.id, {n: env[n] for n in fn.live[s.key]}, result))
        elif isinstance(s, If):
            self.block(fn, s.body if self.ev(s.test, env) else s.orelse, env, mine)
        elif isinstance(s, While):
            while True:
                self.block(fn, s.header, env, mine)
                if not self.ev(s.test, env):
                    break
                try:
                    self.block(fn, s.body, env, mine)
                except _Break:
                    break
                except _Continue:
                    pass
                if s.latch is not None:
                    self.stmt(fn, s.latch, env, mine)
        elif isinstance(s, Return):
            raise _Return(self.ev(s.value, env))
        elif isinstance(s, Break):
            raise _Break()
        elif isinstance(s, Continue):
            raise _Continue()
        else:
            raise TypeError(s)

    def ev(self, e, env):
        if isinstance(e, Const):
            return e.value
        if isinstance(e, Var):
            return env[e.name]
        if isinstance(e, Bin):
            a, b = self.ev(e.left, env), self.ev(e.right, env)
            if e.op in ("//", "%"):
                if b == 0:
                    self.errors += 1
                    return 0
                return wrap(a // b if e.op == "//" else a % b)
            return wrap({"+": a + b, "-": a - b, "*": a * b}[e.op])
        if isinstance(e, Neg):
            return wrap(-self.ev(e.operand, env))
        if isinstance(e, Not):
            return int(not self.ev(e.operand, env))
        if isinstance(e, Cmp):
            return int(_compare(e.op, self.ev(e.left, env), self.ev(e.right, env)))
        if isinstance(e, Chain):
            left = self.ev(e.operands[0], env)
            for op, operand in zip(e.ops, e.operands[1:]):
                right = self.ev(operand, env)
                if not _compare(op, left, right):
                    return 0
                left = right
            return 1
        if isinstance(e, BoolOp):
            for v in e.values:
                value = self.ev(v, env)
                if (value == 0) == (e.op == "and"):
                    return value
            return value
        if isinstance(e, Cond):
            return self.ev(e.body if self.ev(e.test, env) else e.orelse, env)
        raise TypeError(e)


def _compare(op, a, b):
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b,
            ">": a > b, ">=": a >= b}[op]


# -- IR per construct -----------------------------------------------------------


def _only(source, **kw):
    [fir] = compile_source(source, **kw)
    return fir


def _entry_ir(fir):
    """The text of ``@<symbol>`` only (not its resume entry)."""
    text = fir.module_ir
    start = text.index(f'define i64 @"{fir.symbol}"(')
    return text[start:text.index("\n}\n", start)]


def _statepoint_ids(text):
    return [int(m) for m in re.findall(r"gc\.statepoint\.p0\"\(i64 (\d+),", text)]


def test_every_corpus_module_verifies_and_has_both_entries():
    for fir in compile_source(CORPUS):
        mod = llvm.parse_assembly(fir.module_ir)
        mod.verify()
        names = {f.name for f in mod.functions}
        assert {fir.symbol, fir.resume_symbol} <= names
        assert f'define i64 @"{fir.symbol}"(' in fir.module_ir
        assert f'define i64 @"{fir.resume_symbol}"(i64 %"site_id", ptr %"state")' in fir.module_ir
        assert fir.module_ir.count('gc "statepoint-example"') == 2
        assert fir.params and fir.return_type == "i64"


@pytest.mark.parametrize("source", [
    "def f(a, b):\n    return a + b - a * b\n",
    "def f(a, b):\n    return a // b + a % b\n",
    "def f(a):\n    return -a + +a\n",
    "def f(a, b):\n    return not a or a == b or a != b or a < b <= a > b >= a\n",
    "def f(a, b):\n    return a and b\n",
    "def f(a, b):\n    return a if b else 7\n",
    "def f(a):\n    if a:\n        return 1\n    elif a > 3:\n        pass\n    else:\n        a = 2\n    return a\n",
    "def f(a):\n    while a:\n        a -= 1\n        if a == 5:\n            break\n        continue\n",
    "def f(a):\n    x = y = a\n    x += y\n    a\n    return\n",
    "def f(a):\n    return True + False + -9223372036854775808 + 9223372036854775807\n",
    "def f(a):\n    safepoint()\n    return hook(a)\n",
    "def f(a):\n    return f(a) + g(a)\ndef g(b):\n    return b\n",
])
def test_each_construct_compiles_to_verified_ir(source):
    for fir in compile_source(source):
        llvm.parse_assembly(fir.module_ir).verify()


def test_self_calls_are_direct_and_other_calls_go_through_slots():
    f, g = compile_source("def f(a):\n    return f(a) + g(a)\ndef g(b):\n    return b\n")
    text = _entry_ir(f)
    assert 'ptr elementtype(i64 (i64)) @"osrjit.fn.f"' in text
    assert f'load ptr, ptr @"{SLOT_PREFIX}g"' in text
    assert f'@"{SLOT_PREFIX}g" = external global ptr' in f.module_ir
    assert f.callees == frozenset({"g"}) and g.callees == frozenset()


def test_polls_load_the_flag_volatile_and_predict_the_fast_path():
    fir = _only("def f(a):\n    while a:\n        a -= 1\n    return a\n")
    text = _entry_ir(fir)
    assert text.count('load volatile i64, i64* @"osrjit_safepoint_flag"') == 2  # entry + back-edge
    assert re.search(r'br i1 %"safepoint\.stop(\.\d+)?", label %"poll\.\d+", label %"after\.\d+", !prof', text)
    assert '!{ !"branch_weights", i32 1, i32 2000 }' in fir.module_ir
    assert 'elementtype(void ()) @"osrjit_safepoint_slow"' in text
    assert {s.kind for s in fir.sites.values()} == {SiteKind.POLL}


def test_polls_false_keeps_only_explicit_safepoints():
    source = "def f(a):\n    while a:\n        safepoint()\n        a -= 1\n    return a\n"
    fir = _only(source, polls=False)
    assert [s.id for s in fir.sites.values()] == [site_id("f:poll:safepoint:0")]
    assert len(_only(source).sites) == 3  # entry, safepoint(), back-edge


def test_hook_is_a_statepoint_of_osrjit_hook_with_a_result():
    fir = _only("def f(a):\n    return hook(a + 1)\n", polls=False)
    [info] = fir.sites.values()
    assert info.kind is SiteKind.HOOK and info.callee == "osrjit_hook" and info.has_result
    assert 'elementtype(i64 (i64)) @"osrjit_hook"' in _entry_ir(fir)
    assert '@"llvm.experimental.gc.result.i64"(token' in _entry_ir(fir)


def test_division_reports_zero_division_through_the_error_service():
    fir = _only("def f(a, b):\n    return a // b\n", polls=False)
    text = _entry_ir(fir)
    assert f'call void @"{ERROR_SYMBOL}"(i64 1)' in text
    assert "sdiv" in text and "srem" in text
    assert not fir.sites  # the error service is not a site


def test_site_info_locates_the_source():
    fir = _only("def f(a):\n    x = 1\n    return  f(a) + hook(x)\n")
    by_key = {k: fir.sites[site_id(k)] for k in ("f:poll:entry:0", "f:call:f:0", "f:hook:hook:0")}
    assert (by_key["f:poll:entry:0"].line, by_key["f:poll:entry:0"].col) == (1, 0)
    assert (by_key["f:call:f:0"].line, by_key["f:call:f:0"].col) == (3, 12)
    assert (by_key["f:hook:hook:0"].line, by_key["f:hook:hook:0"].col) == (3, 19)


# -- errors -----------------------------------------------------------------------


@pytest.mark.parametrize("source, fragment, line, col", [
    ("def f():\n    return 1.5\n", "float literals", 2, 11),
    ("def f():\n    return 'a'\n", "str literals", 2, 11),
    ("x = 1\n", "only function definitions", 1, 0),
    ("def f():\n    def g():\n        pass\n", "nested definitions", 2, 4),
    ("def f(n):\n    for i in n:\n        pass\n", "for loops", 2, 4),
    ("def f(n):\n    return f(n=1)\n", "keyword arguments", 2, 13),
    ("def f(n):\n    return f(*n)\n", "starred", 2, 13),
    ("def f(n):\n    return f()\n", "takes 1 argument, 0 given", 2, 11),
    ("def f(n):\n    return hook(1, 2)\n", "takes 1 argument, 2 given", 2, 11),
    ("def f(n):\n    return z\n", "unknown name 'z'", 2, 11),
    ("def f(n):\n    return g(n)\n", "unknown function 'g'", 2, 11),
    ("def f(n):\n    osrjit_x = 1\n", "reserved", 2, 4),
    ("def osrjit_f(n):\n    pass\n", "reserved", 1, 0),
    ("def f(osrjit):\n    pass\n", "reserved", 1, 6),
    ("def f(n):\n    global g\n", "global", 2, 4),
    ("def f(n):\n    return n / 2\n", "use '//'", 2, 11),
    ("def f(n):\n    return n ** 2\n", "Pow", 2, 11),
    ("def f(n):\n    return n << 2\n", "LShift", 2, 11),
    ("def f(n):\n    return ~n\n", "Invert", 2, 11),
    ("def f(n):\n    return n is n\n", "Is", 2, 11),
    ("def f(n):\n    return [n]\n", "List", 2, 11),
    ("def f(n):\n    return n.x\n", "Attribute", 2, 11),
    ("def f(n):\n    return 9223372036854775808\n", "does not fit", 2, 11),
    ("def f(n):\n    return -9223372036854775809\n", "does not fit", 2, 12),
    ("def f(n=1):\n    pass\n", "positional", 1, 0),
    ("def f(*n):\n    pass\n", "positional", 1, 0),
    ("def f(n: int):\n    pass\n", "annotations", 1, 6),
    ("def f(n) -> int:\n    pass\n", "annotations", 1, 12),
    ("def f(n):\n    hook = 1\n", "shadow the builtin", 2, 4),
    ("def hook(n):\n    pass\n", "shadow the builtin", 1, 0),
    ("def f(n):\n    return f\n", "used as a value", 2, 11),
    ("def f(n):\n    return n(1)\n", "local variable, not a function", 2, 11),
    ("def f(n):\n    break\n", "outside a loop", 2, 4),
    ("def f(n):\n    while n:\n        pass\n    else:\n        pass\n", "while ... else", 2, 4),
    ("@d\ndef f(n):\n    pass\n", "decorators", 1, 1),
    ("def f(n):\n    n.x = 1\n", "plain names", 2, 4),
    ("def f(n):\n    a, b = n, n\n", "plain names", 2, 4),
    ("def f(n):\n    pass\ndef f(n):\n    pass\n", "defined twice", 3, 0),
    ("def f__resume(n):\n    pass\n", "reserved", 1, 0),
    ("def f(n):\n    return (n := 1)\n", "NamedExpr", 2, 12),
    ("async def f(n):\n    pass\n", "async", 1, 0),
    ("def f(n):\n    return n +\n", "syntax error", 2, 14),
])
def test_compile_errors_name_the_construct_and_its_location(source, fragment, line, col):
    with pytest.raises(CompileError) as info:
        compile_source(source)
    err = info.value
    assert fragment in str(err)
    assert (err.line, err.col) == (line, col)
    assert str(err).startswith(f"line {line}, column {col}: ")


def test_known_functions_are_callable_with_their_arity_only():
    [fir] = compile_source("def f(a):\n    return h(a, 1)\n", known={"h": 2})
    assert fir.callees == frozenset({"h"})
    with pytest.raises(CompileError, match="takes 2 arguments, 1 given"):
        compile_source("def f(a):\n    return h(a)\n", known={"h": 2})
    with pytest.raises(ValueError):
        compile_source("def f(a):\n    return 0\n", known={"osrjit_h": 1})


def test_a_new_version_in_source_overrides_the_known_arity():
    [fir] = compile_source("def h(a):\n    return h(a)\n", known={"h": 2})
    assert fir.sites[site_id("h:call:h:0")].callee == "h"


# -- site keys and ids -----------------------------------------------------------------


def test_site_id_is_the_documented_hash_of_the_key():
    key = site_key("fib", SiteKind.CALL, "fib", 1)
    assert key == "fib:call:fib:1" == site_key("fib", "call", "fib", 1)
    digest = hashlib.blake2b(b"fib:call:fib:1").digest()
    assert site_id(key) == int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)
    assert 0 < site_id(key) < 2 ** 63
    assert temporary_name(key) == "call:fib:1"


def test_fib_sites_keys_and_temporaries():
    [fn] = lower_source(FIB)
    assert [s.key for s in fn.sites] == ["fib:poll:entry:0", "fib:call:fib:0", "fib:call:fib:1"]
    assert [s.result for s in fn.sites] == [None, "call:fib:0", "call:fib:1"]
    [fir] = compile_source(FIB)
    assert set(fir.sites) == {site_id(s.key) for s in fn.sites}


V1 = """
def f(x):
    a = g(x)
    b = h(x)
    c = g(a)
    while c > 0:
        c -= 1
    return a + b + c + hook(c)
"""
V2_ARGUMENTS_EDITED = """
def f(x):
    a = g(x + 1)
    if x:
        x = 3
    b = h(x * 2)
    c = g(a - b)
    while c > 0:
        c -= 2
    return a + b + c + hook(c) - 1
"""
V3_CALL_TO_G_ADDED = """
def f(x):
    z = g(0)
    a = g(x)
    b = h(x)
    c = g(a)
    while c > 0:
        c -= 1
    return a + b + c + hook(c) + z
"""


def _ids(source):
    [fir] = compile_source(source, known={"g": 1, "h": 1})
    return fir.sites


def test_site_ids_survive_edits_that_do_not_add_or_remove_sites():
    assert set(_ids(V1)) == set(_ids(V2_ARGUMENTS_EDITED))


def test_adding_a_call_shifts_only_later_calls_to_the_same_callee():
    v1, v3 = _ids(V1), _ids(V3_CALL_TO_G_ADDED)
    for key in ("f:poll:entry:0", "f:call:h:0", "f:hook:hook:0", "f:poll:loop:0"):
        assert site_id(key) in v1 and site_id(key) in v3
    assert site_id("f:call:g:2") in v3 and site_id("f:call:g:2") not in v1
    # `c = g(a)` was g:1 and is now g:2; `a = g(x)` was g:0 and is now g:1.
    assert v1[site_id("f:call:g:1")].line + 1 == v3[site_id("f:call:g:2")].line


# -- live sets and A-normal form ----------------------------------------------------------


def _live(source, **kw):
    fns = lower_source(source, **kw)
    return {k: v for fn in fns for k, v in fn.live.items()}


def test_fib_live_sets():
    live = _live(FIB)
    assert live["fib:poll:entry:0"] == ("n",)
    assert live["fib:call:fib:0"] == ("n",)            # n is needed for the 2nd call
    assert live["fib:call:fib:1"] == ("call:fib:0",)   # only the 1st result
    [fir] = compile_source(FIB)
    assert [lv.name for lv in fir.sites[site_id("fib:call:fib:1")].live] == ["call:fib:0"]
    assert all(lv.type == "i64" for s in fir.sites.values() for lv in s.live)


def test_loop_liveness_reaches_a_fixpoint():
    source = """
def f(n):
    a = 0
    b = 0
    c = 0
    i = 0
    while i < n:
        x = hook(i)
        c = b
        b = a
        a = x
        i += 1
    return c
"""
    live = _live(source)
    # c is dead after the hook (overwritten before use), a and b are not: b
    # flows into c on the next iteration, which the fixpoint must discover.
    assert live["f:hook:hook:0"] == ("a", "b", "i", "n")
    assert live["f:poll:loop:0"] == ("a", "b", "c", "i", "n")
    assert live["f:poll:entry:0"] == ("n",)


def test_break_and_continue_liveness():
    source = """
def f(n, k):
    r = 0
    while n:
        n -= 1
        safepoint()
        if n == k:
            break
        if n > 100:
            continue
        r = hook(r)
    return r + k
"""
    live = _live(source)
    assert live["f:poll:safepoint:0"] == ("k", "n", "r")
    assert live["f:poll:loop:0"] == ("k", "n", "r")
    assert live["f:hook:hook:0"] == ("k", "n")  # its result becomes r, via the temporary


def test_calls_are_hoisted_in_evaluation_order():
    source = "def f(x, y):\n    return f(g(x), h(y)) + g(h(x) * 2) - hook(y)\n"
    [fn] = lower_source(source, known={"g": 1, "h": 1}, polls=False)
    assert [s.key for s in fn.sites] == [
        "f:call:g:0", "f:call:h:0", "f:call:f:0", "f:call:h:1", "f:call:g:1", "f:hook:hook:0"]
    live = fn.live
    assert live["f:call:g:0"] == ("x", "y")          # x: h(x) comes later
    assert live["f:call:h:0"] == ("call:g:0", "x", "y")
    assert live["f:call:f:0"] == ("x", "y")
    assert live["f:call:h:1"] == ("call:f:0", "y")   # x is dead now
    assert live["f:call:g:1"] == ("call:f:0", "y")
    assert live["f:hook:hook:0"] == ("call:f:0", "call:g:1")
    [fir] = compile_source(source, known={"g": 1, "h": 1}, polls=False)
    assert _statepoint_ids(_entry_ir(fir)) == [s.id for s in fn.sites]


def test_short_circuit_with_calls_keeps_its_control_flow():
    [fn] = lower_source("def f(a):\n    return a and hook(a)\n", polls=False)
    assign, branch, ret = fn.body
    assert assign == Assign("and:hook:hook:0", Var("a"))
    assert isinstance(branch, If) and branch.test == Var("and:hook:hook:0")
    assert isinstance(branch.body[0], Site) and branch.orelse == ()
    assert ret == Return(Var("and:hook:hook:0"))


def test_pure_short_circuit_needs_no_temporary():
    [fn] = lower_source("def f(a, b):\n    return a or b // a\n", polls=False)
    assert fn.body == (Return(BoolOp("or", (Var("a"), Bin("//", Var("b"), Var("a"))))),)
    assert fn.variables == ("a", "b")


def test_nested_short_circuit_temporaries_have_distinct_stable_names():
    [fn] = lower_source("def f(a):\n    return a and (a or hook(a))\n", polls=False)
    assert set(fn.variables) == {"a", "hook:hook:0", "or:hook:hook:0", "and:hook:hook:0"}


def test_chained_comparison_with_calls_stops_early():
    [fn] = lower_source("def f(a):\n    return 0 < hook(a) < hook(a + 1)\n", polls=False)
    first, assign, branch, ret = fn.body
    assert first.key == "f:hook:hook:0"
    assert assign == Assign("cmp:hook:hook:1", Cmp("<", Const(0), Var("hook:hook:0")))
    assert branch.body[0].key == "f:hook:hook:1"


def test_a_function_falling_off_its_end_returns_zero_and_dead_code_keeps_its_sites():
    [fn] = lower_source("def f(a):\n    return a\n    hook(a)\n", polls=False)
    assert [s.key for s in fn.sites] == ["f:hook:hook:0"]
    [fir] = compile_source("def f(a):\n    return a\n    hook(a)\n", polls=False)
    assert list(fir.sites) == [site_id("f:hook:hook:0")]
    llvm.parse_assembly(fir.module_ir).verify()


# -- end to end (child process) ------------------------------------------------------------


def _loader(source=CORPUS, **kw):
    from jit_loader import JitLoader
    return JitLoader(hook=hook_reference).load(*compile_source(source, **kw))


def scenario_corpus_agrees_with_cpython_and_the_interpreter(polls):
    jit = _loader(polls=polls)
    interp = AnfInterpreter(lower_source(CORPUS, polls=polls))
    checked = 0
    for name, runs in CORPUS_RUNS:
        for args in runs:
            expected = run_python(CORPUS, name, args)
            assert interp.call(name, args) == expected, (name, args)
            assert jit.call(name, *args) == expected, (name, args)
            checked += 1
    assert jit.hook_calls  # hooks really round-tripped through the service
    return checked


@pytest.mark.parametrize("polls", [True, False])
def test_corpus_runs_like_cpython(polls):
    assert run_child(scenario_corpus_agrees_with_cpython_and_the_interpreter, polls) > 90


def scenario_resume_at_every_recorded_site(seed):
    """Run each corpus call in the interpreter, then resume the JIT at (a
    sample of) every site it passed, with the live values and result it
    recorded: the resumed frame must return what the frame returned."""
    jit = _loader()
    interp = AnfInterpreter(lower_source(CORPUS))
    for name, runs in CORPUS_RUNS:
        for args in runs:
            interp.call(name, args)
    assert interp.errors == 0
    rng = random.Random(seed)
    records = interp.records
    sample = records if len(records) <= 1500 else rng.sample(records, 1500)
    kinds = set()
    for fname, ident, live, result, returned in sample:
        kinds.add(jit.versions[fname][0].sites[ident].kind)
        assert jit.resume(fname, ident, live, result) == returned, (fname, ident, live, result)
    return sorted(k.value for k in kinds), len(sample)


def test_resuming_at_every_kind_of_site_continues_the_frame():
    kinds, n = run_child(scenario_resume_at_every_recorded_site, 1)
    assert kinds == ["call", "hook", "poll"] and n > 500


def scenario_fib_and_ackermann():
    jit = _loader()
    return [jit.call("fib", n) for n in range(21)], jit.call("ack", 2, 3), jit.call("ack", 3, 3)


def test_fib_and_ackermann():
    fibs, ack23, ack33 = run_child(scenario_fib_and_ackermann)
    assert fibs[:8] == [0, 1, 1, 2, 3, 5, 8, 13] and fibs[20] == 6765
    assert (ack23, ack33) == (9, 61)


def scenario_mutual_recursion_through_slots():
    jit = _loader("def is_even(n):\n    if n == 0:\n        return 1\n    return is_odd(n - 1)\n"
                  "def is_odd(n):\n    if n == 0:\n        return 0\n    return is_even(n - 1)\n")
    return [jit.call("is_even", n) for n in range(10)], jit.call("is_odd", 1001)


def test_mutual_recursion_across_two_functions():
    evens, odd = run_child(scenario_mutual_recursion_through_slots)
    assert evens == [1, 0] * 5 and odd == 1


def scenario_separately_compiled_known_function():
    from jit_loader import JitLoader
    jit = JitLoader()
    jit.load(*compile_source("def twice(x):\n    return 2 * x\n"))
    jit.load(*compile_source("def f(a):\n    return twice(a) + 1\n", known={"twice": 1}))
    before = jit.call("f", 20)
    jit.load(*compile_source("def twice(x):\n    return 3 * x\n"))  # a new version
    return before, jit.call("f", 20)


def test_calls_to_known_functions_follow_their_slot():
    assert run_child(scenario_separately_compiled_known_function) == (41, 61)


NESTED_LOOPS = """
def grid(n, m):
    total = 0
    i = 0
    while i < n:
        j = 0
        while j < m:
            safepoint()
            total += i * m + j
            j += 1
        i += 1
    return total
"""


def scenario_nested_loops_with_the_flag_set(polls):
    from jit_loader import JitLoader
    jit = JitLoader(on_slow=lambda: None)  # the flag stays set: every poll is slow
    jit.load(*compile_source(NESTED_LOOPS, polls=polls))
    quiet = jit.call("grid", 4, 5)
    slow_before = jit.slow_calls
    jit.flag.value = 1
    loud = jit.call("grid", 4, 5)
    return quiet, slow_before, loud, jit.slow_calls


@pytest.mark.parametrize("polls, expected_slow", [(True, 1 + 4 + 2 * 4 * 5), (False, 4 * 5)])
def test_nested_loops_take_the_slow_path_when_the_flag_is_set(polls, expected_slow):
    quiet, slow_before, loud, slow = run_child(scenario_nested_loops_with_the_flag_set, polls)
    assert quiet == loud == sum(range(20))
    assert slow_before == 0
    assert slow == expected_slow  # entry + outer and inner back-edges + safepoint()s


def scenario_hooks_round_trip():
    from jit_loader import JitLoader
    jit = JitLoader(hook=lambda x: -x if x % 2 else x * x)
    jit.load(*compile_source("def f(a):\n    return hook(a) + hook(a + 1) * hook(hook(3))\n"))
    return jit.call("f", 4), jit.hook_calls


def test_hooks_round_trip_in_evaluation_order():
    value, calls = run_child(scenario_hooks_round_trip)
    assert value == 16 + (-5) * 3 and calls == [4, 5, 3, -3]


def _floor_pairs():
    rng = random.Random(7)
    edges = [0, 1, -1, 2, -2, 3, -3, 7, -7, INT64_MAX, INT64_MIN, INT64_MAX - 1, INT64_MIN + 1]
    pairs = [(a, b) for a in edges for b in edges]
    pairs += [(rng.randint(-1000, 1000), rng.randint(-50, 50)) for _ in range(1000)]
    pairs += [(rng.randint(INT64_MIN, INT64_MAX), rng.randint(INT64_MIN, INT64_MAX)) for _ in range(300)]
    return pairs


def scenario_floor_division(pairs):
    jit = _loader("def fd(a, b):\n    return a // b\ndef md(a, b):\n    return a % b\n"
                  "def after(a):\n    x = a // 0\n    return x + 5\n")
    out = []
    for a, b in pairs:
        row = []
        for name in ("fd", "md"):
            try:
                row.append(jit.call(name, a, b))
            except ZeroDivisionError:
                row.append("ZeroDivisionError")
        out.append(tuple(row))
    try:
        jit.call("after", 3)
        after = "no error"
    except ZeroDivisionError:
        after = jit.last_value
    return out, after


def test_floor_division_and_modulo_follow_python_and_wrap():
    pairs = _floor_pairs()
    results, after = run_child(scenario_floor_division, pairs)
    for (a, b), got in zip(pairs, results):
        if b == 0:
            expected = ("ZeroDivisionError", "ZeroDivisionError")
        else:
            expected = (wrap(a // b), wrap(a % b))
        assert got == expected, (a, b)
    assert after == 5  # the code went on with 0; the error surfaced at return


def scenario_arithmetic_wraps():
    jit = _loader("def f(a, b):\n    return a + b\ndef g(a, b):\n    return a * b\n"
                  "def h(a):\n    return -a\n")
    return (jit.call("f", INT64_MAX, 1), jit.call("g", 2 ** 62, 4), jit.call("h", INT64_MIN))


def test_int64_arithmetic_wraps():
    assert run_child(scenario_arithmetic_wraps) == (INT64_MIN, 0, INT64_MIN)


def scenario_hand_built_resumes():
    """One hand-built state per kind of site, checked against hand-computed answers."""
    jit = _loader("""
def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)

def h(x):
    y = hook(x) + 1
    return y * x

def sp(a):
    b = a * 2
    safepoint()
    return a + b

def total(n):
    i = 0
    acc = 0
    while i < n:
        acc += i
        i += 1
    return acc
""")
    hooks_before = len(jit.hook_calls)
    out = {
        # after fib(n-1) returned 34 with n = 10: 34 + fib(8)
        "call0": jit.resume("fib", site_id("fib:call:fib:0"), {"n": 10}, result=34),
        # after fib(n-2) returned 21 with the first result 34 live
        "call1": jit.resume("fib", site_id("fib:call:fib:1"), {"call:fib:0": 34}, result=21),
        # the hook "returned" 100 for x = 3: (100 + 1) * 3
        "hook": jit.resume("h", site_id("h:hook:hook:0"), {"x": 3}, result=100),
        # after safepoint() with a = 1 and b forged to 100
        "safepoint": jit.resume("sp", site_id("sp:poll:safepoint:0"), {"a": 1, "b": 100}),
        # at the back-edge with acc = 1000, i = 7, n = 10: 1000 + 7 + 8 + 9
        "loop": jit.resume("total", site_id("total:poll:loop:0"), {"acc": 1000, "i": 7, "n": 10}),
        # at the entry poll
        "entry": jit.resume("total", site_id("total:poll:entry:0"), {"n": 5}),
    }
    out["hooks_during_resume"] = len(jit.hook_calls) - hooks_before
    return out


def test_hand_built_resumes_for_each_kind_of_site():
    out = run_child(scenario_hand_built_resumes)
    assert out == {"call0": 34 + 21, "call1": 55, "hook": 303, "safepoint": 101,
                   "loop": 1024, "entry": 10, "hooks_during_resume": 0}


def scenario_unknown_site_traps():
    jit = _loader(FIB)
    import ctypes
    _, _, resume = jit.versions["fib"]
    fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(resume)
    state = (ctypes.c_int64 * 4)()
    fn(12345, ctypes.addressof(state))


def test_resuming_at_an_unknown_site_traps():
    from childproc import ChildCrashed
    with pytest.raises(ChildCrashed, match="SIGILL|SIGTRAP"):
        run_child(scenario_unknown_site_traps)


# -- random programs: lowering vs CPython (in process), JIT vs CPython (child) ---------


def _random_expr(rng, depth, names, calls):
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(names + [str(rng.randint(-9, 9))])
    kind = rng.randrange(9)
    sub = lambda: _random_expr(rng, depth - 1, names, calls)  # noqa: E731
    if kind <= 2:
        return f"({sub()} {rng.choice(['+', '-', '*', '//', '%'])} {sub()})"
    if kind == 3:
        return f"({sub()} {rng.choice(['and', 'or'])} {sub()})"
    if kind == 4:
        ops = [rng.choice(["<", "<=", "==", "!=", ">", ">="]) for _ in range(rng.randint(1, 3))]
        return "(" + sub() + "".join(f" {op} {sub()}" for op in ops) + ")"
    if kind == 5:
        return f"({sub()} if {sub()} else {sub()})"
    if kind == 6:
        return f"(not {sub()})" if rng.random() < 0.5 else f"(-{sub()})"
    if kind == 7 and calls:
        return f"hook({sub()})"
    return f"leaf({sub()}, {sub()})"


def _random_program(seed):
    rng = random.Random(seed)
    body = ["    r = 0"]
    for k in range(4):
        body.append(f"    r = r + {_random_expr(rng, 4, ['a', 'b', 'r'], True)}")
    return ("def leaf(x, y):\n    return x * 3 - y\n"
            f"def prog(a, b):\n" + "\n".join(body) + "\n    return r\n")


def _python_or_error(source, args):
    try:
        return wrap(run_python(source, "prog", args))
    except ZeroDivisionError:
        return "ZeroDivisionError"


PROGRAM_SEEDS = range(40)
PROGRAM_ARGS = [(0, 0), (3, -2), (-7, 5), (11, 4)]


def test_random_programs_lower_to_the_meaning_cpython_gives():
    for seed in PROGRAM_SEEDS:
        source = _random_program(seed)
        for args in PROGRAM_ARGS:
            expected = _python_or_error(source, args)
            interp = AnfInterpreter(lower_source(source))
            got = interp.call("prog", args)
            if expected == "ZeroDivisionError":
                assert interp.errors, (source, args)
            else:
                assert (interp.errors, got) == (0, expected), (source, args)


def scenario_random_programs(seeds, arg_list):
    out = []
    for seed in seeds:
        jit = _loader(_random_program(seed))
        row = []
        for args in arg_list:
            try:
                row.append(wrap(jit.call("prog", *args)))
            except ZeroDivisionError:
                row.append("ZeroDivisionError")
        out.append(row)
    return out


def test_random_programs_run_like_cpython():
    results = run_child(scenario_random_programs, list(PROGRAM_SEEDS), PROGRAM_ARGS)
    for seed, row in zip(PROGRAM_SEEDS, results):
        source = _random_program(seed)
        assert row == [_python_or_error(source, args) for args in PROGRAM_ARGS], source
