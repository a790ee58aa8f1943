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

Modules, one per stage
    :mod:`.lower` parses and checks the source and lowers each ``def`` to the
    A-normal form of :mod:`.anf` (which also names the sites); :mod:`.liveness`
    computes each site's live set; :mod:`.codegen` emits the lowered form
    through :class:`osrjit.ir.BodyBuilder`. Their public names are importable
    from :mod:`osrjit.lang`.
"""
from __future__ import annotations

from typing import Mapping

from osrjit.abi import CALL_MODES, CALLS_SLOT, FunctionIR
from osrjit.ir import SourceInfo, VersionedFunction

from .anf import (Assign, Bin, BoolOp, Break, Chain, Cmp, Cond, Const, Continue, Eval, If,
                  LoweredFunction, Neg, Not, Return, Site, Var, While, site_id, site_key,
                  temporary_name)
from .codegen import emitter_for
from .lower import BUILTINS, INT64_MAX, INT64_MIN, lower_function, lower_source

__all__ = ["compile_source", "lower_source", "lower_function", "site_key", "site_id", "temporary_name",
           "INT64_MIN", "INT64_MAX", "BUILTINS"]


def compile_source(source: str, *, known: Mapping[str, int] = {},
                   polls: bool = True, calls: str = CALLS_SLOT,
                   filename: str | None = None, stack_check: bool = False) -> list[FunctionIR]:
    """Compile every function in ``source``; one :class:`FunctionIR` each, in source order.

    ``known`` maps functions already compiled into the runtime to their arity;
    a function in ``source`` with the same name replaces it (a new version).
    ``polls`` adds the entry and loop back-edge polls; explicit ``safepoint()``
    calls are sites either way. ``calls`` is how a function calls *other*
    functions: ``"slot"`` (load ``@"osrjit.slot.<g>"``, call through it) or
    ``"direct"`` (``call @"osrjit.fn.<g>"``, an ``E8 rel32`` the runtime
    patches; listed in :attr:`FunctionIR.direct_callees`); self-calls are
    direct either way and site ids do not depend on the mode.
    ``stack_check`` starts every function with a check of RSP against its
    thread's stack limit (:meth:`osrjit.ir.BodyBuilder.stack_check`; the
    native backend asks for it). Raises
    :class:`CompileError` (with line and column) for anything outside the
    language. With ``filename``, each function carries a DWARF line table
    (``!dbg``) naming it, so debuggers show ``filename:line`` for its frames
    (it costs about a fifth more compile time, hence opt-in).
    """
    if calls not in CALL_MODES:
        raise ValueError(f"calls={calls!r}, expected one of {CALL_MODES}")
    return [VersionedFunction(fn.name, fn.params, calls=calls,
                              source=None if filename is None else SourceInfo(filename, fn.line or 1)
                              ).build(emitter_for(fn, stack_check=stack_check))
            for fn in lower_source(source, known=known, polls=polls)]
