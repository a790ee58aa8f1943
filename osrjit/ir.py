"""Versioned functions for runtime authors who write :mod:`llvmlite.ir` by hand.

Write a function body *once*, as a Python callback that drives an llvmlite
``IRBuilder``; :class:`VersionedFunction` runs it twice and returns an
:class:`osrjit.abi.FunctionIR` whose module defines both entries the runtime
needs (see :mod:`osrjit.abi`):

``@<symbol>(params...)``
    the function itself (run 1, :attr:`Mode.NORMAL`);
``@<symbol>__resume(i64 %site_id, ptr %state)``
    the same body again (run 2, :attr:`Mode.RESUME`), whose entry block
    switches on ``site_id`` to one block per site. That block loads
    ``state[STATE_RESULT_INDEX]`` into the site's result and
    ``state[STATE_LIVE_BASE + i]`` into the variable of ``live[i]``, then
    branches to the continuation right after the site. An unknown site id
    reaches ``llvm.trap``.

Variables, not SSA values, cross sites
    A frame can only be rebuilt from what the frame map records, and the frame
    map records *variables*: allocas declared with :meth:`BodyBuilder.declare`
    (parameters are declared for you). mem2reg (part of the runtime's O2
    pipeline) turns them into SSA values again. An SSA value defined before a
    site and used after it would not be restored by the resume entry; LLVM's
    verifier rejects such a module ("Instruction does not dominate all uses")
    and :meth:`VersionedFunction.build` raises :class:`CompileError` with a
    hint. Load a variable again after the site instead.

Sites
    Every helper that suspends (:meth:`BodyBuilder.call`,
    :meth:`~BodyBuilder.call_function`, :meth:`~BodyBuilder.hook`,
    :meth:`~BodyBuilder.poll`) emits ``@llvm.experimental.gc.statepoint.p0``
    with the caller's *site id* as its ID and a ``"deopt"`` bundle holding the
    live variables, in the order of :attr:`SiteInfo.live`. ``live`` defaults to
    every declared variable (declaration order, parameters first) except the
    site's own result variable; pass the variables actually live after the site
    to keep frame maps small. Site ids are chosen by the author: integers in
    ``[0, 2**63)``, unique within the function, and *stable across versions* for
    the sites that did not change (the runtime matches a live frame's site in the
    new version by id). The body must emit the same sites in the same order on
    both runs: it may look at :attr:`BodyBuilder.mode` but must not make its
    sites depend on it.

    The resume entry contains the body too, so its statepoints carry the same
    ids: an object holds two stackmap records per site id (one per entry; more
    if the optimizer duplicates a call). All of them share one
    :class:`~osrjit.abi.SiteInfo`.

Worked example (the ``fib`` the reference frontend would produce, by hand)::

    from osrjit.ir import I64, VersionedFunction

    def fib_body(fb):
        b = fb.builder
        fb.declare("a")                                   # crosses the 2nd call
        fb.poll(1, live=["n"])                            # entry safepoint poll
        n = fb.load("n")
        with b.if_then(b.icmp_signed("<", n, I64(2))):
            b.ret(n)
        fb.call_function(2, "fib", [b.sub(fb.load("n"), I64(1))],
                         live=["n"], result="a")          # self call: direct
        second = fb.call_function(3, "fib", [b.sub(fb.load("n"), I64(2))],
                                  live=["a"])
        b.ret(b.add(fb.load("a"), second))                # `second` crosses no site

    fib = VersionedFunction("fib", ["n"]).build(fib_body)
    fib.module_ir        # defines @"osrjit.fn.fib" and @"osrjit.fn.fib__resume"
    fib.sites[2].live    # (LiveValue(name='n', type='i64'),)

Calling ``osrjit.fn.fib__resume(2, state)`` with ``state = [f(n-1), n]``
continues after the first call: it stores ``state[0]`` into ``a``, calls
``fib(n - 2)`` and returns the sum.

Calls to other functions
    :meth:`BodyBuilder.call_function` reaches another JIT-compiled function
    ``g`` in one of two modes (:data:`osrjit.abi.CALL_MODES`), chosen per
    :class:`VersionedFunction` (``calls=``) and overridable per call:
    ``"slot"`` (the default) loads ``@"osrjit.slot.g"`` and calls through the
    pointer; ``"direct"`` makes ``declare <sig> @"osrjit.fn.g"`` the
    statepoint's callee, so the object holds ``E8 rel32`` with an
    ``R_X86_64_PLT32`` relocation against ``osrjit.fn.g``, which the runtime
    resolves at link time and patches when ``g`` gets a new version (see
    :mod:`osrjit.native.patching`). A self-call is direct in both modes.

Runtime-side symbols a module may reference (all from :mod:`osrjit.abi`):
``@"osrjit.slot.<name>"`` (external global ptr, one per other function
called through a slot), ``@"osrjit.fn.<name>"`` (external function, one per
other function called directly), ``@osrjit_hook``, ``@osrjit_safepoint_flag``,
``@osrjit_safepoint_slow`` and ``@osrjit_error``. The module carries the
process triple but no data layout: the runtime sets its target machine's data
layout before optimizing.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterable, Sequence

from llvmlite import binding as llvm
from llvmlite import ir

from osrjit.abi import (CALL_MODES, CALLS_DIRECT, CALLS_SLOT, DIRECT_CALL_PREFIX,
                        ERROR_SYMBOL, GC_STRATEGY, HOOK_SYMBOL, RESUME_SUFFIX,
                        SAFEPOINT_FLAG_SYMBOL, SAFEPOINT_SLOW_SYMBOL,
                        SLOT_PREFIX, STACK_LIMIT_SYMBOL, STACK_OVERFLOW_SYMBOL,
                        STATE_LIVE_BASE, STATE_RESULT_INDEX,
                        FunctionIR, LiveValue, SiteInfo, SiteKind, direct_call_symbol)
from osrjit.errors import CompileError

__all__ = [
    "I32", "I64", "DOUBLE", "PTR", "VOID", "TOKEN", "SYMBOL_PREFIX",
    "Mode", "VersionedFunction", "BodyBuilder", "StatepointInstr",
    "VolatileLoadInstr", "default_symbol", "parse_module", "SourceInfo",
]


@dataclass(frozen=True)
class SourceInfo:
    """Where a function's source is, for DWARF line tables (``!dbg``).

    ``filename``: as tools show it (``bt`` prints ``filename:line``);
    ``line``: 1-based line of its definition. With it,
    :class:`VersionedFunction` gives both entries a ``DISubprogram`` named
    after its symbol and :meth:`BodyBuilder.set_line` sets the line of the
    instructions that follow.
    """
    filename: str
    line: int

def parse_module(*texts: str):
    """Parse LLVM IR ``texts`` into one llvmlite module (each later text
    linked into the first) in an LLVM context of its own, which the module
    keeps alive. LLVM keeps every type, constant and metadata node a context
    has seen until the context goes, so modules parsed into the global
    context would leave some of each behind for the life of the process —
    every runtime, every compile. Raises ``RuntimeError`` with LLVM's
    diagnostic if a text does not parse."""
    context = llvm.create_context()
    module = llvm.parse_assembly(texts[0], context=context)
    for text in texts[1:]:
        module.link_in(llvm.parse_assembly(text, context=context))
    return module


I32 = ir.IntType(32)
I64 = ir.IntType(64)
DOUBLE = ir.DoubleType()
PTR = ir.PointerType()   # opaque: renders as ``ptr`` whatever llvmlite's pointer mode
VOID = ir.VoidType()

#: Prefix of the default function symbol. Keeps a user function called e.g.
#: ``labs`` from being mistaken by LLVM for the C library function. The same
#: prefix names direct-call targets (:data:`osrjit.abi.DIRECT_CALL_PREFIX`,
#: the one source of truth).
SYMBOL_PREFIX = DIRECT_CALL_PREFIX
#: ``br`` weights (slow, fast) of a safepoint poll: the slow path is unlikely.
POLL_BRANCH_WEIGHTS = (1, 2000)

_STATEPOINT = "llvm.experimental.gc.statepoint.p0"
_GC_RESULT = "llvm.experimental.gc.result."


def default_symbol(name: str) -> str:
    """The symbol of function ``name`` unless the author picks one."""
    return SYMBOL_PREFIX + name


class TokenType(ir.Type):
    """LLVM's ``token`` type (a statepoint's result); llvmlite has none."""

    def _to_string(self):
        return "token"

    def __eq__(self, other):
        return isinstance(other, TokenType)

    def __hash__(self):
        return hash(TokenType)


TOKEN = TokenType()

#: LLVM types a variable (hence a live value) may have: one 8-byte state slot each.
_VARIABLE_TYPES = (I64, I32, DOUBLE, PTR)


def _is_variable_type(ty: ir.Type) -> bool:
    return any(ty == t and type(ty) is type(t) for t in _VARIABLE_TYPES)


def _intrinsic_suffix(ty: ir.Type) -> str:
    """Overload suffix of ``llvm.experimental.gc.result`` for ``ty``."""
    if isinstance(ty, ir.IntType):
        return f"i{ty.width}"
    if isinstance(ty, ir.DoubleType):
        return "f64"
    if isinstance(ty, ir.PointerType):
        return f"p{ty.addrspace}"
    raise CompileError(f"calls returning {ty} are not supported at sites")


class StatepointInstr(ir.Instruction):
    """``call token (...) @llvm.experimental.gc.statepoint.p0(...) [ "deopt"(...) ]``.

    Renders::

        call token (i64, i32, ptr, i32, i32, ...) @llvm.experimental.gc.statepoint.p0(
            i64 <site id>, i32 0, ptr elementtype(<fnty>) <callee>,
            i32 <nargs>, i32 0, <args...>, i32 0, i32 0) [ "deopt"(<live...>) ]

    (on one line). Operands are ``[intrinsic, callee, *args, *deopt]``; the
    deopt values may be set after creation (:meth:`set_deopt`).
    """

    def __init__(self, parent, intrinsic, site_id: int, callee, function_type,
                 args: Sequence[ir.Value], name=""):
        super().__init__(parent, TOKEN, "call", [intrinsic, callee, *args], name=name)
        self.site_id = site_id
        self.callee_type = function_type
        self.nargs = len(args)

    @property
    def call_args(self):
        return self.operands[2:2 + self.nargs]

    @property
    def deopt(self):
        return self.operands[2 + self.nargs:]

    def set_deopt(self, values: Iterable[ir.Value]) -> None:
        self.operands = [*self.operands[:2 + self.nargs], *values]
        self._clear_string_cache()

    def descr(self, buf):
        intrinsic, callee = self.operands[0], self.operands[1]
        fields = [f"i64 {self.site_id}", "i32 0",
                  f"ptr elementtype({self.callee_type}) {callee.get_reference()}",
                  f"i32 {self.nargs}", "i32 0",
                  *(f"{a.type} {a.get_reference()}" for a in self.call_args),
                  "i32 0", "i32 0"]
        deopt = ", ".join(f"{v.type} {v.get_reference()}" for v in self.deopt)
        buf.append(f"call token (i64, i32, ptr, i32, i32, ...) "
                   f"{intrinsic.get_reference()}({', '.join(fields)}) "
                   f"[ \"deopt\"({deopt}) ]"
                   f"{self._stringify_metadata(leading_comma=True)}\n")


class VolatileLoadInstr(ir.LoadInstr):
    """``load volatile <ty>, ptr <p>`` (llvmlite's load has no volatile flag)."""

    def descr(self, buf):
        [ptr] = self.operands
        align = f", align {self.align}" if self.align is not None else ""
        buf.append(f"load volatile {self.type}, {ptr.type} {ptr.get_reference()}"
                   f"{align}{self._stringify_metadata(leading_comma=True)}\n")


class _GCFunction(ir.Function):
    """An ``ir.Function`` that renders ``gc "<strategy>"`` in its header.

    Every versioned function is ``uwtable`` (asynchronous unwind tables): a
    thread stopped by a signal can be anywhere in it, even in a leaf loop that
    LLVM would otherwise emit without an FDE.
    """

    gc = GC_STRATEGY

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attributes.add("uwtable")

    def descr_prototype(self, buf):
        if self.attributes.personality is not None:
            raise CompileError("versioned functions cannot have a personality")
        header = []
        super().descr_prototype(header)
        [line] = header
        # Grammar: ... @f(args) <fn attrs> [section "s"] [gc "name"] <metadata>.
        # Metadata (if any) starts with " !"; insert before it, else at the end.
        body = line.rstrip("\n")
        cut = body.find(" !") if self.metadata else -1
        cut = len(body) if cut < 0 else cut
        buf.append(f'{body[:cut]} gc "{self.gc}"{body[cut:]}\n')


class Mode(Enum):
    """Which entry a run of the body is emitting."""
    NORMAL = "normal"  #: ``@<symbol>(params...)``
    RESUME = "resume"  #: ``@<symbol>__resume(i64 site_id, ptr state)``


@dataclass(frozen=True)
class _Variable:
    name: str
    type: ir.Type
    slot: ir.AllocaInstr  # in the entry block of the function being emitted


@dataclass(frozen=True)
class _Site:
    """A site as emitted in one run; ``live`` is None until the run ends when
    the author asked for the default (all variables)."""
    id: int
    kind: SiteKind
    callee: str | None
    live: tuple[str, ...] | None
    result: str | None            # result variable, if the author named one
    result_type: ir.Type | None   # None: no result (void callee)
    result_slot: ir.AllocaInstr | None
    statepoint: StatepointInstr
    continuation: ir.Block        # where execution goes on after the site
    line: int | None
    col: int | None


class BodyBuilder:
    """What the body callback receives; one per run (per :class:`Mode`).

    :attr:`builder` is a plain llvmlite ``IRBuilder`` positioned in the body;
    emit ordinary instructions with it and use this class's methods for
    variables and sites. The body must leave every block terminated (``ret``
    on each path). Objects here live only as long as the build that created
    them: do not keep values from one run for the other.
    """

    def __init__(self, owner: "VersionedFunction", module: ir.Module,
                 function: ir.Function, entry_function: ir.Function, mode: Mode):
        self.owner = owner
        self.module = module
        #: The LLVM function this run emits (``@<symbol>`` or its resume entry).
        self.function = function
        #: ``@<symbol>`` itself: the target of direct self-calls in both runs.
        self.entry_function = entry_function
        self.mode = mode
        self._entry = ir.IRBuilder(function.append_basic_block("entry"))
        #: The author's IRBuilder, positioned at the start of the body.
        self.builder = ir.IRBuilder(function.append_basic_block("body"))
        self._subprogram = function.metadata.get("dbg")
        if self._subprogram is not None:
            line = owner.source.line
            self._entry.debug_metadata = self._location(line, 0)
            self.builder.debug_metadata = self._location(line, 0)
        self._variables: dict[str, _Variable] = {}
        self._sites: dict[int, _Site] = {}
        #: Other functions called (names), through slots or directly.
        self.callees: set[str] = set()
        #: The subset of :attr:`callees` called directly (``@"osrjit.fn.<name>"``).
        self.direct_callees: set[str] = set()

    # -- variables -----------------------------------------------------------

    def declare(self, name: str, type: ir.Type = I64) -> ir.AllocaInstr:
        """Declare variable ``name``: an alloca in the entry block, zeroed there.

        Types: ``i64``, ``i32``, ``double``, ``ptr`` (one 8-byte state slot each).
        Returns the alloca (its address; prefer :meth:`load` / :meth:`store`).
        """
        if name in self._variables:
            raise CompileError(f"variable {name!r} declared twice in {self.owner.name}")
        if not _is_variable_type(type):
            raise CompileError(f"variable {name!r} has type {type}; variables are "
                               f"i64, i32, double or ptr")
        slot = self._entry.alloca(type, name=f"var.{name}")
        self._entry.store(ir.Constant(type, None), slot)
        self._variables[name] = _Variable(name, type, slot)
        return slot

    @property
    def variables(self) -> tuple[str, ...]:
        """Declared variable names, in declaration order (parameters first)."""
        return tuple(self._variables)

    def variable(self, name: str) -> ir.AllocaInstr:
        """The alloca of variable ``name``."""
        return self._lookup(name).slot

    # -- source lines ---------------------------------------------------------

    def _location(self, line: int, col: int):
        return self.module.add_debug_info("DILocation", {"line": line, "column": col,
                                                         "scope": self._subprogram})

    def set_line(self, line: int | None, col: int | None = None) -> None:
        """Instructions emitted from now on belong to source ``line`` (1-based;
        ``col`` 0-based). Does nothing for a function built without
        :class:`SourceInfo` or for ``line`` None."""
        if self._subprogram is not None and line:
            self.builder.debug_metadata = self._location(line, (col or 0) + 1)

    def load(self, name: str) -> ir.Value:
        """Emit a load of variable ``name``."""
        var = self._lookup(name)
        return self.builder.load(var.slot, name=name, typ=var.type)

    def store(self, name: str, value: ir.Value) -> None:
        """Emit a store of ``value`` to variable ``name``."""
        var = self._lookup(name)
        if value.type != var.type:
            raise CompileError(f"storing {value.type} into variable {name!r} of type {var.type}")
        self.builder.store(value, var.slot)

    def _lookup(self, name: str) -> _Variable:
        try:
            return self._variables[name]
        except KeyError:
            raise CompileError(f"{self.owner.name}: no variable {name!r} "
                               f"(declared: {', '.join(self._variables) or 'none'})") from None

    # -- module-level declarations -------------------------------------------

    def declare_function(self, name: str, function_type: ir.FunctionType) -> ir.Function:
        """``declare <function_type> @name`` once per module (both runs share it)."""
        existing = self.module.globals.get(name)
        if existing is None:
            return ir.Function(self.module, function_type, name)
        if not isinstance(existing, ir.Function) or existing.function_type != function_type:
            raise CompileError(f"@{name} is already declared as {existing.type}")
        return existing

    def _declare_global(self, name: str, type: ir.Type) -> ir.GlobalVariable:
        existing = self.module.globals.get(name)
        if existing is not None:
            return existing
        var = ir.GlobalVariable(self.module, type, name)
        var.linkage = "external"
        return var

    def load_slot(self, name: str) -> ir.Value:
        """Emit ``load ptr, ptr @"osrjit.slot.<name>"``: the current entry of ``name``."""
        self.callees.add(name)
        cell = self._declare_global(SLOT_PREFIX + name, PTR)
        return self.builder.load(cell, name=f"slot.{name}", typ=PTR)

    def direct_callee(self, name: str, function_type: ir.FunctionType) -> ir.Function:
        """``declare <function_type> @"osrjit.fn.<name>"``: the direct-call target of
        function ``name`` (another function; the runtime resolves and patches it)."""
        symbol = direct_call_symbol(name)
        if name == self.owner.name or symbol in (self.owner.symbol, self.owner.resume_symbol):
            raise CompileError(f"{self.owner.name}: a direct call to {name!r} would reference "
                               f"@{symbol}, which this module defines")
        self.callees.add(name)
        self.direct_callees.add(name)
        return self.declare_function(symbol, function_type)

    # -- sites ----------------------------------------------------------------

    def call(self, site_id: int, callee: ir.Value, args: Sequence[ir.Value], *,
             function_type: ir.FunctionType | None = None,
             callee_name: str | None = None, kind: SiteKind = SiteKind.EXTERNAL,
             live: Sequence[str] | None = None, result: str | None = None,
             line: int | None = None, col: int | None = None) -> ir.Value | None:
        """Emit a call as site ``site_id`` and continue after it.

        ``callee`` is an ``ir.Function`` or a pointer value (then
        ``function_type`` is required). ``live`` names the variables recorded
        in the frame map (default: all but ``result``). ``result`` names a
        variable that receives the call's value. Returns the call's value
        (loaded after the site, so it is valid in the continuation) or None for
        a void callee.
        """
        if isinstance(callee, ir.Function):
            function_type = function_type or callee.function_type
            callee_name = callee_name if callee_name is not None else callee.name
        elif function_type is None:
            raise CompileError(f"site {site_id}: calling a pointer value needs function_type")
        self._check_new_site(site_id)
        args = list(args)
        if function_type.var_arg or len(args) != len(function_type.args):
            raise CompileError(f"site {site_id}: {len(args)} arguments for {function_type}")
        for i, (arg, ty) in enumerate(zip(args, function_type.args)):
            if arg.type != ty:
                raise CompileError(f"site {site_id}: argument {i} is {arg.type}, expected {ty}")
        result_type, result_slot = self._result_slot(site_id, function_type, result)
        statepoint = self._emit_statepoint(site_id, callee, function_type, args,
                                           result_type, result_slot)
        continuation = self.function.append_basic_block(f"after.{site_id}")
        self.builder.branch(continuation)
        self.builder.position_at_end(continuation)
        self._record(_Site(site_id, kind, callee_name,
                           None if live is None else tuple(live), result,
                           result_type, result_slot, statepoint, continuation, line, col))
        if result_type is None:
            return None
        return self.builder.load(result_slot, name=f"result.{site_id}", typ=result_type)

    def call_function(self, site_id: int, name: str, args: Sequence[ir.Value], *,
                      function_type: ir.FunctionType | None = None,
                      live: Sequence[str] | None = None, result: str | None = None,
                      line: int | None = None, col: int | None = None,
                      calls: str | None = None) -> ir.Value | None:
        """Call JIT-compiled function ``name`` as a :attr:`SiteKind.CALL` site.

        A call to this function itself is direct (``@<symbol>``); any other
        goes through ``@"osrjit.slot.<name>"`` (``calls="slot"``) or is a
        direct call of ``@"osrjit.fn.<name>"`` (``calls="direct"``).
        ``calls`` defaults to the :class:`VersionedFunction`'s mode.
        ``function_type`` defaults to ``i64 (i64 x len(args))``.
        """
        mode = self.owner.calls if calls is None else calls
        if mode not in CALL_MODES:
            raise CompileError(f"site {site_id}: calls={mode!r}, expected one of {CALL_MODES}")
        if name == self.owner.name:
            callee = self.entry_function
            if function_type is not None and function_type != callee.function_type:
                raise CompileError(f"site {site_id}: self call with {function_type}, "
                                   f"but {name} is {callee.function_type}")
            function_type = callee.function_type
        else:
            function_type = function_type or ir.FunctionType(I64, [I64] * len(args))
            if mode == CALLS_DIRECT:
                callee = self.direct_callee(name, function_type)
            else:
                callee = self.load_slot(name)
        return self.call(site_id, callee, args, function_type=function_type,
                         callee_name=name, kind=SiteKind.CALL, live=live,
                         result=result, line=line, col=col)

    def hook(self, site_id: int, value: ir.Value, *, live: Sequence[str] | None = None,
             result: str | None = None, line: int | None = None,
             col: int | None = None) -> ir.Value:
        """Call ``i64 @osrjit_hook(i64 value)`` as a :attr:`SiteKind.HOOK` site."""
        hook = self.declare_function(HOOK_SYMBOL, ir.FunctionType(I64, [I64]))
        return self.call(site_id, hook, [value], kind=SiteKind.HOOK, live=live,
                         result=result, line=line, col=col)

    def poll(self, site_id: int, *, live: Sequence[str] | None = None,
             line: int | None = None, col: int | None = None) -> None:
        """Emit a safepoint poll whose slow path is :attr:`SiteKind.POLL` site ``site_id``::

            %flag = load volatile i64, ptr @osrjit_safepoint_flag
            %stop = icmp ne i64 %flag, 0
            br i1 %stop, label %poll.<id>, label %after.<id>, !prof (1, 2000)
          poll.<id>:   statepoint of void @osrjit_safepoint_slow() ; br label %after.<id>
          after.<id>:  (the builder continues here; so does a resume at this site)
        """
        self._check_new_site(site_id)
        b = self.builder
        flag_cell = self._declare_global(SAFEPOINT_FLAG_SYMBOL, I64)
        flag = VolatileLoadInstr(b.block, flag_cell, name="safepoint.flag", typ=I64)
        b._insert(flag)  # llvmlite has no public way to insert a custom instruction
        stop = b.icmp_unsigned("!=", flag, I64(0), name="safepoint.stop")
        slow = self.function.append_basic_block(f"poll.{site_id}")
        continuation = self.function.append_basic_block(f"after.{site_id}")
        b.cbranch(stop, slow, continuation).set_weights(POLL_BRANCH_WEIGHTS)
        b.position_at_end(slow)
        slow_fn = self.declare_function(SAFEPOINT_SLOW_SYMBOL, ir.FunctionType(VOID, []))
        statepoint = self._emit_statepoint(site_id, slow_fn, slow_fn.function_type, [],
                                           None, None)
        b.branch(continuation)
        b.position_at_end(continuation)
        self._record(_Site(site_id, SiteKind.POLL, SAFEPOINT_SLOW_SYMBOL,
                           None if live is None else tuple(live), None, None, None,
                           statepoint, continuation, line, col))

    def stack_check(self) -> None:
        """Emit the entry stack check (not a site; put it first in the body)::

            %limit = load i64, ptr addrspace(257) @osrjit_stack_limit_tls  ; %fs:<offset>
            %sp = call i64 @llvm.read_register.i64(metadata !"rsp")
            %low = icmp ult i64 %sp, %limit
            br i1 %low, label %stack.overflow, label %stack.ok, !prof (1, 2000)
          stack.overflow:  call void @osrjit_stack_overflow() ; br label %stack.ok

        ``@osrjit_stack_limit_tls`` is an absolute symbol whose value is the
        offset from ``%fs`` (address space 257) of the thread's limit: one
        load (plus the GOT's) and a compare. A thread with limit 0 never
        fails it. The slow path abandons the thread's JIT frames up to its
        entry (the Python caller gets :class:`osrjit.StackOverflow`); the
        native backend links it, the emulated one compiles without checks.
        """
        b = self.builder
        tls = self._declare_global(STACK_LIMIT_SYMBOL, ir.IntType(8))
        fs_ptr = ir.PointerType(addrspace=257)
        limit = b.load(tls.ptrtoint(I64).inttoptr(fs_ptr), typ=I64, name="stack.limit")
        md = self.module.add_metadata([ir.MetaDataString(self.module, "rsp")])
        read_register = self.declare_function(
            "llvm.read_register.i64", ir.FunctionType(I64, [ir.MetaDataType()]))
        sp = b.call(read_register, [md], name="stack.sp")
        low = b.icmp_unsigned("<", sp, limit, name="stack.low")
        slow = self.function.append_basic_block("stack.overflow")
        ok = self.function.append_basic_block("stack.ok")
        b.cbranch(low, slow, ok).set_weights(POLL_BRANCH_WEIGHTS)
        b.position_at_end(slow)
        b.call(self.declare_function(STACK_OVERFLOW_SYMBOL, ir.FunctionType(VOID, [])), [])
        b.branch(ok)
        b.position_at_end(ok)

    def report_error(self, code: int) -> None:
        """Emit ``call void @osrjit_error(i64 code)`` (not a site; see :mod:`osrjit.abi`)."""
        error = self.declare_function(ERROR_SYMBOL, ir.FunctionType(VOID, [I64]))
        self.builder.call(error, [I64(int(code))])

    def trap(self) -> None:
        """Emit ``call void @llvm.trap()`` and ``unreachable``."""
        trap = self.declare_function("llvm.trap", ir.FunctionType(VOID, []))
        self.builder.call(trap, [])
        self.builder.unreachable()

    # -- site plumbing ----------------------------------------------------------

    def _check_new_site(self, site_id: int) -> None:
        if not isinstance(site_id, int) or not 0 <= site_id < 2 ** 63:
            raise CompileError(f"site id {site_id!r} is not an integer in [0, 2**63)")
        if site_id in self._sites:
            raise CompileError(f"site id {site_id} used twice in {self.owner.name}")

    def _result_slot(self, site_id, function_type, result):
        result_type = function_type.return_type
        if isinstance(result_type, ir.VoidType):
            if result is not None:
                raise CompileError(f"site {site_id}: a void call has no result for {result!r}")
            return None, None
        _intrinsic_suffix(result_type)  # rejects unsupported result types early
        if result is None:
            return result_type, self._entry.alloca(result_type, name=f"result.{site_id}")
        var = self._lookup(result)
        if var.type != result_type:
            raise CompileError(f"site {site_id}: result {result!r} is {var.type}, "
                               f"the call returns {result_type}")
        return result_type, var.slot

    def _emit_statepoint(self, site_id, callee, function_type, args,
                         result_type, result_slot) -> StatepointInstr:
        """Statepoint (+ ``gc.result`` stored to ``result_slot``) in the current block."""
        b = self.builder
        intrinsic = self.declare_function(
            _STATEPOINT, ir.FunctionType(TOKEN, [I64, I32, PTR, I32, I32], var_arg=True))
        statepoint = StatepointInstr(b.block, intrinsic, site_id, callee, function_type,
                                     args, name=f"site.{site_id}")
        b._insert(statepoint)  # llvmlite has no public way to insert a custom instruction
        if result_type is not None:
            gc_result = self.declare_function(_GC_RESULT + _intrinsic_suffix(result_type),
                                              ir.FunctionType(result_type, [TOKEN]))
            b.store(b.call(gc_result, [statepoint]), result_slot)
        return statepoint

    def _record(self, site: _Site) -> None:
        self._sites[site.id] = site

    # -- end of run ----------------------------------------------------------

    def _site_infos(self) -> dict[int, SiteInfo]:
        """Fill every statepoint's deopt bundle and describe the sites."""
        infos = {}
        for site in self._sites.values():
            names = site.live
            if names is None:
                names = tuple(v for v in self._variables if v != site.result)
            if len(set(names)) != len(names):
                raise CompileError(f"site {site.id}: live names repeat: {names}")
            variables = [self._lookup(n) for n in names]
            loader = ir.IRBuilder(site.statepoint.parent)
            loader.position_before(site.statepoint)
            site.statepoint.set_deopt(
                loader.load(v.slot, name=f"live.{v.name}", typ=v.type) for v in variables)
            infos[site.id] = SiteInfo(
                id=site.id, kind=site.kind, callee=site.callee,
                live=tuple(LiveValue(v.name, str(v.type)) for v in variables),
                has_result=site.result_type is not None, line=site.line, col=site.col)
        return infos

    def _emit_resume_dispatch(self, state: ir.Value, site_id: ir.Value,
                              infos: dict[int, SiteInfo]) -> None:
        """The resume entry's switch and its per-site restore blocks."""
        unknown = self.function.append_basic_block("resume.unknown")
        dispatch = self._entry.switch(site_id, unknown)
        b = ir.IRBuilder(unknown)
        trap = self.declare_function("llvm.trap", ir.FunctionType(VOID, []))
        b.call(trap, [])
        b.unreachable()
        for site in self._sites.values():
            block = self.function.append_basic_block(f"resume.{site.id}")
            dispatch.add_case(I64(site.id), block)
            b.position_at_end(block)
            for i, live in enumerate(infos[site.id].live):
                name = live.name
                var = self._variables[name]
                b.store(self._load_state(b, state, STATE_LIVE_BASE + i, var.type,
                                         f"state.{name}"), var.slot)
            if site.result_type is not None:
                b.store(self._load_state(b, state, STATE_RESULT_INDEX, site.result_type,
                                         "state.result"), site.result_slot)
            b.branch(site.continuation)

    @staticmethod
    def _load_state(b: ir.IRBuilder, state, index: int, type: ir.Type, name: str):
        """``load <type>, ptr &state[index]`` (8-byte slots; narrower types read
        the slot's first bytes, i.e. its low bits on little-endian targets)."""
        slot = b.gep(state, [I64(index)], inbounds=True, source_etype=I64,
                     name=f"{name}.addr")
        return b.load(slot, name=name, typ=type)


class VersionedFunction:
    """Builds one version of function ``name`` (an :class:`FunctionIR`).

    ``params`` are names (``i64``) or ``(name, type)`` pairs; they become the
    first variables. ``symbol`` defaults to ``osrjit.fn.<name>``. ``calls``
    (``"slot"`` or ``"direct"``, see :mod:`osrjit.abi`) is how
    :meth:`BodyBuilder.call_function` reaches other functions by default.
    ``source`` (a :class:`SourceInfo`) adds DWARF line tables.
    """

    def __init__(self, name: str, params: Sequence[str | tuple[str, ir.Type]], *,
                 return_type: ir.Type = I64, symbol: str | None = None,
                 calls: str = CALLS_SLOT, source: SourceInfo | None = None):
        self.source = source
        if calls not in CALL_MODES:
            raise CompileError(f"{name}: calls={calls!r}, expected one of {CALL_MODES}")
        self.calls = calls
        self.name = name
        self.params = tuple((p, I64) if isinstance(p, str) else tuple(p) for p in params)
        self.return_type = return_type
        self.symbol = symbol if symbol is not None else default_symbol(name)
        if not (isinstance(return_type, ir.VoidType) or _is_variable_type(return_type)):
            raise CompileError(f"{name}: return type {return_type} is not i64, i32, "
                               f"double, ptr or void")

    @property
    def resume_symbol(self) -> str:
        return self.symbol + RESUME_SUFFIX

    def build(self, body: Callable[[BodyBuilder], None], *, verify: bool = True) -> FunctionIR:
        """Run ``body`` in both modes and return the version.

        ``verify`` parses the module with LLVM and runs its verifier, turning
        a rejection into :class:`CompileError`.
        """
        module = ir.Module(name=self.symbol)
        module.triple = llvm.get_process_triple()
        param_types = [t for _, t in self.params]
        entry_fn = _GCFunction(module, ir.FunctionType(self.return_type, param_types),
                               self.symbol)
        resume_fn = _GCFunction(module, ir.FunctionType(self.return_type, [I64, PTR]),
                                self.resume_symbol)
        if self.source is not None:
            self._add_debug_info(module, (entry_fn, resume_fn))

        normal = self._run(body, BodyBuilder(self, module, entry_fn, entry_fn, Mode.NORMAL))
        resume = self._run(body, BodyBuilder(self, module, resume_fn, entry_fn, Mode.RESUME))
        if normal.variables != resume.variables or normal.infos != resume.infos:
            raise CompileError(f"{self.name}: the body declared different variables or "
                               f"emitted different sites on its second (resume) run; it "
                               f"must not depend on the mode")
        text = str(module)
        if verify:
            _verify(self.symbol, text)
        return FunctionIR(name=self.name, params=tuple(n for n, _ in self.params),
                          module_ir=text, symbol=self.symbol, sites=normal.infos,
                          callees=frozenset(normal.fb.callees),
                          return_type=str(self.return_type),
                          direct_callees=frozenset(normal.fb.direct_callees))

    def _add_debug_info(self, module: ir.Module, functions) -> None:
        """A compile unit for :attr:`source` and one ``DISubprogram`` per
        entry, named after its symbol (DWARF 4: the names are ``.debug_str``
        entries tools can rename, see :mod:`osrjit.native.tooling`)."""
        i32 = ir.IntType(32)
        # The name as given (no directory): what bt prints is what the author passed.
        di_file = module.add_debug_info("DIFile", {"filename": self.source.filename,
                                                   "directory": ""})
        unit = module.add_debug_info("DICompileUnit", {
            "language": ir.DIToken("DW_LANG_C"), "file": di_file, "producer": "osrjit",
            "isOptimized": True, "runtimeVersion": 0,
            "emissionKind": ir.DIToken("FullDebug"),
            "nameTableKind": ir.DIToken("None")}, is_distinct=True)
        module.add_named_metadata("llvm.dbg.cu", unit)
        for flag, value in (("Dwarf Version", 4), ("Debug Info Version", 3)):
            module.add_named_metadata("llvm.module.flags",
                                      module.add_metadata([i32(2), flag, i32(value)]))
        signature = module.add_debug_info("DISubroutineType",
                                          {"types": module.add_metadata([])})
        for fn in functions:
            fn.set_metadata("dbg", module.add_debug_info("DISubprogram", {
                "name": fn.name, "scope": di_file, "file": di_file,
                "line": self.source.line, "scopeLine": self.source.line, "type": signature,
                "spFlags": ir.DIToken("DISPFlagDefinition | DISPFlagOptimized"),
                "unit": unit}, is_distinct=True))

    def _run(self, body, fb: BodyBuilder) -> "_Run":
        args = fb.function.args
        if fb.mode is Mode.NORMAL:
            for (name, _), arg in zip(self.params, args):
                arg.name = name
                fb.declare(name, arg.type)
                fb._entry.store(arg, fb.variable(name))
        else:
            args[0].name, args[1].name = "site_id", "state"
            for name, ty in self.params:
                fb.declare(name, ty)
        body(fb)
        if not fb.builder.block.is_terminated:
            raise CompileError(f"{self.name}: the body left block "
                               f"{fb.builder.block.name!r} without a terminator "
                               f"(every path must return)")
        infos = fb._site_infos()
        if fb.mode is Mode.NORMAL:
            fb._entry.branch(fb.function.blocks[1])
        else:
            fb._emit_resume_dispatch(state=args[1], site_id=args[0], infos=infos)
        return _Run(fb, fb.variables, infos)


@dataclass(frozen=True)
class _Run:
    fb: BodyBuilder
    variables: tuple
    infos: dict


def _verify(symbol: str, text: str) -> None:
    try:
        parse_module(text).verify()
    except RuntimeError as e:
        hint = ""
        if "dominate" in str(e):
            hint = (" (an SSA value defined before a site is used after it: keep "
                    "such values in variables, which the frame map restores)")
        raise CompileError(f"LLVM rejected the module of {symbol}: {e}{hint}") from e
