"""Parse and check: Python source -> one :class:`~.anf.LoweredFunction` per ``def``.

:func:`lower_source` parses the source, checks it against the language (a
:class:`~osrjit.errors.CompileError` with line and column for anything else)
and lowers each function to A-normal form: calls, hooks and polls become
:class:`~.anf.Site` statements, hoisted in evaluation order into result
temporaries. :func:`lower_function` adds the live set after each site
(:mod:`.liveness`).
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Mapping

from osrjit.abi import RESUME_SUFFIX, SiteKind
from osrjit.errors import CompileError

from .anf import (Assign, Bin, BoolOp, Break, Chain, Cmp, Cond, Const, Continue, Eval, If,
                  LoweredFunction, Neg, Not, Return, Site, Var, While, site_id, site_key,
                  temporary_name)
from .liveness import site_live_sets

__all__ = ["lower_source", "lower_function", "INT64_MIN", "INT64_MAX", "BUILTINS"]

INT64_MIN = -2 ** 63
INT64_MAX = 2 ** 63 - 1
#: Builtin functions of the language: name -> arity.
BUILTINS = {"safepoint": 0, "hook": 1}
_RESERVED_PREFIX = "osrjit"


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
                               tuple(body), tuple(self.sites), line=self.fn.lineno)

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
            out += [_at_line(s, stmt.lineno) for s in self._stmt(stmt)]
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


# -- entry points -------------------------------------------------------------------


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


def lower_function(fn: ast.FunctionDef, signatures: Mapping[str, int], *,
                   polls: bool = True) -> LoweredFunction:
    """``fn`` in A-normal form with its sites' live sets (exposed for tests and tools)."""
    lowered = _Lowering(fn, signatures, polls).lower()
    return LoweredFunction(lowered.name, lowered.params, lowered.variables,
                           lowered.body, lowered.sites, site_live_sets(lowered), lowered.line)


def _at_line(stmt, line: int):
    """``stmt`` from source ``line``, unless it has a line already."""
    if getattr(stmt, "line", False) is None:
        return dataclasses.replace(stmt, line=line)
    return stmt


def lower_source(source: str, *, known: Mapping[str, int] = {},
                 polls: bool = True) -> list[LoweredFunction]:
    """The functions of ``source`` in A-normal form with live sets (what
    :func:`osrjit.lang.compile_source` emits; exposed for tests and tools)."""
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
