"""The native deopt transfer: frame maps compiled to code, a per-thread LIFO of hijacks.

The Python transfer (:func:`deopt.transfer.return_through_stub`) finds a
hijack record by slot in a dict, reads the old frame's live values through its
frame map, unwinds the frame once with its CFI and returns a plan. This module
does the same with no Python on the path, in three pieces:

**Per-thread LIFO** (:class:`ThreadBlock`, owned by :class:`ThreadLifo`). At
hijack time (world stopped) every hijacked slot of a thread gets an
:class:`LifoEntry` ``(slot, original return address, descriptor, status)``.
Entries are kept sorted by slot address, highest first, so the *innermost*
pending frame — the one whose callee returns next — is on top: a stack has
one return order, and every pending slot is still on it. The dispatcher
(:data:`DISPATCH_SYMBOL`) takes ``entries[top − 1]`` when its slot is the
stub's ``E − 8`` (the common case), else searches the thread's entries from
the top down (counted in :attr:`ThreadBlock.searches`), and when the slot is
not there returns NULL: the caller then runs the Python transfer (counted in
:attr:`ThreadBlock.misses`).

**Per-version code** (:func:`version_transfer_ir`). One LLVM function per old
version, ``void f(ptr exit, i64 index, i64 ra, ptr target, ptr plan, ptr
state)``, with one switch case per frame map (per return address) compiled
from :func:`compile_frame_map`: the live values read from the saved
registers, ``[reg + offset]`` stack slots or constants; the old frame's CFA
from its CFI row at ``return address − 1``; the caller's callee-saved
registers from where that row says they are saved (or the frame's own values
when it does not save them). A row that cannot be expressed that way (a DWARF
expression, a return address not at ``CFA − 8``, a value in a caller-saved
register) gets no case: frames at it are never pushed, so they take the
Python transfer (which then gives the same answer or the same error).

**Targets** (:class:`Target`). Where a frame continues is the function's
*current* version at transfer time: each :class:`Descriptor` (one per old
frame map) points at an immutable target ``(resume entry, site id, count,
permutation)`` — ``state[1 + i] = old_values[perm[i]]`` — that the runtime
replaces (one aligned 8-byte store) when it publishes a new version. A NULL
target hands the frame to the Python transfer (which lets it fail the usual
way: it returns into its old code).

Formulas (``E`` = the RSP the stub was entered with; registers as the stub
saved them in :class:`~deopt.stub.ExitState`)::

    entry      = LIFO entry with slot == E − 8 and status PENDING
    *(E − 8)   = entry.original_ra                          (slot restored first)
    values[j]  = frame map location j with RSP = E
    cfa        = regs[row.cfa_register] + row.cfa_offset
    caller.r   = *(cfa + n) | cfa + n | regs[r']            (the row's rule for r)
    state      = [RAX] + [values[perm[i]] for i < count]    (8-byte slots)
    plan       = rsp: cfa − 8, rip: resume entry, rdi: site id, rsi: state,
                 rax: 0, xmm0: 0, callee-saved: caller's, status_ptr: thread status
    entry.status = TAKEN                                    (last store; see below)

Accounting: the dispatcher never calls Python and never allocates. Python
learns which entries were taken by reading their statuses
(:meth:`ThreadLifo.drain`, safe at any time; entries are rewritten only while
the world is stopped, :meth:`ThreadLifo.commit`). The ``TAKEN`` / ``HANDED``
status is the dispatcher's last access to per-version memory (descriptor,
target, per-version code), so once Python has seen every entry of a version
leave ``PENDING`` nothing can run that version's transfer code any more.

Lifetimes: a :class:`ThreadLifo` (block, entry array, plan and state buffer)
lives until its thread has detached and no entry is pending; its state buffer
may be read by a resume entry after the transfer, so it is never moved or
freed while its thread can run JIT code. An entry array is replaced only while
the world is stopped (no thread is in a transfer). Descriptors and targets
live as long as their old version's transfer code, i.e. until the version is
freed.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from unwinder import nativesrc
from unwinder.compiled import (OP_COPY, OP_GENERAL, OP_LOAD, OP_SAME, OP_UNDEF, OP_VALUE)
from unwinder.x86_64 import CALLEE_SAVED, R12, R13, R14, R15, RA, RBP, RBX, RSP

from .native_lifo import (HANDED, PENDING, TAKEN, LifoEntry, NativeTransferError,
                          ThreadBlock, ThreadLifo)
from .plan import STATE_SLOTS
from .stackmaps import LocationKind
from .stub import EXIT_STATE_TO_ENTRY_RSP, ExitState, TransferPlan

__all__ = [
    "DISPATCH_SYMBOL", "STATE_SLOTS", "PENDING", "TAKEN", "HANDED",
    "LifoEntry", "Descriptor", "ThreadBlock", "Target", "NativeFramePlan", "Unsupported",
    "compile_frame_map", "version_transfer_ir", "dispatch_module_ir", "permutation",
    "ThreadLifo", "NativeTransferError", "dispatch_ir", "NATIVE_SOURCES",
]

_MASK64 = (1 << 64) - 1

#: Symbol of the native dispatcher: ``ptr dispatch(ptr exit, ptr block, ptr status)``.
#: ``exit``: the stub's :class:`~deopt.stub.ExitState`; ``block``: the calling
#: thread's :class:`ThreadBlock` or NULL; ``status``: the thread's status word
#: (stored into ``plan.status_ptr``). Returns the plan in ``block``, or NULL
#: when the Python transfer must run (the stack and the slot are untouched
#: then; the entry, if there was one, is marked HANDED).
DISPATCH_SYMBOL = "osrjit_ntx_dispatch"


class Descriptor(ctypes.Structure):
    """One old frame map as the dispatcher sees it (32 bytes).

    ``code``: the version's transfer function; ``index``: the frame map's case
    in its switch; ``target``: address of the current :class:`Target` (NULL:
    hand the frame to Python); ``version``: the old version's id (debugging).
    """
    _fields_ = [("code", ctypes.c_uint64),
                ("index", ctypes.c_int64),
                ("target", ctypes.c_uint64),
                ("version", ctypes.c_int64)]


def _target_type(count):
    class _Target(ctypes.Structure):
        _fields_ = [("resume_entry", ctypes.c_uint64), ("site_id", ctypes.c_uint64),
                    ("count", ctypes.c_int64), ("perm", ctypes.c_int64 * max(1, count))]
    return _Target


_TARGET_TYPES = {}


class Target:
    """An immutable resume target of one old frame map (native memory it owns).

    ``resume_entry``: absolute address of the new version's resume entry;
    ``site_id``; ``perm``: for each live value of the new site, in state
    order, the index of the old frame map's value that provides it. ``owner``:
    the new version (kept for the runtime's bookkeeping). ``address`` is what
    :attr:`Descriptor.target` holds; the memory lives as long as this object.
    """

    def __init__(self, resume_entry, site_id, perm, owner=None):
        cls = _TARGET_TYPES.get(len(perm))
        if cls is None:
            cls = _TARGET_TYPES[len(perm)] = _target_type(len(perm))
        self._struct = cls(resume_entry, site_id & _MASK64, len(perm))
        for i, p in enumerate(perm):
            self._struct.perm[i] = p
        self.resume_entry = resume_entry
        self.site_id = site_id
        self.perm = tuple(perm)
        self.owner = owner
        self.address = ctypes.addressof(self._struct)


def permutation(frame_map, live_names):
    """Indices into ``frame_map.values`` for ``live_names`` (the new site's order).

    None if a name is missing (the Python transfer then reports it).
    """
    index = {v.name: i for i, v in enumerate(frame_map.values)}
    try:
        return tuple(index[n] for n in live_names)
    except KeyError:
        return None


# --------------------------------------------------------------------------
# Frame maps compiled for native code
# --------------------------------------------------------------------------

#: Registers a suspended frame has at its return address, as the stub sees them:
#: RSP = E, the callee-saved registers, and the original return address.
_KNOWN = frozenset((RSP, RA) + CALLEE_SAVED)


@dataclass(frozen=True)
class Unsupported:
    """Why a frame map has no native case (its frames take the Python transfer)."""
    reason: str


@dataclass(frozen=True)
class NativeFramePlan:
    """A frame map and its CFI row reduced to what the generated code does.

    ``values``: per live value, one of ``("const", v)``, ``("reg", r)``,
    ``("addr", r, offset)`` (DIRECT: ``r + offset``), ``("load", r, offset,
    size)`` (INDIRECT: ``size`` bytes at ``[r + offset]``, zero-extended; the
    low 8 bytes when larger). ``cfa``: ``(register, offset)``. ``caller``: per
    callee-saved register (DWARF number), ``("load", n)`` (``*(cfa + n)``),
    ``("cfa", n)`` (``cfa + n``), ``("own", r)`` (the frame's value of
    ``r``, which may be RSP or RA). Registers are DWARF numbers from
    :data:`_KNOWN`; offsets in bytes.
    """
    frame_map: object
    values: tuple
    cfa: tuple
    caller: tuple


def compile_frame_map(frame_map, space):
    """A :class:`NativeFramePlan` for ``frame_map``, or :class:`Unsupported`.

    ``space``: the :class:`unwinder.AddressSpace` holding the version's CFI
    (the row in force at ``return_address − 1``, exactly as the Python
    transfer's :func:`unwinder.step` finds it). Mirrors
    :func:`deopt.transfer.plan_transfer`: whatever it would refuse is
    Unsupported here.
    """
    if len(frame_map.values) > STATE_SLOTS - 1:
        return Unsupported(f"{len(frame_map.values)} live values (at most {STATE_SLOTS - 1})")
    values = []
    for slot in frame_map.values:
        loc = slot.location
        if loc.kind in (LocationKind.CONSTANT, LocationKind.CONSTANT_INDEX):
            values.append(("const", loc.value & _MASK64))
            continue
        if loc.dwarf_reg not in _KNOWN:
            return Unsupported(f"value {slot.name!r} lives in DWARF register {loc.dwarf_reg}, "
                               "which is not known at the return address")
        if loc.kind is LocationKind.REGISTER:
            values.append(("reg", loc.dwarf_reg))
        elif loc.kind is LocationKind.DIRECT:
            values.append(("addr", loc.dwarf_reg, loc.offset))
        elif loc.kind is LocationKind.INDIRECT:
            if loc.size < 1:
                return Unsupported(f"value {slot.name!r} has size {loc.size}")
            values.append(("load", loc.dwarf_reg, loc.offset, min(loc.size, 8)))
        else:  # pragma: no cover - the parser admits only the five kinds
            return Unsupported(f"unknown location kind {loc.kind!r}")
    entry = space.unwind_entry(frame_map.return_address - 1)
    if entry is None:
        return Unsupported(f"no unwind row at {frame_map.return_address - 1:#x}")
    plan = entry[0]
    if plan.cfa_register is None:
        return Unsupported("the CFA is a DWARF expression")
    if plan.cfa_register not in _KNOWN - {RA}:
        return Unsupported(f"the CFA is based on DWARF register {plan.cfa_register}")
    ops = {reg: (op, arg) for reg, op, arg in plan.ops}
    if ops.get(RA) != (OP_LOAD, -8):
        return Unsupported(f"the return address is not saved at CFA - 8 ({ops.get(RA)})")
    caller = []
    for reg in CALLEE_SAVED:
        op, arg = ops[reg]
        if op == OP_LOAD:
            caller.append((reg, ("load", arg)))
        elif op == OP_VALUE:
            caller.append((reg, ("cfa", arg)))
        elif op in (OP_SAME, OP_UNDEF):
            # Not saved by the frame: the caller's value is the frame's own
            # (an undefined rule keeps it too, as the Python transfer does).
            caller.append((reg, ("own", reg)))
        elif op == OP_COPY:
            caller.append((reg, ("own", arg if arg in _KNOWN else reg)))
        else:
            assert op == OP_GENERAL
            return Unsupported(f"DWARF register {reg} is recovered by an expression")
    return NativeFramePlan(frame_map, tuple(values), (plan.cfa_register, plan.cfa_offset),
                           tuple(caller))


# --------------------------------------------------------------------------
# IR
# --------------------------------------------------------------------------

_EXIT_OFFSET = {RBX: ExitState.rbx.offset, RBP: ExitState.rbp.offset,
                R12: ExitState.r12.offset, R13: ExitState.r13.offset,
                R14: ExitState.r14.offset, R15: ExitState.r15.offset}
_PLAN_OFFSET = {RBX: TransferPlan.rbx.offset, RBP: TransferPlan.rbp.offset,
                R12: TransferPlan.r12.offset, R13: TransferPlan.r13.offset,
                R14: TransferPlan.r14.offset, R15: TransferPlan.r15.offset}
_REG_NAME = {RSP: "%rsp", RA: "%ra", RBX: "%rbx", RBP: "%rbp", R12: "%r12", R13: "%r13",
             R14: "%r14", R15: "%r15"}


def _i64(value):
    """An LLVM ``i64`` literal for an unsigned 64-bit bit pattern."""
    value &= _MASK64
    return str(value - (1 << 64) if value >= 1 << 63 else value)


def _case_ir(k, fp, out):
    """Append the IR of switch case ``k`` (frame plan ``fp``) to ``out``."""
    p = f"%c{k}."
    out.append(f"fm{k}:")
    for j, v in enumerate(fp.values):
        name = f"{p}v{j}"
        if v[0] == "const":
            out.append(f"  {name} = add i64 0, {_i64(v[1])}")
        elif v[0] == "reg":
            out.append(f"  {name} = add i64 {_REG_NAME[v[1]]}, 0")
        elif v[0] == "addr":
            out.append(f"  {name} = add i64 {_REG_NAME[v[1]]}, {v[2]}")
        else:
            _, reg, offset, size = v
            bits = 8 * size
            out.append(f"  {name}.a = add i64 {_REG_NAME[reg]}, {offset}")
            out.append(f"  {name}.p = inttoptr i64 {name}.a to ptr")
            if bits == 64:
                out.append(f"  {name} = load i64, ptr {name}.p, align 1")
            else:
                out.append(f"  {name}.n = load i{bits}, ptr {name}.p, align 1")
                out.append(f"  {name} = zext i{bits} {name}.n to i64")
        out.append(f"  {name}.s = getelementptr inbounds i64, ptr %vals, i64 {j}")
        out.append(f"  store i64 {name}, ptr {name}.s, align 8")
    reg, offset = fp.cfa
    out.append(f"  {p}cfa = add i64 {_REG_NAME[reg]}, {offset}")
    out.append(f"  {p}rsp = sub i64 {p}cfa, 8")
    out.append(f"  store i64 {p}rsp, ptr %plan, align 8")
    for reg, rule in fp.caller:
        r = f"{p}r{reg}"
        if rule[0] == "load":
            out.append(f"  {r}.a = add i64 {p}cfa, {rule[1]}")
            out.append(f"  {r}.p = inttoptr i64 {r}.a to ptr")
            out.append(f"  {r} = load i64, ptr {r}.p, align 8")
        elif rule[0] == "cfa":
            out.append(f"  {r} = add i64 {p}cfa, {rule[1]}")
        else:
            out.append(f"  {r} = add i64 {_REG_NAME[rule[1]]}, 0")
        out.append(f"  {r}.d = getelementptr inbounds i8, ptr %plan, i64 {_PLAN_OFFSET[reg]}")
        out.append(f"  store i64 {r}, ptr {r}.d, align 8")
    out.append("  br label %tail")


def version_transfer_ir(symbol, plans):
    """Textual IR of the transfer function of one version's frame maps:
    ``void @<symbol>(ptr exit, i64 index, i64 ra, ptr target, ptr plan, ptr state)``.

    ``plans``: the :class:`NativeFramePlan` of each case, by index (None: no
    case; the dispatcher never calls with such an index because no entry is
    pushed for it). ``ra`` is the frame's original return address (for rules
    and locations based on DWARF register 16). Any other index traps.
    """
    nvals = max([len(fp.values) for fp in plans if fp is not None] + [1])
    out = [f"define void @{symbol}(ptr %exit, i64 %index, i64 %ra, ptr %target, ptr %plan, "
           "ptr %state) nounwind {",
           "entry:",
           f"  %vals = alloca [{nvals} x i64], align 8",
           "  %exit.i = ptrtoint ptr %exit to i64",
           f"  %rsp = add i64 %exit.i, {EXIT_STATE_TO_ENTRY_RSP}"]
    for reg, offset in _EXIT_OFFSET.items():
        name = _REG_NAME[reg]
        out.append(f"  {name}.p = getelementptr inbounds i8, ptr %exit, i64 {offset}")
        out.append(f"  {name} = load i64, ptr {name}.p, align 8")
    cases = " ".join(f"i64 {k}, label %fm{k}" for k, fp in enumerate(plans) if fp is not None)
    out.append(f"  switch i64 %index, label %bad [ {cases} ]")
    for k, fp in enumerate(plans):
        if fp is not None:
            _case_ir(k, fp, out)
    rax, resume, site = ExitState.rax.offset, TransferPlan.rip.offset, TransferPlan.rdi.offset
    out.extend([
        "tail:",
        f"  %rax.p = getelementptr inbounds i8, ptr %exit, i64 {rax}",
        "  %rax = load i64, ptr %rax.p, align 8",
        "  store i64 %rax, ptr %state, align 8",
        "  %count.p = getelementptr inbounds i8, ptr %target, i64 16",
        "  %count = load i64, ptr %count.p, align 8",
        "  %perm = getelementptr inbounds i8, ptr %target, i64 24",
        "  %any = icmp sgt i64 %count, 0",
        "  br i1 %any, label %copy, label %fill",
        "copy:",
        "  %i = phi i64 [ 0, %tail ], [ %i.next, %copy ]",
        "  %pi.p = getelementptr inbounds i64, ptr %perm, i64 %i",
        "  %pi = load i64, ptr %pi.p, align 8",
        "  %val.p = getelementptr inbounds i64, ptr %vals, i64 %pi",
        "  %val = load i64, ptr %val.p, align 8",
        "  %i.next = add nuw i64 %i, 1",
        "  %dst = getelementptr inbounds i64, ptr %state, i64 %i.next",
        "  store i64 %val, ptr %dst, align 8",
        "  %more = icmp slt i64 %i.next, %count",
        "  br i1 %more, label %copy, label %fill",
        "fill:",
        "  %resume = load i64, ptr %target, align 8",
        f"  %rip.p = getelementptr inbounds i8, ptr %plan, i64 {resume}",
        "  store i64 %resume, ptr %rip.p, align 8",
        "  %site.p = getelementptr inbounds i8, ptr %target, i64 8",
        "  %site = load i64, ptr %site.p, align 8",
        f"  %rdi.p = getelementptr inbounds i8, ptr %plan, i64 {site}",
        "  store i64 %site, ptr %rdi.p, align 8",
        "  %state.i = ptrtoint ptr %state to i64",
        f"  %rsi.p = getelementptr inbounds i8, ptr %plan, i64 {TransferPlan.rsi.offset}",
        "  store i64 %state.i, ptr %rsi.p, align 8",
        f"  %prax.p = getelementptr inbounds i8, ptr %plan, i64 {TransferPlan.rax.offset}",
        "  store i64 0, ptr %prax.p, align 8",
        f"  %x0.p = getelementptr inbounds i8, ptr %plan, i64 {TransferPlan.xmm0.offset}",
        "  store i64 0, ptr %x0.p, align 8",
        f"  %x1.p = getelementptr inbounds i8, ptr %plan, i64 {TransferPlan.xmm0.offset + 8}",
        "  store i64 0, ptr %x1.p, align 8",
        "  ret void",
        "bad:",
        "  call void @llvm.trap()",
        "  unreachable",
        "}",
        "declare void @llvm.trap() cold noreturn nounwind",
    ])
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# The dispatcher (hand-written)
# --------------------------------------------------------------------------

def dispatch_ir():
    """``native_dispatch.ll`` rendered: the dispatcher (:data:`DISPATCH_SYMBOL`)."""
    return nativesrc.render_file(
        __package__, "native_dispatch.ll",
        structs=[ThreadBlock, TransferPlan, LifoEntry, Descriptor, ExitState],
        values={"DISPATCH_SYMBOL": DISPATCH_SYMBOL, "PENDING": PENDING, "TAKEN": TAKEN,
                "HANDED": HANDED})


def dispatch_module_ir(triple):
    """Textual IR of a module holding only the dispatcher (:data:`DISPATCH_SYMBOL`)."""
    return f'target triple = "{triple}"\n' + dispatch_ir()


NATIVE_SOURCES = {"native_dispatch.ll": dispatch_ir}
