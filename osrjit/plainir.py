"""Plain LLVM IR in: osrjit instruments ordinary functions itself.

:func:`instrument` takes a module of ordinary functions — LLVM IR text or an
:class:`llvmlite.ir.Module`, no statepoints, no resume entries, no osrjit
helpers — and returns one :class:`osrjit.abi.FunctionIR` per defined
function, named by its IR name. Conventions in the plain IR:

* ``declare i64 @osrjit_hook(i64)`` calls the Python hook (a HOOK site);
* ``declare void @osrjit_safepoint()`` is an explicit poll (a POLL site);
* a call to another JIT function (defined in the module, or already known to
  the runtime) is a plain call to its name (a CALL site);
* any other callee is resolved in the process (an EXTERNAL site); calls of
  ``llvm.*`` intrinsics, inline asm and vararg functions are not sites (LLVM
  cannot wrap a vararg call in a statepoint): a frame waiting in one keeps
  running its version until the call returns.

The steps, per function:

1. *Prepare* (module-wide): parse and verify in an LLVM context of its own,
   promote allocas to SSA values (SROA), and give every unnamed argument,
   block and value a name: the source variable a debug record
   (``llvm.dbg.value`` with an empty expression) binds it to, else
   ``osrjit.t<hash>.<n>``, where ``<hash>`` digests the function's text: such
   a value never matches one of an edited version, so frames where one is
   live cannot transfer (a clear :class:`~osrjit.IncompatibleVersion`), while
   an unchanged function keeps its names. With ``polls``, a ``call void @osrjit_safepoint()`` is added
   after the entry block's allocas and after the phis of every block that a
   depth-first search enters through a back edge (every cycle has one).
2. *Analyse*: live values (backward dataflow over blocks; a phi's operand is
   live out of its predecessor only). The values live across a site are those
   live right after its call, minus the call's own result, in name order.
   Values are identified across versions by their IR names.
3. *Emit the normal entry* ``@"osrjit.fn.<name>"``: each site becomes
   ``gc.statepoint`` (ID: the stable id of ``(function, kind, callee, k-th
   occurrence)``) with a ``"deopt"`` bundle of the live values, and a
   ``gc.result`` under the call's own name; a poll becomes the flag load and
   the slow call (the sequence :meth:`osrjit.ir.BodyBuilder.poll` emits).
4. *Emit the resume entry* ``@"osrjit.fn.<name>__resume"(i64, ptr)``: the
   same body, in which every value live across a site, every used site
   result and every used parameter lives in an alloca (stored after its
   definition, loaded before each use; a phi's operand is loaded at the end
   of its predecessor). Each site's block is split after the call, and one
   block per site stores ``state[1 + i]`` and ``state[0]`` (the result) into
   the slots before branching there. The O2 pipeline turns the slots back
   into SSA values.

Limits of this first cut (each a :class:`~osrjit.CompileError` naming the
function, the value and its type): values crossing a site are ``i1``,
``i8``, ``i16``, ``i32``, ``i64``, ``float``, ``double`` or ``ptr``; a site
call's result is an integer or ``ptr`` (the transfer restores RAX, not
XMM0); no ``invoke``, ``callbr``, ``musttail`` or ``byval``-style calls
at sites, no vararg JIT functions; the address of a stack slot (an alloca that SROA could not
promote, or a pointer derived from one) cannot cross a site; a function's
address cannot be taken (only called); every global a function references
must be a constant (it is copied into each function's module) or external.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llvmlite import binding as llvm
from llvmlite import ir as llir

from .abi import (CALL_MODES, CALLS_DIRECT, GC_STRATEGY, HOOK_SYMBOL,
                  SAFEPOINT_FLAG_SYMBOL, SAFEPOINT_SLOW_SYMBOL, SLOT_PREFIX,
                  STATE_LIVE_BASE, STATE_RESULT_INDEX, FunctionIR, LiveValue,
                  SiteInfo, SiteKind, direct_call_symbol)
from .errors import CompileError, SignatureMismatch
from .ir import POLL_BRANCH_WEIGHTS, default_symbol, parse_module
from .lang.anf import site_id, site_key

__all__ = ["instrument", "is_plain_ir", "signature_of", "SAFEPOINT_SYMBOL",
           "LIVE_TYPES", "RESULT_TYPES"]

#: ``declare void @osrjit_safepoint()`` — an explicit poll in plain IR.
SAFEPOINT_SYMBOL = "osrjit_safepoint"
#: Types a value crossing a site may have (one 8-byte state slot each; the
#: frame map records each as a spill slot of its own size).
LIVE_TYPES = frozenset({"i1", "i8", "i16", "i32", "i64", "float", "double", "ptr"})
#: Types a site call may return: the transfer hands the resume entry RAX.
RESULT_TYPES = frozenset({"i1", "i8", "i16", "i32", "i64", "ptr"})

_GC_RESULT_SUFFIX = {"i1": "i1", "i8": "i8", "i16": "i16", "i32": "i32", "i64": "i64",
                     "ptr": "p0"}
_PREFIX = "osrjit."   # every name this module invents starts with it
_VK = llvm.ValueKind


# -- names as LLVM prints them ---------------------------------------------------

_BARE = re.compile(r"[-a-zA-Z$._][-a-zA-Z$._0-9]*\Z")
# A local name in printed IR (group 1), or a string literal (skipped).
_LOCAL_TOKEN = re.compile(r'(%"[^"]*"|%[-a-zA-Z$._0-9]+)|c?"[^"]*"')
_ESCAPE = re.compile(r"\\([0-9A-Fa-f]{2}|\\)")


def _ref(sigil: str, name: str) -> str:
    """``name`` as LLVM prints a reference to it: ``%x`` or ``%"x y"``."""
    if _BARE.match(name):
        return sigil + name
    escaped = "".join(c if c.isprintable() and c not in '"\\' else f"\\{ord(c):02X}"
                      for c in name)
    return f'{sigil}"{escaped}"'


def _unref(token: str) -> str:
    """The raw name of a printed ``%name`` / ``%"name"`` token."""
    body = token[1:]
    if body.startswith('"'):
        return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1), 16)),
                           body[1:-1])
    return body


def _local(name: str) -> str:
    return _ref("%", name)


def _substitute(text: str, replace: Mapping[str, str]) -> str:
    """``text`` with each local token whose raw name is in ``replace`` renamed
    to the printed reference ``replace[name]`` (string literals untouched)."""
    def sub(m):
        token = m.group(1)
        if token is None:
            return m.group(0)
        return replace.get(_unref(token), token)
    return _LOCAL_TOKEN.sub(sub, text)


# -- input -----------------------------------------------------------------------

_DEFINE_LINE = re.compile(r"^\s*define\b", re.M)


def is_plain_ir(source) -> bool:
    """True for an ``llvmlite.ir.Module`` or text with a ``define`` line (IR, not
    reference-language source)."""
    if isinstance(source, llir.Module):
        return True
    return isinstance(source, str) and _DEFINE_LINE.search(source) is not None


@functools.lru_cache(maxsize=1024)
def signature_of(module_ir: str, symbol: str) -> str:
    """The LLVM function type of ``@symbol`` in ``module_ir``, as LLVM prints it
    (``"double (double, i64)"``). Cached: the runtime asks for the current
    version of every known function."""
    fn = parse_module(module_ir).get_function(symbol)
    return str(fn.global_value_type)


def _text_of(module) -> str:
    if isinstance(module, llir.Module):
        return str(module)
    if isinstance(module, str):
        return module
    raise TypeError(f"expected LLVM IR text or an llvmlite.ir.Module, got "
                    f"{type(module).__name__}")


def _parse(text: str):
    try:
        mod = parse_module(text)
        mod.verify()
    except RuntimeError as e:
        raise CompileError(f"LLVM rejected the IR: {e}") from None
    return mod


def _promote(mod) -> None:
    """SROA: allocas only loaded and stored become SSA values (and phis)."""
    from .compiling import target_machine
    tm = target_machine(0)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=0))
    mpm = llvm.create_new_module_pass_manager()
    mpm.add_sroa_pass()
    mpm.run(mod, pb)


_DEBUG_VARIABLE = re.compile(r'^!(\d+) = !DILocalVariable\(name: "([^"]*)"', re.M)
# A debug record or intrinsic binding a value to a variable as it is (empty expression).
_DEBUG_VALUE = re.compile(
    r"(?:#dbg_value\(|call void @llvm\.dbg\.value\(metadata )[^%\n]*?"
    r'(%"[^"]*"|%[-a-zA-Z$._0-9]+), (?:metadata )?!(\d+), (?:metadata )?!DIExpression\(\)')


_DEFINE = re.compile(r'^define [^@]*@("[^"]*"|[-a-zA-Z$._0-9]+)\(', re.M)


def _function_texts(module_text: str) -> dict[str, str]:
    """Raw function name -> its definition, as the printed module has it
    (metadata numbered module-wide)."""
    out = {}
    for m in _DEFINE.finditer(module_text):
        end = module_text.find("\n}\n", m.start())
        out[_unref("%" + m.group(1))] = module_text[m.start():end + 2]
    return out


def _name_everything(fn, printed: str, variables: Mapping[str, str]) -> None:
    """Give every unnamed argument, block and non-void value of ``fn`` (whose
    definition, as the module prints it, is ``printed``) a name: the source
    variable a debug record binds it to (``variables``: metadata number ->
    ``DILocalVariable`` name), else ``osrjit.t<hash>.<n>``."""
    digest = hashlib.blake2b(printed.encode(), digest_size=4).hexdigest()
    bound = {}
    for ref, var in _DEBUG_VALUE.findall(printed):
        if var in variables:
            bound.setdefault(_unref(ref), variables[var])
    # LLVM numbers unnamed arguments, then per block the block and its
    # non-void instructions, in order: the numbers the debug records use.
    values = [a for a in fn.arguments]
    blocks = list(fn.blocks)
    for block in blocks:
        values.append(block)
        values.extend(i for i in block.instructions if str(i.type) != "void")
    unnamed = [v for v in values if not v.name]
    for number, value in enumerate(unnamed):
        name = bound.get(str(number))
        if name and not value.is_block:
            value.name = name
    n = 0
    for i, block in enumerate(blocks):
        if not block.name:
            block.name = f"{_PREFIX}b{i}"
    for value in values:
        if not value.name:
            value.name = f"{_PREFIX}t{digest}.{n}"
            n += 1


# -- the function model ----------------------------------------------------------

@dataclass
class _Operand:
    text: str            # typed, as in a call's argument list: "i64 %x", "ptr @g", "i64 5"
    value: str           # the value alone: "%x", "@g", "5"
    type: str
    local: str | None    # raw name of an argument or instruction, else None
    function: str | None = None  # raw name if the operand is a function
    asm: bool = False            # inline asm (a callee)


@dataclass
class _Site:
    key: str
    id: int
    kind: SiteKind
    callee: str | None        # a JIT function's or external symbol's name (None: indirect)
    fnty: str                 # the call's function type
    args: list[_Operand]
    callee_op: _Operand
    jit: bool                 # a call of a JIT function (slot, direct or self)
    live: tuple[LiveValue, ...] = ()
    metadata: str = ""        # the call's trailing ", !dbg !N" attachments


@dataclass
class _Inst:
    text: str                 # as printed, without indentation
    name: str | None          # defined value (raw), or None
    type: str
    opcode: str
    operands: list[_Operand]
    incoming: list[str] = field(default_factory=list)   # phi: predecessor per operand
    site: _Site | None = None


@dataclass
class _Block:
    name: str
    insts: list[_Inst]
    succs: list[str]


def _operand(op) -> _Operand:
    ty = str(op.type)
    kind = op.value_kind
    if kind in (_VK.argument, _VK.instruction):
        value = _local(op.name)
        return _Operand(f"{ty} {value}", value, ty, op.name)
    if kind == _VK.basic_block:
        value = _local(op.name)
        return _Operand(f"label {value}", value, "label", None)
    if kind in (_VK.function, _VK.global_variable, _VK.global_alias, _VK.global_ifunc):
        value = _ref("@", op.name)
        return _Operand(f"{ty} {value}", value, ty, None,
                        op.name if kind == _VK.function else None)
    if kind == _VK.inline_asm:
        return _Operand("", "", ty, None, asm=True)
    text = str(op).strip()
    value = text[len(ty) + 1:] if text.startswith(ty + " ") else text
    return _Operand(f"{ty} {value}", value, ty, None)


def _model(fn) -> list[_Block]:
    blocks = []
    for block in fn.blocks:
        insts = []
        for inst in block.instructions:
            ops = [_operand(o) for o in inst.operands]
            name = inst.name or None
            rec = _Inst(str(inst).strip(), name, str(inst.type), inst.opcode, ops)
            if inst.opcode == "phi":
                rec.incoming = [b.name for b in inst.incoming_blocks]
            insts.append(rec)
        term = insts[-1]
        succs = [o.value for o in term.operands if o.type == "label"]
        blocks.append(_Block(block.name, insts, [_unref(s) for s in succs]))
    return blocks


# -- polls -----------------------------------------------------------------------

def _poll_headers(blocks: list[_Block]) -> list[str]:
    """Blocks entered through a back edge of a depth-first search from the
    entry (every cycle contains one), in block order."""
    succs = {b.name: b.succs for b in blocks}
    state: dict[str, int] = {}   # 1: on the stack, 2: done
    headers = set()
    stack = [(blocks[0].name, iter(succs[blocks[0].name]))]
    state[blocks[0].name] = 1
    while stack:
        node, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            state[node] = 2
            stack.pop()
        elif state.get(nxt) == 1:
            headers.add(nxt)
        elif nxt not in state:
            state[nxt] = 1
            stack.append((nxt, iter(succs[nxt])))
    return [b.name for b in blocks if b.name in headers]


def _insert_polls(text: str, fn_names: set[str], mod) -> str:
    """``text`` (the prepared module, printed) with ``call void
    @osrjit_safepoint()`` after the entry block's allocas and after the phis
    of every loop header of the functions ``fn_names``."""
    where: dict[str, tuple[str, set[str]]] = {}
    for name in fn_names:
        fn = mod.get_function(name)
        blocks = _model(fn)
        where[name] = (blocks[0].name, set(_poll_headers(blocks)))
    out = []
    current = None
    entry_pending = False
    header_pending = False
    call = f"  call void {_ref('@', SAFEPOINT_SYMBOL)}()"
    for line in text.split("\n"):
        m = re.match(r"define [^@]*@(\"[^\"]*\"|[-a-zA-Z$._0-9]+)\(", line)
        if m:
            current = _unref("%" + m.group(1))
            current = current if current in where else None
            entry_pending = current is not None
            out.append(line)
            continue
        if current is None:
            out.append(line)
            continue
        if line == "}":
            current = None
            out.append(line)
            continue
        label = re.match(r'^("[^"]*"|[-a-zA-Z$._0-9]+):', line)
        if label:
            name = _unref("%" + label.group(1))
            header_pending = name in where[current][1] and not entry_pending
            out.append(line)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith(";"):
            out.append(line)
            continue
        is_alloca = re.match(r'%("[^"]*"|[-a-zA-Z$._0-9]+) = alloca\b', stripped)
        is_phi = re.match(r'%("[^"]*"|[-a-zA-Z$._0-9]+) = phi\b', stripped)
        if entry_pending and not is_alloca:
            out.append(call)
            entry_pending = False
        if header_pending and not is_phi:
            out.append(call)
            header_pending = False
        out.append(line)
    try:
        mod.get_function(SAFEPOINT_SYMBOL)
    except NameError:
        out.append(f"declare void {_ref('@', SAFEPOINT_SYMBOL)}()")
    return "\n".join(out)


# -- liveness --------------------------------------------------------------------

def _liveness(blocks: list[_Block]) -> dict[str, set[str]]:
    """Live-out set (raw names) of every block."""
    by_name = {b.name: b for b in blocks}
    use: dict[str, set[str]] = {}
    defs: dict[str, set[str]] = {}
    phi_out: dict[str, set[str]] = {b.name: set() for b in blocks}  # pred -> phi operands
    for b in blocks:
        u, d = set(), set()
        for inst in b.insts:
            if inst.opcode == "phi":
                for op, pred in zip(inst.operands, inst.incoming):
                    if op.local is not None and pred in phi_out:
                        phi_out[pred].add(op.local)
            else:
                u |= {o.local for o in inst.operands if o.local is not None} - d
            if inst.name is not None:
                d.add(inst.name)
        use[b.name], defs[b.name] = u, d
    live_in = {b.name: set() for b in blocks}
    live_out = {b.name: set() for b in blocks}
    changed = True
    while changed:
        changed = False
        for b in reversed(blocks):
            out = set(phi_out[b.name])
            for s in b.succs:
                out |= live_in[s]
            inn = use[b.name] | (out - defs[b.name])
            if out != live_out[b.name] or inn != live_in[b.name]:
                live_out[b.name], live_in[b.name] = out, inn
                changed = True
    del by_name
    return live_out


# -- one function ----------------------------------------------------------------

@dataclass
class _Context:
    name: str                       # the function being instrumented
    jit_types: Mapping[str, str]    # JIT function name -> its LLVM function type
    calls: str
    types: dict[str, str]           # raw local name -> type
    allocas: set[str]               # values that are (or point into) stack slots
    counts: dict[str, int] = field(default_factory=dict)


def _classify(ctx: _Context, inst: _Inst, fn_args_types) -> _Site | None:
    """The site a call instruction is, or None (intrinsics, inline asm)."""
    if inst.opcode in ("invoke", "callbr"):
        raise CompileError(f"{ctx.name}: {inst.opcode} is not supported ({inst.text})")
    if inst.opcode != "call":
        return None
    callee = inst.operands[-1]
    if callee.asm or (callee.function is not None and callee.function.startswith("llvm.")):
        return None
    if "musttail call" in inst.text:
        raise CompileError(f"{ctx.name}: musttail calls are not supported ({inst.text})")
    args = inst.operands[:-1]
    fnty = f"{inst.type} ({', '.join(a.type for a in args)})"
    target = callee.function
    declared = fn_args_types.get(target) if target is not None else None
    if (declared is not None and declared.endswith("...)")) or (
            target is None and re.search(r"\.\.\.\) %", inst.text)):
        if target is not None and target in ctx.jit_types:
            raise CompileError(f"{ctx.name}: JIT function {target!r} is vararg; JIT functions "
                               f"cannot be vararg")
        # LLVM cannot wrap a vararg call in a statepoint (the verifier refuses
        # non-void ones, and none sets AL): it stays a plain call, and a frame
        # waiting in it keeps running its version until the call returns.
        return None
    for bad in ("byval", "sret", "inalloca", "preallocated"):
        if re.search(rf"\b{bad}\b", inst.text):
            raise CompileError(f"{ctx.name}: a {bad} argument cannot be passed at a site "
                               f"({inst.text})")
    if target == HOOK_SYMBOL:
        kind, jit = SiteKind.HOOK, False
        if fnty != "i64 (i64)":
            raise CompileError(f"{ctx.name}: @{HOOK_SYMBOL} is i64 (i64), called as {fnty}")
    elif target == SAFEPOINT_SYMBOL:
        kind, jit = SiteKind.POLL, False
        if fnty != "void ()":
            raise CompileError(f"{ctx.name}: @{SAFEPOINT_SYMBOL} is void (), called as {fnty}")
    elif target is not None and target in ctx.jit_types:
        kind, jit = SiteKind.CALL, True
        defined = ctx.jit_types[target]
        if defined != fnty:
            raise CompileError(f"{ctx.name}: call of JIT function {target!r} as {fnty}, but "
                               f"{target!r} is {defined}")
    else:
        kind, jit = SiteKind.EXTERNAL, False
    if inst.type != "void" and inst.type not in RESULT_TYPES:
        what = "cannot be resumed yet: the transfer restores RAX only, not XMM0" \
            if inst.type in ("float", "double") else "is not supported at a site"
        raise CompileError(f"{ctx.name}: the call {inst.text!r} returns {inst.type}, which "
                           f"{what} (result types at sites: {', '.join(sorted(RESULT_TYPES))})")
    label = target if target is not None else "indirect"
    ordinal_key = f"{kind.value}:{label}"
    k = ctx.counts.get(ordinal_key, 0)
    ctx.counts[ordinal_key] = k + 1
    key = site_key(ctx.name, kind, label, k)
    meta = ""
    m = re.search(r"((?:, ![-a-zA-Z$._0-9]+ !\d+)+)$", inst.text)
    if m:
        meta = m.group(1)
    return _Site(key, site_id(key), kind, target, fnty, args, callee, jit, metadata=meta)


def _derived_from_alloca(blocks: list[_Block]) -> set[str]:
    """Values that are stack slots or pointers computed from one."""
    out = set()
    changed = True
    while changed:
        changed = False
        for b in blocks:
            for inst in b.insts:
                if inst.name is None or inst.name in out:
                    continue
                if inst.opcode == "alloca" or (
                        inst.opcode in ("getelementptr", "bitcast", "addrspacecast", "phi",
                                        "select") and
                        any(o.local in out for o in inst.operands)):
                    out.add(inst.name)
                    changed = True
    return out


class _Emitter:
    """Emits the normal and the resume entry of one function."""

    def __init__(self, ctx: _Context, blocks: list[_Block], params: list[tuple[str, str]],
                 ret: str, attrs: str, prof: str):
        self.ctx, self.blocks, self.params, self.ret = ctx, blocks, params, ret
        self.attrs = attrs
        self.prof = prof
        self.symbol = default_symbol(ctx.name)
        self.sites = [i.site for b in blocks for i in b.insts if i.site is not None]
        self.slots: set[str] = set()        # global cells referenced
        self.direct: set[str] = set()       # direct-call symbols declared: name -> fnty
        self.direct_types: dict[str, str] = {}
        self.uses_poll = any(s.kind is SiteKind.POLL for s in self.sites)
        self.uses_result: set[str] = set()
        self.counter = 0

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{_PREFIX}{base}.{self.counter}"

    # -- sites ----------------------------------------------------------------

    def _callee(self, site: _Site, value) -> tuple[list[str], str]:
        """(lines to emit first, the statepoint's callee operand text)."""
        if not site.jit:
            if site.callee is None:
                return [], value(site.callee_op)
            name = SAFEPOINT_SLOW_SYMBOL if site.kind is SiteKind.POLL else site.callee
            return [], _ref("@", name)
        if site.callee == self.ctx.name:
            return [], _ref("@", self.symbol)
        if self.ctx.calls == CALLS_DIRECT:
            self.direct.add(site.callee)
            self.direct_types[site.callee] = site.fnty
            return [], _ref("@", direct_call_symbol(site.callee))
        self.slots.add(site.callee)
        cell = _local(self.fresh("slot"))
        return [f"{cell} = load ptr, ptr {_ref('@', SLOT_PREFIX + site.callee)}"], cell

    def _statepoint(self, site: _Site, inst: _Inst, value) -> list[str]:
        """The statepoint (+ gc.result) lines of ``site`` in the current block."""
        fnty = "void ()" if site.kind is SiteKind.POLL else site.fnty
        lines, callee = self._callee(site, value)
        args = [] if site.kind is SiteKind.POLL else \
            [f"{a.type} {value(a)}" for a in site.args]
        deopt = ", ".join(f"{lv.type} {value(_Operand('', _local(lv.name), lv.type, lv.name))}"
                          for lv in site.live)
        fields = [f"i64 {site.id}", "i32 0", f"ptr elementtype({fnty}) {callee}",
                  f"i32 {len(args)}", "i32 0", *args, "i32 0", "i32 0"]
        token = _local(f"{_PREFIX}site.{site.id}")
        lines.append(f"{token} = call token (i64, i32, ptr, i32, i32, ...) "
                     f"@llvm.experimental.gc.statepoint.p0({', '.join(fields)}) "
                     f"[ \"deopt\"({deopt}) ]{site.metadata}")
        if inst.type != "void" and inst.name is not None:
            suffix = _GC_RESULT_SUFFIX[inst.type]
            self.uses_result.add(inst.type)
            lines.append(f"{_local(inst.name)} = call {inst.type} "
                         f"@llvm.experimental.gc.result.{suffix}(token {token}){site.metadata}")
        return lines

    def _poll_head(self, site: _Site) -> list[str]:
        flag = _local(self.fresh("safepoint.flag"))
        stop = _local(self.fresh("safepoint.stop"))
        return [f"{flag} = load volatile i64, ptr {_ref('@', SAFEPOINT_FLAG_SYMBOL)}",
                f"{stop} = icmp ne i64 {flag}, 0",
                f"br i1 {stop}, label {_local(f'{_PREFIX}poll.{site.id}')}, "
                f"label {_local(f'{_PREFIX}after.{site.id}')}, !prof {self.prof}"]

    # -- the two entries ------------------------------------------------------

    def exits(self, resume: bool) -> dict[str, str]:
        """Block name -> name of the block that holds its terminator in the output."""
        out = {}
        for b in self.blocks:
            last = b.name
            for inst in b.insts:
                if inst.site is not None and (resume or inst.site.kind is SiteKind.POLL):
                    last = f"{_PREFIX}after.{inst.site.id}"
            out[b.name] = last
        return out

    def body(self, resume: bool, demoted: set[str]) -> list[str]:
        exits = self.exits(resume)
        out: list[str] = []
        var = {v: _local(f"{_PREFIX}var.{v}") for v in demoted}

        def emit_block_lines(b: _Block):
            pending_phi_stores = []
            phis_done = False
            loads_here: dict[str, str] = {}

            def value(op: _Operand) -> str:
                if op.local is not None and op.local in demoted:
                    name = _local(self.fresh(f"l.{op.local}"))
                    out.append(f"  {name} = load {op.type}, ptr {var[op.local]}")
                    return name
                return op.value

            for idx, inst in enumerate(b.insts):
                if inst.opcode != "phi" and not phis_done:
                    phis_done = True
                    for line in pending_phi_stores:
                        out.append(line)
                if inst.opcode == "phi":
                    ops = []
                    for op, pred in zip(inst.operands, inst.incoming):
                        v = op.value
                        if op.local is not None and op.local in demoted:
                            v = _local(edge_loads[(pred, op.local)])
                        ops.append(f"[ {v}, {_local(exits[pred])} ]")
                    out.append(f"  {_local(inst.name)} = phi {inst.type} {', '.join(ops)}")
                    if inst.name in demoted:
                        pending_phi_stores.append(
                            f"  store {inst.type} {_local(inst.name)}, ptr {var[inst.name]}")
                    continue
                is_term = idx == len(b.insts) - 1
                if is_term:
                    # phi operands of the successors flowing along this block's edges
                    for (pred, v), load_name in edge_loads.items():
                        if pred == b.name:
                            out.append(f"  {_local(load_name)} = load {self.ctx.types[v]}, "
                                       f"ptr {var[v]}")
                site = inst.site
                if site is None:
                    text = inst.text
                    if resume:
                        replace = {}
                        for op in inst.operands:
                            if op.local is not None and op.local in demoted \
                                    and op.local not in replace:
                                replace[op.local] = value(op)
                        text = _substitute(text, replace)
                    out.append(f"  {text}")
                    if inst.name is not None and inst.name in demoted:
                        out.append(f"  store {inst.type} {_local(inst.name)}, "
                                   f"ptr {var[inst.name]}")
                    continue
                if site.kind is SiteKind.POLL:
                    out.extend(f"  {line}" for line in self._poll_head(site))
                    out.append(f"{_local(f'{_PREFIX}poll.{site.id}')[1:]}:")
                    lines = self._statepoint(site, inst, value)
                    out.extend(f"  {line}" for line in lines)
                    out.append(f"  br label {_local(f'{_PREFIX}after.{site.id}')}")
                    out.append(f"{_local(f'{_PREFIX}after.{site.id}')[1:]}:")
                    continue
                lines = self._statepoint(site, inst, value)
                out.extend(f"  {line}" for line in lines)
                if inst.name is not None and inst.name in demoted:
                    out.append(f"  store {inst.type} {_local(inst.name)}, ptr {var[inst.name]}")
                if resume:
                    after = _local(f"{_PREFIX}after.{site.id}")
                    out.append(f"  br label {after}")
                    out.append(f"{after[1:]}:")

        # loads of demoted phi operands, at the end of each predecessor
        edge_loads: dict[tuple[str, str], str] = {}
        if resume:
            for b in self.blocks:
                for inst in b.insts:
                    if inst.opcode != "phi":
                        break
                    for op, pred in zip(inst.operands, inst.incoming):
                        if op.local is not None and op.local in demoted:
                            edge_loads.setdefault((pred, op.local), self.fresh(f"e.{op.local}"))

        for i, b in enumerate(self.blocks):
            out.append(f"{_local(b.name)[1:]}:")
            emit_block_lines(b)
        return out

    def normal(self) -> str:
        params = ", ".join(f"{t} {_local(n)}" for n, t in self.params)
        head = (f"define {self.ret} {_ref('@', self.symbol)}({params}){self.attrs} uwtable "
                f"gc \"{GC_STRATEGY}\" {{")
        return "\n".join([head, *self.body(False, set()), "}"])

    def resume(self, demoted: set[str]) -> str:
        args = (f"i64 {_local(_PREFIX + 'site_id')}", f"ptr {_local(_PREFIX + 'state')}")
        head = (f"define {self.ret} {_ref('@', self.symbol + '__resume')}({', '.join(args)})"
                f"{self.attrs} uwtable gc \"{GC_STRATEGY}\" {{")
        types = self.ctx.types
        state = _local(_PREFIX + "state")
        lines = [f"{_PREFIX}resume.entry:"]
        for v in sorted(demoted):
            lines.append(f"  {_local(_PREFIX + 'var.' + v)} = alloca {types[v]}")
        cases = " ".join(f"i64 {s.id}, label {_local(f'{_PREFIX}resume.{s.id}')}"
                         for s in self.sites)
        lines.append(f"  switch i64 {_local(_PREFIX + 'site_id')}, label "
                     f"{_local(_PREFIX + 'resume.unknown')} [ {cases} ]")
        lines += [f"{_PREFIX}resume.unknown:", "  call void @llvm.trap()", "  unreachable"]
        results = {}
        for b in self.blocks:
            for inst in b.insts:
                if inst.site is not None:
                    results[inst.site.id] = inst
        for s in self.sites:
            lines.append(f"{_PREFIX}resume.{s.id}:")
            slots = [(lv.name, lv.type, STATE_LIVE_BASE + i) for i, lv in enumerate(s.live)]
            inst = results[s.id]
            if inst.name is not None and inst.name in demoted:
                slots.append((inst.name, inst.type, STATE_RESULT_INDEX))
            for name, ty, index in slots:
                addr = _local(self.fresh("state.addr"))
                val = _local(self.fresh("state.value"))
                lines.append(f"  {addr} = getelementptr inbounds i64, ptr {state}, i64 {index}")
                lines.append(f"  {val} = load {ty}, ptr {addr}")
                lines.append(f"  store {ty} {val}, ptr {_local(_PREFIX + 'var.' + name)}")
            lines.append(f"  br label {_local(f'{_PREFIX}after.{s.id}')}")
        # The original entry block is no entry any more: a block with no
        # predecessors LLVM deletes (the resume never reaches code before a site
        # other than through a site's continuation).
        body = self.body(True, demoted)
        return "\n".join([head, *lines, *body, "}"])


def _function_ir(ctx: _Context, fn, module_globals: str, prof_id: int,
                 declared_types: Mapping[str, str]) -> FunctionIR:
    blocks = _model(fn)
    for arg in fn.arguments:
        ctx.types[arg.name] = str(arg.type)
    for b in blocks:
        for inst in b.insts:
            if inst.name is not None:
                ctx.types[inst.name] = inst.type
            inst.site = _classify(ctx, inst, declared_types)
            for op in (inst.operands if inst.site is None else
                       [*inst.site.args]):
                if op.function is not None and op.function in ctx.jit_types:
                    raise CompileError(
                        f"{ctx.name}: the address of JIT function {op.function!r} is taken "
                        f"({inst.text}); JIT functions can only be called")
    ctx.allocas = _derived_from_alloca(blocks)
    live_out = _liveness(blocks)
    demoted: set[str] = set()
    used: set[str] = set()
    for b in blocks:
        for inst in b.insts:
            used |= {o.local for o in inst.operands if o.local is not None}
    for b in blocks:
        live = set(live_out[b.name])
        for inst in reversed(b.insts):
            if inst.site is not None:
                across = sorted(live - {inst.name})
                for v in across:
                    ty = ctx.types[v]
                    if ty not in LIVE_TYPES:
                        raise CompileError(
                            f"{ctx.name}: value %{v} of type {ty} is live across the call "
                            f"{inst.text!r}; values crossing a site are "
                            f"{', '.join(sorted(LIVE_TYPES))}")
                    if v in ctx.allocas:
                        raise CompileError(
                            f"{ctx.name}: %{v} points into the function's stack frame and is "
                            f"live across the call {inst.text!r}; a frame's stack slots cannot "
                            f"be transferred (keep the data in SSA values or on the heap)")
                inst.site.live = tuple(LiveValue(v, ctx.types[v]) for v in across)
                demoted |= set(across)
                if inst.name is not None and inst.name in used:
                    demoted.add(inst.name)
            if inst.name is not None:
                live.discard(inst.name)
            if inst.opcode != "phi":
                live |= {o.local for o in inst.operands if o.local is not None}
    params = [(a.name, str(a.type)) for a in fn.arguments]
    demoted |= {n for n, _ in params if n in used}
    attrs = _header_attrs(ctx.name, _header_of(fn))
    em = _Emitter(ctx, blocks, params, _return_type(fn), attrs, f"!{prof_id}")
    normal = em.normal()
    resume = em.resume(demoted)
    decls = []
    for name in sorted(em.slots):
        decls.append(f"{_ref('@', SLOT_PREFIX + name)} = external global ptr")
    for name in sorted(em.direct):
        ret, args = _split_fnty(em.direct_types[name])
        decls.append(f"declare {ret} {_ref('@', direct_call_symbol(name))}({args})")
    if em.uses_poll:
        decls.append(f"{_ref('@', SAFEPOINT_FLAG_SYMBOL)} = external global i64")
        decls.append(f"declare void {_ref('@', SAFEPOINT_SLOW_SYMBOL)}()")
    decls.append("declare token @llvm.experimental.gc.statepoint.p0(i64, i32, ptr, i32, "
                 "i32, ...)")
    for ty in sorted(em.uses_result):
        decls.append(f"declare {ty} @llvm.experimental.gc.result.{_GC_RESULT_SUFFIX[ty]}(token)")
    decls.append("declare void @llvm.trap()")
    slow, fast = POLL_BRANCH_WEIGHTS
    prof = f"!{prof_id} = !{{!\"branch_weights\", i32 {slow}, i32 {fast}}}"
    text = "\n".join([module_globals, normal, "", resume, "", *decls, prof, ""])
    sites = {s.id: SiteInfo(id=s.id, kind=s.kind,
                            callee=SAFEPOINT_SLOW_SYMBOL if s.kind is SiteKind.POLL else s.callee,
                            live=s.live, has_result=_has_result(s, blocks))
             for s in em.sites}
    jit_callees = {s.callee for s in em.sites if s.jit and s.callee != ctx.name}
    return FunctionIR(name=ctx.name, params=tuple(n for n, _ in params), module_ir=text,
                      symbol=em.symbol, sites=sites, callees=frozenset(jit_callees),
                      return_type=em.ret, direct_callees=frozenset(em.direct))


def _has_result(site: _Site, blocks) -> bool:
    return not site.fnty.startswith("void ")


def _split_fnty(fnty: str) -> tuple[str, str]:
    ret, args = fnty.split(" (", 1)
    return ret, args[:-1]


def _return_type(fn) -> str:
    return str(fn.global_value_type).split(" (", 1)[0]


def _header_of(fn) -> str:
    for line in str(fn).split("\n"):
        if line.startswith("define "):
            return line
    raise CompileError(f"{fn.name}: no define line")  # pragma: no cover


def _header_attrs(name: str, header: str) -> str:
    """The function attributes of a ``define`` line worth keeping: ``#N``
    attribute groups (and only those)."""
    if " personality " in header:
        raise CompileError(f"{name}: functions with a personality are not supported")
    if " prefix " in header or " prologue " in header:
        raise CompileError(f"{name}: prefix and prologue data are not supported")
    tail = header.rsplit(")", 1)[-1]
    groups = re.findall(r"#\d+", tail)
    return "".join(f" {g}" for g in groups)


def _module_globals(text: str, defined: set[str], mod) -> str:
    """Everything of the printed module but function definitions and the
    declarations of the functions it defines: globals, other declarations,
    attribute groups and metadata. Mutable global variables are refused."""
    for g in mod.global_variables:
        if g.is_declaration:
            continue
        if not re.search(r"\bconstant\b", str(g).split("=", 1)[1].split(",", 1)[0]):
            raise CompileError(f"global @{g.name} is mutable: a module's functions become "
                               f"separate versions, which cannot share a mutable global; "
                               f"make it a constant or an external global")
        for token in re.findall(r'@("[^"]*"|[-a-zA-Z$._0-9]+)', str(g).split("=", 1)[1]):
            if _unref("%" + token) in defined:
                raise CompileError(f"global @{g.name} holds the address of JIT function "
                                   f"{_unref('%' + token)!r}; JIT functions can only be called")
    out = []
    skip = False
    for line in text.split("\n"):
        if line.startswith("define "):
            skip = True
            continue
        if skip:
            if line == "}":
                skip = False
            continue
        m = re.match(r"declare [^@]*@(\"[^\"]*\"|[-a-zA-Z$._0-9]+)\(", line)
        if m:
            name = _unref("%" + m.group(1))
            if name in defined or name == SAFEPOINT_SYMBOL or name.startswith(
                    ("llvm.experimental.gc.", "llvm.trap")):
                continue
        if line.startswith("source_filename") or line.startswith("; ModuleID"):
            continue
        out.append(line)
    # internal constants would be defined in every function's module: fine;
    # make them private copies so no two libraries export the same symbol.
    return "\n".join(out)


def _max_metadata_id(text: str) -> int:
    ids = [int(m) for m in re.findall(r"^!(\d+) =", text, re.M)]
    return max(ids, default=-1)


def instrument(module, *, known_signatures: Mapping[str, str] | None = None,
               polls: bool = True, calls: str = "slot") -> list[FunctionIR]:
    """Instrument every function ``module`` defines; one FunctionIR each.

    ``module``: LLVM IR text or an :class:`llvmlite.ir.Module` of ordinary
    functions (see the module docstring for the conventions).
    ``known_signatures``: name -> LLVM function type (``"i64 (i64)"``) of the
    JIT functions already compiled: calls to them are CALL sites, and a
    function redefined here must keep its type (:class:`SignatureMismatch`
    otherwise). ``polls``: safepoint polls at function entry and loop headers.
    ``calls``: ``"slot"`` or ``"direct"`` (see :mod:`osrjit.abi`).
    Raises :class:`CompileError` for IR LLVM rejects or that this first cut
    cannot instrument (naming the function, value and type).
    """
    if calls not in CALL_MODES:
        raise CompileError(f"calls={calls!r}, expected one of {CALL_MODES}")
    known = dict(known_signatures or {})
    with _parsed(_text_of(module)) as mod:
        names, own, text = _prepare(mod, known, polls)
    jit_types = {**known, **own}
    with _parsed(text) as mod:
        declared = {f.name: str(f.global_value_type) for f in mod.functions}
        globals_text = _module_globals(text, set(names), mod)
        prof_id = _max_metadata_id(text) + 1
        out = []
        for name in names:
            ctx = _Context(name, jit_types, calls, {}, set())
            out.append(_function_ir(ctx, mod.get_function(name), globals_text, prof_id,
                                    declared))
    return out


@contextlib.contextmanager
def _parsed(text: str):
    """The verified module of ``text``, closed on the way out. Closing it
    explicitly matters when an error is raised: a traceback that keeps the
    module alive can end in a reference cycle, and the garbage collector may
    then free the module's LLVM context before the module (a crash)."""
    mod = _parse(text)
    try:
        yield mod
    finally:
        mod.close()


def _prepare(mod, known: Mapping[str, str], polls: bool):
    """Step 1 on ``mod``: returns (defined names, name -> function type,
    the prepared module's text with polls inserted)."""
    defined = [f for f in mod.functions if not f.is_declaration]
    if not defined:
        raise CompileError("the module defines no function")
    names = [f.name for f in defined]
    for name in names:
        if name.startswith(("llvm.", _PREFIX)) or name in (HOOK_SYMBOL, SAFEPOINT_SYMBOL):
            raise CompileError(f"cannot define a JIT function named {name!r}")
    own = {f.name: str(f.global_value_type) for f in defined}
    for name, sig in own.items():
        if sig.endswith("...)"):
            raise CompileError(f"{name}: JIT functions cannot be vararg ({sig})")
        old = known.get(name)
        if old is not None and old != sig:
            raise SignatureMismatch(name, old, sig)
    _promote(mod)
    printed = str(mod)
    variables = dict(_DEBUG_VARIABLE.findall(printed))
    texts = _function_texts(printed)
    for fn in defined:
        _name_everything(fn, texts[fn.name], variables)
    for g in mod.global_variables:
        if not g.is_declaration:
            g.linkage = "internal"   # a private copy in every function's module
    text = str(mod)
    if polls:
        text = _insert_polls(text, set(names), mod)
    return names, own, text


def known_signatures(functions: Iterable) -> dict[str, str]:
    """name -> LLVM function type of each :class:`osrjit.versions.Function`'s
    current version (the runtime's table)."""
    out = {}
    for fn in functions:
        v = fn.current
        if v is not None:
            out[fn.name] = signature_of(v.ir.module_ir, v.ir.symbol)
    return out
