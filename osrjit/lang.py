"""The reference frontend: a small Python subset compiled to versioned LLVM IR.

:func:`compile_source` turns source text into one :class:`osrjit.abi.FunctionIR`
per function, each with its frame-map sites and resume entry (built with
:mod:`osrjit.ir`).

The language
    Module-level ``def`` functions with positional ``int64`` parameters; every
    value is an ``int64``. Statements: ``x = e`` (also ``a = b = e``),
    ``x op= e`` for the operators below, expression statements, ``if``/``elif``/
    ``else``, ``while`` (with ``break``/``continue``), ``return [e]``, ``pass``.
    Expressions: integer literals (``True``/``False`` are 1/0), locals and
    parameters, ``+ - * // %``, unary ``- +``, ``not``, comparisons
    ``== != < <= > >=`` (chains like ``a < b < c`` included; the result is 0 or
    1), ``and``/``or`` with Python semantics on ints (``a and b`` is ``a`` if
    ``a == 0`` else ``b``; ``a or b`` is ``a`` if ``a != 0`` else ``b``; the
    right operand is evaluated only when needed), ``b if c else d``, and calls
    with positional arguments to functions in ``source`` (any of them,
    recursion and mutual recursion included) or already in the runtime
    (``known``). Builtins: ``safepoint()`` (an explicit safepoint poll; value 0)
    and ``hook(x)`` (calls the runtime's hook service, value its int result).

    Semantics that differ from Python
        * Arithmetic wraps modulo 2**64 (two's complement ``int64``):
          ``9223372036854775807 + 1 == -9223372036854775808`` and
          ``-9223372036854775808 // -1 == -9223372036854775808``. Literals must
          fit in ``int64``.
        * ``//`` and ``%`` floor like Python. By zero they call
          ``@osrjit_error(ErrorCode.ZERO_DIVISION)`` and evaluate to 0; the
          function goes on, and the runtime raises :class:`ZeroDivisionError`
          when the outermost JIT call returns (hooks called in between still run).
        * A local read before any assignment reads 0; a function that falls
          off its end returns 0.
    Anything else (floats, ``/``, strings, globals, nested or decorated defs,
    ``for``, keyword or starred arguments, wrong arity, unknown names, names
    starting with ``osrjit``, binding ``hook``/``safepoint``) raises
    :class:`osrjit.errors.CompileError` with the line (1-based) and column
    (0-based) of the offending node.

Sites (frame maps)
    Every call, every ``hook(x)``, every ``safepoint()`` is a site, and when
    ``polls=True`` so are a poll at function entry and a poll on every loop
    back-edge (also reached by ``continue``). Calls nested in expressions are
    hoisted, in evaluation order, into *result temporaries* (A-normal form), so
    a value that is live across a site is always a named variable; ``and``,
    ``or``, ``if``-expressions and chained comparisons that contain calls keep
    their short-circuit control flow (their value goes through a temporary
    too). A site's :attr:`~osrjit.abi.SiteInfo.live` lists the variables live
    *after* it (backward liveness with a fixpoint for loops), minus its own
    result, sorted by name; every ``LiveValue`` is ``i64``.

Site keys and ids (stable across edits)
    A site's key is ``"<function>:<kind>:<name>:<k>"``: ``kind`` is ``call``
    (``name`` = callee), ``hook`` (``name`` = ``hook``) or ``poll`` (``name`` =
    ``entry``, ``loop`` or ``safepoint``); ``k`` (from 0) counts the sites with
    the same kind and name before it in the function, in evaluation order
    (loops in the order of their ``while``). Its id is the first 8 bytes of
    ``blake2b(key)`` (default 64-byte digest), little-endian, masked to 63 bits,
    with 0 replaced by 1 (:func:`site_id`). So an edit keeps the ids of
    every site whose (kind, name) sequence before it is unchanged: adding or
    removing a call to ``g`` shifts the ordinals (and ids) of the *later* calls
    to ``g`` only; calls to other functions, hooks and polls keep theirs.
    Editing arguments or surrounding code changes no id. The result temporary
    of a site is named after its key without the function, e.g. ``call:fib:0``
    (``and:call:g:0``-style names hold short-circuit values), so it cannot
    clash with a Python identifier and keeps its name when its site does.

Worked example::

    def fib(n):
        if n < 2:
            return n
        return fib(n - 1) + fib(n - 2)

    sites (polls=True):  fib:poll:entry:0   live (n)
                         fib:call:fib:0     live (n)            result call:fib:0
                         fib:call:fib:1     live (call:fib:0)   result call:fib:1
"""
from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass, field
from typing import Mapping

from llvmlite import ir

from osrjit.abi import (CALL_MODES, CALLS_SLOT, RESUME_SUFFIX, ErrorCode, FunctionIR,
                        SiteKind)
from osrjit.errors import CompileError
from osrjit.ir import I64, BodyBuilder, VersionedFunction

__all__ = ["compile_source", "lower_source", "lower_function", "site_key", "site_id", "temporary_name",
           "INT64_MIN", "INT64_MAX", "BUILTINS"]

INT64_MIN = -2 ** 63
INT64_MAX = 2 ** 63 - 1
#: Builtin functions of the language: name -> arity.
BUILTINS = {"safepoint": 0, "hook": 1}
_RESERVED_PREFIX = "osrjit"
#: Weights (error, fine) of the division-by-zero branch.
_ERROR_BRANCH_WEIGHTS = (1, 2000)


# -- site keys -------------------------------------------------------------------


def site_key(function: str, kind: SiteKind | str, name: str, ordinal: int) -> str:
    """``"<function>:<kind>:<name>:<ordinal>"``, e.g. ``site_key("fib", "call", "fib", 1)``."""
    kind = kind.value if isinstance(kind, SiteKind) else kind
    return f"{function}:{kind}:{name}:{ordinal}"


def site_id(key: str) -> int:
    """The stable 63-bit, nonzero site id of ``key`` (see the module docstring)."""
    digest = hashlib.blake2b(key.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)) or 1


def temporary_name(key: str) -> str:
    """Name of the result temporary of site ``key``: the key without its function."""
    return key.split(":", 1)[1]


# -- the lowered (A-normal) form -------------------------------------------------
# Pure expressions contain no sites; they may still branch (short-circuit,
# division by zero), which codegen handles without variables.


@dataclass(frozen=True)
class Const:
    value: int


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Bin:
    op: str  # "+", "-", "*", "//", "%"
    left: object
    right: object


@dataclass(frozen=True)
class Neg:
    operand: object


@dataclass(frozen=True)
class Not:
    operand: object


@dataclass(frozen=True)
class Cmp:
    op: str  # "==", "!=", "<", "<=", ">", ">="
    left: object
    right: object


@dataclass(frozen=True)
class Chain:
    """``operands[0] ops[0] operands[1] ops[1] ...`` with short-circuit."""
    operands: tuple
    ops: tuple


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    values: tuple


@dataclass(frozen=True)
class Cond:
    test: object
    body: object
    orelse: object


@dataclass(frozen=True)
class Assign:
    target: str
    value: object


@dataclass(frozen=True)
class Eval:
    value: object


@dataclass(frozen=True)
class Site:
    key: str
    id: int
    kind: SiteKind
    callee: str | None      # call: function name; hook/poll: None
    args: tuple = ()        # pure expressions
    result: str | None = None
    line: int | None = None
    col: int | None = None


@dataclass(frozen=True)
class If:
    test: object
    body: tuple
    orelse: tuple


@dataclass(frozen=True)
class While:
    header: tuple           # statements re-run before each test
    test: object
    body: tuple
    latch: Site | None      # back-edge poll


@dataclass(frozen=True)
class Return:
    value: object


@dataclass(frozen=True)
class Break:
    pass


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class LoweredFunction:
    """One function in A-normal form, with the live set after each site."""
    name: str
    params: tuple[str, ...]
    variables: tuple[str, ...]     # params, locals, temporaries (declaration order)
    body: tuple
    sites: tuple[Site, ...]        # evaluation order
    live: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # key -> sorted names


# -- lowering: Python AST -> A-normal form -----------------------------------------

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%"}
_CMPOPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=",
           ast.Gt: ">", ast.GtE: ">="}


def _fail(message: str, node: ast.AST | None):
    raise CompileError(message, getattr(node, "lineno", None), getattr(node, "col_offset", None))


def _check_name(name: str, node: ast.AST, what: str) -> None:
    if name.startswith(_RESERVED_PREFIX):
        _fail(f"{what} {name!r}: names starting with {_RESERVED_PREFIX!r} are reserved", node)


def _first_site(stmts) -> Site | None:
    for s in stmts:
        if isinstance(s, Site):
            return s
        for inner in _children(s):
            found = _first_site(inner)
            if found is not None:
                return found
    return None


def _children(stmt) -> tuple:
    if isinstance(stmt, If):
        return (stmt.body, stmt.orelse)
    if isinstance(stmt, While):
        return (stmt.header, stmt.body, (stmt.latch,) if stmt.latch else ())
    return ()


class _Lowering:
    """Lowers one ``def`` to :class:`LoweredFunction`."""

    def __init__(self, fn: ast.FunctionDef, signatures: Mapping[str, int], polls: bool):
        self.fn = fn
        self.name = fn.name
        self.signatures = signatures
        self.polls = polls
        self.params = self._params(fn)
        self.variables: list[str] = list(self.params)
        self.locals = set(self.params) | self._assigned_names(fn.body)
        for name in sorted(self.locals - set(self.params)):
            self.variables.append(name)
        self.sites: list[Site] = []
        self._ordinals: dict[tuple[str, str], int] = {}
        self._loop_depth = 0

    # -- function level --

    def lower(self) -> LoweredFunction:
        body = []
        if self.polls:
            body.append(self._site(SiteKind.POLL, "entry", None, (), self.fn))
        body += self._block(self.fn.body)
        return LoweredFunction(self.name, self.params, tuple(self.variables),
                               tuple(body), tuple(self.sites))

    def _params(self, fn: ast.FunctionDef) -> tuple[str, ...]:
        a = fn.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.kw_defaults:
            _fail(f"{fn.name}: only plain positional parameters are supported", fn)
        names = []
        for arg in [*a.posonlyargs, *a.args]:
            if arg.annotation is not None:
                _fail(f"{fn.name}: parameter annotations are not supported", arg)
            self._check_binding(arg.arg, arg, "parameter")
            names.append(arg.arg)
        return tuple(names)

    def _check_binding(self, name: str, node: ast.AST, what: str) -> None:
        _check_name(name, node, what)
        if name in BUILTINS:
            _fail(f"{what} {name!r} would shadow the builtin {name}()", node)

    def _assigned_names(self, stmts) -> set[str]:
        found = set()
        for stmt in stmts:
            for node in ast.walk(stmt):
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, ast.AugAssign):
                    targets = [node.target]
                else:
                    continue
                for t in targets:
                    if isinstance(t, ast.Name):
                        self._check_binding(t.id, t, "variable")
                        found.add(t.id)
        return found

    # -- sites and temporaries --

    def _site(self, kind: SiteKind, name: str, callee: str | None, args: tuple,
              node: ast.AST, result: bool = False) -> Site:
        k = self._ordinals.get((kind.value, name), 0)
        self._ordinals[(kind.value, name)] = k + 1
        key = site_key(self.name, kind, name, k)
        ident = site_id(key)
        for other in self.sites:
            if other.id == ident:
                _fail(f"site ids of {other.key} and {key} collide", node)
        temp = None
        if result:
            temp = temporary_name(key)
            self.variables.append(temp)
        site = Site(key, ident, kind, callee, args, temp,
                    getattr(node, "lineno", None), getattr(node, "col_offset", None))
        self.sites.append(site)
        return site

    def _temporary(self, prefix: str, stmts, node: ast.AST) -> str:
        """A temporary for a short-circuit value, named after the first site in
        ``stmts`` (its conditional part): ``<prefix>:<site temp name>[#n]``."""
        anchor = _first_site(stmts)
        base = f"{prefix}:{temporary_name(anchor.key)}"
        name, n = base, 1
        while name in self.variables:
            n += 1
            name = f"{base}#{n}"
        self.variables.append(name)
        return name

    # -- statements --

    def _block(self, stmts) -> list:
        out = []
        for stmt in stmts:
            out += self._stmt(stmt)
        return out

    def _stmt(self, node: ast.stmt) -> list:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if not isinstance(t, ast.Name):
                    _fail("only assignments to plain names are supported", t)
            pre, value = self._expr(node.value)
            first = node.targets[0].id
            return pre + [Assign(first, value)] + [Assign(t.id, Var(first))
                                                   for t in node.targets[1:]]
        if isinstance(node, ast.AugAssign):
            if not isinstance(node.target, ast.Name):
                _fail("only assignments to plain names are supported", node.target)
            op = self._binop(node.op, node)
            pre, value = self._expr(node.value)
            x = node.target.id
            return pre + [Assign(x, Bin(op, Var(x), value))]
        if isinstance(node, ast.Expr):
            pre, value = self._expr(node.value)
            return pre + ([] if isinstance(value, (Var, Const)) else [Eval(value)])
        if isinstance(node, ast.If):
            pre, test = self._expr(node.test)
            return pre + [If(test, tuple(self._block(node.body)),
                             tuple(self._block(node.orelse)))]
        if isinstance(node, ast.While):
            if node.orelse:
                _fail("while ... else is not supported", node)
            latch = None
            if self.polls:  # numbered at the `while`, so outer loops come first
                latch = self._site(SiteKind.POLL, "loop", None, (), node)
            pre, test = self._expr(node.test)
            self._loop_depth += 1
            body = self._block(node.body)
            self._loop_depth -= 1
            return [While(tuple(pre), test, tuple(body), latch)]
        if isinstance(node, ast.Return):
            if node.value is None:
                return [Return(Const(0))]
            pre, value = self._expr(node.value)
            return pre + [Return(value)]
        if isinstance(node, ast.Pass):
            return []
        if isinstance(node, (ast.Break, ast.Continue)):
            if not self._loop_depth:
                _fail(f"'{type(node).__name__.lower()}' outside a loop", node)
            return [Break() if isinstance(node, ast.Break) else Continue()]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            _fail("nested definitions are not supported", node)
        if isinstance(node, (ast.For, ast.AsyncFor)):
            _fail("for loops are not supported; use while", node)
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            _fail("global variables are not supported", node)
        if isinstance(node, ast.AnnAssign):
            _fail("annotated assignments are not supported", node)
        _fail(f"{type(node).__name__} statements are not supported", node)

    # -- expressions: (statements that must run first, pure expression) --

    def _binop(self, op: ast.operator, node) -> str:
        try:
            return _BINOPS[type(op)]
        except KeyError:
            if isinstance(op, ast.Div):
                _fail("'/' produces floats, which are not supported; use '//'", node)
            _fail(f"operator {type(op).__name__} is not supported", node)

    def _expr(self, node: ast.expr) -> tuple[list, object]:
        if isinstance(node, ast.Constant):
            return [], Const(self._literal(node, node.value))
        if isinstance(node, ast.Name):
            return [], self._name(node)
        if isinstance(node, ast.BinOp):
            op = self._binop(node.op, node)
            pre_l, left = self._expr(node.left)
            pre_r, right = self._expr(node.right)
            return pre_l + pre_r, Bin(op, left, right)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
                    and type(node.operand.value) is int and node.operand.value == 2 ** 63:
                return [], Const(INT64_MIN)  # the literal -9223372036854775808
            pre, operand = self._expr(node.operand)
            if isinstance(node.op, ast.USub):
                return pre, Neg(operand)
            if isinstance(node.op, ast.UAdd):
                return pre, operand
            if isinstance(node.op, ast.Not):
                return pre, Not(operand)
            _fail(f"operator {type(node.op).__name__} is not supported", node)
        if isinstance(node, ast.Compare):
            return self._compare(node)
        if isinstance(node, ast.BoolOp):
            return self._boolop(node)
        if isinstance(node, ast.IfExp):
            return self._ifexp(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        _fail(f"{type(node).__name__} expressions are not supported", node)

    def _literal(self, node, value) -> int:
        if type(value) is bool:
            return int(value)
        if type(value) is not int:
            _fail(f"{type(value).__name__} literals are not supported (int64 only)", node)
        if not INT64_MIN <= value <= INT64_MAX:
            _fail(f"integer literal {value} does not fit in int64", node)
        return value

    def _name(self, node: ast.Name) -> Var:
        name = node.id
        _check_name(name, node, "name")
        if name in self.locals:
            return Var(name)
        if name in self.signatures or name in BUILTINS:
            _fail(f"function {name!r} used as a value", node)
        _fail(f"unknown name {name!r}", node)

    def _compare(self, node: ast.Compare):
        ops = []
        for op in node.ops:
            if type(op) not in _CMPOPS:
                _fail(f"comparison {type(op).__name__} is not supported", node)
            ops.append(_CMPOPS[type(op)])
        lowered = [self._expr(e) for e in [node.left, *node.comparators]]
        pres = [p for p, _ in lowered]
        vals = [v for _, v in lowered]
        if len(ops) == 1:
            return pres[0] + pres[1], Cmp(ops[0], vals[0], vals[1])
        if not any(pres[2:]):
            return pres[0] + pres[1], Chain(tuple(vals), tuple(ops))
        # Operand i+1 (i >= 1) is evaluated only if comparison i held.
        t = self._temporary("cmp", [s for p in pres[2:] for s in p], node)
        n = len(ops)
        block = pres[n] + [Assign(t, Cmp(ops[n - 1], vals[n - 1], vals[n]))]
        for i in range(n - 1, 0, -1):
            block = pres[i] + [Assign(t, Cmp(ops[i - 1], vals[i - 1], vals[i])),
                               If(Var(t), tuple(block), ())]
        return pres[0] + block, Var(t)

    def _boolop(self, node: ast.BoolOp):
        op = "and" if isinstance(node.op, ast.And) else "or"
        lowered = [self._expr(e) for e in node.values]
        pres = [p for p, _ in lowered]
        vals = [v for _, v in lowered]
        if not any(pres[1:]):
            return pres[0], BoolOp(op, tuple(vals))
        # t = v0; if <t decides>: ... else: t = v1; ...
        t = self._temporary(op, [s for p in pres[1:] for s in p], node)
        goes_on = Var(t) if op == "and" else Not(Var(t))
        block = pres[-1] + [Assign(t, vals[-1])]
        for i in range(len(vals) - 2, -1, -1):
            block = pres[i] + [Assign(t, vals[i]), If(goes_on, tuple(block), ())]
        return block, Var(t)

    def _ifexp(self, node: ast.IfExp):
        pre_t, test = self._expr(node.test)
        pre_a, body = self._expr(node.body)
        pre_b, orelse = self._expr(node.orelse)
        if not pre_a and not pre_b:
            return pre_t, Cond(test, body, orelse)
        t = self._temporary("if", pre_a + pre_b, node)
        return pre_t + [If(test, tuple(pre_a + [Assign(t, body)]),
                           tuple(pre_b + [Assign(t, orelse)]))], Var(t)

    def _call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name):
            _fail("only calls of functions by name are supported", node.func)
        name = node.func.id
        _check_name(name, node.func, "function")
        if node.keywords:
            _fail(f"{name}(): keyword arguments are not supported", node.keywords[0])
        for a in node.args:
            if isinstance(a, ast.Starred):
                _fail(f"{name}(): starred arguments are not supported", a)
        if name in self.locals:
            _fail(f"{name!r} is a local variable, not a function", node.func)
        arity = BUILTINS.get(name, self.signatures.get(name))
        if arity is None:
            _fail(f"unknown function {name!r}", node.func)
        if len(node.args) != arity:
            _fail(f"{name}() takes {arity} argument{'s' if arity != 1 else ''}, "
                  f"{len(node.args)} given", node)
        pre, args = [], []
        for a in node.args:  # arguments first, left to right
            p, v = self._expr(a)
            pre += p
            args.append(v)
        if name == "safepoint":
            return pre + [self._site(SiteKind.POLL, "safepoint", None, (), node)], Const(0)
        if name == "hook":
            site = self._site(SiteKind.HOOK, "hook", None, tuple(args), node, result=True)
        else:
            site = self._site(SiteKind.CALL, name, name, tuple(args), node, result=True)
        return pre + [site], Var(site.result)


# -- liveness ---------------------------------------------------------------------


def _uses(e) -> frozenset:
    if isinstance(e, Var):
        return frozenset((e.name,))
    if isinstance(e, Const):
        return frozenset()
    if isinstance(e, (Bin, Cmp)):
        return _uses(e.left) | _uses(e.right)
    if isinstance(e, (Neg, Not)):
        return _uses(e.operand)
    if isinstance(e, Chain):
        return frozenset().union(*map(_uses, e.operands))
    if isinstance(e, BoolOp):
        return frozenset().union(*map(_uses, e.values))
    if isinstance(e, Cond):
        return _uses(e.test) | _uses(e.body) | _uses(e.orelse)
    raise TypeError(e)


@dataclass(frozen=True)
class _LoopExits:
    on_break: frozenset      # live after the loop
    on_continue: frozenset   # live at the latch


class _Liveness:
    """Backward liveness over the structured A-normal form.

    ``live_after[key]`` = variables live right after site ``key`` returns,
    minus its result. Loops iterate to a fixpoint from the empty set; the
    sites' sets are those of the last (stable) iteration.
    """

    def __init__(self):
        self.live_after: dict[str, frozenset] = {}

    def block(self, stmts, out: frozenset, loop: _LoopExits | None) -> frozenset:
        live = out
        for s in reversed(stmts):
            live = self.stmt(s, live, loop)
        return live

    def stmt(self, s, out: frozenset, loop: _LoopExits | None) -> frozenset:
        if isinstance(s, Assign):
            return (out - {s.target}) | _uses(s.value)
        if isinstance(s, Eval):
            return out | _uses(s.value)
        if isinstance(s, Site):
            after = out - {s.result}
            self.live_after[s.key] = after
            return after.union(*map(_uses, s.args))
        if isinstance(s, If):
            return _uses(s.test) | self.block(s.body, out, loop) | self.block(s.orelse, out, loop)
        if isinstance(s, Return):
            return _uses(s.value)
        if isinstance(s, Break):
            return loop.on_break
        if isinstance(s, Continue):
            return loop.on_continue
        if isinstance(s, While):
            head = frozenset()
            while True:
                latch = self.stmt(s.latch, head, loop) if s.latch else head
                body = self.block(s.body, latch, _LoopExits(out, latch))
                new = self.block(s.header, _uses(s.test) | body | out, loop)
                if new == head:
                    return head
                head = new
        raise TypeError(s)


def lower_function(fn: ast.FunctionDef, signatures: Mapping[str, int], *,
                   polls: bool = True) -> LoweredFunction:
    """``fn`` in A-normal form with its sites' live sets (exposed for tests and tools)."""
    lowered = _Lowering(fn, signatures, polls).lower()
    liveness = _Liveness()
    liveness.block(lowered.body, frozenset(), None)
    live = {s.key: tuple(sorted(liveness.live_after.get(s.key, frozenset())))
            for s in lowered.sites}
    return LoweredFunction(lowered.name, lowered.params, lowered.variables,
                           lowered.body, lowered.sites, live)


# -- code generation -----------------------------------------------------------------


class _Emitter:
    """Emits a :class:`LoweredFunction` through a :class:`BodyBuilder` (once per mode)."""

    def __init__(self, fn: LoweredFunction, fb: BodyBuilder):
        self.fn = fn
        self.fb = fb
        self.b = fb.builder
        self.loops: list[tuple[ir.Block, ir.Block]] = []  # (exit, latch)

    def emit(self) -> None:
        for name in self.fn.variables[len(self.fn.params):]:
            self.fb.declare(name)
        self.block(self.fn.body)
        if not self.b.block.is_terminated:
            self.b.ret(I64(0))  # falling off the end returns 0

    def _new_block(self, name: str) -> ir.Block:
        return self.b.append_basic_block(name)

    def block(self, stmts) -> None:
        for s in stmts:
            if self.b.block.is_terminated:
                # Code after return/break/continue: still emitted (its sites stay
                # resumable), in a block without predecessors.
                self.b.position_at_end(self._new_block("dead"))
            self.stmt(s)

    def stmt(self, s) -> None:
        if isinstance(s, Assign):
            self.fb.store(s.target, self.expr(s.value))
        elif isinstance(s, Eval):
            self.expr(s.value)
        elif isinstance(s, Site):
            self.site(s)
        elif isinstance(s, If):
            self.if_(s)
        elif isinstance(s, While):
            self.while_(s)
        elif isinstance(s, Return):
            self.b.ret(self.expr(s.value))
        elif isinstance(s, Break):
            self.b.branch(self.loops[-1][0])
        elif isinstance(s, Continue):
            self.b.branch(self.loops[-1][1])
        else:
            raise TypeError(s)

    def site(self, s: Site) -> None:
        live = self.fn.live[s.key]
        if s.kind is SiteKind.POLL:
            self.fb.poll(s.id, live=live, line=s.line, col=s.col)
        elif s.kind is SiteKind.HOOK:
            [arg] = s.args
            self.fb.hook(s.id, self.expr(arg), live=live, result=s.result,
                         line=s.line, col=s.col)
        else:
            self.fb.call_function(s.id, s.callee, [self.expr(a) for a in s.args],
                                  live=live, result=s.result, line=s.line, col=s.col)

    def if_(self, s: If) -> None:
        then, orelse, join = (self._new_block("if.then"), self._new_block("if.else"),
                              self._new_block("if.end"))
        self.b.cbranch(self.truth(s.test), then, orelse)
        for target, stmts in ((then, s.body), (orelse, s.orelse)):
            self.b.position_at_end(target)
            self.block(stmts)
            if not self.b.block.is_terminated:
                self.b.branch(join)
        self.b.position_at_end(join)

    def while_(self, s: While) -> None:
        head, body, latch, exit_ = (self._new_block("while.head"), self._new_block("while.body"),
                                    self._new_block("while.latch"), self._new_block("while.exit"))
        self.b.branch(head)
        self.b.position_at_end(head)
        self.block(s.header)
        self.b.cbranch(self.truth(s.test), body, exit_)
        self.b.position_at_end(body)
        self.loops.append((exit_, latch))
        self.block(s.body)
        self.loops.pop()
        if not self.b.block.is_terminated:
            self.b.branch(latch)
        self.b.position_at_end(latch)
        if s.latch is not None:
            self.site(s.latch)
        self.b.branch(head)
        self.b.position_at_end(exit_)

    # -- pure expressions -> i64 values --

    def truth(self, e) -> ir.Value:
        return self.b.icmp_signed("!=", self.expr(e), I64(0))

    def expr(self, e) -> ir.Value:
        b = self.b
        if isinstance(e, Const):
            return I64(e.value)
        if isinstance(e, Var):
            return self.fb.load(e.name)
        if isinstance(e, Bin):
            left, right = self.expr(e.left), self.expr(e.right)
            if e.op == "+":
                return b.add(left, right)  # no nsw: int64 arithmetic wraps
            if e.op == "-":
                return b.sub(left, right)
            if e.op == "*":
                return b.mul(left, right)
            return self.floor_divmod(left, right, e.op)
        if isinstance(e, Neg):
            return b.sub(I64(0), self.expr(e.operand))
        if isinstance(e, Not):
            return b.zext(b.icmp_signed("==", self.expr(e.operand), I64(0)), I64)
        if isinstance(e, Cmp):
            return b.zext(b.icmp_signed(e.op, self.expr(e.left), self.expr(e.right)), I64)
        if isinstance(e, Chain):
            return self.chain(e)
        if isinstance(e, BoolOp):
            return self.boolop(e)
        if isinstance(e, Cond):
            return self.cond(e)
        raise TypeError(e)

    def floor_divmod(self, a: ir.Value, d: ir.Value, op: str) -> ir.Value:
        """Python ``a // d`` or ``a % d`` on int64, wrapping; by zero: report, yield 0.

        ``sdiv``/``srem`` truncate, so the quotient is lowered by one (and the
        remainder moved by ``d``) when the remainder is nonzero and its sign
        differs from ``d``'s. ``d == -1`` divides by 1 and negates instead,
        because ``INT64_MIN sdiv -1`` is undefined (x86 raises SIGFPE).
        """
        b = self.b
        zero, fine, join = (self._new_block("div.zero"), self._new_block("div.ok"),
                            self._new_block("div.end"))
        b.cbranch(b.icmp_signed("==", d, I64(0)), zero, fine).set_weights(_ERROR_BRANCH_WEIGHTS)
        b.position_at_end(zero)
        self.fb.report_error(ErrorCode.ZERO_DIVISION)
        b.branch(join)
        b.position_at_end(fine)
        minus_one = b.icmp_signed("==", d, I64(-1))
        safe_d = b.select(minus_one, I64(1), d)
        q = b.select(minus_one, b.sub(I64(0), a), b.sdiv(a, safe_d))
        r = b.srem(a, safe_d)  # 0 when d == -1
        adjust = b.and_(b.icmp_signed("!=", r, I64(0)),
                        b.icmp_signed("<", b.xor(r, d), I64(0)))
        if op == "//":
            value = b.sub(q, b.zext(adjust, I64))
        else:
            value = b.add(r, b.select(adjust, d, I64(0)))
        fine_end = b.block
        b.branch(join)
        b.position_at_end(join)
        phi = b.phi(I64, name="floordiv" if op == "//" else "mod")
        phi.add_incoming(I64(0), zero)
        phi.add_incoming(value, fine_end)
        return phi

    def _short_circuit(self, steps, name: str) -> ir.Value:
        """Evaluate ``steps`` (callables returning (value, stop-flag)) in order;
        the first step whose flag is true, or the last, gives the result."""
        b = self.b
        join = self._new_block(f"{name}.end")
        incoming = []
        for i, step in enumerate(steps):
            value, stop = step()
            incoming.append((value, b.block))
            if i == len(steps) - 1:
                b.branch(join)
            else:
                more = self._new_block(f"{name}.more")
                b.cbranch(stop, join, more)
                b.position_at_end(more)
        b.position_at_end(join)
        phi = b.phi(I64, name=name)
        for value, block in incoming:
            phi.add_incoming(value, block)
        return phi

    def boolop(self, e: BoolOp) -> ir.Value:
        def step(operand):
            def run():
                v = self.expr(operand)
                stop = self.b.icmp_signed("==" if e.op == "and" else "!=", v, I64(0))
                return v, stop
            return run
        return self._short_circuit([step(v) for v in e.values], e.op)

    def chain(self, e: Chain) -> ir.Value:
        values = {0: None}

        def step(i):
            def run():
                if i == 0:
                    values[0] = self.expr(e.operands[0])
                right = self.expr(e.operands[i + 1])
                held = self.b.icmp_signed(e.ops[i], values[0], right)
                values[0] = right
                return self.b.zext(held, I64), self.b.not_(held)
            return run
        return self._short_circuit([step(i) for i in range(len(e.ops))], "chain")

    def cond(self, e: Cond) -> ir.Value:
        b = self.b
        then, orelse, join = (self._new_block("cond.then"), self._new_block("cond.else"),
                              self._new_block("cond.end"))
        b.cbranch(self.truth(e.test), then, orelse)
        incoming = []
        for target, operand in ((then, e.body), (orelse, e.orelse)):
            b.position_at_end(target)
            v = self.expr(operand)
            incoming.append((v, b.block))
            b.branch(join)
        b.position_at_end(join)
        phi = b.phi(I64, name="cond")
        for v, block in incoming:
            phi.add_incoming(v, block)
        return phi


# -- entry point -------------------------------------------------------------------


def _functions(module: ast.Module) -> list[ast.FunctionDef]:
    functions, seen = [], set()
    for node in module.body:
        if not isinstance(node, ast.FunctionDef):
            if isinstance(node, ast.AsyncFunctionDef):
                _fail("async functions are not supported", node)
            _fail("only function definitions are allowed at module level "
                  f"(found {type(node).__name__})", node)
        if node.decorator_list:
            _fail(f"{node.name}: decorators are not supported", node.decorator_list[0])
        if node.returns is not None:
            _fail(f"{node.name}: return annotations are not supported", node.returns)
        if getattr(node, "type_params", None):
            _fail(f"{node.name}: type parameters are not supported", node)
        _check_name(node.name, node, "function")
        if node.name in BUILTINS:
            _fail(f"function {node.name!r} would shadow the builtin {node.name}()", node)
        if node.name.endswith(RESUME_SUFFIX):
            _fail(f"function names ending in {RESUME_SUFFIX!r} are reserved", node)
        if node.name in seen:
            _fail(f"function {node.name!r} defined twice", node)
        seen.add(node.name)
        functions.append(node)
    return functions


def compile_source(source: str, *, known: Mapping[str, int] = {},
                   polls: bool = True, calls: str = CALLS_SLOT) -> list[FunctionIR]:
    """Compile every function in ``source``; one :class:`FunctionIR` each, in source order.

    ``known`` maps functions already compiled into the runtime to their arity;
    a function in ``source`` with the same name replaces it (a new version).
    ``polls`` adds the entry and loop back-edge polls; explicit ``safepoint()``
    calls are sites either way. ``calls`` is how a function calls *other*
    functions: ``"slot"`` (load ``@"osrjit.slot.<g>"``, call through it) or
    ``"direct"`` (``call @"osrjit.fn.<g>"``, an ``E8 rel32`` the runtime
    patches; listed in :attr:`FunctionIR.direct_callees`); self-calls are
    direct either way and site ids do not depend on the mode. Raises
    :class:`CompileError` (with line and column) for anything outside the
    language.
    """
    if calls not in CALL_MODES:
        raise ValueError(f"calls={calls!r}, expected one of {CALL_MODES}")
    return [VersionedFunction(fn.name, fn.params, calls=calls).build(_emitter_for(fn))
            for fn in lower_source(source, known=known, polls=polls)]


def lower_source(source: str, *, known: Mapping[str, int] = {},
                 polls: bool = True) -> list[LoweredFunction]:
    """The functions of ``source`` in A-normal form with live sets (what
    :func:`compile_source` emits; exposed for tests and tools)."""
    for name, arity in known.items():
        if (not (isinstance(name, str) and name.isidentifier())
                or name.startswith(_RESERVED_PREFIX) or name in BUILTINS):
            raise ValueError(f"known function name {name!r} is not a valid function name")
        if not (isinstance(arity, int) and arity >= 0):
            raise ValueError(f"known function {name!r} has arity {arity!r}")
    try:
        module = ast.parse(source)
    except SyntaxError as e:
        raise CompileError(f"syntax error: {e.msg}", e.lineno,
                           None if e.offset is None else e.offset - 1) from None
    functions = _functions(module)
    signatures = dict(known)
    signatures.update({f.name: len(f.args.posonlyargs) + len(f.args.args) for f in functions})
    return [lower_function(f, signatures, polls=polls) for f in functions]


def _emitter_for(fn: LoweredFunction):
    return lambda fb: _Emitter(fn, fb).emit()
