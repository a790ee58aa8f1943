"""Sites and emission for :mod:`osrjit.plainir`: which calls are sites, and
the normal and resume entries of one function as LLVM IR text."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..abi import (CALLS_DIRECT, ERROR_SYMBOL, GC_STRATEGY, HOOK_SYMBOL, SAFEPOINT_FLAG_SYMBOL,
                   SAFEPOINT_SLOW_SYMBOL, SLOT_PREFIX, STACK_LIMIT_SYMBOL, STACK_OVERFLOW_SYMBOL,
                   STATE_LIVE_BASE, STATE_RESULT_INDEX,
                   FunctionIR, LiveValue, SiteInfo, SiteKind, direct_call_symbol)
from ..errors import CompileError
from ..ir import POLL_BRANCH_WEIGHTS, default_symbol
from ..lang.anf import site_id, site_key
from .model import (PREFIX, SAFEPOINT_SYMBOL, Block, Inst, Operand, Site, lref, live_out_sets,
                    model_of, ref, stack_derived, substitute)

#: Types a value crossing a site may have (one 8-byte state slot each; the
#: frame map records each as a spill slot of its own size).
LIVE_TYPES = frozenset({"i1", "i8", "i16", "i32", "i64", "float", "double", "ptr"})
#: Types a site call may return: the transfer hands the resume entry RAX.
RESULT_TYPES = frozenset({"i1", "i8", "i16", "i32", "i64", "ptr"})

_GC_RESULT_SUFFIX = {"i1": "i1", "i8": "i8", "i16": "i16", "i32": "i32", "i64": "i64",
                     "ptr": "p0"}


# -- one function ----------------------------------------------------------------

@dataclass
class Context:
    """What instrumenting one function needs beyond the function itself."""
    name: str                       # the function being instrumented
    jit_types: Mapping[str, str]    # JIT function name -> its LLVM function type
    calls: str                      # "slot" or "direct"
    header: str                     # its ``define`` line, as the module prints it
    locations: Mapping[str, tuple[int, int]]   # DILocation number -> (line, column)
    types: dict[str, str] = field(default_factory=dict)   # raw local name -> type
    allocas: set[str] = field(default_factory=set)        # values pointing into the frame
    counts: dict[str, int] = field(default_factory=dict)  # site ordinals so far


def classify(ctx: Context, inst: Inst, fn_args_types) -> Site | None:
    """The site a call instruction is, or None (intrinsics, inline asm)."""
    if inst.opcode in ("invoke", "callbr"):
        raise CompileError(f"{ctx.name}: {inst.opcode} is not supported ({inst.text})")
    if inst.opcode != "call":
        return None
    callee = inst.operands[-1]
    if callee.asm or (callee.function is not None and (
            callee.function.startswith("llvm.") or callee.function == ERROR_SYMBOL)):
        return None     # intrinsics, inline asm, @osrjit_error (see osrjit.abi)
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
    dbg = re.search(r"!dbg !(\d+)", meta)
    line, col = ctx.locations.get(dbg.group(1), (None, None)) if dbg else (None, None)
    return Site(key, site_id(key), kind, target, fnty, args, callee, jit, metadata=meta,
                line=line, col=col)


class _Emitter:
    """Emits the normal and the resume entry of one function."""

    def __init__(self, ctx: Context, blocks: list[Block], params: list[tuple[str, str]],
                 ret: str, attrs: str, prof: str, stack_check: str | None = None):
        self.ctx, self.blocks, self.params, self.ret = ctx, blocks, params, ret
        #: The ``metadata !N`` of ``!{!"rsp"}`` when the normal entry checks
        #: the stack (see :meth:`osrjit.ir.BodyBuilder.stack_check`), else None.
        self.stack_check = stack_check
        self.attrs = attrs
        self.prof = prof
        self.symbol = default_symbol(ctx.name)
        self.sites = [i.site for b in blocks for i in b.insts if i.site is not None]
        self.slots: set[str] = set()        # global cells referenced
        self.direct: set[str] = set()       # JIT functions called directly
        self.direct_types: dict[str, str] = {}   # ... and their function types
        self.uses_poll = any(s.kind is SiteKind.POLL for s in self.sites)
        self.uses_result: set[str] = set()
        self.counter = 0

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{PREFIX}{base}.{self.counter}"

    # -- sites ----------------------------------------------------------------

    def _callee(self, site: Site, value) -> tuple[list[str], str]:
        """(lines to emit first, the statepoint's callee operand text)."""
        if not site.jit:
            if site.callee is None:
                return [], value(site.callee_op)
            name = SAFEPOINT_SLOW_SYMBOL if site.kind is SiteKind.POLL else site.callee
            return [], ref("@", name)
        if site.callee == self.ctx.name:
            return [], ref("@", self.symbol)
        if self.ctx.calls == CALLS_DIRECT:
            self.direct.add(site.callee)
            self.direct_types[site.callee] = site.fnty
            return [], ref("@", direct_call_symbol(site.callee))
        self.slots.add(site.callee)
        cell = lref(self.fresh("slot"))
        return [f"{cell} = load ptr, ptr {ref('@', SLOT_PREFIX + site.callee)}"], cell

    def _statepoint(self, site: Site, inst: Inst, value) -> list[str]:
        """The statepoint (+ gc.result) lines of ``site`` in the current block."""
        fnty = "void ()" if site.kind is SiteKind.POLL else site.fnty
        lines, callee = self._callee(site, value)
        args = [] if site.kind is SiteKind.POLL else \
            [f"{a.type} {value(a)}" for a in site.args]
        deopt = ", ".join(f"{lv.type} {value(Operand('', lref(lv.name), lv.type, lv.name))}"
                          for lv in site.live)
        fields = [f"i64 {site.id}", "i32 0", f"ptr elementtype({fnty}) {callee}",
                  f"i32 {len(args)}", "i32 0", *args, "i32 0", "i32 0"]
        token = lref(f"{PREFIX}site.{site.id}")
        lines.append(f"{token} = call token (i64, i32, ptr, i32, i32, ...) "
                     f"@llvm.experimental.gc.statepoint.p0({', '.join(fields)}) "
                     f"[ \"deopt\"({deopt}) ]{site.metadata}")
        if inst.type != "void" and inst.name is not None:
            suffix = _GC_RESULT_SUFFIX[inst.type]
            self.uses_result.add(inst.type)
            lines.append(f"{lref(inst.name)} = call {inst.type} "
                         f"@llvm.experimental.gc.result.{suffix}(token {token}){site.metadata}")
        return lines

    def _poll_head(self, site: Site) -> list[str]:
        flag = lref(self.fresh("safepoint.flag"))
        stop = lref(self.fresh("safepoint.stop"))
        return [f"{flag} = load volatile i64, ptr {ref('@', SAFEPOINT_FLAG_SYMBOL)}",
                f"{stop} = icmp ne i64 {flag}, 0",
                f"br i1 {stop}, label {lref(f'{PREFIX}poll.{site.id}')}, "
                f"label {lref(f'{PREFIX}after.{site.id}')}, !prof {self.prof}"]

    def _stack_check_head(self) -> list[str]:
        """The entry stack check: RSP against the thread's limit at ``%fs:<offset>``."""
        limit = lref(self.fresh("stack.limit"))
        sp = lref(self.fresh("stack.sp"))
        low = lref(self.fresh("stack.low"))
        tls = (f"inttoptr (i64 ptrtoint (ptr {ref('@', STACK_LIMIT_SYMBOL)} to i64) "
               f"to ptr addrspace(257))")
        return [f"{limit} = load i64, ptr addrspace(257) {tls}",
                f"{sp} = call i64 @llvm.read_register.i64(metadata {self.stack_check})",
                f"{low} = icmp ult i64 {sp}, {limit}",
                f"br i1 {low}, label {lref(PREFIX + 'stack.overflow')}, "
                f"label {lref(PREFIX + 'stack.ok')}, !prof {self.prof}"]

    # -- the two entries ------------------------------------------------------

    def exits(self, resume: bool) -> dict[str, str]:
        """Block name -> name of the block that holds its terminator in the output."""
        out = {}
        for i, b in enumerate(self.blocks):
            last = b.name
            if i == 0 and self.stack_check and not resume:
                last = f"{PREFIX}stack.ok"
            for inst in b.insts:
                if inst.site is not None and (resume or inst.site.kind is SiteKind.POLL):
                    last = f"{PREFIX}after.{inst.site.id}"
            out[b.name] = last
        return out

    def body(self, resume: bool, demoted: set[str]) -> list[str]:
        exits = self.exits(resume)
        out: list[str] = []
        var = {v: lref(f"{PREFIX}var.{v}") for v in demoted}

        def emit_block_lines(b: Block):
            pending_phi_stores = []
            phis_done = False

            def value(op: Operand) -> str:
                if op.local is not None and op.local in demoted:
                    name = lref(self.fresh(f"l.{op.local}"))
                    out.append(f"  {name} = load {op.type}, ptr {var[op.local]}")
                    return name
                return op.value

            check = self.stack_check is not None and not resume and b is self.blocks[0]
            for idx, inst in enumerate(b.insts):
                if check and inst.opcode != "alloca":
                    check = False
                    out.extend(f"  {line}" for line in self._stack_check_head())
                    out.append(f"{PREFIX}stack.overflow:")
                    out.append(f"  call void {ref('@', STACK_OVERFLOW_SYMBOL)}()")
                    out.append(f"  br label {lref(PREFIX + 'stack.ok')}")
                    out.append(f"{PREFIX}stack.ok:")
                if inst.opcode != "phi" and not phis_done:
                    phis_done = True
                    for line in pending_phi_stores:
                        out.append(line)
                if inst.opcode == "phi":
                    ops = []
                    for op, pred in zip(inst.operands, inst.incoming):
                        v = op.value
                        if op.local is not None and op.local in demoted:
                            v = lref(edge_loads[(pred, op.local)])
                        ops.append(f"[ {v}, {lref(exits[pred])} ]")
                    out.append(f"  {lref(inst.name)} = phi {inst.type} {', '.join(ops)}")
                    if inst.name in demoted:
                        pending_phi_stores.append(
                            f"  store {inst.type} {lref(inst.name)}, ptr {var[inst.name]}")
                    continue
                is_term = idx == len(b.insts) - 1
                if is_term:
                    # phi operands of the successors flowing along this block's edges
                    for (pred, v), load_name in edge_loads.items():
                        if pred == b.name:
                            out.append(f"  {lref(load_name)} = load {self.ctx.types[v]}, "
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
                        text = substitute(text, replace)
                    out.append(f"  {text}")
                    if inst.name is not None and inst.name in demoted:
                        out.append(f"  store {inst.type} {lref(inst.name)}, "
                                   f"ptr {var[inst.name]}")
                    continue
                if site.kind is SiteKind.POLL:
                    out.extend(f"  {line}" for line in self._poll_head(site))
                    out.append(f"{lref(f'{PREFIX}poll.{site.id}')[1:]}:")
                    lines = self._statepoint(site, inst, value)
                    out.extend(f"  {line}" for line in lines)
                    out.append(f"  br label {lref(f'{PREFIX}after.{site.id}')}")
                    out.append(f"{lref(f'{PREFIX}after.{site.id}')[1:]}:")
                    continue
                lines = self._statepoint(site, inst, value)
                out.extend(f"  {line}" for line in lines)
                if inst.name is not None and inst.name in demoted:
                    out.append(f"  store {inst.type} {lref(inst.name)}, ptr {var[inst.name]}")
                if resume:
                    after = lref(f"{PREFIX}after.{site.id}")
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

        for b in self.blocks:
            out.append(f"{lref(b.name)[1:]}:")
            emit_block_lines(b)
        return out

    def normal(self) -> str:
        params = ", ".join(f"{t} {lref(n)}" for n, t in self.params)
        head = (f"define {self.ret} {ref('@', self.symbol)}({params}){self.attrs} uwtable "
                f"gc \"{GC_STRATEGY}\" {{")
        return "\n".join([head, *self.body(False, set()), "}"])

    def resume(self, demoted: set[str]) -> str:
        args = (f"i64 {lref(PREFIX + 'site_id')}", f"ptr {lref(PREFIX + 'state')}")
        head = (f"define {self.ret} {ref('@', self.symbol + '__resume')}({', '.join(args)})"
                f"{self.attrs} uwtable gc \"{GC_STRATEGY}\" {{")
        types = self.ctx.types
        state = lref(PREFIX + "state")
        lines = [f"{PREFIX}resume.entry:"]
        for v in sorted(demoted):
            lines.append(f"  {lref(PREFIX + 'var.' + v)} = alloca {types[v]}")
        cases = " ".join(f"i64 {s.id}, label {lref(f'{PREFIX}resume.{s.id}')}"
                         for s in self.sites)
        lines.append(f"  switch i64 {lref(PREFIX + 'site_id')}, label "
                     f"{lref(PREFIX + 'resume.unknown')} [ {cases} ]")
        lines += [f"{PREFIX}resume.unknown:", "  call void @llvm.trap()", "  unreachable"]
        results = {}
        for b in self.blocks:
            for inst in b.insts:
                if inst.site is not None:
                    results[inst.site.id] = inst
        for s in self.sites:
            lines.append(f"{PREFIX}resume.{s.id}:")
            slots = [(lv.name, lv.type, STATE_LIVE_BASE + i) for i, lv in enumerate(s.live)]
            inst = results[s.id]
            if inst.name is not None and inst.name in demoted:
                slots.append((inst.name, inst.type, STATE_RESULT_INDEX))
            for name, ty, index in slots:
                addr = lref(self.fresh("state.addr"))
                val = lref(self.fresh("state.value"))
                lines.append(f"  {addr} = getelementptr inbounds i64, ptr {state}, i64 {index}")
                lines.append(f"  {val} = load {ty}, ptr {addr}")
                lines.append(f"  store {ty} {val}, ptr {lref(PREFIX + 'var.' + name)}")
            lines.append(f"  br label {lref(f'{PREFIX}after.{s.id}')}")
        # The original entry block is no entry any more: a block with no
        # predecessors LLVM deletes (the resume never reaches code before a site
        # other than through a site's continuation).
        body = self.body(True, demoted)
        return "\n".join([head, *lines, *body, "}"])


def function_ir(ctx: Context, fn, module_globals: str, prof_id: int,
                declared_types: Mapping[str, str], stack_check: bool = False) -> FunctionIR:
    """The FunctionIR of ``fn`` (a function of the prepared module, every
    value named): its module is ``module_globals`` (the globals, declarations
    and metadata every function shares), the normal and the resume entry,
    and the declarations they need. ``prof_id``: a metadata number the
    module does not use (nor ``prof_id + 1``); ``declared_types``: name ->
    function type of every function the module declares or defines;
    ``stack_check``: the normal entry starts with the entry stack check."""
    blocks = model_of(fn)
    for arg in fn.arguments:
        ctx.types[arg.name] = str(arg.type)
    for b in blocks:
        for inst in b.insts:
            if inst.name is not None:
                ctx.types[inst.name] = inst.type
            inst.site = classify(ctx, inst, declared_types)
            for op in inst.operands:
                if op.value.startswith(("@" + PREFIX, f'@"{PREFIX}')):
                    raise CompileError(
                        f"{ctx.name}: {op.value} is one of osrjit's own symbols ({inst.text}); "
                        f"call a JIT function by its name")
            for op in (inst.operands if inst.site is None else
                       [*inst.site.args]):
                if op.function is not None and op.function in ctx.jit_types:
                    raise CompileError(
                        f"{ctx.name}: the address of JIT function {op.function!r} is taken "
                        f"({inst.text}); JIT functions can only be called")
    ctx.allocas = stack_derived(blocks)
    demoted, used = _live_across_sites(ctx, blocks)
    params = [(a.name, str(a.type)) for a in fn.arguments]
    demoted |= {n for n, _ in params if n in used}
    attrs = _header_attrs(ctx.name, ctx.header)
    em = _Emitter(ctx, blocks, params, _return_type(fn), attrs, f"!{prof_id}",
                  f"!{prof_id + 1}" if stack_check else None)
    normal = em.normal()
    resume = em.resume(demoted)
    decls = []
    for name in sorted(em.slots):
        decls.append(f"{ref('@', SLOT_PREFIX + name)} = external global ptr")
    for name in sorted(em.direct):
        ret, args = _split_fnty(em.direct_types[name])
        decls.append(f"declare {ret} {ref('@', direct_call_symbol(name))}({args})")
    if em.uses_poll:
        decls.append(f"{ref('@', SAFEPOINT_FLAG_SYMBOL)} = external global i64")
        decls.append(f"declare void {ref('@', SAFEPOINT_SLOW_SYMBOL)}()")
    decls.append("declare token @llvm.experimental.gc.statepoint.p0(i64, i32, ptr, i32, "
                 "i32, ...)")
    for ty in sorted(em.uses_result):
        decls.append(f"declare {ty} @llvm.experimental.gc.result.{_GC_RESULT_SUFFIX[ty]}(token)")
    decls.append("declare void @llvm.trap()")
    slow, fast = POLL_BRANCH_WEIGHTS
    prof = f"!{prof_id} = !{{!\"branch_weights\", i32 {slow}, i32 {fast}}}"
    if stack_check:
        decls.append(f"{ref('@', STACK_LIMIT_SYMBOL)} = external global i8")
        decls.append(f"declare void {ref('@', STACK_OVERFLOW_SYMBOL)}()")
        decls.append("declare i64 @llvm.read_register.i64(metadata)")
        prof += f"\n!{prof_id + 1} = !{{!\"rsp\"}}"
    text = "\n".join([module_globals, normal, "", resume, "", *decls, prof, ""])
    sites = {s.id: SiteInfo(id=s.id, kind=s.kind,
                            callee=SAFEPOINT_SLOW_SYMBOL if s.kind is SiteKind.POLL else s.callee,
                            live=s.live, has_result=not s.fnty.startswith("void "),
                            line=s.line, col=s.col)
             for s in em.sites}
    jit_callees = {s.callee for s in em.sites if s.jit and s.callee != ctx.name}
    return FunctionIR(name=ctx.name, params=tuple(n for n, _ in params), module_ir=text,
                      symbol=em.symbol, sites=sites, callees=frozenset(jit_callees),
                      return_type=em.ret, direct_callees=frozenset(em.direct))


def _live_across_sites(ctx: Context, blocks: list[Block]) -> tuple[set[str], set[str]]:
    """Set every site's ``live`` (the values live right after its call, minus
    its result, by name) and return (the values the resume entry keeps in
    slots but for parameters, every value used anywhere)."""
    live_out = live_out_sets(blocks)
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
    return demoted, used


def _split_fnty(fnty: str) -> tuple[str, str]:
    ret, args = fnty.split(" (", 1)
    return ret, args[:-1]


def _return_type(fn) -> str:
    return str(fn.global_value_type).split(" (", 1)[0]


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

