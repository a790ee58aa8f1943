"""The function model of :mod:`osrjit.plainir`: names as LLVM prints them,
blocks and instructions read through llvmlite's binding, the loop headers
that get polls, SSA liveness, and the values that point into a frame.

Every value is identified by its *raw* name (what ``ValueRef.name`` returns);
:func:`ref` prints it as LLVM does (``%x``, ``%"a b"``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from llvmlite import binding as llvm

from ..abi import LiveValue, SiteKind

#: ``declare void @osrjit_safepoint()`` — an explicit poll in plain IR.
SAFEPOINT_SYMBOL = "osrjit_safepoint"
PREFIX = "osrjit."   # every name instrumentation invents starts with it
_VK = llvm.ValueKind


# -- names as LLVM prints them ---------------------------------------------------

_BARE = re.compile(r"[-a-zA-Z$._][-a-zA-Z$._0-9]*\Z")
# A local name in printed IR (group 1), or a string literal (skipped).
_LOCAL_TOKEN = re.compile(r'(%"[^"]*"|%[-a-zA-Z$._0-9]+)|c?"[^"]*"')
_ESCAPE = re.compile(r"\\([0-9A-Fa-f]{2}|\\)")


def ref(sigil: str, name: str) -> str:
    """``name`` as LLVM prints a reference to it: ``%x`` or ``%"x y"``."""
    if _BARE.match(name):
        return sigil + name
    escaped = "".join(c if c.isprintable() and c not in '"\\' else f"\\{ord(c):02X}"
                      for c in name)
    return f'{sigil}"{escaped}"'


def unref(token: str) -> str:
    """The raw name of a printed ``%name`` / ``%"name"`` token."""
    body = token[1:]
    if body.startswith('"'):
        return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1), 16)),
                           body[1:-1])
    return body


def lref(name: str) -> str:
    """A local value or block ``name`` as LLVM prints a reference to it."""
    return ref("%", name)


def substitute(text: str, replace: Mapping[str, str]) -> str:
    """``text`` with each local token whose raw name is in ``replace`` renamed
    to the printed reference ``replace[name]`` (string literals untouched)."""
    def sub(m):
        token = m.group(1)
        if token is None:
            return m.group(0)
        return replace.get(unref(token), token)
    return _LOCAL_TOKEN.sub(sub, text)


# -- the function model ----------------------------------------------------------

@dataclass
class Operand:
    """One operand of an instruction."""
    text: str            # typed, as in a call's argument list: "i64 %x", "ptr @g", "i64 5"
    value: str           # the value alone: "%x", "@g", "5"
    type: str
    local: str | None    # raw name of an argument or instruction, else None
    function: str | None = None  # raw name if the operand is a function
    asm: bool = False            # inline asm (a callee)


@dataclass
class Site:
    """A call that becomes a frame-map site (``live`` is filled by the liveness pass)."""
    key: str
    id: int
    kind: SiteKind
    callee: str | None        # a JIT function's or external symbol's name (None: indirect)
    fnty: str                 # the call's function type
    args: list[Operand]
    callee_op: Operand
    jit: bool                 # a call of a JIT function (slot, direct or self)
    live: tuple[LiveValue, ...] = ()
    metadata: str = ""        # the call's trailing ", !dbg !N" attachments
    line: int | None = None   # its debug location, if it has one
    col: int | None = None


@dataclass
class Inst:
    """One instruction as the prepared module prints it, and what it reads."""
    text: str                 # as printed, without indentation
    name: str | None          # defined value (raw), or None
    type: str
    opcode: str
    operands: list[Operand]
    incoming: list[str] = field(default_factory=list)   # phi: predecessor per operand
    site: Site | None = None


@dataclass
class Block:
    """A basic block: its instructions in order and its successors (names)."""
    name: str
    insts: list[Inst]
    succs: list[str]


def operand(op) -> Operand:
    """The :class:`Operand` of llvmlite ``ValueRef`` ``op``."""
    ty = str(op.type)
    kind = op.value_kind
    if kind in (_VK.argument, _VK.instruction):
        value = lref(op.name)
        return Operand(f"{ty} {value}", value, ty, op.name)
    if kind == _VK.basic_block:
        value = lref(op.name)
        return Operand(f"label {value}", value, "label", None)
    if kind in (_VK.function, _VK.global_variable, _VK.global_alias, _VK.global_ifunc):
        value = ref("@", op.name)
        return Operand(f"{ty} {value}", value, ty, None,
                        op.name if kind == _VK.function else None)
    if kind == _VK.inline_asm:
        return Operand("", "", ty, None, asm=True)
    text = str(op).strip()
    value = text[len(ty) + 1:] if text.startswith(ty + " ") else text
    return Operand(f"{ty} {value}", value, ty, None)


def model_of(fn) -> list[Block]:
    """The blocks of llvmlite function ``fn`` (every block and value named), in order."""
    blocks = []
    for block in fn.blocks:
        insts = []
        for inst in block.instructions:
            ops = [operand(o) for o in inst.operands]
            name = inst.name or None
            rec = Inst(str(inst).strip(), name, str(inst.type), inst.opcode, ops)
            if inst.opcode == "phi":
                rec.incoming = [b.name for b in inst.incoming_blocks]
            insts.append(rec)
        term = insts[-1]
        succs = [o.value for o in term.operands if o.type == "label"]
        blocks.append(Block(block.name, insts, [unref(s) for s in succs]))
    return blocks


# -- polls -----------------------------------------------------------------------

def poll_headers(blocks: list[Block]) -> list[str]:
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


# -- liveness --------------------------------------------------------------------

def live_out_sets(blocks: list[Block]) -> dict[str, set[str]]:
    """Live-out set (raw names) of every block, to the fixed point of::

        live_in(B)  = use(B) | (live_out(B) - def(B))
        live_out(B) = phi_use(B) | union(live_in(S) for S in succ(B))

    where ``use(B)`` are the values B reads before defining them (phis
    excluded), ``def(B)`` the values B defines (phis included), and
    ``phi_use(B)`` the phi operands the successors take on an edge from B."""
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
    return live_out


def stack_derived(blocks: list[Block]) -> set[str]:
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

